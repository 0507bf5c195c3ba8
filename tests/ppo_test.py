"""t5x_lite/ppo.py: GAE against a naive loop, the loss against the formula, the reward rising
on a tiny policy with a learned value head (fixed seeds), a failing reward function skipping its
step, bad input. (The train job with runs/ppo.gin on `addition` is the README's demonstration.)"""
import gin
import jax
import numpy as np
import pytest

from t5x_lite import checkpoints, launch, models, optimizers, partitioning, ppo, rl, vocabulary

TINY = ["TransformerConfig.num_layers = 1", "TransformerConfig.d_model = 32",
        "TransformerConfig.num_heads = 2", "TransformerConfig.d_ff = 64",
        "TransformerConfig.max_length = 64"]
PROMPTS, SAMPLES, NEW = 8, 2, 6
VOCAB = vocabulary.build("byte")


def naive_gae(rewards, values, mask, gamma, lam):
  """GAE row by row over the response positions, as the papers write it."""
  advantages, returns = np.zeros_like(rewards), np.zeros_like(rewards)
  for row in range(rewards.shape[0]):
    positions = np.flatnonzero(mask[row])
    running = 0.0
    for i in reversed(range(len(positions))):
      t = positions[i]
      next_value = values[row, positions[i + 1]] if i + 1 < len(positions) else 0.0
      delta = rewards[row, t] + gamma * next_value - values[row, t]
      running = delta + gamma * lam * running
      advantages[row, t] = running
      returns[row, t] = running + values[row, t]
  return advantages, returns


