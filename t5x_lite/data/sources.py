"""Raw text sources: local files (text lines, whole files, JSON Lines), the embedded Python
standard-library corpus, and TFDS datasets prepared in a local `data_dir`.

Every source yields `{"text": tf.string}` examples with splits "train" and "validation".

The configuration of a source may be a callable that is evaluated only when a dataset is built.
This lets tasks be registered at import time while their file pattern comes from gin later
(`local_corpus.pattern = %LOCAL_CORPUS_PATTERN`).

Files are listed and checked for valid UTF-8 once in Python (with a small on-disk cache keyed by
size and mtime), so a bad file is reported by name instead of crashing deep inside tf.data. What
happens to its bad bytes is the `non_utf8` flag's choice, line by line in line-based formats.

Data faults are never silent: records without the text key, malformed JSON lines and lines
that are not UTF-8 are skipped and counted per file (`data_faults()`), the first of each kind
in a file is logged with its file:line, and a file where they are more than `max_bad_fraction`
of the records stops the run naming the file (a wrong `text_key`, or not JSON Lines at all).
The counting is faults.py's.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import glob
import hashlib
import json
import logging
import os
import re
import sysconfig
import threading
import time
from typing import Callable, Sequence

import gin
import seqio
import tensorflow as tf

# The fault counting lives in faults.py; its names are re-exported here, where readers and
# tests have always found them (the same objects: KIND_NAMES and _FIX are shared tables).
# pylint: disable-next=unused-import
from t5x_lite.data.faults import (CorpusError, DataFaults, FAULTS, KIND_NAMES, MIN_BAD_RECORDS,
                                  _FIX, _ReadConfig, data_faults)

SPLITS = ("train", "validation")
AUTOTUNE = tf.data.AUTOTUNE
# Our dataset functions use no Python control flow on tensors, so AutoGraph conversion would only
# cost tracing time (tens of ms per function, seconds per pipeline).
plain = tf.autograph.experimental.do_not_convert
FORMATS = ("auto", "lines", "files", "jsonl")
NON_UTF8 = ("skip", "replace", "fail")


@dataclasses.dataclass(frozen=True)
class CorpusConfig:
  """Where a text corpus lives and how to read it.

  Attributes:
    patterns: glob patterns (`**` allowed; a directory means every file under it). A pattern
      containing "{split}" is formatted with the split name ("train"/"validation"), e.g.
      "/data/out/{split}-*.jsonl" as written by tools/prepare_corpus.py; otherwise the
      validation split is carved out deterministically by hashing (see `split_by`).
    format: "lines" (one document per line), "files" (one document per file), "jsonl" (one JSON
      object per line, text in `text_key`), or "auto" (.jsonl/.json -> jsonl, else lines).
    text_key: the JSON field holding the text.
    non_utf8: what to do with bytes that are not UTF-8: "skip" (line-based formats: drop the
      lines holding them; "files": drop the file; counted either way), "replace" (decode them
      as U+FFFD) or "fail" (raise naming the file).
    bad_records: JSON Lines records that do not parse, or hold no string at `text_key`: "skip"
      (count them and go on) or "fail" (raise at the first, naming file and line).
    max_bad_fraction: a file whose skipped records (any fault) pass this share of the records
      read from it (after at least `MIN_BAD_RECORDS` of them) stops the run, naming the file.
    split_by: "file" or "document": the unit hashed to assign the validation split.
    validation_percent: share of files/documents (0-100) held out for validation.
    exclude: path substrings to ignore (e.g. "site-packages").
    root: paths are hashed relative to this, so the split is the same on every machine.
    max_files: keep only the first N files of each split (after sorting) - for quick runs.
  """
  patterns: tuple[str, ...]
  format: str = "auto"
  text_key: str = "text"
  non_utf8: str = "skip"
  bad_records: str = "skip"
  max_bad_fraction: float = 0.1
  split_by: str = "document"
  validation_percent: float = 2.0
  exclude: tuple[str, ...] = ()
  root: str | None = None
  max_files: int | None = None

  def __post_init__(self):
    if isinstance(self.patterns, str):
      object.__setattr__(self, "patterns", (self.patterns,))
    if self.format not in FORMATS:
      raise ValueError(f"format must be one of {FORMATS}, got {self.format!r}")
    if self.non_utf8 not in NON_UTF8:
      raise ValueError(f"non_utf8 must be one of {NON_UTF8}, got {self.non_utf8!r}")
    if self.bad_records not in ("skip", "fail"):
      raise ValueError(f"bad_records must be 'skip' or 'fail', got {self.bad_records!r}")
    if not 0 <= self.max_bad_fraction <= 1:
      raise ValueError(f"max_bad_fraction must be in [0, 1], got {self.max_bad_fraction!r}")
    if self.split_by not in ("file", "document"):
      raise ValueError(f"split_by must be 'file' or 'document', got {self.split_by!r}")

  @property
  def per_split_patterns(self) -> bool:
    return any("{split}" in p for p in self.patterns)


  def resolved_format(self, path: str) -> str:
    if self.format != "auto":
      return self.format
    return "jsonl" if path.endswith((".jsonl", ".json")) else "lines"


@dataclasses.dataclass
class Listing:
  """Result of listing a corpus: the readable files and what was dropped. With `by_line`,
  files holding some non-UTF-8 bytes are readable (their bad lines are handled when read) and
  listed in `non_utf8` as well as `files`; otherwise they are in `skipped_non_utf8`."""
  files: list[str]
  skipped_non_utf8: list[str]
  empty: list[str]
  non_utf8: list[str] = dataclasses.field(default_factory=list)


# ------------------------------------------------------------------------------ file listing

def _glob(pattern: str, exclude: Sequence[str] = ()) -> list[str]:
  """Files matching `pattern`, not under a path containing any `exclude` string."""
  pattern = os.path.expanduser(pattern)
  if os.path.isdir(pattern):
    pattern = os.path.join(pattern, "**", "*")
  excluded = lambda path: any(x in path for x in exclude)
  root, _, name = pattern.partition(os.sep + "**" + os.sep)
  if name and os.sep not in name and not re.search(r"[*?[]", root):
    # "<dir>/**/<name pattern>": walk the tree ourselves so that excluded directories (e.g. the
    # stdlib's site-packages, far bigger than the stdlib) are never entered.
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
      dirnames[:] = [d for d in dirnames
                     if not d.startswith(".") and not excluded(os.path.join(dirpath, d))]
      found += [os.path.join(dirpath, f) for f in fnmatch.filter(filenames, name)
                if not f.startswith(".")]
  else:
    found = glob.glob(pattern, recursive=True)
  return [p for p in found if os.path.isfile(p) and not excluded(p)]


def _cache_path() -> str:
  root = os.environ.get("T5X_LITE_CACHE_DIR") or os.path.join(
      os.path.expanduser("~"), ".cache", "t5x_lite")
  return os.path.join(root, "utf8_index.json")


_utf8_lock = threading.Lock()
_utf8_memo: dict[str, tuple[int, int, bool]] = {}


def _is_utf8(path: str) -> bool:
  # Decode in chunks so a multi-GB file does not need multi-GB of memory; an incremental decoder
  # handles code points split across chunk borders.
  import codecs  # pylint: disable=g-import-not-at-top
  decoder = codecs.getincrementaldecoder("utf-8")()
  try:
    with open(path, "rb") as f:
      while chunk := f.read(1 << 24):
        decoder.decode(chunk)
    decoder.decode(b"", final=True)
    return True
  except UnicodeDecodeError:
    return False


def check_utf8(paths: Sequence[str]) -> dict[str, bool]:
  """Maps each path to whether it is valid UTF-8; cached on disk by (size, mtime)."""
  with _utf8_lock:
    if not _utf8_memo:
      try:
        with open(_cache_path()) as f:
          _utf8_memo.update({k: tuple(v) for k, v in json.load(f).items()})
      except (OSError, ValueError):
        pass  # no cache yet, or a corrupt one: it is only a cache
    result, changed = {}, False
    for p in paths:
      st = os.stat(p)
      key = os.path.abspath(p)
      hit = _utf8_memo.get(key)
      if hit is None or hit[0] != st.st_size or hit[1] != st.st_mtime_ns:
        hit = (st.st_size, st.st_mtime_ns, _is_utf8(p))
        _utf8_memo[key] = hit
        changed = True
      result[p] = hit[2]
    if changed:
      try:  # atomic replace: concurrent jobs may share the cache file
        path = _cache_path()
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
          json.dump(_utf8_memo, f)
        os.replace(tmp, path)
      except OSError as e:
        logging.warning("could not write the UTF-8 cache %s: %s", _cache_path(), e)
    return result


_warned: set[str] = set()  # seqio lists a corpus twice per split (its shards, then its dataset)


def _warn_once(message: str, *args) -> None:
  if (text := message % args) not in _warned:
    _warned.add(text)
    logging.warning(text)


def _hash_percent(text: str) -> float:
  return int(hashlib.md5(text.encode()).hexdigest()[:8], 16) % 10000 / 100.0


def list_corpus(config: CorpusConfig, split: str, by_line: bool = False) -> Listing:
  """Lists the readable files of `split`, raising CorpusError with a fix when there are none.

  `by_line`: the reader handles non-UTF-8 bytes line by line (TextFileSource does, for the
  line-based formats), so files holding some stay readable unless non_utf8='fail'."""
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  patterns = [p.format(split=split) for p in config.patterns]
  files = set()
  for pattern in patterns:
    matched = _glob(pattern, config.exclude)
    if not matched:
      raise CorpusError(
          f"File pattern {pattern!r} matches no files. Check the path (globs like "
          "'/data/*.txt' and '**' are allowed) or the LOCAL_CORPUS_PATTERN gin macro.")
    files.update(matched)
  files = sorted(files)
  if not config.per_split_patterns and config.split_by == "file":
    root = config.root or (os.path.commonpath(files) if len(files) > 1
                           else os.path.dirname(files[0]))
    in_validation = lambda f: _hash_percent(os.path.relpath(f, root)) < config.validation_percent
    files = [f for f in files if in_validation(f) == (split == "validation")]
  empty = [f for f in files if os.path.getsize(f) == 0]
  files = [f for f in files if os.path.getsize(f) > 0]
  ok = check_utf8(files)
  bad = [f for f in files if not ok[f]]
  if bad and config.non_utf8 == "fail":
    raise CorpusError(
        f"{len(bad)} file(s) are not valid UTF-8, e.g. {bad[0]!r}. Convert them "
        "(iconv -f <encoding> -t utf-8) or set non_utf8='skip' to skip and count them.")
  if bad and by_line:
    _warn_once("%d %s file(s) in %s hold bytes that are not UTF-8, e.g. %s: their lines "
               "holding them are %s.", len(bad), split, patterns, bad[:3],
               "decoded with U+FFFD" if config.non_utf8 == "replace" else "skipped and counted")
  elif bad:
    _warn_once("Skipped %d non-UTF-8 %s file(s) in %s, e.g. %s", len(bad), split, patterns,
               bad[:3])
  files = [f for f in files if ok[f] or by_line]
  if config.max_files:
    files = files[:config.max_files]
  if not files:
    raise CorpusError(
        f"Corpus {patterns} has no readable {split!r} files ({len(empty)} empty, "
        f"{len(bad)} not UTF-8). Add text, point the pattern elsewhere"
        + (", or use split_by='document' / a '{split}' pattern so both splits get data."
           if config.split_by == "file" else "."))
  return Listing(files=files, skipped_non_utf8=[] if by_line else bad, empty=empty,
                 non_utf8=bad if by_line else [])


# ------------------------------------------------------------------------------ tf.data readers

def _decode(raw: bytes, path: str, line: int, config: _ReadConfig) -> str | None:
  """A record's text, or None when its bytes are not UTF-8 and non_utf8='skip' (counted)."""
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    if config.non_utf8 == "replace":
      return raw.decode("utf-8", errors="replace")
    FAULTS.add("non_utf8", path, line, f"byte {e.start} is not UTF-8 ({e.reason})", config)
    return None


