"""t5x_lite/data/feature_converters.py: model features exactly as seqio's converters make them,
and MLM loss weights on every chosen token."""
import numpy as np
import pytest
import seqio
import tensorflow as tf

from t5x_lite.data import feature_converters as fc
from t5x_lite.data import vocabularies


def ragged_ds(rows):
  """Examples of 1-D int32 features, from a list of dicts of lists."""
  spec = {k: tf.TensorSpec([None], tf.int32) for k in rows[0]}
  return tf.data.Dataset.from_generator(
      lambda: ({k: np.asarray(v, np.int32) for k, v in r.items()} for r in rows),
      output_signature=spec)


def seq2seq_rows(n=40, seed=0):
  rng = np.random.default_rng(seed)
  return [{"inputs": list(rng.integers(3, 99, rng.integers(1, 12))) + [1],
           "targets": list(rng.integers(3, 99, rng.integers(1, 6))) + [1]} for _ in range(n)]


def convert(converter, rows, lengths):
  return list(converter(ragged_ds(rows), lengths).as_numpy_iterator())


@pytest.mark.parametrize("ours, stock, lengths", [
    (fc.EncDecFeatureConverter, seqio.EncDecFeatureConverter, {"inputs": 16, "targets": 8}),
    (fc.DecoderFeatureConverter, seqio.DecoderFeatureConverter, {"inputs": 16, "targets": 8}),
    (fc.DecoderFeatureConverter, seqio.DecoderFeatureConverter, {"targets": 16}),
])
def test_model_features_equal_seqios(ours, stock, lengths):
  rows = [{k: r[k] for k in lengths} for r in seq2seq_rows()]
  # seqio packs blocks of max(lengths) examples; ours takes bigger blocks. Give both one block's
  # worth so the rows must match exactly.
  rows = rows[:max(lengths.values())]
  a, b = convert(ours(pack=True), rows, lengths), convert(stock(pack=True), rows, lengths)
  assert len(a) == len(b) and len(a) < len(rows)  # several examples per row
  for x, y in zip(a, b):
    assert sorted(x) == sorted(y)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)
  if "inputs" not in lengths:  # once is enough: without packing rows are examples
    unpacked = convert(ours(pack=False), rows, lengths)
    assert len(unpacked) == len(rows) and not any("segment_ids" in k for k in unpacked[0])


def test_mlm_converter_weights_every_chosen_token_also_when_packed():
  rng = np.random.default_rng(0)
  mask = vocabularies.mask_id()
  rows, chosen_all = [], []
  for _ in range(30):
    n = int(rng.integers(2, 10))
    targets = rng.integers(3, 259, n)
    chosen = rng.random(n) < 0.4
    # Chosen tokens: some masked, some replaced, some unchanged (which seqio's stock converter,
    # looking only for [MASK], would miss).
    inputs = np.where(chosen & (rng.random(n) < 0.5), mask, targets)
    rows.append({"inputs": list(inputs) + [1], "targets": list(targets) + [1],
                 "mlm_weights": list(1 + chosen) + [1]})
    chosen_all.append(np.append(chosen, False))
  lengths = {"inputs": 32, "targets": 32}
  packed = convert(fc.MLMFeatureConverter(pack=True), rows, lengths)
  assert set(packed[0]) == {"encoder_input_tokens", "encoder_target_tokens", "encoder_loss_weights",
                            "encoder_segment_ids", "encoder_positions"}
  got = []
  for row in packed:
    seg = row["encoder_segment_ids"]
    for s in np.unique(seg[seg > 0]):
      got.append(row["encoder_loss_weights"][seg == s].astype(bool))
    assert not row["encoder_loss_weights"][seg == 0].any()
  assert len(got) == len(rows)
  for g, want in zip(got, chosen_all):
    np.testing.assert_array_equal(g, want)
  unpacked = convert(fc.MLMFeatureConverter(pack=False), rows, lengths)
  np.testing.assert_array_equal(unpacked[0]["encoder_loss_weights"][:len(chosen_all[0])],
                                chosen_all[0])


def test_mlm_converter_without_weights_falls_back_to_mask_positions():
  rows = [{"inputs": [5, 259, 7, 1], "targets": [5, 6, 7, 1]}]
  (out,) = convert(fc.MLMFeatureConverter(pack=False), rows, {"inputs": 6, "targets": 6})
  assert out["encoder_loss_weights"].tolist() == [0, 1, 0, 0, 0, 0]


def test_make_feature_converter_accepts_families_classes_and_instances():
  assert isinstance(fc.make_feature_converter("decoder"), fc.DecoderFeatureConverter)
  assert isinstance(fc.make_feature_converter("encoder_decoder"), fc.EncDecFeatureConverter)
  enc = fc.make_feature_converter("encoder", pack=False)
  assert isinstance(enc, fc.MLMFeatureConverter) and not enc.pack
  assert enc.mask_id == vocabularies.mask_id() == 259
  # seqio's own converter classes are accepted too; the mask id is filled in.
  stock = fc.make_feature_converter(seqio.EncoderFeatureConverter)
  assert type(stock) is seqio.EncoderFeatureConverter and stock.mask_id == 259
  instance = seqio.EncDecFeatureConverter(pack=False)
  assert fc.make_feature_converter(instance) is instance
  with pytest.raises(ValueError, match="Unknown model family 'gpt'"):
    fc.make_feature_converter("gpt")
  with pytest.raises(TypeError, match="FeatureConverter"):
    fc.make_feature_converter(42)