def test_gae_equals_the_naive_loop():
  r = np.random.RandomState(0)
  n, l = 6, 12
  mask = np.zeros((n, l), np.float32)
  for row in range(n):  # a prompt, then a response of 1 to 7 tokens, then padding
    start = r.randint(1, 5)
    mask[row, start:start + r.randint(1, 8)] = 1
  rewards = r.randn(n, l).astype(np.float32) * mask
  values = r.randn(n, l).astype(np.float32) * mask
  gae = jax.jit(ppo.gae, static_argnums=(3, 4))
  for gamma, lam in ((1.0, 0.95), (0.9, 0.5), (1.0, 1.0), (0.99, 0.0)):
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    expected = naive_gae(rewards.astype(np.float64), values.astype(np.float64), mask, gamma, lam)
    np.testing.assert_allclose(advantages, expected[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(returns, expected[1], rtol=1e-5, atol=1e-6)
  # lambda = 1, gamma = 1: the advantage is the return-to-go minus the value.
  advantages, _ = gae(rewards, values, mask, 1.0, 1.0)
  to_go = np.cumsum(rewards[:, ::-1], axis=1)[:, ::-1] * mask
  np.testing.assert_allclose(advantages, to_go - values, rtol=1e-5, atol=1e-5)
  whitened = np.asarray(ppo.whiten(advantages, mask))
  assert abs(whitened[mask > 0].mean()) < 1e-5 and abs(whitened[mask > 0].std() - 1) < 1e-3
  assert float(ppo.explained_variance(values, values, mask)) == 1.0


def digits(prompts, responses, targets):
  """A dense reward a random policy can climb: the share of digits in the response."""
  del prompts, targets
  return [sum(c.isdigit() for c in r) / max(len(r), 1) for r in responses]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """(PPO model, its trainer, starting params, prompt batch on the mesh)."""
  model = models.from_gin("gpt2_tiny", TINY)
  pairs = np.random.RandomState(0).randint(0, 100, (PROMPTS, 2))
  batch = model.scoring_batch([VOCAB.encode(f"add: {a} + {b}") + [1] for a, b in pairs],
                              [VOCAB.encode(str(a + b)) + [1] for a, b in pairs], 1,
                              round_width=lambda _: 24)
  start = str(tmp_path_factory.mktemp("policy"))
  checkpoints.save_params(start, model.init(jax.random.PRNGKey(0), batch),
                          checkpoints.model_gin(model))
  policy = ppo.PpoModel(model, reward_fn=digits, num_samples=SAMPLES, max_new_tokens=NEW,
                        kl_coef=0.02, vf_coef=0.5, reference_checkpoint=start)
  mesh = partitioning.make_mesh(data=2, fsdp=2, tensor=2)
  optimizer = optimizers.create_optimizer(name="adamw", schedule=optimizers.create_schedule(
      kind="constant", peak_value=3e-3, warmup_steps=0))
  trainer = policy.trainer_class(policy, optimizer, mesh, {k: v.shape for k, v in batch.items()},
                                 vocabulary=VOCAB, frozen_trees=policy.frozen_trees(mesh))
  params = policy.initial_params(start, trainer.abstract_state.params)
  return policy, trainer, params, partitioning.host_to_global(batch, mesh)


def test_loss_is_the_clipped_surrogate_plus_the_clipped_value_loss(setup):
  policy, trainer, params, _ = setup
  r = np.random.RandomState(1)
  rows = trainer.layout.rows([VOCAB.encode("add: 1 + 2") + [1]] * (PROMPTS * SAMPLES),
                             [(list(r.randint(3, 200, r.randint(1, NEW))), bool(i % 2))
                              for i in range(PROMPTS * SAMPLES)])
  params = dict(params, value_head={"kernel": r.randn(32).astype(np.float32) * 0.1,
                                    "bias": np.float32(0.3)})
  logp, values, _, _ = jax.jit(policy.forward)(params, rows)
  logp, values = np.asarray(logp, np.float64), np.asarray(values, np.float64)
  w = rows["decoder_loss_weights"].astype(np.float64)
  old = logp + 0.3 * r.randn(*logp.shape)  # ratios inside and outside [0.8, 1.2]
  old_values = values + 0.4 * r.randn(*values.shape)  # moves inside and outside 0.2
  adv, ret = r.randn(*logp.shape), r.randn(*logp.shape)
  f32 = lambda x: x.astype(np.float32)
  batch = dict(rows, old_log_probs=f32(old), old_values=f32(old_values), advantages=f32(adv),
               returns=f32(ret))
  loss, metrics = jax.jit(policy.loss_fn)(params, batch)

  ratio = np.exp(logp - f32(old))
  surrogate = -np.minimum(ratio * adv, np.clip(ratio, 0.8, 1.2) * adv)
  clipped_values = f32(old_values) + np.clip(values - f32(old_values), -0.2, 0.2)
  value_loss = 0.5 * np.maximum((values - ret) ** 2, (clipped_values - ret) ** 2)
  mean = lambda x: (x * w).sum() / w.sum()
  np.testing.assert_allclose(float(loss), mean(surrogate + 0.5 * value_loss), rtol=2e-4)
  np.testing.assert_allclose(float(metrics["value_loss"].compute()), mean(value_loss), rtol=2e-4)
  assert 0 < float(metrics["clip_fraction"].compute()) < 1
  assert 0 < float(metrics["value_clip_fraction"].compute()) < 1


def test_reward_rises_and_a_failing_reward_skips_the_step(setup, tmp_path):
  policy, trainer, params, batch = setup
  frozen = [np.asarray(x) for x in jax.tree.leaves(trainer.frozen_trees)]
  state = trainer.state_from_params(params, seed=0)
  before = float(trainer.eval_step(state.params, batch)["reward/mean"].compute())
  rewards, history = [], []
  for _ in range(12):
    state, metrics = trainer.train_step(state, batch)
    rewards.append(float(metrics["reward/mean"].compute()))
    history.append({k: float(metrics[k].compute()) for k in (
        "kl", "explained_variance", "value_loss", "clip_fraction", "value/mean")})
  after = float(trainer.eval_step(state.params, batch)["reward/mean"].compute())
  assert after > before + 0.3, (before, after, rewards)
  assert np.mean(rewards[-3:]) > 2 * np.mean(rewards[:3]), rewards  # sampled, at T = 1
  assert abs(history[0]["kl"]) < 1e-6 and history[0]["value/mean"] == 0.0  # ref, zero head
  assert history[-1]["value/mean"] > 0.05, history  # the critic learnt the rewards' scale
  assert any(h["clip_fraction"] > 0 for h in history)  # the second update of a rollout clips
  assert all(np.array_equal(a, np.asarray(b))
             for a, b in zip(frozen, jax.tree.leaves(trainer.frozen_trees)))

  for broken in (lambda *_: 1 / 0, lambda p, r, t: [float("nan")] * len(r)):
    policy.reward_fn = broken
    kept = [np.asarray(x) for x in jax.tree.leaves(state.params)]
    step = int(state.step)
    state, metrics = trainer.train_step(state, batch)
    assert float(metrics["nonfinite"].compute()) == 1.0  # one step skipped (both its updates)
    assert int(state.step) == step + 1  # a rollout is one step, whatever its updates
    assert float(metrics["reward/failed_steps"].compute()) == 1.0
    assert all(np.array_equal(a, np.asarray(b))
               for a, b in zip(kept, jax.tree.leaves(state.params)))
  policy.reward_fn = digits

  policy.save_params(str(tmp_path), state.params)  # the export: the policy, no value head
  assert sorted(checkpoints.load_params(str(tmp_path))) == sorted(
      k for k in state.params if k != ppo.HEAD)


def test_bad_input_is_refused(tmp_path):
  model = models.from_gin("gpt2_tiny", TINY)
  ok = dict(reference_checkpoint="/ckpt")
  cases = [(dict(gamma=1.5), "gamma"), (dict(lam=-0.1), "lam"), (dict(vf_coef=0.0), "vf_coef"),
           (dict(value_clip=float("nan")), "value_clip"), (dict(kl_coef=-0.1), "kl_coef"),
           (dict(num_samples=0), "num_samples=0"), (dict(reference_checkpoint=None), "reference")]
  for kwargs, message in cases:
    with pytest.raises(ValueError, match=message):
      ppo.PpoModel(model, **{**ok, **kwargs})
  assert ppo.PpoModel(model, num_samples=1, **ok).num_samples == 1  # the critic is the baseline
  with pytest.raises(ValueError, match="rollout batches"):
    ppo.PpoModel(model, **ok).check_batch(
        {k: (8, 16) for k in model.REQUIRED_FEATURES + ("advantages", "old_log_probs")})
  # runs/ppo.gin builds the PPO model around the model gin's model.
  launch.configure(["models/gpt2_tiny.gin", "runs/ppo.gin"],
                   [f"INITIAL_CHECKPOINT_PATH = '{tmp_path}'"] + TINY)
  built = gin.query_parameter("train.model").scoped_configurable_fn()
  assert isinstance(built, ppo.PpoModel) and built.reward_fn is rl.exact_match_reward
  assert built.reference_checkpoint == str(tmp_path) and built.trainer_class is ppo.PpoTrainer
