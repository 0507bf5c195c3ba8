"""Preference data: (prompt, chosen, rejected) triples as seqio tasks, and the converter that
puts both answers of a pair in one batch.

Tasks (features "inputs" = the prompt, "chosen", "rejected", each tokenized with EOS):
  addition_preferences  built in, no download: the prompt "add: 12 + 345" of the `addition`
                        task, chosen = the right sum, rejected = a near miss (the sum off by
                        1, 10 or 100), so which answer is preferred can be checked.
  preference_jsonl      JSON Lines {"prompt", "chosen", "rejected"} files:
                        `preference_files.pattern = '/data/prefs/{split}.jsonl'` in gin (the
                        keys are `preference_files.prompt_key` / `.chosen_key` / `.rejected_key`).
`register_preference_task(name, pattern, ...)` registers more JSONL tasks from Python.

Bad rows are skipped and counted with the input pipeline's other data faults
(`sources.data_faults()`, printed after training): a line that is not a JSON object, a row
without a string at one of the keys, and a row whose chosen answer equals the rejected one
(nothing to prefer). A file where they are more than `max_bad_fraction` of the rows read stops
the run naming the file (most likely the keys are wrong).

`PairFeatureConverter(family)` turns each triple into model features with a leading pair axis
of 2 (row 0 the chosen answer, row 1 the rejected one), so a batch is [b, 2, l] and one forward
pass over its [2b, l] rows scores both answers:
  decoder:          [BOS] prompt response, padded to inputs + response length; loss weights on
                    the response only; `decoder_causal_attention` marks BOS and the prompt (as
                    seqio's prefix-LM converter does).
  encoder_decoder:  the prompt as encoder input, the response as decoder target.
  encoder:          prompt and response concatenated as the encoder input (reward models).
The response length is the larger of TASK_FEATURE_LENGTHS' "chosen" and "rejected".
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Mapping, Sequence

import gin
import seqio
import tensorflow as tf

from t5x_lite.data import finetune_tasks
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
FAMILIES = ("decoder", "encoder_decoder", "encoder")

# The data-fault kinds of preference rows, reported with the pipeline's own (sources.FAULTS).
sources.KIND_NAMES.setdefault("missing_preference_key", "row(s) without a preference key")
sources.KIND_NAMES.setdefault("identical_pair", "row(s) with chosen == rejected")
sources._FIX.setdefault(  # pylint: disable=protected-access  # the table FAULTS.add reads
    "missing_preference_key", lambda c: (
        f"Set preference_files.prompt_key / .chosen_key / .rejected_key to the fields holding "
        f"them (now {c.keys})"))
sources._FIX.setdefault(  # pylint: disable=protected-access
    "identical_pair", lambda c: "Drop rows whose chosen and rejected answers are equal: they "
    "carry no preference")


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


def parse_row(raw: bytes, path: str, line: int, config: PreferenceFiles) -> tuple[str, ...] | None:
  """(prompt, chosen, rejected) of one JSONL line, or None when it is skipped (and counted)."""
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
    sources.FAULTS.add("missing_preference_key", path, line,
                       f"no string at {missing} (keys found: {sorted(row)[:10]})", config)
    return None
  prompt, chosen, rejected = (row[k] for k in config.keys)
  if chosen == rejected:
    sources.FAULTS.add("identical_pair", path, line, "chosen == rejected", config)
    return None
  return prompt, chosen, rejected


def _parse_lines(paths, numbers, lines, config: PreferenceFiles):
  """[n] raw lines -> [n, 3] strings and [n] bools (kept), in Python (JSON has no TF op)."""
  def parse(paths, numbers, lines):
    rows, kept = [], []
    for raw, path, n in zip(lines.numpy(), paths.numpy(), numbers.numpy()):
      path = path.decode()
      sources.FAULTS.count_read(path, int(n))
      row = parse_row(raw, path, int(n), config)
      kept.append(row is not None)
      rows.append([s.encode("utf-8") for s in row] if row else [b"", b"", b""])
    return (tf.constant(rows, tf.string, shape=[len(rows), 3]),
            tf.constant(kept, tf.bool, shape=[len(kept)]))
  rows, kept = tf.py_function(parse, [paths, numbers, lines], [tf.string, tf.bool])
  rows.set_shape([None, 3])
  kept.set_shape([None])
  return rows, kept


class PreferenceJsonlSource(seqio.DataSource):
  """{"inputs", "chosen", "rejected"} strings from JSON Lines files, bad rows counted."""

  def __init__(self, config):
    self._config = config  # a PreferenceFiles, or a callable returning one (read when used)
    super().__init__(splits=sources.SPLITS)

  @property
  def config(self) -> PreferenceFiles:
    return self._config() if callable(self._config) else self._config

  @property
  def supports_arbitrary_sharding(self) -> bool:
    return False

  def list_shards(self, split: str) -> Sequence[str]:
    pattern = self.config.pattern
    if not pattern:
      raise sources.CorpusError(
          "The preference task has no files: set --gin.preference_files.pattern="
          "\"'/data/prefs/{split}.jsonl'\" (JSON Lines with prompt/chosen/rejected).")
    files = sorted(glob.glob(os.path.expanduser(pattern.replace("{split}", split))))
    if not files:
      raise sources.CorpusError(f"No preference files match {pattern!r} for split {split!r}; "
                                "check preference_files.pattern ('{split}' becomes train / "
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
    ds = ds.map(plain(lambda r: {"inputs": r[0], "chosen": r[1], "rejected": r[2]}))
    if shuffle:
      ds = ds.shuffle(1024, seed=seed)
    return ds


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


def register_preference_task(name: str, source: seqio.DataSource | str, prompt_key="prompt",
                             chosen_key="chosen", rejected_key="rejected",
                             max_bad_fraction: float = 0.5) -> str:
  """Registers a preference task over `source` ({"inputs", "chosen", "rejected"} strings) or
  over the JSON Lines files of a glob pattern ("{split}" becomes train / validation)."""
  if isinstance(source, str):
    source = PreferenceJsonlSource(PreferenceFiles(source, prompt_key, chosen_key, rejected_key,
                                                   max_bad_fraction))
  return tasks_lib._add_task(  # pylint: disable=protected-access  # the registry all tasks use
      name, FAMILIES, source=source, output_features=FEATURES,
      preprocessors=[preprocessors.tokenize_and_append_eos],
      postprocess_fn=finetune_tasks.postprocess_text)


register_preference_task("addition_preferences", AdditionPreferenceSource())
register_preference_task("preference_jsonl", PreferenceJsonlSource(preference_files))


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
  """Preference triples -> model features [2, l] per example (see the module docstring).

  Pairs are padded, never packed. `__call__` is seqio's entry point replaced: seqio's checks
  expect rank-1 model features, these have the pair axis in front.
  """
  TASK_FEATURES = {k: seqio.FeatureConverter.FeatureSpec(dtype=tf.int32) for k in FEATURES}
  MODEL_FEATURES = {}
  PACKING_FEATURE_DTYPES = {}

  def __init__(self, family: str, pack: bool = False, **unused):
    del pack, unused  # pairs are padded whatever the caller asks
    if family not in FAMILIES:
      raise ValueError(f"Preference pairs need a model family in {FAMILIES}, got {family!r}.")
    self.family = family
    super().__init__(pack=False, apply_length_check=False)

  def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]):
    inputs, response = self._widths(task_feature_lengths)
    if self.family == "encoder_decoder":
      return {"encoder_input_tokens": inputs, "decoder_input_tokens": response}
    return {"tokens": inputs + response}

  @staticmethod
  def _widths(lengths: Mapping[str, int]) -> tuple[int, int]:
    missing = sorted(set(FEATURES) - set(lengths))
    if missing:
      raise ValueError(f"Preference tasks need TASK_FEATURE_LENGTHS for {sorted(FEATURES)}; "
                       f"{missing} missing, e.g. {{'inputs': 32, 'chosen': 16, 'rejected': 16}}.")
    return int(lengths["inputs"]), int(max(lengths["chosen"], lengths["rejected"]))

  def __call__(self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]):
    missing = sorted(set(FEATURES) - set(ds.element_spec))
    if missing:
      raise ValueError(f"PairFeatureConverter needs preference examples with {sorted(FEATURES)}"
                       f"; {missing} missing (has {sorted(ds.element_spec)}). Use a preference "
                       "task (t5x_lite.data.preferences), e.g. addition_preferences.")
    return self._convert_features(ds, task_feature_lengths)

  def _convert_features(self, ds, task_feature_lengths):
    inputs_width, response_width = self._widths(task_feature_lengths)
    width = inputs_width + response_width

    def decoder(prompt, response):
      prompt = prompt[:inputs_width]
      response = response[:response_width]
      n = tf.shape(prompt)[0]
      targets = _fit(tf.concat([prompt, response], 0), width)
      weights = _fit(tf.concat([tf.zeros_like(prompt), tf.ones_like(response)], 0), width)
      return {"decoder_target_tokens": targets,
              "decoder_input_tokens": tf.concat([[0], targets[:-1]], 0),
              "decoder_loss_weights": weights,
              "decoder_causal_attention": tf.cast(tf.range(width) < n + 1, tf.int32)}

    def encoder_decoder(prompt, response):
      targets = _fit(response, response_width)
      return {"encoder_input_tokens": _fit(prompt, inputs_width),
              "decoder_target_tokens": targets,
              "decoder_input_tokens": tf.concat([[0], targets[:-1]], 0),
              "decoder_loss_weights": tf.cast(targets > 0, tf.int32)}

    def encoder(prompt, response):
      tokens = _fit(tf.concat([prompt[:inputs_width], response[:response_width]], 0), width)
      return {"encoder_input_tokens": tokens, "encoder_target_tokens": tokens,
              "encoder_loss_weights": tf.zeros_like(tokens)}

    fn = {"decoder": decoder, "encoder_decoder": encoder_decoder, "encoder": encoder}[self.family]
    return ds.map(plain(lambda ex: _pair(fn, ex)), num_parallel_calls=AUTOTUNE)