def _json_text(raw: bytes, path: str, line: int, config: _ReadConfig) -> str:
  """The text of one JSON Lines record ("" if skipped: counted as a fault)."""
  if not raw.strip():
    return ""
  text = _decode(raw, path, line, config)
  if text is None:
    return ""
  try:
    record = json.loads(text)
  except ValueError as e:
    FAULTS.add("malformed", path, line, f"not JSON ({e})", config)
    return ""
  if not isinstance(record, dict):
    FAULTS.add("malformed", path, line, f"a JSON {type(record).__name__}, not an object", config)
    return ""
  value = record.get(config.text_key)
  if not isinstance(value, str):
    found = (f"its {config.text_key!r} is a {type(value).__name__}" if config.text_key in record
             else f"keys found: {sorted(record)[:10]}")
    FAULTS.add("missing_key", path, line, f"no text at {config.text_key!r} ({found})", config)
    return ""
  return value


def _parse_batch(paths: tf.Tensor, numbers: tf.Tensor, lines: tf.Tensor, fmt: str,
                 config: _ReadConfig) -> tf.Tensor:
  """[n] raw lines (with their file and line number) -> [n] texts, "" for skipped ones. In
  Python (JSON and per-line decoding have no TF op), one batch per call."""
  read = _json_text if fmt == "jsonl" else (lambda raw, p, n, c: _decode(raw, p, n, c) or "")

  def parse(paths, numbers, lines):
    out = []
    for raw, path, n in zip(lines.numpy(), paths.numpy(), numbers.numpy()):
      path = path.decode()
      FAULTS.count_read(path, int(n))  # first: a share is of the records read so far
      out.append(read(raw, path, int(n), config).encode("utf-8"))
    return tf.constant(out, dtype=tf.string) if out else tf.zeros([0], tf.string)

  texts = tf.py_function(parse, [paths, numbers, lines], tf.string)
  texts.set_shape([None])
  return texts


