"""Building blocks shared by the three families: dense, embedding, norms, MLP, positions, attention.

Every parameter is created through `_param`, which attaches logical axis names (`embed`, `heads`,
`kv`, `mlp`, `vocab`, ...). Only `partitioning.py` maps those names onto mesh axes, so a layer never
knows how it is sharded. Axis letters in einsum strings and shape comments: b batch, l query
length, s key length, d model width, h query heads, k key/value heads, g query heads per key/value
head, e head width, f MLP width, v vocabulary.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from t5x_lite import attention as attention_kernels
from t5x_lite.matmuls import dense_matmul, matmul_transposed, mixed_einsum
from t5x_lite.config import TransformerConfig
from t5x_lite.metrics import Average

Array = jax.Array
NEG_INF = -1e10  # Finite, so a fully masked row (padding) softmaxes to uniform instead of NaN.

default_kernel_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
default_embed_init = nn.initializers.normal(stddev=0.02)


def _param(module: nn.Module, name: str, init: Callable, shape: Sequence[int],
           axes: Sequence[str], dtype) -> Array:
  return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape), dtype)


param = _param  # for layers defined in other modules (t5x_lite.moe)


def constrain(x: Array, axes: Sequence[Optional[str]]) -> Array:
  """Sharding hint for an activation, by logical names (a no-op outside a mesh + rules context).

  The names are activation axes: `embed` here is looked up as `activation_embed` in
  `partitioning`'s rules, so an activation is split independently of the weights' `embed`.
  Prefixing in this one place keeps call sites short and means a new layer cannot pick up a
  parameter rule by mistake.
  """
  return nn.with_logical_constraint(
      x, tuple(None if axis is None else "activation_" + axis for axis in axes))


class DenseGeneral(nn.Module):
  """Contracts the trailing `len(in_axes)` dims of the input with a kernel [in..., out...]."""
  features: tuple[int, ...]
  in_axes: tuple[str, ...]
  out_axes: tuple[str, ...]
  use_bias: bool = False
  dtype: str = "float32"
  param_dtype: str = "float32"
  kernel_init: Callable = default_kernel_init
  fan_in_scale: float = 1.0  # Multiplies the initial kernel (T5 folds 1/sqrt(head_dim) into q).

  @nn.compact
  def __call__(self, x: Array) -> Array:
    n_in = len(self.in_axes)
    in_shape = x.shape[-n_in:]

    def init(key, shape, dtype):
      # Initialise as a 2-D matrix so fan-in is the full contracted size, then reshape.
      flat = self.kernel_init(key, (math.prod(in_shape), math.prod(self.features)), dtype)
      return (flat * self.fan_in_scale).reshape(shape)

    kernel = _param(self, "kernel", init, in_shape + tuple(self.features),
                    self.in_axes + self.out_axes, self.param_dtype)
    y = dense_matmul(x, kernel, n_in, self.dtype)
    if self.use_bias:
      bias = _param(self, "bias", nn.initializers.zeros, self.features, self.out_axes,
                    self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


# The name under which a decoding call's parameters also hold an Embed's table transposed, [d, v]
# (transformer.decoding_params makes it once per decode call, outside the decoding loop).
TRANSPOSED_TABLE = "embedding_transposed"


class Embed(nn.Module):
  """Token embedding table [v, d]; `attend` reuses it as the output projection (tied head)."""
  num_embeddings: int
  features: int
  dtype: str = "float32"
  param_dtype: str = "float32"
  axes: tuple[str, str] = ("vocab", "embed")

  def setup(self):
    self.embedding = _param(self, "embedding", default_embed_init,
                            (self.num_embeddings, self.features), self.axes, self.param_dtype)

  def __call__(self, ids: Array) -> Array:
    return jnp.take(self.embedding, ids, axis=0).astype(self.dtype)

  def attend(self, x: Array) -> Array:
    # float32 logits straight from the accumulator (the models' logits are float32).
    if self.has_variable("params", TRANSPOSED_TABLE) and math.prod(x.shape[:-1]) > 1:
      # Decoding several rows: XLA:CPU multiplies them by an [in, out] matrix faster than by
      # the [v, d] table it would read transposed; a single row is faster the other way round.
      table = self.get_variable("params", TRANSPOSED_TABLE)
      return dense_matmul(x, table, 1, self.dtype, jnp.float32)
    return matmul_transposed(x, self.embedding, self.dtype, jnp.float32)


class Norm(nn.Module):
  """LayerNorm (mean and variance) or RMSNorm (variance only); statistics in float32."""
  norm_type: str = "rmsnorm"
  eps: float = 1e-6
  use_bias: bool = False
  dtype: str = "float32"
  param_dtype: str = "float32"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x32 = x.astype(jnp.float32)
    if self.norm_type == "layernorm":
      x32 = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    scale = _param(self, "scale", nn.initializers.ones, (x.shape[-1],), ("embed",),
                   self.param_dtype)
    y = y * scale.astype(jnp.float32)
    if self.use_bias:
      y = y + _param(self, "bias", nn.initializers.zeros, (x.shape[-1],), ("embed",),
                     self.param_dtype).astype(jnp.float32)
    return y.astype(self.dtype)


def make_norm(config: TransformerConfig, name: Optional[str] = None) -> Norm:
  return Norm(config.norm_type, config.norm_eps, config.use_bias, config.dtype,
              config.param_dtype, name=name)


ACTIVATION_FNS = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
}


class Mlp(nn.Module):
  """Position-wise feed-forward: act(x W_i) W_o, or act(x W_i0) * (x W_i1) W_o when gated.

  With `remat_activation` the elementwise activation is recomputed in the backward pass
  instead of kept (the stack decides; see `transformer.Stack`)."""
  config: TransformerConfig
  deterministic: bool = True
  remat_activation: bool = False

  @nn.compact
  def __call__(self, x: Array, token_mask: Optional[Array] = None) -> Array:
    del token_mask  # every token takes the same path through a dense MLP
    cfg = self.config
    dense = lambda features, in_axes, out_axes, name: DenseGeneral(
        (features,), in_axes, out_axes, cfg.use_bias, cfg.dtype, cfg.param_dtype, name=name)
    act = ACTIVATION_FNS[cfg.activation]
    gate = (lambda a, b: act(a) * b) if cfg.gated_mlp else act
    if self.remat_activation:
      gate = jax.checkpoint(gate, prevent_cse=False)
    if cfg.gated_mlp:
      h = gate(dense(cfg.d_ff, ("embed",), ("mlp",), "wi_0")(x),
               dense(cfg.d_ff, ("embed",), ("mlp",), "wi_1")(x))
    else:
      h = gate(dense(cfg.d_ff, ("embed",), ("mlp",), "wi")(x))
    h = constrain(h, ("batch", "length", "mlp"))
    h = nn.Dropout(cfg.dropout_rate)(h, deterministic=self.deterministic)
    return dense(cfg.d_model, ("mlp",), ("embed",), "wo")(h)


# The MLP kinds `TransformerConfig.mlp` chooses from: name -> module class taking (config,
# deterministic, remat_activation, name=) and called on (x [b, l, d], token_mask [b, l] or None:
# False at padding, which a kind that routes tokens leaves out). A new kind registers itself with
# `register_mlp` in its own module; t5x_lite.moe's "moe" is imported by the transformer.
MLP_KINDS: dict[str, type[nn.Module]] = {"dense": Mlp}


def register_mlp(kind: str, module_class: type[nn.Module]) -> None:
  MLP_KINDS[kind] = module_class


def make_mlp(config: TransformerConfig, deterministic: bool, remat_activation: bool,
             name: str, kind: Optional[str] = None) -> nn.Module:
  """The MLP of kind `kind` (default `config.mlp`)."""
  kind = config.mlp if kind is None else kind
  if kind not in MLP_KINDS:
    raise ValueError(f"TransformerConfig.mlp={kind!r} is not a registered MLP kind; "
                     f"registered: {sorted(MLP_KINDS)} (import the module that registers it, "
                     "e.g. with a gin `import` line).")
  return MLP_KINDS[kind](config, deterministic, remat_activation, name=name)


# Layers add auxiliary loss terms (e.g. an MoE load-balancing loss, already weighted) with
# `self.sow(AUX_LOSSES, name, value)`; the models add every sown term to the loss. Statistics to
# report but not to minimise (an MoE layer's dropped tokens) are sown into SOWN_METRICS as
# [total, count] pairs and reported as the mean total / count over layers and microbatches.
AUX_LOSSES = "aux_losses"
SOWN_METRICS = "sown_metrics"
SOWN_COLLECTIONS = (AUX_LOSSES, SOWN_METRICS, "intermediates")  # carried by the stacks


def _sown_by_name(tree, pairs: bool) -> dict[str, Array]:
  """Sown values summed by name (the last dict key of their path) over layers: to a scalar, or
  with `pairs` to one [total, count] pair."""
  totals: dict[str, Array] = {}
  for path, value in jax.tree_util.tree_flatten_with_path(tree)[0]:
    name = next(str(k.key) for k in reversed(path) if isinstance(k, jax.tree_util.DictKey))
    value = jnp.asarray(value, jnp.float32)
    value = value.reshape(-1, 2).sum(0) if pairs else jnp.sum(value)
    totals[name] = totals.get(name, 0.0) + value
  return totals


def add_sown(loss: Array, metrics: dict, sown: dict) -> tuple[Array, dict]:
  """`loss` plus every auxiliary loss layers sowed (summed over layers), each also reported as
  the metric "aux/<name>" weighted like the loss; every sown metric reported under its name."""
  losses = _sown_by_name(sown.get(AUX_LOSSES, {}), pairs=False)
  weight = metrics["loss"].count
  for name, value in losses.items():
    loss = loss + value
    metrics[f"aux/{name}"] = Average.of(value, weight)
  if losses:
    aux = sum(losses.values())
    metrics["loss"] = Average(metrics["loss"].total + aux * weight, weight)
  for name, pair in _sown_by_name(sown.get(SOWN_METRICS, {}), pairs=True).items():
    metrics[name] = Average(pair[0], pair[1])
  return loss, metrics


# ----------------------------------------------------------------------------------------------
# Positions
# ----------------------------------------------------------------------------------------------
def sinusoidal_embedding(positions: Array, features: int, dtype) -> Array:
  """The 2017 Transformer's table: sin on even and cos on odd channels. [b, l] -> [b, l, d]."""
  inv_freq = 1.0 / (10_000.0 ** (jnp.arange(0, features, 2, dtype=jnp.float32) / features))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq
  table = jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1)
  return table.reshape(*positions.shape, -1)[..., :features].astype(dtype)


