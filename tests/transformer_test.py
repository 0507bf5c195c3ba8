"""The three families: causality, bidirectionality, and packed rows that never mix examples."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_lite import layers, transformer
from t5x_lite.config import TransformerConfig


POSITION_TYPES = ("learned", "sinusoidal", "rope", "relative")


def _config(family, position_type="rope", **changes):
  return TransformerConfig(**{**dict(family=family, vocab_size=64, d_model=32, num_heads=4,
                                     num_kv_heads=2, d_ff=64, num_layers=2, max_length=32,
                                     position_type=position_type), **changes})


def _tokens(seed, shape):
  return jax.random.randint(jax.random.PRNGKey(seed), shape, 2, 64)


class _Runner:
  """Initialises a family's module once and applies it to (encoder, decoder) token arrays."""

  def __init__(self, family, position_type="rope", **changes):
    self.family = family
    cls = {"encoder": transformer.EncoderOnly, "decoder": transformer.DecoderOnly,
           "encoder_decoder": transformer.EncoderDecoder}[family]
    self.module = cls(_config(family, position_type, **changes))
    example = self._args(_tokens(0, (1, 8)), _tokens(1, (1, 8)))
    # Compiled once per call shape: eagerly, flax would dispatch (and compile) op by op.
    self.params = jax.jit(self.module.init)(jax.random.PRNGKey(2), *example)["params"]
    self._apply = jax.jit(lambda params, *args: self.module.apply({"params": params}, *args))

  def _args(self, enc, dec, enc_seg=None, dec_seg=None, enc_pos=None, dec_pos=None, prefix=None):
    if self.family == "encoder":
      return (enc, enc_seg, enc_pos)
    if self.family == "decoder":
      return (dec, dec_seg, dec_pos, prefix)
    return (enc, dec, enc_seg, dec_seg, enc_pos, dec_pos)

  def __call__(self, enc=None, dec=None, **kw):
    return self._apply(self.params, *self._args(enc, dec, **kw))


@pytest.mark.parametrize("family", ["decoder", "encoder_decoder"])
@pytest.mark.parametrize("position_type", POSITION_TYPES)
def test_decoder_is_causal(family, position_type):
  run = _Runner(family, position_type)
  enc, dec = _tokens(3, (2, 10)), _tokens(4, (2, 10))
  changed = dec.at[:, 6:].set(_tokens(5, (2, 4)))
  before, after = run(enc, dec), run(enc, changed)
  np.testing.assert_allclose(before[:, :6], after[:, :6], atol=1e-5)
  assert not np.allclose(before[:, 6:], after[:, 6:], atol=1e-3)


@pytest.mark.parametrize("family", ["encoder", "encoder_decoder"])
def test_encoder_is_bidirectional(family):
  run = _Runner(family, "relative")
  enc, dec = _tokens(3, (2, 10)), _tokens(4, (2, 10))
  changed = enc.at[:, -1].set((enc[:, -1] + 1) % 64 + 2)
  # BERT's position-0 logits, and T5's first decoder step (which reads the whole encoder).
  assert not np.allclose(run(enc, dec)[:, 0], run(changed, dec)[:, 0], atol=1e-4)


def test_prefix_lm_inputs_see_each_other_but_not_the_continuation():
  run = _Runner("decoder")
  dec = _tokens(3, (1, 8))
  prefix = jnp.array([[1, 1, 1, 0, 0, 0, 0, 0]])
  base = run(dec=dec, prefix=prefix)
  inside = run(dec=dec.at[0, 2].set(dec[0, 2] % 60 + 3), prefix=prefix)
  outside = run(dec=dec.at[0, 5].set(dec[0, 5] % 60 + 3), prefix=prefix)
  assert not np.allclose(base[0, 0], inside[0, 0], atol=1e-4)
  np.testing.assert_allclose(base[0, :5], outside[0, :5], atol=1e-5)


