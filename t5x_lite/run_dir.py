"""What makes a MODEL_DIR one run: its manifest and its lock.

The *manifest* (MODEL_DIR/manifest.json) records, at a run's first start, everything that fixes
the data stream and the meaning of token ids: the task or mixture, feature lengths, global batch
size, seed, number of data shards, the corpus bindings and the vocabulary (kind, size and a hash
of its content; a SentencePiece model is copied into MODEL_DIR as sentencepiece.model, so the
run outlives the original file). It also records the model config and the t5x_lite version. A resume
compares the current config with it and refuses any difference in the guarded entries (`GUARDED`)
unless `train.allow_changes` names them; an accepted change is appended to the manifest's
"changes". Differences in the model config or version are only reported.

The *lock* (MODEL_DIR/train.lock) keeps two jobs from writing one MODEL_DIR. It is a file holding
the host, pid and start time of its writer, locked with flock(2) for the writer's lifetime: the
kernel drops the flock when the process dies, even by SIGKILL, so a lock left by a dead process on
this host is reclaimed (with a warning), while a live writer is refused by name. A lock written on
another host cannot be checked from here and is refused, naming the file to delete if that job is
gone. In a multi-host run only process 0 takes it.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import shutil
import socket
from typing import Any, Iterator, Mapping, Optional, Sequence

MANIFEST = "manifest.json"
CONFIG = "config.gin"  # each accepted start appends its resolved gin config
LOCK = "train.lock"
# Not vocab.model (which t5x_lite.load would then prefer): seqio compares SentencePiece
# vocabularies by file path too, so the jobs would take the copy for another vocabulary.
SPM_COPY = "sentencepiece.model"
# Entries whose change would alter the data stream or the meaning of token ids.
GUARDED = ("MIXTURE_OR_TASK_NAME", "TASK_FEATURE_LENGTHS", "BATCH_SIZE", "train.seed",
           "data_shards", "corpus", "vocabulary")
REPORTED = ("model", "t5x_lite_version")  # differences are logged, never refused
CORPUS_CONFIGURABLES = ("stdlib_corpus", "local_corpus", "tfds_corpus")


class RunDirError(ValueError):
  """A MODEL_DIR that this start must not write: another writer, or a different run."""


def now() -> str:
  return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


# ---------------------------------------------------------------------------- vocabulary

def vocabulary_record(vocab) -> dict[str, Any]:
  """`vocabulary.describe` (kind, size, sentinels, content hash: equal records map text to the
  same ids) and, for SentencePiece, where its model file is."""
  from t5x_lite import vocabulary as vocab_lib  # pylint: disable=g-import-not-at-top
  record = vocab_lib.describe(vocab)
  model_file = getattr(getattr(vocab, "resolved", vocab), "sentencepiece_model_file", None)
  if model_file:
    record["file"] = os.path.abspath(model_file)
  return record


def _copy_vocabulary(model_dir: str, record: Mapping[str, Any]) -> None:
  """Keeps the SentencePiece model with the run, so the run outlives the original file."""
  source, target = record.get("file"), os.path.join(model_dir, SPM_COPY)
  if source and os.path.abspath(source) != os.path.abspath(target):
    shutil.copyfile(source, target + ".tmp")
    os.replace(target + ".tmp", target)


# ---------------------------------------------------------------------------- manifest

def corpus_bindings() -> dict[str, dict[str, Any]]:
  """The gin bindings of the corpus configurables (macros resolved), e.g.
  {"local_corpus": {"pattern": "/data/{split}-*.jsonl"}}."""
  import gin  # pylint: disable=g-import-not-at-top
  found = {}
  for (scope, selector), params in gin.config._CONFIG.items():  # pylint: disable=protected-access
    name = selector.rsplit(".", 1)[-1]
    if scope or name not in CORPUS_CONFIGURABLES:
      continue
    found[name] = {key: _resolved(gin, value) for key, value in sorted(params.items())}
  return found


def _resolved(gin, value):
  if isinstance(value, gin.config.ConfigurableReference) and value.configurable.name == "macro":
    return _jsonable(gin.query_parameter(f"%{value.scoped_selector.rsplit('/', 1)[0]}"))
  return _jsonable(value)


def _jsonable(value):
  """Plain JSON (tuples become lists) so that a value reads back equal to itself."""
  try:
    return json.loads(json.dumps(value))
  except TypeError:
    return repr(value)


def manifest(*, task: str, feature_lengths: Mapping[str, int], batch_size: int, seed: int,
             data_shards: int, vocabulary: Mapping[str, Any], model_config: Any,
             corpus: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
  """The manifest of the run as configured now."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  import t5x_lite  # pylint: disable=g-import-not-at-top
  model = (dataclasses.asdict(model_config) if dataclasses.is_dataclass(model_config)
           else model_config)
  return _jsonable({
      "MIXTURE_OR_TASK_NAME": task, "TASK_FEATURE_LENGTHS": dict(feature_lengths),
      "BATCH_SIZE": batch_size, "train.seed": seed, "data_shards": data_shards,
      "corpus": dict(corpus or {}), "vocabulary": dict(vocabulary), "model": model,
      "t5x_lite_version": t5x_lite.__version__})


