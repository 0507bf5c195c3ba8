"""t5x_lite/hf_tokenizer.py: tokenizer.json vocabularies with transformers' ids and text."""
import os
import pickle

import numpy as np
import pytest
import transformers as tf
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import trainers

from t5x_lite import hf_tokenizer, vocabulary

_HERE = os.path.dirname(os.path.abspath(__file__))
# A few KB of local text: code, prose, accents, CJK and emoji.
CORPUS = (open(os.path.join(_HERE, "..", "t5x_lite", "vocabulary.py"), encoding="utf-8")
          .read()[:6000].splitlines()
          + ["héllo wörld, naïve café 中文 日本語 🙂👍", "The capital of France is Paris."] * 3)
TEXTS = ["", "hello world", "def f(x):\n    return x  # tabs\tand  spaces  ", "  leading",
         "trailing  ", "é ü ß ñ 中文 日本語 🙂👍 ±", "Hello , world ! I can't , isn't it ?",
         "a <extra_id_0> b", "x" * 60, "\r\n windows line", "The capital of France is",
         "   \n\n\t\t  whitespace runs   ", "for i in range(10): print(i ** 2)  # {}[]<>"]


def gpt2_tokenizer(directory, vocab_size=400):
  """GPT-2's byte-level BPE; <|endoftext|> added last (the top id), as GPT-2 has it."""
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.ByteLevel(trim_offsets=False)
  tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
      vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False))
  tok.add_special_tokens(["<|endoftext|>"])
  end = "<|endoftext|>"
  tf.GPT2TokenizerFast(tokenizer_object=tok, bos_token=end, eos_token=end,
                       unk_token=end).save_pretrained(directory)
  return str(directory)


def bert_tokenizer(directory):
  """BERT's uncased WordPiece, [CLS] ... [SEP], with the punctuation clean-up on decode."""
  tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
  tok.normalizer = normalizers.BertNormalizer(lowercase=True)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tok.decoder = decoders.WordPiece()
  tok.train_from_iterator(CORPUS, trainers.WordPieceTrainer(
      vocab_size=400, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
      show_progress=False))
  tok.post_processor = processors.TemplateProcessing(
      single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
      special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
  tf.BertTokenizerFast(tokenizer_object=tok,
                       clean_up_tokenization_spaces=True).save_pretrained(directory)
  return str(directory)


def unigram_tokenizer(directory, sentinels=5):
  """A LLaMA/T5-like Unigram over "▁" pieces, BOS added to prompts, T5 sentinels at the top."""
  tok = Tokenizer(models.Unigram())
  tok.normalizer = normalizers.Replace(" ", "▁")
  tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
  tok.decoder = decoders.Metaspace(prepend_scheme="first", split=False)
  tok.train_from_iterator(CORPUS, trainers.UnigramTrainer(
      vocab_size=300, special_tokens=["<pad>", "</s>", "<unk>", "<s>"], unk_token="<unk>",
      show_progress=False))
  tok.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                     special_tokens=[("<s>", 3)])
  tok.add_special_tokens([f"<extra_id_{i}>" for i in reversed(range(sentinels))])
  tf.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                             unk_token="<unk>", pad_token="<pad>").save_pretrained(directory)
  return str(directory)


MAKERS = {"gpt2": gpt2_tokenizer, "bert": bert_tokenizer, "unigram": unigram_tokenizer}


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("tokenizers")
  return {name: make(root / name) for name, make in MAKERS.items()}


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_ids_and_text_are_transformers(tokenizer_dirs, name):
  ours = vocabulary.build("hf_tokenizer", tokenizer_path=tokenizer_dirs[name])
  theirs = tf.AutoTokenizer.from_pretrained(tokenizer_dirs[name])
  assert ours.vocab_size == len(theirs)
  for text in TEXTS:
    ids = ours.encode(text)
    assert ids == theirs(text, add_special_tokens=False).input_ids, text
    assert ours.encode_prompt(text) == theirs(text).input_ids, text
    assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), text
  rng = np.random.default_rng(0)
  for _ in range(40):  # any ids, specials and partial UTF-8 included, up to the first EOS
    ids = rng.integers(0, ours.vocab_size, size=rng.integers(1, 25)).tolist()
    expected = ids[:ids.index(ours.eos_id)] if ours.eos_id in ids else ids
    assert ours.decode(ids) == theirs.decode(expected, skip_special_tokens=True), ids
  assert ours.decode(ids + [ours.vocab_size + 3]) == ours.decode(ids)  # past the tokenizer
  assert ours.decode(np.asarray(ids, np.int32)) == ours.decode(ids)


