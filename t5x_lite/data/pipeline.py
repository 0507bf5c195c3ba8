"""`get_dataset`: a task or mixture name in, numpy batches of model features out.

    task/mixture (seqio) -> feature converter (packing, segment ids, positions) -> batch -> numpy

Bad input fails here, before any data is read, with a message that says what to change: unknown
names (with the closest registered ones), feature lengths that do not match the task, a split the
task does not have, or a converter that does not fit the task's features.
"""
from __future__ import annotations

import atexit
import collections
import difflib
import gc
import weakref
from typing import Any, Iterator, Mapping

import gin
import numpy as np
import seqio
import tensorflow as tf

from t5x_lite.data import feature_converters
from t5x_lite.data import mixing
from t5x_lite.data import sources
from t5x_lite.data import tasks as tasks_lib  # registers the tasks

AUTOTUNE = tf.data.AUTOTUNE


def registered_names() -> list[str]:
  return sorted(set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()))


def get_provider(name: str) -> seqio.Task | seqio.Mixture:
  """The registered task or mixture `name`; unknown names list the closest registered ones."""
  if name in seqio.MixtureRegistry.names():
    return seqio.MixtureRegistry.get(name)
  if name in seqio.TaskRegistry.names():
    return seqio.TaskRegistry.get(name)
  names = registered_names()
  close = difflib.get_close_matches(name, names, n=5, cutoff=0.4)
  hint = f"Did you mean {close}?" if close else f"Registered: {names}."
  raise ValueError(f"No task or mixture named {name!r}. {hint} (Tasks are registered by "
                   "importing t5x_lite.data.tasks; MIXTURE_OR_TASK_NAME sets it in gin.)")


def _check_lengths(name: str, provider, task_feature_lengths: Mapping[str, int]):
  required = sorted(k for k, f in provider.output_features.items() if f.required)
  given = sorted(task_feature_lengths)
  if given != required:
    raise ValueError(f"{name!r} has features {required}, so TASK_FEATURE_LENGTHS must have "
                     f"exactly those keys; got {given}.")
  for k, v in task_feature_lengths.items():
    if not isinstance(v, (int, np.integer)) or v < 1:
      raise ValueError(f"TASK_FEATURE_LENGTHS[{k!r}] must be a positive int, got {v!r}.")


def default_model_family(name: str) -> str:
  """The model family ("decoder", "encoder_decoder", "encoder") a registered name is meant for."""
  if name in tasks_lib.MODEL_FAMILIES:
    return tasks_lib.MODEL_FAMILIES[name][0]
  features = set(get_provider(name).output_features)
  if "mlm_weights" in features:
    return "encoder"
  return "encoder_decoder" if "inputs" in features else "decoder"


_LIVE_ITERATORS = weakref.WeakSet()


@atexit.register
def _close_live_iterators():
  # tf.data threads running a py_function (JSON Lines parsing, code_to_docstring) deadlock with
  # interpreter shutdown if their iterator is still alive then; stop them while Python still runs.
  for iterator in list(_LIVE_ITERATORS):
    iterator.close()