def read_manifest(model_dir: str) -> Optional[dict[str, Any]]:
  path = os.path.join(model_dir, MANIFEST)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except ValueError as e:
    raise RunDirError(
        f"{path} is not valid JSON ({e}); it records what this run was started with. Restore it "
        "from a backup, or delete it to record the current config as the run's.") from None


def _write_manifest(model_dir: str, record: Mapping[str, Any]) -> None:
  path = os.path.join(model_dir, MANIFEST)
  with _naming(path + ".tmp"), open(path + ".tmp", "w") as f:
    json.dump(record, f, indent=1, sort_keys=True)
    f.write("\n")
  os.replace(path + ".tmp", path)  # never half a manifest


def append_config(model_dir: str, start: str, config: str) -> None:
  """Appends this start's resolved gin config to MODEL_DIR/config.gin (a run's history)."""
  path = os.path.join(model_dir, CONFIG)
  with _naming(path), open(path, "a") as f:
    f.write(f"# ---- {start}, {now()}, pid {os.getpid()}: the resolved config (later starts "
            f"append theirs)\n{config}\n")


@contextlib.contextmanager
def _naming(path: str):
  """An OSError from writing (e.g. a full disk) that names the file it was writing."""
  try:
    yield
  except OSError as e:
    if e.filename:
      raise
    raise OSError(e.errno, e.strerror, path) from e


def _same_vocabulary(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
  keys = ("kind", "vocab_size", "extra_ids", "sha256")  # not the path: a moved file is the same
  return all(a.get(k) == b.get(k) for k in keys)


def _describe(name: str, value) -> str:
  if name == "vocabulary" and isinstance(value, Mapping):
    where = f" {value['file']}" if value.get("file") else ""
    return (f"{value.get('kind')}{where} ({value.get('vocab_size')} ids, sha256 "
            f"{str(value.get('sha256'))[:12]})")
  return json.dumps(value, sort_keys=True)


def _changed_fields(old, new) -> str:
  """"d_model 64 -> 32, dtype 'float32' -> 'bfloat16'" for two dicts; else "old -> new"."""
  if not (isinstance(old, Mapping) and isinstance(new, Mapping)):
    return f"{_describe('', old)} -> {_describe('', new)}"
  return ", ".join(f"{key} {old.get(key)!r} -> {new.get(key)!r}"
                   for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key))


def differences(recorded: Mapping[str, Any], current: Mapping[str, Any],
                names: Sequence[str]) -> dict[str, tuple[Any, Any]]:
  """{name: (recorded, current)} for the entries of `names` that differ."""
  found = {}
  for name in names:
    old, new = recorded.get(name), current.get(name)
    same = (_same_vocabulary(old or {}, new or {}) if name == "vocabulary" else old == new)
    if not same:
      found[name] = (old, new)
  return found


def check_manifest(model_dir: str, current: dict[str, Any], resuming: bool,
                   allow_changes: Sequence[str] = (), step: Optional[int] = None,
                   log=logging.warning, write: bool = True) -> dict[str, Any]:
  """Writes the manifest at a run's first start; on a resume, refuses (RunDirError, nothing
  written) a guarded difference that `allow_changes` does not name, and records those it does.
  Returns the manifest now in force. With `write=False` (the other processes of a multi-host
  run) it only refuses."""
  unknown = sorted(set(allow_changes) - set(GUARDED))
  if unknown:
    raise RunDirError(f"train.allow_changes names {unknown}; it takes names among {GUARDED}.")
  recorded = read_manifest(model_dir)
  log = log if write else _quiet  # process 0 says it
  if recorded is not None and resuming:
    return _checked_resume(model_dir, recorded, current, allow_changes, step, log, write)
  if recorded is not None:
    log(f"{model_dir} has a manifest but no train-state checkpoint: starting the run afresh "
        "and recording the current config.")
  elif resuming:
    log(f"{model_dir} has checkpoints but no {MANIFEST} (written by an older t5x_lite): "
        "recording the current config as the run's.")
  record = dict(current, created=now(), changes=[])
  if write:
    _copy_vocabulary(model_dir, current["vocabulary"])
    _write_manifest(model_dir, record)
  return record


def _quiet(message: str) -> None:
  del message


