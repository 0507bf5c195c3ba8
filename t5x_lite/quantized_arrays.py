"""Quantized arrays: int8 / int4 / nf4 values with absmax scales, the 4-bit packing (two values
per byte) and NF4's levels, dequantization, dynamic int8 activations and a fused
dequantize-matmul. The arithmetic under t5x_lite.quantization's layers and
t5x_lite.quantized_checkpoints' files; see t5x_lite.quantization for the modes.
"""
from __future__ import annotations

import statistics
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
KINDS = ("int8", "int4", "nf4")  # what a quantized array holds (w8a8 holds int8)


def _normal_float_levels() -> np.ndarray:
  """NF4's 16 values (QLoRA, Dettmers et al. 2023, appendix E): quantiles of N(0, 1), 8 for
  the positive half and 7 for the negative one plus an exact zero, divided by the largest, so
  [-1, 1]. Each level covers an equal share of a normal distribution, which is what trained
  weights within a group roughly follow: the levels crowd near zero, where most weights are,
  instead of int4's even grid. The outer quantile sits between the 1/32 and 1/30 tails, the
  paper's choice (an infinite outermost level otherwise)."""
  normal = statistics.NormalDist()
  outer = 1 - (1 / 32 + 1 / 30) / 2
  positive = [normal.inv_cdf(p) for p in np.linspace(outer, 0.5, 9)[:-1]]
  negative = [-normal.inv_cdf(p) for p in np.linspace(outer, 0.5, 8)[:-1]]
  levels = np.sort(np.array(positive + [0.0] + negative))
  return (levels / np.max(np.abs(levels))).astype(np.float32)


NF4_LEVELS = _normal_float_levels()


