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
# "blockwise" (any backend) and "splash" (TPU) never hold the [b, h, l, s] logits
# (t5x_lite.attention).
ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn", "blockwise", "splash")
REMAT_POLICIES = ("none", "full", "dots", "dots_with_no_batch_dims")
DTYPES = ("float32", "bfloat16", "float16")
# How a mixture-of-experts layer sends tokens to its experts (t5x_lite.moe): "ragged" sorts them
# by expert for one grouped matmul (jax.lax.ragged_dot), "einsum" scatters them into fixed
# [experts, capacity] buffers with one-hot einsums; "auto" picks per backend (see moe.py).
MOE_DISPATCHES = ("auto", "ragged", "einsum", "gather")


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

  # Mixture of experts (mlp="moe", t5x_lite.moe): each token goes to `num_experts_per_token` of
  # `num_experts` expert MLPs of width d_ff, weighted by the router. MoE layers are the last of
  # every `moe_layer_interval` layers (2: every other, as Switch); the others are dense. With
  # `expert_capacity_factor` an expert takes at most factor * k * tokens / experts tokens of a
  # row, the rest pass through the residual unchanged; None drops none. The balance and router
  # z losses are summed over MoE layers, each times its weight. Shared experts (DeepSeek) see
  # every token.
  num_experts: int = 0  # 0: no experts (every mlp kind but "moe")
  num_experts_per_token: int = 2
  moe_layer_interval: int = 1
  expert_capacity_factor: Optional[float] = None
  moe_dispatch: str = "auto"
  load_balance_loss_weight: float = 0.01
  router_z_loss_weight: float = 0.001
  num_shared_experts: int = 0

  # Pipeline parallelism (t5x_lite.pipeline_stages): with pipeline_microbatches > 0, on a mesh
  # whose `stage` axis has S > 1 slots, each scanned stack is split into S stages (stage s holds
  # layers [s * L / S, (s + 1) * L / S)) run on a GPipe schedule over this many microbatches of
  # its rows; 0, or a mesh without stages, runs the stack as one scan. A stage idles (S - 1) /
  # (M + S - 1) of the time (the bubble): use M >= 4 * S or so. Parameters keep their layout,
  # so checkpoints move between pipelined and unpipelined meshes.
  pipeline_microbatches: int = 0
  # Circular (interleaved) stages, as MaxText's num_pipeline_repeats: with R > 1 each stack is
  # cut into S * R groups, stage s runs groups s, s + S, ..., and each microbatch goes around
  # the ring of stages R times, which shrinks the bubble to (S - 1) / (R M + S - 1). Needs
  # S * R to divide the layers and M >= S; the parameters keep their layout [L, ...].
  pipeline_repeats: int = 1

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
    self._check_experts()
    self._check_pipeline()

  def _check_pipeline(self):
    if self.pipeline_microbatches < 0:
      raise ValueError("TransformerConfig.pipeline_microbatches must be >= 0 (0: no pipeline), "
                       f"got {self.pipeline_microbatches}.")
    if self.pipeline_repeats < 1:
      raise ValueError("TransformerConfig.pipeline_repeats must be >= 1 (1: GPipe; R > 1: a "
                       f"circular pipeline), got {self.pipeline_repeats}.")
    if not self.pipeline_microbatches:
      if self.pipeline_repeats > 1:
        raise ValueError(
            f"TransformerConfig.pipeline_repeats={self.pipeline_repeats} only applies to a "
            "pipeline: set pipeline_microbatches >= make_mesh.stage (e.g. 4 * stage), or "
            "pipeline_repeats=1.")
      return
    for name, depth in self.stack_depths.items():
      if depth % self.pipeline_repeats:
        raise ValueError(
            f"TransformerConfig.pipeline_repeats={self.pipeline_repeats} does not divide the "
            f"{name}'s {depth} layers (stages x repeats must); choose among "
            f"{[n for n in range(1, depth + 1) if depth % n == 0]}.")
    if not self.scan_layers:
      raise ValueError(
          f"TransformerConfig.pipeline_microbatches={self.pipeline_microbatches} needs "
          "scan_layers=True: pipeline stages split the scanned stack's stacked `layers` axis; "
          "set scan_layers=True, or pipeline_microbatches=0.")
    if self.mlp == "moe":
      raise ValueError(
          "TransformerConfig.pipeline_microbatches > 0 does not support mlp='moe' yet (the "
          "experts' auxiliary losses are not carried through the pipeline); use expert "
          "parallelism (make_mesh.expert) instead, or pipeline_microbatches=0.")

  def _check_experts(self):
    """The MoE fields; `mlp` alone chooses the MLP kind, `num_experts` sizes the "moe" one."""
    _check_choice("moe_dispatch", self.moe_dispatch, MOE_DISPATCHES)
    if self.mlp != "moe":
      if self.num_experts:
        raise ValueError(
            f"TransformerConfig.num_experts={self.num_experts} only applies to mlp='moe' (the "
            f"MLP kind is {self.mlp!r}); set mlp='moe' for a mixture of experts, or "
            "num_experts=0 for a dense MLP.")
      return
    if self.num_experts < 1:
      raise ValueError("TransformerConfig.mlp='moe' needs num_experts >= 1 (got "
                       f"{self.num_experts}); set e.g. num_experts=8, or mlp='dense'.")
    if not 1 <= self.num_experts_per_token <= self.num_experts:
      raise ValueError(
          f"TransformerConfig.num_experts_per_token={self.num_experts_per_token} must be in "
          f"[1, num_experts={self.num_experts}]; route each token to at most num_experts "
          "experts.")
    depths = {"num_layers": self.num_layers}
    if self.family == "encoder_decoder":
      depths["num_decoder_layers"] = self.resolved_num_decoder_layers
    for name, depth in depths.items():
      if self.moe_layer_interval < 1 or depth % self.moe_layer_interval:
        raise ValueError(
            f"TransformerConfig.moe_layer_interval={self.moe_layer_interval} must be >= 1 and "
            f"divide {name}={depth} (a group of that many layers ends with an MoE layer); "
            f"choose among {[n for n in range(1, depth + 1) if depth % n == 0]}.")
    if self.expert_capacity_factor is not None and self.expert_capacity_factor <= 0:
      raise ValueError(
          f"TransformerConfig.expert_capacity_factor={self.expert_capacity_factor} must be "
          "positive (1.0: room for an even share of the tokens), or None to drop no token.")
    for name in ("load_balance_loss_weight", "router_z_loss_weight", "num_shared_experts"):
      if getattr(self, name) < 0:
        raise ValueError(f"TransformerConfig.{name} must be >= 0, got {getattr(self, name)}.")

  def layer_mlp(self, layer: int) -> str:
    """The MLP kind of layer `layer` (0-based) of a stack: with mlp="moe", only the last layer
    of each group of `moe_layer_interval` layers has experts; the others are dense."""
    if self.mlp == "moe" and (layer + 1) % self.moe_layer_interval:
      return "dense"
    return self.mlp

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim if self.head_dim is not None else self.d_model // self.num_heads

  @property
  def resolved_num_kv_heads(self) -> int:
    return self.num_kv_heads if self.num_kv_heads is not None else self.num_heads

  @property
  def resolved_num_decoder_layers(self) -> int:
    return self.num_decoder_layers if self.num_decoder_layers is not None else self.num_layers

  @property
  def stack_depths(self) -> dict[str, int]:
    """The depth of each layer stack: {"stack": n}, or an encoder-decoder's two."""
    if self.family == "encoder_decoder":
      return {"encoder": self.num_layers, "decoder": self.resolved_num_decoder_layers}
    return {"stack": self.num_layers}

  def replace(self, **changes) -> "TransformerConfig":
    """A copy with `changes`. Unrolling the layers (scan_layers=False, what decoding does)
    also turns pipelining off unless `changes` says otherwise: stages split a scanned stack."""
    if changes.get("scan_layers") is False:
      changes.setdefault("pipeline_microbatches", 0)
      changes.setdefault("pipeline_repeats", 1)
    return dataclasses.replace(self, **changes)


def _check_choice(field: str, value, allowed):
  if value not in allowed:
    raise ValueError(
        f"TransformerConfig.{field}={value!r} is not supported; allowed values: {list(allowed)}.")
