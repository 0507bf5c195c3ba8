"""tools/prepare_corpus.py: filters, exact and near duplicates, shards the local tasks read."""
import json
import random

import numpy as np
import pytest

from t5x_lite.data import sources

import tool_module  # tests/tool_module.py

prepare_corpus = tool_module.load("prepare_corpus.py")

WORDS = ("river stone cloud maple ember quartz violet harbor lantern meadow orbit saffron tundra "
         "willow zephyr copper falcon garnet island jasmine").split()


def doc(rng, n=80):
  return " ".join(rng.choice(WORDS) for _ in range(n))


def test_minhash_estimates_jaccard_similarity():
  index = prepare_corpus.NearDuplicateIndex(num_perm=256, bands=32, shingle_size=1)
  a = [f"w{i}" for i in range(100)]
  b = [f"w{i}" for i in range(50, 150)]  # true Jaccard 50/150
  sa, sb = index.signature(a), index.signature(b)
  assert np.mean(sa == sb) == pytest.approx(1 / 3, abs=0.08)
  assert np.mean(sa == index.signature(list(reversed(a)))) == 1.0  # a set: order is irrelevant


def test_quality_measures():
  assert prepare_corpus.symbol_ratio("ab{}") == 0.5
  assert prepare_corpus.duplicate_line_fraction("x\ny\nx\nx") == 0.5
  assert prepare_corpus.top_ngram_fraction("a b a b a b".split()) == pytest.approx(1.0)
  assert prepare_corpus.top_ngram_fraction("one two three four five".split()) == 0.0
  assert prepare_corpus.top_ngram_fraction("a bb a bb c".split()) == pytest.approx(6 / 7)


def test_command_line_dedups_filters_and_writes_shards_the_tasks_read(tmp_path, capsys,
                                                                      monkeypatch):
  monkeypatch.setenv("T5X_LITE_CACHE_DIR", str(tmp_path / "cache"))
  rng = random.Random(0)
  originals = [doc(rng) for _ in range(200)]
  # Some unique documents spell "é" decomposed (e + combining accent); NFC must compose it.
  originals[100:] = [d.replace("river", "rive\u0301r") for d in originals[100:]]
  near = []
  for d in originals[:30]:  # one word changed in 80: Jaccard of 5-word shingles ~0.88
    words = d.split()
    words[40] = "CHANGED"
    near.append(" ".join(words))
  junk = ["too short", "{}[]<>()" * 20 + " a", "same line\n" * 30]
  docs = originals + originals[:25] + near + junk
  rng.shuffle(docs)
  raw = tmp_path / "raw"
  raw.mkdir()
  with open(raw / "a.jsonl", "w") as f:
    for d in docs[:150]:
      f.write(json.dumps({"text": d}) + "\n")
  with open(raw / "b.jsonl", "w") as f:
    for d in docs[150:]:
      f.write(json.dumps({"text": d}) + "\n")
  (raw / "c.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')  # not UTF-8: skipped, counted
  out = tmp_path / "out"
  summary = prepare_corpus.main(["--input", str(raw / "*.jsonl"), "--output_dir", str(out),
                                 "--validation_percent", "10", "--num_shards", "3"])
  counts = summary["documents"]
  assert counts["input files"] == 3 and counts["skipped non-UTF-8 files"] == 1
  assert counts["input documents"] == len(docs)
  assert counts["exact duplicates"] == 25
  assert 25 <= counts["near duplicates (Jaccard >= 0.8)"] <= 30
  assert counts["too short (< 20 chars)"] == 1
  assert counts["symbol ratio > 0.5"] == 1
  assert counts["repeated lines > 0.5"] == 1
  assert counts["kept"] == counts["train"] + counts["validation"]
  assert 200 <= counts["kept"] <= 205
  printed = capsys.readouterr().out
  assert "dropped: exact duplicates" in printed and "local_corpus.pattern" in printed
  assert json.loads((out / "stats.json").read_text()) == summary
  # The local tasks read the shards; unicode was normalised to NFC on the way.
  source = sources.TextFileSource(sources.CorpusConfig(str(out / "{split}-*.jsonl")))
  train = [ex["text"].decode() for ex in source.get_dataset("train", shuffle=False)
           .as_numpy_iterator()]
  validation = [ex["text"].decode() for ex in source.get_dataset("validation", shuffle=False)
                .as_numpy_iterator()]
  assert len(train) == counts["train"] and len(validation) == counts["validation"] > 5
  assert len(source.list_shards("train")) == 3
  assert not any("\u0301" in t for t in train) and any("rivér" in t for t in train)
  assert len(set(train + validation)) == len(train + validation)
