"""Sampling and beam search on small hand-made "models" whose answers are known exactly."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_lite import decoding

EOS = 1
V = 6  # 0 pad, 1 EOS, 2..5 ordinary tokens.


def _trigram(table):
  """A toy model whose next-token logits table[prev, current] need the previous token, which
  it keeps in its cache: if beam search reordered caches wrongly, the scores would not match."""
  table = jnp.asarray(table, jnp.float32)

  def step(tokens, positions, cache):
    del positions
    return table[cache["prev"], tokens], {"prev": tokens}
  return step


CACHE_AXES = {"prev": ("batch",)}


def _chain_model():
  """2 -> 3 -> 4 -> 5 -> EOS with near certainty, whatever came before."""
  table = np.full((V, V, V), -20.0)
  for token, following in ((2, 3), (3, 4), (4, 5), (5, EOS)):
    table[:, token, following] = 0.0
  return _trigram(table)


def _first_logits(*favourites):
  logits = np.full((len(favourites), V), -20.0, np.float32)
  logits[np.arange(len(favourites)), favourites] = 0.0
  return jnp.asarray(logits)


def test_rows_stop_at_their_own_eos_and_never_pass_max_new_tokens():
  tokens, scores = decoding.sample(
      _chain_model(), _first_logits(4, 2), {"prev": jnp.zeros(2, jnp.int32)},
      jnp.zeros(2, jnp.int32), jax.random.PRNGKey(0), cache_axes=CACHE_AXES, max_new_tokens=4,
      temperature=0.0, eos_id=EOS)
  np.testing.assert_array_equal(tokens[:, 0], [[4, 5, EOS, 0], [2, 3, 4, 5]])
  assert np.all(np.asarray(scores) > -1e-3)  # Near-certain tokens: log-likelihood ~ 0.


def _random_trigram(seed, sharpness=3.0):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(V, V, V)) * sharpness, rng.normal(size=(2, V)) * sharpness


def _decode(method, table, first, **kwargs):
  fn = decoding.sample if method == "sample" else decoding.beam_search
  args = (_trigram(table), jnp.asarray(first, jnp.float32), {"prev": jnp.zeros(2, jnp.int32)},
          jnp.zeros(2, jnp.int32))
  if method == "sample":
    args += (kwargs.pop("rng", jax.random.PRNGKey(0)),)
  return fn(*args, cache_axes=CACHE_AXES, max_new_tokens=5, eos_id=EOS, **kwargs)


def test_greedy_equals_top_k_1_and_one_beam_without_length_penalty():
  table, first = _random_trigram(0)
  greedy, greedy_scores = _decode("sample", table, first, temperature=0.0)
  top_1, _ = _decode("sample", table, first, temperature=1.0, top_k=1, rng=jax.random.PRNGKey(7))
  beam, beam_scores = _decode("beam", table, first, beam_size=1, alpha=0.0)
  np.testing.assert_array_equal(greedy, top_1)
  np.testing.assert_array_equal(greedy, beam)
  np.testing.assert_allclose(greedy_scores, beam_scores, rtol=1e-5)


def _sequence_score(table, first, row, seq, alpha):
  """Brute force: log-likelihood of seq (up to EOS) / T5X's length penalty."""
  log_softmax = lambda x: x - np.log(np.sum(np.exp(x)))
  score, prev, logits, length = 0.0, 0, first[row], 0
  for token in seq:
    score += log_softmax(logits)[token]
    length += 1
    if token == EOS:
      break
    prev, logits = token, table[prev, token]
  return score / ((5 + length) / 6) ** alpha


@pytest.mark.parametrize("alpha", [0.0, 0.6, 2.0])
def test_beam_scores_are_the_length_penalised_likelihoods_of_their_beams(alpha):
  table, first = _random_trigram(1, sharpness=1.0)
  table[:, :, EOS] += 1.0  # Make some beams finish early.
  tokens, scores = _decode("beam", table, first, beam_size=3, alpha=alpha)
  for row in range(2):
    expected = [_sequence_score(table, first, row, seq, alpha) for seq in np.asarray(tokens[row])]
    np.testing.assert_allclose(scores[row], expected, rtol=1e-4)
    assert list(scores[row]) == sorted(scores[row], reverse=True)
  assert np.any(np.asarray(tokens) == EOS)


def test_beam_search_finds_what_greedy_misses():
  """First token: 3 (p=.5) or 4 (p=.4). After 3 nothing is likely; after 4, EOS is (p=.9)."""
  table = np.zeros((V, V, V))
  table[:, 4, :] = -20.0
  table[:, 4, EOS] = 0.0
  first = np.log(np.array([[1e-6, 1e-6, 0.1 - 4e-6, 0.5, 0.4, 1e-6]] * 2))
  greedy, _ = _decode("sample", table, first, temperature=0.0)
  beam, scores = _decode("beam", table, first, beam_size=2, alpha=0.0)
  assert greedy[0, 0, 0] == 3
  np.testing.assert_array_equal(beam[0, 0], [4, EOS, 0, 0, 0])
  np.testing.assert_allclose(scores[0, 0], np.log(0.4), atol=1e-3)


