"""The three families as Flax modules: `EncoderOnly` (BERT), `DecoderOnly` (GPT/LLaMA) and
`EncoderDecoder` (T5), built from one residual `Block` stacked by `Stack`.

Inputs are token ids plus, for packed batches, segment ids and positions as seqio's feature
converters produce them; without them every row is one example and id 0 is padding. Outputs are
logits [b, l, v] in float32.
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from t5x_lite import layers
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

  @nn.compact
  def __call__(self, x, self_mask, self_bias, positions, encoded, cross_mask, encoded_positions):
    cfg = self.config
    dropout = lambda y: nn.Dropout(cfg.dropout_rate)(y, deterministic=self.deterministic)

    def residual(x, name, sublayer):
      norm = layers.make_norm(cfg, f"{name}_norm")
      if cfg.norm_position == "pre":
        return x + dropout(sublayer(norm(x)))
      return norm(x + dropout(sublayer(x)))

    x = residual(x, "self_attention", lambda y: layers.Attention(
        cfg, self.deterministic, cfg.position_type == "rope", name="self_attention")(
            y, y, self_mask, self_bias, positions, positions))
    if self.cross_attention:
      x = residual(x, "cross_attention", lambda y: layers.Attention(
          cfg, self.deterministic, name="cross_attention")(
              y, encoded, cross_mask, None, positions, encoded_positions))
    x = residual(x, "mlp", lambda y: layers.Mlp(cfg, self.deterministic, name="mlp")(y))
    x = layers.constrain(x, ("batch", "length", "embed"))
    return x, None  # (carry, per-layer output) as nn.scan expects.


REMAT_POLICIES = {
    "full": None,  # Save nothing: recompute the whole block in the backward pass.
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_with_no_batch_dims": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class Stack(nn.Module):
  """`num_layers` Blocks, scanned (one compiled layer, params stacked on a `layers` axis) or
  unrolled, with optional rematerialisation, and the final norm of pre-norm models."""
  config: TransformerConfig
  num_layers: int
  cross_attention: bool = False

  @nn.compact
  def __call__(self, x, self_mask, positions, self_bias=None, encoded=None, cross_mask=None,
               encoded_positions=None, *, deterministic=True):
    cfg = self.config
    block = Block
    if cfg.remat_policy != "none":
      block = nn.remat(Block, prevent_cse=not cfg.scan_layers,
                       policy=REMAT_POLICIES[cfg.remat_policy])
    args = (self_mask, self_bias, positions, encoded, cross_mask, encoded_positions)
    if cfg.scan_layers:
      scanned = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True,
                                                                         "dropout": True},
                        in_axes=(nn.broadcast,) * len(args), length=self.num_layers,
                        metadata_params={nn.PARTITION_NAME: "layers"})
      x, _ = scanned(cfg, self.cross_attention, deterministic, name="layers")(x, *args)
    else:
      for i in range(self.num_layers):
        x, _ = block(cfg, self.cross_attention, deterministic, name=f"layers_{i}")(x, *args)
    if cfg.norm_position == "pre":
      x = layers.make_norm(cfg, "final_norm")(x)
    return x


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


class EncoderOnly(nn.Module):
  """BERT: a bidirectional encoder and a masked-LM head (dense, activation, norm, tied output
  projection plus a per-token bias)."""
  config: TransformerConfig

  @nn.compact
  def __call__(self, tokens, segment_ids=None, positions=None, *, deterministic=True) -> Array:
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
                                                   deterministic=deterministic)
    x = layers.DenseGeneral((cfg.d_model,), ("embed",), ("mlp",), True, cfg.dtype,
                            cfg.param_dtype, name="mlm_transform")(x)
    x = layers.make_norm(cfg, "mlm_norm")(layers.ACTIVATION_FNS[cfg.activation](x))
    if cfg.tie_embeddings:
      logits = embed.attend(x)
      bias = self.param("mlm_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)),
                        (cfg.vocab_size,), cfg.param_dtype)
      logits = logits + bias.astype(logits.dtype)
    else:
      logits = _untied_head(cfg)(x)
    return layers.constrain(logits.astype(jnp.float32), ("batch", "length", "vocab"))


class DecoderOnly(nn.Module):
  """GPT-2 / LLaMA: a causal decoder; with `prefix` (seqio's `decoder_causal_attention`), the
  tokens of the inputs part attend to each other bidirectionally (prefix LM)."""
  config: TransformerConfig

  @nn.compact
  def __call__(self, tokens, segment_ids=None, positions=None, prefix=None, *,
               deterministic=True) -> Array:
    cfg = self.config
    _check_length(cfg, tokens.shape[1], "decoder_input_tokens")
    if segment_ids is None:
      # Decoder inputs start with BOS = 0 (seqio shifts targets right), so 0 is not padding here.
      segment_ids = jnp.ones_like(tokens, dtype=jnp.int32)
    segment_ids, positions = _segments_and_positions(tokens, segment_ids, positions)
    embed = _token_embed(cfg)
    x = Embedder(cfg, name="embedder")(embed, tokens, positions, deterministic=deterministic)
    mask = layers.attention_mask(segment_ids, segment_ids, causal=True, q_positions=positions,
                                 k_positions=positions, q_prefix=prefix, k_prefix=prefix)
    bias = None
    if cfg.position_type == "relative":
      bias = layers.RelativePositionBias(cfg, False, name="relpos_bias")(positions, positions)
    x = Stack(cfg, cfg.num_layers, name="decoder")(x, mask, positions, bias,
                                                   deterministic=deterministic)
    logits = embed.attend(x) if cfg.tie_embeddings else _untied_head(cfg)(x)
    return layers.constrain(logits.astype(jnp.float32), ("batch", "length", "vocab"))


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
    return self.encoder(x, mask, positions, bias, deterministic=deterministic)

  def decode(self, encoded, encoder_tokens, decoder_tokens, encoder_segment_ids=None,
             encoder_positions=None, decoder_segment_ids=None, decoder_positions=None, *,
             deterministic=True):
    cfg = self.config
    _check_length(cfg, decoder_tokens.shape[1], "decoder_input_tokens")
    enc_segments, enc_positions = _segments_and_positions(
        encoder_tokens, encoder_segment_ids, encoder_positions)
    if decoder_segment_ids is None:
      decoder_segment_ids = jnp.ones_like(decoder_tokens, dtype=jnp.int32)
    dec_segments, dec_positions = _segments_and_positions(
        decoder_tokens, decoder_segment_ids, decoder_positions)
    x = self.decoder_embedder(self.token_embed, decoder_tokens, dec_positions,
                              deterministic=deterministic)
    self_mask = layers.attention_mask(dec_segments, dec_segments, causal=True,
                                      q_positions=dec_positions, k_positions=dec_positions)
    cross_mask = layers.attention_mask(dec_segments, enc_segments)
    bias = (self.decoder_relpos(dec_positions, dec_positions)
            if cfg.position_type == "relative" else None)
    x = self.decoder(x, self_mask, dec_positions, bias, encoded, cross_mask, enc_positions,
                     deterministic=deterministic)
    if cfg.tie_embeddings:
      logits = self.token_embed.attend(x * cfg.d_model ** -0.5)
    else:
      logits = self.lm_head(x)
    return layers.constrain(logits.astype(jnp.float32), ("batch", "length", "vocab"))

  def __call__(self, encoder_tokens, decoder_tokens, encoder_segment_ids=None,
               decoder_segment_ids=None, encoder_positions=None, decoder_positions=None, *,
               deterministic=True) -> Array:
    encoded = self.encode(encoder_tokens, encoder_segment_ids, encoder_positions,
                          deterministic=deterministic)
    return self.decode(encoded, encoder_tokens, decoder_tokens, encoder_segment_ids,
                       encoder_positions, decoder_segment_ids, decoder_positions,
                       deterministic=deterministic)
