"""JSON Lines files whose rows are a few strings (instruction pairs, preference triples) as a
seqio source; every skipped row is counted with the pipeline's other data faults.

A source is told what to read by a config with `pattern` (a glob where "{split}" becomes
train / validation), `keys` (the JSON fields to read, in the order of the source's features),
`max_bad_fraction` and `fail_at_first` (what `sources.FAULTS.add` asks of a read config), or by
a callable returning one (read when the data is, so gin bindings made later count). A line that
is not a JSON object, or a row without a string at one of the keys, is skipped and counted; an
optional `check` skips rows for a reason of its own (a preference pair with nothing to prefer).
"""
from __future__ import annotations

import glob
import json
import os
from typing import Any, Callable, Optional, Sequence

import seqio
import tensorflow as tf

from t5x_lite.data import sources

AUTOTUNE = tf.data.AUTOTUNE
plain = tf.autograph.experimental.do_not_convert
# (row strings) -> None to keep the row, or (fault kind, detail) to skip and count it.
RowCheck = Callable[[tuple[str, ...]], Optional[tuple[str, str]]]


def register_fault_kind(kind: str, description: str, fix: Callable[[Any], str]) -> None:
  """A kind of skipped row for `sources.FAULTS`: how the summary names it ("row(s) without
  ...") and the fix its messages suggest, given the read config."""
  sources.KIND_NAMES.setdefault(kind, description)
  sources._FIX.setdefault(kind, fix)  # pylint: disable=protected-access  # the table FAULTS.add reads


class JsonlRowsSource(seqio.DataSource):
  """{feature: string} examples from the JSON Lines files of `config` (see the module doc).

  `features` name the strings read at `config.keys`; `missing_kind` is the fault kind of a
  row without one of them; `setting` is the gin name of the config for error messages (e.g.
  "instruction_files")."""

  def __init__(self, config, features: Sequence[str], missing_kind: str, setting: str,
               check: Optional[RowCheck] = None):
    self._config, self.features = config, tuple(features)
    self.missing_kind, self.setting, self.check = missing_kind, setting, check
    super().__init__(splits=sources.SPLITS)

  @property
  def config(self):
    return self._config() if callable(self._config) else self._config

  @property
  def supports_arbitrary_sharding(self) -> bool:
    return False

  def list_shards(self, split: str) -> Sequence[str]:
    pattern = self.config.pattern
    if not pattern:
      raise sources.CorpusError(
          f"The task has no files: set --gin.{self.setting}.pattern=\"'/data/{{split}}.jsonl'\" "
          f"(JSON Lines with {list(self.config.keys)}).")
    files = sorted(glob.glob(os.path.expanduser(pattern.replace("{split}", split))))
    if not files:
      raise sources.CorpusError(f"No files match {self.setting}.pattern={pattern!r} for split "
                                f"{split!r}; check it ('{{split}}' becomes train / validation).")
    return files

  def parse_row(self, raw: bytes, path: str, line: int, config) -> tuple[str, ...] | None:
    """The strings of one JSONL line, or None when it is skipped (and counted)."""
    if not raw.strip():
      return None
    try:
      row = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
      sources.FAULTS.add("malformed", path, line, f"not a UTF-8 JSON line ({e})", config)
      return None
    if not isinstance(row, dict):
      sources.FAULTS.add("malformed", path, line, f"a JSON {type(row).__name__}, not an object",
                         config)
      return None
    missing = [k for k in config.keys if not isinstance(row.get(k), str)]
    if missing:
      sources.FAULTS.add(self.missing_kind, path, line,
                         f"no string at {missing} (keys found: {sorted(row)[:10]})", config)
      return None
    strings = tuple(row[k] for k in config.keys)
    fault = self.check(strings) if self.check else None
    if fault:
      kind, detail = fault
      sources.FAULTS.add(kind, path, line, detail, config)
      return None
    return strings

  def _parse_lines(self, paths, numbers, lines, config):
    """[n] raw lines -> [n, fields] strings and [n] bools (kept), in Python (JSON has no TF op)."""
    width = len(self.features)

    def parse(paths, numbers, lines):
      rows, kept = [], []
      for raw, path, n in zip(lines.numpy(), paths.numpy(), numbers.numpy()):
        path = path.decode()
        sources.FAULTS.count_read(path, int(n))
        row = self.parse_row(raw, path, int(n), config)
        kept.append(row is not None)
        rows.append([s.encode("utf-8") for s in row] if row else [b""] * width)
      return (tf.constant(rows, tf.string, shape=[len(rows), width]),
              tf.constant(kept, tf.bool, shape=[len(kept)]))
    rows, kept = tf.py_function(parse, [paths, numbers, lines], [tf.string, tf.bool])
    rows.set_shape([None, width])
    kept.set_shape([None])
    return rows, kept

  def get_dataset(self, split: str = "train", shuffle: bool = True, seed: int | None = None,
                  shard_info: seqio.ShardInfo | None = None, *, sequence_length=None,
                  use_cached=False, num_epochs=1) -> tf.data.Dataset:
    del sequence_length, use_cached, num_epochs
    config, files = self.config, list(self.list_shards(split))
    if shard_info and shard_info.num_shards > 1:
      files = files[shard_info.index::shard_info.num_shards]
    ds = sources.shard_files(files, None, shuffle, seed)
    ds = ds.interleave(lambda p: tf.data.TextLineDataset(p).enumerate(start=1).map(
        plain(lambda i, line: (p, i, line))), cycle_length=min(len(files), 8),
                       num_parallel_calls=AUTOTUNE, deterministic=True)
    ds = ds.batch(256).map(plain(lambda p, n, b: self._parse_lines(p, n, b, config)),
                           num_parallel_calls=AUTOTUNE)
    ds = ds.map(plain(lambda rows, kept: tf.boolean_mask(rows, kept))).unbatch()
    ds = ds.map(plain(lambda r: {name: r[i] for i, name in enumerate(self.features)}))
    return ds.shuffle(1024, seed=seed) if shuffle else ds