def test_beam_search_keeps_the_best_finished_beams():
  """With as many beams as plausible first tokens (EOS, 2, 3, 4), two steps of beam search are
  exhaustive: its beams are the 4 best of all plausible sequences."""
  vocab = 8
  rng = np.random.default_rng(2)
  table = rng.normal(size=(vocab, vocab, vocab)) * 2
  implausible = [0, 5, 6, 7]
  table[:, :, implausible] -= 50
  first = rng.normal(size=(1, vocab)) * 2
  first[:, implausible] -= 50
  tokens, scores = decoding.beam_search(
      _trigram(table), jnp.asarray(first, jnp.float32), {"prev": jnp.zeros(1, jnp.int32)},
      jnp.zeros(1, jnp.int32), cache_axes=CACHE_AXES, max_new_tokens=2, beam_size=4, alpha=0.0,
      eos_id=EOS)
  candidates = {}
  for seq in itertools.product([EOS, 2, 3, 4], repeat=2):
    seq = (seq[0], 0) if seq[0] == EOS else seq
    candidates[seq] = _sequence_score(table, first, 0, seq, 0.0)
  best = sorted(candidates.items(), key=lambda item: -item[1])[:4]
  assert [tuple(s) for s in np.asarray(tokens[0])] == [seq for seq, _ in best]
  np.testing.assert_allclose(scores[0], [score for _, score in best], rtol=1e-4)


def test_sampling_is_reproducible_with_a_key_and_num_decodes_are_sorted_samples():
  table, first = _random_trigram(3, sharpness=0.5)
  a, scores = _decode("sample", table, first, temperature=1.0, num_decodes=4,
                      rng=jax.random.PRNGKey(1))
  b, _ = _decode("sample", table, first, temperature=1.0, num_decodes=4,
                 rng=jax.random.PRNGKey(1))
  c, _ = _decode("sample", table, first, temperature=1.0, num_decodes=4,
                 rng=jax.random.PRNGKey(2))
  assert a.shape == (2, 4, 5) and scores.shape == (2, 4)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  assert len({tuple(s) for s in np.asarray(a[0])}) > 1  # Samples of one prompt differ.
  assert np.all(np.diff(np.asarray(scores), axis=1) <= 0)
  for row in range(2):
    for seq, score in zip(np.asarray(a[row]), np.asarray(scores[row])):
      np.testing.assert_allclose(score, _sequence_score(table, first, row, seq, 0.0), rtol=1e-4)


def _draws(n=4000, **filters):
  probs = np.array([0.5, 0.3, 0.15, 0.05])
  logits = jnp.log(jnp.tile(jnp.asarray(probs, jnp.float32), (n, 1)))
  return set(np.asarray(decoding.sample_tokens(jax.random.PRNGKey(0), logits, **filters)).tolist())


def test_top_p_never_samples_outside_the_nucleus():
  assert _draws(temperature=1.0, top_p=0.8) == {0, 1}  # .5 + .3 reaches .8: token 2 is out.
  assert _draws(temperature=1.0, top_p=0.81) == {0, 1, 2}
  assert _draws(temperature=1.0, top_p=0.3) == {0}  # The most likely token is always allowed.
  assert _draws(temperature=1.0, top_k=2) == {0, 1}
  assert _draws(temperature=1.0) == {0, 1, 2, 3}
  # The nucleus is taken on the tempered distribution: hotter sampling widens it.
  assert _draws(temperature=2.0, top_p=0.8) == {0, 1, 2}


@pytest.mark.parametrize("change, message", [
    ({"top_p": 0.0}, "top_p must be in \\(0, 1\\]"),
    ({"top_p": 1.5}, "top_p must be in \\(0, 1\\]"),
    ({"temperature": -0.5}, "temperature must be >= 0"),
    ({"top_k": 7}, "top_k must be an int in \\[0, vocab_size=6\\]"),
    ({"max_new_tokens": 0}, "max_new_tokens must be a positive int"),
    ({"beam_size": 2, "num_decodes": 2}, "num_decodes is for sampling"),
])
def test_decoding_parameters_out_of_range_are_refused(change, message):
  with pytest.raises(ValueError, match=message):
    decoding.DecodeParams().replace(**change).validate(vocab_size=V)
  with pytest.raises(TypeError, match="Unknown decoding parameters \\['beams'\\]"):
    decoding.DecodeParams().replace(beams=2)