@pytest.mark.parametrize("family", ["encoder", "decoder", "encoder_decoder"])
@pytest.mark.parametrize("position_type", POSITION_TYPES)
def test_packed_row_equals_examples_run_alone(family, position_type):
  run = _Runner(family, position_type, norm_position="post" if family == "encoder" else "pre")
  a_enc, b_enc = _tokens(10, (1, 5)), _tokens(11, (1, 7))
  a_dec, b_dec = _tokens(12, (1, 4)), _tokens(13, (1, 6))

  def pack(a, b, length=16):
    tokens = jnp.zeros((1, length), jnp.int32)
    tokens = tokens.at[0, :a.shape[1]].set(a[0]).at[0, a.shape[1]:a.shape[1] + b.shape[1]].set(b[0])
    seg = np.zeros((1, length), np.int32)
    seg[0, :a.shape[1]] = 1
    seg[0, a.shape[1]:a.shape[1] + b.shape[1]] = 2
    pos = np.zeros((1, length), np.int32)
    pos[0, :a.shape[1]] = np.arange(a.shape[1])
    pos[0, a.shape[1]:a.shape[1] + b.shape[1]] = np.arange(b.shape[1])
    return tokens, jnp.asarray(seg), jnp.asarray(pos)

  def alone(x, length=16):
    tokens = jnp.zeros((1, length), jnp.int32).at[0, :x.shape[1]].set(x[0])
    seg = (jnp.arange(length) < x.shape[1]).astype(jnp.int32)[None]
    return tokens, seg, jnp.arange(length)[None]

  enc, enc_seg, enc_pos = pack(a_enc, b_enc)
  dec, dec_seg, dec_pos = pack(a_dec, b_dec)
  packed = run(enc, dec, enc_seg=enc_seg, dec_seg=dec_seg, enc_pos=enc_pos, dec_pos=dec_pos)
  out_len = a_enc if family == "encoder" else a_dec
  for (x_enc, x_dec), start in (((a_enc, a_dec), 0), ((b_enc, b_dec), out_len.shape[1])):
    e, es, ep = alone(x_enc)
    d, ds, dp = alone(x_dec)
    single = run(e, d, enc_seg=es, dec_seg=ds, enc_pos=ep, dec_pos=dp)
    n = (x_enc if family == "encoder" else x_dec).shape[1]
    np.testing.assert_allclose(packed[0, start:start + n], single[0, :n], atol=2e-5)


def test_feature_longer_than_max_length_is_refused():
  run = _Runner("decoder", "learned")
  with pytest.raises(ValueError, match="max_length=32.*TASK_FEATURE_LENGTHS"):
    run(dec=_tokens(0, (1, 40)))


@pytest.mark.parametrize("family", ["encoder", "decoder", "encoder_decoder"])
def test_scanned_and_unrolled_layers_compute_the_same_function(family):
  scanned = _Runner(family, scan_layers=True)
  unrolled = _Runner(family, scan_layers=False, remat_policy="full")
  # Move the scanned parameters (stacked on a leading layers axis) into layers_0, layers_1, ...
  def unstack(tree):
    out = {}
    for key, value in tree.items():
      if key == "layers":
        for i in range(2):
          out[f"layers_{i}"] = jax.tree.map(lambda x: x[i], value)
      elif isinstance(value, dict):
        out[key] = unstack(value)
      else:
        out[key] = value
    return out
  unrolled.params = unstack(nn.meta.unbox(scanned.params))
  enc, dec = _tokens(3, (2, 8)), _tokens(4, (2, 8))
  np.testing.assert_allclose(scanned(enc, dec), unrolled(enc, dec), atol=1e-5)


