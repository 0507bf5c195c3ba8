"""Mixture-of-experts MLP: the "moe" kind of `TransformerConfig.mlp`.

A router (float32) scores the `num_experts` experts for every token; each token goes to its top
k = `num_experts_per_token`, weighted by the softmax over the k chosen scores (Mixtral; with k = 1
the full-softmax probability is kept, as in Switch, so the router still gets a gradient from the
main loss). Experts are MLPs like the dense one (gated or not, width d_ff), held as kernels with
a leading `expert` axis that `partitioning` maps to the `expert` mesh axis. The output is the
weighted sum of the chosen experts' outputs (+ the shared experts', which see every token).

Capacity: with `expert_capacity_factor` c, an expert takes at most C = ceil(c k S / E) of the S
tokens of a row (a group); assignments past C are dropped, first choices of every token before
second choices, tokens in order (GShard), and a dropped assignment adds nothing: the token passes
through the residual. With None, C = S and nothing is dropped. Padding (token_mask False) is never
routed and is left out of every statistic.

Three dispatch paths compute the same function (the same drops, the same weights):
  "einsum"  one-hot dispatch into [E, b, C, d] buffers, batched expert matmuls, one-hot combine
            (GShard / Switch): static shapes, and under expert parallelism two all-to-alls.
  "gather"  the same buffers filled and read by indexing: no one-hot dispatch matmuls.
  "ragged"  assignments sorted by expert and one grouped matmul per kernel (`Groups`:
            jax.lax.ragged_dot on GPU and TPU, 128-row blocks on CPU): no capacity padding;
            dropped assignments are computed and weighted 0.
"auto" takes "einsum" on TPU (static shapes) and under an `expert` mesh axis (the all-to-alls),
else "ragged". Dropless (no capacity factor), the einsum and gather buffers hold every token
for every expert, E / k times the FLOPs of the tokens' own experts.

Sown: the load-balancing loss (Switch: E * sum_i f_i P_i with f_i the fraction of assignments
and P_i the mean router probability of expert i; 1 at uniform routing) and the router z-loss
(ST-MoE: mean of logsumexp(logits)^2), each times its config weight, into `layers.AUX_LOSSES`;
routing statistics (dropped fraction, max / min expert load as E * f_i, the unweighted balance
loss) into `layers.SOWN_METRICS`, reported as "moe/<name>" averaged over MoE layers.

Letters: b rows (groups), l tokens of a row, d model width, f expert width, e experts, c slots
of an expert's buffer, k choices per token, t tokens, a assignments (t k).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from t5x_lite import layers
from t5x_lite.config import TransformerConfig

Array = jax.Array

# Each expert's kernel initialised as a dense layer's: fan-in over its own input axis only.
expert_kernel_init = nn.initializers.variance_scaling(
    1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1, batch_axis=(0,))


def capacity(config: TransformerConfig, group_size: int) -> int:
  """Slots per expert for a row of `group_size` tokens (see the module docstring)."""
  if config.expert_capacity_factor is None:
    return group_size  # a token never picks one expert twice: S slots hold every assignment
  share = config.expert_capacity_factor * config.num_experts_per_token * group_size
  return min(group_size, max(1, math.ceil(share / config.num_experts)))


def dispatch_path(config: TransformerConfig) -> str:
  """The path "auto" takes (see the module docstring)."""
  if config.moe_dispatch != "auto":
    return config.moe_dispatch
  if jax.default_backend() == "tpu" or _expert_axis_size() > 1:
    return "einsum"
  return "ragged"


class Routing(NamedTuple):
  """Where each token's k assignments go; all [b, l, k] except `probs` [b, l, e]."""
  expert: Array  # int32 expert index
  slot: Array  # int32 slot in that expert's buffer (>= capacity: dropped)
  weight: Array  # float32 combine weight, 0 where dropped or padding
  kept: Array  # bool: routed and within capacity
  valid: Array  # bool: not padding
  probs: Array  # float32 full router softmax


