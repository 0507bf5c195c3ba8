"""Trainer on the 8 simulated devices: sharded state, donation, accumulation, mergeable metrics,
trainable subsets and frozen trees, FLOPs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_lite import metrics as metrics_lib
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


def test_cpu_peak_is_measured_with_a_matmul():
  peak = trainer_lib.peak_flops_per_second()
  assert 1e8 < peak < 1e14  # a real measurement of this CPU, not a table entry


# ---------------------------------------------------------------------------- the seams

class MarginModel(models.DecoderOnlyModel):
  """An objective with metrics of its own: a per-row metric (weighted by rows, not tokens) and
  a count, as a DPO margin or a reward accuracy would be."""

  def loss_fn(self, params, batch, dropout_rng=None):
    loss, metrics = super().loss_fn(params, batch, dropout_rng)
    logits = self.logits(params, batch)
    row_mean = jnp.mean(logits, axis=(1, 2))
    rows = jnp.asarray(row_mean.shape[0], jnp.float32)
    metrics["margin"] = metrics_lib.Average(jnp.sum(row_mean), rows)
    metrics["rows"] = metrics_lib.Sum(rows)
    return loss, metrics


def test_a_loss_with_its_own_metrics_merges_the_same_over_1_2_and_4_microbatches():
  model = MarginModel(models.from_gin("gpt2_tiny", ["TransformerConfig.num_layers = 1"]).config)
  batch = random_batch(model, batch_size=8, targets=8)
  params = model.init(jax.random.PRNGKey(0), batch)
  mesh = partitioning.make_mesh(2, 1, 1, devices=jax.devices()[:2])
  loss_fn = lambda p, b, r: model.loss_fn(p, b)
  merged = {}
  with partitioning.activation_sharding(mesh):
    global_batch = partitioning.host_to_global(batch, mesh)
    for m in (1, 2, 4):
      step = jax.jit(lambda p, b, m=m: trainer_lib.accumulate_gradients(
          loss_fn, p, b, jax.random.PRNGKey(1), m))
      merged[m] = metrics_lib.compute(step(params, global_batch)[1])
  assert merged[1]["rows"] == 8.0 and {"margin", "loss", "accuracy"} <= set(merged[1])
  for m in (2, 4):
    assert merged[m].keys() == merged[1].keys()
    for name in merged[1]:
      np.testing.assert_allclose(merged[m][name], merged[1][name], rtol=1e-5, err_msg=name)


def test_a_loss_with_plain_metrics_is_refused_with_the_fix():
  class PlainModel(models.DecoderOnlyModel):
    def loss_fn(self, params, batch, dropout_rng=None):
      loss, metrics = super().loss_fn(params, batch, dropout_rng)
      return loss, dict(metrics, margin=jnp.float32(0.0))

  model = PlainModel(models.from_gin("gpt2_tiny").config)
  batch = random_batch(model)
  params, _ = model.abstract_params(batch)
  with pytest.raises(TypeError, match=r"t5x_lite.metrics Average or Sum.*\['margin'\]"):
    jax.eval_shape(lambda p: trainer_lib.accumulate_gradients(
        lambda p, b, r: model.loss_fn(p, b), p, batch, None, 1), params)


def _tree_bytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def test_frozen_parameters_stay_bitwise_and_get_no_optimizer_state():
  trainer, batch = make_trainer("gpt2_tiny", trainable=r".*/mlp/.*")
  full, _ = make_trainer("gpt2_tiny")
  state = trainer.init_state(seed=0)
  before = jax.device_get(state.params)
  batch = partitioning.host_to_global(batch, trainer.mesh)
  for _ in range(3):
    state, metrics = trainer.train_step(state, batch)
  assert int(state.step) == 3 and np.isfinite(float(metrics["loss"]))
  after = jax.device_get(state.params)
  paths = [trainer_lib.param_path(p) for p, _ in jax.tree_util.tree_leaves_with_path(after)]
  changed = 0
  for path, a, b in zip(paths, jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
    if "/mlp/" in path:
      changed += not np.array_equal(a, b)
    else:
      np.testing.assert_array_equal(a, b, err_msg=path)  # frozen: bitwise unchanged
  assert changed == sum("/mlp/" in p for p in paths) > 0
  # AdamW keeps two moments per trainable parameter and nothing for the frozen ones.
  mlp_bytes = sum(x.size * x.dtype.itemsize for p, x in zip(paths, jax.tree.leaves(after))
                  if "/mlp/" in p)
  scalars = lambda s: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(s) if x.ndim == 0)
  opt = trainer.abstract_state.opt_state
  assert _tree_bytes(opt) - scalars(opt) == 2 * mlp_bytes
  assert _tree_bytes(full.abstract_state.opt_state) - scalars(full.abstract_state.opt_state) == (
      2 * _tree_bytes(after))
  memory = trainer.estimate_memory()
  assert memory["gradients"] < full.estimate_memory()["gradients"] / 2


def test_a_trainable_pattern_that_matches_nothing_is_refused():
  with pytest.raises(ValueError, match=r"matches no parameter; paths look like \['decoder/"):
    make_trainer("gpt2_tiny", trainable=r"lora_.*")


class AnchoredModel(models.DecoderOnlyModel):
  """A loss that reads a frozen tree (a reference model, as DPO's): cross entropy plus a pull
  towards the reference parameters."""

  def loss_fn(self, params, batch, dropout_rng=None, reference=None):
    loss, metrics = super().loss_fn(params, batch, dropout_rng)
    pull = sum(jnp.sum(jnp.square(p - r)) for p, r in zip(jax.tree.leaves(params),
                                                          jax.tree.leaves(reference)))
    metrics["pull"] = metrics_lib.Average.of(pull)
    return loss + pull, metrics


def test_frozen_trees_reach_the_loss_and_are_never_donated():
  small = ("TransformerConfig.num_layers = 1",)
  model = AnchoredModel(models.from_gin("gpt2_tiny", small).config)
  reference_trainer, batch = make_trainer("gpt2_tiny", bindings=small)
  reference = reference_trainer.init_state(seed=0).params
  trainer = trainer_lib.Trainer(model, reference_trainer.optimizer, reference_trainer.mesh,
                                {k: v.shape for k, v in batch.items()},
                                frozen_trees={"reference": reference})
  state = trainer.init_state(seed=0)  # the same seed: starts at the reference
  batch = partitioning.host_to_global(batch, trainer.mesh)
  state, metrics = trainer.train_step(state, batch)
  assert float(metrics["pull"]) == 0.0
  state, metrics = trainer.train_step(state, batch)
  assert float(metrics["pull"]) > 0.0  # the first update moved away from the reference
  assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(reference))
  assert float(trainer.eval_step(state.params, batch)["pull"]) > 0.0
