"""The matmuls every layer runs: compute in the layer's dtype, accumulation in float32, and
gradients laid out so that XLA:CPU need not copy.

`mixed_einsum` is an einsum with bf16/fp16 mixed precision's fast path in the backward pass too
(attention's score and value products); `dense_matmul` is a dense layer's contraction as one 2-D
matmul with copy-free weight gradients (`DenseGeneral`, LoRA's adapters); `matmul_transposed`
the same against a table stored [n, d] (the tied output head).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

Array = jax.Array


def mixed_einsum(equation: str, a: Array, b: Array, dtype, out_dtype=None) -> Array:
  """einsum of a and b cast to `dtype`, accumulated in float32, returned in `out_dtype` (default
  `dtype`): bf16/fp16 mixed precision's fast path, in the backward pass too.

  Differentiated as is, an einsum with `preferred_element_type=float32` and a cast back gets a
  float32 cotangent, and JAX then runs both gradient matmuls in float32 on upcast copies of the
  bf16 operands (the converts and the slower matmuls cost more than bf16 saves). Here the
  cotangent is cast to `dtype` and the gradient matmuls take bf16 operands with float32
  accumulation as well. Equations are "A,B->C" where every index of A and of B appears in one
  of the other two terms (no index summed within one operand), so dA = C,B->A and dB = A,C->B.
  In float32 it is the plain einsum.
  """
  out_dtype = jnp.dtype(dtype if out_dtype is None else out_dtype)
  if jnp.dtype(dtype) == jnp.float32:
    return jnp.einsum(equation, a.astype(dtype), b.astype(dtype)).astype(out_dtype)
  return _low_precision_einsum(equation, jnp.dtype(dtype), out_dtype, a, b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _low_precision_einsum(equation, dtype, out_dtype, a, b):
  return jnp.einsum(equation, a.astype(dtype), b.astype(dtype),
                    preferred_element_type=jnp.float32).astype(out_dtype)


def _low_precision_einsum_forward(equation, dtype, out_dtype, a, b):
  a_low, b_low = a.astype(dtype), b.astype(dtype)
  out = jnp.einsum(equation, a_low, b_low, preferred_element_type=jnp.float32)
  # Residuals in the compute dtype; the primal dtypes (zero-size) say what the gradients are.
  return out.astype(out_dtype), (a_low, b_low, jnp.zeros((0,), a.dtype), jnp.zeros((0,), b.dtype))


def _low_precision_einsum_backward(equation, dtype, out_dtype, residuals, g):
  del out_dtype
  a_low, b_low, a_like, b_like = residuals
  inputs, out = equation.split("->")
  ea, eb = inputs.split(",")
  g = g.astype(dtype)
  da = jnp.einsum(f"{out},{eb}->{ea}", g, b_low, preferred_element_type=jnp.float32)
  db = jnp.einsum(f"{ea},{out}->{eb}", a_low, g, preferred_element_type=jnp.float32)
  return da.astype(a_like.dtype), db.astype(b_like.dtype)


_low_precision_einsum.defvjp(_low_precision_einsum_forward, _low_precision_einsum_backward)


def dense_matmul(x: Array, kernel: Array, n_in: int, dtype, out_dtype=None) -> Array:
  """x's trailing `n_in` dims contracted with the kernel's leading ones ([..., in...] x
  [in..., out...] -> [..., out...]), as one 2-D matmul of x [rows, in] and the kernel [in, out].

  Compute and accumulation as `mixed_einsum`. The gradients are 2-D matmuls too: XLA:CPU lays
  out the autodiff of the einsum so that each weight gradient first copies its cotangent into
  [out, rows] (a strided, cache-missing transpose, fused with the elementwise backward before
  it); a weight gradient written as x^T g over the rows, contracting both operands' leading
  dim, needs no copy.
  """
  lead, out_shape = x.shape[:-n_in], kernel.shape[n_in:]
  rows = x.reshape(-1, math.prod(x.shape[-n_in:]))
  y = _matmul(jnp.dtype(dtype), jnp.dtype(dtype if out_dtype is None else out_dtype), False,
              rows, kernel.reshape(rows.shape[1], -1))
  return y.reshape(lead + out_shape)


def matmul_transposed(x: Array, table: Array, dtype, out_dtype=None) -> Array:
  """x [..., d] times table [n, d] transposed -> [..., n] (the tied head: logits from the
  embedding table), as `dense_matmul`: 2-D, accumulated in float32, gradients without copies."""
  rows = x.reshape(-1, x.shape[-1])
  y = _matmul(jnp.dtype(dtype), jnp.dtype(dtype if out_dtype is None else out_dtype), True,
              rows, table)
  return y.reshape(x.shape[:-1] + table.shape[:1])


def _dot(a: Array, b: Array, contract: tuple[int, int]) -> Array:
  return jax.lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())),
                             preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _matmul(dtype, out_dtype, transpose_b, a, b):
  """a [m, k] times b [k, n] (or b [n, k] transposed), operands in `dtype`."""
  return _dot(a.astype(dtype), b.astype(dtype), (1, 1 if transpose_b else 0)).astype(out_dtype)


def _matmul_forward(dtype, out_dtype, transpose_b, a, b):
  a_low, b_low = a.astype(dtype), b.astype(dtype)
  out = _dot(a_low, b_low, (1, 1 if transpose_b else 0)).astype(out_dtype)
  # Residuals in the compute dtype; the primal dtypes (zero-size) say what the gradients are.
  return out, (a_low, b_low, jnp.zeros((0,), a.dtype), jnp.zeros((0,), b.dtype))


def _matmul_backward(dtype, out_dtype, transpose_b, residuals, g):
  del out_dtype
  a_low, b_low, a_like, b_like = residuals
  g = g.astype(dtype)
  da = _dot(g, b_low, (1, 0 if transpose_b else 1))  # [m, n] x b -> [m, k]
  # [n, k] = g^T a or [k, n] = a^T g: both contract the rows, every operand's leading dim.
  db = _dot(g, a_low, (0, 0)) if transpose_b else _dot(a_low, g, (0, 0))
  return da.astype(a_like.dtype), db.astype(b_like.dtype)


_matmul.defvjp(_matmul_forward, _matmul_backward)