@pytest.mark.parametrize("family, position_type, scan_layers, fused_qkv", [
    ("decoder", "learned", True, False), ("decoder", "relative", True, False),
    ("decoder", "rope", False, False), ("encoder_decoder", "relative", True, False),
    ("decoder", "rope", True, True), ("encoder_decoder", "relative", False, True),
])
def test_cached_decoding_equals_the_full_forward_pass(family, position_type, scan_layers,
                                                      fused_qkv):
  """Prefill a right-padded prompt batch of mixed lengths, then feed one token per step: every
  step's logits equal those of the full sequence run at once (positions, RoPE, relative bias).
  Decoding runs the layers unrolled, on the (unstacked) parameters of the scanned model. With
  fused_qkv, self-attention fills its cache from the one qkv projection."""
  cls = transformer.DecoderOnly if family == "decoder" else transformer.EncoderDecoder
  fused = dict(fused_qkv=True, num_kv_heads=None) if fused_qkv else {}
  module = cls(_config(family, position_type, scan_layers=scan_layers, **fused))
  example = (_tokens(0, (1, 8)),) * (1 if family == "decoder" else 2)
  params = jax.jit(module.init)(jax.random.PRNGKey(2), *example)["params"]
  decoder = cls(module.config.replace(scan_layers=False))
  # As the models decode: unstacked layers, and the tied head's table also transposed (the
  # two-row steps read that copy).
  decoder_params = transformer.decoding_params(params, module.config)
  table = nn.meta.unbox(decoder_params["token_embed"]["embedding"])
  np.testing.assert_array_equal(decoder_params["token_embed"][layers.TRANSPOSED_TABLE], table.T)
  apply = jax.jit(lambda module, params, *args, method=None, **kwargs: module.apply(
      {"params": params}, *args, method=method, **kwargs), static_argnames=("module", "method"))
  seqs = _tokens(20, (2, 9))
  steps = 5
  if family == "decoder":
    lengths = np.array([4, 2])  # Row 1's prompt is padded with 2 slots nobody may see.
    full = apply(module, params, seqs)  # Causal: row i's first lengths[i] + steps are its own.
    prompt_segments = jnp.asarray(np.arange(4)[None] < lengths[:, None], jnp.int32)
    cache = transformer.init_cache(module.config, 2, 4 + steps)
    logits, cache = apply(decoder, decoder_params, seqs[:, :4] * prompt_segments,
                          prompt_segments, cache=cache)
    for i in range(2):
      np.testing.assert_allclose(logits[i, :lengths[i]], full[i, :lengths[i]], atol=2e-5)
    positions = lengths
  else:
    enc = _tokens(21, (2, 7)).at[1, 4:].set(0)  # Row 1's encoder input is padded.
    full = apply(module, params, enc, seqs)
    encoded = apply(module, params, enc, method=transformer.EncoderDecoder.encode)
    cache = transformer.init_cache(module.config, 2, 1 + steps, encoder_length=7)
    logits, cache = apply(decoder, decoder_params, encoded, enc, seqs[:, :1], cache=cache,
                          method=transformer.EncoderDecoder.decode)
    np.testing.assert_allclose(logits[:, 0], full[:, 0], atol=2e-5)
    full = full[:, 1:]
    positions, lengths = np.ones(2, int), np.zeros(2, int)
  for t in range(steps):
    token = jnp.asarray([seqs[i, lengths[i] + t + (family != "decoder")] for i in range(2)])
    step_positions = jnp.asarray(positions + t)[:, None]
    if family == "decoder":
      logits, cache = apply(decoder, decoder_params, token[:, None], None, step_positions,
                            cache=cache)
    else:
      logits, cache = apply(decoder, decoder_params, None, None, token[:, None],
                            decoder_positions=step_positions, cache=cache,
                            method=transformer.EncoderDecoder.decode)
    for i in range(2):
      np.testing.assert_allclose(logits[i, 0], full[i, lengths[i] + t], atol=2e-5)
  assert int(cache["index"]) == (4 if family == "decoder" else 1) + steps


