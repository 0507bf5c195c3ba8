"""Vocabularies: the zero-setup byte vocabulary and SentencePiece models from tools/train_vocab.py.

Tasks are registered at import time, but the vocabulary is a gin choice made later (after the
training job has parsed its gin files). `DEFAULT_VOCABULARY` bridges the two: it is a seqio
`Vocabulary` that asks the gin-configurable `get_vocabulary()` which vocabulary to use every time it
is used, so all registered tasks follow the current gin binding.

Id layout shared by both kinds (seqio / T5 convention):
  0 = PAD, 1 = EOS, 2 = UNK, then ordinary tokens, then `extra_ids` sentinels at the very top:
  sentinel i (T5's `<extra_id_i>`) is `vocab_size - 1 - i`.
  [MASK] (for BERT MLM): in a SentencePiece model trained by tools/train_vocab.py it is the
  user-defined piece "[MASK]" (id 3); in the byte vocabulary it is one extra id reserved just below
  the sentinels (id 259), which is why the byte vocabulary holds `extra_ids + 1` extra ids.
"""
from __future__ import annotations

import dataclasses
import functools
import os

import gin
import seqio

PAD_ID = 0
EOS_ID = 1
MASK_PIECE = "[MASK]"
DEFAULT_EXTRA_IDS = 100  # as many sentinels as T5 has


@functools.lru_cache(maxsize=None)
def _build(kind: str, spm_path: str | None, extra_ids: int) -> seqio.Vocabulary:
  if kind == "byte":
    # One more extra id than sentinels: the lowest one is [MASK] (see module docstring).
    return seqio.ByteVocabulary(extra_ids=extra_ids + 1)
  if kind == "sentencepiece":
    if not spm_path:
      raise ValueError(
          "get_vocabulary.kind='sentencepiece' needs get_vocabulary.spm_path, e.g. "
          "--gin.get_vocabulary.spm_path=\"'/path/spm.model'\" (train one with tools/train_vocab.py).")
    if not os.path.exists(spm_path):
      raise FileNotFoundError(
          f"SentencePiece model {spm_path!r} does not exist; train one with "
          "`python tools/train_vocab.py --output_prefix ...` or use get_vocabulary.kind='byte'.")
    vocab = seqio.SentencePieceVocabulary(spm_path, extra_ids=extra_ids)
    if vocab.pad_id != PAD_ID or vocab.eos_id != EOS_ID:
      raise ValueError(
          f"{spm_path}: pad/eos ids are {vocab.pad_id}/{vocab.eos_id}, but t5x_lite needs 0/1. "
          "Retrain it with tools/train_vocab.py (it sets --pad_id=0 --eos_id=1).")
    return vocab
  raise ValueError(f"Unknown vocabulary kind {kind!r}; choose 'byte' or 'sentencepiece'.")


@gin.configurable
def get_vocabulary(kind: str = "byte", spm_path: str | None = None,
                   extra_ids: int = DEFAULT_EXTRA_IDS) -> seqio.Vocabulary:
  """Returns the concrete vocabulary selected by gin (cached, so cheap to call often).

  Args:
    kind: "byte" (seqio.ByteVocabulary, needs no files) or "sentencepiece".
    spm_path: a SentencePiece model, e.g. written by tools/train_vocab.py.
    extra_ids: number of T5 sentinels appended at the top of the vocabulary.
  """
  return _build(kind, spm_path, int(extra_ids))


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
    return isinstance(other, GinVocabulary) or self.resolved == other

  def __hash__(self):
    return hash("t5x_lite.GinVocabulary")

  def __str__(self):
    return f"GinVocabulary({self.resolved})"


DEFAULT_VOCABULARY = GinVocabulary()


def _concrete(vocab: seqio.Vocabulary) -> seqio.Vocabulary:
  return vocab.resolved if isinstance(vocab, GinVocabulary) else vocab


@dataclasses.dataclass(frozen=True)
class SpecialIds:
  """The ids preprocessors need beyond pad/eos.

  Attributes:
    mask_id: BERT [MASK] id, or None if the vocabulary has none.
    num_sentinels: how many T5 sentinels exist (sentinel i = vocab_size - 1 - i).
    regular_start, regular_end: [start, end) holds every ordinary token (no pad/eos/unk/mask,
      no sentinels); MLM draws its random replacements from it and only chooses tokens in it.
    vocab_size: total size including sentinels.
  """
  mask_id: int | None
  num_sentinels: int
  regular_start: int
  regular_end: int
  vocab_size: int

  def sentinel(self, i):
    """Id of sentinel i (works on ints and tensors)."""
    return self.vocab_size - 1 - i


def special_ids(vocab: seqio.Vocabulary) -> SpecialIds:
  vocab = _concrete(vocab)
  if isinstance(vocab, seqio.ByteVocabulary):
    base = vocab._base_vocab_size  # pylint: disable=protected-access  # 3 specials + 256 bytes
    return SpecialIds(mask_id=base, num_sentinels=vocab.extra_ids - 1, regular_start=3,
                      regular_end=base, vocab_size=vocab.vocab_size)
  if isinstance(vocab, seqio.SentencePieceVocabulary):
    sp = vocab.tokenizer
    mask = sp.piece_to_id(MASK_PIECE)
    mask = None if mask == sp.unk_id() else mask
    specials = [i for i in (vocab.pad_id, vocab.eos_id, vocab.unk_id, mask) if i is not None]
    return SpecialIds(mask_id=mask, num_sentinels=vocab.extra_ids,
                      regular_start=max(specials) + 1,
                      regular_end=vocab.vocab_size - vocab.extra_ids,
                      vocab_size=vocab.vocab_size)
  raise TypeError(f"t5x_lite does not know the special ids of {type(vocab).__name__}.")


def mask_id(vocab: seqio.Vocabulary | None = None) -> int:
  """[MASK] id of `vocab` (default: the gin-selected one); what EncoderFeatureConverter needs."""
  ids = special_ids(vocab or DEFAULT_VOCABULARY)
  if ids.mask_id is None:
    raise ValueError(
        f"Vocabulary {_concrete(vocab or DEFAULT_VOCABULARY)} has no {MASK_PIECE!r} piece, so it "
        "cannot be used for MLM. Train one with tools/train_vocab.py (it adds [MASK]) or use the "
        "byte vocabulary.")
  return ids.mask_id
