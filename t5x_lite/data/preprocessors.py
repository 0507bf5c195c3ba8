"""seqio preprocessors for the pretraining objectives and for text-to-text tasks.

All pretraining objectives start the same way: tokenize each document, join the documents into
one stream with EOS between them, and cut the stream into chunks of a fixed raw length
(`concat_and_split`). The raw length is chosen per objective so that every example produced comes
out at (or just under) the requested task feature lengths, and packing therefore wastes nothing.

Random choices use seqio's per-preprocessor seeds (`seqio.map_over_dataset(num_seeds=...)`), so a
fixed `seed` given to `get_dataset` reproduces the exact same examples.

Objectives (task features in parentheses):
  causal_lm        (targets)                      GPT: full-length chunks.
  prefix_lm        (inputs, targets)              chunk split at a random point.
  span_corruption  (inputs, targets)              T5: spans -> sentinels, targets list the spans.
  mlm              (inputs, targets, mlm_weights) BERT: 15% chosen; 80% [MASK], 10% random, 10% kept.
  text_to_text     (inputs, targets)              "<prefix>" + inputs -> targets.
"""
from __future__ import annotations

import functools
from typing import Mapping

import seqio
import tensorflow as tf

from t5x_lite.data import vocabularies

AUTOTUNE = tf.data.AUTOTUNE
# Our dataset functions use no Python control flow on tensors, so AutoGraph conversion would only
# cost tracing time (tens of ms per function, seconds per pipeline).
plain = tf.autograph.experimental.do_not_convert


def _need_lengths(sequence_length, keys, name):
  if not sequence_length or any(sequence_length.get(k) is None for k in keys):
    raise ValueError(f"{name} needs task_feature_lengths with {list(keys)}, "
                     f"got {sequence_length}.")
  return [int(sequence_length[k]) for k in keys]


# ------------------------------------------------------------------------------ shared steps

# Longer documents are tokenized in pieces of about this many bytes (see split_long_documents).
MAX_DOCUMENT_BYTES = 1 << 20


def tokenize_text(ds: tf.data.Dataset, vocabulary: seqio.Vocabulary, key: str = "text",
                  max_document_bytes: int = MAX_DOCUMENT_BYTES) -> tf.data.Dataset:
  """{"text": string} -> {"tokens": int32 [n], "ends_document": bool} (no EOS yet)."""
  ds = split_long_documents(ds, max_document_bytes, key)
  return ds.map(plain(lambda ex: {"tokens": tf.cast(vocabulary.encode_tf(ex[key]), tf.int32),
                                  "ends_document": ex["ends_document"]}),
                num_parallel_calls=AUTOTUNE)


def split_long_documents(ds: tf.data.Dataset, max_bytes: int,
                         key: str = "text") -> tf.data.Dataset:
  """{"text"} -> {"text", "ends_document"}: a document of more than `max_bytes` becomes pieces
  of that many bytes (give or take the 3 bytes a character may span), so that tokenizing one huge document (a 100 MB file of one line)
  never holds all of its token ids at once. Pieces are cut between two UTF-8 characters;
  `concat_and_split` puts EOS only after a document's last piece, so the token stream is the
  document's own (a subword vocabulary may split the one word at each cut differently)."""
  def pieces(ex):
    text = ex[key]
    parts = tf.cond(tf.strings.length(text) > max_bytes,
                    lambda: _cut_pieces(text, max_bytes), lambda: text[None])
    last = tf.equal(tf.range(tf.size(parts)), tf.size(parts) - 1)
    return tf.data.Dataset.from_tensor_slices({key: parts, "ends_document": last})
  return ds.flat_map(plain(pieces))


def _cut_pieces(text: tf.Tensor, max_bytes: int) -> tf.Tensor:
  """[pieces] of a string longer than max_bytes, each cut before a UTF-8 character's first
  byte. TF ops only: a py_function would make the pipeline's iterator uncheckpointable."""
  n = tf.strings.length(text)
  cuts = tf.range(max_bytes, n, max_bytes)

  def continues_a_character(back):  # the byte `back` before each cut is 10xxxxxx
    at = cuts - back
    byte = tf.io.decode_raw(tf.strings.substr(text, at, tf.ones_like(at)), tf.uint8)[:, 0]
    return tf.equal(tf.bitwise.bitwise_and(byte, 0xC0), 0x80)

  # A character has at most 3 continuation bytes, so its first byte is at most 3 back.
  back = tf.where(continues_a_character(0), tf.where(continues_a_character(1), tf.where(
      continues_a_character(2), 3, 2), 1), 0)
  starts = tf.concat([[0], cuts - back], 0)
  ends = tf.concat([cuts - back, [n]], 0)
  return tf.strings.substr(text, starts, ends - starts)