def _checked_resume(model_dir, recorded, current, allow_changes, step, log, write):
  """check_manifest of a resume: refuse, or record the allowed changes."""
  guarded = differences(recorded, current, GUARDED)
  refused = {k: v for k, v in guarded.items() if k not in allow_changes}
  if refused:
    lines = "\n".join(f"  {name}: {_describe(name, old)} (recorded) -> {_describe(name, new)} "
                      "(now)" for name, (old, new) in refused.items())
    names = ", ".join(repr(n) for n in refused)
    raise RunDirError(
        f"MODEL_DIR {model_dir} holds a run started with another config; resuming it would "
        f"change the data stream or the meaning of token ids:\n{lines}\nNothing was written. "
        f"Start a new run in a fresh MODEL_DIR, or accept the change with "
        f"--gin.train.allow_changes=\"[{names}]\" (recorded in {MANIFEST}).")
  for name, (old, new) in differences(recorded, current, REPORTED).items():
    log(f"{name} differs from the run's first start: {_changed_fields(old, new)}; resuming "
        "anyway (parameter shapes are checked).")
  if not guarded:
    return recorded
  for name, (old, new) in guarded.items():
    log(f"Allowed change (train.allow_changes): {name}: {_describe(name, old)} -> "
        f"{_describe(name, new)}.")
  record = dict(recorded, **{k: current[k] for k in guarded})
  record["changes"] = list(recorded.get("changes", [])) + [{
      "time": now(), "step": step, **{k: {"from": old, "to": new}
                                       for k, (old, new) in guarded.items()}}]
  if write and "vocabulary" in guarded:
    _copy_vocabulary(model_dir, current["vocabulary"])
  if write:
    _write_manifest(model_dir, record)
  return record


# ---------------------------------------------------------------------------- lock

def _holder_text(holder: Mapping[str, Any]) -> str:
  return (f"host {holder.get('host')!r}, pid {holder.get('pid')}, started "
          f"{holder.get('started')}" + (f" ({holder['command']})" if holder.get("command") else ""))


def _read_holder(fd: int) -> Optional[dict[str, Any]]:
  os.lseek(fd, 0, os.SEEK_SET)
  text = os.read(fd, 1 << 16).decode("utf-8", "replace").strip()
  if not text:
    return None
  try:
    return json.loads(text)
  except ValueError:
    return {"host": "?", "pid": "?", "started": "?", "command": text[:200]}


class Lock:
  """A held MODEL_DIR lock; `release()` (or leaving `take_lock`'s context) gives it up."""

  def __init__(self, path: str, fd: int):
    self.path, self._fd = path, fd

  def release(self) -> None:
    if self._fd is None:
      return
    with contextlib.suppress(OSError):
      if os.stat(self.path).st_ino == os.fstat(self._fd).st_ino:
        os.unlink(self.path)  # still ours: a finished run leaves no lock behind
    os.close(self._fd)  # drops the flock
    self._fd = None


def acquire(model_dir: str, command: str = "", log=logging.warning) -> Lock:
  """Takes MODEL_DIR's lock or raises RunDirError naming the job that holds it."""
  path = os.path.join(model_dir, LOCK)
  host = socket.gethostname()
  for _ in range(5):  # a concurrent release may unlink the file between open and flock
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        os.close(fd)
        raise
      holder = _read_holder(fd) or {}
      os.close(fd)
      raise RunDirError(
          f"MODEL_DIR {model_dir} is in use by another training job: {_holder_text(holder)}. Two "
          "jobs writing one MODEL_DIR mix their checkpoints, exports and TensorBoard events. Wait "
          f"for it to finish or stop it, or use another MODEL_DIR.") from None
    try:
      same_file = os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
      same_file = False
    if not same_file:
      os.close(fd)
      continue
    previous = _read_holder(fd)
    if previous and previous.get("host") != host:
      os.close(fd)
      raise RunDirError(
          f"MODEL_DIR {model_dir} is locked by a job on another host: {_holder_text(previous)}. "
          f"Its lock cannot be checked from {host!r}. If that job is no longer running, delete "
          f"{path} and rerun; otherwise use another MODEL_DIR.")
    if previous:
      log(f"Reclaimed the lock of {model_dir} from a job that is no longer running "
          f"({_holder_text(previous)}); it ended without releasing it (killed?).")
    record = {"host": host, "pid": os.getpid(), "started": now(), "command": command}
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(record) + "\n").encode())
    os.fsync(fd)
    return Lock(path, fd)
  raise RunDirError(f"Could not take the lock {path}: it kept being replaced by another job.")


@contextlib.contextmanager
def locked(model_dir: str, take: bool = True, command: str = "") -> Iterator[Optional[Lock]]:
  """Holds MODEL_DIR's lock for the body (if `take`; multi-host: only process 0 takes it)."""
  if not take:
    yield None
    return
  lock = acquire(model_dir, command)
  try:
    yield lock
  finally:
    lock.release()
