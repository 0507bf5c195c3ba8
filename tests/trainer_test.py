"""Trainer on the 8 simulated devices: sharded state, donation, accumulation, metrics, FLOPs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_lite import models, optimizers, partitioning, trainer as trainer_lib


def random_batch(model, batch_size=8, inputs=16, targets=16, seed=0, padded=True):
  """A batch like a feature converter's, with a different amount of padding per row."""
  rng = np.random.default_rng(seed)
  batch = {}
  for name in model.REQUIRED_FEATURES:
    length = inputs if name.startswith("encoder") else targets
    batch[name] = rng.integers(2, model.config.vocab_size, (batch_size, length)).astype(np.int32)
  weights_name = ("encoder_loss_weights" if model.config.family == "encoder"
                  else "decoder_loss_weights")
  length = batch[weights_name].shape[1]
  weights = np.ones((batch_size, length), np.int32)
  if padded:
    for row in range(batch_size):
      weights[row, length - row % 5 * 2:] = 0
  batch[weights_name] = weights
  return batch


def make_trainer(preset, mesh=None, num_microbatches=1, optimizer="adamw", bindings=(),
                 batch=None, **trainer_kwargs):
  model = models.from_gin(preset, bindings)
  mesh = mesh or partitioning.make_mesh(2, 2, 2)
  batch = batch or random_batch(model)
  optimizer = optimizers.create_optimizer(
      optimizer, optimizers.create_schedule("constant", 1e-2, 0), weight_decay=0.01)
  shapes = {k: v.shape for k, v in batch.items()}
  return trainer_lib.Trainer(model, optimizer, mesh, shapes, num_microbatches,
                             **trainer_kwargs), batch


@pytest.fixture(scope="module")
def gpt2():
  """One compiled trainer shared by the tests below (compiling is the slow part)."""
  return make_trainer("gpt2_tiny")


def test_training_reduces_the_loss_with_state_sharded_over_the_mesh(gpt2):
  trainer, batch = gpt2
  state = trainer.init_state(seed=0)
  batch = partitioning.host_to_global(batch, trainer.mesh)
  losses = []
  for _ in range(8):
    state, metrics = trainer.train_step(state, batch)
    losses.append(float(metrics["loss"]))
  assert losses[-1] < 0.7 * losses[0], losses
  assert int(state.step) == 8
  assert float(metrics["learning_rate"]) == pytest.approx(1e-2)
  assert {"loss", "accuracy", "z_loss", "cross_entropy", "grad_norm"} <= set(metrics)
  # Parameters and Adam's moments are split over fsdp x tensor like the parameter they follow.
  for path, leaf in jax.tree_util.tree_leaves_with_path(state.params):
    if "['mlp']['wo']['kernel']" in jax.tree_util.keystr(path):
      assert leaf.sharding.spec == jax.sharding.PartitionSpec(None, "tensor", "fsdp")
      moments = [x for x in jax.tree.leaves(state.opt_state) if x.shape == leaf.shape]
      assert len(moments) == 2 and all(m.sharding == leaf.sharding for m in moments)
      assert leaf.addressable_shards[0].data.size == leaf.size // 4


def test_train_step_donates_the_old_state(gpt2):
  trainer, batch = gpt2
  state = trainer.init_state()
  old_leaf = jax.tree.leaves(state.params)[0]
  new_state, _ = trainer.train_step(state, partitioning.host_to_global(batch, trainer.mesh))
  jax.block_until_ready(new_state)
  assert old_leaf.is_deleted()  # updated in place: no second copy of params and moments


def test_without_donation_the_old_state_stays_usable():
  """donate_state=False (the benchmark's no-donate switch), here with fused QKV sharded over
  the tensor axis: the state passed in is still alive and unchanged after the step."""
  trainer, batch = make_trainer("gpt2_tiny", bindings=("TransformerConfig.fused_qkv = True",),
                                donate_state=False)
  state = trainer.init_state()
  before = jax.device_get(state.params)
  new_state, metrics = trainer.train_step(state, partitioning.host_to_global(batch, trainer.mesh))
  jax.block_until_ready(new_state)
  assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(state))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), before)
  assert np.isfinite(float(metrics["loss"])) and int(new_state.step) == 1
  qkv = new_state.params["decoder"]["layers"]["self_attention"]["qkv"]["kernel"]
  # [layers, d, 3, h, e]: split like the separate kernels, the q/k/v axis whole.
  assert qkv.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None, "tensor", None)


def test_batches_of_another_shape_are_refused(gpt2):
  trainer, batch = gpt2
  short = {k: v[:, :8] for k, v in batch.items()}
  with pytest.raises(ValueError, match="drop the last partial batch"):
    trainer.train_step(trainer.init_state(), partitioning.host_to_global(short, trainer.mesh))


