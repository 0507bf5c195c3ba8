"""t5x_lite/rl.py: GRPO's loss against the formula, the reward rising on a tiny policy (fixed
seeds), a failing reward function skipping its step, rollout rows of both generating families,
bad input. (The train job with runs/grpo.gin on `addition` is the README's demonstration.)"""
import gin
import jax
import numpy as np
import pytest

from t5x_lite import checkpoints, launch, models, optimizers, partitioning, rl, vocabulary

TINY = ["TransformerConfig.num_layers = 1", "TransformerConfig.d_model = 32",
        "TransformerConfig.num_heads = 2", "TransformerConfig.d_ff = 64",
        "TransformerConfig.max_length = 64"]
PROMPTS, SAMPLES, NEW = 8, 4, 6
VOCAB = vocabulary.build("byte")


def digits(prompts, responses, targets):
  """A dense reward a random policy can climb: the share of digits in the response."""
  del prompts, targets
  return [sum(c.isdigit() for c in r) / max(len(r), 1) for r in responses]


def prompt_batch(model):
  """`addition`-like prompts as the prefix-LM converter lays them out (BOS, prompt + EOS,
  answer + EOS; the answer weighted)."""
  r = np.random.RandomState(0)
  pairs = r.randint(0, 100, (PROMPTS, 2))
  sources = [VOCAB.encode(f"add: {a} + {b}") + [1] for a, b in pairs]
  targets = [VOCAB.encode(str(a + b)) + [1] for a, b in pairs]
  return model.scoring_batch(sources, targets, 1, round_width=lambda _: 24)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """(GRPO model, rollout trainer, starting params, prompt batch on the mesh)."""
  model = models.from_gin("gpt2_tiny", TINY)
  batch = prompt_batch(model)
  params = model.init(jax.random.PRNGKey(0), batch)
  start = str(tmp_path_factory.mktemp("policy"))
  checkpoints.save_params(start, params, checkpoints.model_gin(model))
  grpo = rl.GrpoModel(model, reward_fn=digits, num_samples=SAMPLES, max_new_tokens=NEW,
                      kl_coef=0.02, reference_checkpoint=start)
  mesh = partitioning.make_mesh(data=2, fsdp=2, tensor=2)
  optimizer = optimizers.create_optimizer(name="adamw", schedule=optimizers.create_schedule(
      kind="constant", peak_value=3e-3, warmup_steps=0))
  trainer = grpo.trainer_class(grpo, optimizer, mesh, {k: v.shape for k, v in batch.items()},
                               vocabulary=VOCAB, frozen_trees=grpo.frozen_trees(mesh))
  return grpo, trainer, params, partitioning.host_to_global(batch, mesh)


def log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_loss_is_the_clipped_surrogate_with_the_k3_kl(setup):
  grpo, trainer, params, _ = setup
  policy = grpo.model
  r = np.random.RandomState(1)
  prompts = [VOCAB.encode("add: 1 + 2") + [1]] * (PROMPTS * SAMPLES)
  responses = [(list(r.randint(3, 200, r.randint(1, NEW))), bool(i % 2))
               for i in range(PROMPTS * SAMPLES)]
  rows = trainer.layout.rows(prompts, responses)
  reference = jax.tree.map(lambda x: x + 0.05 * np.float32(r.randn()), params)
  logits = jax.jit(policy.logits)
  lp, lr = (log_softmax(np.asarray(logits(p, rows), np.float64)) for p in (params, reference))
  y, w = rows["decoder_target_tokens"], rows["decoder_loss_weights"].astype(np.float64)
  logp = np.take_along_axis(lp, y[..., None], -1)[..., 0]
  ref = np.take_along_axis(lr, y[..., None], -1)[..., 0]
  old = logp + 0.3 * r.randn(*logp.shape)  # ratios inside and outside [0.8, 1.2]
  adv = r.randn(y.shape[0])
  batch = dict(rows, old_log_probs=old.astype(np.float32), advantages=adv.astype(np.float32))
  loss, metrics = jax.jit(grpo.loss_fn)(params, batch, None, reference)

  ratio, a = np.exp(logp - batch["old_log_probs"]), adv[:, None]
  surrogate = -np.minimum(ratio * a, np.clip(ratio, 0.8, 1.2) * a)
  kl = np.exp(ref - logp) - (ref - logp) - 1
  mean = lambda x: (x * w).sum() / w.sum()
  np.testing.assert_allclose(float(loss), mean(surrogate + 0.02 * kl), rtol=2e-4, atol=1e-6)
  np.testing.assert_allclose(float(metrics["kl"].compute()), mean(kl), rtol=2e-4)
  clipped = ((ratio < 0.8) & (a < 0)) | ((ratio > 1.2) & (a > 0))
  np.testing.assert_allclose(float(metrics["clip_fraction"].compute()), mean(clipped), rtol=1e-5)
  assert 0 < float(metrics["clip_fraction"].compute()) < 1
  entropy = -(np.exp(lp) * lp).sum(-1)
  np.testing.assert_allclose(float(metrics["entropy"].compute()), mean(entropy), rtol=1e-4)
  assert float(metrics["loss"].count) == w.sum()


