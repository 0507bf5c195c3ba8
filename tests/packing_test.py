"""t5x_lite/data/packing.py: the same rows as seqio's packer, and no example leaks into another."""
import numpy as np
import pytest
import seqio
import tensorflow as tf

from t5x_lite.data import packing

LENGTHS = {"inputs": 24, "targets": 10}


def examples(n=120, seed=0):
  rng = np.random.default_rng(seed)
  # Some empty inputs and over-long ones (trimmed) on purpose.
  return [{"inputs": rng.integers(1, 50, rng.integers(0, 30)).astype(np.int32),
           "targets": rng.integers(1, 50, rng.integers(1, 9)).astype(np.int32)}
          for _ in range(n)]


def dataset(exs):
  spec = {k: tf.TensorSpec([None], tf.int32) for k in ("inputs", "targets")}
  return tf.data.Dataset.from_generator(lambda: iter(exs), output_signature=spec)


@pytest.mark.parametrize("lengths", [LENGTHS, {"inputs": 7, "targets": 30}, {"targets": 16}])
def test_same_rows_as_seqio(lengths):
  exs = examples()
  ds = dataset(exs).map(lambda ex: {k: ex[k] for k in lengths})
  block = max(lengths.values())  # seqio's block size
  ours = list(packing.trim_and_pack(ds, lengths, block_size=block).as_numpy_iterator())
  theirs = list(seqio.utils.trim_and_pack_dataset(ds, lengths).as_numpy_iterator())
  assert len(ours) == len(theirs) > 0
  for a, b in zip(ours, theirs):
    assert sorted(a) == sorted(b)
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_every_example_comes_back_whole_and_alone_in_its_segment():
  exs = examples(seed=1)
  rows = list(packing.trim_and_pack(dataset(exs), LENGTHS, block_size=256).as_numpy_iterator())
  recovered = {"inputs": [], "targets": []}
  for row in rows:
    for k, out in recovered.items():
      seg, pos, tok = row[k + "_segment_ids"], row[k + "_positions"], row[k]
      assert ((seg == 0) == (tok == 0)).all()  # padding, and only padding, has segment 0
      assert (np.diff(seg[seg > 0]) >= 0).all()  # segments are contiguous, in order
      for s in np.unique(seg[seg > 0]):
        where = np.flatnonzero(seg == s)
        assert (np.diff(where) == 1).all()
        np.testing.assert_array_equal(pos[where], np.arange(len(where)))
        out.append(tok[where])
    # inputs and targets of the same example share a segment id.
    assert row["inputs_segment_ids"].max() <= row["targets_segment_ids"].max()
  expected_targets = [e["targets"] for e in exs]
  expected_inputs = [e["inputs"][:24] for e in exs if len(e["inputs"])]
  assert len(recovered["targets"]) == len(expected_targets)
  for got, want in zip(recovered["targets"], expected_targets):
    np.testing.assert_array_equal(got, want)
  for got, want in zip(recovered["inputs"], expected_inputs):
    np.testing.assert_array_equal(got, want)


def test_bigger_blocks_fill_rows_better():
  exs = examples(n=240, seed=2)
  small = list(packing.trim_and_pack(dataset(exs), LENGTHS, block_size=24))
  big = list(packing.trim_and_pack(dataset(exs), LENGTHS, block_size=240))
  assert len(big) < len(small)


def test_refuses_missing_or_multi_dimensional_features():
  ds = tf.data.Dataset.from_tensors({"targets": tf.zeros([2, 3], tf.int32)})
  with pytest.raises(ValueError, match="'inputs' to pack is missing"):
    packing.trim_and_pack(ds, {"inputs": 4})
  with pytest.raises(ValueError, match="1-D"):
    packing.trim_and_pack(ds, {"targets": 4})
