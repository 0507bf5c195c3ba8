"""Token-level cross entropy with label smoothing and z-loss, and the metrics T5X reports.

Two entry points compute the same loss:
  cross_entropy_with_logits  from logits [b, l, v] (the model's `logits`);
  cross_entropy_with_head    from the output head's inputs (`OutputHead`: features [b, l, d] and
                             the projection), `chunk_size` tokens at a time under a custom VJP,
                             so the [b, l, v] float32 logits and their gradient never exist at
                             once: each chunk's logits are computed, reduced to four per-token
                             statistics and dropped, and recomputed in the backward pass.
Both reduce the logits to the same statistics (`_token_statistics`) and build the loss from them
(`_loss_from_statistics`). The target logit is gathered instead of multiplying by a one-hot
[b, l, v] tensor: with label smoothing the smoothed target is uniform off the true class, so only
sum(logits) is needed.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional

import flax.struct
import jax
import jax.numpy as jnp

from t5x_lite.metrics import Average, Sum

Array = jax.Array
# The models' default `loss_chunk_size`: None, all logits at once. Measured on gpt-small (see
# the README): 512-token chunks cut the step's memory from 1.75 to 1.41 GiB (smaller chunks save
# no more) but cost ~11% step time (the backward pass recomputes the head's logits), so chunks
# are for runs that are short of memory (large vocabularies, many tokens per device).
DEFAULT_CHUNK_SIZE = None


class TokenStatistics(NamedTuple):
  """What the loss and metrics need of each token's logits, all float32 [b, l]."""
  log_z: Array         # logsumexp of the logits
  target_logit: Array  # the target's logit
  logit_sum: Array     # sum of the logits (zeros when label smoothing is off)
  correct: Array       # 1.0 where the target's logit is the largest (ties count), else 0.0


@flax.struct.dataclass
class OutputHead:
  """The output projection's inputs: logits = features @ kernel (+ bias).

  `features` [b, l, d] are in the compute dtype; `kernel` is the parameter as stored: [v, d]
  (a tied embedding table, `vocab_first`) or [d, v] (an untied head); `bias` [v] or None.
  """
  features: Array
  kernel: Array
  bias: Optional[Array]
  vocab_first: bool = flax.struct.field(pytree_node=False)


def _token_statistics(logits: Array, targets: Array, logit_sum: bool) -> TokenStatistics:
  logits = logits.astype(jnp.float32)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  # Unlike argmax (a variadic reduction XLA's CPU backend runs slowly), this max fuses with
  # logsumexp's.
  correct = (target_logit >= jnp.max(logits, axis=-1)).astype(jnp.float32)
  total = jnp.sum(logits, -1) if logit_sum else jnp.zeros_like(target_logit)
  return TokenStatistics(jax.nn.logsumexp(logits, axis=-1), target_logit, total, correct)


def check_chunk_size(chunk_size: Optional[int]) -> Optional[int]:
  """`chunk_size` if it is None (no chunking) or a positive int, else a ValueError."""
  if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                 or chunk_size < 1):
    raise ValueError(f"loss_chunk_size must be a positive number of tokens, or None to compute "
                     f"all logits at once; got {chunk_size!r}.")
  return chunk_size


def _check_smoothing(label_smoothing: float) -> None:
  if not 0.0 <= label_smoothing < 1.0:
    raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}.")


def cross_entropy_with_logits(logits: Array, targets: Array, weights: Optional[Array] = None, *,
                              label_smoothing: float = 0.0,
                              z_loss: float = 0.0) -> tuple[Array, dict[str, Array]]:
  """Weighted mean cross entropy over target tokens. logits [b, l, v], targets/weights [b, l].

  Returns (loss, metrics): loss = mean per-token cross entropy + z_loss * mean(log Z ^ 2) with
  the mean taken over weighted tokens; metrics (see `t5x_lite.metrics`) hold the token
  Averages loss, cross_entropy, z_loss and accuracy, and the Sum num_tokens (sum of weights).
  With label smoothing the reported cross entropy is relative to the smoothed distribution's
  entropy, so a perfect model scores 0 as without smoothing.
  """
  _check_smoothing(label_smoothing)
  stats = _token_statistics(logits, targets, logit_sum=label_smoothing > 0)
  return _loss_from_statistics(stats, logits.shape[-1], weights, label_smoothing, z_loss)


