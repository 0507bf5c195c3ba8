"""One frozen dataclass that describes any of the three transformer families.

The families differ in a handful of choices (which stacks exist, the norm, the MLP's activation and
gating, how positions are encoded, whether the output head shares the embedding); everything else
is shared. Presets live in `gin_configs/models/`, so a model size is a gin file, never code.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import gin

FAMILIES = ("encoder", "decoder", "encoder_decoder")
POSITION_TYPES = ("learned", "sinusoidal", "rope", "relative")
NORM_TYPES = ("layernorm", "rmsnorm")
NORM_POSITIONS = ("pre", "post")
ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu")
ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn")
REMAT_POLICIES = ("none", "full", "dots", "dots_with_no_batch_dims")
DTYPES = ("float32", "bfloat16", "float16")


@gin.configurable(module="t5x_lite.config")
@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Hyper-parameters of an encoder-only, decoder-only or encoder-decoder transformer.

  `num_layers` is the encoder depth for "encoder" and "encoder_decoder" and the decoder depth for
  "decoder"; `num_decoder_layers` is the decoder depth of "encoder_decoder" (defaults to
  `num_layers`).
  """
  family: str = "decoder"
  vocab_size: int = 32128
  d_model: int = 512
  num_heads: int = 8
  num_kv_heads: Optional[int] = None  # None: multi-head attention (= num_heads); 1: MQA.
  head_dim: Optional[int] = None  # None: d_model // num_heads.
  d_ff: int = 2048
  num_layers: int = 6
  num_decoder_layers: Optional[int] = None
  max_length: int = 2048  # Longest sequence the model accepts (size of learned position tables).

  position_type: str = "rope"
  rope_theta: float = 10_000.0
  relative_num_buckets: int = 32
  relative_max_distance: int = 128

  norm_type: str = "rmsnorm"
  norm_position: str = "pre"  # "post" is the original Transformer / BERT residual layout.
  norm_eps: float = 1e-6
  activation: str = "silu"
  gated_mlp: bool = True  # SwiGLU / GeGLU when True.
  use_bias: bool = False  # Biases in dense layers and norms (GPT-2 / BERT use them).
  tie_embeddings: bool = True  # Output head reuses the input embedding.
  type_vocab_size: int = 0  # BERT's token-type embeddings (0: none).
  scale_attention: bool = True  # Divide attention logits by sqrt(head_dim); T5 folds it into init.

  dropout_rate: float = 0.0
  dtype: str = "float32"  # Compute dtype; parameters stay in `param_dtype`.
  param_dtype: str = "float32"
  attention_implementation: str = "xla"  # "cudnn": jax.nn.dot_product_attention's flash kernel.
  mlp: str = "dense"  # The MLP kind of every layer, a name in layers.MLP_KINDS.
  scan_layers: bool = True  # nn.scan over layers: compile time independent of depth.
  remat_policy: str = "none"
  # Self-attention projects q, k and v with one kernel "qkv" [d, 3, h, e] (one matmul instead of
  # three); cross-attention keeps query/key/value. The same function as unfused for the same
  # weights. Needs num_kv_heads == num_heads (MHA).
  fused_qkv: bool = False

  def __post_init__(self):
    _check_choice("family", self.family, FAMILIES)
    _check_choice("position_type", self.position_type, POSITION_TYPES)
    _check_choice("norm_type", self.norm_type, NORM_TYPES)
    _check_choice("norm_position", self.norm_position, NORM_POSITIONS)
    _check_choice("activation", self.activation, ACTIVATIONS)
    _check_choice("attention_implementation", self.attention_implementation,
                  ATTENTION_IMPLEMENTATIONS)
    _check_choice("remat_policy", self.remat_policy, REMAT_POLICIES)
    _check_choice("dtype", self.dtype, DTYPES)
    _check_choice("param_dtype", self.param_dtype, DTYPES)
    for name in ("vocab_size", "d_model", "num_heads", "d_ff", "num_layers", "max_length"):
      if getattr(self, name) <= 0:
        raise ValueError(f"TransformerConfig.{name} must be positive, got {getattr(self, name)}.")
    if self.head_dim is None and self.d_model % self.num_heads:
      raise ValueError(
          f"TransformerConfig.num_heads={self.num_heads} does not divide d_model={self.d_model}; "
          "choose num_heads among the divisors of d_model, or set head_dim explicitly.")
    if self.num_kv_heads is not None and (
        self.num_kv_heads <= 0 or self.num_heads % self.num_kv_heads):
      divisors = [n for n in range(1, self.num_heads + 1) if self.num_heads % n == 0]
      raise ValueError(
          f"TransformerConfig.num_kv_heads={self.num_kv_heads} must divide "
          f"num_heads={self.num_heads}; allowed values: {divisors} (or None for num_heads).")
    if self.fused_qkv and self.resolved_num_kv_heads != self.num_heads:
      raise ValueError(
          f"TransformerConfig.fused_qkv=True needs as many key/value heads as query heads, but "
          f"num_kv_heads={self.num_kv_heads} != num_heads={self.num_heads} (grouped-query or "
          "multi-query attention); set fused_qkv=False, or num_kv_heads=None for multi-head "
          "attention.")
    if self.position_type == "rope" and self.resolved_head_dim % 2:
      raise ValueError(f"TransformerConfig.position_type='rope' needs an even head_dim, got "
                       f"{self.resolved_head_dim}.")
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(f"TransformerConfig.dropout_rate must be in [0, 1), got {self.dropout_rate}.")
    if self.family != "encoder_decoder" and self.num_decoder_layers is not None:
      raise ValueError("TransformerConfig.num_decoder_layers only applies to "
                       f"family='encoder_decoder', not family={self.family!r}.")

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim if self.head_dim is not None else self.d_model // self.num_heads

  @property
  def resolved_num_kv_heads(self) -> int:
    return self.num_kv_heads if self.num_kv_heads is not None else self.num_heads

  @property
  def resolved_num_decoder_layers(self) -> int:
    return self.num_decoder_layers if self.num_decoder_layers is not None else self.num_layers

  def replace(self, **changes) -> "TransformerConfig":
    return dataclasses.replace(self, **changes)


def _check_choice(field: str, value, allowed):
  if value not in allowed:
    raise ValueError(
        f"TransformerConfig.{field}={value!r} is not supported; allowed values: {list(allowed)}.")
