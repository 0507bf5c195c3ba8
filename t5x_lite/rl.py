"""RL fine-tuning of a policy on its own samples: GRPO (group-relative PPO-clip with a KL
penalty to a frozen reference), rewards from a Python function or a reward model.

    python -m t5x_lite.train --gin_file=/tmp/sft/model.gin --gin_file=runs/grpo.gin \
      --gin.INITIAL_CHECKPOINT_PATH="'/tmp/sft'" --gin.MODEL_DIR="'/tmp/grpo'"

Each train step takes a batch of the task's prompts (unpacked, from the model's feature
converter) and
  1. samples `num_samples` responses per prompt with the model's jitted KV-cache decoder
     (`predict_batch`, at `temperature`) from the current policy;
  2. scores them with `reward_fn(prompts, responses, targets) -> one float per response` (texts;
     `targets` are the task's reference answers: `exact_match_reward` for `addition`), or a
     reward model (`RewardModelReward`);
  3. takes each response's advantage relative to its group (the samples of the same prompt):
     A = (r - mean) / (std + 1e-4) (`scale_rewards=False`: r - mean, as Dr. GRPO);
  4. recomputes the responses' token log-probabilities under the policy (the "old" ones of the
     ratio: the sampler's own scores are not reused) and runs `updates_per_rollout` optimizer
     steps of the token-mean loss
        -min(rho A, clip(rho, 1 - eps, 1 + eps) A) + kl_coef * KL_k3(policy || reference)
     with rho = pi / pi_old per token and KL_k3 = exp(ref - logp) - (ref - logp) - 1 (Schulman's
     unbiased estimator, as the GRPO paper uses).
The reference is a frozen tree of the trainer (the params of `reference_checkpoint`, i.e. the
starting point) or, for a `lora.LoraModel` policy, its base without adapters (no second copy).

Metrics (TensorBoard train/): reward/mean, reward/std, reward/failed_steps, kl, clip_fraction,
entropy, response/length, policy_loss, loss. Validation (validation/): the policy's greedy
responses to the validation prompts: reward/mean (for the exact-match reward: exact-match
accuracy), response/length, and the teacher-forced loss of the reference answers.

A reward function that raises, returns the wrong number of values or non-finite ones makes
that step's loss NaN: the trainer skips the update (train.on_nonfinite, loop.NonFiniteGuard),
and the failure is logged with the first offending response and counted (reward/failed_steps).

The wrapper (`GrpoModel`) makes the trainer a `RolloutTrainer`: train.py builds
`model.trainer_class` when the model names one. A rollout is one step of the run (the loop,
checkpoints, resume and the non-finite guard count it once) whatever its number of updates.
Single-process only for now (the rollout gathers the prompt batch on the host).
`t5x_lite.ppo` builds PPO with a value head on the same rollout (`PpoModel(GrpoModel)`, its
`PpoTrainer(RolloutTrainer)` overriding `rollout_features`).

Letters in shapes: b prompts, g samples per prompt, n = b * g rollout rows, l length, N new
tokens.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Optional, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np

from t5x_lite import alignment, checkpoints, layers, partitioning
from t5x_lite import metrics as metrics_lib
from t5x_lite import trainer as trainer_lib

Array = jax.Array
ROLLOUT_FEATURES = ("advantages", "old_log_probs")  # float features a rollout batch adds


# ---------------------------------------------------------------------------- rewards

@gin.configurable(module="t5x_lite.rl")
def exact_match_reward(prompts: Sequence[str], responses: Sequence[str],
                       targets: Sequence[str]) -> list[float]:
  """1.0 where the response equals the task's reference answer (both stripped), else 0.0."""
  del prompts
  return [float(r.strip() == t.strip()) for r, t in zip(responses, targets)]


@gin.configurable(module="t5x_lite.rl")
class RewardModelReward:
  """The reward of a reward model's checkpoint (runs/reward_model.gin) for (prompt, response):
  `GrpoModel.reward_fn = @RewardModelReward()`, `RewardModelReward.checkpoint = '/tmp/rm'`."""

  def __init__(self, checkpoint: str = gin.REQUIRED):
    from t5x_lite import loaded_model  # pylint: disable=g-import-not-at-top
    self.checkpoint = checkpoint
    self.loaded = loaded_model.load(checkpoint)
    if not hasattr(self.loaded.model, "reward_texts"):
      raise ValueError(f"RewardModelReward.checkpoint={checkpoint!r} holds a "
                       f"{type(self.loaded.model).__name__}, not a reward model: train one with "
                       "runs/reward_model.gin.")

  def __call__(self, prompts, responses, targets) -> list[float]:
    del targets
    return self.loaded.reward(list(prompts), list(responses))


