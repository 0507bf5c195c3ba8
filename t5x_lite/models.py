"""Models: a Flax module plus what training needs around it — batch validation, parameter
initialisation with logical axes, and `loss_fn` — for each family.

The batch features are those of seqio's feature converters (T5X names); `FEATURE_CONVERTER`
names the converter that produces them, so a task only needs to provide `inputs`/`targets`.
"""
from __future__ import annotations

import os
from typing import Mapping, Optional, Sequence

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from t5x_lite import losses, transformer
from t5x_lite.config import TransformerConfig

Array = jax.Array
Batch = Mapping[str, Array]


class BaseModel:
  """What every family shares; subclasses set the module and the feature plumbing."""
  FEATURE_CONVERTER = ""  # Name of the seqio feature converter class producing our batches.
  REQUIRED_FEATURES: tuple[str, ...] = ()
  family = ""

  def __init__(self, config: TransformerConfig, z_loss: float = 1e-4,
               label_smoothing: float = 0.0):
    if config.family != self.family:
      raise ValueError(f"{type(self).__name__} needs TransformerConfig.family={self.family!r}, "
                       f"got {config.family!r}; use the model class of that family.")
    self.config = config
    self.z_loss = z_loss
    self.label_smoothing = label_smoothing

  # -- subclass hooks ---------------------------------------------------------------------------
  @property
  def module(self) -> nn.Module:
    raise NotImplementedError

  def _module_args(self, batch: Batch) -> tuple:
    """The module's positional arguments, taken from the batch."""
    raise NotImplementedError

  def _targets(self, batch: Batch) -> tuple[Array, Optional[Array]]:
    raise NotImplementedError

  # -- shared API -------------------------------------------------------------------------------
  @property
  def feature_converter_cls(self):
    import seqio  # Imported lazily: seqio pulls in TensorFlow, which pure model use never needs.
    return getattr(seqio, self.FEATURE_CONVERTER)

  def check_batch(self, batch: Batch) -> None:
    missing = [name for name in self.REQUIRED_FEATURES if name not in batch]
    if missing:
      raise ValueError(
          f"{type(self).__name__} batch lacks features {missing} (has {sorted(batch)}); batches "
          f"must come from seqio.{self.FEATURE_CONVERTER}, which produces them.")

  def dummy_batch(self, batch_size: int, lengths: Mapping[str, int]) -> dict[str, Array]:
    """Zeros shaped like a real batch; `lengths` maps "inputs"/"targets" to feature lengths."""
    batch = {}
    for name in self.REQUIRED_FEATURES:
      length = lengths["inputs" if name.startswith("encoder") else "targets"]
      batch[name] = jnp.zeros((batch_size, length), jnp.int32)
    return batch

  def init(self, rng: Array, batch: Batch):
    """Initial parameters (a plain pytree of arrays) for batches shaped like `batch`."""
    return nn.meta.unbox(self._init_boxed(rng, batch))

  def _init_boxed(self, rng, batch):
    """Parameters wrapped in flax's LogicallyPartitioned boxes (they carry the axis names)."""
    self.check_batch(batch)
    return self.module.init(rng, *self._module_args(batch), deterministic=True)["params"]

  def abstract_params(self, batch: Batch):
    """(parameter shapes/dtypes, logical PartitionSpecs) without allocating anything."""
    boxed = jax.eval_shape(self._init_boxed, jax.random.PRNGKey(0), batch)
    return nn.meta.unbox(boxed), nn.get_partition_spec(boxed)

  def num_params(self, batch: Optional[Batch] = None) -> int:
    batch = batch or self.dummy_batch(1, {"inputs": 8, "targets": 8})
    shapes, _ = self.abstract_params(batch)
    return sum(x.size for x in jax.tree.leaves(shapes))

  def logits(self, params, batch: Batch, dropout_rng: Optional[Array] = None) -> Array:
    """Teacher-forced logits [b, l, v]; dropout is on iff a `dropout_rng` is given."""
    rngs = None if dropout_rng is None else {"dropout": dropout_rng}
    return self.module.apply({"params": params}, *self._module_args(batch), rngs=rngs,
                             deterministic=dropout_rng is None)

  def loss_fn(self, params, batch: Batch,
              dropout_rng: Optional[Array] = None) -> tuple[Array, dict[str, Array]]:
    """Mean cross entropy (+ z-loss) over target tokens, and T5X's metrics."""
    self.check_batch(batch)
    logits = self.logits(params, batch, dropout_rng)
    targets, weights = self._targets(batch)
    return losses.cross_entropy_with_logits(
        logits, targets, weights, label_smoothing=self.label_smoothing, z_loss=self.z_loss)


