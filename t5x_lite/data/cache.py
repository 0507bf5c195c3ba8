"""An offline, packed, index-addressable cache of a task's training rows, read in O(1) from any
position by any number of processes.

    python tools/cache_task.py --task stdlib_clm --lengths "{'targets': 512}" \
        --family decoder --output_dir /data/cache/stdlib_clm_512
    # then, in gin:  train.data_cache = '/data/cache/stdlib_clm_512'

Layout: meta.json (task, feature lengths, model family, vocabulary fingerprint, rows, shards,
features, a fingerprint of all of it) and, per shard, one fixed-shape .npy file per model
feature (`<feature>-<shard>.npy`, int32 [rows_in_shard, length]), memory-mapped on read.

Order: epoch e reads the rows in the order of a permutation keyed by (seed, e) and computed
per position (`permute`: no table, so O(1) at any cache size); global row g of the stream is row
perm_{g // rows}(g % rows). Global batch j is the global rows
[start + j * B, start + (j + 1) * B) (start: the rows consumed before a resume), and data shard i
of n reads its contiguous B / n of them, which is the block of the global batch its devices hold
(partitioning.data_shard_info). So the position is one number, the rows consumed; any batch is
found from it without reading the ones before; another batch size or process count goes on with
the same rows; and no row repeats within an epoch. The random objectives (span corruption,
MLM masking) were drawn once when the cache was written: every epoch sees the same noise.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from typing import Any, Callable, Mapping, Optional

import numpy as np

from t5x_lite.data import feature_converters
from t5x_lite.data import mixing

META = "meta.json"
FORMAT = "t5x_lite packed cache 1"


class PackedCache:
  """The rows of one cache directory (memory-mapped), `rows(indices)` -> features."""

  def __init__(self, directory: str):
    self.directory = os.path.abspath(directory)
    path = os.path.join(self.directory, META)
    if not os.path.exists(path):
      raise FileNotFoundError(f"train.data_cache={directory!r} is not a packed cache (no {META}); "
                              "write one with tools/cache_task.py.")
    with open(path) as f:
      self.meta = json.load(f)
    if self.meta.get("format") != FORMAT:
      raise ValueError(f"{path} is format {self.meta.get('format')!r}, not {FORMAT!r}; rewrite "
                       "the cache with this version's tools/cache_task.py.")
    self.rows, self.rows_per_shard = int(self.meta["rows"]), int(self.meta["rows_per_shard"])
    self.fingerprint = self.meta["fingerprint"]
    self._arrays = {name: [np.load(os.path.join(self.directory, f"{name}-{s:05d}.npy"),
                                   mmap_mode="r") for s in range(self.meta["shards"])]
                    for name in self.meta["features"]}

  @classmethod
  def open(cls, directory: str, task: str, lengths: Mapping[str, int], converter: Any,
           vocabulary_sha: str) -> "PackedCache":
    """The cache at `directory`, refused (before any work) unless it holds rows of `task` at
    `lengths` for `converter`'s model family, tokenized with the run's vocabulary."""
    cache = cls(directory)
    family = feature_converters.converter_family(
        feature_converters.make_feature_converter(converter))
    wanted = {"task": task, "feature_lengths": dict(lengths), "family": family,
              "vocabulary": vocabulary_sha}
    differ = [f"{k} {cache.meta.get(k)!r} (run: {v!r})" for k, v in wanted.items()
              if cache.meta.get(k) != v]
    if differ:
      raise ValueError(f"Packed cache {cache.directory} does not fit this run: " +
                       "; ".join(differ) + ". Write a cache for the run's task, lengths, model "
                       "family and vocabulary with tools/cache_task.py, or unset train.data_cache.")
    return cache

  @property
  def mixture_tasks(self) -> tuple[str, ...]:
    return tuple(self.meta.get("mixture_tasks", ()))

  def rows_at(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    """The rows `indices` (any order), each feature [len(indices), length]."""
    shard, offset = np.divmod(indices, self.rows_per_shard)
    out = {}
    for name, shards in self._arrays.items():
      rows = np.empty((len(indices),) + shards[0].shape[1:], shards[0].dtype)
      for s in np.unique(shard):
        where = shard == s
        rows[where] = shards[s][offset[where]]
      out[name] = rows
    return out


_ROUNDS = 6


def _mix(x: np.ndarray, key: np.uint64) -> np.ndarray:
  """splitmix64's finaliser of x ^ key (uint64, wrapping)."""
  x = x ^ key
  x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def permute(positions: np.ndarray, n: int, seed: int, epoch: int) -> np.ndarray:
  """Row perm(position) of a pseudo-random permutation of range(n) keyed by (seed, epoch),
  computed per position (no table: O(1) whatever n): a Feistel network over the next power of 4
  at or above n, cycle-walking the values that fall outside range(n) (as grain's index_shuffle)."""
  half = max(1, (max(n - 1, 1).bit_length() + 1) // 2)
  mask = np.uint64((1 << half) - 1)
  keys = np.random.default_rng([seed, epoch]).integers(0, 2 ** 63, _ROUNDS, dtype=np.uint64)

  def network(x):
    left, right = x >> np.uint64(half), x & mask
    for key in keys:
      left, right = right, left ^ (_mix(right, key) & mask)
    return (left << np.uint64(half)) | right

  out = network(np.asarray(positions, np.uint64))
  outside = out >= n
  while outside.any():  # a permutation of [0, 4**half) leads back into range(n)
    out[outside] = network(out[outside])
    outside = out >= n
  return out.astype(np.int64)


class CachedBatches:
  """This data shard's batches of the global stream from global row `start_row` on."""

  def __init__(self, cache: PackedCache, global_batch: int, shard: tuple[int, int], seed: int,
               start_row: int = 0, first_index: int = 0):
    index, num_shards = shard
    if global_batch % num_shards:
      raise ValueError(f"BATCH_SIZE={global_batch} is not divisible by the {num_shards} data "
                       "shards.")
    self.cache, self.global_batch, self.seed = cache, global_batch, seed
    self.local = global_batch // num_shards
    self.offset = index * self.local
    self.next_row = start_row  # global row where the next global batch starts
    self.skip = 0
    self.mix = mixing.MixCounter(cache.mixture_tasks)
    self.produced = first_index  # batch index in the run's stream (what the mix counter keys)

  def __iter__(self):
    return self

  def row_indices(self, first: int, count: int) -> np.ndarray:
    """Cache rows of global stream rows [first, first + count)."""
    stream = np.arange(first, first + count, dtype=np.int64)
    epochs, positions = np.divmod(stream, self.cache.rows)
    out = np.empty(count, np.int64)
    for epoch in np.unique(epochs):
      where = epochs == epoch
      out[where] = permute(positions[where], self.cache.rows, self.seed, int(epoch))
    return out

  def __next__(self) -> dict[str, np.ndarray]:
    batch = self.cache.rows_at(self.row_indices(self.next_row + self.offset, self.local))
    self.next_row += self.global_batch
    self.produced += 1
    return self.mix.add(self.produced - 1, batch)

  def close(self):
    pass


def _rows(batch: Mapping[str, np.ndarray]) -> int:
  return len(next(iter(batch.values())))


class _ShardWriter:
  """Writes rows, as they come, into shards of `rows_per_shard` rows (the last may be short)."""

  def __init__(self, directory: str, rows_per_shard: int):
    self.directory, self.rows_per_shard = directory, rows_per_shard
    self.buffer, self.buffered, self.shards = [], 0, 0

  def add(self, batch: Mapping[str, np.ndarray]) -> None:
    self.buffer.append(batch)
    self.buffered += _rows(batch)
    while self.buffered >= self.rows_per_shard:
      self._write(self.rows_per_shard)

  def finish(self) -> None:
    if self.buffered:
      self._write(self.buffered)

  def _write(self, count: int) -> None:
    whole = {k: np.concatenate([b[k] for b in self.buffer]) for k in self.buffer[0]}
    for name, rows in whole.items():
      np.save(os.path.join(self.directory, f"{name}-{self.shards:05d}.npy"),
              rows[:count].astype(np.int32))
    rest = {k: v[count:] for k, v in whole.items()}
    self.buffer = [rest] if _rows(rest) else []
    self.buffered -= count
    self.shards += 1


def write_cache(output_dir: str, task: str, lengths: Mapping[str, int], family: str,
                seed: int = 0, max_rows: Optional[int] = None, rows_per_shard: int = 65536,
                vocabulary_sha: str = "", log: Callable[[str], None] = print) -> dict:
  """Writes one pass (num_epochs=1, shuffled with `seed`) of `task`'s packed training rows for
  `family` models; with `max_rows`, at most that many (required for a task that never ends).
  Written into `output_dir`.tmp and renamed once complete. Returns the meta record."""
  from t5x_lite.data import pipeline, sources  # pylint: disable=g-import-not-at-top
  if rows_per_shard < 1 or (max_rows is not None and max_rows < 1):
    raise ValueError(f"rows_per_shard={rows_per_shard} and max_rows={max_rows} must be >= 1.")
  output_dir = os.path.abspath(output_dir)
  tmp = output_dir + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  stream = pipeline.get_dataset(task, lengths, split="train", batch_size=1024,
                                feature_converter=family, shuffle=True, seed=seed, num_epochs=1,
                                drop_remainder=False)
  mixture_tasks = stream.mix.task_names
  stream.mix = mixing.MixCounter(())  # the task tags are kept as a feature of the rows
  writer, rows, start = _ShardWriter(tmp, rows_per_shard), 0, time.perf_counter()
  for batch in stream:
    if max_rows is not None:
      batch = {k: v[:max_rows - rows] for k, v in batch.items()}
    writer.add(batch)
    rows += _rows(batch)
    if max_rows is not None and rows >= max_rows:
      break
  stream.close()
  writer.finish()
  if not rows:
    raise sources.CorpusError(f"{task!r} produced no rows to cache.")
  features = {name: list(np.load(os.path.join(tmp, f"{name}-00000.npy"), mmap_mode="r").shape[1:])
              for name in sorted({f.rsplit("-", 1)[0] for f in os.listdir(tmp)})}
  meta = {"format": FORMAT, "task": task, "feature_lengths": dict(lengths), "family": family,
          "vocabulary": vocabulary_sha, "writer_seed": seed, "rows": rows,
          "rows_per_shard": rows_per_shard, "shards": writer.shards, "features": features,
          "mixture_tasks": list(mixture_tasks), "data_faults": sources.data_faults()}
  meta["fingerprint"] = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
  with open(os.path.join(tmp, META), "w") as f:
    json.dump(meta, f, indent=1)
  shutil.rmtree(output_dir, ignore_errors=True)
  os.replace(tmp, output_dir)
  log(f"Wrote {rows:,} packed rows of {task!r} in {writer.shards} shard(s) to {output_dir} "
      f"({time.perf_counter() - start:.1f}s).")
  return meta