def concat_and_split(ds: tf.data.Dataset, length: int, eos_id: int = vocabularies.EOS_ID,
                     key: str = "tokens") -> tf.data.Dataset:
  """Joins documents (each followed by EOS; a piece of a long document only if it is the
  last, see `split_long_documents`) into one stream and cuts it into `length` chunks.

  A `scan` carries the unfinished tail of the stream from one document to the next, so no tokens
  are lost at document borders (only the final tail, shorter than `length`, is dropped).
  """
  if length < 1:
    raise ValueError(f"chunk length must be positive, got {length}")

  def step(tail, ex):
    eos = tf.fill([tf.cast(ex.get("ends_document", True), tf.int32)], eos_id)
    stream = tf.concat([tail, ex[key], eos], axis=0)
    n = tf.size(stream) // length
    chunks = tf.reshape(stream[:n * length], [n, length])
    return stream[n * length:], {key: chunks}

  ds = ds.scan(tf.zeros([0], tf.int32), plain(step))
  return ds.unbatch()


def _append_eos(x, eos_id=vocabularies.EOS_ID):
  return tf.concat([x, [eos_id]], axis=0)


# ------------------------------------------------------------------------------ causal LM

def causal_lm(dataset, sequence_length, output_features):
  """Documents -> {"targets": chunk of exactly targets-length tokens} (EOS between documents)."""
  (length,) = _need_lengths(sequence_length, ["targets"], "causal_lm")
  ds = tokenize_text(dataset, output_features["targets"].vocabulary)
  ds = concat_and_split(ds, length)
  return ds.map(plain(lambda ex: {"targets": ex["tokens"]}), num_parallel_calls=AUTOTUNE)


# ------------------------------------------------------------------------------ prefix LM

