"""Models: a Flax module plus what training and inference need around it — batch validation,
parameter initialisation with logical axes, `loss_fn`, and `score_batch` / `predict_batch` /
`fill_mask` — for each family.

The batch features are those of seqio's feature converters (T5X names). The converter for each
`family` lives in `t5x_lite.data` (`get_dataset(..., feature_converter=model.family)`), so a task
only needs to provide `inputs`/`targets`.
"""
from __future__ import annotations

import functools
import os
from typing import Mapping, Optional, Sequence

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from t5x_lite import decoding, losses, transformer
from t5x_lite.config import TransformerConfig

Array = jax.Array
Batch = Mapping[str, Array]


class BaseModel:
  """What every family shares; subclasses set the module and the feature plumbing."""
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
    # Defaults of `predict_batch`; each call may override any field.
    self.decode_params = decoding.DecodeParams()
    self._compiled_fns = {}

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
  def check_batch(self, batch: Batch) -> None:
    missing = [name for name in self.REQUIRED_FEATURES if name not in batch]
    if missing:
      raise ValueError(
          f"{type(self).__name__} batch lacks features {missing} (has {sorted(batch)}); batches "
          f"must come from t5x_lite.data.get_dataset(..., feature_converter={self.family!r}), "
          "which produces them.")

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

  # -- inference --------------------------------------------------------------------------------
  def score_batch(self, params, batch: Batch) -> Array:
    """Log-likelihood of each row's targets [b]: sum of log p(target) over weighted tokens.

    For BERT this is the (pseudo-)log-likelihood of the tokens chosen for the MLM loss.
    """
    self.check_batch(batch)
    return self._compiled("_score")(params, dict(batch))

  def _score(self, params, batch):
    log_probs = jax.nn.log_softmax(self.logits(params, batch))
    targets, weights = self._targets(batch)
    token_scores = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(token_scores * weights, axis=-1)

  def predict_batch(self, params, batch: Batch, rng: Optional[Array] = None,
                    **decode_overrides) -> tuple[Array, Array]:
    """Decodes from the batch's prompts: tokens [b, n, N] and scores [b, n], best first.

    n is `num_decodes` (sampling) or `beam_size` (beam search); N is `max_new_tokens`; rows
    end at EOS and hold 0 after it. Any `decoding.DecodeParams` field may be given as a keyword
    to override `self.decode_params` for this call. Sampling uses `rng` (default PRNGKey(0)).
    Scores are log-likelihoods for samples and length-penalised ones for beams.
    """
    raise ValueError(f"{type(self).__name__} does not generate text; "
                     "use a decoder-only or encoder-decoder model.")

  def _decode_options(self, overrides) -> decoding.DecodeParams:
    return self.decode_params.replace(**overrides).validate(self.config.vocab_size)

  def _compiled(self, method: str, *static):
    """`jax.jit` of a method, with leading static arguments, compiled once per distinct value."""
    key = (method,) + static
    if key not in self._compiled_fns:
      self._compiled_fns[key] = jax.jit(functools.partial(getattr(self, method), *static))
    return self._compiled_fns[key]

  def _decoder(self, params):
    """`apply` of the module that decodes: layers unrolled, so that XLA updates each layer's
    cache in place; scanned parameters are unstacked once per call, outside the decoding loop."""
    module = type(self.module)(self.config.replace(scan_layers=False))
    if self.config.scan_layers:
      params = transformer.unstack_layers(params)
    return module, functools.partial(module.apply, {"params": params})


@gin.configurable(module="t5x_lite.models")
class EncoderOnlyModel(BaseModel):
  """BERT-style masked LM: loss only where `encoder_loss_weights` is nonzero (masked tokens)."""
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

  def fill_mask(self, params, tokens: Array, mask_id: int,
                top_k: int = 5) -> tuple[Array, Array, Array]:
    """The top_k predictions at each [MASK] of `tokens` [b, l] (0 is padding).

    Returns ids [b, l, k] and probabilities [b, l, k], best first, at every position, and the
    boolean [b, l] positions holding `mask_id`, where the predictions are the answer.
    """
    if not 1 <= top_k <= self.config.vocab_size:
      raise ValueError(f"top_k must be in [1, vocab_size={self.config.vocab_size}], got {top_k}.")
    tokens = jnp.asarray(tokens, jnp.int32)
    probs, ids = self._compiled("_fill_mask", top_k)(params, tokens)
    return ids, probs, tokens == mask_id

  def _fill_mask(self, top_k, params, tokens):
    probs = jax.nn.softmax(self.module.apply({"params": params}, tokens), axis=-1)
    return jax.lax.top_k(probs, top_k)


