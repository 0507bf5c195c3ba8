"""Attention kernels that never hold a [b, h, l, s] array, and the mask and bias they read.

    out = blockwise_attention(q, k, v, mask, bias, scale=e ** -0.5)   # any backend
    out = splash_attention(q, k, v, mask, scale=e ** -0.5)            # TPU (Pallas/Mosaic)

`Mask` is what `layers.attention_mask` returns: the segment ids, positions and prefix flags a
mask is made of ([b, l] and [b, s] vectors, not the [b, 1, l, s] mask), so a kernel computes
the blocks it needs and the "xla" path materialises the whole (`dense_mask`). `RelativeBias`
is the same for T5's relative position bias: its table and positions, a block at a time.

Blockwise is the online-softmax algorithm of Rabe & Staats (2021) and FlashAttention-2 in pure
JAX: queries in blocks of `block_q`, keys in blocks of `block_k`; per query block a running
max, normaliser and output are updated key block by key block, and only the per-row
log-sum-exp [b, h, l] is kept for the backward pass, whose custom VJP recomputes each block's
probabilities. A block that the mask hides entirely is skipped (`lax.cond`), which halves the
work of causal attention. Rows that see no key at all (padding) give zeros (the "xla" path
gives them the mean of the values; no loss reads them).

Letters: b batch, l query length, s key length, h query heads, k key/value heads, g = h / k
query heads per key/value head, e head dim, q/c a query/key block.
"""
from __future__ import annotations

import functools
from typing import Optional, Union

import flax.struct
import jax
import jax.numpy as jnp

Array = jax.Array
NEG_INF = -1e10  # as layers.NEG_INF: a visible logit is always far above it
DEFAULT_BLOCK = 512


# ---------------------------------------------------------------------------- mask and bias

def _visible(q_segments, k_segments, causal, q_positions=None, k_positions=None,
             q_prefix=None, k_prefix=None) -> Array:
  """[b, l], [b, s] vectors -> bool [b, l, s]: same packed segment, not padding, and (causal)
  not after the query by position, unless both are in the prefix."""
  visible = (q_segments[:, :, None] == k_segments[:, None, :]) & (k_segments[:, None, :] > 0)
  if causal:
    allowed = k_positions[:, None, :] <= q_positions[:, :, None]
    if q_prefix is not None:
      allowed |= q_prefix[:, :, None].astype(bool) & k_prefix[:, None, :].astype(bool)
    visible &= allowed
  return visible


@flax.struct.dataclass
class Mask:
  """Which keys each query sees, kept as the vectors it is made of (see `_visible`)."""
  q_segment_ids: Array  # [b, l], 0 = padding
  k_segment_ids: Array  # [b, s]
  q_positions: Optional[Array] = None  # [b, l], for causal masks
  k_positions: Optional[Array] = None
  q_prefix: Optional[Array] = None  # [b, l], prefix LM: 1 inside the prefix
  k_prefix: Optional[Array] = None
  causal: bool = flax.struct.field(pytree_node=False, default=False)

  @property
  def shape(self) -> tuple[int, int, int, int]:
    return (self.q_segment_ids.shape[0], 1, self.q_segment_ids.shape[1],
            self.k_segment_ids.shape[1])

  @property
  def ndim(self) -> int:
    return 4

  def dense(self) -> Array:
    """bool [b, 1, l, s]."""
    return _visible(self.q_segment_ids, self.k_segment_ids, self.causal, self.q_positions,
                    self.k_positions, self.q_prefix, self.k_prefix)[:, None]

  def __getitem__(self, index):
    return self.dense()[index]

  def padded(self, length: int, key_length: int) -> "Mask":
    """The mask of queries and keys padded (with padding: segment 0) to these lengths."""
    pad = lambda x, n: None if x is None else jnp.pad(x, ((0, 0), (0, n - x.shape[1])))
    return Mask(pad(self.q_segment_ids, length), pad(self.k_segment_ids, key_length),
                pad(self.q_positions, length), pad(self.k_positions, key_length),
                pad(self.q_prefix, length), pad(self.k_prefix, key_length), self.causal)

  def block(self, q_start, block_q: int, k_start, block_k: int) -> Array:
    """bool [b, 1, q, c]: queries [q_start, +block_q) against keys [k_start, +block_k)."""
    qs = lambda x: None if x is None else jax.lax.dynamic_slice_in_dim(x, q_start, block_q, 1)
    ks = lambda x: None if x is None else jax.lax.dynamic_slice_in_dim(x, k_start, block_k, 1)
    return _visible(qs(self.q_segment_ids), ks(self.k_segment_ids), self.causal,
                    qs(self.q_positions), ks(self.k_positions), qs(self.q_prefix),
                    ks(self.k_prefix))[:, None]


