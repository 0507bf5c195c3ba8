"""Cross entropy against a direct one-hot computation; label smoothing, z-loss and weights."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_lite import metrics as metrics_lib
from t5x_lite.losses import cross_entropy_with_logits


def _reference(logits, targets, weights, label_smoothing, z_loss):
  v = logits.shape[-1]
  log_probs = jax.nn.log_softmax(logits)
  soft = jax.nn.one_hot(targets, v) * (1 - label_smoothing - label_smoothing / (v - 1))
  soft = soft + label_smoothing / (v - 1)
  xent = -jnp.sum(soft * log_probs, -1)
  entropy = -jnp.sum(jnp.where(soft > 0, soft * jnp.log(soft), 0.0), -1)
  log_z = jax.nn.logsumexp(logits, -1)
  per_token = xent - entropy + z_loss * log_z**2
  return jnp.sum(per_token * weights) / jnp.sum(weights)


@pytest.mark.parametrize("label_smoothing, z_loss", [(0.0, 0.0), (0.1, 0.0), (0.0, 1e-4),
                                                      (0.2, 1e-3)])
def test_matches_one_hot_reference(label_smoothing, z_loss):
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
  logits = 3 * jax.random.normal(k1, (2, 5, 11))
  targets = jax.random.randint(k2, (2, 5), 0, 11)
  weights = (jax.random.uniform(k3, (2, 5)) > 0.3).astype(jnp.float32)
  loss, metrics = cross_entropy_with_logits(logits, targets, weights,
                                            label_smoothing=label_smoothing, z_loss=z_loss)
  np.testing.assert_allclose(loss, _reference(logits, targets, weights, label_smoothing, z_loss),
                             rtol=1e-5)
  values = metrics_lib.compute(metrics)
  assert values["num_tokens"] == weights.sum()
  np.testing.assert_allclose(values["loss"], values["cross_entropy"] + values["z_loss"], rtol=1e-6)
  np.testing.assert_allclose(values["loss"], loss, rtol=1e-6)


def test_perfect_prediction_scores_zero_and_full_accuracy():
  targets = jnp.array([[1, 2, 3]])
  logits = 1e4 * jax.nn.one_hot(targets, 5)
  loss, metrics = cross_entropy_with_logits(logits, targets)
  assert float(loss) == pytest.approx(0.0, abs=1e-4)
  assert metrics_lib.compute(metrics)["accuracy"] == 1.0


def test_zero_weight_tokens_do_not_count():
  logits = jax.random.normal(jax.random.PRNGKey(1), (1, 4, 7))
  targets = jnp.array([[1, 2, 3, 4]])
  w = jnp.array([[1.0, 1.0, 0.0, 0.0]])
  loss_masked, m = cross_entropy_with_logits(logits, targets, w)
  loss_prefix, _ = cross_entropy_with_logits(logits[:, :2], targets[:, :2])
  np.testing.assert_allclose(loss_masked, loss_prefix, rtol=1e-6)
  assert metrics_lib.compute(m)["num_tokens"] == 2


def test_bad_label_smoothing_is_refused():
  with pytest.raises(ValueError, match="label_smoothing"):
    cross_entropy_with_logits(jnp.zeros((1, 1, 3)), jnp.zeros((1, 1), jnp.int32),
                              label_smoothing=1.0)
