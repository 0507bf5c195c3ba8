"""t5x_lite/data/sources.py: text / JSONL / whole-file corpora, splits, bad files and records
(counted, never silent), stdlib, TFDS."""
import dataclasses
import json
import os

import gin
import numpy as np
import pytest
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

from t5x_lite.data import sources


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
  monkeypatch.setenv("T5X_LITE_CACHE_DIR", str(tmp_path / "cache"))
  sources.FAULTS.clear()
  yield
  sources.FAULTS.clear()


def texts(source, split, **kwargs):
  ds = source.get_dataset(split, shuffle=False, **kwargs)
  return [ex["text"].decode() for ex in ds.as_numpy_iterator()]


def write(path, text, mode="w"):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, mode) as f:
    f.write(text)
  return str(path)


def test_three_formats_read_the_same_documents(tmp_path):
  docs = [f"document number {i}" for i in range(20)]
  write(tmp_path / "lines" / "a.txt", "\n".join(docs[:12]) + "\n\n   \n")  # blank lines dropped
  write(tmp_path / "lines" / "b.txt", "\n".join(docs[12:]))
  for i, d in enumerate(docs):
    write(tmp_path / "files" / f"{i:02d}.txt", d)
  write(tmp_path / "data.jsonl", "".join(json.dumps({"body": d, "n": 1}) + "\n" for d in docs))
  configs = {
      "lines": sources.CorpusConfig(str(tmp_path / "lines" / "*.txt"), validation_percent=0),
      "files": sources.CorpusConfig(str(tmp_path / "files"), format="files", validation_percent=0),
      "jsonl": sources.CorpusConfig(str(tmp_path / "*.jsonl"), text_key="body",
                                    validation_percent=0),
  }
  for name, config in configs.items():
    assert sorted(texts(sources.TextFileSource(config), "train")) == sorted(docs), name
    assert config.resolved_format("x.jsonl") == ("files" if name == "files" else "jsonl")


def test_document_split_is_disjoint_complete_and_stable(tmp_path):
  docs = [f"doc {i} " + "word " * (i % 7) for i in range(600)]
  write(tmp_path / "c.txt", "\n".join(docs))
  source = sources.TextFileSource(sources.CorpusConfig(str(tmp_path / "c.txt"),
                                                       validation_percent=10))
  train, validation = texts(source, "train"), texts(source, "validation")
  assert not set(train) & set(validation)
  assert sorted(train + validation) == sorted(docs)
  assert 30 <= len(validation) <= 90  # ~10%
  assert texts(source, "validation") == validation


def test_split_placeholder_reads_separate_files_and_shards_by_file(tmp_path):
  for split in ("train", "validation"):
    for shard in range(4):
      write(tmp_path / f"{split}-{shard}.jsonl",
            json.dumps({"text": f"{split} {shard}"}) + "\n")
  source = sources.TextFileSource(sources.CorpusConfig(str(tmp_path / "{split}-*.jsonl")))
  assert sorted(texts(source, "validation")) == [f"validation {i}" for i in range(4)]
  assert len(source.list_shards("train")) == 4
  halves = [texts(source, "train", shard_info=seqio.ShardInfo(i, 2)) for i in range(2)]
  assert sorted(halves[0] + halves[1]) == [f"train {i}" for i in range(4)]
  assert len(halves[0]) == len(halves[1]) == 2


