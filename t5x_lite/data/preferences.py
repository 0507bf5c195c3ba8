"""Preference data: (prompt, chosen, rejected) triples as seqio tasks, and the converter that
puts both answers of a pair in one batch.

Tasks (features "inputs" = the prompt, "chosen", "rejected", each tokenized with EOS):
  addition_preferences  built in, no download: the prompt "add: 12 + 345" of the `addition`
                        task, chosen = the right sum, rejected = a near miss (the sum off by
                        1, 10 or 100), so which answer is preferred can be checked.
  docstring_preferences built in, no download: the `code_to_docstring` prompt ("docstring: "
                        + a standard-library function's code, its docstring removed), chosen
                        = its docstring's first sentence, rejected = that of the function
                        before it in the same file.
  preference_jsonl      JSON Lines {"prompt", "chosen", "rejected"} files:
                        `preference_files.pattern = '/data/prefs/{split}.jsonl'` in gin (the
                        keys are `preference_files.prompt_key` / `.chosen_key` / `.rejected_key`).
`register_preference_task(name, pattern, ...)` registers more JSONL tasks from Python.

Bad rows are skipped and counted with the input pipeline's other data faults
(`sources.data_faults()`, printed after training): a line that is not a JSON object, a row
without a string at one of the keys, and a row whose chosen answer equals the rejected one
(nothing to prefer). A file where they are more than `max_bad_fraction` of the rows read stops
the run naming the file (most likely the keys are wrong).

`pair_feature_converter(family)` (the family's `PairFeatureConverter` in `CONVERTERS`) turns
each triple into model features with a leading pair axis of 2 (row 0 the chosen answer, row 1
the rejected one), so a batch is [b, 2, l] and one forward pass over its [2b, l] rows scores
both answers:
  decoder:          [BOS] prompt response, padded to inputs + response length; loss weights on
                    the response only; `decoder_causal_attention` marks BOS and the prompt (as
                    seqio's prefix-LM converter does).
  encoder_decoder:  the prompt as encoder input, the response as decoder target.
  encoder:          prompt and response concatenated as the encoder input (reward models).
The response length is the larger of TASK_FEATURE_LENGTHS' "chosen" and "rejected".
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

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

FEATURES = {
    "inputs": seqio.Feature(tasks_lib.VOCAB, add_eos=True),
    "chosen": seqio.Feature(tasks_lib.VOCAB, add_eos=True),
    "rejected": seqio.Feature(tasks_lib.VOCAB, add_eos=True),
}
FAMILIES = ("decoder", "encoder_decoder", "encoder")  # those CONVERTERS (below) cover

# The data-fault kinds of preference rows, reported with the pipeline's own (sources.FAULTS).
jsonl_rows.register_fault_kind(
    "missing_preference_key", "row(s) without a preference key", lambda c: (
        f"Set preference_files.prompt_key / .chosen_key / .rejected_key to the fields holding "
        f"them (now {c.keys})"))
jsonl_rows.register_fault_kind(
    "identical_pair", "row(s) with chosen == rejected", lambda c: (
        "Drop rows whose chosen and rejected answers are equal: they carry no preference"))


@dataclasses.dataclass(frozen=True)
class PreferenceFiles:
  """Where a JSONL preference task reads, and how (see `preference_files`)."""
  pattern: str | None = None
  prompt_key: str = "prompt"
  chosen_key: str = "chosen"
  rejected_key: str = "rejected"
  max_bad_fraction: float = 0.5
  fail_at_first: bool = False  # what sources.FAULTS.add asks of a read config

  @property
  def keys(self) -> tuple[str, str, str]:
    return (self.prompt_key, self.chosen_key, self.rejected_key)


@gin.configurable
def preference_files(pattern: str | None = None, prompt_key: str = "prompt",
                     chosen_key: str = "chosen", rejected_key: str = "rejected",
                     max_bad_fraction: float = 0.5) -> PreferenceFiles:
  """The files of the `preference_jsonl` task: a glob with "{split}" in it (train/validation)."""
  return PreferenceFiles(pattern, prompt_key, chosen_key, rejected_key, max_bad_fraction)


def _something_to_prefer(row: tuple[str, ...]):
  return ("identical_pair", "chosen == rejected") if row[1] == row[2] else None


def preference_source(config) -> jsonl_rows.JsonlRowsSource:
  """{"inputs", "chosen", "rejected"} strings from the JSON Lines files of `config` (a
  PreferenceFiles or a callable returning one), bad rows counted."""
  return jsonl_rows.JsonlRowsSource(config, ("inputs", "chosen", "rejected"),
                                    "missing_preference_key", "preference_files",
                                    check=_something_to_prefer)


class AdditionPreferenceSource(seqio.DataSource):
  """The `addition` task's questions with the right sum (chosen) and a near miss (rejected):
  the sum plus or minus 1, 10 or 100, chosen by the question's hash (so it is fixed per
  question) and never negative. Splits and validation set are those of `addition`."""

  MISSES = (1, -1, 10, -10, 100, -100)

  def __init__(self, max_digits: int = 4):
    self._addition = finetune_tasks.AdditionSource(max_digits)
    super().__init__(splits=sources.SPLITS)

  @property
  def supports_arbitrary_sharding(self) -> bool:
    return True

  def list_shards(self, split: str) -> Sequence[str]:
    return [split]

  def num_input_examples(self, split: str) -> int | None:
    return self._addition.num_input_examples(split)

  def get_dataset(self, split: str = "train", shuffle: bool = True, seed: int | None = None,
                  shard_info: seqio.ShardInfo | None = None, *, sequence_length=None,
                  use_cached=False, num_epochs=1) -> tf.data.Dataset:
    misses = tf.constant(self.MISSES, tf.int64)

    def to_pair(ex):
      right = tf.strings.to_number(ex["answer"], tf.int64)
      miss = tf.gather(misses, tf.strings.to_hash_bucket_fast(ex["question"], len(self.MISSES)))
      wrong = tf.where(right + miss < 0, right - miss, right + miss)
      return {"inputs": tf.strings.join(["add: ", ex["question"]]), "chosen": ex["answer"],
              "rejected": tf.strings.as_string(wrong)}
    ds = self._addition.get_dataset(split, shuffle, seed, shard_info,
                                    sequence_length=sequence_length, use_cached=use_cached,
                                    num_epochs=num_epochs)
    return ds.map(plain(to_pair), num_parallel_calls=AUTOTUNE)


_functions_of_file = finetune_tasks._extract_file  # pylint: disable=protected-access  # (code, doc)


class DocstringPreferenceSource(seqio.DataSource):
  """The `code_to_docstring` task's functions (a standard-library function's source, its
  docstring removed) with their own docstring's first sentence (chosen) and that of the
  function before it in the same file (rejected; the first function takes the file's last):
  a plausible answer about the same module, but not about this code. Files with one function,
  and functions whose neighbour has the same first sentence, give no pair (Python 3.11's
  stdlib: 7648 pairs from 7950 functions in train, 146 alone in their file and 156 sharing the
  neighbour's sentence; 185 from 194 in validation, 5 and 4). Split by file, like the corpus."""

  def __init__(self, corpus=sources.stdlib_corpus):
    self._functions = finetune_tasks.CodeToDocstringSource(corpus)
    super().__init__(splits=sources.SPLITS)

  @property
  def supports_arbitrary_sharding(self) -> bool:
    return False

  def list_shards(self, split: str) -> Sequence[str]:
    return self._functions.list_shards(split)

  def get_dataset(self, split: str = "train", shuffle: bool = True, seed: int | None = None,
                  shard_info: seqio.ShardInfo | None = None, *, sequence_length=None,
                  use_cached=False, num_epochs=1) -> tf.data.Dataset:
    del sequence_length, use_cached, num_epochs
    ds = sources.shard_files(self.list_shards(split), shard_info, shuffle, seed)

    def pairs_of_file(path):
      code, doc = tf.py_function(_functions_of_file, [path], [tf.string, tf.string])
      code.set_shape([None])
      doc.set_shape([None])
      other = tf.roll(doc, shift=1, axis=0)  # the previous function's docstring
      return {"inputs": tf.strings.join(["docstring: ", code]), "chosen": doc,
              "rejected": other}

    ds = ds.map(plain(pairs_of_file), num_parallel_calls=2).unbatch()
    return ds.filter(plain(lambda ex: ex["chosen"] != ex["rejected"]))


def register_preference_task(name: str, source: seqio.DataSource | str, prompt_key="prompt",
                             chosen_key="chosen", rejected_key="rejected",
                             max_bad_fraction: float = 0.5) -> str:
  """Registers a preference task over `source` ({"inputs", "chosen", "rejected"} strings) or
  over the JSON Lines files of a glob pattern ("{split}" becomes train / validation)."""
  if isinstance(source, str):
    source = preference_source(PreferenceFiles(source, prompt_key, chosen_key, rejected_key,
                                                   max_bad_fraction))
  return tasks_lib._add_task(  # pylint: disable=protected-access  # the registry all tasks use
      name, FAMILIES, source=source, output_features=FEATURES,
      preprocessors=[preprocessors.tokenize_and_append_eos],
      postprocess_fn=finetune_tasks.postprocess_text)


register_preference_task("addition_preferences", AdditionPreferenceSource())
register_preference_task("docstring_preferences", DocstringPreferenceSource())
register_preference_task("preference_jsonl", preference_source(preference_files))


# ------------------------------------------------------------------------------ converter

def _fit(ids: tf.Tensor, width: int) -> tf.Tensor:
  """ids trimmed or zero-padded to exactly `width`."""
  ids = ids[:width]
  return tf.pad(ids, [[0, width - tf.shape(ids)[0]]])


def _pair(fn, ex):
  """The features of fn(prompt, response) for chosen and rejected, stacked: [2, ...]."""
  rows = [fn(ex["inputs"], ex[key]) for key in ("chosen", "rejected")]
  return {name: tf.stack([rows[0][name], rows[1][name]]) for name in rows[0]}


class PairFeatureConverter(seqio.FeatureConverter):
  """Preference triples -> model features [2, l] per example (see the module docstring); one
  subclass per model family, chosen by `pair_feature_converter(family)`.

  Pairs are padded, never packed. `__call__` is seqio's entry point replaced: seqio's checks
  expect rank-1 model features, these have the pair axis in front.
  """
  TASK_FEATURES = {k: seqio.FeatureConverter.FeatureSpec(dtype=tf.int32) for k in FEATURES}
  MODEL_FEATURES = {}
  PACKING_FEATURE_DTYPES = {}

  def __init__(self, pack: bool = False, **unused):
    del pack, unused  # pairs are padded whatever the caller asks
    super().__init__(pack=False, apply_length_check=False)

  def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]):
    inputs, response = _widths(task_feature_lengths)
    return {"tokens": inputs + response}

  def __call__(self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]):
    missing = sorted(set(FEATURES) - set(ds.element_spec))
    if missing:
      raise ValueError(f"PairFeatureConverter needs preference examples with {sorted(FEATURES)}"
                       f"; {missing} missing (has {sorted(ds.element_spec)}). Use a preference "
                       "task (t5x_lite.data.preferences), e.g. addition_preferences.")
    return self._convert_features(ds, task_feature_lengths)

  def _convert_features(self, ds, task_feature_lengths):
    inputs_width, response_width = _widths(task_feature_lengths)
    row = lambda prompt, response: self.row(prompt[:inputs_width], response[:response_width],
                                            inputs_width, response_width)
    return ds.map(plain(lambda ex: _pair(row, ex)), num_parallel_calls=AUTOTUNE)

  def row(self, prompt, response, inputs_width: int, response_width: int) -> dict:
    """The model features of one (prompt, response), both already trimmed to their widths."""
    raise NotImplementedError


