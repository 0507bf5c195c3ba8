"""t5x_lite/vocabulary.py: without TensorFlow, seqio's ids, decoding and special ids."""
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
import seqio
import sentencepiece as spm

from t5x_lite import vocabulary
from t5x_lite.data import vocabularies

TEXTS = ["", "hello world", "def f(x):\n    return x  # tabs\tand  spaces  ", "  leading",
         "trailing  ", "é ü ß ñ 中文 日本語 🙂👍", "\x00\x01\x07\x1b\x7f control",
         "[MASK] is a piece",
         "a <extra_id_0> b <extra_id_7>c", "12345 + 678 = 999", "\u200b zero width \ufeff bom",
         "x" * 300, "\r\n windows line"]


def _random_texts(rng, n=30):
  alphabet = list("abcdefghij XYZ\n\t.,:()[]<>_") + ["é", "中", "🙂", "\x00", "\x7f", "ß"]
  return ["".join(rng.choice(alphabet, size=rng.integers(0, 40))) for _ in range(n)]


def _random_ids(rng, vocab_size, n=60):
  """Id sequences with EOS, PAD, UNK, sentinels and ids past the vocabulary, anywhere."""
  rows = [[], [1], [0, 0], [5, 1, 6, 7], [vocab_size - 1, 3, vocab_size + 5, 1, 9]]
  for _ in range(n):
    rows.append(rng.integers(0, vocab_size + 20, size=rng.integers(1, 30)).tolist())
  return rows


def _corpus(rng, lines=400):
  words = ["def", "return", "class", "self", "import", "for", "in", "range", "print", "value",
           "x", "y", "naïve", "café", "=", "+", "(", ")", ":", "    "]
  return [" ".join(rng.choice(words, size=rng.integers(3, 12))) for _ in range(lines)]


def _train(prefix, **overrides):
  """A tiny model, with tools/train_vocab.py's settings unless overridden."""
  options = dict(sentence_iterator=iter(_corpus(np.random.default_rng(0))),
                 model_prefix=str(prefix), vocab_size=400, hard_vocab_limit=False,
                 byte_fallback=True, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                 user_defined_symbols=[vocabulary.MASK_PIECE], normalization_rule_name="identity",
                 remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
                 split_digits=True, minloglevel=2, num_threads=1)
  options.update(overrides)
  spm.SentencePieceTrainer.train(**options)
  return str(prefix) + ".model"


@pytest.fixture(scope="module")
def spm_paths(tmp_path_factory):
  """One model as tools/train_vocab.py trains them, one with SentencePiece's defaults (NFKC,
  whitespace clean-up, no byte fallback: unknown characters become UNK)."""
  root = tmp_path_factory.mktemp("spm")
  return {"train_vocab": _train(root / "train_vocab"),
          "defaults": _train(root / "defaults", vocab_size=120, byte_fallback=False,
                             normalization_rule_name="nmt_nfkc", remove_extra_whitespaces=True,
                             allow_whitespace_only_pieces=False, split_digits=False)}


def _assert_same_behaviour(ours, theirs, seed=0):
  rng = np.random.default_rng(seed)
  for name in ("pad_id", "eos_id", "unk_id", "bos_id", "extra_ids", "vocab_size",
               "_base_vocab_size"):
    assert getattr(ours, name) == getattr(theirs, name), name
  assert vocabulary.special_ids(ours) == vocabulary.special_ids(theirs)
  for text in TEXTS + _random_texts(rng):
    ids = ours.encode(text)
    assert ids == list(theirs.encode(text)), text
    assert ours.decode(ids) == theirs.decode(ids), text
  for ids in _random_ids(rng, ours.vocab_size):
    assert ours.decode(ids) == theirs.decode(ids), ids
    assert ours.decode(np.asarray(ids, np.int32)) == theirs.decode(ids), ids
  assert vocabulary.same(ours, theirs) and vocabulary.same(theirs, ours) and ours == theirs