def test_a_step_with_a_non_finite_loss_is_skipped_and_flagged(gpt2):
  """An embedding row that overflows makes the loss NaN: the update is skipped bitwise and
  flagged (the train job's on_nonfinite policy decides what happens next)."""
  trainer, batch = gpt2
  batch = partitioning.host_to_global(batch, trainer.mesh)
  state = trainer.init_state(seed=3)
  embedding = state.params["token_embed"]["embedding"]
  embedding = jax.device_put(embedding.at[7].set(3e38), embedding.sharding)
  state = trainer.state_from_params(dict(state.params, token_embed={"embedding": embedding}))
  before = jax.device_get(state)
  state, metrics = trainer.train_step(state, batch)
  assert not np.isfinite(float(metrics["loss"])) and float(metrics["nonfinite"]) == 1.0
  assert int(state.step) == 1  # the step (and so the data position) still advances
  for a, b in zip(jax.tree.leaves(before.params) + jax.tree.leaves(before.opt_state),
                  jax.tree.leaves(state.params) + jax.tree.leaves(state.opt_state), strict=True):
    np.testing.assert_array_equal(a, b)
  _, metrics = trainer.train_step(trainer.init_state(seed=3), batch)
  assert np.isfinite(float(metrics["loss"])) and float(metrics["nonfinite"]) == 0.0


def test_state_from_params_starts_fresh_around_given_parameters(gpt2):
  trainer, _ = gpt2
  params = trainer.init_state(seed=7).params
  state = trainer.state_from_params(params)
  assert int(state.step) == 0
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
  assert all(float(jnp.abs(x).sum()) == 0 for x in jax.tree.leaves(state.opt_state)
             if x.dtype == jnp.float32)


def test_four_microbatches_equal_the_full_batch():
  model = models.from_gin("gpt2_tiny")
  batch = random_batch(model, batch_size=16)  # rows carry different amounts of padding
  mesh = partitioning.make_mesh(2, 1, 1, devices=jax.devices()[:2])
  params = model.init(jax.random.PRNGKey(0), batch)
  rng = jax.random.PRNGKey(1)
  with partitioning.activation_sharding(mesh):
    loss_fn = lambda p, b, r: model.loss_fn(p, b)
    full = jax.jit(lambda p, b: trainer_lib.accumulate_gradients(loss_fn, p, b, rng, 1))
    micro = jax.jit(lambda p, b: trainer_lib.accumulate_gradients(loss_fn, p, b, rng, 4))
    global_batch = partitioning.host_to_global(batch, mesh)
    (g1, m1), (g4, m4) = full(params, global_batch), micro(params, global_batch)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g4)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)
  for name in ("loss", "accuracy", "num_tokens"):
    np.testing.assert_allclose(float(m1[name]), float(m4[name]), rtol=1e-5)


def test_bad_batches_and_settings_say_what_to_change():
  model = models.from_gin("gpt2_tiny")
  optimizer = optimizers.create_optimizer()
  mesh = partitioning.make_mesh(2, 2, 2)
  with pytest.raises(ValueError, match="not divisible by the data-parallel size"):
    trainer_lib.Trainer(model, optimizer, mesh, {k: (6, 16) for k in model.REQUIRED_FEATURES})
  with pytest.raises(ValueError, match="num_microbatches=3"):
    trainer_lib.Trainer(model, optimizer, mesh, {k: (8, 16) for k in model.REQUIRED_FEATURES},
                        num_microbatches=3)
  with pytest.raises(ValueError, match=r"lacks features .*decoder_target_tokens.*feature_converter='decoder'"):
    trainer_lib.Trainer(model, optimizer, mesh, {"decoder_input_tokens": (8, 16)})


@pytest.mark.parametrize("preset", ["gpt2_tiny", "t5_tiny"])
def test_model_flops_match_the_compiled_forward_pass(preset):
  """The analytic count (used for MFU) agrees with XLA's count of the forward pass, which also
  includes the elementwise work the analytic count leaves out."""
  model = models.from_gin(preset, ["TransformerConfig.scan_layers = False"])
  batch = model.dummy_batch(4, {"inputs": 64, "targets": 32})
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), batch)
  analysis = jax.jit(model.logits).lower(params, batch).compile().cost_analysis()
  analysis = analysis[0] if isinstance(analysis, list) else analysis
  analytic_forward = model.flops_per_step({k: v.shape for k, v in batch.items()}) / 3
  assert 0.92 * analysis["flops"] < analytic_forward <= analysis["flops"]


def test_cpu_peak_is_measured_with_a_matmul():
  peak = trainer_lib.peak_flops_per_second()
  assert 1e8 < peak < 1e14  # a real measurement of this CPU, not a table entry
