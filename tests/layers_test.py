"""Attention (grouped K/V heads, masks), positions (RoPE, sinusoidal, T5 buckets), norms."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_lite import layers
from t5x_lite.config import TransformerConfig


def _attention(num_kv_heads):
  cfg = TransformerConfig(d_model=32, num_heads=4, num_kv_heads=num_kv_heads, d_ff=64,
                          position_type="rope")
  return layers.Attention(cfg, rotary=True)


@pytest.mark.parametrize("num_kv_heads", [1, 2, 4])
def test_grouped_kv_heads_equal_multi_head_with_tied_kv(num_kv_heads):
  """GQA/MQA is MHA whose K/V projections are shared within each group of query heads."""
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 32))
  positions = jnp.broadcast_to(jnp.arange(6), (2, 6))
  mask = layers.attention_mask(jnp.ones((2, 6), jnp.int32), jnp.ones((2, 6), jnp.int32),
                               causal=True, q_positions=positions, k_positions=positions)
  gqa = _attention(num_kv_heads)
  params = nn.meta.unbox(
      gqa.init(jax.random.PRNGKey(1), x, x, mask, None, positions, positions)["params"])
  out = gqa.apply({"params": params}, x, x, mask, None, positions, positions)

  group = 4 // num_kv_heads
  mha_params = dict(params)
  for name in ("key", "value"):  # [d, k, e] -> [d, h, e], head i uses kv head i // group.
    mha_params[name] = {"kernel": jnp.repeat(params[name]["kernel"], group, axis=1)}
  mha_out = _attention(4).apply({"params": mha_params}, x, x, mask, None, positions, positions)
  np.testing.assert_allclose(out, mha_out, atol=1e-5)
  assert params["key"]["kernel"].shape == (32, num_kv_heads, 8)


def test_attention_mask_keeps_packed_segments_apart_and_is_causal_by_position():
  segments = jnp.array([[1, 1, 2, 2, 2, 0]])
  positions = jnp.array([[0, 1, 0, 1, 2, 0]])
  mask = layers.attention_mask(segments, segments, causal=True, q_positions=positions,
                               k_positions=positions)[0, 0]
  expected = np.array([
      [1, 0, 0, 0, 0, 0],
      [1, 1, 0, 0, 0, 0],
      [0, 0, 1, 0, 0, 0],
      [0, 0, 1, 1, 0, 0],
      [0, 0, 1, 1, 1, 0],
      [0, 0, 0, 0, 0, 0],
  ], bool)
  np.testing.assert_array_equal(mask, expected)


def test_prefix_tokens_see_each_other_but_not_the_continuation():
  segments = jnp.ones((1, 4), jnp.int32)
  positions = jnp.arange(4)[None]
  prefix = jnp.array([[1, 1, 0, 0]])
  mask = layers.attention_mask(segments, segments, causal=True, q_positions=positions,
                               k_positions=positions, q_prefix=prefix, k_prefix=prefix)[0, 0]
  assert mask[0, 1] and not mask[0, 2] and not mask[2, 3] and mask[3, 0]


def test_fully_masked_rows_give_finite_outputs():
  q = jax.random.normal(jax.random.PRNGKey(0), (1, 3, 2, 4))
  mask = jnp.zeros((1, 1, 3, 3), bool)
  out = layers.dot_product_attention(q, q, q, mask)
  assert jnp.all(jnp.isfinite(out))


def test_rope_scores_depend_only_on_relative_position():
  q, k = jax.random.normal(jax.random.PRNGKey(0), (2, 1, 1, 1, 16))
  def score(pq, pk):
    rq = layers.apply_rope(q, jnp.array([[pq]]), 10_000.0)
    rk = layers.apply_rope(k, jnp.array([[pk]]), 10_000.0)
    return jnp.sum(rq * rk)
  np.testing.assert_allclose(score(3, 1), score(10, 8), rtol=1e-4)
  assert abs(float(score(3, 1) - score(3, 2))) > 1e-3
  np.testing.assert_allclose(jnp.linalg.norm(layers.apply_rope(q, jnp.array([[7]]), 1e4)),
                             jnp.linalg.norm(q), rtol=1e-5)


def test_sinusoidal_table_is_the_2017_transformers():
  table = layers.sinusoidal_embedding(jnp.arange(50)[None], 8, jnp.float32)[0]
  pos, i = 37, 2  # channel 2i = sin, 2i + 1 = cos of pos / 10000^(2i/d)
  angle = pos / 10_000 ** (2 * i / 8)
  np.testing.assert_allclose(table[pos, 2 * i], np.sin(angle), atol=1e-5)
  np.testing.assert_allclose(table[pos, 2 * i + 1], np.cos(angle), atol=1e-5)


@pytest.mark.parametrize("relative, bidirectional, bucket", [
    (0, True, 0), (-1, True, 1), (1, True, 17), (-7, True, 7), (-100, True, 15),
    (100, True, 31), (-1000, True, 15), (-100, False, 30), (5, False, 0), (-15, False, 15),
])
def test_t5_relative_position_buckets(relative, bidirectional, bucket):
  got = layers.relative_position_bucket(jnp.array(relative), bidirectional, 32, 128)
  assert int(got) == bucket


def test_rmsnorm_and_layernorm_normalise():
  x = 5 + 3 * jax.random.normal(jax.random.PRNGKey(0), (4, 16))
  for norm_type in ("rmsnorm", "layernorm"):
    norm = layers.Norm(norm_type, 1e-6, use_bias=True)
    y = norm.apply(norm.init(jax.random.PRNGKey(0), x), x)
    np.testing.assert_allclose(jnp.sqrt(jnp.mean(y**2, -1)), 1.0, rtol=1e-3)
    if norm_type == "layernorm":
      np.testing.assert_allclose(jnp.mean(y, -1), 0.0, atol=1e-4)


@pytest.mark.parametrize("fused_qkv", [False, True])
def test_attention_over_a_cache_filled_in_two_calls_equals_one_pass(fused_qkv):
  """Keys are cached after RoPE at their own positions; the second call sees the first's. With
  fused_qkv, self-attention fills the cache from the one qkv projection."""
  attention = _attention(2)
  if fused_qkv:
    attention = layers.Attention(attention.config.replace(num_kv_heads=None, fused_qkv=True),
                                 rotary=True, self_attention=True)
  k = attention.config.resolved_num_kv_heads
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 32))
  positions = jnp.broadcast_to(jnp.arange(6), (2, 6))
  ones = jnp.ones((2, 6), jnp.int32)
  mask = layers.attention_mask(ones, ones, causal=True, q_positions=positions,
                               k_positions=positions)
  params = attention.init(jax.random.PRNGKey(1), x, x, mask, None, positions, positions)
  assert ("qkv" in params["params"]) == fused_qkv
  whole = attention.apply(params, x, x, mask, None, positions, positions)

  cache = {"key": jnp.zeros((2, k, 8, 8)), "value": jnp.zeros((2, k, 8, 8))}  # [b, k, s, e]
  slot_positions = jnp.broadcast_to(jnp.arange(8), (2, 8))
  filled = lambda n: jnp.broadcast_to(jnp.arange(8) < n, (2, 8)).astype(jnp.int32)
  outputs = []
  for start, stop in ((0, 4), (4, 6)):
    q_pos = positions[:, start:stop]
    step_mask = layers.attention_mask(ones[:, start:stop], filled(stop), causal=True,
                                      q_positions=q_pos, k_positions=slot_positions)
    out, cache = attention.apply(params, x[:, start:stop], x[:, start:stop], step_mask, None,
                                 q_pos, None, cache, jnp.int32(start))
    outputs.append(out)
  np.testing.assert_allclose(jnp.concatenate(outputs, axis=1), whole, atol=1e-5)
  assert jnp.all(cache["key"][:, :, 6:] == 0)  # Slots past the written ones are untouched.

  # Cross-attention: the first call stores the projected memory, later calls read it back.
  cross = layers.Attention(attention.config)
  memory = jax.random.normal(jax.random.PRNGKey(2), (2, 5, 32))
  cross_mask = jnp.ones((2, 1, 1, 5), bool)
  cross_params = cross.init(jax.random.PRNGKey(3), x[:, :1], memory, cross_mask)
  assert {"query", "key", "value"} <= set(cross_params["params"])  # never fused
  empty = {"key": jnp.zeros((2, k, 5, 8)), "value": jnp.zeros((2, k, 5, 8))}
  first, stored = cross.apply(cross_params, x[:, :1], memory, cross_mask, cache=empty)
  again, _ = cross.apply(cross_params, x[:, :1], None, cross_mask, cache=stored)
  np.testing.assert_allclose(first, cross.apply(cross_params, x[:, :1], memory, cross_mask),
                             atol=1e-6)
  np.testing.assert_allclose(again, first, atol=1e-6)


def test_fused_qkv_initialises_like_separate_projections():
  """The fused kernel's q/k/v parts are distributed as the separate kernels are, T5's folding of
  1/sqrt(head_dim) into the query's initialisation included."""
  cfg = TransformerConfig(d_model=256, num_heads=4, d_ff=64, scale_attention=False)
  x = jnp.ones((1, 2, 256))
  mask = jnp.ones((1, 1, 2, 2), bool)
  fused = nn.meta.unbox(layers.Attention(cfg.replace(fused_qkv=True)).init(
      jax.random.PRNGKey(0), x, x, mask)["params"])
  separate = nn.meta.unbox(layers.Attention(cfg).init(jax.random.PRNGKey(0), x, x, mask)["params"])
  kernel = fused["qkv"]["kernel"]
  assert kernel.shape == (256, 3, 4, 64) and set(fused) == {"qkv", "out"}
  for i, name in enumerate(("query", "key", "value")):
    np.testing.assert_allclose(kernel[:, i].std(), separate[name]["kernel"].std(), rtol=0.05)
  np.testing.assert_allclose(kernel[:, 0].std() / kernel[:, 1].std(), 64 ** -0.5, rtol=0.05)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="the refusal is for other backends")
def test_cudnn_attention_elsewhere_than_an_nvidia_gpu_says_so():
  cfg = TransformerConfig(d_model=32, num_heads=4, d_ff=64, attention_implementation="cudnn",
                          dtype="bfloat16")
  x = jnp.ones((1, 2, 32))
  with pytest.raises(ValueError, match="needs an NVIDIA GPU.*attention_implementation='xla'"):
    layers.Attention(cfg).init(jax.random.PRNGKey(0), x, x, jnp.ones((1, 1, 2, 2), bool))