def test_reward_rises_and_the_reference_stays(setup):
  grpo, trainer, params, batch = setup
  frozen = [np.asarray(x) for x in jax.tree.leaves(trainer.frozen_trees)]
  state = trainer.state_from_params(params, seed=0)
  before = float(trainer.eval_step(state.params, batch)["reward/mean"].compute())
  rewards, kls = [], []
  for _ in range(16):
    state, metrics = trainer.train_step(state, batch)
    rewards.append(float(metrics["reward/mean"].compute()))
    kls.append(float(metrics["kl"].compute()))
  after = trainer.eval_step(state.params, batch)
  assert float(after["reward/mean"].compute()) > before + 0.3, (before, after)
  assert np.mean(rewards[-4:]) > 2 * np.mean(rewards[:4]), rewards  # sampled, at T = 1
  assert kls[0] == 0.0 and kls[-1] > 0.0  # the policy starts at the reference, then leaves it
  assert float(metrics["response/length"].compute()) <= NEW
  assert all(np.array_equal(a, np.asarray(b))
             for a, b in zip(frozen, jax.tree.leaves(trainer.frozen_trees)))

  # A reward function that raises, or returns NaN: the step is skipped and counted.
  for broken in (lambda *_: 1 / 0, lambda p, r, t: [float("nan")] * len(r)):
    grpo.reward_fn = broken
    kept = [np.asarray(x) for x in jax.tree.leaves(state.params)]
    step = int(state.step)
    state, metrics = trainer.train_step(state, batch)
    assert int(state.step) == step + 1
    assert float(metrics["nonfinite"].compute()) == 1.0
    assert float(metrics["reward/failed_steps"].compute()) == 1.0
    assert all(np.array_equal(a, np.asarray(b))
               for a, b in zip(kept, jax.tree.leaves(state.params)))
  grpo.reward_fn = digits


def test_rollout_rows_weight_what_was_sampled():
  eos = 1
  for preset in ("gpt2_tiny", "t5_tiny"):
    model = models.from_gin(preset, TINY + ["TransformerConfig.vocab_size = 512"])
    grpo = rl.GrpoModel(model, num_samples=2, max_new_tokens=4, reference_checkpoint="unused")
    batch = prompt_batch(model) if preset == "gpt2_tiny" else model.scoring_batch(
        [VOCAB.encode("add: 1 + 2")] * PROMPTS, [VOCAB.encode("3")] * PROMPTS, eos)
    layout = rl.RolloutLayout(grpo, {k: v.shape for k, v in batch.items()}, eos)
    prompts, targets = layout.prompts_and_targets(batch)
    assert VOCAB.decode([t for t in prompts[0] if t != eos]).startswith("add: ")
    assert all(eos not in t for t in targets)
    rows = layout.rows(prompts[:2] * 2, [([5, 6], True), ([5, 6, 7, 8], False)] * 2)
    assert {k: v.shape[1] for k, v in rows.items()} == {  # the compiled step's widths
        k: v[1] for k, v in layout.shapes.items() if k not in rl.ROLLOUT_FEATURES}
    weights = rows["decoder_loss_weights"]
    assert weights[0].sum() == 3 and weights[1].sum() == 4  # [5, 6, EOS] and [5, 6, 7, 8]
    ended = rows["decoder_target_tokens"][0][weights[0] > 0]
    np.testing.assert_array_equal(ended, [5, 6, eos])


def test_rewards_and_advantages():
  assert rl.exact_match_reward(["1 + 2"] * 3, ["3", " 3 ", "4"], ["3"] * 3) == [1.0, 1.0, 0.0]
  rewards = np.array([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5]])
  advantages = rl.group_advantages(rewards)
  np.testing.assert_allclose(advantages[0], [1, -1, -1, 1], rtol=1e-3)
  np.testing.assert_array_equal(advantages[1], 0.0)  # one reward for the whole group: no signal
  np.testing.assert_allclose(rl.group_advantages(rewards, scale=False)[0], [.5, -.5, -.5, .5])


def test_bad_input_is_refused(tmp_path):
  model = models.from_gin("gpt2_tiny", TINY)
  ok = dict(reference_checkpoint="/ckpt")
  cases = [(dict(num_samples=1), "num_samples=1"), (dict(temperature=0.0), "temperature"),
           (dict(kl_coef=-1.0), "kl_coef"), (dict(reward_fn="exact"), "callable"),
           (dict(reference_checkpoint=None), "needs a reference"),
           (dict(top_k=10_000), "top_k")]
  for kwargs, message in cases:
    with pytest.raises((ValueError, TypeError), match=message):
      rl.GrpoModel(model, **{**ok, **kwargs})
  with pytest.raises(ValueError, match="decoder-only or encoder-decoder"):
    rl.GrpoModel(models.from_gin("bert_tiny", TINY), **ok)
  grpo = rl.GrpoModel(model, **ok)
  with pytest.raises(ValueError, match="needs prompts"):  # a CLM task: targets only
    rl.RolloutLayout(grpo, {k: (8, 16) for k in model.REQUIRED_FEATURES}, 1)
  with pytest.raises(ValueError, match="do not fit the model"):
    rl.RolloutLayout(grpo, dict.fromkeys(("decoder_input_tokens", "decoder_causal_attention"),
                                         (8, 60)), 1)
  with pytest.raises(ValueError, match="rollout batches"):
    grpo.check_batch({k: (8, 16) for k in model.REQUIRED_FEATURES})
  # runs/grpo.gin builds the GRPO model around the model gin's model.
  launch.configure(["models/gpt2_tiny.gin", "runs/grpo.gin"],
                   [f"INITIAL_CHECKPOINT_PATH = '{tmp_path}'"] + TINY)
  built = gin.query_parameter("train.model").scoped_configurable_fn()
  assert isinstance(built, rl.GrpoModel) and built.reward_fn is rl.exact_match_reward
  assert built.reference_checkpoint == str(tmp_path) and built.num_samples == 8
