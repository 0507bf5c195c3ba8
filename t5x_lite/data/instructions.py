"""Instruction-tuning tasks: (prompt, response) pairs as text-to-text seqio tasks.

Importing this module registers (features "inputs" = the prompt, "targets" = the response, each
with EOS; decoder models read them as a prefix LM whose loss is on the response tokens only,
encoder-decoder models as text-to-text):
  instruction_jsonl      JSON Lines files of {"prompt": ..., "response": ...}:
                         `instruction_files.pattern = '/data/sft/{split}.jsonl'` in gin (the keys
                         are `instruction_files.prompt_key` / `.response_key`).
  stdlib_instructions    built in, no download, a mixture of three instruction kinds generated
                         from Python's standard library and arithmetic:
    instructions_signature   "Write the signature of a Python function that <docstring's first
                             sentence>" -> the function's `def` line;
    instructions_docstring   "Summarize what this Python function does in one sentence:" +
                             its code (docstring removed) -> the docstring's first sentence;
    instructions_addition    "What is 12 + 345? Answer with the number only." -> "357".
`register_instruction_task(name, pattern, ...)` registers more JSONL tasks from Python.

A JSONL line that is not a JSON object, or a row without a string at one of the keys, is
skipped and counted with the pipeline's other data faults (`sources.data_faults()`, printed
after training); a file where they are more than `max_bad_fraction` of the rows read stops the
run naming the file and the keys found (most likely the keys are wrong).
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Sequence

import gin
import seqio
import tensorflow as tf

from t5x_lite.data import finetune_tasks
from t5x_lite.data import preprocessors
from t5x_lite.data import sources
from t5x_lite.data import tasks as tasks_lib

AUTOTUNE = tf.data.AUTOTUNE
plain = tf.autograph.experimental.do_not_convert
FAMILIES = ("decoder", "encoder_decoder")

sources.KIND_NAMES.setdefault("missing_instruction_key", "row(s) without a prompt or response")
sources._FIX.setdefault(  # pylint: disable=protected-access  # the table FAULTS.add reads
    "missing_instruction_key", lambda c: (
        f"Set instruction_files.prompt_key / .response_key to the fields holding them "
        f"(now {c.keys})"))


@dataclasses.dataclass(frozen=True)
class InstructionFiles:
  """Where a JSONL instruction task reads, and how (see `instruction_files`)."""
  pattern: str | None = None
  prompt_key: str = "prompt"
  response_key: str = "response"
  max_bad_fraction: float = 0.1
  fail_at_first: bool = False  # what sources.FAULTS.add asks of a read config

  @property
  def keys(self) -> tuple[str, str]:
    return (self.prompt_key, self.response_key)


@gin.configurable
def instruction_files(pattern: str | None = None, prompt_key: str = "prompt",
                      response_key: str = "response",
                      max_bad_fraction: float = 0.1) -> InstructionFiles:
  """The files of the `instruction_jsonl` task: a glob with "{split}" in it."""
  return InstructionFiles(pattern, prompt_key, response_key, max_bad_fraction)


def parse_row(raw: bytes, path: str, line: int, config: InstructionFiles):
  """(prompt, response) of one JSONL line, or None when it is skipped (and counted)."""
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
    sources.FAULTS.add("missing_instruction_key", path, line,
                       f"no string at {missing} (keys found: {sorted(row)[:10]})", config)
    return None
  return tuple(row[k] for k in config.keys)


def _parse_lines(paths, numbers, lines, config: InstructionFiles):
  """[n] raw lines -> [n, 2] strings and [n] bools (kept), in Python (JSON has no TF op)."""
  def parse(paths, numbers, lines):
    rows, kept = [], []
    for raw, path, n in zip(lines.numpy(), paths.numpy(), numbers.numpy()):
      path = path.decode()
      sources.FAULTS.count_read(path, int(n))
      row = parse_row(raw, path, int(n), config)
      kept.append(row is not None)
      rows.append([s.encode("utf-8") for s in row] if row else [b"", b""])
    return (tf.constant(rows, tf.string, shape=[len(rows), 2]),
            tf.constant(kept, tf.bool, shape=[len(kept)]))
  rows, kept = tf.py_function(parse, [paths, numbers, lines], [tf.string, tf.bool])
  rows.set_shape([None, 2])
  kept.set_shape([None])
  return rows, kept


class InstructionJsonlSource(seqio.DataSource):
  """{"prompt", "response"} strings from JSON Lines files, bad rows counted."""

  def __init__(self, config):
    self._config = config  # an InstructionFiles, or a callable returning one (read when used)
    super().__init__(splits=sources.SPLITS)

  @property
  def config(self) -> InstructionFiles:
    return self._config() if callable(self._config) else self._config

  @property
  def supports_arbitrary_sharding(self) -> bool:
    return False

  def list_shards(self, split: str) -> Sequence[str]:
    pattern = self.config.pattern
    if not pattern:
      raise sources.CorpusError(
          "The instruction task has no files: set --gin.instruction_files.pattern="
          "\"'/data/sft/{split}.jsonl'\" (JSON Lines with prompt/response).")
    files = sorted(glob.glob(os.path.expanduser(pattern.replace("{split}", split))))
    if not files:
      raise sources.CorpusError(f"No instruction files match {pattern!r} for split {split!r}; "
                                "check instruction_files.pattern ('{split}' becomes train / "
                                "validation).")
    return files

  def get_dataset(self, split: str = "train", shuffle: bool = True, seed: int | None = None,
                  shard_info: seqio.ShardInfo | None = None, *, sequence_length=None,
                  use_cached=False, num_epochs=1) -> tf.data.Dataset:
    del sequence_length, use_cached, num_epochs
    config, files = self.config, list(self.list_shards(split))
    if shard_info and shard_info.num_shards > 1:
      files = files[shard_info.index::shard_info.num_shards]
    ds = tf.data.Dataset.from_tensor_slices(files)
    if shuffle:
      ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    ds = ds.interleave(lambda p: tf.data.TextLineDataset(p).enumerate(start=1).map(
        plain(lambda i, line: (p, i, line))), cycle_length=min(len(files), 8),
                       num_parallel_calls=AUTOTUNE, deterministic=True)
    ds = ds.batch(256).map(plain(lambda p, n, b: _parse_lines(p, n, b, config)),
                           num_parallel_calls=AUTOTUNE)
    ds = ds.map(plain(lambda rows, kept: tf.boolean_mask(rows, kept))).unbatch()
    ds = ds.map(plain(lambda r: {"prompt": r[0], "response": r[1]}))
    return ds.shuffle(1024, seed=seed) if shuffle else ds


def _as_text_to_text(dataset):
  return preprocessors.text_to_text(dataset, "", "prompt", "response")


def register_instruction_task(name: str, source: seqio.DataSource | str, prompt_key="prompt",
                              response_key="response", max_bad_fraction: float = 0.1,
                              metric_fns=()) -> str:
  """Registers a task over `source` ({"prompt", "response"} strings) or over the JSON Lines
  files of a glob pattern ("{split}" becomes train / validation)."""
  if isinstance(source, str):
    source = InstructionJsonlSource(InstructionFiles(source, prompt_key, response_key,
                                                     max_bad_fraction))
  return tasks_lib._add_task(  # pylint: disable=protected-access  # the registry all tasks use
      name, FAMILIES, source=source, output_features=tasks_lib.SEQ2SEQ_FEATURES,
      preprocessors=[_as_text_to_text, preprocessors.tokenize_and_append_eos],
      postprocess_fn=finetune_tasks.postprocess_text, metric_fns=list(metric_fns))


# ------------------------------------------------------------------------------ built-in set

class _Mapped(seqio.DataSource):
  """Another source's examples mapped to {"prompt", "response"}."""

  def __init__(self, source: seqio.DataSource, to_pair):
    self._source, self._to_pair = source, to_pair
    super().__init__(splits=sources.SPLITS)

  @property
  def supports_arbitrary_sharding(self) -> bool:
    return self._source.supports_arbitrary_sharding

  def list_shards(self, split: str) -> Sequence[str]:
    return self._source.list_shards(split)

  def num_input_examples(self, split: str) -> int | None:
    return self._source.num_input_examples(split)

  def get_dataset(self, split: str = "train", shuffle: bool = True, seed: int | None = None,
                  shard_info: seqio.ShardInfo | None = None, *, sequence_length=None,
                  use_cached=False, num_epochs=1) -> tf.data.Dataset:
    ds = self._source.get_dataset(split, shuffle, seed, shard_info,
                                  sequence_length=sequence_length, use_cached=use_cached,
                                  num_epochs=num_epochs)
    return ds.map(plain(self._to_pair), num_parallel_calls=AUTOTUNE)