def _numbered_lines(path: tf.Tensor) -> tf.data.Dataset:
  """(path, line number from 1, line) of one file."""
  return tf.data.TextLineDataset(path).enumerate(start=1).map(
      plain(lambda i, line: (path, i, line)))


def shard_files(files: Sequence[str], shard_info: seqio.ShardInfo | None, shuffle: bool,
                seed: int | None) -> tf.data.Dataset:
  """This process's share of `files` (every num_shards-th, from its index) as a dataset of
  paths, reshuffled every epoch when `shuffle`."""
  files = list(files)
  if shard_info and shard_info.num_shards > 1:
    files = files[shard_info.index::shard_info.num_shards]
  ds = tf.data.Dataset.from_tensor_slices(files)
  return ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True) if shuffle else ds


def read_text_files(files: Sequence[str], fmt: str, text_key: str = "text",
                    shuffle: bool = True, seed: int | None = None,
                    non_utf8_files: Sequence[str] = (), non_utf8: str = "skip",
                    bad_records: str = "skip", max_bad_fraction: float = 1.0) -> tf.data.Dataset:
  """Documents from `files` as a dataset of scalar tf.string (empty documents dropped).

  JSON Lines records and the lines of `non_utf8_files` are read in Python, so that every
  skipped record is counted (see DataFaults); other text is read by TF ops alone."""
  config = _ReadConfig(text_key, non_utf8, bad_records == "fail", max_bad_fraction)
  ds = tf.data.Dataset.from_tensor_slices(list(files))
  if shuffle:
    ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
  if fmt == "files":
    ds = ds.map(lambda path: (path, tf.io.read_file(path)), num_parallel_calls=AUTOTUNE)
    if non_utf8_files:  # whole documents: one bad byte skips (or, with "replace", mends) it
      ds = ds.map(plain(lambda path, text: (path, _parse_batch(
          path[None], tf.ones([1], tf.int64), text[None], "lines", config)[0])),
                  num_parallel_calls=AUTOTUNE)
    ds = ds.map(plain(lambda path, text: text))
  else:
    # Read several files at once so one huge file does not serialise the pipeline.
    ds = ds.interleave(_numbered_lines, cycle_length=min(len(files), 8),
                       num_parallel_calls=AUTOTUNE, deterministic=True)
    if fmt == "jsonl" or non_utf8_files:
      ds = ds.batch(256).map(plain(lambda p, n, b: _parse_batch(p, n, b, fmt, config)),
                             num_parallel_calls=AUTOTUNE).unbatch()
    else:
      ds = ds.map(plain(lambda p, n, line: line))
  return ds.filter(plain(lambda t: tf.strings.length(tf.strings.strip(t)) > 0))


