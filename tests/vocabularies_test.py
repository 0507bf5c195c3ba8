"""t5x_lite/data/vocabularies.py: the byte default, SentencePiece through gin, special ids."""
import gin
import pytest
import seqio
import sentencepiece as spm

from t5x_lite.data import vocabularies

TEXT = ["def add(a, b):", "    return a + b", "class Point:", "    x: int = 0",
        "print('hello world')", "for i in range(10):", "    total += i * 2"] * 20


def train_spm(prefix, **overrides):
  options = dict(sentence_iterator=iter(TEXT), model_prefix=str(prefix), vocab_size=300,
                 hard_vocab_limit=False, byte_fallback=True, pad_id=0, eos_id=1, unk_id=2,
                 bos_id=-1, user_defined_symbols=["[MASK]"], minloglevel=2)
  options.update(overrides)
  spm.SentencePieceTrainer.train(**options)
  return str(prefix) + ".model"


def test_byte_vocabulary_is_the_default_with_mask_below_the_sentinels():
  vocab = vocabularies.get_vocabulary()
  assert isinstance(vocab, seqio.ByteVocabulary) and vocab.vocab_size == 360
  ids = vocabularies.special_ids(vocab)
  assert (ids.mask_id, ids.num_sentinels, ids.regular_start, ids.regular_end) == (259, 100, 3, 259)
  assert ids.sentinel(0) == 359 and ids.sentinel(99) == 260  # <extra_id_0> is the top id
  assert vocabularies.mask_id() == 259
  assert vocabularies.DEFAULT_VOCABULARY.encode("hi") == vocab.encode("hi") == [107, 108]


def test_gin_switches_every_task_to_a_sentencepiece_model(tmp_path):
  path = train_spm(tmp_path / "spm")
  default = vocabularies.DEFAULT_VOCABULARY
  gin.parse_config(["get_vocabulary.kind = 'sentencepiece'", f"get_vocabulary.spm_path = '{path}'",
                    "get_vocabulary.extra_ids = 10"])
  vocab = vocabularies.get_vocabulary()
  assert isinstance(vocab, seqio.SentencePieceVocabulary)
  assert default.vocab_size == vocab.vocab_size <= 310  # seqio appended 10 sentinels
  assert vocab.tokenizer.id_to_piece(vocab.vocab_size - 1) == "▁<extra_id_0>"
  assert default == vocab and default.eos_id == 1 and default.pad_id == 0
  ids = vocabularies.special_ids(default)
  assert ids.mask_id == vocab.tokenizer.piece_to_id("[MASK]") == 3
  assert ids.regular_start == 4 and ids.regular_end == vocab.vocab_size - 10
  assert ids.num_sentinels == 10
  text = "return x ± 1"  # "±" is not in the training text: byte fallback
  assert default.decode(default.encode(text)) == text
  assert default.decode_tf(default.encode_tf(text)).numpy().decode() == text


def test_bad_vocabulary_settings_say_how_to_fix_them(tmp_path):
  with pytest.raises(ValueError, match="needs get_vocabulary.spm_path"):
    vocabularies.get_vocabulary(kind="sentencepiece")
  with pytest.raises(FileNotFoundError, match="tools/train_vocab.py"):
    vocabularies.get_vocabulary(kind="sentencepiece", spm_path=str(tmp_path / "missing.model"))
  with pytest.raises(ValueError, match="choose 'byte', 'sentencepiece' or 'hf_tokenizer'"):
    vocabularies.get_vocabulary(kind="wordpiece")
  no_mask = train_spm(tmp_path / "nomask", user_defined_symbols=[])
  vocab = vocabularies.get_vocabulary(kind="sentencepiece", spm_path=no_mask)
  assert vocabularies.special_ids(vocab).mask_id is None
  with pytest.raises(ValueError, match=r"has no '\[MASK\]' piece"):
    vocabularies.mask_id(vocab)
  default_ids = train_spm(tmp_path / "defaults", pad_id=-1, eos_id=2, unk_id=0, bos_id=1)
  with pytest.raises(ValueError, match="needs 0/1"):
    vocabularies.get_vocabulary(kind="sentencepiece", spm_path=default_ids)