class BatchIterator:
  """Iterator of numpy batches (dicts of [batch, length] int32 arrays).

  `dataset` is the underlying tf.data.Dataset. `save`/`restore` write and read the iterator's
  position with tf.train.Checkpoint, so training can resume mid-epoch without replaying it;
  `write_state`/`read_state` do so for a train job, whose loop has read `produced - consumed`
  batches ahead of the last one it trained on: those are saved with the position and returned
  first after a restore. `skip` is how many batches the pipeline skipped before its first
  (part of its graph, so a restore rebuilds it with the same). A mixture's task tags are taken
  out of each batch and counted (`mix`). `close()` stops the background threads (done
  automatically at exit).
  """
  AHEAD_KEPT = 2  # the loop reads one batch ahead of the step it trains

  def __init__(self, dataset: tf.data.Dataset, description: str, skip: int = 0,
               mixture_tasks: tuple[str, ...] = ()):
    options = tf.data.Options()
    # The JSON Lines and code_to_docstring readers are py_functions, which tf.data takes for
    # external state and refuses to checkpoint by default; they are pure functions of their
    # input, so the iterator's own state is the whole position (WARN: saved without them).
    options.experimental_external_state_policy = tf.data.experimental.ExternalStatePolicy.WARN
    self.dataset = dataset.with_options(options)
    self._description = description
    self._iterator = iter(self.dataset)
    self._started = False
    self.skip = self.produced = skip  # produced: batches returned so far, in stream order
    self._recent: collections.deque = collections.deque(maxlen=self.AHEAD_KEPT)
    self._ahead: collections.deque = collections.deque()  # restored, not yet returned
    self.mix = mixing.MixCounter(mixture_tasks)
    _LIVE_ITERATORS.add(self)

  def close(self):
    self._iterator = None
    gc.collect()  # frees the TF iterator resource now, which cancels its threads

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    raw = self._ahead.popleft() if self._ahead else self._read()
    self._recent.append(raw)
    self.produced += 1
    return self.mix.add(self.produced - 1, dict(raw))

  def _read(self) -> dict[str, np.ndarray]:
    if self._iterator is None:
      raise StopIteration
    try:
      batch = next(self._iterator)
    except StopIteration:
      if not self._started:
        raise sources.CorpusError(self._no_batch()) from None
      raise
    except tf.errors.OpError:
      # A data fault that stops the run is raised inside tf.data, which wraps it in its own
      # error and stack; raise it as it was written.
      if sources.FAULTS.fatal is not None:
        raise sources.FAULTS.fatal from None
      raise
    self._started = True
    return {k: v.numpy() for k, v in batch.items()}

  def _no_batch(self) -> str:
    faults = sources.data_faults()
    if not faults:
      return (f"{self._description} produced no batch: the corpus is empty or smaller than one "
              "batch (try a smaller BATCH_SIZE, drop_remainder=False, or more text).")
    return (f"{self._description} produced no batch: nothing was left after skipping these "
            "records:\n  " + "\n  ".join(faults) + "\n" + ". ".join(sources.FAULTS.fixes) + ".")

  @property
  def element_spec(self):
    return self.dataset.element_spec

  def save(self, path: str) -> str:
    return tf.train.Checkpoint(iterator=self._iterator).write(path)

  def restore(self, path: str) -> None:
    tf.train.Checkpoint(iterator=self._iterator).read(path).assert_consumed()

  def write_state(self, prefix: str, consumed: int) -> None:
    """Writes the position after batch `consumed` - 1 to `prefix`.* (the TF iterator's state,
    and the batches read past it, `prefix`.ahead.npz)."""
    behind = self.produced - consumed  # read by the loop, not trained on yet
    if not 0 <= behind <= len(self._recent):
      raise ValueError(f"The train loop consumed {consumed} batches of {self.produced} read; "
                       f"at most {self.AHEAD_KEPT} may be read ahead.")
    ahead = list(self._recent)[len(self._recent) - behind:] + list(self._ahead)
    self.save(prefix)
    np.savez(prefix + ".ahead.npz", **{f"{i}/{k}": v for i, batch in enumerate(ahead)
                                       for k, v in batch.items()})

  def read_state(self, prefix: str, consumed: int) -> None:
    """Restores what `write_state(prefix, consumed)` wrote; the next batch is batch `consumed`."""
    self.restore(prefix)
    with np.load(prefix + ".ahead.npz") as saved:
      ahead: dict[int, dict] = {}
      for key in saved.files:
        index, name = key.split("/", 1)
        ahead.setdefault(int(index), {})[name] = saved[key]
    self._ahead = collections.deque(ahead[i] for i in sorted(ahead))
    self._recent.clear()
    self.produced = consumed
    self.mix = mixing.MixCounter(self.mix.task_names)  # batches read before the restore
    self._started = True


@gin.configurable
def get_tf_dataset(mixture_or_task_name: str, task_feature_lengths: Mapping[str, int],
                   split: str = "train", batch_size: int | None = 8, feature_converter: Any = None,
                   shuffle: bool = True, seed: int | None = None,
                   shard_info: seqio.ShardInfo | tuple[int, int] | None = None, pack: bool = True,
                   num_epochs: int | None = None, drop_remainder: bool = True,
                   use_cached: bool = False) -> tf.data.Dataset:
  """Same arguments as `get_dataset`; returns the batched tf.data.Dataset (None: unbatched)."""
  provider = get_provider(mixture_or_task_name)
  _check_lengths(mixture_or_task_name, provider, task_feature_lengths)
  if split not in provider.splits:
    raise ValueError(f"{mixture_or_task_name!r} has splits {list(provider.splits)}, not {split!r}.")
  converter = feature_converters.make_feature_converter(
      feature_converter or default_model_family(mixture_or_task_name), pack=pack)
  family = feature_converters.converter_family(converter)
  allowed = tasks_lib.MODEL_FAMILIES.get(mixture_or_task_name)
  if family and allowed and family not in allowed:
    raise ValueError(f"{mixture_or_task_name!r} is made for {' or '.join(allowed)} models, not "
                     f"{family} ({type(converter).__name__}); pick a task of the model's "
                     "objective (e.g. *_clm for decoders, *_mlm for encoders).")
  if isinstance(shard_info, tuple):
    shard_info = seqio.ShardInfo(index=shard_info[0], num_shards=shard_info[1])
  lengths = {k: int(v) for k, v in task_feature_lengths.items()}
  ds = provider.get_dataset(lengths, split=split, use_cached=use_cached, shuffle=shuffle,
                            seed=seed, shard_info=shard_info, num_epochs=num_epochs)
  try:
    ds = converter(ds, lengths)
  except ValueError as e:
    raise ValueError(f"{type(converter).__name__} does not fit {mixture_or_task_name!r} "
                     f"(model families it fits: "
                     f"{tasks_lib.MODEL_FAMILIES.get(mixture_or_task_name)}): {e}") from e
  if batch_size:
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
  return ds.prefetch(AUTOTUNE)