class TextFileSource(seqio.DataSource):
  """seqio DataSource over local files, configured now or lazily (gin) by `config`."""
  LISTING_KEPT_S = 10.0

  def __init__(self, config: CorpusConfig | Callable[[], CorpusConfig]):
    self._config = config
    # seqio lists the shards (list_shards) just before it builds the dataset (get_dataset): the
    # listing made for the first is kept for the second only, so one build walks and stats the
    # corpus once (the stdlib: ~0.3 s of a ~2 s pipeline build, which a resume pays too). Kept
    # LISTING_KEPT_S at most, so a listing is never older than that.
    self._listed: tuple[tuple[CorpusConfig, str, float], Listing] | None = None
    super().__init__(splits=SPLITS)

  @property
  def config(self) -> CorpusConfig:
    return self._config() if callable(self._config) else self._config

  @property
  def supports_arbitrary_sharding(self) -> bool:
    return False

  def list_shards(self, split: str) -> Sequence[str]:
    config = self.config
    listing = self._listing(config, split)
    self._listed = ((config, split, time.monotonic()), listing)
    return listing.files

  def _listing_for_build(self, config: CorpusConfig, split: str) -> Listing:
    listed, self._listed = self._listed, None
    if (listed is not None and listed[0][:2] == (config, split)
        and time.monotonic() - listed[0][2] < self.LISTING_KEPT_S):
      return listed[1]
    return self._listing(config, split)

  @staticmethod
  def _listing(config: CorpusConfig, split: str) -> Listing:
    # Bad bytes are handled line by line, except that a whole-file document is skipped whole.
    return list_corpus(config, split,
                       by_line=config.format != "files" or config.non_utf8 == "replace")

  def get_dataset(self, split: str = "train", shuffle: bool = True, seed: int | None = None,
                  shard_info: seqio.ShardInfo | None = None, *, sequence_length=None,
                  use_cached=False, num_epochs=1) -> tf.data.Dataset:
    del sequence_length, use_cached, num_epochs  # part of the seqio interface, unused here
    config = self.config
    listing = self._listing_for_build(config, split)
    files = listing.files
    if shard_info and shard_info.num_shards > 1:
      files = files[shard_info.index::shard_info.num_shards]
    fmt = config.resolved_format(files[0])
    ds = read_text_files(files, fmt, config.text_key, shuffle=shuffle, seed=seed,
                         non_utf8_files=sorted(set(listing.non_utf8) & set(files)),
                         non_utf8=config.non_utf8, bad_records=config.bad_records,
                         max_bad_fraction=config.max_bad_fraction)
    if config.split_by == "document" and not config.per_split_patterns:
      # Stable across machines and runs: FarmHash fingerprint of the document text.
      bucket = lambda t: tf.strings.to_hash_bucket_fast(t, 10000)
      cut = int(round(config.validation_percent * 100))
      keep = (lambda t: bucket(t) < cut) if split == "validation" else (lambda t: bucket(t) >= cut)
      ds = ds.filter(plain(keep))
    return ds.map(plain(lambda t: {"text": t}), num_parallel_calls=AUTOTUNE)


