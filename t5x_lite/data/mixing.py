"""Mixture rates by size and temperature, and the realised mix of the batches a run trains on.

Rates (`mixture_rates`, `register_mixture` in tasks.py): each task's size n_i is its number of
examples or of tokens (counted once over its source, `task_size`), capped at `maximum`, then
rate_i = min(n_i, maximum) ** (1 / temperature), as mT5: T=1 samples in proportion to size, a
larger T flattens the mix towards uniform (upsampling the small tasks), the cap keeps one huge
task from dominating.

Realised mix: every mixture registered by t5x_lite samples with `tagged_sample_fn`, which adds
one token per example to a "mixture_task" feature (1 + the task's index). The packer packs it
like any feature (a row holds the tags of its examples) and the feature converters carry it
through; `MixCounter` takes it out of each batch before the model sees it and counts the
examples of each task, summed over all processes when taken, which the train job logs every
`log_every` steps (mix/<task>).
"""
from __future__ import annotations

import collections
import functools
import logging
from typing import Mapping, Optional, Sequence

import jax
import numpy as np
import seqio
import tensorflow as tf

TASK_FEATURE = "mixture_task"
SIZE_KINDS = ("examples", "tokens")


# ---------------------------------------------------------------------------- rates

COUNT_LIMIT = 10 ** 7  # records counted at most without a maximum (a generated task never ends)


@functools.lru_cache(maxsize=None)
def task_size(task_name: str, split: str = "train", by: str = "examples",
              maximum: Optional[float] = None) -> float:
  """A task's split's number of `by`: records of its source, or tokens of their text fields
  under the task's vocabulary (one pass over the source, remembered per process). Counting stops
  once `maximum` is reached (only min(n, maximum) matters); without one, a source of more than
  COUNT_LIMIT records is refused (a generated task such as addition never ends)."""
  task = seqio.TaskRegistry.get(task_name)
  vocab = next(iter(task.output_features.values())).vocabulary
  ds = task.source.get_dataset(split=split, shuffle=False)
  text_keys = [k for k, spec in ds.element_spec.items() if spec.dtype == tf.string]

  def tokens(ex):
    return tf.add_n([tf.size(vocab.encode_tf(ex[k])) for k in text_keys]) if text_keys else 0

  examples = total = 0
  for count in ds.map(tokens, num_parallel_calls=tf.data.AUTOTUNE).batch(4096):
    examples += int(tf.size(count))
    total += int(tf.reduce_sum(tf.cast(count, tf.int64)))
    size = examples if by == "examples" else total
    if maximum is not None and size >= maximum:
      return float(maximum)
    if maximum is None and examples >= COUNT_LIMIT:
      raise ValueError(f"{task_name!r} has more than {COUNT_LIMIT:,} {split} records (it may "
                       "never end, as generated tasks do): give the mixture a maximum, or its "
                       "size in sizes=.")
  return float(examples if by == "examples" else total)


def mixture_rates(sizes: Mapping[str, float], temperature: float = 1.0,
                  maximum: Optional[float] = None) -> dict[str, float]:
  """Normalised rates from task sizes: min(n_i, maximum) ** (1 / temperature)."""
  if not temperature > 0:
    raise ValueError(f"temperature={temperature!r}: it must be > 0 (1 samples by size; larger "
                     "values flatten the mix, e.g. 3.33 as mT5).")
  if maximum is not None and not maximum > 0:
    raise ValueError(f"maximum={maximum!r}: it must be > 0 (or None for no cap).")
  empty = [name for name, n in sizes.items() if n <= 0]
  if empty:
    raise ValueError(f"Tasks {empty} have no data (size 0): nothing to mix in; drop them from "
                     "the mixture or fix their sources.")
  capped = {name: min(float(n), float(maximum or n)) ** (1.0 / temperature)
            for name, n in sizes.items()}
  total = sum(capped.values())
  return {name: value / total for name, value in capped.items()}


def size_rates(task_names: Sequence[str], by: str = "examples", temperature: float = 1.0,
               maximum: Optional[float] = None, split: str = "train",
               sizes: Optional[Mapping[str, float]] = None) -> dict[str, float]:
  """Rates of `task_names` by their number of `by` ("examples" or "tokens"), temperature-scaled
  and capped; `sizes` gives some or all sizes instead of counting them."""
  if by not in SIZE_KINDS:
    raise ValueError(f"by={by!r}: choose one of {SIZE_KINDS}.")
  sizes = dict(sizes or {})
  for name in task_names:  # the sizes not given are counted
    if name not in sizes:
      sizes[name] = task_size(name, split, by, maximum)
  rates = mixture_rates({name: sizes[name] for name in task_names}, temperature, maximum)
  logging.info("Mixture rates by %s (T=%s, maximum=%s): %s", by, temperature, maximum, rates)
  return rates


# ---------------------------------------------------------------------------- tagging

def tagged_sample_fn(datasets: Sequence[tf.data.Dataset], rates, seed: Optional[int]):
  """seqio's default sampling (`sample_from_datasets`, stopping when a task runs out), each
  example tagged with 1 + its task's index: the same examples in the same order."""
  def tag(index):
    return lambda ex: dict(ex, **{TASK_FEATURE: tf.fill([1], tf.constant(index + 1, tf.int32))})
  tagged = [ds.map(tf.autograph.experimental.do_not_convert(tag(i)),
                   num_parallel_calls=tf.data.AUTOTUNE) for i, ds in enumerate(datasets)]
  return tf.data.Dataset.sample_from_datasets(tagged, rates, seed=seed,
                                              stop_on_empty_dataset=True)


def mixture_task_names(provider, split: str) -> list[str]:
  """The tasks a mixture's tags number (those with `split`, in the mixture's order); [] for a
  task."""
  if not isinstance(provider, seqio.Mixture):
    return []
  return [task.name for task in provider.tasks if split in task.splits]


class MixCounter:
  """Examples of each task in the batches of one stream, by batch index: `add` takes the tags
  out of a batch, `take(upto)` returns (and forgets) the counts of the batches before `upto`."""

  KEPT = 100_000  # batches counted and not taken yet (a reader that never takes stays bounded)

  def __init__(self, task_names: Sequence[str]):
    self.task_names = list(task_names)
    self._pending: collections.deque = collections.deque(maxlen=self.KEPT)  # (index, counts)

  def add(self, index: int, batch: dict) -> dict:
    tags = batch.pop(TASK_FEATURE, None)
    if tags is not None and self.task_names:
      counts = np.bincount(tags.ravel(), minlength=len(self.task_names) + 1)[1:]
      self._pending.append((index, counts[:len(self.task_names)]))
    return batch

  def take(self, upto: int) -> dict[str, int]:
    """The examples of each task in the batches before `upto`, summed over all processes: a
    collective when there are several (every process takes at the same steps, as the train
    loop's hooks do)."""
    total = np.zeros(len(self.task_names), np.int64)
    while self._pending and self._pending[0][0] < upto:
      total += self._pending.popleft()[1]
    return dict(zip(self.task_names, (int(c) for c in across_processes(total))))


def across_processes(counts: np.ndarray) -> np.ndarray:
  """The sum of `counts` over all JAX processes (each reads its own rows of a global batch)."""
  if jax.process_count() == 1:
    return counts
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  # int32 on the wire (JAX without x64); a log interval counts far fewer examples than 2**31.
  return np.asarray(multihost_utils.process_allgather(counts.astype(np.int32))).reshape(
      jax.process_count(), -1).sum(axis=0)
