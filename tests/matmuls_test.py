"""mixed_einsum's bf16 fast path; dense_matmul / matmul_transposed equal the einsums they replace."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_lite import matmuls


@pytest.mark.parametrize("equation, a_shape, b_shape", [
    ("bld,dhe->blhe", (2, 5, 8), (8, 2, 3)),                # a projection (DenseGeneral)
    ("blkge,bske->bkgls", (2, 5, 2, 3, 4), (2, 7, 2, 4)),  # attention logits
])
def test_bf16_einsum_runs_every_matmul_in_bf16_with_float32_accumulation(equation, a_shape,
                                                                          b_shape):
  """Forward and both gradients: bf16 operands, float32 results, gradients near float32's."""
  a = jax.random.normal(jax.random.PRNGKey(0), a_shape)
  b = jax.random.normal(jax.random.PRNGKey(1), b_shape)  # float32, as a master weight is
  loss = lambda a, b, dtype: jnp.sum(jnp.sin(matmuls.mixed_einsum(equation, a, b, dtype,
                                                                  jnp.float32)))
  grad = jax.jit(jax.grad(loss, (0, 1)), static_argnums=2)
  hlo = grad.lower(a.astype(jnp.bfloat16), b, jnp.bfloat16).as_text()
  dots = [line for line in hlo.splitlines() if "stablehlo.dot_general" in line]
  assert len(dots) == 3
  for dot in dots:  # "... : (tensor<AxBxbf16>, tensor<CxDxbf16>) -> tensor<ExFxf32>"
    operands, result = dot.rsplit(":", 1)[1].split("->")
    assert operands.count("xbf16>") == 2 and result.strip().endswith("xf32>"), dot
  exact = grad(a, b, jnp.float32)
  mixed = grad(a.astype(jnp.bfloat16), b, jnp.bfloat16)
  assert mixed[1].dtype == jnp.float32  # the float32 weight's gradient, without a convert back
  for low, high in zip(mixed, exact):
    np.testing.assert_allclose(low.astype(jnp.float32), high, atol=0.05 * float(
        jnp.max(jnp.abs(high))))



@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dense_matmuls_and_their_gradients_equal_the_einsums(dtype):
  """A projection [b, l, d] x [d, h, e], an output [b, l, h, e] x [h, e, d] and the tied head
  against a [v, d] table: values and gradients as mixed_einsum's (float32: to rounding)."""
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  x = jax.random.normal(keys[0], (2, 5, 8))
  w_in = 0.3 * jax.random.normal(keys[1], (8, 2, 3))
  w_out = 0.3 * jax.random.normal(keys[2], (2, 3, 8))
  table = jax.random.normal(keys[3], (11, 8))

  def loss(x, w_in, w_out, table, ours):
    if ours:
      h = matmuls.dense_matmul(x, w_in, 1, dtype)
      y = matmuls.dense_matmul(h, w_out, 2, dtype)
      logits = matmuls.matmul_transposed(y, table, dtype, jnp.float32)
    else:
      h = matmuls.mixed_einsum("bld,dhe->blhe", x, w_in, dtype)
      y = matmuls.mixed_einsum("blhe,hed->bld", h, w_out, dtype)
      logits = matmuls.mixed_einsum("bld,vd->blv", y, table, dtype, jnp.float32)
    return jnp.sum(jnp.sin(logits)), logits

  grad = jax.jit(jax.grad(loss, (0, 1, 2, 3), has_aux=True), static_argnums=4)
  (ours, ours_logits), (theirs, theirs_logits) = grad(x, w_in, w_out, table, True), grad(
      x, w_in, w_out, table, False)
  assert ours_logits.shape == (2, 5, 11) and ours_logits.dtype == jnp.float32
  tolerance = 1e-5 if dtype == "float32" else 0.02
  for a, b in zip((ours_logits, *ours), (theirs_logits, *theirs)):
    assert a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_allclose(a.astype(jnp.float32), b.astype(jnp.float32),
                               atol=tolerance * float(jnp.max(jnp.abs(b.astype(jnp.float32)))))