def apply_rope(x: Array, positions: Array, theta: float) -> Array:
  """Rotary embedding over the two halves of the head dim (the LLaMA layout). x [b, l, h, e]."""
  half = x.shape[-1] // 2
  inv_freq = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) / half))
  angles = positions.astype(jnp.float32)[:, :, None, None] * inv_freq  # [b, l, 1, e/2]
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def relative_position_bucket(relative_position: Array, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> Array:
  """T5's buckets: exact for small distances, logarithmic up to `max_distance`, then clipped.

  `relative_position` is key position minus query position.
  """
  bucket = 0
  if bidirectional:
    num_buckets //= 2
    bucket = (relative_position > 0).astype(jnp.int32) * num_buckets
    distance = jnp.abs(relative_position)
  else:
    distance = jnp.maximum(-relative_position, 0)
  max_exact = num_buckets // 2
  # Clamp to 1 inside the log so distance 0 (handled by the exact branch) never yields -inf.
  log_ratio = jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / max_exact)
  large = max_exact + (log_ratio / math.log(max_distance / max_exact)
                       * (num_buckets - max_exact)).astype(jnp.int32)
  large = jnp.minimum(large, num_buckets - 1)
  return bucket + jnp.where(distance < max_exact, distance, large)


class RelativePositionBias(nn.Module):
  """One [buckets, h] table per stack, shared by all of its layers (as in T5)."""
  config: TransformerConfig
  bidirectional: bool

  @nn.compact
  def __call__(self, q_positions: Array, k_positions: Array) -> Array:
    """[b, l], [b, s] -> additive attention bias [b, h, l, s]; for the blockwise kernel the
    table and positions it computes its blocks from (attention.RelativeBias)."""
    cfg = self.config
    table = _param(self, "rel_embedding", default_embed_init,
                   (cfg.relative_num_buckets, cfg.num_heads), ("relpos_buckets", "heads"),
                   cfg.param_dtype)
    if cfg.attention_implementation == "blockwise":
      return attention_kernels.RelativeBias(table, q_positions, k_positions, self.bidirectional,
                                            cfg.relative_max_distance)
    buckets = relative_position_bucket(k_positions[:, None, :] - q_positions[:, :, None],
                                       self.bidirectional, cfg.relative_num_buckets,
                                       cfg.relative_max_distance)
    return jnp.take(table, buckets, axis=0).transpose(0, 3, 1, 2).astype(jnp.float32)