@pytest.mark.parametrize("extra_ids", [0, 10, 100])
def test_byte_vocabulary_matches_seqio(extra_ids):
  ours = vocabulary.build("byte", extra_ids=extra_ids)
  theirs = seqio.ByteVocabulary(extra_ids=extra_ids + 1)  # + [MASK], as get_vocabulary builds it
  _assert_same_behaviour(ours, theirs)
  assert ours.encode(b"\xc3\xa9") == [198, 172] and ours.decode([198, 172, 1, 100]) == "é"
  assert ours.decode([104, 259, 260, ours.vocab_size + 3, 105]) == "ef"  # mask, sentinels: dropped
  assert ours.decode([198]) == ""  # half a UTF-8 character is skipped, as seqio does


def test_byte_special_ids_put_mask_below_the_sentinels():
  ids = vocabulary.special_ids(vocabulary.build("byte"))
  assert (ids.mask_id, ids.num_sentinels, ids.regular_start, ids.regular_end, ids.vocab_size) == (
      259, 100, 3, 259, 360)
  assert ids.sentinel(0) == 359 and ids.sentinel(99) == 260
  assert vocabulary.special_ids(seqio.ByteVocabulary()).mask_id is None  # no extra id to hold it


@pytest.mark.parametrize("model", ["train_vocab", "defaults"])
@pytest.mark.parametrize("extra_ids", [0, 10])
def test_sentencepiece_vocabulary_matches_seqio(spm_paths, model, extra_ids):
  ours = vocabulary.build("sentencepiece", spm_paths[model], extra_ids)
  theirs = seqio.SentencePieceVocabulary(spm_paths[model], extra_ids=extra_ids)
  assert ours.sp_model == theirs.sp_model  # the same pieces, sentinels appended the same way
  _assert_same_behaviour(ours, theirs, seed=extra_ids)
  if extra_ids:
    assert ours.tokenizer.id_to_piece(ours.vocab_size - 1) == "▁<extra_id_0>"
    assert ours.vocab_size - 1 in ours.encode("a <extra_id_0>")
    assert vocabulary.special_ids(ours).sentinel(9) == ours.vocab_size - 10


def test_sentencepiece_special_ids_and_unknown_text(spm_paths):
  ours = vocabulary.build("sentencepiece", spm_paths["train_vocab"], 10)
  ids = vocabulary.special_ids(ours)
  assert (ids.mask_id, ids.regular_start, ids.num_sentinels) == (3, 4, 10)
  assert ids.regular_end == ours.vocab_size - 10
  assert ours.decode(ours.encode("return x ± 1 🙂")) == "return x ± 1 🙂"  # byte fallback
  plain = vocabulary.build("sentencepiece", spm_paths["defaults"], 0)
  assert 2 in plain.encode("🙂") and "⁇" in plain.decode(plain.encode("a 🙂"))
  assert vocabulary.special_ids(plain).mask_id == 3


def test_records_compare_content_not_paths(spm_paths, tmp_path):
  path = spm_paths["train_vocab"]
  copy = str(tmp_path / "vocab.model")
  shutil.copyfile(path, copy)
  ours = vocabulary.build("sentencepiece", path, 10)
  assert vocabulary.same(ours, seqio.SentencePieceVocabulary(copy, extra_ids=10))
  copied = vocabulary.build("sentencepiece", copy, 10)
  assert vocabulary.describe(ours) == vocabulary.describe(copied) and ours == copied
  assert not vocabulary.same(ours, vocabulary.build("sentencepiece", path, 11))
  assert not vocabulary.same(ours, vocabulary.build("sentencepiece", spm_paths["defaults"], 10))
  assert not vocabulary.same(vocabulary.build("byte"), vocabulary.build("byte", extra_ids=20))
  assert not vocabulary.same(vocabulary.build("byte"), ours) and ours != "a string"
  record = vocabulary.describe(vocabulary.build("byte"))
  assert record == {"kind": "byte", "vocab_size": 360, "extra_ids": 101,
                    "sha256": record["sha256"]} and len(record["sha256"]) == 64
  assert len({vocabulary.build("byte"), vocabulary.ByteVocabulary(101), ours}) == 2  # hashable


def test_seqio_pipeline_vocabularies_are_built_from_these(spm_paths):
  path = spm_paths["train_vocab"]
  seqio_vocab = vocabularies.get_vocabulary("sentencepiece", path, 10)
  assert isinstance(seqio_vocab, seqio.SentencePieceVocabulary)
  assert vocabulary.same(seqio_vocab, vocabulary.build("sentencepiece", path, 10))
  assert vocabularies.DEFAULT_VOCABULARY == vocabulary.build("byte")  # both directions
  assert vocabulary.build("byte") == vocabularies.DEFAULT_VOCABULARY
  assert vocabularies.special_ids(vocabularies.DEFAULT_VOCABULARY).mask_id == 259