@gin.configurable
def get_dataset(mixture_or_task_name: str, task_feature_lengths: Mapping[str, int],
                split: str = "train", batch_size: int = 8, feature_converter: Any = None,
                shuffle: bool = True, seed: int | None = None,
                shard_info: seqio.ShardInfo | tuple[int, int] | None = None, pack: bool = True,
                num_epochs: int | None = None, drop_remainder: bool = True,
                use_cached: bool = False) -> BatchIterator:
  """Numpy batches of model features for a registered task or mixture.

  Args:
    mixture_or_task_name: e.g. "stdlib_span_corruption" (gin: MIXTURE_OR_TASK_NAME).
    task_feature_lengths: e.g. {"inputs": 512, "targets": 114} (gin: TASK_FEATURE_LENGTHS).
    split: "train" or "validation".
    batch_size: examples per batch (gin: BATCH_SIZE); per host when sharded.
    feature_converter: a seqio FeatureConverter instance (a model's `feature_converter()`) or
      class, or a family name "decoder" / "encoder_decoder" / "encoder". Default: the family
      the task is registered for.
    shuffle: shuffle files and examples (training); False gives a fixed order (evaluation).
    seed: makes shuffling and the random objectives reproducible.
    shard_info: (index, num_shards) or seqio.ShardInfo: this host's share of the data.
    pack: pack several examples per row (segment ids / positions), as for training.
    num_epochs: None repeats forever (training); 1 for a single pass (evaluation).
    drop_remainder: drop the last partial batch (keeps shapes static for jit).
    use_cached: read a seqio offline cache instead of preprocessing on the fly.
  """
  ds = get_tf_dataset(mixture_or_task_name, task_feature_lengths, split=split,
                      batch_size=batch_size, feature_converter=feature_converter,
                      shuffle=shuffle, seed=seed, shard_info=shard_info, pack=pack,
                      num_epochs=num_epochs, drop_remainder=drop_remainder,
                      use_cached=use_cached)
  return BatchIterator(ds, f"{mixture_or_task_name!r} split {split!r}", mixture_tasks=tuple(
      mixing.mixture_task_names(get_provider(mixture_or_task_name), split)))


def train_batches(name: str, lengths: Mapping[str, int], per_host_batch: int,
                  feature_converter: Any, seed: int, shard: tuple[int, int],
                  skip: int = 0) -> BatchIterator:
  """Numpy training batches of this process's shard, after skipping `skip` batches.

  The pipeline is seeded, so the batch order is a pure function of (seed, shard) and skipping
  the batches a checkpoint says were consumed puts a resumed run exactly where it stopped."""
  ds = get_tf_dataset(name, lengths, split="train", batch_size=per_host_batch,
                      feature_converter=feature_converter, shuffle=True, seed=seed,
                      shard_info=shard)
  return BatchIterator(ds.skip(skip), f"{name!r} split 'train'", skip,
                       tuple(mixing.mixture_task_names(get_provider(name), "train")))


def validation_batches(name: str, lengths: Mapping[str, int], per_host_batch: int,
                       feature_converter: Any, seed: int, shard: tuple[int, int],
                       count: int) -> list[dict[str, np.ndarray]]:
  """The first `count` validation batches (no shuffling): the same ones at every evaluation."""
  ds = get_tf_dataset(name, lengths, split="validation", batch_size=per_host_batch,
                      feature_converter=feature_converter, shuffle=False, seed=seed,
                      shard_info=shard)
  return list(BatchIterator(ds.repeat().take(count), f"{name!r} split 'validation'"))
