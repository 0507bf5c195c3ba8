"""Vocabularies without TensorFlow: text <-> ids for the model side (`t5x_lite.load`, inference).

    vocab = vocabulary.build("sentencepiece", "/data/spm.model", extra_ids=100)
    vocab.encode("def f(x):")            # the ids seqio's SentencePieceVocabulary gives
    vocab.decode(ids)                    # up to the first EOS, as seqio decodes
    vocabulary.special_ids(vocab).mask_id

The input pipeline tokenizes with seqio's vocabularies (tasks need their `encode_tf`, and seqio
imports TensorFlow). `t5x_lite.data.vocabularies` builds those from the ones built here, so both
give the same ids, and this module alone holds the id layout:

  0 = PAD, 1 = EOS, 2 = UNK, then ordinary tokens, then `extra_ids` sentinels at the very top:
  sentinel i (T5's `<extra_id_i>`) is `vocab_size - 1 - i`.
  [MASK] (for BERT MLM): in a SentencePiece model trained by tools/train_vocab.py it is the
  user-defined piece "[MASK]" (id 3); in the byte vocabulary it is one extra id reserved just below
  the sentinels (id 259), which is why the byte vocabulary holds `extra_ids + 1` extra ids.

A Hugging Face tokenizer (`build("hf_tokenizer", tokenizer_path=...)`, t5x_lite/hf_tokenizer.py)
keeps its own ids and special tokens instead: a converted checkpoint expects them.

`describe(vocab)` fingerprints a vocabulary, ours or seqio's, by kind, content and extra ids (the
record run_dir.py keeps in a run's manifest); two vocabularies are `same` when their records are,
wherever their model files live.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import sys
import threading
from typing import Optional

from google.protobuf import message
import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2  # protobuf only, no TensorFlow

PAD_ID = 0
EOS_ID = 1
UNK_ID = 2
MASK_PIECE = "[MASK]"
DEFAULT_EXTRA_IDS = 100  # as many sentinels as T5 has
_NUM_SPECIAL = 3  # PAD, EOS, UNK
_NUM_BYTES = 256


class Vocabulary:
  """The Python half of seqio.Vocabulary: the same ids, the same decoding clean-up."""

  kind = ""
  pad_id = PAD_ID

  def __init__(self, extra_ids: int = 0):
    self.extra_ids = int(extra_ids or 0)

  @property
  def _base_vocab_size(self) -> int:
    raise NotImplementedError

  @property
  def vocab_size(self) -> int:
    return self._base_vocab_size + self.extra_ids

  def encode(self, s) -> list[int]:
    """Ids of the text `s`, without EOS."""
    raise NotImplementedError

  def _decode(self, ids: list[int]) -> str:
    raise NotImplementedError

  def decode(self, ids) -> str:
    """Text of `ids` up to the first EOS; ids past the base vocabulary read as UNK (as seqio)."""
    ids = np.asarray(ids, np.int64)
    if ids.ndim != 1:
      raise ValueError(f"decode takes one sequence of ids (1-D); got shape {ids.shape}.")
    ids = ids.tolist()
    if self.unk_id is not None:
      ids = [self.unk_id if i >= self._base_vocab_size else i for i in ids]
    if self.eos_id is not None and self.eos_id in ids:
      ids = ids[:ids.index(self.eos_id) + 1]  # seqio keeps the EOS; _decode drops it
    return self._decode(ids)

  def __eq__(self, other):
    return same(self, other)

  def __hash__(self):
    return hash(tuple(sorted(describe(self).items())))

  def __reduce__(self):  # pickles (gin deep-copies arguments) without the C++ tokenizer
    return type(self), self._init_args()

  def _init_args(self) -> tuple:
    return (self.extra_ids,)

  def _content(self) -> bytes:
    """What `describe` fingerprints: whatever decides the ids, never a path."""
    return self.kind.encode()


class ByteVocabulary(Vocabulary):
  """UTF-8 bytes shifted past PAD/EOS/UNK, then `extra_ids` ids (seqio.ByteVocabulary, ByT5)."""

  kind = "byte"
  eos_id = EOS_ID
  unk_id = UNK_ID
  bos_id = None
  _base_vocab_size = _NUM_SPECIAL + _NUM_BYTES

  def encode(self, s) -> list[int]:
    s = s.decode() if isinstance(s, bytes) else s
    return [b + _NUM_SPECIAL for b in s.encode("utf-8")]

  def _decode(self, ids: list[int]) -> str:
    # Special and extra ids are dropped (no "?" as SentencePiece shows), broken UTF-8 skipped.
    data = bytes(i - _NUM_SPECIAL for i in ids if _NUM_SPECIAL <= i < self._base_vocab_size)
    return data.decode("utf-8", errors="ignore")

  def __str__(self):
    return f"ByteVocabulary(extra_ids={self.extra_ids})"

  __repr__ = __str__


_LOAD_LOCK = threading.Lock()  # SentencePiece's LoadFromSerializedProto is not thread-safe


class SentencePieceVocabulary(Vocabulary):
  """A SentencePiece model with `extra_ids` sentinel pieces appended (seqio's layout)."""

  kind = "sentencepiece"

  def __init__(self, sentencepiece_model_file: str, extra_ids: int = 0):
    super().__init__(extra_ids)
    self.sentencepiece_model_file = sentencepiece_model_file
    self.tokenizer = spm.SentencePieceProcessor()
    with open(sentencepiece_model_file, "rb") as f:
      content = f.read()
    try:
      self.sp_model = _with_sentinels(content, self.extra_ids)
      with _LOAD_LOCK:
        self.tokenizer.LoadFromSerializedProto(self.sp_model)
    except (RuntimeError, message.DecodeError) as e:
      raise ValueError(
          f"{sentencepiece_model_file!r} is not a SentencePiece model ({e}); point to the .model "
          "file tools/train_vocab.py writes (not its .vocab), or retrain it.") from None

  @property
  def eos_id(self) -> int:
    return self.tokenizer.eos_id()

  @property
  def unk_id(self) -> int:
    return self.tokenizer.unk_id()

  @property
  def bos_id(self) -> int:
    return self.tokenizer.bos_id()

  @property
  def _base_vocab_size(self) -> int:
    return self.tokenizer.GetPieceSize()  # the sentinels are pieces of the model

  @property
  def vocab_size(self) -> int:
    return self._base_vocab_size

  def encode(self, s) -> list[int]:
    return self.tokenizer.EncodeAsIds(s)

  def _decode(self, ids: list[int]) -> str:
    return self.tokenizer.DecodeIds(ids)

  def _init_args(self) -> tuple:
    return (self.sentencepiece_model_file, self.extra_ids)

  def _content(self) -> bytes:
    return self.sp_model

  def __str__(self):
    return (f"SentencePieceVocabulary(file={self.sentencepiece_model_file}, "
            f"extra_ids={self.extra_ids}, spm_md5={hashlib.md5(self.sp_model).hexdigest()})")

  __repr__ = __str__


def decode_continuation(vocab, prompt_ids, output_ids) -> str:
  """The text `output_ids` add after `prompt_ids`. Decoded with the prompt, not alone: a
  SentencePiece vocabulary drops the space its first piece begins with (the dummy prefix it
  puts before a text), which would take one space off a continuation's first indentation."""
  prompt = vocab.decode(list(prompt_ids))
  whole = vocab.decode(list(prompt_ids) + list(output_ids))
  return whole[len(prompt):] if whole.startswith(prompt) else vocab.decode(list(output_ids))


def _with_sentinels(sp_model: bytes, extra_ids: int) -> bytes:
  """The serialized model with pieces "▁<extra_id_i>" appended, highest i first, as seqio does,
  so that <extra_id_0> is the top id (what T5's span corruption expects)."""
  if not extra_ids:
    return sp_model
  model = sentencepiece_model_pb2.ModelProto.FromString(sp_model)
  for i in reversed(range(extra_ids)):
    model.pieces.add(piece=f"▁<extra_id_{i}>", score=0.0,
                     type=sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED)
  return model.SerializeToString()


# ------------------------------------------------------------------------------ building

GIN_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "gin_configs")


