"""Model presets, loss plumbing (sown auxiliary losses, the MLP kind), each family overfitting a
batch on a (2, 2, 2) mesh, decoding, and gin isolation of `from_gin`."""
import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from t5x_lite import layers, models, partitioning, transformer


@pytest.mark.parametrize("preset, count", [
    ("gpt2_small", 124_439_808),     # GPT2LMHeadModel
    ("bert_base", 109_514_298),      # BertForMaskedLM (BERT-base encoder + MLM head)
    ("t5_1_1_small", 76_961_152),    # google/t5-v1_1-small
    ("t5_1_1_base", 247_577_856),    # google/t5-v1_1-base
    ("llama_1b", 1_100_048_384),     # TinyLlama-1.1B
])
def test_real_size_presets_have_published_parameter_counts(preset, count):
  assert models.from_gin(preset).num_params() == count  # jax.eval_shape: nothing is allocated.


def test_unknown_preset_lists_the_known_ones():
  with pytest.raises(ValueError, match="gpt2_small"):
    models.from_gin("gpt3_small")


def test_gin_bindings_override_a_preset():
  model = models.from_gin("llama_tiny", ["TransformerConfig.num_kv_heads = 1"])
  assert model.config.num_kv_heads == 1 and model.config.family == "decoder"


def test_model_refuses_config_of_another_family():
  config = models.from_gin("t5_tiny").config
  with pytest.raises(ValueError, match="family='decoder'"):
    models.DecoderOnlyModel(config)


def test_batch_missing_features_names_them_and_the_converter():
  model = models.from_gin("t5_tiny")
  batch = model.dummy_batch(2, {"inputs": 8, "targets": 8})
  del batch["decoder_loss_weights"]
  with pytest.raises(ValueError, match="decoder_loss_weights.*feature_converter='encoder_decoder'"):
    model.loss_fn(None, batch)


def _random_batch(model, batch_size=8, inputs=24, targets=16, seed=0):
  rng = np.random.default_rng(seed)
  batch = {}
  for name in model.REQUIRED_FEATURES:
    length = inputs if name.startswith("encoder") else targets
    batch[name] = rng.integers(2, model.config.vocab_size, (batch_size, length)).astype(np.int32)
  if "decoder_target_tokens" in batch:  # Teacher forcing: inputs are targets shifted right.
    batch["decoder_input_tokens"] = np.pad(batch["decoder_target_tokens"][:, :-1], ((0, 0), (1, 0)))
    batch["decoder_loss_weights"] = np.ones_like(batch["decoder_target_tokens"])
  if "encoder_loss_weights" in batch:  # MLM: loss on a fixed 25% of positions.
    batch["encoder_loss_weights"] = (rng.random(batch["encoder_loss_weights"].shape) < 0.25)
    batch["encoder_loss_weights"] = batch["encoder_loss_weights"].astype(np.int32)
  return batch


@pytest.mark.parametrize("preset", ["bert_tiny", "gpt2_tiny", "llama_tiny", "t5_tiny"])
def test_each_family_overfits_one_batch_on_a_sharded_mesh(preset):
  model = models.from_gin(preset)
  mesh = partitioning.make_mesh(data=2, fsdp=2, tensor=2)
  batch = _random_batch(model)
  shapes, specs = model.abstract_params(batch)
  shardings = partitioning.tree_shardings(shapes, specs, mesh)
  optimizer = optax.adam(1e-2)

  with partitioning.activation_sharding(mesh):
    params = jax.jit(model.init, out_shardings=shardings)(jax.random.PRNGKey(0), batch)
    opt_state = optimizer.init(params)
    batch = jax.device_put(batch, partitioning.batch_sharding(mesh))

    @jax.jit
    def step(params, opt_state, batch):
      (loss, metrics), grads = jax.value_and_grad(model.loss_fn, has_aux=True)(params, batch)
      updates, opt_state = optimizer.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, metrics

    history = []
    for _ in range(40):
      params, opt_state, metrics = step(params, opt_state, batch)
      history.append(float(metrics["cross_entropy"]))

  assert history[-1] < 0.5 * history[0], history
  # The parameters really are split over the mesh, and stay so through the updates.
  mlp_kernel = next(leaf for path, leaf in jax.tree_util.tree_leaves_with_path(params)
                    if "['wo']['kernel']" in jax.tree_util.keystr(path))
  assert mlp_kernel.sharding.spec == jax.sharding.PartitionSpec(None, "tensor", "fsdp")
  assert len(mlp_kernel.addressable_shards) == 8
  assert mlp_kernel.addressable_shards[0].data.shape[1] == mlp_kernel.shape[1] // 2


