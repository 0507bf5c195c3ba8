"""seqio vocabularies for the input pipeline: the byte default, SentencePiece and Hugging Face
tokenizers (tokenizer.json) through gin.

Tasks are registered at import time, but the vocabulary is a gin choice made later (after the
training job has parsed its gin files). `DEFAULT_VOCABULARY` bridges the two: it is a seqio
`Vocabulary` that asks the gin-configurable `get_vocabulary()` which vocabulary to use every time it
is used, so all registered tasks follow the current gin binding.

Each seqio vocabulary here is made from the TensorFlow-free one `t5x_lite.vocabulary.build` returns
(same ids, and what `t5x_lite.load` uses); that module holds the id layout (PAD/EOS/UNK, [MASK],
sentinels) and `special_ids`, re-exported here for the preprocessors.
"""
from __future__ import annotations

import functools

import gin
import numpy as np
import seqio
import tensorflow as tf

from t5x_lite import vocabulary as vocab_lib
from t5x_lite.vocabulary import DEFAULT_EXTRA_IDS, EOS_ID, MASK_PIECE, PAD_ID  # noqa: F401
from t5x_lite.vocabulary import SpecialIds, special_ids  # noqa: F401


@functools.lru_cache(maxsize=None)
def _build(kind: str, spm_path: str | None, extra_ids: int,
           tokenizer_path: str | None) -> seqio.Vocabulary:
  return as_seqio(vocab_lib.build(kind, spm_path, extra_ids, tokenizer_path))


def as_seqio(vocab: vocab_lib.Vocabulary) -> seqio.Vocabulary:
  """The seqio vocabulary (with the `encode_tf` tasks need) giving the same ids as `vocab`."""
  if isinstance(vocab, vocab_lib.ByteVocabulary):
    return seqio.ByteVocabulary(extra_ids=vocab.extra_ids)
  if vocab.kind == "hf_tokenizer":
    return HfTokenizerSeqioVocabulary(vocab)
  return seqio.SentencePieceVocabulary(vocab.sentencepiece_model_file, extra_ids=vocab.extra_ids)


@gin.configurable
def get_vocabulary(kind: str = "byte", spm_path: str | None = None,
                   extra_ids: int = DEFAULT_EXTRA_IDS,
                   tokenizer_path: str | None = None) -> seqio.Vocabulary:
  """Returns the concrete vocabulary selected by gin (cached, so cheap to call often).

  Args:
    kind: "byte" (seqio.ByteVocabulary, needs no files), "sentencepiece" or "hf_tokenizer".
    spm_path: a SentencePiece model, e.g. written by tools/train_vocab.py.
    extra_ids: number of T5 sentinels appended at the top of the vocabulary (a Hugging Face
      tokenizer has its own).
    tokenizer_path: for "hf_tokenizer", a tokenizer.json or the directory holding one.
  """
  return _build(kind, spm_path, int(extra_ids), tokenizer_path)


class HfTokenizerSeqioVocabulary(seqio.Vocabulary):
  """A Hugging Face tokenizer (t5x_lite.hf_tokenizer) for seqio tasks: the TensorFlow ops run
  the `tokenizers` library through tf.py_function (it has no TensorFlow kernels)."""

  def __init__(self, vocab):
    super().__init__(extra_ids=0)  # the tokenizer's sentinels are its own tokens
    self.resolved = vocab  # what vocabulary.describe / special_ids read

  @property
  def eos_id(self):
    return self.resolved.eos_id

  @property
  def pad_id(self):
    return self.resolved.pad_id

  @property
  def unk_id(self):
    return self.resolved.unk_id

  @property
  def bos_id(self):
    return self.resolved.bos_id

  @property
  def _base_vocab_size(self):
    return self.resolved.vocab_size

  @property
  def vocab_size(self):
    return self.resolved.vocab_size

  def _encode(self, s):
    return self.resolved.encode(s)

  def _decode(self, ids):
    return self.resolved.decode(ids)

  def decode(self, ids):
    return self.resolved.decode(ids)

  def _encode_tf(self, s):
    """Ids [n] of one string (a scalar tf.string, as seqio's tokenize preprocessor gives)."""
    ids = tf.py_function(lambda t: np.asarray(self.resolved.encode(t.numpy()), np.int32), [s],
                         tf.int32)
    ids.set_shape([None])
    return ids

  def decode_tf(self, ids):
    """Text of ids [n] (a scalar) or [b, n] (one string per row)."""
    def decode(array):
      array = array.numpy()
      if array.ndim == 1:
        return self.resolved.decode(array).encode()
      return np.asarray([self.resolved.decode(row).encode() for row in array], object)
    text = tf.py_function(decode, [ids], tf.string)
    text.set_shape(ids.shape[:-1])
    return text

  def _decode_tf(self, ids):
    return self.decode_tf(ids)

  def __eq__(self, other):
    return vocab_lib.same(self, other)

  def __hash__(self):
    return hash(self.resolved)

  def __str__(self):
    return f"HfTokenizerSeqioVocabulary({self.resolved})"


def check_vocabulary_fits(model_vocab_size: int) -> None:
  """Refuses a model too small for the gin-selected vocabulary, naming both fixes."""
  vocab_size = get_vocabulary().vocab_size
  if vocab_size > model_vocab_size:
    raise ValueError(
        f"The vocabulary has {vocab_size} ids but the model's TransformerConfig.vocab_size is "
        f"{model_vocab_size}; set --gin.TransformerConfig.vocab_size={vocab_size} (or larger), "
        "or choose a smaller vocabulary (get_vocabulary.kind).")


class GinVocabulary(seqio.Vocabulary):
  """A seqio Vocabulary that delegates to whatever `get_vocabulary()` returns right now."""

  def __init__(self):  # pylint: disable=super-init-not-called
    pass  # no state: everything comes from the gin-selected vocabulary

  @property
  def resolved(self) -> seqio.Vocabulary:
    return get_vocabulary()

  # seqio.Vocabulary API, delegated.
  @property
  def eos_id(self):
    return self.resolved.eos_id

  @property
  def pad_id(self):
    return self.resolved.pad_id

  @property
  def unk_id(self):
    return self.resolved.unk_id

  @property
  def bos_id(self):
    return self.resolved.bos_id

  @property
  def extra_ids(self):
    return self.resolved.extra_ids

  @property
  def vocab_size(self):
    return self.resolved.vocab_size

  @property
  def _base_vocab_size(self):
    return self.resolved._base_vocab_size  # pylint: disable=protected-access

  def encode(self, s):
    return self.resolved.encode(s)

  def decode(self, ids):
    return self.resolved.decode(ids)

  def encode_tf(self, s):
    return self.resolved.encode_tf(s)

  def decode_tf(self, ids):
    return self.resolved.decode_tf(ids)

  def _encode(self, s):
    return self.resolved.encode(s)

  def _decode(self, ids):
    return self.resolved.decode(ids)

  def _encode_tf(self, s):
    return self.resolved.encode_tf(s)

  def _decode_tf(self, ids):
    return self.resolved.decode_tf(ids)

  def __eq__(self, other):
    return isinstance(other, GinVocabulary) or vocab_lib.same(self.resolved, other)

  def __hash__(self):
    return hash("t5x_lite.GinVocabulary")

  def __str__(self):
    return f"GinVocabulary({self.resolved})"


DEFAULT_VOCABULARY = GinVocabulary()


def mask_id(vocab: seqio.Vocabulary | None = None) -> int:
  """[MASK] id of `vocab` (default: the gin-selected one); what EncoderFeatureConverter needs."""
  return vocab_lib.mask_id(vocab or DEFAULT_VOCABULARY)