def group_advantages(rewards: np.ndarray, scale: bool = True) -> np.ndarray:
  """[b, g] rewards -> [b, g] advantages relative to each row's (group's) mean (and std)."""
  centred = rewards - rewards.mean(axis=1, keepdims=True)
  if not scale:
    return centred
  return centred / (rewards.std(axis=1, keepdims=True) + 1e-4)


def _checked_rewards(reward_fn: Callable, prompts, responses, targets) -> tuple[Any, str]:
  """(rewards [n] float64, "") or (None, what went wrong)."""
  try:
    rewards = reward_fn(prompts, responses, targets)
    rewards = np.asarray([float(r) for r in rewards], np.float64)
  except Exception as e:  # pylint: disable=broad-except  # a user's function: any error
    return None, f"raised {type(e).__name__}: {e}"
  if rewards.shape != (len(responses),):
    return None, f"returned {rewards.shape[0]} values for {len(responses)} responses"
  bad = np.flatnonzero(~np.isfinite(rewards))
  if bad.size:
    i = int(bad[0])
    return None, (f"returned {bad.size} non-finite values, e.g. {rewards[i]} for the response "
                  f"{responses[i]!r} to {prompts[i]!r}")
  return rewards, ""


# ---------------------------------------------------------------------------- the objective

def clipped_surrogate(logp: Array, old_logp: Array, advantages: Array,
                      eps: float) -> tuple[Array, Array]:
  """PPO-clip's per-token loss -min(r A, clip(r, 1 - eps, 1 + eps) A), r = exp(logp - old_logp),
  and where the clip is active."""
  ratio = jnp.exp(logp - old_logp)
  policy = -jnp.minimum(ratio * advantages, jnp.clip(ratio, 1 - eps, 1 + eps) * advantages)
  clipped = ((ratio < 1 - eps) & (advantages < 0)) | ((ratio > 1 + eps) & (advantages > 0))
  return policy, clipped


def token_mean_loss(loss: Array, logits: Array, weights: Array, sown, **terms: Array):
  """The weighted token mean of the per-token `loss` (+ the sown auxiliary losses), and its
  metrics: loss, every named per-token term, the policy's entropy and the token count."""
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
  entropy = -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)
  tokens = jnp.sum(weights)
  mean = lambda x: metrics_lib.Average(jnp.sum(x.astype(jnp.float32) * weights), tokens)
  metrics = {"loss": mean(loss), **{name: mean(term) for name, term in terms.items()},
             "entropy": mean(entropy), "num_tokens": metrics_lib.Sum(tokens)}
  return layers.add_sown(jnp.sum(loss * weights) / jnp.maximum(tokens, 1.0), metrics, sown)


