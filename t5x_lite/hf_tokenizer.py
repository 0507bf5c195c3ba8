"""Hugging Face tokenizers (`tokenizer.json`) as t5x_lite vocabularies, without TensorFlow.

    vocab = vocabulary.build("hf_tokenizer", tokenizer_path="/hf/gpt2")   # dir or tokenizer.json
    vocab.encode("def f(x):")        # = AutoTokenizer(...)("def f(x):", add_special_tokens=False)
    vocab.encode_prompt("Hello")     # = AutoTokenizer(...)("Hello"): with the tokenizer's BOS etc.
    vocab.decode(ids)                # = tokenizer.decode(ids up to EOS, skip_special_tokens=True)

Any tokenizer the `tokenizers` library reads works: GPT-2 byte-level BPE, BERT WordPiece, the
Unigram/BPE of LLaMA and T5. Its ids are kept as they are (a converted checkpoint expects them),
so the seqio layout of `t5x_lite.vocabulary` (PAD 0, EOS 1) does not apply: the special tokens are
the ones tokenizer_config.json names (eos_token, bos_token, pad_token, unk_token, mask_token; BERT's
sep_token ends a sequence and cls_token starts one), and T5's `<extra_id_i>` are its sentinels.

`import_tokenizer` is the part of tools/convert_checkpoint.py --from_hf that copies the tokenizer
files next to the converted parameters and records the checkpoint's special token ids in its
model.gin; `checkpoint_ids` reads them back for `t5x_lite.load`.
"""
from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import shutil
import warnings
from typing import Optional

import numpy as np
from tokenizers import Tokenizer

from t5x_lite import vocabulary

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
# What save_pretrained writes for a tokenizer; copied with a converted checkpoint.
TOKENIZER_FILES = (TOKENIZER_JSON, TOKENIZER_CONFIG, "special_tokens_map.json",
                   "tokenizer.model", "spiece.model", "vocab.json", "merges.txt", "vocab.txt",
                   "added_tokens.json", "generation_config.json")
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token", "mask_token", "cls_token",
                  "sep_token")
_SENTINEL = re.compile(r"^▁?<extra_id_(\d+)>$")


class HfTokenizerVocabulary(vocabulary.Vocabulary):
  """A `tokenizers` tokenizer with transformers' encode/decode and its special tokens."""

  kind = "hf_tokenizer"

  def __init__(self, path: str):
    self.path = path
    self.tokenizer_file = path if os.path.isfile(path) else os.path.join(path, TOKENIZER_JSON)
    if not os.path.isfile(self.tokenizer_file):
      raise FileNotFoundError(
          f"No {TOKENIZER_JSON} at {path!r}; point get_vocabulary.tokenizer_path at the file or "
          "at a directory where save_pretrained wrote one (or train one with "
          "tools/train_vocab.py --kind bpe|wordpiece|unigram).")
    try:
      self.tokenizer = Tokenizer.from_file(self.tokenizer_file)
    except Exception as e:  # pylint: disable=broad-except  # tokenizers raises plain Exceptions
      raise ValueError(
          f"{self.tokenizer_file!r} is not a tokenizers tokenizer.json ({e}).") from None
    config_file = os.path.join(os.path.dirname(self.tokenizer_file), TOKENIZER_CONFIG)
    self.config = {}
    if os.path.isfile(config_file):
      with open(config_file) as f:
        self.config = json.load(f)
    self.special = {name: self._id(self.config.get(name)) for name in SPECIAL_TOKENS}
    # transformers skips the clean-up for BPE models, where it would eat spaces before punctuation.
    self.clean_up_spaces = bool(self.config.get("clean_up_tokenization_spaces")) and (
        type(self.tokenizer.model).__name__ != "BPE")
    sentinels = {}
    for token, i in self.tokenizer.get_vocab(with_added_tokens=True).items():
      match = _SENTINEL.match(token)
      if match:
        sentinels[int(match.group(1))] = i
    size = self.tokenizer.get_vocab_size(with_added_tokens=True)
    # Sentinel i must be vocab_size - 1 - i, as span corruption writes them; T5's are.
    n = len(sentinels) if all(sentinels.get(i) == size - 1 - i
                              for i in range(len(sentinels))) else 0
    super().__init__(n)

  def _id(self, token) -> Optional[int]:
    if isinstance(token, dict):  # an AddedToken as tokenizer_config.json serialises it
      token = token.get("content")
    return self.tokenizer.token_to_id(token) if isinstance(token, str) else None

  @property
  def eos_id(self) -> Optional[int]:
    return self.special["eos_token"] if self.special["eos_token"] is not None else (
        self.special["sep_token"])

  @property
  def bos_id(self) -> Optional[int]:
    return self.special["bos_token"] if self.special["bos_token"] is not None else (
        self.special["cls_token"])

  @property
  def unk_id(self) -> Optional[int]:
    return self.special["unk_token"]

  @property
  def pad_id(self) -> int:
    # t5x_lite batches pad with 0 whatever the tokenizer says; this is the tokenizer's own.
    pad = self.special["pad_token"]
    return vocabulary.PAD_ID if pad is None else pad

  @property
  def mask_id(self) -> Optional[int]:
    return self.special["mask_token"]

  @property
  def _base_vocab_size(self) -> int:
    return self.tokenizer.get_vocab_size(with_added_tokens=True)

  @property
  def vocab_size(self) -> int:
    return self._base_vocab_size  # the sentinels are tokens of the tokenizer

  def special_token_ids(self) -> list[int]:
    """Ids of every special token (named ones and added tokens marked special)."""
    added = [i for i, token in self.tokenizer.get_added_tokens_decoder().items() if token.special]
    return sorted({i for i in list(self.special.values()) + added if i is not None})

  def encode(self, s) -> list[int]:
    s = s.decode() if isinstance(s, bytes) else s
    return self.tokenizer.encode(s, add_special_tokens=False).ids

  def encode_prompt(self, s: str) -> list[int]:
    """The ids transformers feeds a model for `s`: with the special tokens its post-processor
    adds (LLaMA's BOS, BERT's [CLS] ... [SEP], T5's EOS; none for GPT-2)."""
    return self.tokenizer.encode(s, add_special_tokens=True).ids

  def decode(self, ids) -> str:
    """Text of `ids` up to the first EOS, special tokens skipped, as transformers decodes; ids
    outside the tokenizer (a model's padded vocabulary) are dropped."""
    ids = np.asarray(ids, np.int64)
    if ids.ndim != 1:
      raise ValueError(f"decode takes one sequence of ids (1-D); got shape {ids.shape}.")
    ids = [i for i in ids.tolist() if 0 <= i < self.vocab_size]
    if self.eos_id is not None and self.eos_id in ids:
      ids = ids[:ids.index(self.eos_id)]
    return self._decode(ids)

  def _decode(self, ids: list[int]) -> str:
    text = self.tokenizer.decode(ids, skip_special_tokens=True)
    return _clean_up_tokenization(text) if self.clean_up_spaces else text

  def _content(self) -> bytes:
    """What the fingerprint covers: the tokenizer and its named special tokens, not its path."""
    specials = json.dumps(self.special, sort_keys=True)
    return (self.tokenizer.to_str() + specials + str(self.clean_up_spaces)).encode()

  def _init_args(self) -> tuple:
    return (self.path,)

  def __str__(self):
    digest = hashlib.md5(self._content()).hexdigest()
    return f"HfTokenizerVocabulary(file={self.tokenizer_file}, md5={digest})"

  __repr__ = __str__