def test_dropout_is_active_only_with_a_rng():
  model = models.from_gin("bert_tiny", ["TransformerConfig.dropout_rate = 0.5"])
  batch = _random_batch(model, batch_size=2)
  params = model.init(jax.random.PRNGKey(0), batch)
  clean_1 = model.logits(params, batch)
  clean_2 = model.logits(params, batch)
  noisy = model.logits(params, batch, dropout_rng=jax.random.PRNGKey(1))
  np.testing.assert_array_equal(clean_1, clean_2)
  assert not np.allclose(clean_1, noisy)


def test_z_loss_and_label_smoothing_reach_the_loss():
  plain = models.from_gin("gpt2_tiny", ["DecoderOnlyModel.z_loss = 0.0"])
  regularised = models.from_gin("gpt2_tiny", ["DecoderOnlyModel.z_loss = 0.1",
                                              "DecoderOnlyModel.label_smoothing = 0.1"])
  batch = _random_batch(plain, batch_size=2)
  params = plain.init(jax.random.PRNGKey(0), batch)
  _, m_plain = plain.loss_fn(params, batch)
  _, m_reg = regularised.loss_fn(params, batch)
  assert float(m_plain["z_loss"]) == 0.0 and float(m_reg["z_loss"]) > 0.0
  assert float(m_reg["cross_entropy"]) != pytest.approx(float(m_plain["cross_entropy"]))
  assert float(m_plain["num_tokens"]) == batch["decoder_loss_weights"].sum()



# bert_tiny: tied table plus the MLM bias; llama_tiny: untied lm_head; t5_tiny: encoder-decoder
# (tied, rescaled). The chunked loss's own gradients are checked in losses_test.
@pytest.mark.parametrize("preset", ["bert_tiny", "llama_tiny", "t5_tiny"])
def test_output_head_projects_to_the_modules_logits(preset):
  model = models.from_gin(preset)
  batch = _random_batch(model, batch_size=2, inputs=12, targets=10)
  params = _init(model, batch)
  logits, head = jax.jit(lambda p: (model.logits(p, batch),
                                    model.apply(p, batch, output_head=True)[0]))(params)
  projected = jnp.einsum("bld,vd->blv" if head.vocab_first else "bld,dv->blv", head.features,
                         head.kernel) + (0.0 if head.bias is None else head.bias)
  np.testing.assert_allclose(projected, logits, rtol=1e-5, atol=1e-5)


def test_chunked_loss_equals_the_loss_of_all_logits_with_its_gradients():
  options = ["DecoderOnlyModel.label_smoothing = 0.1"]  # gpt2: the table is embedding and head
  whole = models.from_gin("gpt2_tiny", options + ["DecoderOnlyModel.loss_chunk_size = None"])
  chunked = models.from_gin("gpt2_tiny", options + ["DecoderOnlyModel.loss_chunk_size = 6"])
  assert (whole.loss_chunk_size, chunked.loss_chunk_size) == (None, 6)
  batch = _random_batch(whole, batch_size=2, targets=10)  # chunks of 3 positions, last padded
  params = _init(whole, batch)
  grads = jax.jit(lambda p: [jax.value_and_grad(m.loss_fn, has_aux=True)(p, batch)
                             for m in (whole, chunked)])(params)
  ((loss, metrics), grad), ((chunk_loss, chunk_metrics), chunk_grad) = grads
  np.testing.assert_allclose(chunk_loss, loss, rtol=1e-5)
  np.testing.assert_allclose(chunk_metrics["accuracy"].total, metrics["accuracy"].total)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), chunk_grad,
               grad)