def find_spm(path: str) -> str:
  """`path`, or, when it is relative and not in the working directory, the file of that name
  under gin_configs/ (as gin files are found): 'vocab/stdlib_2k.model' is the quickstart's."""
  shipped = os.path.join(GIN_CONFIGS, path)
  if not os.path.isabs(path) and not os.path.exists(path) and os.path.exists(shipped):
    return shipped
  return path


def build(kind: str = "byte", spm_path: Optional[str] = None,
          extra_ids: int = DEFAULT_EXTRA_IDS, tokenizer_path: Optional[str] = None) -> Vocabulary:
  """The vocabulary `get_vocabulary(kind, spm_path, extra_ids, tokenizer_path)` selects (cached).

  Args:
    kind: "byte" (needs no files), "sentencepiece" or "hf_tokenizer".
    spm_path: a SentencePiece model, e.g. written by tools/train_vocab.py.
    extra_ids: number of T5 sentinels at the top of the vocabulary (not for "hf_tokenizer",
      whose sentinels are its own `<extra_id_i>` tokens).
    tokenizer_path: for "hf_tokenizer": a Hugging Face tokenizer.json, or the directory
      save_pretrained wrote it to (see t5x_lite.hf_tokenizer).
  """
  return _build(kind, spm_path, int(extra_ids), tokenizer_path)