def _clean_up_tokenization(text: str) -> str:
  """transformers' `clean_up_tokenization` (WordPiece tokenizers with
  clean_up_tokenization_spaces=true): no space before punctuation and English contractions."""
  for old, new in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
                   (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"),
                   (" 're", "'re")):
    text = text.replace(old, new)
  return text


# ----------------------------------------------------------------------- converted checkpoints

# model.gin macros of a converted checkpoint (gin macros need no configurable, so models.from_gin
# parses them without importing the input pipeline).
ID_MACROS = {"EOS_ID": "eos_token_id", "BOS_ID": "bos_token_id", "PAD_ID": "pad_token_id",
             "DECODER_START_ID": "decoder_start_token_id"}
TOKENIZER_MACRO = "HF_TOKENIZER"


def import_tokenizer(hf_dir: str, out_dir: str, hf_config: dict) -> str:
  """Copies the tokenizer files found in `hf_dir` into `out_dir` and returns the model.gin lines
  recording the tokenizer and the checkpoint's special token ids (generation_config.json's,
  else config.json's, else the tokenizer's)."""
  os.makedirs(out_dir, exist_ok=True)
  for name in TOKENIZER_FILES:
    if os.path.isfile(os.path.join(hf_dir, name)):
      shutil.copyfile(os.path.join(hf_dir, name), os.path.join(out_dir, name))
  slow = {"tokenizer.model", "spiece.model", "vocab.json", "vocab.txt"}
  if not os.path.isfile(os.path.join(out_dir, TOKENIZER_JSON)) and any(
      os.path.isfile(os.path.join(hf_dir, name)) for name in slow):
    _write_tokenizer_json(hf_dir, out_dir)
  vocab = None
  if os.path.isfile(os.path.join(out_dir, TOKENIZER_JSON)):
    vocab = HfTokenizerVocabulary(out_dir)
  else:
    warnings.warn(
        f"{hf_dir!r} has no tokenizer ({TOKENIZER_JSON}): {out_dir!r} is converted without one, "
        "and t5x_lite.load cannot turn text into its ids. Save the tokenizer there with "
        f"AutoTokenizer.from_pretrained(...).save_pretrained({out_dir!r}), or pass "
        "t5x_lite.load(..., vocabulary=).", stacklevel=2)
  ids = dict(hf_config)
  generation = os.path.join(hf_dir, "generation_config.json")
  if os.path.isfile(generation):
    with open(generation) as f:
      ids.update({k: v for k, v in json.load(f).items() if v is not None})
  from_vocab = {"eos_token_id": vocab and vocab.eos_id, "bos_token_id": vocab and vocab.bos_id,
                "pad_token_id": vocab and vocab.special["pad_token"]}
  if ids.get("is_encoder_decoder") and ids.get("decoder_start_token_id") is None:
    ids["decoder_start_token_id"] = ids.get("pad_token_id")  # T5's decoder starts at its PAD
  lines = ["", "# The Hugging Face tokenizer (copied next to params/) and special token ids of the",
           "# converted checkpoint: t5x_lite.load encodes, decodes and stops with them.",
           f"{TOKENIZER_MACRO} = {TOKENIZER_JSON if vocab else None!r}"]
  for macro, key in ID_MACROS.items():
    value = ids.get(key)
    if value is None:
      value = from_vocab.get(key)
    if isinstance(value, list):  # several EOS ids (LLaMA 3): decoding stops at one, the first
      value = value[0] if value else None
    lines.append(f"{macro} = {value!r}")
  return "\n".join(lines) + "\n"