def route(logits: Array, token_mask: Array, k: int, slots: int) -> Routing:
  """Top-k routing of router `logits` [b, l, e] (float32) with `slots` per expert and row."""
  b, l, e = logits.shape
  probs = jax.nn.softmax(logits, axis=-1)
  top, expert = jax.lax.top_k(probs, k)
  weight = top / jnp.sum(top, axis=-1, keepdims=True) if k > 1 else top
  valid = jnp.broadcast_to(token_mask[..., None], (b, l, k))
  onehot = jax.nn.one_hot(expert, e, dtype=jnp.int32) * valid[..., None]  # [b, l, k, e]
  # Buffer order: every token's first choice, then every second choice, tokens in order.
  ordered = onehot.transpose(0, 2, 1, 3).reshape(b, k * l, e)
  slot = jnp.sum((jnp.cumsum(ordered, axis=1) - 1) * ordered, axis=-1)
  slot = slot.reshape(b, k, l).transpose(0, 2, 1)
  kept = valid & (slot < slots)
  return Routing(expert, slot, jnp.where(kept, weight, 0.0), kept, valid, probs)


class MoeMlp(nn.Module):
  """`num_experts` expert MLPs behind a top-k router (see the module docstring)."""
  config: TransformerConfig
  deterministic: bool = True
  remat_activation: bool = False

  @nn.compact
  def __call__(self, x: Array, token_mask: Optional[Array] = None) -> Array:
    """x [b, l, d], token_mask [b, l] (False: padding) -> [b, l, d]."""
    cfg = self.config
    _check_expert_mesh(cfg)
    b, l, d = x.shape
    if token_mask is None:
      token_mask = jnp.ones((b, l), bool)
    kernel = layers.param(self, "router", layers.default_kernel_init, (d, cfg.num_experts),
                          ("embed", "router"), cfg.param_dtype)
    logits = jnp.einsum("bld,de->ble", x.astype(jnp.float32), kernel.astype(jnp.float32))
    slots = capacity(cfg, l)
    routing = route(logits, token_mask, cfg.num_experts_per_token, slots)
    self._sow(logits, routing)
    path = dispatch_path(cfg)
    if path == "ragged":
      y = self._ragged(x, routing)
    else:
      y = (self._gather if path == "gather" else self._einsum)(x, routing, slots)
    if cfg.num_shared_experts:
      shared = cfg.replace(d_ff=cfg.d_ff * cfg.num_shared_experts)
      y = y + layers.Mlp(shared, self.deterministic, self.remat_activation,
                         name="shared_experts")(x).astype(y.dtype)
    return y

  # -- the experts' weights ---------------------------------------------------------------------
  def _kernels(self):
    """{name: (kernel, bias or None)}: wi_0, wi_1 (gated) or wi [e, d, f], and wo [e, f, d]."""
    cfg = self.config
    e, d, f = cfg.num_experts, cfg.d_model, cfg.d_ff
    names = ("wi_0", "wi_1") if cfg.gated_mlp else ("wi",)
    shapes = {n: ((e, d, f), ("expert", "embed", "mlp")) for n in names}
    shapes["wo"] = ((e, f, d), ("expert", "mlp", "embed"))
    out = {}
    for name, (shape, axes) in shapes.items():
      kernel = layers.param(self, f"{name}_kernel", expert_kernel_init, shape, axes,
                            cfg.param_dtype).astype(cfg.dtype)
      bias = None
      if cfg.use_bias:
        bias = layers.param(self, f"{name}_bias", nn.initializers.zeros, (e, shape[2]),
                            (axes[0], axes[2]), cfg.param_dtype).astype(cfg.dtype)
      out[name] = (kernel, bias)
    return out

  def _activation(self, h_in: dict) -> Array:
    """The experts' hidden activations from their input projections (as in `layers.Mlp`)."""
    cfg = self.config
    act = layers.ACTIVATION_FNS[cfg.activation]
    gate = (lambda a, b: act(a) * b) if cfg.gated_mlp else act
    if self.remat_activation:
      gate = jax.checkpoint(gate, prevent_cse=False)
    h = gate(h_in["wi_0"], h_in["wi_1"]) if cfg.gated_mlp else gate(h_in["wi"])
    return nn.Dropout(cfg.dropout_rate)(h, deterministic=self.deterministic)

  # -- dispatch paths ---------------------------------------------------------------------------
  def _experts(self, buffers: Array) -> Array:
    """Every expert's MLP over its own buffer: [e, b, c, d] -> [e, b, c, d]. The constraints
    keep the buffers split by expert for the matmuls (under expert parallelism the reshards
    around them become all-to-alls)."""
    buffers = layers.constrain(buffers, ("expert", "expert_group", None, "embed"))
    kernels = self._kernels()
    hidden_axes = ("expert", "expert_group", None, "mlp")
    h_in = {}
    for name in kernels:
      if name != "wo":
        kernel, bias = kernels[name]
        h = jnp.einsum("ebcd,edf->ebcf", buffers, kernel)
        h_in[name] = layers.constrain(h if bias is None else h + bias[:, None, None], hidden_axes)
    kernel, bias = kernels["wo"]
    out = jnp.einsum("ebcf,efd->ebcd", self._activation(h_in), kernel)
    if bias is not None:
      out = out + bias[:, None, None]
    # Pinned by expert first, or XLA may move the all-to-all before this matmul and gather wo.
    return layers.constrain(out, ("expert", "expert_group", None, "embed"))

  def _einsum(self, x: Array, routing: Routing, slots: int) -> Array:
    """GShard dispatch: one-hot [b, l, e, c] masks scatter tokens into every expert's buffer and
    gather them back weighted, as matmuls (t e c d FLOPs each way: what partitions into
    all-to-alls on an expert mesh)."""
    cfg = self.config
    expert = jax.nn.one_hot(routing.expert, cfg.num_experts, dtype=cfg.dtype)
    slot = jax.nn.one_hot(jnp.where(routing.kept, routing.slot, slots), slots, dtype=cfg.dtype)
    dispatch = jnp.einsum("blke,blkc->blec", expert, slot)
    combine = jnp.einsum("blke,blkc,blk->blec", expert.astype(jnp.float32),
                         slot.astype(jnp.float32), routing.weight)
    out = self._experts(jnp.einsum("bld,blec->ebcd", x.astype(cfg.dtype), dispatch))
    out = layers.constrain(out, (None, "batch", None, "embed"))
    y = jnp.einsum("ebcd,blec->bld", out, combine.astype(out.dtype),
                   preferred_element_type=jnp.float32)
    return y.astype(cfg.dtype)

  def _gather(self, x: Array, routing: Routing, slots: int) -> Array:
    """The einsum path's buffers, filled and read by indexing instead of one-hot matmuls: the
    same function (same slots, drops and weights) without the t e c d dispatch FLOPs."""
    cfg = self.config
    b, l, d = x.shape
    rows = jnp.arange(b)[:, None, None]
    # Which token fills each slot (l, a zero row, where none does); dropped slots fall outside.
    token = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32)[None, :, None], routing.slot.shape)
    source = jnp.full((b, cfg.num_experts, slots), l, jnp.int32)
    source = source.at[rows, routing.expert, jnp.where(routing.kept, routing.slot, slots)].set(
        token, mode="drop")
    padded = jnp.concatenate([x.astype(cfg.dtype), jnp.zeros((b, 1, d), cfg.dtype)], axis=1)
    out = self._experts(padded[rows, source].transpose(1, 0, 2, 3))  # [e, b, c, d]
    picked = out[routing.expert, rows, jnp.minimum(routing.slot, slots - 1)]  # [b, l, k, d]
    y = jnp.einsum("blkd,blk->bld", picked, routing.weight.astype(picked.dtype),
                   preferred_element_type=jnp.float32)
    return y.astype(cfg.dtype)

  def _ragged(self, x: Array, routing: Routing) -> Array:
    """Dropless grouped matmuls: the t k assignments sorted by expert, one grouped matmul per
    kernel over contiguous runs of rows (`Groups`), unsorted and summed with their weights."""
    cfg = self.config
    b, l, d = x.shape
    k, e = cfg.num_experts_per_token, cfg.num_experts
    expert = routing.expert.reshape(-1)  # [a], token-major
    order = jnp.argsort(expert, stable=True)
    sizes = jnp.bincount(expert, length=e).astype(jnp.int32)
    groups = Groups.of(sizes, expert.shape[0])
    rows = groups.gather(x.reshape(b * l, d).astype(cfg.dtype)[order // k])  # sorted by expert
    kernels = self._kernels()

    def matmul(inputs, name):
      kernel, bias = kernels[name]
      out = groups.matmul(inputs, kernel)
      return out if bias is None else out + groups.per_row(bias)

    h = self._activation({n: matmul(rows, n) for n in kernels if n != "wo"})
    out = groups.scatter(matmul(h, "wo"))  # [a, d], sorted
    out = jnp.zeros_like(out).at[order].set(out).reshape(b, l, k, d)
    y = jnp.einsum("blkd,blk->bld", out, routing.weight.astype(out.dtype),
                   preferred_element_type=jnp.float32)
    return y.astype(cfg.dtype)

  # -- losses and statistics --------------------------------------------------------------------
  def _sow(self, logits: Array, routing: Routing) -> None:
    cfg = self.config
    stats = router_statistics(logits, routing)
    if cfg.load_balance_loss_weight:
      self.sow(layers.AUX_LOSSES, "load_balance_loss",
               cfg.load_balance_loss_weight * stats["load_balance"])
    if cfg.router_z_loss_weight:
      self.sow(layers.AUX_LOSSES, "router_z_loss", cfg.router_z_loss_weight * stats["z_loss"])
    pair = lambda total, count=1.0: jnp.stack([jnp.asarray(total, jnp.float32),
                                               jnp.asarray(count, jnp.float32)])
    e = cfg.num_experts
    self.sow(layers.SOWN_METRICS, "moe/dropped_token_fraction",
             pair(stats["dropped"], stats["assignments"]))
    self.sow(layers.SOWN_METRICS, "moe/max_expert_load", pair(e * jnp.max(stats["fraction"])))
    self.sow(layers.SOWN_METRICS, "moe/min_expert_load", pair(e * jnp.min(stats["fraction"])))
    self.sow(layers.SOWN_METRICS, "moe/load_balance", pair(stats["load_balance"]))


class Groups(NamedTuple):
  """Rows sorted into contiguous groups (one per expert), multiplied each by its group's kernel.

  On GPU and TPU the rows stay as they are and `jax.lax.ragged_dot` does the grouped matmul. On
  CPU, where ragged_dot was measured no faster than multiplying every row by every kernel, each
  group is padded to whole blocks of `BLOCK_ROWS` rows and a scan multiplies every block by its
  group's kernel: the FLOPs of the rows plus at most a block per group of zero padding."""
  sizes: Array  # [e] rows per group
  rows: int  # a, the sorted rows
  dest: Optional[Array]  # [a] each sorted row's place in the blocked layout; None: unblocked
  block_group: Optional[Array]  # [n] the group of each block

  BLOCK_ROWS = 128

  @classmethod
  def of(cls, sizes: Array, rows: int, blocked: Optional[bool] = None) -> "Groups":
    if not (jax.default_backend() == "cpu" if blocked is None else blocked):
      return cls(sizes, rows, None, None)
    e, block = sizes.shape[0], cls.BLOCK_ROWS
    blocks = -(-rows // block) + e  # static bound: every group may end in a partial block
    padded = (sizes + block - 1) // block * block
    ends = jnp.cumsum(padded)
    group = jnp.repeat(jnp.arange(e), sizes, total_repeat_length=rows)
    rank = jnp.arange(rows) - (jnp.cumsum(sizes) - sizes)[group]
    dest = (ends - padded)[group] + rank
    # Blocks past the last group hold zeros; they borrow the last kernel and are never read.
    block_group = jnp.minimum(jnp.searchsorted(ends // block, jnp.arange(blocks), side="right"),
                              e - 1)
    return cls(sizes, rows, dest, block_group)

  def gather(self, rows: Array) -> Array:
    """[a, d] sorted rows -> this layout ([n, BLOCK_ROWS, d] when blocked)."""
    if self.dest is None:
      return rows
    n, d = self.block_group.shape[0], rows.shape[-1]
    blocked = jnp.zeros((n * self.BLOCK_ROWS, d), rows.dtype).at[self.dest].set(rows)
    return blocked.reshape(n, self.BLOCK_ROWS, d)

  def scatter(self, values: Array) -> Array:
    """The inverse of `gather`: this layout -> [a, f] sorted rows."""
    if self.dest is None:
      return values
    return values.reshape(-1, values.shape[-1])[self.dest]

  def matmul(self, values: Array, kernel: Array) -> Array:
    """values in this layout x kernel [e, d, f] -> [.., f], each row by its group's kernel."""
    if self.dest is None:
      return jax.lax.ragged_dot(values, kernel, self.sizes)
    return _blocks_matmul(values, kernel, self.block_group)

  def per_row(self, table: Array) -> Array:
    """A [e, f] per-group table (a bias) broadcast to the rows of this layout."""
    if self.dest is None:
      return jnp.repeat(table, self.sizes, axis=0, total_repeat_length=self.rows)
    return table[self.block_group][:, None]


@jax.custom_vjp
def _blocks_matmul(blocks: Array, kernel: Array, block_group: Array) -> Array:
  """[n, r, d] x [e, d, f] -> [n, r, f]: block i times kernel[block_group[i]], one block a scan
  step (the kernel is sliced, never copied per block)."""
  def step(_, inputs):
    block, group = inputs
    return None, block @ kernel[group]
  return jax.lax.scan(step, None, (blocks, block_group))[1]


def _blocks_matmul_forward(blocks, kernel, block_group):
  return _blocks_matmul(blocks, kernel, block_group), (blocks, kernel, block_group)


def _blocks_matmul_backward(residuals, grad):
  """The kernel's gradient accumulates slice by slice in the scan's carry (autodiff of the
  forward scan would add a whole [e, d, f] cotangent at every block)."""
  blocks, kernel, block_group = residuals

  def step(kernel_grad, inputs):
    block, block_grad, group = inputs
    kernel_grad = kernel_grad.at[group].add(block.T @ block_grad)
    return kernel_grad, block_grad @ kernel[group].T
  kernel_grad, blocks_grad = jax.lax.scan(step, jnp.zeros_like(kernel),
                                          (blocks, grad, block_group))
  return blocks_grad, kernel_grad, None


_blocks_matmul.defvjp(_blocks_matmul_forward, _blocks_matmul_backward)


def router_statistics(logits: Array, routing: Routing) -> dict[str, Array]:
  """Over the tokens that are not padding: the unweighted load-balancing loss and router
  z-loss, each expert's fraction of the assignments (chosen, before drops), and the counts of
  dropped and of all assignments."""
  e, k = logits.shape[-1], routing.expert.shape[-1]
  valid = routing.valid[..., 0].astype(jnp.float32)  # [b, l]
  tokens = jnp.maximum(jnp.sum(valid), 1.0)
  assigned = jnp.einsum("blke,bl->e", jax.nn.one_hot(routing.expert, e), valid)
  fraction = assigned / (tokens * k)
  mean_prob = jnp.einsum("ble,bl->e", routing.probs, valid) / tokens
  z_loss = jnp.sum(jnp.square(jax.nn.logsumexp(logits, axis=-1)) * valid) / tokens
  return {"load_balance": e * jnp.sum(fraction * mean_prob), "z_loss": z_loss,
          "fraction": fraction, "dropped": jnp.sum(routing.valid & ~routing.kept),
          "assignments": jnp.sum(valid) * k}


def _check_expert_mesh(cfg: TransformerConfig) -> None:
  """Experts split over the `expert` mesh axis must divide evenly (else they would silently stay
  whole on every device)."""
  size = _expert_axis_size()
  if cfg.num_experts % size:
    raise ValueError(
        f"TransformerConfig.num_experts={cfg.num_experts} is not divisible by the expert mesh "
        f"axis (make_mesh.expert={size}); choose num_experts a multiple of it, or an expert "
        f"axis among {[n for n in range(1, cfg.num_experts + 1) if cfg.num_experts % n == 0]}.")


def _expert_axis_size() -> int:
  """The size of the `expert` axis of the mesh being traced under (1 without one)."""
  mesh = jax.sharding.get_abstract_mesh()
  return dict(zip(mesh.axis_names, mesh.axis_sizes)).get("expert", 1) if mesh.axis_names else 1


layers.register_mlp("moe", MoeMlp)