@gin.configurable(module="t5x_lite.rl")
class GrpoModel:
  """GRPO on a decoder-only or encoder-decoder `model` (see the module docstring)."""
  ROLLOUT_FEATURES = ROLLOUT_FEATURES  # what train_step adds to the scoring rows
  MIN_SAMPLES = 2  # a group needs two samples to have a mean to be relative to

  def __init__(self, model: Any = gin.REQUIRED, reward_fn: Callable = exact_match_reward,
               num_samples: int = 8, max_new_tokens: int = 8, temperature: float = 1.0,
               top_k: int = 0, clip_epsilon: float = 0.2, kl_coef: float = 0.04,
               updates_per_rollout: int = 1, scale_rewards: bool = True,
               reference_checkpoint: Optional[str] = None):
    if not getattr(model, "GENERATES", False):
      raise ValueError(f"{self.objective} samples responses: it needs a decoder-only or "
                       f"encoder-decoder model; got {type(model).__name__}.")
    if not callable(reward_fn):
      raise TypeError(f"{type(self).__name__}.reward_fn must be callable (prompts, responses, "
                      f"targets) -> floats, e.g. @exact_match_reward; got {reward_fn!r}.")
    _check_positive(type(self).__name__, num_samples=(num_samples, self.MIN_SAMPLES),
                    max_new_tokens=(max_new_tokens, 1),
                    updates_per_rollout=(updates_per_rollout, 1))
    for name, value, low in (("temperature", temperature, 0.0), ("clip_epsilon", clip_epsilon,
                             0.0), ("kl_coef", kl_coef, None)):
      if not (isinstance(value, (int, float)) and math.isfinite(value)
              and (value > low if low is not None else value >= 0)):
        raise ValueError(f"{type(self).__name__}.{name}={value!r}: it must be a finite "
                         f"number {'> 0' if low is not None else '>= 0'}.")
    self.model, self.reward_fn = model, reward_fn
    self.num_samples, self.max_new_tokens = num_samples, max_new_tokens
    self.temperature, self.top_k = float(temperature), top_k
    self.clip_epsilon, self.kl_coef = float(clip_epsilon), float(kl_coef)
    self.updates_per_rollout, self.scale_rewards = updates_per_rollout, scale_rewards
    self.reference_checkpoint = reference_checkpoint
    self._adapters_off = getattr(model, "base", None) if hasattr(model, "adapters") else None
    if self._adapters_off is None and not reference_checkpoint:
      raise ValueError(f"{self.objective}'s KL penalty needs a reference: set "
                       f"{type(self).__name__}.reference_checkpoint to the params checkpoint the "
                       "policy starts from (runs/grpo.gin and runs/ppo.gin set it to "
                       "%INITIAL_CHECKPOINT_PATH), or train LoRA adapters (the base without "
                       "them is the reference).")
    model.decode_params.replace(max_new_tokens=max_new_tokens, temperature=self.temperature,
                                top_k=top_k, num_decodes=num_samples).validate(
                                    model.config.vocab_size)

  @property
  def objective(self) -> str:
    """"GRPO" (or "PPO" for the subclass): what error messages call it."""
    return type(self).__name__.removesuffix("Model").upper()

  def __getattr__(self, name):
    # Everything but the loss (config, decoding, scoring, export) is the policy's.
    if name.startswith("__") or name == "model":
      raise AttributeError(name)
    return getattr(self.model, name)

  @property
  def trainer_class(self):
    return RolloutTrainer

  def rollout_shapes(self, rows: int, width: int) -> dict:
    """The shapes of the features a rollout adds to its [rows, width] scoring rows."""
    return {"advantages": (rows,), "old_log_probs": (rows, width)}

  def policy_params(self, params):
    """The policy's own parameters within `params` (all of them: GRPO adds none)."""
    return params

  def feature_converter(self, pack: bool = True):
    """Prompts are padded, not packed, whatever `pack` says: each row is one prompt."""
    del pack
    return self.model.feature_converter(pack=False)

  def check_batch(self, batch) -> None:
    shapes = {k: tuple(v) if isinstance(v, tuple) else tuple(v.shape) for k, v in batch.items()}
    missing = [k for k in self.ROLLOUT_FEATURES if k not in shapes]
    if missing:
      raise ValueError(f"{type(self).__name__} trains on rollout batches (its trainer makes them "
                       f"from the task's prompts); this batch lacks {missing}. Build the trainer "
                       "as model.trainer_class(...), as train.py does.")
    self.model.check_batch(shapes)

  def frozen_trees(self, mesh) -> dict:
    """{"reference": the params of `reference_checkpoint` on `mesh`}, or {} for a LoRA policy
    (its base without adapters is the reference)."""
    if not self.reference_checkpoint:
      return {}
    return {"reference": alignment.load_reference(
        self._adapters_off or self.model, self.reference_checkpoint, mesh,
        f"{type(self).__name__}.reference_checkpoint")}

  def token_log_probs(self, params, batch, dropout_rng=None, model=None):
    """(log p of each target token [n, l], the logits [n, l, v], what the layers sowed)."""
    logits, sown = (model or self.model).apply(params, batch, dropout_rng)
    targets, _ = self.model._targets(batch)  # pylint: disable=protected-access
    log_z = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
    token = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0] - log_z
    return token, logits, sown

  def loss_fn(self, params, batch, dropout_rng: Optional[Array] = None,
              reference: Optional[Any] = None) -> tuple[Array, dict]:
    """The token-mean clipped surrogate + KL penalty of a rollout batch, and its metrics."""
    self.check_batch(batch)
    logp, logits, sown = self.token_log_probs(params, batch, dropout_rng)
    if reference is not None:
      ref = self.token_log_probs(reference, batch, model=self._adapters_off or self.model)[0]
    elif self._adapters_off is not None:
      ref = self.token_log_probs(params, batch, model=self._adapters_off)[0]
    else:
      raise ValueError("GrpoModel.loss_fn needs reference= (the trainer passes the tree of "
                       "frozen_trees(mesh)).")
    ref = jax.lax.stop_gradient(ref)
    _, weights = self.model._targets(batch)  # pylint: disable=protected-access
    weights = weights.astype(jnp.float32)
    advantages = batch["advantages"].astype(jnp.float32)[:, None]
    policy, clipped = clipped_surrogate(logp, batch["old_log_probs"], advantages,
                                        self.clip_epsilon)
    log_ratio = ref - logp
    kl = jnp.exp(log_ratio) - log_ratio - 1.0
    return token_mean_loss(policy + self.kl_coef * kl, logits, weights, sown,
                           policy_loss=policy, kl=kl, clip_fraction=clipped)

  def flops_per_step(self, batch_shapes) -> float:
    """Per rollout: sampling and the old log-probs (about a forward each over the rollout
    rows), then per update the policy's forward and backward and the reference's forward."""
    forward = self.model.flops_per_step(batch_shapes) / 3.0
    return forward * (2.0 + 4.0 * self.updates_per_rollout)

  def save_params(self, directory: str, params) -> str:
    """The policy, exported as the model it wraps (a plain checkpoint, or LoRA adapters)."""
    save = getattr(self.model, "save_params", None)
    if save:
      return save(directory, params)
    return checkpoints.save_params(directory, params, checkpoints.model_gin(self.model))