# ----------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------
def attention_mask(q_segment_ids: Array, k_segment_ids: Array, *, causal: bool = False,
                   q_positions: Optional[Array] = None, k_positions: Optional[Array] = None,
                   q_prefix: Optional[Array] = None,
                   k_prefix: Optional[Array] = None) -> attention_kernels.Mask:
  """Boolean [b, 1, l, s]: True where query may attend to key.

  Tokens attend only within their own packed segment (segment id 0 is padding). Causality is
  by position, which is what makes packed rows and cached decoding agree. With a prefix (prefix
  LM), tokens inside the prefix also see each other bidirectionally. Kept as the vectors it is
  made of (attention.Mask: `.dense()` or indexing gives the array), so that the blockwise and
  splash kernels never build the [b, 1, l, s] array.
  """
  return attention_kernels.Mask(q_segment_ids, k_segment_ids, q_positions, k_positions,
                                q_prefix, k_prefix, causal)


def dot_product_attention(q: Array, k: Array, v: Array, mask: Array, bias: Optional[Array] = None,
                          *, scale: float = 1.0, implementation: str = "xla",
                          dropout_rate: float = 0.0, dropout_rng: Optional[Array] = None,
                          kv_heads_first: bool = False) -> Array:
  """softmax(q k^T * scale + bias, masked) v, with grouped K/V heads.

  q [b, l, h, e], k/v [b, s, k, e] where k divides h (or [b, k, s, e] with `kv_heads_first`, the
  decoding cache's layout, which the einsums read without transposing); mask [b, 1, l, s];
  bias [b|1, h, l, s]. "xla" runs anywhere (and supports attention dropout); "cudnn" is the fused
  flash kernel of `jax.nn.dot_product_attention` on NVIDIA GPUs; "blockwise" (any backend) and
  "splash" (TPU) never hold the [b, h, l, s] logits (t5x_lite.attention). Decoding steps
  (`kv_heads_first`: one query row per step) take the "xla" path whatever the choice.
  """
  if implementation in ("blockwise", "splash") and not kv_heads_first:
    if dropout_rate > 0.0 and dropout_rng is not None:
      raise ValueError(f"attention_implementation={implementation!r} does not support attention "
                       "dropout; set dropout_rate=0.0 or attention_implementation='xla'.")
    if implementation == "splash":
      return attention_kernels.splash_attention(q, k, v, mask, bias, scale=scale)
    return attention_kernels.blockwise_attention(q, k, v, mask, bias, scale=scale)
  mask, bias = attention_kernels.dense_mask(mask), attention_kernels.dense_bias(bias)
  if implementation == "cudnn":
    _check_cudnn(q.dtype)
    if dropout_rate > 0.0 and dropout_rng is not None:
      raise ValueError("attention_implementation='cudnn' does not support attention dropout; set "
                       "dropout_rate=0.0 or attention_implementation='xla'.")
    if kv_heads_first:
      k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    try:
      return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale,
                                          implementation="cudnn")
    except RuntimeError as error:  # e.g. "cuDNN is not detected." on a GPU without it
      raise RuntimeError(f"attention_implementation='cudnn' failed ({error}): it needs an NVIDIA "
                         "GPU with cuDNN; set TransformerConfig.attention_implementation='xla' "
                         "elsewhere.") from error
  b, l, h, e = q.shape
  kv = "bkse" if kv_heads_first else "bske"
  kv_heads = k.shape[kv.index("k")]
  q = q.reshape(b, l, kv_heads, h // kv_heads, e)
  logits = mixed_einsum(f"blkge,{kv}->bkgls", q, k, q.dtype, jnp.float32) * scale
  if bias is not None:
    logits = logits + bias.reshape(bias.shape[0], kv_heads, h // kv_heads, l, -1)
  logits = jnp.where(mask[:, :, None], logits, NEG_INF)
  probs = jax.nn.softmax(logits, axis=-1)
  if dropout_rate > 0.0 and dropout_rng is not None:
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
    probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
  if kv_heads_first:
    # The cached values as the dot's first operand: with the probabilities first, XLA:CPU copies
    # every layer's whole value cache into [b, k, e, s] at each single-token decoding step.
    out = mixed_einsum("bkse,bkgls->blkge", v, probs, v.dtype)
  else:
    out = mixed_einsum(f"bkgls,{kv}->blkge", probs, v, v.dtype)
  return out.reshape(b, l, h, e)


def _check_cudnn(dtype) -> None:
  """Refuse, saying why and what to set instead, what cuDNN's fused attention cannot run (jax's
  own errors for these are "cuDNN is not detected." and "Q must be fp16/bf16/...")."""
  backend = jax.default_backend()
  if backend != "gpu":
    raise ValueError(
        f"TransformerConfig.attention_implementation='cudnn' needs an NVIDIA GPU (cuDNN's fused "
        f"attention kernel), but JAX runs on {backend!r}; use attention_implementation='xla' "
        "there (e.g. --gin.TransformerConfig.attention_implementation=\"'xla'\").")
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    raise ValueError(
        f"TransformerConfig.attention_implementation='cudnn' needs bfloat16 or float16 compute; "
        f"cuDNN has no {jnp.dtype(dtype).name} fused attention. Set TransformerConfig.dtype="
        "'bfloat16' (parameters may stay float32), or attention_implementation='xla'.")


def _fused_qkv_init(q_scale: float, q_columns: int) -> Callable:
  """The fused kernel's initialiser, seen as DenseGeneral's [d, 3 h e] matrix: the separate
  kernels' distribution (fan-in d for each), with the query's `q_scale` on its first h e columns."""
  def init(key, shape, dtype):
    kernel = default_kernel_init(key, shape, dtype)
    return kernel.at[:, :q_columns].multiply(jnp.asarray(q_scale, kernel.dtype))
  return init


class Attention(nn.Module):
  """Multi-head attention with grouped K/V heads (MHA when k == h, MQA when k == 1).

  Used for self-attention (`inputs_kv` is `inputs_q`) and cross-attention alike. RoPE, when the
  config asks for it, rotates queries and keys by their positions.

  With `config.fused_qkv`, self-attention projects queries, keys and values with one kernel
  "qkv" [d, 3, h, e] (index 0/1/2 of the second axis = query/key/value, each laid out as the
  separate kernels [d, h, e]); cross-attention keeps its own query/key/value. Whether a call is
  self-attention is `self_attention`, or when that is None whether `inputs_kv is inputs_q`.

  With a `cache` ({"key", "value"}, each [b, k, s, e]: heads before length, so the attention
  einsums read it without transposing) the call also returns the updated cache:
    - self-attention (`cache_index` given): this call's keys and values are written into slots
      [cache_index, cache_index + l) and the queries attend over all s slots (the caller's `mask`
      says which slots are filled and visible). Keys are stored after RoPE, at their own positions.
    - cross-attention (`cache_index` None): the projected encoder keys and values are stored when
      `inputs_kv` is given (the first decoding call) and reused as they are when it is None.
  """
  config: TransformerConfig
  deterministic: bool = True
  rotary: bool = False  # Self-attention of RoPE models; cross-attention carries no positions.
  self_attention: Optional[bool] = None  # None: `inputs_kv is inputs_q`.

  @nn.compact
  def __call__(self, inputs_q: Array, inputs_kv: Optional[Array], mask: Array,
               bias: Optional[Array] = None, q_positions: Optional[Array] = None,
               k_positions: Optional[Array] = None, cache: Optional[dict] = None,
               cache_index: Optional[Array] = None):
    cfg = self.config
    h, k, e = cfg.num_heads, cfg.resolved_num_kv_heads, cfg.resolved_head_dim
    # T5 does not scale the logits; it folds 1/sqrt(e) into the query's initialisation instead.
    q_scale = 1.0 if cfg.scale_attention else e ** -0.5
    is_self = self.self_attention if self.self_attention is not None else inputs_kv is inputs_q
    if cfg.fused_qkv and is_self:
      qkv = DenseGeneral((3, h, e), ("embed",), ("qkv", "heads", "kv"), cfg.use_bias, cfg.dtype,
                         cfg.param_dtype, kernel_init=_fused_qkv_init(q_scale, h * e),
                         name="qkv")(inputs_q)
      qkv = constrain(qkv, ("batch", "length", "qkv", "heads", "kv"))
      query, key, value = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    else:
      proj = lambda heads, head_axis, name, fan_in_scale=1.0: DenseGeneral(
          (heads, e), ("embed",), (head_axis, "kv"), cfg.use_bias, cfg.dtype, cfg.param_dtype,
          fan_in_scale=fan_in_scale, name=name)
      query = proj(h, "heads", "query", q_scale)(inputs_q)
      key = value = None  # Cached cross-attention: the encoder's keys are in the cache.
      if inputs_kv is not None:
        key = proj(k, "kv_heads", "key")(inputs_kv)
        value = proj(k, "kv_heads", "value")(inputs_kv)
    if self.rotary:
      query = apply_rope(query, q_positions, cfg.rope_theta)
      if key is not None:
        key = apply_rope(key, q_positions if cache is not None else k_positions, cfg.rope_theta)
    query = constrain(query, ("batch", "length", "heads", "kv"))
    if cache is not None:
      cache = self._update_cache(cache, cache_index, key, value)
      key, value = cached_kv(cache, cfg.dtype)

    use_dropout = cfg.dropout_rate > 0.0 and not self.deterministic
    out = dot_product_attention(
        query, key, value, mask, bias,
        scale=e ** -0.5 if cfg.scale_attention else 1.0,
        implementation=cfg.attention_implementation,
        dropout_rate=cfg.dropout_rate if use_dropout else 0.0,
        dropout_rng=self.make_rng("dropout") if use_dropout else None,
        kv_heads_first=cache is not None)
    out = constrain(out, ("batch", "length", "heads", "kv"))
    out = DenseGeneral((cfg.d_model,), ("heads", "kv"), ("embed",), cfg.use_bias, cfg.dtype,
                       cfg.param_dtype, name="out")(out)
    if cache is None:
      return out
    return out, cache

  @staticmethod
  def _update_cache(cache, cache_index, key, value):
    """The cache after this call (see the class docstring; an int8 cache, see `int8_kv_cache`,
    stores this call's keys and values quantized); `key` and `value` [b, l, k, e] are this
    call's projections, None for cached cross-attention."""
    if key is None:
      return cache
    new = {"key": key.transpose(0, 2, 1, 3), "value": value.transpose(0, 2, 1, 3)}
    new = quantize_kv(new) if "key_scale" in cache else {
        name: x.astype(cache[name].dtype) for name, x in new.items()}
    if cache_index is not None:
      new = {name: jax.lax.dynamic_update_slice_in_dim(cache[name], x, cache_index, axis=2)
             for name, x in new.items()}
    return {name: constrain(x, ("batch", "kv_heads", "length", "kv")[:x.ndim])
            for name, x in new.items()}


# An int8 KV cache holds, for each of "key" and "value" [b, k, s, e], int8 values and
# "<name>_scale" float32 [b, k, s]: one absmax scale per row, head and slot, so a token written
# later never changes the scale of one written before. t5x_lite.quantization turns a decoding
# cache into one (QuantizedModel(kv_cache="int8")).
def quantize_kv(cache: dict) -> dict:
  """An int8 cache of the float "key" / "value" arrays [b, k, s, e] of `cache`."""
  out = {}
  for name in ("key", "value"):
    x = cache[name].astype(jnp.float32)
    scale = jnp.max(jnp.abs(x), axis=-1) / 127.0
    scale = jnp.where(scale == 0, 1.0, scale)
    out[name] = jnp.clip(jnp.round(x / scale[..., None]), -127, 127).astype(jnp.int8)
    out[f"{name}_scale"] = scale
  return out


def cached_kv(cache: dict, dtype) -> tuple[Array, Array]:
  """The keys and values [b, k, s, e] a cache holds, dequantized (as `dtype`) if int8."""
  if "key_scale" not in cache:
    return cache["key"], cache["value"]
  return tuple((cache[name].astype(jnp.float32) * cache[f"{name}_scale"][..., None]).astype(dtype)
               for name in ("key", "value"))
