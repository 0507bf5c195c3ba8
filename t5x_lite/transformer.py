"""The three families as Flax modules: `EncoderOnly` (BERT), `DecoderOnly` (GPT/LLaMA) and
`EncoderDecoder` (T5), built from one residual `Block` stacked by `Stack`.

Inputs are token ids plus, for packed batches, segment ids and positions as seqio's feature
converters produce them; without them every row is one example and id 0 is padding. Outputs are
logits [b, l, v] in float32, or with `output_head=True` the head's inputs (`losses.OutputHead`:
features and the projection's weights) for a loss that computes the logits chunk by chunk.
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from t5x_lite import layers, losses
from t5x_lite import moe  # noqa: F401  # registers the "moe" MLP kind
from t5x_lite import pipeline_stages
from t5x_lite.config import TransformerConfig

Array = jax.Array


class Block(nn.Module):
  """Self-attention, optional cross-attention and MLP, each wrapped in a residual connection.

  Pre-norm (GPT-2, LLaMA, T5) normalises each sub-layer's input; post-norm (BERT, the 2017
  Transformer) normalises after the residual sum.
  """
  config: TransformerConfig
  cross_attention: bool = False
  deterministic: bool = True
  remat_mlp_activation: bool = False  # see Stack
  mlp_kind: Optional[str] = None  # None: config.mlp (see TransformerConfig.layer_mlp)

  @nn.compact
  def __call__(self, x, self_mask, self_bias, positions, encoded, cross_mask, encoded_positions,
               token_mask=None, cache=None, cache_index=None):
    """With `cache` (this layer's {"self": {key, value}[, "cross": {key, value}]}), returns the
    updated cache as the per-layer output; otherwise None. `token_mask` [b, l] is False at
    padding (an MoE layer routes only the other tokens)."""
    cfg = self.config
    dropout = lambda y: nn.Dropout(cfg.dropout_rate)(y, deterministic=self.deterministic)
    new_cache = None if cache is None else {}

    def residual(x, name, sublayer):
      norm = layers.make_norm(cfg, f"{name}_norm")
      if cfg.norm_position == "pre":
        return x + dropout(sublayer(norm(x)))
      return norm(x + dropout(sublayer(x)))

    def attention(name, rotary, mask, bias, k_positions, index):
      """The sub-layer; with a cache it also records the attention's updated cache."""
      def sublayer(y):
        module = layers.Attention(cfg, self.deterministic, rotary, self_attention=name == "self",
                                  name=f"{name}_attention")
        kv = y if name == "self" else encoded  # None once the cross-attention cache is filled.
        if cache is None:
          return module(y, kv, mask, bias, positions, k_positions)
        out, new_cache[name] = module(y, kv, mask, bias, positions, k_positions, cache[name],
                                      index)
        return out
      return sublayer

    x = residual(x, "self_attention", attention(
        "self", cfg.position_type == "rope", self_mask, self_bias, positions, cache_index))
    if self.cross_attention:
      x = residual(x, "cross_attention", attention(
          "cross", False, cross_mask, None, encoded_positions, None))
    mlp = layers.make_mlp(cfg, self.deterministic, self.remat_mlp_activation, name="mlp",
                          kind=self.mlp_kind)
    x = residual(x, "mlp", lambda y: mlp(y, token_mask))
    x = layers.constrain(x, ("batch", "length", "embed"))
    return x, new_cache  # (carry, per-layer output) as nn.scan expects.


REMAT_POLICIES = {
    "full": None,  # Save nothing: recompute the whole block in the backward pass.
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_with_no_batch_dims": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class LayerGroup(nn.Module):
  """`config.moe_layer_interval` Blocks, the last with experts: what a stack scans over when
  MoE layers alternate with dense ones (parameters `block_0`, `block_1`, ...)."""
  config: TransformerConfig
  cross_attention: bool = False
  deterministic: bool = True
  remat_mlp_activation: bool = False
  block: type = Block  # Block, or Block under nn.remat

  @nn.compact
  def __call__(self, x, *args):
    cfg = self.config
    for j in range(cfg.moe_layer_interval):
      x, _ = self.block(cfg, self.cross_attention, self.deterministic, self.remat_mlp_activation,
                        cfg.layer_mlp(j), name=f"block_{j}")(x, *args)
    return x, None


class Stack(nn.Module):
  """`num_layers` Blocks, scanned (one compiled layer, params stacked on a `layers` axis) or
  unrolled, with optional rematerialisation, and the final norm of pre-norm models.

  With MoE every `moe_layer_interval` > 1 layers, the scan runs over groups of that many layers
  (`LayerGroup`, params `layers/block_<j>` stacked over groups); unrolled, layer i is
  `layers_<i>` either way. What layers sow (`layers.SOWN_COLLECTIONS`) is carried through the
  scan, stacked on the layers axis like the parameters, so a model sees it whether the stack is
  scanned or not.
  """
  config: TransformerConfig
  num_layers: int
  cross_attention: bool = False

  @nn.compact
  def __call__(self, x, self_mask, positions, self_bias=None, encoded=None, cross_mask=None,
               encoded_positions=None, *, deterministic=True, cache=None, cache_index=None,
               token_mask=None):
    """Returns x, or (x, updated cache) when decoding with a cache (a list: one per layer)."""
    cfg = self.config
    block = Block
    if cfg.remat_policy != "none":
      block = nn.remat(Block, prevent_cse=not cfg.scan_layers,
                       policy=REMAT_POLICIES[cfg.remat_policy])
    args = (self_mask, self_bias, positions, encoded, cross_mask, encoded_positions, token_mask)
    if cache is not None:
      x, cache = self._decode(x, args, cache, cache_index, deterministic)
    elif cfg.scan_layers:
      x = self._scan(block, x, args, deterministic)
    else:
      for i in range(self.num_layers):
        x, _ = block(cfg, self.cross_attention, deterministic, False, cfg.layer_mlp(i),
                     name=f"layers_{i}")(x, *args)
    if cfg.norm_position == "pre":
      x = layers.make_norm(cfg, "final_norm")(x)
    return x if cache is None else (x, cache)

  def _scan(self, block, x, args, deterministic):
    cfg = self.config
    # Pipelined only on a mesh with a stage axis: elsewhere (inference, evaluation on another
    # mesh) the same parameters run as one scan.
    if (cfg.pipeline_microbatches and pipeline_stages.mesh_stages() > 1
        and not self.is_initializing()):
      return self._pipeline(block, x, args, deterministic)
    # Scanned, JAX would stack every elementwise intermediate of the MLP's activation for each
    # layer as a residual of the backward pass; rematerialised, only the matmul outputs are
    # kept and the cheap elementwise part is recomputed, as XLA does by itself when unrolled.
    interval = cfg.moe_layer_interval if cfg.mlp == "moe" else 1
    stacked = {name: 0 for name in ("params",) + layers.SOWN_COLLECTIONS}
    unit, extra = (block, {}) if interval == 1 else (LayerGroup, {"block": block})
    # Pipelined, the stacked axis is named "stage", which the rules split over the stage axis.
    scanned = nn.scan(unit, variable_axes=stacked,
                      split_rngs={"params": True, "dropout": True},
                      in_axes=(nn.broadcast,) * len(args), length=self.num_layers // interval,
                      metadata_params={
                          nn.PARTITION_NAME: "stage" if cfg.pipeline_microbatches else "layers"})
    x, _ = scanned(cfg, self.cross_attention, deterministic, True, name="layers", **extra)(
        x, *args)
    return x

  def _pipeline(self, block, x, args, deterministic):
    """The scanned layers' parameters (created by the scan at init) run by
    `pipeline_stages.run`, one Block applied functionally per layer and microbatch."""
    cfg = self.config
    layer = block(cfg, self.cross_attention, deterministic, True, parent=None)
    rng = None if deterministic else self.make_rng("dropout")

    def layer_fn(params, y, layer_args, index, microbatch):
      rngs = None if rng is None else {
          "dropout": jax.random.fold_in(jax.random.fold_in(rng, index), microbatch)}
      return layer.apply({"params": params}, y, *layer_args, rngs=rngs)[0]
    return pipeline_stages.run(layer_fn, self.variables["params"]["layers"], x, args,
                               cfg.pipeline_microbatches, what=self.name,
                               repeats=cfg.pipeline_repeats)

  def _decode(self, x, args, cache, cache_index, deterministic):
    """Decoding runs the layers one after another, each on its own cache arrays, which XLA then
    updates in place (a scan over layers would copy every layer's cache at every step)."""
    cfg = self.config
    if cfg.scan_layers:
      raise ValueError("Decoding with a cache needs unrolled layers: apply a module built with "
                       "config.replace(scan_layers=False) to transformer.unstack_layers(params) "
                       "(the models' predict_batch does this for you).")
    new_cache = []
    for i, layer_cache in enumerate(cache):
      x, layer_cache = Block(cfg, self.cross_attention, deterministic, False, cfg.layer_mlp(i),
                             name=f"layers_{i}")(x, *args, layer_cache, cache_index)
      new_cache.append(layer_cache)
    return x, new_cache


def unstack_layers(params):
  """Parameters of scanned layers ("layers", stacked on a leading axis) as those of unrolled
  ones ("layers_0", "layers_1", ...): the same model with scan_layers=False. Scanned groups of
  layers (`LayerGroup`: "layers/block_<j>") become layer g * interval + j of group g."""
  if not isinstance(params, dict):
    return params
  out = {}
  for name, value in params.items():
    if name == "layers":
      groups = [k for k in value if k.startswith("block_")]
      blocks = [value[f"block_{j}"] for j in range(len(groups))] if groups else [value]
      for g in range(jax.tree.leaves(value)[0].shape[0]):
        for j, block in enumerate(blocks):
          out[f"layers_{g * len(blocks) + j}"] = jax.tree.map(lambda x, g=g: x[g], block)
    else:
      out[name] = unstack_layers(value)
  return out


def decoding_params(params, config: TransformerConfig):
  """`params` as the decoding module (unrolled layers) reads them; a decode call makes this once,
  outside its loop. Scanned layers are unstacked, and a tied head's float table is also kept
  transposed ([d, v], `layers.TRANSPOSED_TABLE`) for the decoding steps' few-row head dots
  (unused, XLA drops it)."""
  if config.scan_layers:
    params = unstack_layers(params)
  embed = params.get("token_embed") if isinstance(params, dict) else None
  if config.tie_embeddings and isinstance(embed, dict) and "embedding" in embed:
    table = nn.meta.unbox(embed["embedding"])
    params = dict(params, token_embed=dict(embed, **{layers.TRANSPOSED_TABLE: table.T}))
  return params


class Embedder(nn.Module):
  """Token embedding plus absolute positions (learned or sinusoidal) and BERT token types.

  The token table is passed in so an encoder-decoder can share one between its two stacks.
  """
  config: TransformerConfig

  @nn.compact
  def __call__(self, token_embed: layers.Embed, tokens: Array, positions: Array, *,
               deterministic: bool = True) -> Array:
    cfg = self.config
    x = token_embed(tokens)
    if cfg.position_type == "learned":
      x = x + layers.Embed(cfg.max_length, cfg.d_model, cfg.dtype, cfg.param_dtype,
                           axes=("abspos_buckets", "embed"), name="position_embedding")(positions)
    elif cfg.position_type == "sinusoidal":
      x = x + layers.sinusoidal_embedding(positions, cfg.d_model, cfg.dtype)
    if cfg.type_vocab_size:
      # seqio batches carry no token types; every token is type 0, as in single-segment BERT.
      types = layers.Embed(cfg.type_vocab_size, cfg.d_model, cfg.dtype, cfg.param_dtype,
                           axes=("abspos_buckets", "embed"), name="token_type_embedding")
      x = x + types(jnp.zeros_like(tokens))
    if cfg.norm_position == "post":
      x = layers.make_norm(cfg, "embedding_norm")(x)
    x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
    return layers.constrain(x, ("batch", "length", "embed"))


def _segments_and_positions(tokens, segment_ids, positions):
  if segment_ids is None:
    segment_ids = (tokens != 0).astype(jnp.int32)
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
  return segment_ids, positions


def _check_length(cfg: TransformerConfig, length: int, what: str):
  if length > cfg.max_length:
    raise ValueError(
        f"{what} has length {length} but the model accepts at most max_length={cfg.max_length}; "
        "shorten TASK_FEATURE_LENGTHS or use a model preset with a larger max_length.")


def _token_embed(cfg: TransformerConfig) -> layers.Embed:
  return layers.Embed(cfg.vocab_size, cfg.d_model, cfg.dtype, cfg.param_dtype, name="token_embed")


def _untied_head(cfg: TransformerConfig) -> layers.DenseGeneral:
  return layers.DenseGeneral((cfg.vocab_size,), ("embed",), ("vocab",), False, cfg.dtype,
                             cfg.param_dtype, name="lm_head")


def _output_head(cfg: TransformerConfig, x: Array, embed: layers.Embed,
                 head: Optional[layers.DenseGeneral] = None, bias: Optional[Array] = None):
  """The projection's inputs (`losses.OutputHead`) of the tied `embed` or the untied `head`
  (+ `bias`), in place of the logits. An untied head holding more than its kernel (LoRA adapters
  add theirs when they target it) applies them only in its own call: it returns its logits."""
  if cfg.tie_embeddings:
    return losses.OutputHead(x.astype(cfg.dtype), embed.embedding, bias, vocab_first=True)
  head = head if head is not None else _untied_head(cfg)
  head(x[:, :0])  # binds the head's parameters (zero tokens: no work)
  if set(head.variables["params"]) != {"kernel"}:
    return layers.constrain(head(x).astype(jnp.float32), ("batch", "length", "vocab"))
  return losses.OutputHead(x.astype(cfg.dtype), head.variables["params"]["kernel"], bias,
                           vocab_first=False)


class EncoderOnly(nn.Module):
  """BERT: a bidirectional encoder and a masked-LM head (dense, activation, norm, tied output
  projection plus a per-token bias)."""
  config: TransformerConfig

  @nn.compact
  def __call__(self, tokens, segment_ids=None, positions=None, *, deterministic=True,
               output_head=False):
    cfg = self.config
    _check_length(cfg, tokens.shape[1], "encoder_input_tokens")
    segment_ids, positions = _segments_and_positions(tokens, segment_ids, positions)
    embed = _token_embed(cfg)
    x = Embedder(cfg, name="embedder")(embed, tokens, positions, deterministic=deterministic)
    mask = layers.attention_mask(segment_ids, segment_ids)
    bias = None
    if cfg.position_type == "relative":
      bias = layers.RelativePositionBias(cfg, True, name="relpos_bias")(positions, positions)
    x = Stack(cfg, cfg.num_layers, name="encoder")(x, mask, positions, bias,
                                                   deterministic=deterministic,
                                                   token_mask=segment_ids > 0)
    x = layers.DenseGeneral((cfg.d_model,), ("embed",), ("mlp",), True, cfg.dtype,
                            cfg.param_dtype, name="mlm_transform")(x)
    x = layers.make_norm(cfg, "mlm_norm")(layers.ACTIVATION_FNS[cfg.activation](x))
    if cfg.tie_embeddings:
      bias = self.param("mlm_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)),
                        (cfg.vocab_size,), cfg.param_dtype)
      if output_head:
        return _output_head(cfg, x, embed, bias=bias)
      logits = embed.attend(x)
      logits = logits + bias.astype(logits.dtype)
    elif output_head:
      return _output_head(cfg, x, embed)
    else:
      logits = _untied_head(cfg)(x)
    return layers.constrain(logits.astype(jnp.float32), ("batch", "length", "vocab"))


class DecoderOnly(nn.Module):
  """GPT-2 / LLaMA: a causal decoder; with `prefix` (seqio's `decoder_causal_attention`), the
  tokens of the inputs part attend to each other bidirectionally (prefix LM).

  With a `cache` (from `init_cache`) the call decodes incrementally and returns (logits, cache):
  the tokens given are appended to the cache's slots and attend to every filled slot at an
  earlier or equal position (see `init_cache`). `logits_at` [b] keeps only one position's
  logits per row ([b, 1, v]): a prefill needs just each prompt's last.
  """
  config: TransformerConfig

  @nn.compact
  def __call__(self, tokens, segment_ids=None, positions=None, prefix=None, *,
               deterministic=True, cache=None, logits_at=None, output_head=False):
    cfg = self.config
    _check_length(cfg, tokens.shape[1], "decoder_input_tokens")
    if segment_ids is None:
      # Decoder inputs start with BOS = 0 (seqio shifts targets right), so 0 is not padding here.
      segment_ids = jnp.ones_like(tokens, dtype=jnp.int32)
    segment_ids, positions = _segments_and_positions(tokens, segment_ids, positions)
    embed = _token_embed(cfg)
    x = Embedder(cfg, name="embedder")(embed, tokens, positions, deterministic=deterministic)
    keys = (segment_ids, positions, prefix) if cache is None else _append_to_slots(
        cache, segment_ids, positions, prefix)
    mask = layers.attention_mask(segment_ids, keys[0], causal=True, q_positions=positions,
                                 k_positions=keys[1], q_prefix=prefix, k_prefix=keys[2])
    bias = None
    if cfg.position_type == "relative":
      bias = layers.RelativePositionBias(cfg, False, name="relpos_bias")(positions, keys[1])
    stack = Stack(cfg, cfg.num_layers, name="decoder")
    if cache is None:
      x = stack(x, mask, positions, bias, deterministic=deterministic,
                token_mask=segment_ids > 0)
    else:
      x, layer_cache = stack(x, mask, positions, bias, deterministic=deterministic,
                             cache=cache["layers"], cache_index=cache["index"],
                             token_mask=segment_ids > 0)
      cache = _advance(cache, keys, layer_cache, tokens.shape[1])
    if logits_at is not None:
      x = jnp.take_along_axis(x, logits_at[:, None, None], axis=1)
    if output_head and cache is None:
      return _output_head(cfg, x, embed)
    logits = embed.attend(x) if cfg.tie_embeddings else _untied_head(cfg)(x)
    logits = layers.constrain(logits.astype(jnp.float32), ("batch", "length", "vocab"))
    return logits if cache is None else (logits, cache)


class EncoderDecoder(nn.Module):
  """T5: a bidirectional encoder and a causal decoder with cross-attention, sharing one token
  embedding. A tied output head is rescaled by 1/sqrt(d_model), as in T5."""
  config: TransformerConfig

  def setup(self):
    cfg = self.config
    self.token_embed = _token_embed(cfg)
    self.encoder_embedder = Embedder(cfg, name="encoder_embedder")
    self.decoder_embedder = Embedder(cfg, name="decoder_embedder")
    if cfg.position_type == "relative":
      self.encoder_relpos = layers.RelativePositionBias(cfg, True, name="encoder_relpos_bias")
      self.decoder_relpos = layers.RelativePositionBias(cfg, False, name="decoder_relpos_bias")
    self.encoder = Stack(cfg, cfg.num_layers, name="encoder")
    self.decoder = Stack(cfg, cfg.resolved_num_decoder_layers, cross_attention=True,
                         name="decoder")
    if not cfg.tie_embeddings:
      self.lm_head = _untied_head(cfg)

  def encode(self, encoder_tokens, encoder_segment_ids=None, encoder_positions=None, *,
             deterministic=True):
    cfg = self.config
    _check_length(cfg, encoder_tokens.shape[1], "encoder_input_tokens")
    segment_ids, positions = _segments_and_positions(
        encoder_tokens, encoder_segment_ids, encoder_positions)
    x = self.encoder_embedder(self.token_embed, encoder_tokens, positions,
                              deterministic=deterministic)
    mask = layers.attention_mask(segment_ids, segment_ids)
    bias = self.encoder_relpos(positions, positions) if cfg.position_type == "relative" else None
    return self.encoder(x, mask, positions, bias, deterministic=deterministic,
                        token_mask=segment_ids > 0)

  def decode(self, encoded, encoder_tokens, decoder_tokens, encoder_segment_ids=None,
             encoder_positions=None, decoder_segment_ids=None, decoder_positions=None, *,
             deterministic=True, cache=None, output_head=False):
    """Decoder logits [b, l, v] for the encoder outputs `encoded` [b, L, d].

    With a `cache` (from `init_cache`) returns (logits, cache). The first cached call passes the
    encoder outputs and tokens, which fill the cross-attention cache; later calls pass
    `encoded=None, encoder_tokens=None` and read the encoder from the cache.
    """
    cfg = self.config
    _check_length(cfg, decoder_tokens.shape[1], "decoder_input_tokens")
    if encoder_tokens is not None:
      enc_segments, enc_positions = _segments_and_positions(
          encoder_tokens, encoder_segment_ids, encoder_positions)
      if cache is not None:
        cache = dict(cache, encoder_segment_ids=enc_segments)
    else:
      enc_segments, enc_positions = cache["encoder_segment_ids"], None
    if decoder_segment_ids is None:
      decoder_segment_ids = jnp.ones_like(decoder_tokens, dtype=jnp.int32)
    dec_segments, dec_positions = _segments_and_positions(
        decoder_tokens, decoder_segment_ids, decoder_positions)
    x = self.decoder_embedder(self.token_embed, decoder_tokens, dec_positions,
                              deterministic=deterministic)
    keys = (dec_segments, dec_positions, None) if cache is None else _append_to_slots(
        cache, dec_segments, dec_positions, None)
    self_mask = layers.attention_mask(dec_segments, keys[0], causal=True,
                                      q_positions=dec_positions, k_positions=keys[1])
    cross_mask = layers.attention_mask(dec_segments, enc_segments)
    bias = (self.decoder_relpos(dec_positions, keys[1])
            if cfg.position_type == "relative" else None)
    if cache is None:
      x = self.decoder(x, self_mask, dec_positions, bias, encoded, cross_mask, enc_positions,
                       deterministic=deterministic, token_mask=dec_segments > 0)
    else:
      x, layer_cache = self.decoder(x, self_mask, dec_positions, bias, encoded, cross_mask,
                                    enc_positions, deterministic=deterministic,
                                    cache=cache["layers"], cache_index=cache["index"],
                                    token_mask=dec_segments > 0)
      cache = _advance(cache, keys, layer_cache, decoder_tokens.shape[1])
    if output_head and cache is None:
      x = x * cfg.d_model ** -0.5 if cfg.tie_embeddings else x
      return _output_head(cfg, x, self.token_embed, getattr(self, "lm_head", None))
    if cfg.tie_embeddings:
      logits = self.token_embed.attend(x * cfg.d_model ** -0.5)
    else:
      logits = self.lm_head(x)
    logits = layers.constrain(logits.astype(jnp.float32), ("batch", "length", "vocab"))
    return logits if cache is None else (logits, cache)

  def __call__(self, encoder_tokens, decoder_tokens, encoder_segment_ids=None,
               decoder_segment_ids=None, encoder_positions=None, decoder_positions=None, *,
               deterministic=True, output_head=False):
    encoded = self.encode(encoder_tokens, encoder_segment_ids, encoder_positions,
                          deterministic=deterministic)
    return self.decode(encoded, encoder_tokens, decoder_tokens, encoder_segment_ids,
                       encoder_positions, decoder_segment_ids, decoder_positions,
                       deterministic=deterministic, output_head=output_head)


# ----------------------------------------------------------------------------------------------
# Decoding cache
# ----------------------------------------------------------------------------------------------
def init_cache(config: TransformerConfig, batch_size: int, length: int,
               encoder_length: Optional[int] = None) -> dict:
  """An empty decoding cache: `length` slots per row for the decoder's self-attention and, with
  `encoder_length` (an encoder-decoder's decoder), room for its cross-attention.

  A plain pytree, threaded through `DecoderOnly(..., cache=)` / `EncoderDecoder.decode(...,
  cache=)` and returned updated, so jit and sharding see ordinary arrays:
    index             int32 []              next slot to write (shared by all rows)
    positions         int32 [b, s]          position of the token held in each slot
    segment_ids       int32 [b, s]          1 where a slot holds a token of the row, 0 if empty
    layers[i].self    key, value [b, k, s, e]   decoder layer i's keys (after RoPE) and values
  and for encoder-decoder models
    encoder_segment_ids int32 [b, L]         the encoder's padding, for the cross-attention mask
    layers[i].cross   key, value [b, k, L, e]   projected encoder outputs, filled once
  K/V carry the attention activations' logical axes (batch, kv_heads, length, kv), so they shard
  like them; heads come before length so that attention reads them without a transpose. One
  array per layer, not one stacked over layers, so that each is updated in place.
  Slots are not positions: a prompt batch right-padded to P fills slots [0, P) (padding slots keep
  segment id 0 and are never attended to) and the t-th generated token of every row goes to slot
  P + t with that row's own position. Causality, RoPE and relative bias all follow the stored
  positions, so rows of different prompt lengths decode together exactly.
  """
  if length > config.max_length:
    raise ValueError(
        f"Decoding needs {length} positions (prompt + new tokens) but the model accepts at most "
        f"max_length={config.max_length}; shorten the prompt or ask for fewer new tokens.")
  shape = lambda s: (batch_size, config.resolved_num_kv_heads, s, config.resolved_head_dim)
  kv = lambda s: {"key": jnp.zeros(shape(s), config.dtype),
                  "value": jnp.zeros(shape(s), config.dtype)}
  slots = jnp.zeros((batch_size, length), jnp.int32)
  cache = {"index": jnp.zeros((), jnp.int32), "positions": slots, "segment_ids": slots}
  if encoder_length is None:
    cache["layers"] = [{"self": kv(length)} for _ in range(config.num_layers)]
  else:
    cache["encoder_segment_ids"] = jnp.zeros((batch_size, encoder_length), jnp.int32)
    cache["layers"] = [{"self": kv(length), "cross": kv(encoder_length)}
                       for _ in range(config.resolved_num_decoder_layers)]
  return cache


def cache_logical_axes(cache: dict) -> dict:
  """Logical axis names of every cache leaf: K/V shard like the attention activations.

  The names are activation axes, as `layers.constrain` takes them (it adds the `activation_`
  prefix of the rules table); decoding finds each leaf's rows by the `batch` axis.
  """
  def axes(path, leaf):
    if path[0].key == "layers":
      return ("batch", "kv_heads", "length", "kv")
    return ("batch", "length") if leaf.ndim == 2 else ()
  return jax.tree_util.tree_map_with_path(axes, cache)


def _append_to_slots(cache, segment_ids, positions, prefix):
  """Writes this call's segment ids / positions at the next slots and returns those of all
  slots (and of the prefix, if any) as the attention's keys: ([b, s], [b, s], [b, s] | None)."""
  write = lambda slots, x: jax.lax.dynamic_update_slice_in_dim(
      slots, x.astype(slots.dtype), cache["index"], axis=1)
  k_prefix = None if prefix is None else write(jnp.zeros_like(cache["segment_ids"]), prefix)
  return write(cache["segment_ids"], segment_ids), write(cache["positions"], positions), k_prefix


def _advance(cache, keys, layer_cache, num_tokens):
  return dict(cache, index=cache["index"] + num_tokens, segment_ids=keys[0], positions=keys[1],
              layers=layer_cache)
