"""Feature converters: which seqio converter turns a task's features into a model's features.

The stock seqio converters cover decoder-only (`DecoderFeatureConverter`, which becomes
`PrefixLMFeatureConverter` when "inputs" is present) and encoder-decoder (`EncDecFeatureConverter`).

For BERT MLM, seqio's `EncoderFeatureConverter` puts loss only where the input is [MASK], which
misses the 10% random and 10% unchanged chosen tokens. `MLMFeatureConverter` keeps the same model
features but takes the loss weights from the task's "mlm_weights" feature (see
`preprocessors.mlm`), so the loss covers exactly the 15% chosen tokens. It falls back to the stock
behaviour for tasks without "mlm_weights".
"""
from __future__ import annotations

from typing import Mapping

import seqio
import tensorflow as tf

from t5x_lite.data import vocabularies

AUTOTUNE = tf.data.AUTOTUNE


class MLMFeatureConverter(seqio.EncoderFeatureConverter):
  """EncoderFeatureConverter whose loss weights mark every chosen MLM token.

  Model features (as seqio's): encoder_input_tokens, encoder_target_tokens, encoder_loss_weights,
  and when packing encoder_segment_ids, encoder_positions.
  """

  def __init__(self, mask_id: int | None = None, **kwargs):
    super().__init__(mask_id=vocabularies.mask_id() if mask_id is None else mask_id, **kwargs)

  def _convert_features(self, ds: tf.data.Dataset,
                        input_lengths: Mapping[str, int]) -> tf.data.Dataset:
    if "mlm_weights" not in ds.element_spec:
      return super()._convert_features(ds, input_lengths)
    # Pack/pad "mlm_weights" together with inputs/targets so the three stay aligned.
    lengths = dict(input_lengths, mlm_weights=input_lengths["inputs"])
    ds = self._pack_or_pad(ds, lengths)

    def convert(ex):
      out = {
          "encoder_input_tokens": ex["inputs"],
          "encoder_target_tokens": ex["targets"],
          # Stored as 1 + chosen (non-zero so the packer counts it); padding is 0.
          "encoder_loss_weights": tf.cast(tf.equal(ex["mlm_weights"], 2), tf.int32),
      }
      if self.pack:
        out["encoder_segment_ids"] = ex["inputs_segment_ids"]
        out["encoder_positions"] = ex["inputs_positions"]
      return out

    return ds.map(convert, num_parallel_calls=AUTOTUNE)


# Model family -> converter class. Model classes expose the same thing as FEATURE_CONVERTER_CLS.
CONVERTERS = {
    "encoder": MLMFeatureConverter,
    "decoder": seqio.DecoderFeatureConverter,
    "encoder_decoder": seqio.EncDecFeatureConverter,
}


def make_feature_converter(converter, pack: bool = True) -> seqio.FeatureConverter:
  """An instance from a converter instance, class (e.g. a model's FEATURE_CONVERTER_CLS) or family."""
  if isinstance(converter, seqio.FeatureConverter):
    return converter
  if isinstance(converter, str):
    if converter not in CONVERTERS:
      raise ValueError(f"Unknown model family {converter!r}; choose one of {sorted(CONVERTERS)}.")
    converter = CONVERTERS[converter]
  if isinstance(converter, type) and issubclass(converter, seqio.EncoderFeatureConverter):
    if converter is MLMFeatureConverter:
      return converter(pack=pack)
    return converter(mask_id=vocabularies.mask_id(), pack=pack)
  if isinstance(converter, type) and issubclass(converter, seqio.FeatureConverter):
    return converter(pack=pack)
  raise TypeError(f"Expected a seqio FeatureConverter class/instance or a model family name, "
                  f"got {converter!r}.")