@gin.configurable(module="t5x_lite.models")
class DecoderOnlyModel(BaseModel):
  """GPT / LLaMA causal LM. With `inputs_bidirectional_attention`, batches from prefix-LM tasks
  (which carry `decoder_causal_attention`) see their inputs part bidirectionally."""
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

  def predict_batch(self, params, batch: Batch, rng: Optional[Array] = None,
                    **decode_overrides) -> tuple[Array, Array]:
    """Continues each row's prompt (see `BaseModel.predict_batch` for the outputs).

    The prompt of a row is its first sum(decoder_causal_attention) tokens of
    `decoder_input_tokens` (what seqio's PrefixLM converter marks: BOS and the inputs), or BOS
    alone without that feature. Prompts are right-padded; the whole batch is prefilled in one
    pass and every row continues from its own length.
    """
    options = self._decode_options(decode_overrides)
    if "decoder_input_tokens" not in batch:
      raise ValueError("DecoderOnlyModel.predict_batch needs decoder_input_tokens (BOS = 0, then "
                       "the prompt), and decoder_causal_attention marking it; got "
                       f"{sorted(batch)}.")
    tokens = jnp.asarray(batch["decoder_input_tokens"], jnp.int32)
    if "decoder_causal_attention" in batch:
      lengths = jnp.sum(jnp.asarray(batch["decoder_causal_attention"], jnp.int32), axis=1)
    else:
      lengths = jnp.ones(tokens.shape[:1], jnp.int32)
    static, traced = options.split()
    rng = jax.random.PRNGKey(0) if rng is None else rng
    return self._compiled("_predict", static)(params, tokens, lengths, rng, traced)

  def _predict(self, options, params, tokens, lengths, rng, traced):
    b, prompt_length = tokens.shape
    _, apply = self._decoder(params)
    cache = transformer.init_cache(self.config, b, prompt_length + options.max_new_tokens)
    segment_ids = (jnp.arange(prompt_length)[None, :] < lengths[:, None]).astype(jnp.int32)
    prefix = segment_ids if self.inputs_bidirectional_attention else None
    # Prefill: the whole prompt in one pass; each row continues after its last prompt token.
    logits, cache = apply(tokens * segment_ids, segment_ids, None, prefix, cache=cache,
                          logits_at=lengths - 1)

    def step(token, positions, cache):
      logits, cache = apply(token[:, None], None, positions[:, None], cache=cache)
      return logits[:, 0], cache

    return decoding.decode(step, logits[:, 0], cache, lengths, rng, options.join(traced),
                           transformer.cache_logical_axes(cache))


@gin.configurable(module="t5x_lite.models")
class EncoderDecoderModel(BaseModel):
  """T5: encoder over `encoder_input_tokens`, decoder teacher-forced on `decoder_input_tokens`."""
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

  def predict_batch(self, params, batch: Batch, rng: Optional[Array] = None,
                    **decode_overrides) -> tuple[Array, Array]:
    """Decodes targets for `encoder_input_tokens` (0 is padding), starting from BOS = 0 (see
    `BaseModel.predict_batch` for the outputs)."""
    options = self._decode_options(decode_overrides)
    if "encoder_input_tokens" not in batch:
      raise ValueError("EncoderDecoderModel.predict_batch needs encoder_input_tokens; got "
                       f"{sorted(batch)}.")
    static, traced = options.split()
    rng = jax.random.PRNGKey(0) if rng is None else rng
    return self._compiled("_predict", static)(
        params, jnp.asarray(batch["encoder_input_tokens"], jnp.int32),
        batch.get("encoder_segment_ids"), rng, traced)

  def _predict(self, options, params, encoder_tokens, encoder_segment_ids, rng, traced):
    b = encoder_tokens.shape[0]
    module, apply = self._decoder(params)
    encoded = apply(encoder_tokens, encoder_segment_ids, method=module.encode)
    # Slot 0 holds BOS; generated token t is fed back at position t + 1.
    cache = transformer.init_cache(self.config, b, 1 + options.max_new_tokens,
                                   encoder_tokens.shape[1])
    logits, cache = apply(encoded, encoder_tokens, jnp.zeros((b, 1), jnp.int32),
                          encoder_segment_ids, method=module.decode, cache=cache)

    def step(token, positions, cache):
      logits, cache = apply(None, None, token[:, None], decoder_positions=positions[:, None],
                            method=module.decode, cache=cache)
      return logits[:, 0], cache

    return decoding.decode(step, logits[:, 0], cache, jnp.ones((b,), jnp.int32), rng,
                           options.join(traced), transformer.cache_logical_axes(cache))


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
  # Not finalized: a locked config would refuse modules imported later that register
  # configurables (e.g. t5x_lite.data after loading a model).
  gin.parse_config_files_and_bindings([path], list(bindings), finalize_config=False)
  return gin.query_parameter("%MODEL").scoped_configurable_fn()