# ------------------------------------------------------------------------------ built-in corpora

STDLIB_ROOT = sysconfig.get_paths()["stdlib"]


@gin.configurable
def stdlib_corpus(max_files: int | None = None, validation_percent: float = 3.0,
                  non_utf8: str = "skip", exclude: Sequence[str] = ()) -> CorpusConfig:
  """Python's own standard library sources: a code corpus present on every machine with Python.

  Split by file (hash of the path relative to the stdlib root), one document per file.
  `exclude`: more path substrings to leave out, e.g. ["/test/", "/encodings/"] (the test suite
  and the codecs' tables, most of the text).
  """
  return CorpusConfig(
      patterns=(os.path.join(STDLIB_ROOT, "**", "*.py"),), format="files", non_utf8=non_utf8,
      split_by="file", validation_percent=validation_percent, root=STDLIB_ROOT,
      exclude=("site-packages", "dist-packages", "__pycache__", *exclude), max_files=max_files)


@gin.configurable
def local_corpus(pattern: str | Sequence[str] | None = None, format: str = "auto",  # pylint: disable=redefined-builtin
                 text_key: str = "text", non_utf8: str = "skip", bad_records: str = "skip",
                 max_bad_fraction: float = 0.1, validation_percent: float = 2.0,
                 max_files: int | None = None) -> CorpusConfig:
  """The user's own corpus, usually bound in gin: `local_corpus.pattern = %LOCAL_CORPUS_PATTERN`."""
  if not pattern:
    raise CorpusError(
        "No local corpus configured. Bind it in gin, e.g. LOCAL_CORPUS_PATTERN = "
        "'/data/corpus/{split}-*.jsonl' and local_corpus.pattern = %LOCAL_CORPUS_PATTERN "
        "(or --gin.local_corpus.pattern=\"'/data/*.txt'\").")
  patterns = (pattern,) if isinstance(pattern, str) else tuple(pattern)
  return CorpusConfig(patterns=patterns, format=format, text_key=text_key, non_utf8=non_utf8,
                      bad_records=bad_records, max_bad_fraction=max_bad_fraction,
                      split_by="document", validation_percent=validation_percent,
                      max_files=max_files)


