"""Blockwise attention equals the "xla" path (values and gradients, fp32, 1e-5) for every mask,
bias and head layout the models use; splash matches it in Pallas's interpreter and refuses what
it cannot run. (Splash compiled for a TPU slice: tests/aot_compile_test.py.)"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_lite import attention, layers, models

B, H, E = 2, 4, 8


def _packed(length, split):
  """Segment ids and positions of rows packing two documents (row 0 ends with padding)."""
  seg = np.ones((B, length), np.int32)
  seg[:, split:] = 2
  seg[0, -3:] = 0
  pos = np.concatenate([np.arange(split), np.arange(length - split)])[None].repeat(B, 0)
  return jnp.asarray(seg), jnp.asarray(pos)


def _case(name):
  """(l, s, kv heads, mask, bias kind, positions) of one attention use."""
  seg, pos = _packed(20, 9)
  if name == "causal_packed_gqa_relative":  # a T5-style decoder's self-attention, GQA
    return 20, 20, 2, attention.Mask(seg, seg, pos, pos, causal=True), "relative_causal", pos
  if name == "bidirectional_mqa_dense_bias":  # an encoder with padding, MQA, a [1, h, l, s] bias
    return 20, 20, 1, attention.Mask(seg, seg), "dense", pos
  if name == "prefix_lm_mha":
    prefix = (pos < 4).astype(jnp.int32) * (seg == 1)
    return 20, 20, H, attention.Mask(seg, seg, pos, pos, prefix, prefix, causal=True), None, pos
  if name == "cross_attention_dense_mask":  # 13 decoder rows over 20 encoder keys, a raw mask
    q_seg = jnp.ones((B, 13), jnp.int32)
    return 13, 20, 2, attention.Mask(q_seg, seg).dense(), None, pos
  raise KeyError(name)


CASES = ["causal_packed_gqa_relative", "bidirectional_mqa_dense_bias", "prefix_lm_mha",
         "cross_attention_dense_mask"]


@pytest.mark.parametrize("name", CASES)
def test_blockwise_equals_xla_in_values_and_gradients(name):
  l, s, kv, mask, bias_kind, pos = _case(name)
  keys = jax.random.split(jax.random.PRNGKey(0), 6)
  q = jax.random.normal(keys[0], (B, l, H, E))
  k, v = (jax.random.normal(key, (B, s, kv, E)) for key in keys[1:3])
  table = jax.random.normal(keys[3], (32, H))
  dense_bias = jax.random.normal(keys[4], (1, H, l, s))

  def bias_of(table, dense_bias):
    if bias_kind == "relative_causal":
      return attention.RelativeBias(table, pos, pos, bidirectional=False, max_distance=16)
    return dense_bias if bias_kind == "dense" else None

  visible_rows = jnp.any(attention.dense_mask(mask)[:, 0], axis=-1)  # [b, l]
  weights = jax.random.normal(keys[5], (B, l, H, E)) * visible_rows[:, :, None, None]

  def loss(kernel, q, k, v, table, dense_bias):
    out = kernel(q, k, v, mask, bias_of(table, dense_bias), scale=E ** -0.5)
    return jnp.sum(out * weights), out

  # Blocks of 8 do not divide 20 or 13: the padding of the last blocks is exercised too.
  blockwise = functools.partial(attention.blockwise_attention, block_q=8, block_k=8)
  xla = functools.partial(layers.dot_product_attention, implementation="xla")
  results = [jax.jit(jax.value_and_grad(functools.partial(loss, kernel), argnums=(0, 1, 2, 3, 4),
                                        has_aux=True))(q, k, v, table, dense_bias)
             for kernel in (blockwise, xla)]
  ((_, out), grads), ((_, ref_out), ref_grads) = results
  np.testing.assert_allclose(out * visible_rows[:, :, None, None],
                             ref_out * visible_rows[:, :, None, None], atol=1e-5)
  for grad, ref in zip(grads, ref_grads):  # q, k, v, the relative table, the dense bias
    np.testing.assert_allclose(grad, ref, atol=1e-5)
  if bias_kind:  # the bias really is differentiated (not zero on both sides)
    assert float(jnp.abs(grads[3 if bias_kind != "dense" else 4]).max()) > 1e-3


def test_a_differentiated_layer_scan_holds_no_attention_map():
  """The mask is the same for every layer of a scanned stack: the gradient of two scanned
  layers at 1024 tokens must not materialise the blocks' masks for all blocks at once (JAX's
  scan partial evaluation hoists loop-invariant work: 24.8 MiB of temporaries before
  attention._tie, 1.2 MiB after)."""
  length, heads = 1024, 2
  seg, pos = jnp.ones((1, length), jnp.int32), jnp.arange(length)[None]
  mask = attention.Mask(seg, seg, pos, pos, causal=True)

  def loss(q, k, v):
    layer = lambda x, _: (attention.blockwise_attention(x, k, v, mask, block_q=128,
                                                        block_k=128), None)
    return jax.lax.scan(layer, q, None, length=2)[0].sum()

  q = jax.ShapeDtypeStruct((1, length, heads, E), jnp.float32)
  kv = jax.ShapeDtypeStruct((1, length, 1, E), jnp.float32)
  compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv).compile()
  one_map = heads * length * length * 4  # a float32 [b, h, l, s]
  assert compiled.memory_analysis().temp_size_in_bytes < one_map / 4


@pytest.mark.parametrize("block", [2, 8])  # blocks; one block (no loop) covering all 6
def test_rows_that_see_no_key_give_zeros(block):
  q = jax.random.normal(jax.random.PRNGKey(0), (1, 6, 2, 4))
  seg = jnp.array([[1, 1, 1, 0, 0, 0]])
  out = jax.jit(functools.partial(attention.blockwise_attention, block_q=block, block_k=block))(
      q, q, q, attention.Mask(seg, seg))
  assert jnp.all(out[0, 3:] == 0) and jnp.all(jnp.isfinite(out))


def test_a_model_trains_the_same_with_blockwise_attention():
  """Loss and every gradient of a whole T5 (relative bias in both stacks, causal decoder,
  cross-attention, encoder padding) equal "xla"'s. Its lengths fit one block (the kernel's
  loop-free path); the blocks and their custom VJP are the tests above."""
  xla = models.from_gin("t5_tiny")
  blockwise = models.from_gin("t5_tiny",
                              ["TransformerConfig.attention_implementation = 'blockwise'"])
  rng = np.random.default_rng(0)
  batch = {name: jnp.asarray(rng.integers(2, 100, x.shape), jnp.int32)
           for name, x in xla.dummy_batch(2, {"inputs": 24, "targets": 16}).items()}
  batch["encoder_input_tokens"] = batch["encoder_input_tokens"].at[0, -5:].set(0)
  batch["decoder_loss_weights"] = jnp.ones_like(batch["decoder_loss_weights"])
  params = xla.init(jax.random.PRNGKey(0), batch)
  step = lambda model: jax.jit(jax.value_and_grad(lambda p: model.loss_fn(p, batch)[0]))(params)
  (loss, grads), (ref_loss, ref_grads) = step(blockwise), step(xla)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), grads, ref_grads)


def test_blockwise_refuses_attention_dropout():
  q = jnp.ones((1, 4, 2, 4))
  mask = layers.attention_mask(jnp.ones((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32))
  with pytest.raises(ValueError, match="does not support attention dropout.*dropout_rate=0.0"):
    layers.dot_product_attention(q, q, q, mask, implementation="blockwise", dropout_rate=0.1,
                                 dropout_rng=jax.random.PRNGKey(0))


def test_splash_matches_xla_in_the_pallas_interpreter():
  """Causal GQA over two packed documents; one 128-row block keeps the interpreter quick."""
  seg = jnp.concatenate([jnp.ones((1, 50), jnp.int32), jnp.full((1, 78), 2, jnp.int32)], 1)
  pos = jnp.concatenate([jnp.arange(50), jnp.arange(78)])[None]
  mask = attention.Mask(seg, seg, pos, pos, causal=True)
  keys = jax.random.split(jax.random.PRNGKey(1), 3)
  q = jax.random.normal(keys[0], (1, 128, 2, 32))
  k, v = (jax.random.normal(key, (1, 128, 1, 32)) for key in keys[1:])
  out = attention.splash_attention(q, k, v, mask, scale=32 ** -0.5, interpret=True)
  ref = layers.dot_product_attention(q, k, v, mask, scale=32 ** -0.5)
  np.testing.assert_allclose(out, ref, atol=1e-5)


def test_splash_refuses_what_it_cannot_run():
  seg = jnp.ones((1, 128), jnp.int32)
  q = jnp.ones((1, 128, 2, 32))
  with pytest.raises(ValueError, match="TPU .*kernel.*'cpu'.*blockwise.*aot_compile"):
    attention.splash_attention(q, q, q, attention.Mask(seg, seg))
  with pytest.raises(ValueError, match="no attention bias.*blockwise"):
    attention.splash_attention(q, q, q, attention.Mask(seg, seg), jnp.zeros((1, 2, 128, 128)),
                               interpret=True)
  with pytest.raises(ValueError, match="prefix LM.*blockwise"):
    attention.splash_attention(q, q, q, attention.Mask(seg, seg, seg, seg, seg, seg, True),
                               interpret=True)