# ------------------------------------------------------------------------------------ inference
def _prompts(model):
  """Two prompts of different lengths, right-padded, as seqio's converters lay them out."""
  if model.config.family == "decoder":  # BOS then the prompt; decoder_causal_attention marks both.
    return {"decoder_input_tokens": np.array([[0, 5, 6, 7, 8, 9], [0, 9, 4, 0, 0, 0]], np.int32),
            "decoder_causal_attention": np.array([[1] * 6, [1, 1, 1, 0, 0, 0]], np.int32)}
  return {"encoder_input_tokens": np.array([[5, 6, 7, 8, 9, 1], [9, 4, 1, 0, 0, 0]], np.int32)}


def _init(model, batch):
  return jax.jit(model.init)(jax.random.PRNGKey(0), batch)


@pytest.mark.parametrize("preset", ["llama_tiny", "t5_tiny"])
def test_greedy_decoding_equals_one_beam_and_is_the_same_on_a_sharded_mesh(preset):
  model = models.from_gin(preset)
  prompts = _prompts(model)
  params = _init(model, model.dummy_batch(2, {"inputs": 6, "targets": 6}))
  greedy, scores = model.predict_batch(params, prompts, max_new_tokens=6)
  beam, beam_scores = model.predict_batch(params, prompts, max_new_tokens=6, beam_size=1,
                                          alpha=0.0)
  assert greedy.shape == (2, 1, 6) and scores.shape == (2, 1)
  np.testing.assert_array_equal(greedy, beam)
  np.testing.assert_allclose(scores, beam_scores, rtol=1e-5)

  mesh = partitioning.make_mesh(data=2, fsdp=2, tensor=2)
  shapes, specs = model.abstract_params(model.dummy_batch(2, {"inputs": 6, "targets": 6}))
  sharded = jax.device_put(params, partitioning.tree_shardings(shapes, specs, mesh))
  with partitioning.activation_sharding(mesh):
    on_mesh, _ = model.predict_batch(sharded, jax.device_put(
        {k: np.tile(v, (4, 1)) for k, v in prompts.items()}, partitioning.batch_sharding(mesh)),
        max_new_tokens=6)
  np.testing.assert_array_equal(on_mesh[:2], greedy)


@pytest.mark.parametrize("preset", ["bert_tiny", "gpt2_tiny", "t5_tiny"])
def test_score_batch_is_the_log_likelihood_of_the_weighted_targets(preset):
  model = models.from_gin(preset, [f"{type(models.from_gin(preset)).__name__}.z_loss = 0.0"])
  batch = _random_batch(model, batch_size=2)
  params = _init(model, batch)
  scores = model.score_batch(params, batch)
  loss_fn = jax.jit(model.loss_fn)
  for row in range(2):
    one = {name: value[row:row + 1] for name, value in batch.items()}
    _, metrics = loss_fn(params, one)
    np.testing.assert_allclose(scores[row], -float(metrics["cross_entropy"].total), rtol=1e-4)


def test_fill_mask_ranks_the_encoders_predictions_at_mask_positions():
  model = models.from_gin("bert_tiny")
  tokens = np.array([[5, 300, 7, 1, 0], [300, 300, 9, 1, 0]], np.int32)
  params = _init(model, model.dummy_batch(2, {"inputs": 5}))
  ids, probs, is_mask = model.fill_mask(params, tokens, mask_id=300, top_k=3)
  np.testing.assert_array_equal(is_mask, tokens == 300)
  logits = jax.jit(model.logits)(params, {"encoder_input_tokens": tokens})
  np.testing.assert_array_equal(ids[..., 0], np.argmax(logits, -1))
  np.testing.assert_allclose(probs[..., 0], np.max(jax.nn.softmax(logits), -1), rtol=1e-5)
  assert ids.shape == (2, 5, 3) and np.all(np.diff(np.asarray(probs), axis=-1) <= 0)