@functools.lru_cache(maxsize=None)
def _build(kind: str, spm_path: Optional[str], extra_ids: int,
           tokenizer_path: Optional[str] = None) -> Vocabulary:
  if kind == "hf_tokenizer":
    if not tokenizer_path:
      raise ValueError(
          "get_vocabulary.kind='hf_tokenizer' needs get_vocabulary.tokenizer_path, e.g. "
          "--gin.get_vocabulary.tokenizer_path=\"'/path/tokenizer.json'\".")
    from t5x_lite import hf_tokenizer  # pylint: disable=g-import-not-at-top  # it imports this
    return hf_tokenizer.HfTokenizerVocabulary(tokenizer_path)
  if kind == "byte":
    # One more extra id than sentinels: the lowest one is [MASK] (see module docstring).
    return ByteVocabulary(extra_ids + 1)
  if kind == "sentencepiece":
    if not spm_path:
      raise ValueError(
          "get_vocabulary.kind='sentencepiece' needs get_vocabulary.spm_path, e.g. "
          "--gin.get_vocabulary.spm_path=\"'/path/spm.model'\" (train one with "
          "tools/train_vocab.py).")
    spm_path = find_spm(spm_path)
    if not os.path.exists(spm_path):
      raise FileNotFoundError(
          f"SentencePiece model {spm_path!r} does not exist (nor under {GIN_CONFIGS}); train one "
          "with `python tools/train_vocab.py --output_prefix ...` or use "
          "get_vocabulary.kind='byte'.")
    vocab = SentencePieceVocabulary(spm_path, extra_ids)
    if vocab.tokenizer.pad_id() != PAD_ID or vocab.eos_id != EOS_ID:  # id 0 pads every batch
      raise ValueError(
          f"{spm_path}: pad/eos ids are {vocab.tokenizer.pad_id()}/{vocab.eos_id}, but t5x_lite "
          "needs 0/1. Retrain it with tools/train_vocab.py (it sets --pad_id=0 --eos_id=1).")
    return vocab
  raise ValueError(f"Unknown vocabulary kind {kind!r}; choose 'byte', 'sentencepiece' or "
                   "'hf_tokenizer'.")


# ------------------------------------------------------------------------------ any vocabulary

def _concrete(vocab):
  # t5x_lite.data's GinVocabulary stands for the gin-selected vocabulary it `resolved` to, and
  # a seqio vocabulary made from one of ours `resolved` to that one.
  while hasattr(vocab, "resolved"):
    vocab = vocab.resolved
  return vocab


