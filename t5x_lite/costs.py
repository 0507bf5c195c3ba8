"""What a transformer stack costs: parameters, analytic FLOPs and the activations a train step
keeps.

A model describes its stacks as `StackShape`s (how many rows, how long, how many layers, and
for a decoder with cross-attention the encoder length it reads); the functions here price one
stack. The models add their output head and sum (`BaseModel.flops_per_step`,
`BaseModel.activation_bytes`), so the trainer's MFU, the memory check before compiling and the
scaling tools all count with the same formulas.

FLOPs count 2 per multiply-add, the full l x l attention score matrix (as the PaLM paper's MFU
does) and no recomputation by remat. Letters: b rows, l length, s encoder length, d model width,
f MLP width, h query heads, k key/value heads, e head width, v vocabulary.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import numpy as np

from t5x_lite.config import TransformerConfig


@dataclasses.dataclass(frozen=True)
class StackShape:
  """One stack of layers as a train step runs it."""
  batch: float  # rows (a fraction when divided per device)
  length: int
  layers: int
  cross_length: int = 0  # encoder length the layers cross-attend to (0: no cross-attention)


TOKEN_FEATURES = ("encoder_input_tokens", "decoder_input_tokens")


def tokens_per_step(batch_shapes: Mapping[str, Sequence[int]]) -> int:
  """Tokens a step reads: every encoder and decoder input position (the train job's tokens/s,
  and what the scaling laws call D)."""
  return int(sum(math.prod(shape) for name, shape in batch_shapes.items()
                 if name in TOKEN_FEATURES))


def mlp_flops_per_token(config: TransformerConfig, kind: str = "dense") -> float:
  """Forward FLOPs of one token through one layer's MLP of `kind` ("dense" or "moe": the router
  and only the experts the token is routed to, plus any shared experts; the dispatch and any
  capacity padding are not counted, as MFU counts the model's work, not an implementation's)."""
  d, f = config.d_model, config.d_ff
  dense = 2 * d * f * (2 if config.gated_mlp else 1) + 2 * f * d
  if kind != "moe":
    return dense
  experts = config.num_experts_per_token + config.num_shared_experts
  return 2 * d * config.num_experts + experts * dense


def _mlp_kinds(config: TransformerConfig, layers: int) -> list[str]:
  return [config.layer_mlp(i) for i in range(layers)]


def attention_flops_per_token(config: TransformerConfig, length: int) -> float:
  """Forward FLOPs of one token through one self-attention layer over `length` keys:
  projections (q, out over h heads; k, v over k heads) and the score and value matmuls."""
  d = config.d_model
  he = config.num_heads * config.resolved_head_dim
  ke = config.resolved_num_kv_heads * config.resolved_head_dim
  return 2 * d * he * 2 + 2 * d * ke * 2 + 4 * length * he


def stack_flops(config: TransformerConfig, stack: StackShape) -> float:
  """Forward FLOPs of a whole stack."""
  per_token = stack.layers * attention_flops_per_token(config, stack.length) + sum(
      mlp_flops_per_token(config, kind) for kind in _mlp_kinds(config, stack.layers))
  flops = stack.batch * stack.length * per_token
  if stack.cross_length:
    d = config.d_model
    he = config.num_heads * config.resolved_head_dim
    ke = config.resolved_num_kv_heads * config.resolved_head_dim
    queries = stack.batch * stack.length * (2 * d * he * 2 + 4 * stack.cross_length * he)
    keys = stack.batch * stack.cross_length * 2 * d * ke * 2  # k, v of the encoder outputs
    flops += stack.layers * (queries + keys)
  return flops


def stack_activation_bytes(config: TransformerConfig, stack: StackShape,
                           tensor_shards: int = 1) -> float:
  """Bytes of the activations a stack keeps for the backward pass (an estimate that errs low).

  Without remat: about 16 [b, l, d]-sized and 3 [b, l, f]-sized tensors per layer and 2
  [b, h, l, l] attention maps (none with a flash kernel); with remat only each layer's input.
  """
  b, l = stack.batch, stack.length
  if config.remat_policy == "none":
    maps = 0 if config.attention_implementation in ("cudnn", "blockwise", "splash") else 2
    per_layer = b * l * (16 * config.d_model + 3 * config.d_ff / tensor_shards) + (
        maps * b * config.num_heads / tensor_shards * l * l)
  else:
    per_layer = 2 * b * l * config.d_model
  return stack.layers * per_layer * np.dtype(config.dtype).itemsize


def logits_bytes(config: TransformerConfig, tokens: float, tensor_shards: int = 1) -> float:
  """The float32 logits, their softmax and their gradient."""
  return 3 * tokens * config.vocab_size / tensor_shards * 4


# ---------------------------------------------------------------------------- parameters
# Counted from the shape without building the model (fast enough to search thousands of
# shapes; tests check the counts against the real parameter trees of every preset).

def norm_params(cfg: TransformerConfig) -> int:
  return cfg.d_model * (2 if cfg.use_bias else 1)


def attention_params(cfg: TransformerConfig, fused: bool) -> int:
  d, e = cfg.d_model, cfg.resolved_head_dim
  h, k = cfg.num_heads, cfg.resolved_num_kv_heads
  bias = 1 if cfg.use_bias else 0
  qkv = 3 * h * e * (d + bias) if fused else (h + 2 * k) * e * (d + bias)
  return qkv + h * e * d + bias * d


def mlp_params(cfg: TransformerConfig, kind: str = "dense", active: bool = False) -> int:
  """One MLP of `kind`; for "moe", with `active` only what one token uses (the router, its
  num_experts_per_token experts and the shared experts)."""
  d, f = cfg.d_model, cfg.d_ff
  bias = 1 if cfg.use_bias else 0
  wi = (2 if cfg.gated_mlp else 1) * f * (d + bias)
  dense = wi + f * d + bias * d
  if kind != "moe":
    return dense
  shared = 0 if not cfg.num_shared_experts else mlp_params(
      cfg.replace(d_ff=f * cfg.num_shared_experts))
  experts = cfg.num_experts_per_token if active else cfg.num_experts
  return d * cfg.num_experts + experts * dense + shared


def layer_params(cfg: TransformerConfig, cross_attention: bool, mlp: str = "dense",
                 active: bool = False) -> int:
  n = attention_params(cfg, cfg.fused_qkv) + mlp_params(cfg, mlp, active) + 2 * norm_params(cfg)
  if cross_attention:  # cross-attention never fuses q with k, v (they read different inputs)
    n += attention_params(cfg, False) + norm_params(cfg)
  return n


def stack_params(cfg: TransformerConfig, stack: StackShape, active: bool = False) -> int:
  """A stack's parameters; with `active`, those one token uses (MoE: its experts only)."""
  final_norm = norm_params(cfg) if cfg.norm_position == "pre" else 0
  return sum(layer_params(cfg, bool(stack.cross_length), kind, active)
             for kind in _mlp_kinds(cfg, stack.layers)) + final_norm


def embedder_params(cfg: TransformerConfig) -> tuple[int, int]:
  """(embedding tables, other) of one stack's input embedder, without the token table."""
  tables = cfg.max_length * cfg.d_model if cfg.position_type == "learned" else 0
  tables += cfg.type_vocab_size * cfg.d_model
  if cfg.position_type == "relative":
    tables += cfg.relative_num_buckets * cfg.num_heads
  other = norm_params(cfg) if cfg.norm_position == "post" else 0
  return tables, other