def test_a_task_build_lists_the_corpus_once(tmp_path, monkeypatch):
  # seqio lists the shards, then builds the dataset: one walk of the corpus serves both, and a
  # later build (files may have changed) lists again.
  write(tmp_path / "a.txt", "one\ntwo\n")
  source = sources.TextFileSource(sources.CorpusConfig(str(tmp_path / "*.txt"),
                                                       validation_percent=0))
  calls = []
  real = sources.list_corpus
  monkeypatch.setattr(sources, "list_corpus", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
  source.list_shards("train")
  assert sorted(texts(source, "train")) == ["one", "two"] and calls == ["train"]
  write(tmp_path / "b.txt", "three\n")
  assert sorted(texts(source, "train")) == ["one", "three", "two"] and len(calls) == 2
  source.list_shards("validation")  # another split's listing is not reused for train
  texts(source, "train")
  assert calls == ["train", "train", "validation", "train"]


def test_non_utf8_files_are_skipped_and_counted_or_fatal(tmp_path, caplog):
  good = write(tmp_path / "good.txt", "fine text\n")
  bad = write(tmp_path / "latin1.txt", "caf\xe9 cr\xe8me\n".encode("latin-1"), "wb")
  config = sources.CorpusConfig(str(tmp_path / "*.txt"), validation_percent=0)
  listing = sources.list_corpus(config, "train")
  sources.list_corpus(config, "train")  # as seqio does: shards, then dataset; warned once
  assert caplog.text.count("Skipped 1 non-UTF-8 train file(s)") == 1
  assert listing.files == [good] and listing.skipped_non_utf8 == [bad]
  assert texts(sources.TextFileSource(config), "train") == ["fine text"]
  strict = sources.CorpusConfig(str(tmp_path / "*.txt"), non_utf8="fail")
  with pytest.raises(sources.CorpusError, match=r"not valid UTF-8, e.g. .*latin1.txt.*iconv"):
    sources.list_corpus(strict, "train")
  # The verdict is cached by size and mtime, and a fixed file is noticed.
  write(bad, "café crème\n")
  assert sources.list_corpus(strict, "train").files == sorted([good, bad])


def jsonl(path, records):
  return write(path, "".join((r if isinstance(r, str) else json.dumps(r)) + "\n"
                             for r in records))


def test_records_without_the_text_key_are_counted_and_too_many_stop_naming_the_key_found(
    tmp_path, caplog):
  docs = [{"text": f"doc {i}"} for i in range(100)]
  jsonl(tmp_path / "few.jsonl", docs[:50] + [{"body": "no text"}] * 3 + docs[50:])
  config = sources.CorpusConfig(str(tmp_path / "few.jsonl"), validation_percent=0)
  assert len(texts(sources.TextFileSource(config), "train")) == 100
  (line,) = sources.data_faults()
  assert line.startswith(str(tmp_path / "few.jsonl") + ": 3 record(s) without the text key "
                         "(first at line 51: no text at 'text' (keys found: ['body']))")
  assert "few.jsonl:51: no text at 'text'" in caplog.text  # logged once, with file:line
  # Half the records lacking it (issue 13: 10,000 of 20,000 lost without a word) stops the run.
  jsonl(tmp_path / "half.jsonl", [r for d in docs for r in (d, {"body": d["text"]})])
  config = sources.CorpusConfig(str(tmp_path / "half.jsonl"), validation_percent=0)
  with pytest.raises(tf.errors.OpError, match=r"half.jsonl: 20 of the 4\d records read so far "
                                              r"were skipped .*keys found: \['body'\].*text_key"):
    texts(sources.TextFileSource(config), "train")


def local_clm_batches(tmp_path, **corpus):
  """Batches of the registered local_clm task over tmp_path/*.jsonl, as a training job reads."""
  from t5x_lite import data  # pylint: disable=g-import-not-at-top
  gin.bind_parameter("local_corpus.pattern", str(tmp_path / "*.jsonl"))
  gin.bind_parameter("local_corpus.validation_percent", 0)
  for name, value in corpus.items():
    gin.bind_parameter(f"local_corpus.{name}", value)
  return data.get_dataset("local_clm", {"targets": 16}, batch_size=2, shuffle=False,
                          num_epochs=1)


def test_a_corpus_where_every_record_lacks_the_key_says_so_not_that_it_is_small(tmp_path):
  jsonl(tmp_path / "body.jsonl", [{"body": f"document {i}"} for i in range(5)])
  with pytest.raises(sources.CorpusError, match=r"(?s)produced no batch: nothing was left "
                                                r"after skipping.*body.jsonl: 5 record\(s\) "
                                                r"without the text key.*keys found: \['body'\]"
                                                r".*Set text_key to the field"):
    next(local_clm_batches(tmp_path))


def test_a_malformed_json_line_is_skipped_and_counted_or_fatal_naming_file_and_line(tmp_path):
  docs = [{"text": f"document number {i}"} for i in range(40)]
  jsonl(tmp_path / "a.jsonl", docs[:30] + ['{"text": "cut sh'] + docs[30:])
  assert len(list(local_clm_batches(tmp_path))) > 0  # the same batches on every resume
  (line,) = sources.data_faults()
  assert "a.jsonl: 1 malformed record(s) (first at line 31: not JSON" in line
  sources.FAULTS.clear()
  # Raised as the data error it is, not as a TensorFlow error from inside tf.data.
  with pytest.raises(sources.CorpusError, match=r"a.jsonl:31: not JSON \(Unterminated string.*"
                                                r"bad_records='skip'"):
    list(local_clm_batches(tmp_path, bad_records="fail"))


def test_non_utf8_bytes_cost_their_line_not_the_file(tmp_path):
  lines = [f"line {i}".encode() for i in range(10)]
  lines[4] = b"caf\xe9 cr\xe8me \xff\xfe"  # 4 bad bytes (issue 13 lost the whole file)
  write(tmp_path / "mixed.txt", b"\n".join(lines), "wb")
  config = sources.CorpusConfig(str(tmp_path / "mixed.txt"), validation_percent=0)
  kept = texts(sources.TextFileSource(config), "train")
  assert kept == [f"line {i}" for i in range(10) if i != 4]
  (line,) = sources.data_faults()
  assert "mixed.txt: 1 non-UTF-8 record(s) (first at line 5: byte 3 is not UTF-8" in line
  replaced = texts(sources.TextFileSource(dataclasses.replace(config, non_utf8="replace")),
                   "train")
  assert replaced[4] == "caf\ufffd cr\ufffdme \ufffd\ufffd" and len(replaced) == 10


def test_missing_and_empty_corpora_fail_with_the_fix(tmp_path):
  with pytest.raises(sources.CorpusError, match=r"matches no files.*LOCAL_CORPUS_PATTERN"):
    sources.list_corpus(sources.CorpusConfig(str(tmp_path / "nothing-*.txt")), "train")
  write(tmp_path / "empty.txt", "")
  with pytest.raises(sources.CorpusError, match=r"no readable 'train' files \(1 empty"):
    sources.list_corpus(sources.CorpusConfig(str(tmp_path / "empty.txt")), "train")
  with pytest.raises(sources.CorpusError, match="local_corpus.pattern"):
    sources.local_corpus()
  with pytest.raises(ValueError, match="non_utf8 must be"):
    sources.CorpusConfig("x", non_utf8="ignore")


def test_local_corpus_reads_its_pattern_from_gin(tmp_path):
  write(tmp_path / "t.txt", "from gin\n")
  source = sources.TextFileSource(sources.local_corpus)  # resolved when the dataset is built
  gin.bind_parameter("local_corpus.pattern", str(tmp_path / "*.txt"))
  gin.bind_parameter("local_corpus.validation_percent", 0)
  assert texts(source, "train") == ["from gin"]


def test_stdlib_corpus_is_split_by_file_deterministically():
  config = sources.stdlib_corpus()
  train = sources.list_corpus(config, "train").files
  validation = sources.list_corpus(config, "validation").files
  assert not set(train) & set(validation)
  assert 0.01 < len(validation) / (len(train) + len(validation)) < 0.06  # ~3% of files
  assert all(f.endswith(".py") and "site-packages" not in f for f in train)
  assert os.path.join(sources.STDLIB_ROOT, "json", "decoder.py") in train + validation
  library = sources.list_corpus(sources.stdlib_corpus(exclude=["/test/"]), "train").files
  assert library == [f for f in train if "/test/" not in f] and len(library) < len(train)
  gin.bind_parameter("stdlib_corpus.max_files", 5)
  few = sources.list_corpus(sources.stdlib_corpus(), "train").files
  assert few == train[:5]
  (doc,) = texts(sources.TextFileSource(sources.CorpusConfig(few[0], format="files")), "train")
  with open(few[0], encoding="utf-8") as f:
    assert doc == f.read()


def _prepare_tiny_tfds(data_dir):
  """A TFDS dataset prepared offline, read back like one prepared elsewhere (no builder code)."""
  with tfds.core.registered.skip_registration():

    class T5xLiteTinyText(tfds.core.GeneratorBasedBuilder):
      VERSION = tfds.core.Version("1.0.0")

      def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
            {"body": tfds.features.Text(), "id": np.int32}))

      def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(0, 40),
                "validation": self._generate_examples(40, 50)}

      def _generate_examples(self, lo, hi):
        for i in range(lo, hi):
          yield i, {"body": f"tfds document {i}", "id": i}

    T5xLiteTinyText(data_dir=str(data_dir)).download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return "t5x_lite_tiny_text"


def test_tfds_source_reads_a_locally_prepared_dataset(tmp_path):
  name = _prepare_tiny_tfds(tmp_path / "tfds")
  config = sources.TfdsConfig(name, str(tmp_path / "tfds"), text_key="body")
  source = sources.TfdsTextSource(config)
  assert sorted(texts(source, "validation")) == sorted(f"tfds document {i}" for i in range(40, 50))
  assert len(texts(source, "train")) == 40
  assert source.list_shards("train")[0].endswith("-00000-of-00001")
  with pytest.raises(sources.CorpusError, match="no feature 'text'.*tfds_corpus.text_key"):
    sources.TfdsTextSource(sources.TfdsConfig(name, str(tmp_path / "tfds"))).get_dataset("train")
  with pytest.raises(sources.CorpusError, match="No prepared TFDS dataset 'absent'"):
    sources.TfdsTextSource(sources.TfdsConfig("absent", str(tmp_path / "tfds"))).get_dataset()
  with pytest.raises(sources.CorpusError, match="tfds_corpus.name"):
    sources.tfds_corpus()