def _check_positive(owner: str, **counts: tuple[Any, int]) -> None:
  for name, (value, least) in counts.items():
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
      raise ValueError(f"{owner}.{name}={value!r}: it must be a whole number >= {least}.")


# ---------------------------------------------------------------------------- rollouts

class RolloutTrainer(trainer_lib.Trainer):
  """A Trainer whose `train_step` takes a batch of prompts, samples, scores and trains on the
  rollout (see the module docstring), and whose `eval_step` scores greedy responses. Its
  compiled step, `batch_shapes` and state are those of the rollout batches."""

  def __init__(self, model: GrpoModel, optimizer, mesh, batch_shapes: Mapping[str, Sequence[int]],
               num_microbatches: int = 1, vocabulary=None, **kwargs):
    if jax.process_count() > 1:
      raise NotImplementedError(f"{model.objective} runs in one process for now (the rollout "
                                "gathers the prompt batch and scores the responses on the "
                                "host): run it on one host's devices.")
    if vocabulary is None:  # the run's (gin-selected) vocabulary turns ids into texts
      from t5x_lite import data  # pylint: disable=g-import-not-at-top  # TensorFlow
      vocabulary = data.get_vocabulary()
    self.prompt_shapes = {k: tuple(v) for k, v in batch_shapes.items()}
    self.vocab, self.eos_id = vocabulary, model.model.decode_params.eos_id
    self.layout = RolloutLayout(model, self.prompt_shapes, self.eos_id)
    super().__init__(model, optimizer, mesh, self.layout.shapes, num_microbatches, **kwargs)
    policy = model.model
    self.scoring_shardings = {k: v for k, v in self.batch_shardings.items()
                              if k not in model.ROLLOUT_FEATURES}
    self._log_probs = partitioning.jit(
        lambda params, rows: model.token_log_probs(params, rows)[0], mesh,
        in_shardings=(self.state_shardings.params, self.scoring_shardings),
        out_shardings=partitioning.batch_sharding(mesh, 2))
    self._teacher_forced = jax.jit(
        lambda params, batch: policy.loss_fn(model.policy_params(params), batch)[1])

  def _texts(self, rows) -> list[str]:
    """Token rows as text, padding and EOS dropped."""
    return [self.vocab.decode([int(t) for t in ids if t not in (0, self.eos_id)])
            for ids in rows]

  def sample(self, params, batch, rng, **decode):
    """(prompt ids [b] as the policy's scoring_batch takes them, reference answer ids [b],
    responses [b * g] as (ids before EOS, whether it ended at EOS)) of a global prompt batch,
    sampled with the KV-cache decoder and `decode`'s options."""
    with partitioning.activation_sharding(self.mesh):
      tokens, _ = self.model.model.predict_batch(self.model.policy_params(params), batch,
                                                 rng=rng, **decode)
    host = jax.device_get(batch)
    prompts, targets = self.layout.prompts_and_targets(host)
    responses = [_cut(row, self.eos_id) for row in np.asarray(tokens).reshape(
        -1, tokens.shape[-1])]
    return prompts, targets, responses

  def train_step(self, state, batch):
    self._check_prompts(batch)
    model, g = self.model, self.model.num_samples
    rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), 0x5A3)
    prompts, targets, responses = self.sample(
        state.params, batch, rng, max_new_tokens=model.max_new_tokens,
        temperature=model.temperature, top_k=model.top_k, num_decodes=g)
    prompt_texts, target_texts = self._texts(prompts), self._texts(targets)
    response_texts = self._texts(r for r, _ in responses)
    rewards, problem = _checked_rewards(model.reward_fn, np.repeat(prompt_texts, g).tolist(),
                                        response_texts, np.repeat(target_texts, g).tolist())
    if rewards is None:  # NaN advantages: the trainer skips the update and counts the step
      metrics_lib.log(f"Step {int(jax.device_get(state.step)) + 1}: skipped: the reward "
                      f"function {problem}.")
    scores = np.full(len(responses), np.nan) if rewards is None else rewards
    rows = partitioning.host_to_global(
        self.layout.rows([p for p in prompts for _ in range(g)], responses), self.mesh)
    rows, rollout_metrics = self.rollout_features(state.params, rows, scores)
    history = []
    for _ in range(model.updates_per_rollout):
      state, metrics = super().train_step(state, rows)
      history.append(metrics)
    metrics = metrics_lib.merge_all(history)
    # One rollout is one step of the run (the loop, checkpoints and a resume count them so),
    # whatever number of updates it made; a step with a skipped update counts once.
    state = state.replace(step=state.step - (model.updates_per_rollout - 1))
    metrics["nonfinite"] = metrics_lib.Sum(jnp.minimum(metrics["nonfinite"].total, 1.0))
    metrics.update(_reward_metrics(rewards, responses), **rollout_metrics)
    return state, metrics

  def rollout_features(self, params, rows, scores: np.ndarray) -> tuple[dict, dict]:
    """(the scoring rows with the features the loss reads, rollout metrics) from the rewards
    [n] of the responses (NaN where the reward function failed). GRPO: group-relative
    advantages and the responses' token log-probabilities under the policy, recomputed as the
    update computes them (the sampler's own scores are not reused)."""
    g = self.model.num_samples
    advantages = group_advantages(scores.reshape(-1, g), self.model.scale_rewards).reshape(-1)
    old_log_probs = self._log_probs(params, rows)
    return dict(rows, old_log_probs=old_log_probs, **partitioning.host_to_global(
        {"advantages": advantages.astype(np.float32)}, self.mesh)), {}

  def eval_step(self, params, batch) -> dict:
    """The teacher-forced metrics of the reference answers and the reward of the greedy
    responses (reward/mean, response/length) of a prompt batch."""
    self._check_prompts(batch)
    prompts, targets, responses = self.sample(
        params, batch, jax.random.PRNGKey(0), max_new_tokens=self.model.max_new_tokens,
        temperature=0.0, num_decodes=1)
    texts = [self._texts(x) for x in (prompts, [r for r, _ in responses], targets)]
    rewards, problem = _checked_rewards(self.model.reward_fn, *texts)
    if rewards is None:
      metrics_lib.log(f"Validation: the reward function {problem}.")
    with partitioning.activation_sharding(self.mesh):
      metrics = dict(self._teacher_forced(params, batch))
    metrics.update(_reward_metrics(rewards, responses))
    return metrics

  def _check_prompts(self, batch):
    shapes = {k: tuple(v.shape) for k, v in batch.items()}
    if shapes != self.prompt_shapes:
      raise ValueError(f"Prompt batch shapes {shapes} differ from those the rollout trainer was "
                       f"built for {self.prompt_shapes}.")