def test_pickle_and_errors(spm_paths, tmp_path):
  ours = vocabulary.build("sentencepiece", spm_paths["train_vocab"], 10)
  again = pickle.loads(pickle.dumps(ours))
  assert again == ours and again.encode("def f") == ours.encode("def f")
  assert pickle.loads(pickle.dumps(vocabulary.build("byte"))) == vocabulary.build("byte")
  with pytest.raises(ValueError, match="1-D"):
    ours.decode([[1, 2]])
  with pytest.raises(TypeError, match="knows byte, SentencePiece and Hugging Face"):
    vocabulary.special_ids(seqio.PassThroughVocabulary(10))
  no_mask = _train(tmp_path / "nomask", user_defined_symbols=[])
  with pytest.raises(ValueError, match=r"has no '\[MASK\]' piece.*tools/train_vocab.py"):
    vocabulary.mask_id(vocabulary.build("sentencepiece", no_mask))
  no_pad = _train(tmp_path / "nopad", pad_id=-1, unk_id=0, eos_id=1)
  with pytest.raises(ValueError, match="pad/eos ids are -1/1.*needs 0/1"):
    vocabulary.build("sentencepiece", no_pad)
  with pytest.raises(FileNotFoundError, match="tools/train_vocab.py"):
    vocabulary.build("sentencepiece", str(tmp_path / "missing.model"))
  (tmp_path / "text.model").write_text("not a model")
  for extra_ids in (0, 3):  # protobuf or SentencePiece notices
    with pytest.raises(ValueError, match="is not a SentencePiece model.*not its .vocab"):
      vocabulary.build("sentencepiece", str(tmp_path / "text.model"), extra_ids)


def test_a_relative_path_not_in_the_working_directory_is_found_under_gin_configs(tmp_path,
                                                                              monkeypatch):
  monkeypatch.chdir(tmp_path)
  shipped = vocabulary.build("sentencepiece", "vocab/stdlib_2k.model")  # the quickstart's
  assert shipped.sentencepiece_model_file == os.path.join(vocabulary.GIN_CONFIGS, "vocab",
                                                          "stdlib_2k.model")
  assert shipped.decode(shipped.encode("def f(self):\n    return 1")) == "def f(self):\n    return 1"
  (tmp_path / "vocab").mkdir()
  shutil.copy(shipped.sentencepiece_model_file, tmp_path / "vocab" / "stdlib_2k.model")
  vocabulary._build.cache_clear()  # pylint: disable=protected-access
  local = vocabulary.build("sentencepiece", "vocab/stdlib_2k.model")  # the working dir's first
  assert local.sentencepiece_model_file == "vocab/stdlib_2k.model"


def test_building_and_using_them_imports_no_tensorflow(spm_paths):
  code = ("import sys; from t5x_lite import vocabulary as v; "
          f"s = v.build('sentencepiece', {spm_paths['train_vocab']!r}, 10); b = v.build('byte'); "
          "assert s.decode(s.encode('def f')) == 'def f' and v.mask_id(b) == 259; "
          "heavy = [m for m in ('tensorflow', 'seqio', 'jax') if m in sys.modules]; "
          "assert not heavy, heavy")
  subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ))


def test_a_continuation_keeps_its_first_space():
  # SentencePiece drops the space a decoded text begins with: decoded alone, the continuation
  # "        return 1" of "def main():\n" came out indented by 7 spaces.
  vocab = vocabulary.build("sentencepiece", vocabulary.find_spm("vocab/stdlib_2k.model"), 100)
  prompt, body = "def main():\n", "        return 1\n"
  prompt_ids, ids = vocab.encode(prompt), vocab.encode(prompt + body)
  assert ids[:len(prompt_ids)] == prompt_ids
  assert vocab.decode(ids[len(prompt_ids):]) != body  # the loss this guards against
  assert vocabulary.decode_continuation(vocab, prompt_ids, ids[len(prompt_ids):]) == body
  assert vocabulary.decode_continuation(vocab, [], vocab.encode("x = 1")) == "x = 1"
