"""Token-level cross entropy with label smoothing and z-loss, and the metrics T5X reports.

The target logit is gathered instead of multiplying by a one-hot [b, l, v] tensor: with label
smoothing the smoothed target is uniform off the true class, so only sum(logits) is needed.
"""
from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp

from t5x_lite.metrics import Average, Sum

Array = jax.Array


def cross_entropy_with_logits(logits: Array, targets: Array, weights: Optional[Array] = None, *,
                              label_smoothing: float = 0.0,
                              z_loss: float = 0.0) -> tuple[Array, dict[str, Array]]:
  """Weighted mean cross entropy over target tokens. logits [b, l, v], targets/weights [b, l].

  Returns (loss, metrics): loss = mean per-token cross entropy + z_loss * mean(log Z ^ 2) with
  the mean taken over weighted tokens; metrics (see `t5x_lite.metrics`) hold the token
  Averages loss, cross_entropy, z_loss and accuracy, and the Sum num_tokens (sum of weights). With label smoothing the reported cross entropy is relative to the
  smoothed distribution's entropy, so a perfect model scores 0 as without smoothing.
  """
  if not 0.0 <= label_smoothing < 1.0:
    raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}.")
  logits = logits.astype(jnp.float32)
  vocab = logits.shape[-1]
  if weights is None:
    weights = jnp.ones(targets.shape, jnp.float32)
  weights = weights.astype(jnp.float32)

  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  if label_smoothing:
    confidence = 1.0 - label_smoothing
    low = label_smoothing / (vocab - 1)
    expected_logit = confidence * target_logit + low * (jnp.sum(logits, -1) - target_logit)
    # Entropy of the smoothed target distribution: the minimum achievable cross entropy.
    min_entropy = -(confidence * math.log(confidence) + (vocab - 1) * low * math.log(low + 1e-20))
    token_xent = log_z - expected_logit - min_entropy
  else:
    token_xent = log_z - target_logit
  token_z_loss = z_loss * jnp.square(log_z)

  num_tokens = jnp.sum(weights)
  denominator = jnp.maximum(num_tokens, 1.0)
  xent_sum = jnp.sum(token_xent * weights)
  zl_sum = jnp.sum(token_z_loss * weights)
  # A prediction is correct when the target's logit is the largest (ties count as correct).
  # Unlike argmax (a variadic reduction XLA's CPU backend runs slowly), this max fuses with
  # logsumexp's.
  correct = (target_logit >= jnp.max(logits, axis=-1)).astype(jnp.float32)
  metrics = {
      "loss": Average(xent_sum + zl_sum, num_tokens),
      "cross_entropy": Average(xent_sum, num_tokens),
      "z_loss": Average(zl_sum, num_tokens),
      "accuracy": Average(jnp.sum(correct * weights), num_tokens),
      "num_tokens": Sum(num_tokens),
  }
  return (xent_sum + zl_sum) / denominator, metrics
