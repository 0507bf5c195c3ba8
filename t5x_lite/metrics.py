"""Metrics that know how to merge, and where they are written.

A loss returns `(loss, metrics)` where every metric is one of the small pytrees below. Each says
how two of it combine (microbatches of a step, steps of a log interval, batches of an
evaluation), so the trainer and the jobs merge any metric without knowing its name:

    Average(total, count)   reports total / count; merging adds both. `Average.of(x, w)` is a
                            mean of x weighted by w (a token mean: w = number of tokens).
    Sum(total)              reports the total (token counts, skipped steps).

By convention `metrics["loss"]` is the Average of the loss itself: its `count` is the loss's
normaliser (target tokens, preference pairs, sequences), which weights microbatches.

`MetricsWriter` writes computed scalars as TensorBoard events; `log` and `progress_bar` are
what a job prints (on process 0 only).
"""
from __future__ import annotations

import functools
import os
from typing import Mapping, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


@flax.struct.dataclass
class Average:
  """A weighted mean kept as (weighted sum, total weight)."""
  total: Array
  count: Array

  @classmethod
  def of(cls, value, weight=1.0) -> "Average":
    weight = jnp.asarray(weight, jnp.float32)
    return cls(jnp.asarray(value, jnp.float32) * weight, weight)

  def merge(self, other: "Average") -> "Average":
    return Average(self.total + other.total, self.count + other.count)

  def compute(self):
    return self.total / jnp.maximum(self.count, 1e-9)

  def __float__(self):
    return float(np.asarray(self.compute()))


@flax.struct.dataclass
class Sum:
  """A total."""
  total: Array

  @classmethod
  def of(cls, value) -> "Sum":
    return cls(jnp.asarray(value, jnp.float32))

  def merge(self, other: "Sum") -> "Sum":
    return Sum(self.total + other.total)

  def compute(self):
    return self.total

  def __float__(self):
    return float(np.asarray(self.total))


Metrics = Mapping[str, "Average | Sum"]


def is_metric(x) -> bool:
  return isinstance(x, (Average, Sum))


def merge(a: Metrics, b: Metrics) -> dict:
  """Two dicts of metrics with the same names, merged name by name."""
  if a.keys() != b.keys():
    raise ValueError(f"Cannot merge metrics with different names: {sorted(a)} vs {sorted(b)}.")
  return {name: a[name].merge(b[name]) for name in a}


def merge_all(history: Sequence[Metrics]) -> dict:
  return functools.reduce(merge, history)


def compute(metrics: Metrics) -> dict[str, float]:
  """The reported value of every metric, as Python floats (fetches them from the device)."""
  metrics = jax.device_get(dict(metrics))
  return {name: float(np.asarray(metric.compute())) for name, metric in metrics.items()}


def summarize(history: Sequence[Metrics]) -> dict[str, float]:
  """Merged and computed metrics of several steps or batches, fetched together (one host sync)."""
  return compute(merge_all(jax.device_get(list(history))))


def zeros_like(metrics: Metrics) -> dict:
  """Metrics of the same kinds and shapes holding zeros: the start of an accumulation."""
  return jax.tree.map(jnp.zeros_like, dict(metrics))


class MetricsWriter:
  """TensorBoard scalars in <directory>/<name>/ (only process 0 writes)."""

  def __init__(self, directory: str, name: str):
    self._writer = None
    if jax.process_index() == 0:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      from tensorflow.core.framework import summary_pb2  # pylint: disable=g-import-not-at-top
      self._tf = tf
      self._writer = tf.summary.create_file_writer(os.path.join(directory, name))
      # Written with the raw summary op and the "scalars" plugin tag: TensorBoard reads them as
      # scalars, and writing needs no tensorboard package.
      self._metadata = summary_pb2.SummaryMetadata(
          plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if self._writer is None:
      return
    with self._writer.as_default():
      for name, value in scalars.items():
        self._tf.summary.write(name, self._tf.constant(float(value), self._tf.float32), step=step,
                               metadata=self._metadata)
    self._writer.flush()


def log(message: str) -> None:
  """Prints on process 0 only (every process of a multi-host run says the same)."""
  if jax.process_index() == 0:
    print(message, flush=True)


def progress_bar(total: int, initial: int):
  """A tqdm bar of steps on process 0; None elsewhere."""
  if jax.process_index() != 0:
    return None
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