def cross_entropy_with_head(head: OutputHead, targets: Array, weights: Optional[Array] = None, *,
                            chunk_size: int, label_smoothing: float = 0.0,
                            z_loss: float = 0.0) -> tuple[Array, dict[str, Array]]:
  """`cross_entropy_with_logits` of the head's logits, computed about `chunk_size` tokens at a
  time (whole rows' positions [p, p + chunk_size / b) per chunk, so a batch-sharded input stays
  sharded). Loss, metrics and gradients are those of the unchunked loss; peak memory holds one
  chunk's [b, chunk_size / b, v] float32 logits instead of all of them."""
  _check_smoothing(label_smoothing)
  if check_chunk_size(chunk_size) is None:
    raise ValueError("cross_entropy_with_head needs a chunk_size (tokens per chunk).")
  b, l = targets.shape
  positions = max(1, min(l, chunk_size // b))
  stats = TokenStatistics(*_head_statistics(head.features, head.kernel, head.bias, targets,
                                            head.vocab_first, positions, label_smoothing > 0))
  vocab = head.kernel.shape[0 if head.vocab_first else -1]
  return _loss_from_statistics(stats, vocab, weights, label_smoothing, z_loss)


def cross_entropy(outputs, targets: Array, weights: Optional[Array] = None, *,
                  chunk_size: Optional[int] = None, label_smoothing: float = 0.0,
                  z_loss: float = 0.0) -> tuple[Array, dict[str, Array]]:
  """The loss of a module's outputs: `cross_entropy_with_head` of an `OutputHead` (what a module
  called with `output_head=True` returns), `cross_entropy_with_logits` of logits (what it returns
  otherwise, or when its head cannot be chunked)."""
  if isinstance(outputs, OutputHead):
    return cross_entropy_with_head(outputs, targets, weights, chunk_size=chunk_size,
                                   label_smoothing=label_smoothing, z_loss=z_loss)
  return cross_entropy_with_logits(outputs, targets, weights, label_smoothing=label_smoothing,
                                   z_loss=z_loss)


def _loss_from_statistics(stats: TokenStatistics, vocab: int, weights: Optional[Array],
                          label_smoothing: float, z_loss: float) -> tuple[Array, dict]:
  if weights is None:
    weights = jnp.ones(stats.log_z.shape, jnp.float32)
  weights = weights.astype(jnp.float32)
  if label_smoothing:
    confidence = 1.0 - label_smoothing
    low = label_smoothing / (vocab - 1)
    expected_logit = (confidence * stats.target_logit
                      + low * (stats.logit_sum - stats.target_logit))
    # Entropy of the smoothed target distribution: the minimum achievable cross entropy.
    min_entropy = -(confidence * math.log(confidence) + (vocab - 1) * low * math.log(low + 1e-20))
    token_xent = stats.log_z - expected_logit - min_entropy
  else:
    token_xent = stats.log_z - stats.target_logit
  token_z_loss = z_loss * jnp.square(stats.log_z)

  num_tokens = jnp.sum(weights)
  denominator = jnp.maximum(num_tokens, 1.0)
  xent_sum = jnp.sum(token_xent * weights)
  zl_sum = jnp.sum(token_z_loss * weights)
  metrics = {
      "loss": Average(xent_sum + zl_sum, num_tokens),
      "cross_entropy": Average(xent_sum, num_tokens),
      "z_loss": Average(zl_sum, num_tokens),
      "accuracy": Average(jnp.sum(jax.lax.stop_gradient(stats.correct) * weights), num_tokens),
      "num_tokens": Sum(num_tokens),
  }
  return (xent_sum + zl_sum) / denominator, metrics


# ---------------------------------------------------------------------------------------------
# The chunked head: statistics of features @ kernel (+ bias) under a custom VJP
# ---------------------------------------------------------------------------------------------
def _chunk_logits(x: Array, kernel: Array, bias: Optional[Array], vocab_first: bool) -> Array:
  """float32 logits [b, p, v] of a chunk x [b, p, d]; `kernel` already in x's dtype."""
  equation = "bpd,vd->bpv" if vocab_first else "bpd,dv->bpv"
  logits = jnp.einsum(equation, x, kernel, preferred_element_type=jnp.float32)
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  return _constrain_logits(logits)


def _constrain_logits(logits: Array) -> Array:
  from t5x_lite import layers  # pylint: disable=g-import-not-at-top  # layers -> metrics only
  return layers.constrain(logits, ("batch", "length", "vocab"))


def _padded(x: Array, length: int) -> Array:
  """x [b, l, ...] padded with zeros to `length` positions."""
  pad = length - x.shape[1]
  return x if pad == 0 else jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))


