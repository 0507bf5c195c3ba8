"""t5x_lite/data/resume.py: a resumed train stream continues exactly where the checkpoint was
taken (iterator state, no replay; the replay fallback; the cache's row cursor, re-sharded), and a
position of other data is refused with the choices."""
import json
import os

import gin
import numpy as np
import pytest

from t5x_lite.data import cache, resume

LENGTHS = {"targets": 16}


@pytest.fixture(autouse=True)
def jsonl_corpus(tmp_path):
  """A JSON Lines corpus: its reader is a py_function, which tf.data checkpoints only under the
  WARN external-state policy."""
  rng = np.random.default_rng(0)
  words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]
  with open(tmp_path / "corpus.jsonl", "w") as f:
    for _ in range(120):
      f.write(json.dumps({"text": " ".join(rng.choice(words, 12))}) + "\n")
  gin.bind_parameter("local_corpus.pattern", str(tmp_path / "*.jsonl"))


def stream(shard=(0, 1), cache_dir=None, allow_changes=()):
  return resume.TrainStream("local_clm", LENGTHS, 4 // shard[1], 4, "decoder", 1, shard, "sha",
                            cache_dir, allow_changes)


def equal(a, b):
  return all(np.array_equal(a[k], b[k]) for k in a) and set(a) == set(b)


def test_a_resume_restores_the_iterator_or_replays_and_gets_the_same_batches(tmp_path):
  step_dir = str(tmp_path / "checkpoints" / "2")
  before = stream()
  batches = before.open()
  read = [next(batches) for _ in range(3)]  # the loop reads one batch ahead of the step
  before.stage_state(os.path.join(step_dir, resume.ITERATOR_ITEM), consumed=2)
  position = before.position(2)
  assert position["tier"] == "iterator" and position["pipeline_skip"] == 0
  expected = [read[2], next(batches), next(batches)]
  batches.close()

  after, logs = stream(), []
  next(after.open())  # the train job reads a first batch for its shapes
  resumed = after.resume(position, 2, step_dir, logs.append)
  assert all(equal(next(resumed), want) for want in expected)
  assert "restored the input iterator" in logs[0] and "replay" not in logs[0].replace(
      "no replay", "")
  # Without iterator state (an older checkpoint, another process count): the stated fallback.
  logs.clear()
  replayed = stream().resume(position, 2, str(tmp_path / "elsewhere"), logs.append)
  assert all(equal(next(replayed), want) for want in expected)
  assert "replays the 2 consumed batches (the O(steps) fallback)" in logs[0]


def test_a_position_of_other_data_is_refused_with_the_choices(tmp_path):
  position = dict(stream().record(), tier="iterator", batches_consumed=2,
                  feature_lengths={"targets": 32}, seed=5)
  with pytest.raises(ValueError, match=r"TASK_FEATURE_LENGTHS \{'targets': 32\} -> \{'targets': "
                                       r"16\}; train.seed 5 -> 1. Choose one: \(1\) rerun.*\(2\) "
                                       r"add \['TASK_FEATURE_LENGTHS', 'train.seed'\] to "
                                       r"train.allow_changes.*replayed.*\(3\) start a fresh"):
    stream().resume(position, 2, str(tmp_path), print)
  logs = []
  allowed = stream(allow_changes=["TASK_FEATURE_LENGTHS", "train.seed"])
  next(allowed.resume(position, 2, str(tmp_path), logs.append))
  assert "the data changed (train.allow_changes: TASK_FEATURE_LENGTHS, train.seed)" in logs[0]


def tiny_cache(directory, rows=12):
  """A cache by hand: row r holds r + 1 in every token."""
  os.makedirs(directory)
  tokens = np.repeat(np.arange(1, rows + 1, dtype=np.int32)[:, None], 16, axis=1)
  np.save(os.path.join(directory, "decoder_target_tokens-00000.npy"), tokens)
  meta = {"format": cache.FORMAT, "task": "local_clm", "feature_lengths": LENGTHS,
          "family": "decoder", "vocabulary": "sha", "rows": rows, "rows_per_shard": rows,
          "shards": 1, "features": {"decoder_target_tokens": [16]}, "fingerprint": "f"}
  with open(os.path.join(directory, cache.META), "w") as f:
    json.dump(meta, f)
  return directory


def test_the_cache_tier_resumes_at_its_row_cursor_with_another_process_count(tmp_path):
  directory = tiny_cache(str(tmp_path / "cache"))
  one = stream(cache_dir=directory)
  batches = one.open()
  run = [next(batches)["decoder_target_tokens"][:, 0] for _ in range(4)]
  position = one.position(3)  # three trained on, one read ahead
  assert position["rows_consumed"] == 12 and position["tier"] == "cache"
  logs = []
  # The second of two processes reads the second half of each global batch from there on.
  second = stream(shard=(1, 2), cache_dir=directory).resume(position, 3, str(tmp_path), logs.append)
  np.testing.assert_array_equal(next(second)["decoder_target_tokens"][:, 0], run[3][2:])
  assert "from row 12 (epoch 1; 2 data shard(s))" in logs[0]
  assert sorted(np.concatenate(run[:3])) == list(range(1, 13))  # each row once in epoch 0
