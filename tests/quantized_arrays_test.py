"""t5x_lite.quantized_arrays: 4-bit packing, int8 / int4 / nf4 quantization within half a step
(nf4: the nearest of its levels), the fused dequantize-matmul against dequantize + dot, and NF4's
levels against the paper's table and int4's grid on normal weights."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_lite import quantized_arrays


def test_pack_dequantize_and_group_errors():
  values = jnp.arange(-8, 8, dtype=jnp.int8).reshape(4, 4)
  packed = quantized_arrays.pack_int4(values, 0)
  assert packed.dtype == jnp.uint8 and packed.shape == (2, 4)
  np.testing.assert_array_equal(quantized_arrays.unpack_int4(packed, 0), values)
  w = jax.random.normal(jax.random.PRNGKey(0), (2, 64, 3))  # [lead, in, out]
  for kind, group in (("int8", None), ("int4", 32)):
    q, scale = quantized_arrays.quantize_array(w, 1, kind, group)
    assert scale.shape == (2, 1 if group is None else 2, 3)
    error = jnp.abs(quantized_arrays.dequantize_array(q, scale, 1, kind) - w)
    bound = jnp.repeat(scale, 64 // scale.shape[1], axis=1) / 2  # half a step, per group
    assert bool(jnp.all(error <= bound + 1e-6))
  with pytest.raises(ValueError, match="does not divide"):
    quantized_arrays.quantize_array(w, 1, "int4", 48)
  # fused_matmul (kernel and table layouts) computes what the dequantize + dot path does,
  # jitted over quantized arguments, on two row axes (a decoding step's [b, 1, in]).
  x = jax.random.normal(jax.random.PRNGKey(1), (1, 4, 64))
  kernel = jax.random.normal(jax.random.PRNGKey(2), (64, 4, 4))
  fused = jax.jit(quantized_arrays.fused_matmul, static_argnums=(3, 4))
  for kind, group in (("int8", None), ("int4", 32), ("nf4", 32)):
    q, scale = quantized_arrays.quantize_array(kernel, 0, kind, group)
    expected = jnp.einsum("bli,iho->blho", x, quantized_arrays.dequantize_array(q, scale, 0, kind))
    np.testing.assert_allclose(fused(x, q, scale, kind, 0), expected, rtol=1e-5, atol=1e-5)
    qt, scale_t = quantized_arrays.quantize_array(kernel.reshape(64, 16).T, 1, kind, group)
    np.testing.assert_allclose(fused(x, qt, scale_t, kind, 1), expected.reshape(1, 4, 16),
                               rtol=1e-5, atol=1e-5)


def test_nf4_levels_nearest_level_and_error_against_int4():
  levels = quantized_arrays.NF4_LEVELS  # built from normal quantiles: the paper's table
  np.testing.assert_allclose(levels[:4], [-1.0, -0.6961928, -0.5250731, -0.3949175], atol=1e-6)
  np.testing.assert_allclose(levels[-3:], [0.5626170, 0.7229568, 1.0], atol=1e-6)
  assert levels[7] == 0 and np.all(np.diff(levels) > 0)
  w = jax.random.normal(jax.random.PRNGKey(0), (2, 64, 3))
  q, scale = quantized_arrays.quantize_array(w, 1, "nf4", 32)
  assert q.dtype == jnp.uint8 and q.shape == (2, 32, 3) and scale.shape == (2, 2, 3)
  got = quantized_arrays.dequantize_array(q, scale, 1, "nf4")  # each value: the nearest level
  normalized = w / jnp.repeat(scale, 32, axis=1)
  nearest = levels[np.argmin(np.abs(np.asarray(normalized)[..., None] - levels), axis=-1)]
  np.testing.assert_allclose(got, nearest * np.repeat(scale, 32, axis=1), rtol=1e-6)
  # nf4 against int4 at the same group size (64) on normal weights, what nf4's levels are made
  # for (tests/quantization_test.py compares them on a trained model's kernels).
  normal = jax.random.normal(jax.random.PRNGKey(1), (512, 256))
  errors = {kind: quantized_arrays.relative_error(normal, 0, kind, 64) for kind in ("int4", "nf4")}
  print(f"normal weights g64: relative error int4 {errors['int4']:.4f}, nf4 {errors['nf4']:.4f}")
  assert errors["nf4"] < 0.92 * errors["int4"], errors