def _chunks(l: int, positions: int) -> tuple[int, int]:
  count = -(-l // positions)
  return count, count * positions


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _head_statistics(features, kernel, bias, targets, vocab_first, positions, logit_sum):
  return _head_statistics_forward(features, kernel, bias, targets, vocab_first, positions,
                                  logit_sum)[0]


def _head_statistics_forward(features, kernel, bias, targets, vocab_first, positions,
                             logit_sum):
  """Statistics chunk by chunk (a loop over chunks of `positions` positions of every row)."""
  b, l = targets.shape
  count, padded_length = _chunks(l, positions)
  x, t = _padded(features, padded_length), _padded(targets, padded_length)
  w = kernel.astype(features.dtype)  # once, not once per chunk

  def chunk(i):
    start = i * positions
    x_c = jax.lax.dynamic_slice_in_dim(x, start, positions, axis=1)
    t_c = jax.lax.dynamic_slice_in_dim(t, start, positions, axis=1)
    return _token_statistics(_chunk_logits(x_c, w, bias, vocab_first), t_c, logit_sum)

  if count == 1:
    stats = chunk(0)
  else:  # [count, b, positions] -> [b, count * positions]
    stats = jax.lax.map(chunk, jnp.arange(count))
    stats = jax.tree.map(lambda s: s.transpose(1, 0, 2).reshape(b, padded_length), stats)
  stats = TokenStatistics(*(s[:, :l] for s in stats))
  return tuple(stats), (features, kernel, bias, targets, stats.log_z)


def _head_statistics_backward(vocab_first, positions, logit_sum, residuals, cotangents):
  """Each chunk's logits again; d(stat)/d(logits) is softmax for log Z, the one-hot target for
  the target logit and ones for the sum (`correct` is piecewise constant: no gradient)."""
  del logit_sum  # a zero cotangent for the sum when it was not computed
  features, kernel, bias, targets, log_z = residuals
  g_log_z, g_target, g_sum, _ = cotangents
  b, l = targets.shape
  count, padded_length = _chunks(l, positions)
  x, t = _padded(features, padded_length), _padded(targets, padded_length)
  # Padded positions get zero cotangents, so they add nothing to any gradient.
  g = [_padded(a.astype(jnp.float32), padded_length) for a in (log_z, g_log_z, g_target, g_sum)]
  w = kernel.astype(features.dtype)
  vocab = kernel.shape[0 if vocab_first else -1]

  def chunk(carry, i):
    dx, dw, db = carry
    start = i * positions
    take = lambda a: jax.lax.dynamic_slice_in_dim(a, start, positions, axis=1)
    x_c, t_c = take(x), take(t)
    lz_c, glz_c, gt_c, gs_c = (take(a)[..., None] for a in g)
    logits = _chunk_logits(x_c, w, bias, vocab_first)
    one_hot = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 2) == t_c[..., None]
    d_logits = glz_c * jnp.exp(logits - lz_c) + jnp.where(one_hot, gt_c, 0.0) + gs_c
    d_logits = _constrain_logits(d_logits)
    d_low = d_logits.astype(features.dtype)
    dx_eq = "bpv,vd->bpd" if vocab_first else "bpv,dv->bpd"
    dx_c = jnp.einsum(dx_eq, d_low, w, preferred_element_type=jnp.float32).astype(dx.dtype)
    dx = jax.lax.dynamic_update_slice_in_dim(dx, dx_c, start, axis=1)
    # dW as [d, v] for either layout: the [b, p, v] gradient is read as it lies (contracting
    # its leading dims), where [v, d] made XLA copy it transposed, a third chunk-sized buffer.
    dw_c = jnp.einsum("bpd,bpv->dv", x_c, d_low, preferred_element_type=jnp.float32)
    db = None if db is None else db + jnp.sum(d_logits, axis=(0, 1))
    return (dx, dw + dw_c, db), None

  d, v = (kernel.shape[1], kernel.shape[0]) if vocab_first else kernel.shape
  init = (jnp.zeros(x.shape, features.dtype), jnp.zeros((d, v), jnp.float32),
          None if bias is None else jnp.zeros((vocab,), jnp.float32))
  if count == 1:
    (dx, dw, db), _ = chunk(init, 0)
  else:
    (dx, dw, db), _ = jax.lax.scan(chunk, init, jnp.arange(count))
  db = None if bias is None else db.astype(bias.dtype)
  dw = dw.T if vocab_first else dw
  return dx[:, :l], dw.astype(kernel.dtype), db, None


_head_statistics.defvjp(_head_statistics_forward, _head_statistics_backward)
