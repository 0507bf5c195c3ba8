"""t5x_lite/data/pipeline.py: get_dataset's contract, reproducibility, sharding, resuming, and the
errors it raises before reading any data."""
import gin
import numpy as np
import pytest
import seqio
import tensorflow as tf

from t5x_lite import data
from t5x_lite.data import pipeline

CLM = {"targets": 32}


@pytest.fixture(autouse=True)
def _small_corpus():
  gin.bind_parameter("stdlib_corpus.max_files", 8)
  yield


def batches(name, lengths, n, **kwargs):
  it = data.get_dataset(name, lengths, batch_size=kwargs.pop("batch_size", 4), **kwargs)
  try:
    return [next(it) for _ in range(n)]
  finally:
    it.close()


def test_unknown_names_list_the_closest_registered_ones():
  with pytest.raises(ValueError, match=r"No task or mixture named 'stdlib_span_corupt'.*"
                                       r"Did you mean \['stdlib_span_corruption'"):
    data.get_dataset("stdlib_span_corupt", {"inputs": 64, "targets": 16})
  with pytest.raises(ValueError, match=r"Registered: \["):
    data.get_provider("zzzzzzzz")


def test_bad_lengths_splits_and_converters_fail_before_reading_data():
  with pytest.raises(ValueError, match=r"'stdlib_clm' has features \['targets'\].*got "
                                       r"\['inputs', 'targets'\]"):
    data.get_dataset("stdlib_clm", {"inputs": 32, "targets": 32})
  with pytest.raises(ValueError, match="positive int"):
    data.get_dataset("stdlib_clm", {"targets": 0})
  with pytest.raises(ValueError, match="splits \\['train', 'validation'\\], not 'test'"):
    data.get_dataset("stdlib_clm", CLM, split="test")
  with pytest.raises(ValueError, match=r"Set TASK_FEATURE_LENGTHS = \{'inputs': 512, "
                                       r"'targets': 114\}"):
    data.get_dataset("stdlib_span_corruption", {"inputs": 512, "targets": 64})
  with pytest.raises(ValueError, match="'stdlib_span_corruption' is made for encoder_decoder "
                                       "models, not encoder"):
    data.get_dataset("stdlib_span_corruption", {"inputs": 64, "targets": 16},
                     feature_converter="encoder")
  with pytest.raises(ValueError, match="'stdlib_clm' is made for decoder models, not enc"):
    data.get_dataset("stdlib_clm", CLM, feature_converter=seqio.EncDecFeatureConverter)
  # A task registered with seqio directly has no family: seqio's own check speaks, with context.
  seqio.TaskRegistry.add(
      "t5x_lite_pipeline_test_lm", seqio.FunctionDataSource(
          lambda split, shuffle_files: tf.data.Dataset.from_tensors({"targets": [5, 6, 1]}),
          splits=["train"]),
      output_features={"targets": seqio.Feature(data.DEFAULT_VOCABULARY)})
  try:
    with pytest.raises(ValueError, match="EncDecFeatureConverter does not fit "
                                         "'t5x_lite_pipeline_test_lm'"):
      data.get_dataset("t5x_lite_pipeline_test_lm", CLM, feature_converter="encoder_decoder")
  finally:
    seqio.TaskRegistry.remove("t5x_lite_pipeline_test_lm")


def test_empty_local_corpus_is_reported(tmp_path):
  (tmp_path / "empty.txt").write_text("\n\n")
  gin.bind_parameter("local_corpus.pattern", str(tmp_path / "*.txt"))
  it = data.get_dataset("local_clm", CLM, num_epochs=1)
  with pytest.raises(data.CorpusError, match="produced no batch"):
    next(it)


def test_same_seed_same_batches_and_hosts_get_different_shards():
  a, b = (batches("stdlib_clm", CLM, 3, seed=7) for _ in range(2))
  for x, y in zip(a, b):
    assert all(np.array_equal(x[k], y[k]) for k in x)
  shard0 = batches("stdlib_clm", CLM, 2, seed=7, shard_info=(0, 2))
  shard1 = batches("stdlib_clm", CLM, 2, seed=7, shard_info=seqio.ShardInfo(1, 2))
  rows = lambda bs: {r.tobytes() for b in bs for r in b["decoder_target_tokens"]}
  assert not rows(shard0) & rows(shard1)


def test_batch_iterator_saves_and_restores_its_position(tmp_path):
  it = data.get_dataset("stdlib_span_corruption", {"inputs": 64, "targets": 16}, seed=3)
  next(it)
  path = it.save(str(tmp_path / "ckpt"))
  expected = [next(it) for _ in range(2)]
  it.close()
  with pytest.raises(StopIteration):
    next(it)
  resumed = data.get_dataset("stdlib_span_corruption", {"inputs": 64, "targets": 16}, seed=3)
  resumed.restore(path)
  for want in expected:
    got = next(resumed)
    assert all(np.array_equal(got[k], want[k]) for k in want)
  resumed.close()


def test_evaluation_batches_are_fixed_and_padded_when_unpacked():
  first, second = (batches("addition", {"inputs": 32, "targets": 8}, 2, split="validation",
                           shuffle=False, pack=False, num_epochs=1) for _ in range(2))
  for x, y in zip(first, second):
    assert all(np.array_equal(x[k], y[k]) for k in x)
  assert "encoder_segment_ids" not in first[0]
  assert (first[0]["decoder_loss_weights"].sum(axis=1) >= 2).all()  # one example per row
  assert pipeline.default_model_family("addition") == "encoder_decoder"
  assert pipeline.default_model_family("stdlib_mlm") == "encoder"