def _cut(ids, eos_id: int) -> tuple[list[int], bool]:
  """(a sampled row's ids before its EOS, whether it ended at EOS)."""
  ids = [int(t) for t in ids]
  if eos_id in ids:
    return ids[:ids.index(eos_id)], True
  return ids, False


def _reward_metrics(rewards: Optional[np.ndarray], responses) -> dict:
  """reward/mean, reward/std, reward/failed_steps and response/length (tokens, EOS included)."""
  n = len(responses)
  lengths = np.asarray([len(ids) + ended for ids, ended in responses], np.float32)
  ok = rewards is not None
  values = rewards if ok else np.zeros(n)
  return {"reward/mean": metrics_lib.Average(jnp.float32(values.sum()), jnp.float32(n * ok)),
          "reward/std": metrics_lib.Average(jnp.float32(values.std()), jnp.float32(ok)),
          "reward/failed_steps": metrics_lib.Sum(jnp.float32(not ok)),
          "response/length": metrics_lib.Average(jnp.float32(lengths.sum()), jnp.float32(n))}


class RolloutLayout:
  """How prompts and sampled responses become the policy's scoring rows (its own
  `scoring_batch`), padded to fixed shapes so that one compiled step serves every rollout."""

  def __init__(self, model: GrpoModel, prompt_shapes: Mapping[str, tuple], eos_id: int):
    self.policy, self.eos_id = model.model, eos_id
    self.prompt_feature = ("encoder_input_tokens" if "encoder_input_tokens" in prompt_shapes
                           else "decoder_input_tokens")
    if self.prompt_feature == "decoder_input_tokens" and (
        "decoder_causal_attention" not in prompt_shapes):
      raise ValueError(f"{model.objective} needs prompts: a task with inputs (e.g. 'addition'), "
                       "whose prefix-LM batches mark them with decoder_causal_attention; this "
                       "task has targets only.")
    b, width = prompt_shapes[self.prompt_feature][:2]
    source = width - (self.prompt_feature == "decoder_input_tokens")  # without BOS
    n, new = b * model.num_samples, model.max_new_tokens
    try:
      dummy = self.policy.scoring_batch([[2] * source], [[2] * new], eos_id)
    except ValueError as e:
      raise ValueError(f"Prompts of {source} tokens and {type(model).__name__}.max_new_tokens="
                       f"{new} do not fit the model: {e} Lower TASK_FEATURE_LENGTHS or "
                       "max_new_tokens.") from None
    # A family whose scoring rows end every target with EOS (encoder-decoder) gets responses
    # without theirs; one that does not (decoder-only) gets the sampled EOS itself.
    self.appends_eos = int(dummy["decoder_loss_weights"].sum()) > new
    self.shapes = {k: (n, v.shape[1]) for k, v in dummy.items()}
    self.shapes.update(model.rollout_shapes(n, dummy["decoder_target_tokens"].shape[1]))

  def prompts_and_targets(self, host: Mapping[str, np.ndarray]):
    """(prompt ids as the policy's scoring_batch takes sources, reference answer ids) per row."""
    prompts, targets = [], []
    for row in range(host[self.prompt_feature].shape[0]):
      if self.prompt_feature == "decoder_input_tokens":  # BOS, then the prompt
        length = int(host["decoder_causal_attention"][row].sum())
        ids = [int(t) for t in host["decoder_input_tokens"][row, 1:length]]
      else:
        ids = [int(t) for t in host["encoder_input_tokens"][row] if t]
      weighted = host["decoder_target_tokens"][row][host["decoder_loss_weights"][row] > 0]
      prompts.append(_strip_eos(ids, self.eos_id) if self.appends_eos else ids)
      targets.append(_strip_eos([int(t) for t in weighted], self.eos_id))
    return prompts, targets

  def rows(self, prompts: Sequence[list], responses: Sequence[tuple]) -> dict:
    """The scoring rows [n, ...] of (prompt, response): loss weights on the response's tokens
    (and its EOS when it was sampled; a response cut short by max_new_tokens has none)."""
    targets = [ids if self.appends_eos or not ended else ids + [self.eos_id]
               for ids, ended in responses]
    batch = self.policy.scoring_batch(prompts, targets, self.eos_id)
    batch = {k: np.pad(v, ((0, 0), (0, self.shapes[k][1] - v.shape[1])))
             for k, v in batch.items()}
    if self.appends_eos:  # the EOS the layout appended was not sampled: no loss on it
      weights = batch["decoder_loss_weights"]
      for row, (_, ended) in enumerate(responses):
        if not ended:
          weights[row, np.flatnonzero(weights[row])[-1]] = 0
    return batch


def _strip_eos(ids: list, eos_id: int) -> list:
  return ids[:-1] if ids and ids[-1] == eos_id else ids

