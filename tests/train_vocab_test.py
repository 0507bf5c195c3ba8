"""tools/train_vocab.py: the command line trains a model seqio and t5x_lite can use."""
import importlib.util
import json
import os

import gin
import pytest
import seqio
from sentencepiece import sentencepiece_model_pb2

from t5x_lite.data import sources, vocabularies

_TOOL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools",
                     "train_vocab.py")
_spec = importlib.util.spec_from_file_location("train_vocab", _TOOL)
train_vocab = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_vocab)


def test_command_line_trains_a_t5x_lite_vocabulary(tmp_path, capsys, monkeypatch):
  monkeypatch.setenv("T5X_LITE_CACHE_DIR", str(tmp_path / "cache"))
  pattern = os.path.join(sources.STDLIB_ROOT, "json", "*.py")
  path = train_vocab.main(["--input", pattern, "--vocab_size", "500", "--model_type", "bpe",
                           "--output_prefix", str(tmp_path / "spm" / "code"), "--quiet"])
  assert path == str(tmp_path / "spm" / "code.model") and os.path.exists(path)
  out = capsys.readouterr().out
  assert f"--gin.get_vocabulary.spm_path=\"'{path}'\"" in out
  assert "--gin.TransformerConfig.vocab_size=600" in out  # 500 pieces + 100 sentinels

  vocab = seqio.SentencePieceVocabulary(path, extra_ids=100)
  assert (vocab.pad_id, vocab.eos_id, vocab.unk_id) == (0, 1, 2)
  assert vocab.vocab_size == 600
  assert vocab.tokenizer.id_to_piece(599) == "▁<extra_id_0>"
  ids = vocabularies.special_ids(vocab)
  assert ids.mask_id == 3 and ids.regular_start == 4 and ids.regular_end == 500
  code = "def f(x):\n        return {'é': [x, 10]}\n"  # indentation and newlines survive
  assert vocab.decode(vocab.encode(code)) == code
  # A character map (of one unused rule): TF-Text's op logs none missing at every pipeline.
  assert vocab.sp_model and sentencepiece_model_pb2.ModelProto.FromString(
      vocab.sp_model).normalizer_spec.precompiled_charsmap
  assert len(vocab.encode(code)) < len(code.encode())  # it learned merges: shorter than bytes
  digits = [vocab.tokenizer.id_to_piece(i) for i in vocab.encode("12345")]
  assert all(len(p.strip("▁")) <= 1 for p in digits)  # split_digits: one piece per digit
  # And the gin bindings it printed select it.
  gin.clear_config()
  try:
    gin.parse_config(["get_vocabulary.kind = 'sentencepiece'",
                      f"get_vocabulary.spm_path = '{path}'"])
    assert vocabularies.DEFAULT_VOCABULARY.vocab_size == 600
  finally:
    gin.clear_config()


def test_jsonl_input_and_document_iteration(tmp_path):
  data = tmp_path / "d.jsonl"
  data.write_text("".join(json.dumps({"t": f"line {i}\nsecond {i}"}) + "\n" for i in range(5)))
  config = sources.CorpusConfig(str(data), text_key="t", validation_percent=0)
  docs = list(train_vocab.iter_documents(config))
  assert docs == [f"line {i}\nsecond {i}" for i in range(5)]
  lines = list(train_vocab.iter_sentences(iter(docs + ["x" * 50]), max_sentence_bytes=40,
                                          progress=False))
  assert lines == [l for d in docs for l in d.split("\n")]  # over-long lines are left out


def test_runs_of_lines_keep_their_newlines_so_code_gets_newline_and_indent_pieces():
  docs = ["def f():\n    return 1\n\nx = f()\n", "a\n" + "b" * 50 + "\n"]
  runs = list(train_vocab.iter_sentences(iter(docs), max_sentence_bytes=40, progress=False,
                                         lines_per_sentence=3))
  assert runs == ["def f():\n    return 1\n\n", "x = f()\n"]  # the over-long run is left out
  with pytest.raises(SystemExit):
    train_vocab.main(["--stdlib", "--lines_per_sentence", "0", "--output_prefix", "/tmp/x"])
  with pytest.raises(SystemExit):
    train_vocab.main(["--input", "x.txt", "--exclude", "/test/", "--output_prefix", "/tmp/x"])


def test_the_quickstarts_shipped_vocabulary_fits_its_model_and_keeps_code_exactly():
  from t5x_lite import launch  # pylint: disable=g-import-not-at-top
  gin.clear_config()
  try:
    launch.configure(["runs/quickstart.gin"], [])
    vocab = vocabularies.get_vocabulary()  # what the quickstart's bindings select
    model_vocab_size = gin.query_parameter("TransformerConfig.vocab_size")
  finally:
    gin.clear_config()
  assert vocab.vocab_size <= model_vocab_size < vocab.vocab_size + 64  # rounded up to 64
  code = "class Foo:\n    def f(self):\n\n        return {'a': [1]}\n"
  assert vocab.decode(vocab.encode(code)) == code


def test_code_flags_reach_the_trainer_and_bad_piece_length_is_refused(tmp_path, monkeypatch):
  monkeypatch.setenv("T5X_LITE_CACHE_DIR", str(tmp_path / "cache"))
  pattern = os.path.join(sources.STDLIB_ROOT, "json", "*.py")
  path = train_vocab.main(["--input", pattern, "--vocab_size", "400",
                           "--no_split_by_unicode_script", "--max_piece_length", "12",
                           "--no_dummy_prefix",
                           "--output_prefix", str(tmp_path / "code"), "--quiet"])
  with open(path, "rb") as f:
    proto = sentencepiece_model_pb2.ModelProto.FromString(f.read())
  spec = proto.trainer_spec
  assert not spec.split_by_unicode_script and spec.max_sentencepiece_length == 12
  assert not proto.normalizer_spec.add_dummy_prefix  # an inner line's "def" reads as a first's
  with pytest.raises(SystemExit):
    train_vocab.main(["--stdlib", "--max_piece_length", "0", "--output_prefix", "/tmp/x"])
