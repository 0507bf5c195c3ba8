"""Autoregressive decoding over a KV cache: sampling (greedy, temperature, top-k, top-p,
`num_decodes` samples per prompt) and beam search with T5X's length penalty.

The model stays behind one callable, so this file knows nothing of the three families:

    step_fn(tokens [B], positions [B], cache) -> (logits [B, V], cache)

The caller prefills the cache from the prompt in one pass and hands over the logits of each
row's last prompt token, the cache, and each row's next position. Rows stop independently at
EOS; what a row emits after its EOS is padding (0). Everything runs inside one `lax.while_loop`
over a fixed-size cache, so the cost of a step does not grow with the tokens already generated.

Axis letters: b prompts, n samples or beams per prompt, B = b * n decoded rows, N new tokens,
v vocabulary, c candidate tokens kept by top-k / top-p.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

Array = jax.Array
StepFn = Callable[[Array, Array, Any], tuple[Array, Any]]
NEG_INF = -1e9  # Finite, so sums and divisions of impossible scores never produce NaN.


@dataclasses.dataclass(frozen=True)
class DecodeParams:
  """How to decode; every model method that decodes takes these as keyword overrides.

  Attributes:
    max_new_tokens: tokens generated per row, EOS included.
    temperature: 0 is greedy; otherwise logits are divided by it before sampling.
    top_k: sample only among the k most likely tokens (0: no limit).
    top_p: sample only from the smallest set of tokens whose probability reaches top_p (1: all).
    num_decodes: independent samples per prompt (sampling only).
    beam_size: 0 samples; >= 1 runs beam search with that many beams and returns them all.
    alpha: beam search length penalty ((5 + length) / 6) ** alpha, as in T5X (0: none).
    eos_id: the token that ends a row (seqio's EOS is 1).
  """
  max_new_tokens: int = 64
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  num_decodes: int = 1
  beam_size: int = 0
  alpha: float = 0.6
  eos_id: int = 1

  def validate(self, vocab_size: int) -> "DecodeParams":
    checks = [
        (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1,
         f"max_new_tokens must be a positive int, got {self.max_new_tokens!r}"),
        (self.temperature >= 0, f"temperature must be >= 0 (0 is greedy), got {self.temperature}"),
        (isinstance(self.top_k, int) and 0 <= self.top_k <= vocab_size,
         f"top_k must be an int in [0, vocab_size={vocab_size}] (0: no limit), got {self.top_k!r}"),
        (0 < self.top_p <= 1, f"top_p must be in (0, 1] (1: no nucleus filter), got {self.top_p}"),
        (isinstance(self.num_decodes, int) and self.num_decodes >= 1,
         f"num_decodes must be a positive int, got {self.num_decodes!r}"),
        (isinstance(self.beam_size, int) and 0 <= 2 * self.beam_size <= vocab_size,
         f"beam_size must be an int in [0, vocab_size / 2] (0: sample), got {self.beam_size!r}"),
        (self.alpha >= 0, f"alpha (length penalty) must be >= 0, got {self.alpha}"),
        (not (self.beam_size and self.num_decodes > 1),
         "num_decodes is for sampling; beam search returns beam_size sequences per prompt"),
        (0 <= self.eos_id < vocab_size, f"eos_id must be a token id, got {self.eos_id}"),
    ]
    errors = [message for ok, message in checks if not ok]
    if errors:
      raise ValueError("Invalid decoding parameters: " + "; ".join(errors) + ".")
    return self

  def replace(self, **changes) -> "DecodeParams":
    unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
    if unknown:
      raise TypeError(f"Unknown decoding parameters {unknown}; known: "
                      f"{[f.name for f in dataclasses.fields(self)]}.")
    return dataclasses.replace(self, **changes)

  # temperature, top_p and alpha change no shape, so they are passed to compiled decoders as
  # arrays and new values need no recompilation; the rest is static (part of the jit key).
  # Whether top_p filters at all changes the program: the traced part holds top_p only then, so
  # the two cases differ in structure and compile separately.
  def split(self) -> tuple["DecodeParams", dict]:
    """(hashable static part, traced part); `join` puts them back together."""
    static = self.replace(temperature=1.0, top_p=1.0, alpha=0.0)
    traced = {"temperature": jnp.float32(self.temperature), "alpha": jnp.float32(self.alpha)}
    if self.top_p < 1:
      traced["top_p"] = jnp.float32(self.top_p)
    return static, traced

  def join(self, traced: dict) -> "DecodeParams":
    return dataclasses.replace(self, temperature=traced["temperature"], alpha=traced["alpha"],
                               top_p=traced.get("top_p", 1.0))


def decode(step_fn: StepFn, logits: Array, cache: Any, positions: Array, rng: Array,
           params: DecodeParams, cache_axes: Any) -> tuple[Array, Array]:
  """Beam search or sampling as `params` asks: tokens [b, n, N] and scores [b, n], best first."""
  if params.beam_size:
    return beam_search(step_fn, logits, cache, positions, cache_axes=cache_axes,
                       max_new_tokens=params.max_new_tokens, beam_size=params.beam_size,
                       alpha=params.alpha, eos_id=params.eos_id)
  return sample(step_fn, logits, cache, positions, rng, cache_axes=cache_axes,
                max_new_tokens=params.max_new_tokens, temperature=params.temperature,
                top_k=params.top_k, top_p=params.top_p, num_decodes=params.num_decodes,
                eos_id=params.eos_id)


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------
def filter_logits(logits: Array, temperature, top_k: int = 0,
                  top_p=1.0) -> tuple[Array, Array | None]:
  """Tempered logits of the tokens allowed by top-k and top-p: ([B, c] logits, [B, c] ids).

  Without top-k / top-p the ids are None and c = v. The most likely token is always allowed.
  `temperature` and `top_p` may be traced; `top_k` and whether `top_p` filters at all must be
  static (they change shapes).
  """
  logits = logits.astype(jnp.float32) / jnp.maximum(temperature, 1e-6)
  use_top_p = not (isinstance(top_p, (int, float)) and top_p >= 1.0)
  if not top_k and not use_top_p:
    return logits, None
  # top_k returns its values sorted, which the nucleus needs; k = v is a full sort.
  values, ids = jax.lax.top_k(logits, top_k or logits.shape[-1])
  if use_top_p:
    probs = jax.nn.softmax(values, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    values = jnp.where(mass_before < top_p, values, NEG_INF)
  return values, ids


def sample_tokens(rng: Array, logits: Array, temperature, top_k: int = 0, top_p=1.0) -> Array:
  """One token per row [B] from logits [B, v]: argmax when temperature is 0."""
  def sample():
    values, ids = filter_logits(logits, temperature, top_k, top_p)
    choice = jax.random.categorical(rng, values, axis=-1)
    return choice if ids is None else jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0]
  # A branch, not a select: greedy decoding draws no random numbers (B x v of them per step).
  return jax.lax.cond(temperature > 0, lambda: sample().astype(jnp.int32),
                      lambda: jnp.argmax(logits, axis=-1).astype(jnp.int32))


def sample(step_fn: StepFn, logits: Array, cache: Any, positions: Array, rng: Array, *,
           cache_axes: Any, max_new_tokens: int, temperature=1.0, top_k: int = 0, top_p=1.0,
           num_decodes: int = 1, eos_id: int = 1) -> tuple[Array, Array]:
  """Samples `num_decodes` continuations per prompt.

  Args:
    logits: [b, v] next-token logits after each prompt; positions: [b] their positions.
    cache: the prefilled cache, batch b; `cache_axes` names its axes (one of them "batch").
  Returns:
    tokens [b, n, N] (0 after EOS) and scores [b, n]: each sample's log-likelihood under the
    model (temperature 1, EOS included), samples sorted best first.
  """
  b = logits.shape[0]
  logits, positions, cache = _repeat_rows((logits, positions, cache),
                                          (("batch", "vocab"), ("batch",), cache_axes), num_decodes)
  rows = b * num_decodes

  def cond(state):
    t, _, _, _, finished, _ = state
    return (t < max_new_tokens) & ~jnp.all(finished)

  def body(state):
    t, tokens, logits, cache, finished, scores = state
    token = sample_tokens(jax.random.fold_in(rng, t), logits, temperature, top_k, top_p)
    token = jnp.where(finished, 0, token)
    log_prob = jnp.take_along_axis(jax.nn.log_softmax(logits), token[:, None], axis=-1)[:, 0]
    scores = scores + jnp.where(finished, 0.0, log_prob)
    tokens = tokens.at[:, t].set(token)
    finished = finished | (token == eos_id)
    logits, cache = step_fn(token, positions + t, cache)
    return t + 1, tokens, logits, cache, finished, scores

  state = (jnp.zeros((), jnp.int32), jnp.zeros((rows, max_new_tokens), jnp.int32), logits, cache,
           jnp.zeros((rows,), bool), jnp.zeros((rows,), jnp.float32))
  _, tokens, _, _, _, scores = jax.lax.while_loop(cond, body, state)
  scores = scores.reshape(b, num_decodes)
  order = jnp.argsort(-scores, axis=1)
  tokens = jnp.take_along_axis(tokens.reshape(b, num_decodes, -1), order[:, :, None], axis=1)
  return tokens, jnp.take_along_axis(scores, order, axis=1)


# ----------------------------------------------------------------------------------------------
# Beam search
# ----------------------------------------------------------------------------------------------
def length_penalty(alpha, length) -> Array:
  """T5X's (GNMT's) brevity penalty: finished scores are log-likelihood / ((5 + len) / 6)^alpha."""
  return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


def beam_search(step_fn: StepFn, logits: Array, cache: Any, positions: Array, *,
                cache_axes: Any, max_new_tokens: int, beam_size: int, alpha=0.6,
                eos_id: int = 1) -> tuple[Array, Array]:
  """Beam search: tokens [b, k, N] (0 after EOS) and scores [b, k], best first.

  Each step expands every live beam by every token and ranks the candidates. Those among the k
  best that end with EOS join the k best finished beams, scored log-likelihood /
  length_penalty(alpha, length incl. EOS); the k best that do not end (found among the 2k best)
  stay live. The loop
  stops early once no live beam can still beat a row's worst finished one. Live beams that
  reach max_new_tokens compete with the finished ones at the end.
  """
  b, vocab = logits.shape
  k = beam_size
  logits, positions, cache = _repeat_rows((logits, positions, cache),
                                          (("batch", "vocab"), ("batch",), cache_axes), k)
  # All k copies of a prompt are identical at first: only the first may expand.
  live_scores = jnp.tile(jnp.array([0.0] + [NEG_INF] * (k - 1), jnp.float32), (b, 1))
  empty = jnp.zeros((b, k, max_new_tokens), jnp.int32)
  max_penalty = length_penalty(alpha, max_new_tokens)

  def cond(state):
    t, live_scores, finished_scores = state[0], state[2], state[4]
    # Log-likelihoods only fall as beams grow, so this bounds what a live beam can still score.
    best_possible = live_scores[:, 0] / max_penalty
    hopeless = jnp.min(finished_scores, axis=1) > best_possible
    return (t < max_new_tokens) & ~jnp.all(hopeless)

  def body(state):
    t, live, live_scores, finished, finished_scores, logits, cache = state
    candidates = live_scores[:, :, None] + jax.nn.log_softmax(logits).reshape(b, k, vocab)
    top_scores, top_ids = jax.lax.top_k(candidates.reshape(b, k * vocab), 2 * k)  # [b, 2k]
    parent, token = top_ids // vocab, (top_ids % vocab).astype(jnp.int32)
    seqs = jnp.take_along_axis(live, parent[:, :, None], axis=1).at[:, :, t].set(token)
    ended = token == eos_id

    live_scores, keep = jax.lax.top_k(jnp.where(ended, NEG_INF, top_scores), k)
    live = jnp.take_along_axis(seqs, keep[:, :, None], axis=1)
    parent = jnp.take_along_axis(parent, keep, axis=1)
    rows = (jnp.arange(b)[:, None] * k + parent).reshape(-1)
    cache = _gather_rows(cache, cache_axes, rows)

    # Only candidates among the k best may finish: a beam of k never sees the others (and a
    # beam of one is then exactly greedy).
    ended_in_beam = ended & (jnp.arange(2 * k) < k)[None, :]
    new_finished = jnp.where(ended_in_beam, top_scores / length_penalty(alpha, t + 1), NEG_INF)
    finished, finished_scores = _top_k_sequences(
        jnp.concatenate([finished, seqs], axis=1),
        jnp.concatenate([finished_scores, new_finished], axis=1), k)

    token = jnp.take_along_axis(token, keep, axis=1).reshape(-1)
    logits, cache = step_fn(token, positions + t, cache)
    return t + 1, live, live_scores, finished, finished_scores, logits, cache

  state = (jnp.zeros((), jnp.int32), empty, live_scores, empty,
           jnp.full((b, k), NEG_INF, jnp.float32), logits, cache)
  _, live, live_scores, finished, finished_scores, _, _ = jax.lax.while_loop(cond, body, state)
  return _top_k_sequences(jnp.concatenate([finished, live], axis=1),
                          jnp.concatenate([finished_scores, live_scores / max_penalty], axis=1), k)


def _top_k_sequences(seqs: Array, scores: Array, k: int) -> tuple[Array, Array]:
  """The k best of [b, m, N] sequences by their [b, m] scores, best first."""
  scores, best = jax.lax.top_k(scores, k)
  return jnp.take_along_axis(seqs, best[:, :, None], axis=1), scores


# ----------------------------------------------------------------------------------------------
# Rows of the cache
# ----------------------------------------------------------------------------------------------
def _batch_axis(axes: tuple) -> int | None:
  return axes.index("batch") if "batch" in axes else None


def _map_batch(fn, tree, axes_tree):
  """Applies fn(leaf, batch_axis) to every leaf that has a batch axis."""
  return jax.tree.map(
      lambda axes, leaf: leaf if _batch_axis(axes) is None else fn(leaf, _batch_axis(axes)),
      axes_tree, tree, is_leaf=lambda x: isinstance(x, tuple) and all(
          isinstance(a, str) for a in x))


def _repeat_rows(tree, axes_tree, n: int):
  """Each row repeated n times, copies adjacent (row i becomes rows i*n ... i*n + n - 1)."""
  if n == 1:
    return tree
  return _map_batch(lambda leaf, axis: jnp.repeat(leaf, n, axis=axis), tree, axes_tree)


def _gather_rows(tree, axes_tree, rows: Array):
  return _map_batch(lambda leaf, axis: jnp.take(leaf, rows, axis=axis), tree, axes_tree)