def _fuse_qkv(tree):
  """Separate-projection parameters -> the fused model's: each self-attention's query, key and
  value kernels [..., d, h, e] (and biases [..., h, e]) stacked as qkv [..., d, 3, h, e]."""
  out = {}
  for name, value in tree.items():
    if name == "self_attention":
      value = dict(value)
      parts = [value.pop(p) for p in ("query", "key", "value")]
      value["qkv"] = {leaf: jnp.stack([p[leaf] for p in parts], axis=-3) for leaf in parts[0]}
      out[name] = value
    elif isinstance(value, dict):
      out[name] = _fuse_qkv(value)
    else:
      out[name] = value
  return out


@pytest.mark.parametrize("family, position_type, changes", [
    ("decoder", "rope", dict(scan_layers=True, remat_policy="full", use_bias=True)),
    ("decoder", "rope", dict(scan_layers=False)),
    ("encoder_decoder", "relative", dict(scan_layers=True, scale_attention=False)),
    ("encoder_decoder", "relative", dict(scan_layers=False, remat_policy="dots")),
])
def test_fused_qkv_computes_the_same_function_as_separate_projections(family, position_type,
                                                                     changes):
  """The same weights, rearranged into one qkv kernel, give the same logits (RoPE, relative bias,
  scan, remat); cross-attention keeps its own query/key/value."""
  cls = transformer.DecoderOnly if family == "decoder" else transformer.EncoderDecoder
  config = _config(family, position_type, num_kv_heads=None, **changes)
  separate, fused = cls(config), cls(config.replace(fused_qkv=True))
  enc, dec = _tokens(3, (2, 8)), _tokens(4, (2, 8))
  args = (dec,) if family == "decoder" else (enc, dec)
  params = nn.meta.unbox(jax.jit(separate.init)(jax.random.PRNGKey(2), *args)["params"])
  fused_init = jax.jit(fused.init)(jax.random.PRNGKey(2), *args)["params"]
  rearranged = _fuse_qkv(params)
  assert (jax.tree.map(jnp.shape, rearranged)
          == jax.tree.map(jnp.shape, nn.meta.unbox(fused_init)))
  stack = fused_init["decoder"]["layers" if config.scan_layers else "layers_0"]
  qkv = stack["self_attention"]["qkv"]["kernel"]
  assert qkv.names[-4:] == ("embed", "qkv", "heads", "kv")
  assert qkv.value.shape[-4:] == (32, 3, 4, 8)  # [d, 3, h, e]
  if family == "encoder_decoder":
    assert set(stack["cross_attention"]) == {"query", "key", "value", "out"}
  apply = jax.jit(lambda module, params: module.apply({"params": params}, *args),
                  static_argnums=0)
  np.testing.assert_allclose(apply(fused, rearranged), apply(separate, params), atol=1e-5)


def test_decoding_cache_is_laid_out_like_the_activations():
  cfg = _config("encoder_decoder", num_decoder_layers=3)
  cache = transformer.init_cache(cfg, batch_size=8, length=12, encoder_length=10)
  axes = transformer.cache_logical_axes(cache)
  assert len(cache["layers"]) == 3
  assert cache["layers"][0]["self"]["key"].shape == (8, 2, 12, 8)  # [b, k, s, e]
  assert cache["layers"][2]["cross"]["value"].shape == (8, 2, 10, 8)
  assert axes["layers"][1]["self"]["key"] == ("batch", "kv_heads", "length", "kv")
  assert axes["segment_ids"] == ("batch", "length") and axes["index"] == ()
  with pytest.raises(ValueError, match="max_length=32.*fewer new tokens"):
    transformer.init_cache(cfg, 1, 40, encoder_length=4)


def test_decoding_a_scanned_module_says_how_to_unroll_it():
  module = transformer.DecoderOnly(_config("decoder"))
  tokens = _tokens(0, (1, 4))
  params = jax.jit(module.init)(jax.random.PRNGKey(0), tokens)
  with pytest.raises(ValueError, match="scan_layers=False.*unstack_layers"):
    module.apply(params, tokens, cache=transformer.init_cache(module.config, 1, 8))