@flax.struct.dataclass
class RelativeBias:
  """T5's relative position bias table[bucket(k_position - q_position), head], by blocks."""
  table: Array  # [buckets, h]
  q_positions: Array  # [b, l]
  k_positions: Array  # [b, s]
  bidirectional: bool = flax.struct.field(pytree_node=False, default=True)
  max_distance: int = flax.struct.field(pytree_node=False, default=128)

  def buckets(self, q_positions: Array, k_positions: Array) -> Array:
    from t5x_lite.layers import relative_position_bucket  # pylint: disable=g-import-not-at-top
    return relative_position_bucket(k_positions[:, None, :] - q_positions[:, :, None],
                                    self.bidirectional, self.table.shape[0], self.max_distance)

  def of_buckets(self, buckets: Array) -> Array:
    """[b, q, c] bucket ids -> float32 bias [b, h, q, c]."""
    return jnp.take(self.table, buckets, axis=0).transpose(0, 3, 1, 2).astype(jnp.float32)

  def dense(self) -> Array:
    """float32 [b, h, l, s], what layers.RelativePositionBias gives the "xla" path."""
    return self.of_buckets(self.buckets(self.q_positions, self.k_positions))


Bias = Union[None, Array, RelativeBias]


def dense_mask(mask: Union[Mask, Array]) -> Array:
  return mask.dense() if isinstance(mask, Mask) else mask


def dense_bias(bias: Bias) -> Optional[Array]:
  return bias.dense() if isinstance(bias, RelativeBias) else bias


# ---------------------------------------------------------------------------- blocks

def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _pad_axis(x: Array, axis: int, length: int, value=0) -> Array:
  if x.shape[axis] in (1, length):
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, length - x.shape[axis])
  return jnp.pad(x, widths, constant_values=value)


def _slice(x: Array, axis: int, start, size: int) -> Array:
  """x[..., start:start + size, ...] along `axis`, or x itself where that axis broadcasts."""
  if x.shape[axis] == 1:
    return x
  return jax.lax.dynamic_slice_in_dim(x, start, size, axis)


def _mask_block(mask, i, j, bq: int, bk: int) -> Array:
  """bool [b, 1, 1, q, c] (or broadcastable): block (i, j) of the mask."""
  if isinstance(mask, Mask):
    block = mask.block(i * bq, bq, j * bk, bk)
  else:
    block = _slice(_slice(mask, 2, i * bq, bq), 3, j * bk, bk)
  return block[:, :, None]


def _bias_block(bias: Bias, i, j, bq: int, bk: int, kv_heads: int):
  """float32 [b|1, k, g, q, c] block (i, j) of the bias (None: no bias); with a RelativeBias
  also the block's bucket ids [b, q, c] (for the table's gradient)."""
  if bias is None:
    return None, None
  if isinstance(bias, RelativeBias):
    buckets = bias.buckets(_slice(bias.q_positions, 1, i * bq, bq),
                           _slice(bias.k_positions, 1, j * bk, bk))
    block = bias.of_buckets(buckets)
  else:
    buckets, block = None, _slice(_slice(bias, 2, i * bq, bq), 3, j * bk, bk).astype(jnp.float32)
  return block.reshape(block.shape[0], kv_heads, -1, *block.shape[2:]), buckets