def _widths(lengths: Mapping[str, int]) -> tuple[int, int]:
  """(the prompt's width, the response's: the larger of "chosen" and "rejected")."""
  missing = sorted(set(FEATURES) - set(lengths))
  if missing:
    raise ValueError(f"Preference tasks need TASK_FEATURE_LENGTHS for {sorted(FEATURES)}; "
                     f"{missing} missing, e.g. {{'inputs': 32, 'chosen': 16, 'rejected': 16}}.")
  return int(lengths["inputs"]), int(max(lengths["chosen"], lengths["rejected"]))


class DecoderPairConverter(PairFeatureConverter):
  """[BOS] prompt response; loss weights on the response; the prefix marked causal-free."""

  def row(self, prompt, response, inputs_width, response_width):
    width = inputs_width + response_width
    n = tf.shape(prompt)[0]
    targets = _fit(tf.concat([prompt, response], 0), width)
    weights = _fit(tf.concat([tf.zeros_like(prompt), tf.ones_like(response)], 0), width)
    return {"decoder_target_tokens": targets,
            "decoder_input_tokens": tf.concat([[0], targets[:-1]], 0),
            "decoder_loss_weights": weights,
            "decoder_causal_attention": tf.cast(tf.range(width) < n + 1, tf.int32)}


class EncDecPairConverter(PairFeatureConverter):
  """The prompt as encoder input, the response as decoder target."""

  def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]):
    inputs, response = _widths(task_feature_lengths)
    return {"encoder_input_tokens": inputs, "decoder_input_tokens": response}

  def row(self, prompt, response, inputs_width, response_width):
    targets = _fit(response, response_width)
    return {"encoder_input_tokens": _fit(prompt, inputs_width),
            "decoder_target_tokens": targets,
            "decoder_input_tokens": tf.concat([[0], targets[:-1]], 0),
            "decoder_loss_weights": tf.cast(targets > 0, tf.int32)}


class EncoderPairConverter(PairFeatureConverter):
  """Prompt and response concatenated as the encoder input (reward models)."""

  def row(self, prompt, response, inputs_width, response_width):
    tokens = _fit(tf.concat([prompt, response], 0), inputs_width + response_width)
    return {"encoder_input_tokens": tokens, "encoder_target_tokens": tokens,
            "encoder_loss_weights": tf.zeros_like(tokens)}


CONVERTERS = {"decoder": DecoderPairConverter, "encoder_decoder": EncDecPairConverter,
              "encoder": EncoderPairConverter}


def pair_feature_converter(family: str) -> PairFeatureConverter:
  """The pair converter of a model family (a TransformerConfig.family)."""
  if family not in CONVERTERS:
    raise ValueError(f"Preference pairs need a model family in {sorted(CONVERTERS)}, got "
                     f"{family!r}.")
  return CONVERTERS[family]()
