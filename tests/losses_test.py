"""Cross entropy against a direct one-hot computation; label smoothing, z-loss and weights; the
chunked output head against the logits it never materialises."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_lite import losses, metrics as metrics_lib
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


def _head_case(vocab_first, with_bias):
  """Features, kernel and bias of a head, random targets and weights; 7 positions, so chunks
  of 3 positions pad the last one."""
  k = jax.random.split(jax.random.PRNGKey(2), 5)
  b, l, d, v = 2, 7, 6, 13
  x = jax.random.normal(k[0], (b, l, d))
  kernel = jax.random.normal(k[1], (v, d) if vocab_first else (d, v))
  bias = jax.random.normal(k[2], (v,)) if with_bias else None
  targets = jax.random.randint(k[3], (b, l), 0, v)
  weights = (jax.random.uniform(k[4], (b, l)) > 0.3).astype(jnp.float32)
  return x, kernel, bias, targets, weights


@pytest.mark.parametrize("vocab_first, with_bias, label_smoothing, z_loss, chunk_size", [
    (True, False, 0.0, 0.0, 6),     # tied table [v, d], chunks of 3 positions (last padded)
    (True, True, 0.1, 1e-3, 2),     # BERT's tied head with its bias, one position per chunk
    (False, False, 0.2, 1e-4, 6),   # untied kernel [d, v]
    (False, True, 0.0, 1e-3, 100),  # one chunk holding every token
])
def test_chunked_head_matches_logits_loss_and_gradients(vocab_first, with_bias, label_smoothing,
                                                        z_loss, chunk_size):
  x, kernel, bias, targets, weights = _head_case(vocab_first, with_bias)
  options = dict(label_smoothing=label_smoothing, z_loss=z_loss)

  def unchunked(x, kernel, bias):
    logits = jnp.einsum("bld,vd->blv" if vocab_first else "bld,dv->blv", x, kernel)
    return cross_entropy_with_logits(logits + (0.0 if bias is None else bias), targets, weights,
                                     **options)

  def chunked(x, kernel, bias):
    head = losses.OutputHead(x, kernel, bias, vocab_first=vocab_first)
    return losses.cross_entropy_with_head(head, targets, weights, chunk_size=chunk_size,
                                          **options)

  grad = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))
  (loss, metrics), grads = grad(unchunked)(x, kernel, bias)
  (chunk_loss, chunk_metrics), chunk_grads = grad(chunked)(x, kernel, bias)
  np.testing.assert_allclose(chunk_loss, loss, rtol=1e-5)
  for name, value in metrics_lib.compute(metrics).items():
    np.testing.assert_allclose(metrics_lib.compute(chunk_metrics)[name], value, rtol=1e-5)
  for mine, theirs in zip(jax.tree.leaves(chunk_grads), jax.tree.leaves(grads)):
    np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-6)
  assert (chunk_grads[2] is None) == (bias is None)


def test_chunked_head_in_bfloat16_accumulates_in_float32():
  x, kernel, _, targets, weights = _head_case(True, False)
  head = losses.OutputHead(x.astype(jnp.bfloat16), kernel, None, vocab_first=True)
  loss_fn = lambda kernel: losses.cross_entropy_with_head(
      head.replace(kernel=kernel), targets, weights, chunk_size=6)[0]
  loss, grad = jax.jit(jax.value_and_grad(loss_fn))(kernel)
  reference = cross_entropy_with_logits(jnp.einsum("bld,vd->blv", x, kernel), targets, weights)[0]
  assert grad.dtype == jnp.float32  # the gradient of the float32 parameter
  np.testing.assert_allclose(loss, reference, rtol=2e-2)


def test_chunk_size_must_be_a_positive_int():
  for bad in (0, -4, 2.5, True):
    with pytest.raises(ValueError, match="loss_chunk_size must be a positive number"):
      losses.check_chunk_size(bad)
  assert losses.check_chunk_size(None) is None
