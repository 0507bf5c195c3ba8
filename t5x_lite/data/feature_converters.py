"""Feature converters: which seqio converter turns a task's features into a model's features.

The converters here are seqio's, with two changes that leave the model features exactly as seqio
defines them:
  * packing uses `packing.trim_and_pack` (same rows as seqio's, several times faster on short
    examples, where seqio's packer would bottleneck a CPU trainer);
  * `MLMFeatureConverter` (below) puts the loss on every chosen MLM token.
Decoder-only: `DecoderFeatureConverter` (it becomes the prefix-LM converter when the task has
"inputs"); encoder-decoder: `EncDecFeatureConverter`; encoder-only: `MLMFeatureConverter`.

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

from t5x_lite.data import mixing
from t5x_lite.data import packing
from t5x_lite.data import vocabularies

AUTOTUNE = tf.data.AUTOTUNE
# Our dataset functions use no Python control flow on tensors, so AutoGraph conversion would only
# cost tracing time (tens of ms per function, seconds per pipeline).
plain = tf.autograph.experimental.do_not_convert


class _FastPacking:
  """Mixin: seqio's pack-or-pad step with the vectorised packer; a mixture's per-example task
  tags (mixing.TASK_FEATURE, one token per example) go through as a packed passthrough feature
  so the realised mix can be counted. They never change which examples share a row: their room
  (the sum of the feature lengths) is more than the examples any row can hold."""

  def __call__(self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]):
    if mixing.TASK_FEATURE not in ds.element_spec:
      return super().__call__(ds, task_feature_lengths)
    if not self.pack:  # unpacked rows (evaluation) are not counted
      ds = ds.map(plain(lambda ex: {k: v for k, v in ex.items() if k != mixing.TASK_FEATURE}))
      return super().__call__(ds, task_feature_lengths)
    # seqio checks the features exactly: the tags are a passthrough feature for this call (the
    # dataset functions are traced within it).
    saved = self._passthrough_features
    self._passthrough_features = dict(
        saved, **{mixing.TASK_FEATURE: seqio.FeatureConverter.FeatureSpec(dtype=tf.int32)})
    room = sum(task_feature_lengths.values())
    try:
      return super().__call__(ds, dict(task_feature_lengths, **{mixing.TASK_FEATURE: room}))
    finally:
      self._passthrough_features = saved

  def _pack_or_pad(self, ds: tf.data.Dataset, packed_lengths: Mapping[str, int]):
    if not self.pack:
      return super()._pack_or_pad(ds, packed_lengths)
    return packing.trim_and_pack(ds, packed_lengths)


class EncDecFeatureConverter(_FastPacking, seqio.EncDecFeatureConverter):
  pass


class LMFeatureConverter(_FastPacking, seqio.LMFeatureConverter):
  pass


class PrefixLMFeatureConverter(_FastPacking, seqio.PrefixLMFeatureConverter):
  pass


class DecoderFeatureConverter(seqio.DecoderFeatureConverter):
  """seqio's decoder converter (LM, or prefix LM when "inputs" is given), packing fast."""

  def __init__(self, loss_on_targets_only: bool = True, pack: bool = True, **kwargs):
    super().__init__(loss_on_targets_only=loss_on_targets_only, pack=pack, **kwargs)
    self.prefixlm_feature_converter = PrefixLMFeatureConverter(
        loss_on_targets_only=loss_on_targets_only, pack=pack, **kwargs)
    kwargs.pop("passthrough_features", None)  # as in seqio, the plain LM converter has none
    self.strictlm_feature_converter = LMFeatureConverter(pack=pack, **kwargs)


class MLMFeatureConverter(_FastPacking, seqio.EncoderFeatureConverter):
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
      if mixing.TASK_FEATURE in ex:
        out[mixing.TASK_FEATURE] = ex[mixing.TASK_FEATURE]
      return out

    return ds.map(plain(convert), num_parallel_calls=AUTOTUNE)


# Model family -> converter class (what each model's `feature_converter()` returns).
CONVERTERS = {
    "encoder": MLMFeatureConverter,
    "decoder": DecoderFeatureConverter,
    "encoder_decoder": EncDecFeatureConverter,
}


def converter_family(converter: seqio.FeatureConverter) -> str | None:
  """The model family a converter instance feeds, or None if it is not one of the three."""
  if isinstance(converter, seqio.EncoderFeatureConverter):
    return "encoder"
  if isinstance(converter, seqio.EncDecFeatureConverter):
    return "encoder_decoder"
  if isinstance(converter, (seqio.DecoderFeatureConverter, seqio.LMFeatureConverter)):
    return "decoder"  # the prefix-LM converter is an LMFeatureConverter too
  return None


def make_feature_converter(converter, pack: bool = True) -> seqio.FeatureConverter:
  """An instance from a converter instance, class or family name."""
  if isinstance(converter, seqio.FeatureConverter):
    return converter
  if isinstance(converter, str):
    if converter not in CONVERTERS:
      raise ValueError(f"Unknown model family {converter!r}; choose one of {sorted(CONVERTERS)}.")
    converter = CONVERTERS[converter]
  # The task already trims every feature to its length, and packing/padding produce exact
  # shapes, so seqio's per-example length asserts only cost time (and tracing time).
  kwargs = dict(pack=pack, apply_length_check=False)
  if isinstance(converter, type) and issubclass(converter, seqio.EncoderFeatureConverter):
    if issubclass(converter, MLMFeatureConverter):
      return converter(**kwargs)
    return converter(mask_id=vocabularies.mask_id(), **kwargs)
  if isinstance(converter, type) and issubclass(converter, seqio.FeatureConverter):
    return converter(**kwargs)
  raise TypeError(f"Expected a seqio FeatureConverter class/instance or a model family name, "
                  f"got {converter!r}.")