def test_special_ids(tokenizer_dirs):
  gpt2 = vocabulary.build("hf_tokenizer", tokenizer_path=tokenizer_dirs["gpt2"])
  assert (gpt2.eos_id, gpt2.bos_id, gpt2.mask_id, gpt2.vocab_size) == (400, 400, None, 401)
  assert vocabulary.special_ids(gpt2) == vocabulary.SpecialIds(None, 0, 0, 400, 401)
  bert = vocabulary.build("hf_tokenizer", tokenizer_path=tokenizer_dirs["bert"])
  # [SEP] ends a BERT sequence and [CLS] starts it; [MASK] is what MLM writes.
  assert (bert.pad_id, bert.unk_id, bert.bos_id, bert.eos_id) == (0, 1, 2, 3)
  assert vocabulary.mask_id(bert) == 4
  assert vocabulary.special_ids(bert) == vocabulary.SpecialIds(4, 0, 5, 400, 400)
  t5 = vocabulary.build("hf_tokenizer", tokenizer_path=os.path.join(tokenizer_dirs["unigram"],
                                                                    "tokenizer.json"))
  ids = vocabulary.special_ids(t5)
  assert (t5.pad_id, t5.eos_id, t5.unk_id, t5.bos_id, t5.extra_ids) == (0, 1, 2, 3, 5)
  assert (ids.num_sentinels, ids.regular_start, ids.regular_end) == (5, 4, t5.vocab_size - 5)
  assert t5.encode("a <extra_id_0>")[-1] == ids.sentinel(0) == t5.vocab_size - 1
  with pytest.raises(ValueError, match="has no '\\[MASK\\]'"):
    vocabulary.mask_id(gpt2)


def test_fingerprints_pickles_and_errors(tokenizer_dirs, tmp_path):
  path = tokenizer_dirs["gpt2"]
  ours = vocabulary.build("hf_tokenizer", tokenizer_path=path)
  copy = vocabulary.build("hf_tokenizer", tokenizer_path=os.path.join(path, "tokenizer.json"))
  record = vocabulary.describe(ours)
  assert record["kind"] == "hf_tokenizer" and record == vocabulary.describe(copy) and ours == copy
  assert not vocabulary.same(ours, vocabulary.build("hf_tokenizer",
                                                    tokenizer_path=tokenizer_dirs["bert"]))
  assert not vocabulary.same(ours, vocabulary.build("byte"))
  other = vocabulary.build("hf_tokenizer",
                           tokenizer_path=gpt2_tokenizer(tmp_path / "bigger", vocab_size=420))
  assert not vocabulary.same(ours, other)
  again = pickle.loads(pickle.dumps(ours))
  assert again == ours and again.encode("def f") == ours.encode("def f")
  with pytest.raises(ValueError, match="needs get_vocabulary.tokenizer_path"):
    vocabulary.build("hf_tokenizer")
  with pytest.raises(FileNotFoundError, match="No tokenizer.json at"):
    vocabulary.build("hf_tokenizer", tokenizer_path=str(tmp_path))
  (tmp_path / "tokenizer.json").write_text("{}")
  with pytest.raises(ValueError, match="is not a tokenizers tokenizer.json"):
    hf_tokenizer.HfTokenizerVocabulary(str(tmp_path))
  with pytest.raises(ValueError, match="1-D"):
    ours.decode([[1, 2]])


