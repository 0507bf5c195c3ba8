"""A train job's input stream, its position in checkpoints, and how a resumed run gets back.

Three tiers, the fastest that applies:
  cache     an offline packed cache (data/cache.py, written by tools/cache_task.py, bound with
            train.data_cache): the position is the number of rows consumed, and the rows of any
            batch are found from it directly: O(1) at any step, and elastic (another process
            count or mesh reads the same global batches on, as the rows of a global batch do not
            depend on who reads them).
  iterator  the on-the-fly seqio pipeline: each process's tf.data iterator state (and the batch
            its loop had read ahead) is saved with every train-state checkpoint, in
            checkpoints/<step>/data_iterator/process_<i>-of-<n>.*, and restored on resume.
  replay    the stated fallback, O(steps): the pipeline is rebuilt and skips the consumed
            batches (0.7-2.4 ms each on one CPU core). Used, and logged with the reason, when a
            checkpoint holds no iterator state for this process (written before this existed,
            or by another number of processes) or an allowed change (train.allow_changes) made
            the saved state meaningless.

The data position (checkpoints/<step>/data) records what the position means: the task, feature
lengths, seed, vocabulary fingerprint, number of data shards, global batch size and tier (and the
cache's fingerprint). A resume under other values is refused, naming each difference and the
choices, unless train.allow_changes names it; the cache tier re-shards a change in the number of
data shards by itself.
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import jax

from t5x_lite.data import cache as cache_lib
from t5x_lite.data import pipeline

# Position entry -> the name train.allow_changes (and the run manifest) use for it.
FLAGS = {"task": "MIXTURE_OR_TASK_NAME", "feature_lengths": "TASK_FEATURE_LENGTHS",
         "seed": "train.seed", "vocabulary": "vocabulary", "data_shards": "data_shards",
         "batch_size": "BATCH_SIZE", "cache": "train.data_cache"}
ITERATOR_ITEM = "data_iterator"  # the checkpoint item holding the iterator states


def process_files() -> str:
  return f"process_{jax.process_index()}-of-{jax.process_count()}"


class TrainStream:
  """This process's training batches (`open`, `resume`) and what a checkpoint records of them
  (`position`, `stage_state`)."""

  def __init__(self, name: str, lengths: Mapping[str, int], per_host_batch: int,
               batch_size: int, feature_converter: Any, seed: int, shard: tuple[int, int],
               vocabulary_sha: str, cache_dir: Optional[str] = None,
               allow_changes: Sequence[str] = ()):
    self.name, self.lengths, self.seed, self.shard = name, dict(lengths), seed, shard
    self.per_host_batch, self.batch_size = per_host_batch, batch_size
    self.converter, self.vocabulary_sha = feature_converter, vocabulary_sha
    self.allow_changes = tuple(allow_changes)
    # Opened now: a cache of another task, lengths, model family or vocabulary is refused
    # before any work.
    self.cache = cache_lib.PackedCache.open(cache_dir, name, self.lengths, feature_converter,
                                            vocabulary_sha) if cache_dir else None
    self.tier = "cache" if self.cache else "iterator"
    self.current = None  # the iterator feeding the loop
    self._resumed_at = (0, 0)  # (batches consumed, rows consumed) where `current` started

  @property
  def mixture_tasks(self) -> list[str]:
    """The tasks whose realised mix the batches count ([] for a task)."""
    return list(self.current.mix.task_names) if self.current is not None else []

  def record(self) -> dict[str, Any]:
    return {"task": self.name, "feature_lengths": self.lengths, "seed": self.seed,
            "vocabulary": self.vocabulary_sha, "data_shards": self.shard[1],
            "batch_size": self.batch_size,
            "cache": self.cache.fingerprint if self.cache else None}

  def open(self, skip: int = 0, start_row: int = 0, consumed: int = 0):
    """Batches from `skip` batches (pipeline) or `start_row` rows (cache) in."""
    if self.cache:
      self.current = cache_lib.CachedBatches(self.cache, self.batch_size, self.shard, self.seed,
                                             start_row, first_index=consumed)
    else:
      self.current = pipeline.train_batches(self.name, self.lengths, self.per_host_batch,
                                            self.converter, self.seed, self.shard, skip=skip)
    self._resumed_at = (consumed, start_row)
    return self.current

  def position(self, consumed: int) -> dict[str, Any]:
    """The data position after `consumed` batches (what a checkpoint records)."""
    position = dict(self.record(), tier=self.tier)
    if self.cache:
      start_batches, start_rows = self._resumed_at
      position["rows_consumed"] = start_rows + (consumed - start_batches) * self.batch_size
    else:
      position["pipeline_skip"] = self.current.skip
    return position

  def stage_state(self, directory: str, consumed: int) -> Optional[str]:
    """Writes this process's iterator state into `directory` (iterator tier; None otherwise)."""
    if self.cache:
      return None
    os.makedirs(directory, exist_ok=True)
    self.current.write_state(os.path.join(directory, process_files()), consumed)
    return directory

  def resume(self, saved: Mapping[str, Any], consumed: int, step_dir: str,
             log: Callable[[str], None]):
    """The batches after the checkpoint in `step_dir` (position `saved`; `consumed` batches at
    this run's batch size), refusing a position of other data (see module docstring)."""
    changed = self._check(saved, step_dir, consumed)
    if self.cache:
      rows = saved.get("rows_consumed")
      if rows is None:  # written by the iterator tier: the rows its batches held
        rows = consumed * self.batch_size
      log(f"Data: packed cache {self.cache.directory}, from row {rows:,} (epoch "
          f"{rows // self.cache.rows}; {self.shard[1]} data shard(s)).")
      return self.open(start_row=rows, consumed=consumed)
    prefix = os.path.join(step_dir, ITERATOR_ITEM, process_files())
    reason = ("the data changed (train.allow_changes: " + ", ".join(FLAGS[k] for k in changed) +
              ")" if changed else None)
    if reason is None and not os.path.exists(prefix + ".index"):
      reason = (f"{step_dir} holds no input-iterator state for {process_files()} (written "
                "before iterator checkpoints, or by another number of processes)")
    if reason:
      log(f"Data: {reason}, so the pipeline replays the {consumed:,} consumed batches (the "
          "O(steps) fallback).")
      return self.open(skip=consumed, consumed=consumed)
    start = time.perf_counter()
    skip = int(saved.get("pipeline_skip", 0))
    batches = self.current if self.current is not None and self.current.skip == skip else (
        self.open(skip=skip))
    batches.read_state(prefix, consumed)
    self._resumed_at = (consumed, 0)
    log(f"Data: restored the input iterator from {prefix} in {time.perf_counter() - start:.2f}s "
        "(no replay).")
    return batches

  def _check(self, saved, step_dir: str, consumed: int) -> list:
    """The position entries that differ from this run's, refused unless allowed."""
    current = self.record()
    changed = [k for k in FLAGS if k in saved and saved[k] != current[k]]
    if self.cache and "data_shards" in changed:
      changed.remove("data_shards")  # the cache tier re-shards: rows do not depend on readers
    refused = [k for k in changed if FLAGS[k] not in self.allow_changes]
    if not refused:
      return changed
    differences = "; ".join(f"{FLAGS[k]} {saved[k]!r} -> {current[k]!r}" for k in refused)
    how = ("the cache's row cursor is kept" if self.cache else
           f"the saved iterator state no longer applies, so the {consumed:,} consumed batches "
           "are replayed through the new pipeline (O(steps))")
    raise ValueError(
        f"Checkpoint {step_dir} was written reading other data: {differences}. Choose one: "
        "(1) rerun with the recorded values to resume exactly where the run stopped; (2) add "
        f"{[FLAGS[k] for k in refused]} to train.allow_changes to go on with the new data from "
        f"the same point ({how}); (3) start a fresh MODEL_DIR.")
