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
from typing import Sequence

import gin
import seqio
import tensorflow as tf

from t5x_lite.data import finetune_tasks
from t5x_lite.data import jsonl_rows
from t5x_lite.data import preprocessors
from t5x_lite.data import sources
from t5x_lite.data import tasks as tasks_lib

AUTOTUNE = tf.data.AUTOTUNE
plain = tf.autograph.experimental.do_not_convert
FAMILIES = ("decoder", "encoder_decoder")

jsonl_rows.register_fault_kind(
    "missing_instruction_key", "row(s) without a prompt or response", lambda c: (
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


def instruction_source(config) -> jsonl_rows.JsonlRowsSource:
  """{"prompt", "response"} strings from the JSON Lines files of `config` (an InstructionFiles
  or a callable returning one), bad rows counted."""
  return jsonl_rows.JsonlRowsSource(config, ("prompt", "response"), "missing_instruction_key",
                                    "instruction_files")


def _as_text_to_text(dataset):
  return preprocessors.text_to_text(dataset, "", "prompt", "response")


def register_instruction_task(name: str, source: seqio.DataSource | str, prompt_key="prompt",
                              response_key="response", max_bad_fraction: float = 0.1,
                              metric_fns=()) -> str:
  """Registers a task over `source` ({"prompt", "response"} strings) or over the JSON Lines
  files of a glob pattern ("{split}" becomes train / validation)."""
  if isinstance(source, str):
    source = instruction_source(InstructionFiles(source, prompt_key, response_key,
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
register_instruction_task("instruction_jsonl", instruction_source(instruction_files))