def _write_tokenizer_json(hf_dir: str, out_dir: str) -> None:
  """A tokenizer.json from the slow-tokenizer files (vocab.txt, spiece.model, ...) alone, through
  transformers' converters, when transformers is installed (it reads local files only)."""
  try:
    import transformers  # pylint: disable=g-import-not-at-top
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    tokenizer.backend_tokenizer.save(os.path.join(out_dir, TOKENIZER_JSON))
    tokenizer.save_pretrained(out_dir)  # its tokenizer_config.json names the special tokens
  except Exception:  # pylint: disable=broad-except  # no tokenizer files, or none it converts
    return


def checkpoint_ids(checkpoint_dir: str) -> dict:
  """The macros `import_tokenizer` wrote into a checkpoint's model.gin ({} if none)."""
  path = os.path.join(checkpoint_dir, "model.gin")
  if not os.path.isfile(path):
    return {}
  with open(path) as f:
    text = f.read()
  names = "|".join([TOKENIZER_MACRO] + list(ID_MACROS))
  return {name: ast.literal_eval(value) for name, value in
          re.findall(rf"^({names})\s*=\s*(.+?)\s*$", text, re.MULTILINE)}


# ------------------------------------------------------------------------------ training

TRAINABLE = ("bpe", "wordpiece", "unigram")
# t5x_lite's id layout (t5x_lite.vocabulary), so the tokenizer serves every task as it is:
# batches pad with 0, seqio appends EOS 1, MLM writes [MASK], sentinels sit at the top.
LAYOUT = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>",
          "mask_token": vocabulary.MASK_PIECE}


def train_tokenizer(kind: str, sentences, vocab_size: int, out_dir: str,
                    extra_ids: int = vocabulary.DEFAULT_EXTRA_IDS) -> str:
  """Trains a `tokenizers` tokenizer on an iterator of strings and writes `out_dir`/tokenizer.json
  (and a tokenizer_config.json naming its special tokens, which transformers also reads).

  kind: "bpe" (GPT-2's byte-level BPE: no text is unknown, whitespace kept), "wordpiece" (BERT's,
  cased: whitespace is not kept) or "unigram" (SentencePiece's algorithm, over the same bytes
  as "bpe").
  Ids: <pad> 0, </s> 1, <unk> 2, [MASK] 3, then the learned tokens, then `extra_ids` sentinels
  <extra_id_i> at vocab_size - 1 - i (as T5's). Returns the tokenizer.json path.
  """
  # pylint: disable-next=g-import-not-at-top
  from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers
  specials = list(LAYOUT.values())
  common = dict(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
  if kind == "bpe":
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), **common)
  elif kind == "wordpiece":
    tok = Tokenizer(models.WordPiece(unk_token=LAYOUT["unk_token"]))
    tok.normalizer = normalizers.BertNormalizer(lowercase=False, strip_accents=False)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(**common)
  elif kind == "unigram":
    # Over bytes as the BPE is, so that no text is unknown and whitespace is kept.
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.UnigramTrainer(unk_token=LAYOUT["unk_token"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      **common)
  else:
    raise ValueError(f"Unknown tokenizer kind {kind!r}; choose one of {TRAINABLE}.")
  tok.train_from_iterator(sentences, trainer)
  sentinels = [f"<extra_id_{i}>" for i in reversed(range(extra_ids))]
  tok.add_special_tokens(sentinels)
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, TOKENIZER_JSON)
  tok.save(path)
  with open(os.path.join(out_dir, TOKENIZER_CONFIG), "w") as f:
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", **LAYOUT,
               "extra_special_tokens": sentinels[::-1]}, f, indent=2)
  vocab = HfTokenizerVocabulary(out_dir)
  got = (vocab.pad_id, vocab.eos_id, vocab.unk_id, vocab.mask_id, vocab.extra_ids)
  if got != (vocabulary.PAD_ID, vocabulary.EOS_ID, vocabulary.UNK_ID, 3, extra_ids):
    raise AssertionError(f"{path}: special ids {got} are not t5x_lite's layout.")
  return path