def _logits(qi: Array, kj: Array, bias_block, visible: Array, scale: float) -> Array:
  """[b, q, k, g, e] x [b, c, k, e] -> masked float32 logits [b, k, g, q, c]."""
  logits = jnp.einsum("bqkge,bcke->bkgqc", qi, kj, preferred_element_type=jnp.float32) * scale
  if bias_block is not None:
    logits = logits + bias_block
  return jnp.where(visible, logits, NEG_INF)


# ---------------------------------------------------------------------------- blockwise kernel

def blockwise_attention(q: Array, k: Array, v: Array, mask: Union[Mask, Array], bias: Bias = None,
                        *, scale: float = 1.0, block_q: int = DEFAULT_BLOCK,
                        block_k: int = DEFAULT_BLOCK) -> Array:
  """softmax(q k^T * scale + bias, masked) v without the [b, h, l, s] logits.

  q [b, l, h, e], k/v [b, s, k, e] (k divides h); mask a `Mask` or bool [b, 1, l|1, s]; bias
  None, float [b|1, h, l, s] or a `RelativeBias`. Returns [b, l, h, e] in v's dtype. Lengths
  need not divide the blocks (queries and keys are padded, the padding masked).
  """
  b, l, h, e = q.shape
  s, kv_heads = k.shape[1], k.shape[2]
  if h % kv_heads:
    raise ValueError(f"blockwise_attention: {kv_heads} key/value heads do not divide {h} "
                     "query heads.")
  bq, bk = min(block_q, l), min(block_k, s)
  length, key_length = _round_up(l, bq), _round_up(s, bk)
  q = _pad_axis(q, 1, length).reshape(b, length, kv_heads, h // kv_heads, e)
  k, v = _pad_axis(k, 1, key_length), _pad_axis(v, 1, key_length)
  if isinstance(mask, Mask):
    mask = mask.padded(length, key_length)
  else:
    mask = _pad_axis(_pad_axis(mask, 2, length, False), 3, key_length, False)
  if isinstance(bias, RelativeBias):
    bias = bias.replace(q_positions=_pad_axis(bias.q_positions, 1, length),
                        k_positions=_pad_axis(bias.k_positions, 1, key_length))
  elif bias is not None:
    bias = _pad_axis(_pad_axis(bias, 2, length), 3, key_length)
  if length == bq and key_length == bk:  # one block: no loop, no custom VJP (see _one_block)
    out = _one_block(q, k, v, mask, bias, scale)
  else:
    out = _attention(q, k, v, mask, bias, scale, bq, bk)
  return out[:, :l].reshape(b, l, h, e)


def _one_block(q, k, v, mask, bias, scale: float) -> Array:
  """The kernel's result when one block covers all queries and keys, by plain autodiff: its
  backward keeps the block's probabilities instead of recomputing them (at 512 tokens the
  recomputation and the loops made blockwise 1.3x slower than "xla"; the memory is one
  block's, as the kernel's)."""
  _, bq, kv_heads, _, _ = q.shape
  bk = k.shape[1]
  visible = _mask_block(mask, 0, 0, bq, bk)
  logits = _logits(q, k, _bias_block(bias, 0, 0, bq, bk, kv_heads)[0], visible, scale)
  probs = jnp.where(visible, jax.nn.softmax(logits, axis=-1), 0.0)  # rows seeing no key: 0
  out = jnp.einsum("bkgqc,bcke->bqkge", probs.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  return out.astype(v.dtype)


def _tie(*arrays):
  """`arrays` unchanged, but each now depends on all of them (an optimization barrier).

  Inside a differentiated layer scan the mask (and k, v in cross-attention) are the same for
  every layer; without the tie, JAX's scan partial evaluation hoists every computation that
  depends on them alone (each block's broadcast mask) out of the layer loop and materialises it
  for all blocks at once: a [b, h, l, s] array, the very thing this kernel avoids (measured:
  775 MiB of temporaries instead of 20 for two scanned layers at 4096 tokens)."""
  return jax.lax.optimization_barrier(arrays)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _attention(q, k, v, mask, bias, scale, bq, bk):
  return _forward(q, k, v, mask, bias, scale, bq, bk)[0]


def _forward(q, k, v, mask, bias, scale: float, bq: int, bk: int):
  """(out [b, l, k, g, e], log-sum-exp [nq, b, k, g, q]) over padded, block-divisible inputs."""
  q, k, v, mask, bias = _tie(q, k, v, mask, bias)
  b, length, kv_heads, group, e = q.shape
  num_k = k.shape[1] // bk

  def query_block(i):
    qi = jax.lax.dynamic_slice_in_dim(q, i * bq, bq, 1)

    def key_block(carry, j):
      visible = _mask_block(mask, i, j, bq, bk)

      def update(carry):
        out, row_max, row_sum = carry
        logits = _logits(qi, jax.lax.dynamic_slice_in_dim(k, j * bk, bk, 1),
                         _bias_block(bias, i, j, bq, bk, kv_heads)[0], visible, scale)
        new_max = jnp.maximum(row_max, logits.max(-1))
        probs = jnp.where(visible, jnp.exp(logits - new_max[..., None]), 0.0)
        correction = jnp.exp(row_max - new_max)
        vj = jax.lax.dynamic_slice_in_dim(v, j * bk, bk, 1)
        out = out * correction[..., None] + jnp.einsum(
            "bkgqc,bcke->bkgqe", probs.astype(v.dtype), vj, preferred_element_type=jnp.float32)
        return out, new_max, row_sum * correction + probs.sum(-1)

      return jax.lax.cond(jnp.any(visible), update, lambda c: c, carry), None

    rows = (b, kv_heads, group, bq)
    init = (jnp.zeros(rows + (e,), jnp.float32), jnp.full(rows, NEG_INF, jnp.float32),
            jnp.zeros(rows, jnp.float32))
    (out, row_max, row_sum), _ = jax.lax.scan(key_block, init, jnp.arange(num_k))
    seen = row_sum > 0  # rows that see no key (padding) give zeros
    out = jnp.where(seen[..., None], out / jnp.where(seen, row_sum, 1.0)[..., None], 0.0)
    return out, jnp.where(seen, row_max + jnp.log(jnp.where(seen, row_sum, 1.0)), 0.0)

  out, lse = jax.lax.map(query_block, jnp.arange(length // bq))  # [nq, b, k, g, q, (e)]
  out = out.transpose(1, 0, 4, 2, 3, 5).reshape(b, length, kv_heads, group, e)
  return out.astype(v.dtype), lse


def _attention_fwd(q, k, v, mask, bias, scale, bq, bk):
  out, lse = _forward(q, k, v, mask, bias, scale, bq, bk)
  return out, (q, k, v, mask, bias, out, lse)


def _attention_bwd(scale, bq, bk, residuals, d_out):
  """FlashAttention-2's backward: per key block, the query blocks' probabilities recomputed
  from the saved log-sum-exp; dk, dv summed over query blocks, dq over key blocks."""
  q, k, v, mask, bias, out, lse, d_out = _tie(*residuals, d_out)
  b, length, kv_heads, group, e = q.shape
  num_q, num_k = length // bq, k.shape[1] // bk
  blocks = lambda x: x.reshape(b, num_q, bq, *x.shape[2:]).swapaxes(0, 1)  # [nq, b, q, ...]
  # D_i = sum_e dO * O: the softmax Jacobian's row term, [nq, b, k, g, q].
  row_dot = blocks(jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), -1))
  row_dot = row_dot.transpose(0, 1, 3, 4, 2)
  table = bias.table if isinstance(bias, RelativeBias) else None

  def key_block(carry, j):
    d_q, d_table = carry
    kj = jax.lax.dynamic_slice_in_dim(k, j * bk, bk, 1)
    vj = jax.lax.dynamic_slice_in_dim(v, j * bk, bk, 1)

    def query_block(inner, xs):
      d_k, d_v, d_table = inner
      i, qi, d_oi, lse_i, row_dot_i, d_qi = xs
      grads = _block_grads(qi, kj, vj, d_oi, lse_i, row_dot_i, mask, bias, (i, j), scale,
                           (bq, bk, kv_heads))
      visible = jnp.any(_mask_block(mask, i, j, bq, bk))
      zero = jax.tree.map(jnp.zeros_like, jax.eval_shape(grads))
      d_kj, d_vj, d_qij, d_bias, d_tab = jax.lax.cond(visible, grads, lambda: zero)
      d_table = None if d_table is None else d_table + d_tab
      return (d_k + d_kj, d_v + d_vj, d_table), (d_qi + d_qij, d_bias)

    zeros_kv = jnp.zeros((b, bk, kv_heads, e), jnp.float32)
    (d_k, d_v, d_table), (d_q, d_bias) = jax.lax.scan(
        query_block, (zeros_kv, zeros_kv, d_table),
        (jnp.arange(num_q), blocks(q), blocks(d_out), lse, row_dot, d_q))
    return (d_q, d_table), (d_k, d_v, d_bias)

  d_q0 = jnp.zeros((num_q, b, bq, kv_heads, group, e), jnp.float32)
  d_table0 = None if table is None else jnp.zeros(table.shape, jnp.float32)
  (d_q, d_table), (d_k, d_v, d_bias) = jax.lax.scan(key_block, (d_q0, d_table0),
                                                     jnp.arange(num_k))
  unblock = lambda x, n: x.swapaxes(0, 1).reshape(x.shape[1], n, *x.shape[3:])
  d_q = unblock(d_q, length)
  d_k, d_v = unblock(d_k, k.shape[1]), unblock(d_v, k.shape[1])
  return (d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype), None,
          _bias_cotangent(bias, d_bias, d_table))


def _block_grads(qi, kj, vj, d_oi, lse_i, row_dot_i, mask, bias, ij, scale, sizes):
  """A function of no arguments giving block (i, j)'s (dk, dv, dq, d_bias, d_table) terms."""
  (i, j), (bq, bk, kv_heads) = ij, sizes

  def grads():
    visible = _mask_block(mask, i, j, bq, bk)
    bias_block, buckets = _bias_block(bias, i, j, bq, bk, kv_heads)
    logits = _logits(qi, kj, bias_block, visible, scale)
    probs = jnp.where(visible, jnp.exp(logits - lse_i[..., None]), 0.0)  # [b, k, g, q, c]
    d_v = jnp.einsum("bkgqc,bqkge->bcke", probs.astype(d_oi.dtype), d_oi,
                     preferred_element_type=jnp.float32)
    d_probs = jnp.einsum("bqkge,bcke->bkgqc", d_oi, vj, preferred_element_type=jnp.float32)
    d_logits = probs * (d_probs - row_dot_i[..., None])
    d_q = jnp.einsum("bkgqc,bcke->bqkge", d_logits, kj.astype(jnp.float32)) * scale
    d_k = jnp.einsum("bkgqc,bqkge->bcke", d_logits, qi.astype(jnp.float32)) * scale
    b, _, _, q, c = d_logits.shape
    per_head = d_logits.reshape(b, -1, q, c)  # [b, h, q, c]
    d_bias = d_table = None
    if isinstance(bias, RelativeBias):
      d_table = jnp.zeros(bias.table.shape, jnp.float32).at[buckets].add(
          per_head.transpose(0, 2, 3, 1))
    elif bias is not None:
      d_bias = per_head.sum(0, keepdims=True) if bias.shape[0] == 1 else per_head
    return d_k, d_v, d_q, d_bias, d_table

  return grads


def _bias_cotangent(bias: Bias, d_bias, d_table):
  if bias is None:
    return None
  if isinstance(bias, RelativeBias):
    return bias.replace(table=d_table.astype(bias.table.dtype), q_positions=None,
                        k_positions=None)
  # [nk, nq, b, h, q, c] -> [b, h, l, s]
  nk, nq, bb, h, q, c = d_bias.shape
  return d_bias.transpose(2, 3, 1, 4, 0, 5).reshape(bb, h, nq * q, nk * c).astype(bias.dtype)


_attention.defvjp(_attention_fwd, _attention_bwd)


# ---------------------------------------------------------------------------- splash (TPU)

def _splash_platform() -> str:
  """The platform the traced program is for: the mesh's (an ahead-of-time compile for a TPU
  topology runs on a CPU host), else the default backend."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else getattr(mesh, "abstract_device", None)
  return device.platform if device is not None else jax.default_backend()


def _check_splash(mask, bias, platform: str, interpret: bool) -> None:
  if platform != "tpu" and not interpret:
    raise ValueError(
        f"attention_implementation='splash' is a TPU (Pallas/Mosaic) kernel, but this program "
        f"is for {platform!r}; use attention_implementation='blockwise' (any backend) or 'xla' "
        "there, or compile for a TPU slice with tools/aot_compile.py --topology v5e:2x2.")
  if not isinstance(mask, Mask) or mask.q_prefix is not None:
    raise ValueError("attention_implementation='splash' takes causal or full masks over packed "
                     "segments (layers.attention_mask without a prefix); a prefix LM or a dense "
                     "mask needs attention_implementation='blockwise'.")
  if bias is not None:
    raise ValueError("attention_implementation='splash' adds no attention bias (T5's relative "
                     "positions); use attention_implementation='blockwise' for such models.")


def splash_attention(q: Array, k: Array, v: Array, mask: Mask, bias: Bias = None, *,
                     scale: float = 1.0, interpret: bool = False) -> Array:
  """`blockwise_attention` by jax.experimental.pallas.ops.tpu.splash_attention, under
  shard_map (a Mosaic kernel does not partition itself): each device runs the kernel on its
  rows and heads. Causality is by index within packed segments, which is the mask's causality
  by position for packed rows (positions count up within a segment). `interpret` runs the
  kernel in Pallas's interpreter (any backend; for tests)."""
  from jax.experimental.pallas.ops.tpu import splash_attention as splash  # pylint: disable=g-import-not-at-top
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  _check_splash(mask, bias, _splash_platform(), interpret)
  b, l, h, e = q.shape
  s, kv_heads = k.shape[1], k.shape[2]
  mesh = jax.sharding.get_abstract_mesh()
  spec = lambda *names: nn.logical_to_mesh_axes(tuple(f"activation_{n}" for n in names))
  heads_axis = spec("heads")[0] if not mesh.empty else None
  shards = 1 if heads_axis is None else mesh.shape[heads_axis]
  if kv_heads % shards:  # kv heads fewer than the tensor shards: give each query head its own
    k, v = (jnp.repeat(x, h // kv_heads, axis=2) for x in (k, v))
    kv_heads = h
  group = h // kv_heads
  one_head = splash.CausalMask((l, s)) if mask.causal else splash.FullMask((l, s))
  kernel = splash.make_splash_mqa_single_device(
      splash.MultiHeadMask([one_head] * group), interpret=interpret)

  def attend(q, k, v, q_segments, k_segments):
    """One device's [b', l, h', e] queries and [b', s, k', e] keys and values."""
    rows, _, heads, _ = q.shape
    qg = (q * scale).reshape(rows, l, heads // group, group, e).transpose(0, 2, 3, 1, 4)
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [b', k', s, e]
    per_row = lambda q, k, v, qs, ks: jax.vmap(
        lambda q, k, v: kernel(q, k, v, segment_ids=splash.SegmentIds(qs, ks)))(q, k, v)
    out = jax.vmap(per_row)(qg, kh, vh, q_segments, k_segments)  # [b', k', g, l, e]
    return out.transpose(0, 3, 1, 2, 4).reshape(rows, l, heads, e).astype(v.dtype)

  args = (q, k, v, mask.q_segment_ids, mask.k_segment_ids)
  if mesh.empty:
    return attend(*args)
  seq, rows = spec("batch", "length", "heads", "kv"), spec("batch", "length")
  kv_spec = spec("batch", "length", "kv_heads", "kv")
  return jax.shard_map(attend, mesh=mesh, in_specs=(seq, kv_spec, kv_spec, rows, rows),
                       out_specs=seq, check_vma=False)(*args)