def test_seqio_vocabulary_tokenizes_in_tf_data_as_in_python(tokenizer_dirs):
  # Here only: the input pipeline (TensorFlow, seqio) is slow to import, and
  # convert_checkpoint_test imports this file for its tokenizer.
  import tensorflow as tensorflow  # pylint: disable=g-import-not-at-top
  from t5x_lite.data import vocabularies  # pylint: disable=g-import-not-at-top
  path = tokenizer_dirs["unigram"]
  seqio_vocab = vocabularies.get_vocabulary("hf_tokenizer", tokenizer_path=path)
  ours = vocabulary.build("hf_tokenizer", tokenizer_path=path)
  assert vocabulary.same(seqio_vocab, ours) and seqio_vocab == ours
  assert (seqio_vocab.eos_id, seqio_vocab.vocab_size) == (ours.eos_id, ours.vocab_size)
  assert vocabulary.special_ids(seqio_vocab) == vocabulary.special_ids(ours)
  dataset = tensorflow.data.Dataset.from_tensor_slices(TEXTS).map(seqio_vocab.encode_tf)
  for text, ids in zip(TEXTS, dataset.as_numpy_iterator()):
    assert ids.tolist() == ours.encode(text), text
    assert seqio_vocab.decode_tf(ids).numpy().decode() == ours.decode(ids), text
  rows = tensorflow.constant([[5, 6, 1, 7, 8, 9, 10], [5, 6, 7, 8, 9, 10, 11]])  # EOS in one
  assert [t.decode() for t in seqio_vocab.decode_tf(rows).numpy()] == [
      ours.decode(row) for row in rows.numpy()]


@pytest.mark.parametrize("kind", hf_tokenizer.TRAINABLE)
def test_train_vocab_trains_tokenizers_a_task_vocabulary_selects(kind, tmp_path, capsys):
  import importlib.util  # pylint: disable=g-import-not-at-top
  import gin  # pylint: disable=g-import-not-at-top
  from t5x_lite.data import vocabularies  # pylint: disable=g-import-not-at-top
  tool = os.path.join(_HERE, "..", "tools", "train_vocab.py")
  spec = importlib.util.spec_from_file_location("train_vocab", tool)
  train_vocab = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(train_vocab)
  text = tmp_path / "text.txt"
  text.write_text("\n".join(CORPUS), encoding="utf-8")
  path = train_vocab.main(["--input", str(text), "--kind", kind, "--vocab_size", "300",
                           "--extra_ids", "10", "--output_prefix", str(tmp_path / kind),
                           "--quiet"])
  assert path == str(tmp_path / kind / "tokenizer.json")
  out = capsys.readouterr().out
  assert f"--gin.get_vocabulary.tokenizer_path=\"'{path}'\"" in out
  assert "--gin.TransformerConfig.vocab_size=310" in out
  theirs = tf.AutoTokenizer.from_pretrained(str(tmp_path / kind))
  code = "def f(x):\n        return {'é': [x, 10]}  # 🙂\n"
  gin.clear_config()
  try:
    gin.parse_config(["get_vocabulary.kind = 'hf_tokenizer'",
                      f"get_vocabulary.tokenizer_path = '{path}'"])
    vocab = vocabularies.DEFAULT_VOCABULARY
    assert (vocab.pad_id, vocab.eos_id, vocab.unk_id, vocab.vocab_size) == (0, 1, 2, 310)
    assert (vocabularies.mask_id(), theirs.mask_token_id, theirs.eos_token_id) == (3, 3, 1)
    ids = vocabularies.special_ids(vocab)
    assert (ids.regular_start, ids.regular_end, ids.sentinel(0)) == (4, 300, 309)
    assert vocab.encode(code) == theirs(code, add_special_tokens=False).input_ids
    assert vocab.encode_tf(code).numpy().tolist() == vocab.encode(code)
    if kind != "wordpiece":  # BERT's pre-tokenizer does not keep whitespace
      assert vocab.decode(vocab.encode(code)) == code
  finally:
    gin.clear_config()