# ------------------------------------------------------------------------------ TFDS

@dataclasses.dataclass(frozen=True)
class TfdsConfig:
  name: str  # "my_dataset" or "my_dataset:1.0.0"
  data_dir: str | None = None
  text_key: str = "text"
  train_split: str = "train"
  validation_split: str = "validation"


@gin.configurable
def tfds_corpus(name: str | None = None, data_dir: str | None = None, text_key: str = "text",
                train_split: str = "train", validation_split: str = "validation") -> TfdsConfig:
  """A TFDS dataset already prepared in `data_dir` (nothing is downloaded)."""
  if not name:
    raise CorpusError("No TFDS dataset configured: bind tfds_corpus.name (and .data_dir) in gin.")
  return TfdsConfig(name, data_dir, text_key, train_split, validation_split)


def _default_tfds_dir() -> str:
  return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


class TfdsTextSource(seqio.DataSource):
  """seqio.TfdsDataSource built lazily from `config`, with `text_key` renamed to "text"."""

  def __init__(self, config: TfdsConfig | Callable[[], TfdsConfig]):
    self._config = config
    super().__init__(splits=SPLITS)

  def _resolve(self) -> tuple[TfdsConfig, seqio.TfdsDataSource]:
    config = self._config() if callable(self._config) else self._config
    name = config.name
    if config.data_dir and not os.path.isdir(config.data_dir):
      raise CorpusError(f"TFDS data_dir {config.data_dir!r} does not exist.")
    if ":" not in name:  # seqio wants "name:version": take the newest one prepared in data_dir
      found = glob.glob(os.path.join(config.data_dir or _default_tfds_dir(), name, "*.*.*"))
      versions = sorted((tuple(int(p) for p in v.split(".")), v) for v in map(os.path.basename,
                                                                             found)
                        if re.fullmatch(r"\d+\.\d+\.\d+", v))
      if not versions:
        raise CorpusError(
            f"No prepared TFDS dataset {name!r} in {config.data_dir or _default_tfds_dir()!r} "
            "(expected <data_dir>/<name>/<version>/). Prepare it there first (nothing is "
            "downloaded at run time) or set tfds_corpus.data_dir.")
      name = f"{name}:{versions[-1][1]}"
    split_map = {"train": config.train_split, "validation": config.validation_split}
    return config, seqio.TfdsDataSource(tfds_name=name, tfds_data_dir=config.data_dir,
                                        splits=split_map)

  @property
  def supports_arbitrary_sharding(self) -> bool:
    return False

  def list_shards(self, split: str) -> Sequence[str]:
    return self._resolve()[1].list_shards(split)

  def get_dataset(self, split: str = "train", shuffle: bool = True, seed: int | None = None,
                  shard_info: seqio.ShardInfo | None = None, *, sequence_length=None,
                  use_cached=False, num_epochs=1) -> tf.data.Dataset:
    del sequence_length, use_cached, num_epochs
    config, source = self._resolve()
    ds = source.get_dataset(split, shuffle=shuffle, seed=seed, shard_info=shard_info)
    if config.text_key not in ds.element_spec:
      raise CorpusError(f"TFDS dataset {config.name!r} has no feature {config.text_key!r}; "
                        f"it has {sorted(ds.element_spec)}. Set tfds_corpus.text_key.")
    return ds.map(plain(lambda ex: {"text": ex[config.text_key]}),
                  num_parallel_calls=AUTOTUNE)