def prefix_lm_chunk_length(inputs_length: int, targets_length: int) -> int:
  """Raw tokens per prefix-LM example.

  Each example becomes inputs (prefix + EOS) and targets (rest + EOS). Using half the combined
  length makes two examples fill one packed decoder-only row exactly, while leaving the split point
  free to fall anywhere that keeps both halves within their own feature lengths.
  """
  if inputs_length < 2 or targets_length < 2:
    raise ValueError(f"prefix_lm needs inputs and targets lengths >= 2, got "
                     f"{inputs_length} and {targets_length}.")
  return max(2, (inputs_length + targets_length) // 2 - 2)


def prefix_lm(dataset, sequence_length, output_features):
  """Documents -> {"inputs": prefix + EOS, "targets": continuation + EOS}, split at random."""
  len_in, len_tgt = _need_lengths(sequence_length, ["inputs", "targets"], "prefix_lm")
  total = prefix_lm_chunk_length(len_in, len_tgt)
  # Split point s (tokens in the prefix) must leave room for EOS on both sides.
  lo, hi = max(1, total - len_tgt + 1), min(len_in - 1, total - 1)
  ds = tokenize_text(dataset, output_features["targets"].vocabulary)
  ds = concat_and_split(ds, total)

  @seqio.map_over_dataset(num_seeds=1)
  @plain
  def split(ex, seed):
    s = tf.random.stateless_uniform([], seed, minval=lo, maxval=hi + 1, dtype=tf.int32)
    tokens = ex["tokens"]
    return {"inputs": _append_eos(tokens[:s]), "targets": _append_eos(tokens[s:])}

  return split(ds)


# ------------------------------------------------------------------------------ span corruption

def _noise_counts(n: int, noise_density: float, mean_span: float) -> tuple[int, int]:
  num_noise = min(max(int(round(n * noise_density)), 1), n - 1)
  num_spans = max(int(round(num_noise / mean_span)), 1)
  return num_noise, min(num_spans, num_noise, n - num_noise)


def span_corruption_lengths(inputs_length: int, targets_length: int | None = None,
                            noise_density: float = 0.15, mean_noise_span_length: float = 3.0,
                            num_sentinels: int | None = None) -> tuple[int, int]:
  """Returns (raw tokens per example, targets length it needs) for a given inputs length.

  Like T5's `random_spans_helper`: picks the longest raw chunk whose corrupted inputs (kept tokens
  + one sentinel per span + EOS) still fit in `inputs_length`, so packed rows come out full.
  Raises ValueError naming the fix when `targets_length` is too small or inputs too short.
  """
  if inputs_length < 4:
    raise ValueError(f"span corruption needs an inputs length of at least 4, got {inputs_length}.")
  inputs_len = lambda n: n - _noise_counts(n, noise_density, mean_noise_span_length)[0] + \
      _noise_counts(n, noise_density, mean_noise_span_length)[1] + 1
  n = 2
  while inputs_len(n + 1) <= inputs_length:
    n += 1
  num_noise, num_spans = _noise_counts(n, noise_density, mean_noise_span_length)
  needed_targets = num_noise + num_spans + 1
  if targets_length is not None and needed_targets > targets_length:
    raise ValueError(
        f"Span corruption with inputs length {inputs_length}, noise density {noise_density} and "
        f"mean span length {mean_noise_span_length} produces targets of {needed_targets} tokens, "
        f"but the targets feature length is {targets_length}. Set TASK_FEATURE_LENGTHS = "
        f"{{'inputs': {inputs_length}, 'targets': {needed_targets}}} (or larger targets).")
  if num_sentinels is not None and num_spans > num_sentinels:
    raise ValueError(
        f"Span corruption with inputs length {inputs_length} needs {num_spans} sentinels but the "
        f"vocabulary has {num_sentinels}; raise get_vocabulary.extra_ids or shorten inputs.")
  return n, needed_targets


def _random_partition(total, parts, seed):
  """Lengths of `parts` non-empty random segments summing to `total` (python ints, parts<=total)."""
  if parts == 1:
    return tf.constant([total], tf.int32)
  # Choose parts-1 distinct cut points in 1..total-1: the top-k of uniform noise is a uniform
  # random subset.
  noise = tf.random.stateless_uniform([total - 1], seed)
  cuts = tf.sort(tf.math.top_k(noise, parts - 1).indices + 1)
  bounds = tf.concat([[0], cuts, [total]], axis=0)
  return bounds[1:] - bounds[:-1]


def random_spans_mask(n: int, noise_density: float, mean_span: float, seed) -> tuple:
  """Boolean noise mask [n] and span index [n]: alternating kept/noise spans, kept span first."""
  num_noise, num_spans = _noise_counts(n, noise_density, mean_span)
  seeds = tf.random.experimental.stateless_split(seed, 2)
  noise_lengths = _random_partition(num_noise, num_spans, seeds[0])
  kept_lengths = _random_partition(n - num_noise, num_spans, seeds[1])
  interleaved = tf.reshape(tf.stack([kept_lengths, noise_lengths], axis=1), [-1])
  segment = tf.repeat(tf.range(2 * num_spans), interleaved)
  return tf.equal(segment % 2, 1), segment // 2


def _collapse_spans(tokens, mask, span, ids: vocabularies.SpecialIds):
  """Replaces each masked span by the sentinel of its span index."""
  first = tf.logical_and(mask, tf.logical_not(tf.concat([[False], mask[:-1]], axis=0)))
  out = tf.where(first, ids.sentinel(span), tokens)
  return tf.boolean_mask(out, tf.logical_or(tf.logical_not(mask), first))


def span_corruption(dataset, sequence_length, output_features, noise_density: float = 0.15,
                    mean_noise_span_length: float = 3.0):
  """T5 span corruption: inputs keep the text with each noise span replaced by one descending
  sentinel (<extra_id_0>, <extra_id_1>, ...); targets list each sentinel followed by its span."""
  len_in, len_tgt = _need_lengths(sequence_length, ["inputs", "targets"], "span_corruption")
  ids = vocabularies.special_ids(output_features["inputs"].vocabulary)
  raw, _ = span_corruption_lengths(len_in, len_tgt, noise_density, mean_noise_span_length,
                                   ids.num_sentinels)
  ds = tokenize_text(dataset, output_features["inputs"].vocabulary)
  ds = concat_and_split(ds, raw)

  @seqio.map_over_dataset(num_seeds=1)
  @plain
  def corrupt(ex, seed):
    tokens = ex["tokens"]
    noise, span = random_spans_mask(raw, noise_density, mean_noise_span_length, seed)
    return {
        "inputs": _append_eos(_collapse_spans(tokens, noise, span, ids)),
        "targets": _append_eos(_collapse_spans(tokens, tf.logical_not(noise), span, ids)),
    }

  return corrupt(ds)


# ------------------------------------------------------------------------------ BERT MLM

def mlm(dataset, sequence_length, output_features, mask_rate: float = 0.15,
        mask_token_rate: float = 0.8, random_token_rate: float = 0.1):
  """BERT masked-LM on full-length chunks (+EOS).

  Of the ordinary (non-special) tokens, exactly round(mask_rate * count) are chosen; a chosen token
  becomes [MASK] with probability `mask_token_rate`, a random ordinary token with probability
  `random_token_rate`, and stays unchanged otherwise.

  Outputs: "inputs" (corrupted), "targets" (original tokens), "mlm_weights" = 1 + chosen. The
  weights are offset by one because seqio's packer measures a sequence by counting its non-zero
  ids; `MLMFeatureConverter` turns them into `encoder_loss_weights` (1 exactly at chosen tokens).
  """
  (length,) = _need_lengths(sequence_length, ["inputs"], "mlm")
  if sequence_length.get("targets", length) != length:
    raise ValueError(f"MLM inputs and targets are aligned: their lengths must match, got "
                     f"{dict(sequence_length)}.")
  if length < 2:
    raise ValueError(f"MLM needs an inputs length of at least 2, got {length}.")
  vocab = output_features["inputs"].vocabulary
  ids = vocabularies.special_ids(vocab)
  mask = vocabularies.mask_id(vocab)
  ds = tokenize_text(dataset, vocab)
  ds = concat_and_split(ds, length - 1)

  @seqio.map_over_dataset(num_seeds=3)
  @plain
  def corrupt(ex, seeds):
    tokens = _append_eos(ex["tokens"])
    regular = (tokens >= ids.regular_start) & (tokens < ids.regular_end)
    count = tf.reduce_sum(tf.cast(regular, tf.float32))
    k = tf.cast(tf.round(count * mask_rate), tf.int32)
    # Rank ordinary tokens by uniform noise; the k lowest are chosen (specials rank last).
    score = tf.where(regular, tf.random.stateless_uniform([length], seeds[0]), 2.0)
    kth = tf.sort(score)[tf.maximum(k - 1, 0)]
    chosen = regular & (score <= kth) & (k > 0)
    u = tf.random.stateless_uniform([length], seeds[1])
    random_tokens = tf.random.stateless_uniform([length], seeds[2], minval=ids.regular_start,
                                                maxval=ids.regular_end, dtype=tf.int32)
    corrupted = tf.where(u < mask_token_rate, mask,
                         tf.where(u < mask_token_rate + random_token_rate, random_tokens, tokens))
    return {
        "inputs": tf.where(chosen, corrupted, tokens),
        "targets": tokens,
        "mlm_weights": 1 + tf.cast(chosen, tf.int32),
    }

  return corrupt(ds)


# ------------------------------------------------------------------------------ text-to-text

def text_to_text(dataset, prefix: str = "", inputs_key: str = "inputs",
                 targets_key: str = "targets"):
  """{inputs_key, targets_key} strings -> {"inputs": prefix + inputs, "targets": targets}."""
  return dataset.map(
      plain(lambda ex: {"inputs": tf.strings.join([prefix, ex[inputs_key]]),
                        "targets": ex[targets_key]}),
      num_parallel_calls=AUTOTUNE)


def tokenize_and_append_eos(dataset, output_features: Mapping[str, seqio.Feature],
                            sequence_length=None):
  """seqio tokenization (keeps "<feature>_pretokenized" copies for metrics), then EOS after trim."""
  ds = seqio.preprocessors.tokenize(dataset, output_features)
  return seqio.preprocessors.append_eos_after_trim(ds, sequence_length=sequence_length,
                                                   output_features=output_features)


OBJECTIVES = {
    "clm": causal_lm,
    "prefix_lm": prefix_lm,
    "span_corruption": span_corruption,
    "mlm": mlm,
}


def objective(name: str, **kwargs):
  """The preprocessor for objective `name`, with optional hyper-parameters bound."""
  if name not in OBJECTIVES:
    raise ValueError(f"Unknown objective {name!r}; choose one of {sorted(OBJECTIVES)}.")
  return functools.partial(OBJECTIVES[name], **kwargs) if kwargs else OBJECTIVES[name]