@gin.configurable(module="t5x_lite.models")
class EncoderOnlyModel(BaseModel):
  """BERT-style masked LM: loss only where `encoder_loss_weights` is nonzero (masked tokens)."""
  FEATURE_CONVERTER = "EncoderFeatureConverter"
  REQUIRED_FEATURES = ("encoder_input_tokens", "encoder_target_tokens", "encoder_loss_weights")
  family = "encoder"

  @property
  def module(self):
    return transformer.EncoderOnly(self.config)

  def _module_args(self, batch):
    return (batch["encoder_input_tokens"], batch.get("encoder_segment_ids"),
            batch.get("encoder_positions"))

  def _targets(self, batch):
    return batch["encoder_target_tokens"], batch["encoder_loss_weights"]


@gin.configurable(module="t5x_lite.models")
class DecoderOnlyModel(BaseModel):
  """GPT / LLaMA causal LM. With `inputs_bidirectional_attention`, batches from prefix-LM tasks
  (which carry `decoder_causal_attention`) see their inputs part bidirectionally."""
  FEATURE_CONVERTER = "DecoderFeatureConverter"
  REQUIRED_FEATURES = ("decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights")
  family = "decoder"

  def __init__(self, config: TransformerConfig, z_loss: float = 1e-4,
               label_smoothing: float = 0.0, inputs_bidirectional_attention: bool = False):
    super().__init__(config, z_loss, label_smoothing)
    self.inputs_bidirectional_attention = inputs_bidirectional_attention

  @property
  def module(self):
    return transformer.DecoderOnly(self.config)

  def _module_args(self, batch):
    prefix = None
    if self.inputs_bidirectional_attention:
      prefix = batch.get("decoder_causal_attention")
    return (batch["decoder_input_tokens"], batch.get("decoder_segment_ids"),
            batch.get("decoder_positions"), prefix)

  def _targets(self, batch):
    return batch["decoder_target_tokens"], batch["decoder_loss_weights"]


@gin.configurable(module="t5x_lite.models")
class EncoderDecoderModel(BaseModel):
  """T5: encoder over `encoder_input_tokens`, decoder teacher-forced on `decoder_input_tokens`."""
  FEATURE_CONVERTER = "EncDecFeatureConverter"
  REQUIRED_FEATURES = ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens",
                       "decoder_loss_weights")
  family = "encoder_decoder"

  @property
  def module(self):
    return transformer.EncoderDecoder(self.config)

  def _module_args(self, batch):
    return (batch["encoder_input_tokens"], batch["decoder_input_tokens"],
            batch.get("encoder_segment_ids"), batch.get("decoder_segment_ids"),
            batch.get("encoder_positions"), batch.get("decoder_positions"))

  def _targets(self, batch):
    return batch["decoder_target_tokens"], batch["decoder_loss_weights"]


def param_logical_specs_to_str(specs) -> dict:
  """Logical axes of every parameter as strings, for inspection and golden tests."""
  flat = jax.tree_util.tree_flatten_with_path(
      specs, is_leaf=lambda x: isinstance(x, PartitionSpec))[0]
  return {"/".join(str(getattr(k, "key", k)) for k in path): tuple(spec) for path, spec in flat}


PRESET_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "gin_configs", "models")


def from_gin(preset: str, bindings: Sequence[str] = ()) -> BaseModel:
  """The `MODEL` defined by a gin file: a path, or a preset name in gin_configs/models/.

  Clears gin's global config first, so call it before parsing a run's own gin files.
  """
  path = preset if os.path.exists(preset) else os.path.join(PRESET_DIR, preset + ".gin")
  if not os.path.exists(path):
    names = sorted(f[:-4] for f in os.listdir(PRESET_DIR) if f.endswith(".gin"))
    raise ValueError(f"No model preset {preset!r}: not a file, and not one of {names}.")
  gin.clear_config()
  gin.parse_config_files_and_bindings([path], list(bindings))
  return gin.query_parameter("%MODEL").scoped_configurable_fn()
