"""Schedules, the weight-decay mask, clipping and the three optimizers."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from t5x_lite import models, optimizers


def test_rsqrt_is_flat_during_warmup_then_decays_as_t5():
  schedule = optimizers.create_schedule("rsqrt", peak_value=0.01, warmup_steps=10_000)
  for step in (0, 5_000, 10_000):
    assert float(schedule(step)) == pytest.approx(0.01)
  # T5: 1 / sqrt(max(step, 10k)).
  assert float(schedule(40_000)) == pytest.approx(1 / np.sqrt(40_000))


def test_cosine_warms_up_linearly_and_ends_at_the_floor():
  schedule = optimizers.create_schedule("cosine", peak_value=1e-3, warmup_steps=100,
                                        total_steps=1100, end_fraction=0.1)
  assert float(schedule(0)) == 0.0
  assert float(schedule(50)) == pytest.approx(5e-4)
  assert float(schedule(100)) == pytest.approx(1e-3)
  assert float(schedule(600)) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5), rel=1e-4)
  assert float(schedule(1100)) == pytest.approx(1e-4)


def test_constant_after_warmup():
  schedule = optimizers.create_schedule("constant", peak_value=3e-4, warmup_steps=10)
  assert float(schedule(5)) == pytest.approx(1.5e-4)
  assert float(schedule(10)) == float(schedule(10_000)) == pytest.approx(3e-4)


@pytest.mark.parametrize("kwargs, message", [
    (dict(kind="linear"), "choose one of"),
    (dict(kind="cosine", warmup_steps=10), "total_steps = %TRAIN_STEPS"),
    (dict(kind="constant", peak_value=0.0), "peak_value > 0"),
])
def test_bad_schedule_is_refused(kwargs, message):
  with pytest.raises(ValueError, match=message):
    optimizers.create_schedule(**kwargs)


def test_bad_optimizer_name_lists_the_known_ones():
  with pytest.raises(ValueError, match="adafactor"):
    optimizers.create_optimizer("sgd")


def test_decay_mask_spares_norms_and_biases_even_when_layers_are_scanned():
  model = models.from_gin("gpt2_tiny")  # scanned: norm scales are [layers, d]
  shapes, _ = model.abstract_params(model.dummy_batch(1, {"targets": 8}))
  mask = {jax.tree_util.keystr(p): m
          for p, m in jax.tree_util.tree_leaves_with_path(optimizers.decay_mask(shapes))}
  assert mask["['decoder']['layers']['mlp_norm']['scale']"] is False
  assert mask["['decoder']['layers']['mlp']['wi']['bias']"] is False
  assert mask["['decoder']['layers']['mlp']['wi']['kernel']"] is True
  assert mask["['token_embed']['embedding']"] is True


@pytest.mark.parametrize("name", ["adamw", "lion", "adafactor"])
def test_weight_decay_shrinks_matrices_but_not_scales(name):
  params = {"dense": {"kernel": jnp.ones((4, 4))}, "norm": {"scale": jnp.ones((4,))}}
  optimizer = optimizers.create_optimizer(
      name, optimizers.create_schedule("constant", 0.1, 0), weight_decay=0.5)
  state = optimizer.tx.init(params)
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = optimizer.tx.update(zero_grads, state, params)
  assert float(jnp.max(updates["dense"]["kernel"])) < 0.0
  np.testing.assert_array_equal(updates["norm"]["scale"], 0.0)


@pytest.mark.parametrize("name", ["adamw", "lion", "adafactor"])
def test_each_optimizer_minimises_a_quadratic(name):
  target = jnp.arange(12.0).reshape(3, 4) / 10
  # Not zeros: Adafactor scales its steps by the parameters' RMS (T5's relative step size).
  params = {"kernel": jnp.ones((3, 4))}
  optimizer = optimizers.create_optimizer(name, optimizers.create_schedule("constant", 0.05, 0))
  state = optimizer.tx.init(params)
  loss = lambda p: jnp.sum((p["kernel"] - target) ** 2)
  start = float(loss(params))
  for _ in range(100):
    updates, state = optimizer.tx.update(jax.grad(loss)(params), state, params)
    params = optax.apply_updates(params, updates)
  assert float(loss(params)) < 0.05 * start


def test_adafactor_keeps_factored_statistics_for_matrices():
  params = {"kernel": jnp.zeros((256, 512))}
  state = optimizers.create_optimizer("adafactor").tx.init(params)
  sizes = sorted(x.size for x in jax.tree.leaves(state) if x.ndim >= 1 and x.size > 1)
  assert sizes == [256, 512]  # row and column statistics, not a 256 x 512 second moment


def test_gradients_are_clipped_to_the_global_norm_first():
  params = {"a": jnp.zeros((3,)), "b": jnp.zeros((2, 2))}
  grads = {"a": jnp.full((3,), 100.0), "b": jnp.full((2, 2), -50.0)}
  optimizer = optimizers.create_optimizer("adamw", clip_grad_norm=2.0, b1=0.9)
  _, state = optimizer.tx.update(grads, optimizer.tx.init(params), params)
  adam_state = state[1][0]  # chain(clip, adamw); adamw = chain(scale_by_adam, ...)
  # The first moment after one step is (1 - b1) times the *clipped* gradient.
  assert float(optax.tree.norm(adam_state.mu)) == pytest.approx(0.1 * 2.0, rel=1e-5)