def _grouped(shape: tuple, axis: int, group: int) -> tuple:
  """`shape` with `axis` split into (groups, group)."""
  return shape[:axis] + (shape[axis] // group, group) + shape[axis + 1:]


def quantize_array(w: Array, axis: int, kind: str, group_size: Optional[int] = None):
  """(q, scale): `w` quantized as `kind` in groups of `group_size` along `axis` (None: the
  whole axis, i.e. one scale per channel), symmetric absmax: "int8" / "int4" round w / scale to
  signed integers (scale = absmax / 127 or / 7), "nf4" stores the index of the nearest of
  NF4_LEVELS to w / absmax (scale = absmax).

  q is int8 ("int8") or uint8 with two values per byte along `axis` ("int4", "nf4"); scale is
  float32 with `axis` of length groups. Dequantized: value * scale, each scale repeated over
  its group (`dequantize_array`).
  """
  if kind not in KINDS:
    raise ValueError(f"kind={kind!r}: one of {list(KINDS)}.")
  size = w.shape[axis]
  group = size if group_size is None else group_size
  if size % group:
    raise ValueError(f"group size {group} does not divide axis {axis} of length {size}.")
  top = {"int8": 127, "int4": 7, "nf4": 1}[kind]  # symmetric: -128 / -8 are never used
  grouped = w.astype(jnp.float32).reshape(_grouped(w.shape, axis, group))
  scale = jnp.max(jnp.abs(grouped), axis=axis + 1, keepdims=True) / top
  scale = jnp.where(scale == 0, 1.0, scale)  # an all-zero group: any scale gives zeros
  normalized = grouped / scale
  if kind == "nf4":  # the nearest level: count the midpoints between levels below the value
    midpoints = jnp.asarray((NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2)
    q = jnp.searchsorted(midpoints, normalized.reshape(-1)).astype(jnp.uint8).reshape(w.shape)
  else:
    q = jnp.clip(jnp.round(normalized), -top, top).astype(jnp.int8).reshape(w.shape)
  scale = jnp.squeeze(scale, axis + 1)
  return (q if kind == "int8" else pack_int4(q, axis)), scale


def pack_int4(q: Array, axis: int) -> Array:
  """4-bit values (int8 in [-8, 7], or uint8 indices in [0, 15]) -> uint8, values 2i and
  2i + 1 along `axis` in the low and high nibble of byte i."""
  pairs = q.astype(jnp.uint8).reshape(_grouped(q.shape, axis, 2))
  low, high = jnp.split(pairs, 2, axis=axis + 1)
  return jnp.squeeze((low & 0xF) | (high << 4), axis + 1)


def _nibbles(packed: Array, axis: int) -> tuple[Array, Array]:
  """(bytes, high): each byte of `packed` repeated twice along `axis` (value 2i and 2i + 1
  of byte i), and 1 where the value is the high nibble. Written elementwise (no stack or
  concatenate), so XLA fuses the unpacking with what reads it into one pass over the kernel."""
  doubled = jnp.repeat(packed, 2, axis=axis)
  high = jax.lax.broadcasted_iota(jnp.uint8, doubled.shape, axis) % 2
  return doubled, high


def unpack_int4(packed: Array, axis: int) -> Array:
  """The inverse of `pack_int4` for signed values: int8, `axis` twice as long."""
  doubled, high = _nibbles(jax.lax.bitcast_convert_type(packed, jnp.int8), axis)
  # The nibble moved to the top, then an arithmetic shift back: sign-extended.
  return jnp.left_shift(doubled, (4 - 4 * high).astype(jnp.int8)) >> 4


def unpack_nf4(packed: Array, axis: int, dtype=jnp.float32) -> Array:
  """NF4_LEVELS of a packed nf4 array, as `dtype`, `axis` twice as long. The lookup is a tree
  of selects on the index's four bits, which vectorises (a gather from the table measured
  slower on XLA-CPU)."""
  doubled, high = _nibbles(packed, axis)
  index = (doubled >> (4 * high)) & 0xF
  values = [jnp.asarray(level, dtype) for level in NF4_LEVELS]
  for bit in range(4):  # pairs of candidates that differ in this bit, lowest bit first
    on = (index >> bit) & 1 == 1
    values = [jnp.where(on, values[i + 1], values[i]) for i in range(0, len(values), 2)]
  return values[0]


def unpacked_values(q: Array, axis: int, kind: str, dtype=jnp.float32) -> Array:
  """q's values as `dtype` before scaling: the integers, or nf4's levels."""
  if kind == "nf4":
    return unpack_nf4(q, axis, dtype)
  return (unpack_int4(q, axis) if kind == "int4" else q).astype(dtype)


def dequantize_array(q: Array, scale: Array, axis: int, kind: str, dtype=jnp.float32) -> Array:
  """value * scale as `dtype` (the inverse of `quantize_array`, up to rounding). Each scale is
  repeated over its group rather than the values reshaped into groups, so the whole
  computation stays elementwise on q's (unpacked) shape: one fused pass."""
  values = unpacked_values(q, axis, kind)
  scale = jnp.repeat(scale, values.shape[axis] // scale.shape[axis], axis=axis)
  return (values * scale).astype(dtype)


def quantize_activations(x: Array, n_contracted: int) -> tuple[Array, Array]:
  """Dynamic int8 of activations: (int8 x, float32 scale [..., 1...]), one scale per token
  (absmax over the trailing `n_contracted` dims)."""
  axes = tuple(range(x.ndim - n_contracted, x.ndim))
  x32 = x.astype(jnp.float32)
  scale = jnp.max(jnp.abs(x32), axis=axes, keepdims=True) / 127.0
  scale = jnp.where(scale == 0, 1.0, scale)
  return jnp.clip(jnp.round(x32 / scale), -127, 127).astype(jnp.int8), scale


def fused_matmul(x: Array, q: Array, scale: Array, kind: str, axis: int = 0) -> Array:
  """x [..., in] times a kernel quantized along its input axis, in float32: (q [in * bits / 8,
  out...], scale [groups, out...]) with `axis` 0, or a table (q [out, in * bits / 8], scale
  [out, groups]) with `axis` 1 (the tied head). Written as broadcast multiplies and sums, so
  XLA fuses the integer-to-float conversion (and 4-bit unpacking) into the reduction's loop:
  the kernel is read as stored (1 or 0.5 bytes per weight) and no float copy of it is built.
  The dot path cannot (XLA-CPU's library matmul takes float operands), but inside a decoding
  loop XLA hoists its dequantization out of the loop: each call dequantizes every kernel once
  and the steps run float matmuls, as float32 does. This reduction instead runs every step,
  below the dot library's speed (not blocked / vectorised like a GEMV kernel), so it is off by
  default (QuantizedModel's `fused_max_rows`)."""
  if axis == 0:
    out_shape = q.shape[1:]
    q, scale = q.reshape(q.shape[0], -1).T, scale.reshape(scale.shape[0], -1).T
  else:
    out_shape = q.shape[:1]
  # Now q [out, in_q] and scale [out, groups]; the transposes above are layout, fused too.
  groups, lead = scale.shape[1], x.shape[:-1]
  w = unpacked_values(q, 1, kind).reshape(q.shape[0], groups, -1)  # elementwise: fused
  # The rows flattened into one axis: with two or more row axes (a decoding step's [b, 1, in])
  # jitted 4-bit products came out wrong on XLA-CPU (jax 0.10.2), eager ones right.
  x = x.astype(jnp.float32).reshape((-1, 1, groups, w.shape[-1]))
  per_group = jnp.sum(x * w, axis=-1)  # [rows, out, groups]
  return jnp.sum(per_group * scale, axis=-1).reshape(lead + out_shape)


def relative_error(w: Array, axis: int, kind: str, group_size: Optional[int] = None) -> float:
  """sqrt(sum (w - dequantized w)^2 / sum w^2) of `w` quantized as `kind` in groups of
  `group_size` along `axis`: how much of the weights a quantization loses."""
  back = dequantize_array(*quantize_array(w, axis, kind, group_size), axis, kind)
  return (float(jnp.sum((w - back) ** 2)) / float(jnp.sum(jnp.square(w)))) ** 0.5