def _signature(ex):
  """The def line (up to the first ':' at its end) of a function's source."""
  first = tf.strings.split(tf.strings.strip(ex["code"]), "\n", maxsplit=1)[0]
  return {"prompt": tf.strings.join(["Write the signature of a Python function that ",
                                     tf.strings.lower(ex["docstring"])]),
          "response": tf.strings.strip(first)}


def _summary(ex):
  return {"prompt": tf.strings.join(["Summarize what this Python function does in one "
                                     "sentence:\n", ex["code"]]),
          "response": ex["docstring"]}


def _sum(ex):
  return {"prompt": tf.strings.join(["What is ", ex["question"], "? Answer with the number "
                                     "only."]),
          "response": ex["answer"]}


STDLIB_TASKS = [
    register_instruction_task("instructions_signature", _Mapped(
        finetune_tasks.CodeToDocstringSource(), _signature),
                              metric_fns=[finetune_tasks.exact_match]),
    register_instruction_task("instructions_docstring", _Mapped(
        finetune_tasks.CodeToDocstringSource(), _summary),
                              metric_fns=[finetune_tasks.rouge, finetune_tasks.exact_match]),
    register_instruction_task("instructions_addition", _Mapped(
        finetune_tasks.AdditionSource(), _sum), metric_fns=[finetune_tasks.exact_match]),
]
tasks_lib._add_mixture("stdlib_instructions", [(name, 1.0) for name in STDLIB_TASKS],  # pylint: disable=protected-access
                       FAMILIES)
register_instruction_task("instruction_jsonl", InstructionJsonlSource(instruction_files))