def kind_of(vocab) -> str:
  """"byte", "sentencepiece" or "hf_tokenizer", for ours and for seqio's vocabularies."""
  vocab = _concrete(vocab)
  if isinstance(vocab, Vocabulary):
    return vocab.kind
  seqio = sys.modules.get("seqio")  # a seqio vocabulary means seqio is loaded: never import it
  if seqio is not None:
    if isinstance(vocab, seqio.ByteVocabulary):
      return "byte"
    if isinstance(vocab, seqio.SentencePieceVocabulary):
      return "sentencepiece"
  raise TypeError(
      f"t5x_lite knows byte, SentencePiece and Hugging Face tokenizer vocabularies, not "
      f"{type(vocab).__name__}; use "
      "vocabulary.build(...) or a seqio ByteVocabulary / SentencePieceVocabulary.")


def describe(vocab) -> dict:
  """{"kind", "vocab_size", "extra_ids", "sha256"}: equal records map text to equal ids.

  The hash covers the SentencePiece model with its sentinels (not its path: a copied model is the
  same vocabulary) and the number of extra ids; it is the record run_dir.py writes in manifests.
  """
  vocab = _concrete(vocab)
  kind = kind_of(vocab)
  if isinstance(vocab, Vocabulary):
    content = vocab._content()  # pylint: disable=protected-access
  else:  # seqio's own
    content = vocab.sp_model if kind == "sentencepiece" else kind.encode()
  digest = hashlib.sha256(content + f"/extra_ids={vocab.extra_ids}".encode()).hexdigest()
  return {"kind": kind, "vocab_size": int(vocab.vocab_size), "extra_ids": int(vocab.extra_ids),
          "sha256": digest}


def same(a, b) -> bool:
  """Whether two vocabularies (ours or seqio's, in any mix) give the same ids."""
  try:
    return describe(a) == describe(b)
  except TypeError:  # a vocabulary t5x_lite does not know is the same only as itself
    return _concrete(a) is _concrete(b)


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
  mask_id: Optional[int]
  num_sentinels: int
  regular_start: int
  regular_end: int
  vocab_size: int

  def sentinel(self, i):
    """Id of sentinel i (works on ints and tensors)."""
    return self.vocab_size - 1 - i


def special_ids(vocab) -> SpecialIds:
  """The special ids of a byte, SentencePiece or Hugging Face vocabulary, ours or seqio's."""
  vocab = _concrete(vocab)
  if kind_of(vocab) == "hf_tokenizer":
    return _hf_special_ids(vocab)
  if kind_of(vocab) == "byte":
    base = vocab._base_vocab_size  # pylint: disable=protected-access  # 3 specials + 256 bytes
    return SpecialIds(mask_id=base if vocab.extra_ids else None,
                      num_sentinels=max(vocab.extra_ids - 1, 0), regular_start=_NUM_SPECIAL,
                      regular_end=base, vocab_size=vocab.vocab_size)
  mask = vocab.tokenizer.piece_to_id(MASK_PIECE)
  mask = None if mask == vocab.unk_id else mask
  specials = [i for i in (vocab.pad_id, vocab.eos_id, vocab.unk_id, mask) if i is not None]
  return SpecialIds(mask_id=mask, num_sentinels=vocab.extra_ids, regular_start=max(specials) + 1,
                    regular_end=vocab.vocab_size - vocab.extra_ids, vocab_size=vocab.vocab_size)


def _hf_special_ids(vocab) -> SpecialIds:
  # A tokenizer's special tokens sit anywhere (BERT's at the bottom, GPT-2's at the top): the
  # ordinary tokens are the widest run of ids holding none of them, sentinels excluded.
  size = vocab.vocab_size
  top = size - vocab.extra_ids
  specials = [-1] + [i for i in vocab.special_token_ids() if i < top] + [top]
  start, end = max(zip(specials, specials[1:]), key=lambda gap: gap[1] - gap[0])
  return SpecialIds(mask_id=vocab.mask_id, num_sentinels=vocab.extra_ids,
                    regular_start=start + 1, regular_end=end, vocab_size=size)


def mask_id(vocab) -> int:
  """[MASK] id of `vocab`, refusing one that has none."""
  ids = special_ids(vocab)
  if ids.mask_id is None:
    raise ValueError(
        f"Vocabulary {_concrete(vocab)} has no {MASK_PIECE!r} piece, so it cannot be used for "
        "MLM. Train one with tools/train_vocab.py (it adds [MASK]) or use the byte vocabulary.")
  return ids.mask_id