def test_decoding_bad_input_is_refused_with_the_fix():
  model = models.from_gin("gpt2_tiny")  # max_length 512
  params = _init(model, model.dummy_batch(1, {"targets": 4}))
  prompts = _prompts(model)
  with pytest.raises(ValueError, match="prompt \\+ new tokens.*max_length=512"):
    model.predict_batch(params, prompts, max_new_tokens=510)
  with pytest.raises(ValueError, match="top_p must be in \\(0, 1\\]"):
    model.predict_batch(params, prompts, top_p=1.5)
  with pytest.raises(ValueError, match="needs decoder_input_tokens"):
    model.predict_batch(params, {"encoder_input_tokens": np.ones((1, 4), np.int32)})
  bert = models.from_gin("bert_tiny")
  with pytest.raises(ValueError, match="does not generate text"):
    bert.predict_batch(None, {})


# ------------------------------------------------------------------------------ the seams

class SowingMlp(layers.Mlp):
  """The dense MLP plus an auxiliary loss on its output, as an MoE router's balance loss is."""

  @nn.compact
  def __call__(self, x, token_mask=None):
    y = super().__call__(x, token_mask)
    self.sow(layers.AUX_LOSSES, "activity", 0.01 * jnp.mean(jnp.square(y)))
    return y


def test_a_sown_auxiliary_loss_survives_the_layer_scan_and_reaches_the_gradient(monkeypatch):
  monkeypatch.setitem(layers.MLP_KINDS, "sowing", SowingMlp)
  sowing = ["TransformerConfig.mlp = 'sowing'", "TransformerConfig.num_layers = 2"]
  scanned = models.from_gin("gpt2_tiny", sowing)
  unrolled = models.from_gin("gpt2_tiny", sowing + ["TransformerConfig.scan_layers = False"])
  dense = models.from_gin("gpt2_tiny", ["TransformerConfig.num_layers = 2"])  # no aux loss
  batch = _random_batch(scanned, batch_size=2, targets=8)
  params = scanned.init(jax.random.PRNGKey(0), batch)
  loss_of = lambda model: jax.jit(lambda p: model.loss_fn(p, batch))
  grad_of = lambda model: jax.jit(jax.grad(lambda p: model.loss_fn(p, batch)[0]))
  loss, metrics = loss_of(scanned)(params)
  loss_unrolled, metrics_unrolled = loss_of(unrolled)(transformer.unstack_layers(params))
  dense_loss, _ = loss_of(dense)(params)
  aux = float(metrics["aux/activity"])
  assert aux > 0  # summed over every layer
  np.testing.assert_allclose(aux, float(metrics_unrolled["aux/activity"]), rtol=1e-5)
  np.testing.assert_allclose(loss, dense_loss + aux, rtol=1e-5)
  np.testing.assert_allclose(loss, loss_unrolled, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["loss"]), float(loss), rtol=1e-5)
  difference = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()),
                            grad_of(scanned)(params), grad_of(dense)(params))
  assert max(jax.tree.leaves(difference)) > 0  # the auxiliary loss moves the weights


def test_an_unknown_mlp_kind_names_the_registered_ones():
  model = models.from_gin("gpt2_tiny", ["TransformerConfig.mlp = 'mystery'"])
  with pytest.raises(ValueError, match=r"mlp='mystery' is not a registered MLP kind; "
                                       r"registered: \['dense', 'moe'"):
    model.num_params()


def test_loading_a_model_leaves_the_callers_gin_config_alone():
  gin.parse_config(["TransformerConfig.vocab_size = 999", "SOME_MACRO = 3"])
  model = models.from_gin("gpt2_tiny")
  assert model.config.vocab_size != 999  # the preset's own config, not the caller's bindings
  assert gin.query_parameter("TransformerConfig.vocab_size") == 999
  assert gin.query_parameter("%SOME_MACRO") == 3
