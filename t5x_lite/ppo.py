"""PPO fine-tuning of a policy on its own samples, with a learned value head (the critic).

    python -m t5x_lite.train --gin_file=/tmp/sft/model.gin --gin_file=runs/ppo.gin \
      --gin.INITIAL_CHECKPOINT_PATH="'/tmp/sft'" --gin.MODEL_DIR="'/tmp/ppo'"

The rollout is GRPO's (`t5x_lite.rl`: prompts from the task, `num_samples` responses each from
the jitted KV-cache decoder, a reward per response from the same gin-configurable reward
function or reward model); what differs is where the advantages come from. Each step
  1. recomputes, under the rollout's parameters, the responses' token log-probabilities (the
     "old" ones of the ratio), the value V_t of every response token's state, and the frozen
     reference's log-probabilities;
  2. rewards every response token with the KL penalty -kl_coef * (log pi_old - log ref) and
     adds the response's reward (the score) at its last token (InstructGPT's per-token reward:
     the critic learns the penalty too, and GAE spreads it);
  3. takes GAE advantages over the response tokens, the last one terminal:
        delta_t = r_t + gamma V_{t+1} - V_t,   A_t = delta_t + gamma lambda A_{t+1},
     returns R_t = A_t + V_t, and whitens A over the batch's response tokens;
  4. runs `updates_per_rollout` optimizer steps of the token-mean loss
        -min(rho A, clip(rho, 1 - eps, 1 + eps) A)
        + vf_coef * 0.5 max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2)
     (PPO-clip and the clipped value loss, c = value_clip).

The critic is a value head on the policy itself: a Dense d -> 1 (`value_head`: kernel [d], bias
[], zero at the start, so every value is 0) on the final hidden state of the policy's last stack,
the state whose logits choose the token. Chosen over a separate value model initialised from the
policy because one forward pass gives both the logits and the values (a second model would
double the parameters, optimizer state and forward/backward passes: what costs most on the
CPUs this runs on), as TRL's first PPO trainer did; the price is that the value loss's gradient
reaches the shared layers, which `vf_coef` (0.1) keeps small. The head is trained and saved in
the run's checkpoints (so a resumed run keeps its critic); the export is the policy alone.

Metrics (TensorBoard train/): reward/mean, reward/std, reward/failed_steps, kl (token mean of
log pi_old - log ref over the sampled tokens, the penalised estimate), clip_fraction,
value_loss, value_clip_fraction, explained_variance (1 - Var(R - V_old) / Var(R) over response
tokens), value/mean, entropy, response/length, policy_loss, loss. Validation: as GRPO's.

A reward function that raises, returns the wrong number of values or non-finite ones makes the
step's score NaN, so its advantages, returns and loss are NaN: the trainer skips the update and
counts the step (reward/failed_steps), as for GRPO.

Letters in shapes: n rollout rows, l length, d model width.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import gin
import jax
import jax.numpy as jnp
import numpy as np

from t5x_lite import checkpoints, layers, partitioning, rl, transformer
from t5x_lite import metrics as metrics_lib

Array = jax.Array
HEAD = "value_head"


def gae(rewards: Array, values: Array, mask: Array, gamma: float,
        lam: float) -> tuple[Array, Array]:
  """(advantages, returns), each [n, l], of per-token `rewards` and `values` [n, l] over each
  row's response tokens (`mask` [n, l], 1 on them, contiguous); the last is terminal (no value
  after it). Zero off the mask."""
  mask = mask.astype(jnp.float32)
  after = jnp.pad(mask[:, 1:], ((0, 0), (0, 1)))  # 1 where the next token is a response token
  next_values = jnp.pad(values[:, 1:], ((0, 0), (0, 1))) * after
  deltas = rewards + gamma * next_values - values

  def back(carry, column):  # from the last position to the first
    delta, next_is_response = column
    advantage = delta + gamma * lam * next_is_response * carry
    return advantage, advantage
  _, advantages = jax.lax.scan(back, jnp.zeros(rewards.shape[:1], jnp.float32),
                               (deltas.T, after.T), reverse=True)
  advantages = advantages.T * mask
  return advantages, (advantages + values) * mask


def whiten(x: Array, mask: Array) -> Array:
  """x normalised to mean 0, variance 1 over the masked entries (zero elsewhere)."""
  count = jnp.maximum(jnp.sum(mask), 1.0)
  mean = jnp.sum(x * mask) / count
  var = jnp.sum(jnp.square(x - mean) * mask) / count
  return (x - mean) * jax.lax.rsqrt(var + 1e-8) * mask


def explained_variance(values: Array, returns: Array, mask: Array) -> Array:
  """1 - Var(returns - values) / Var(returns) over the masked entries (1: a perfect critic,
  0: no better than a constant)."""
  count = jnp.maximum(jnp.sum(mask), 1.0)
  variance = lambda x: (jnp.sum(jnp.square(x) * mask) / count
                        - jnp.square(jnp.sum(x * mask) / count))
  return 1.0 - variance(returns - values) / jnp.maximum(variance(returns), 1e-8)


@gin.configurable(module="t5x_lite.ppo")
class PpoModel(rl.GrpoModel):
  """PPO with a value head on a decoder-only or encoder-decoder `model` (module docstring).
  Beyond GRPO's arguments: `gamma` and `lam` (GAE's discount and lambda, in [0, 1]), `vf_coef`
  (> 0, the value loss's weight), `value_clip` (> 0, how far a value may move from the
  rollout's per update) and `whiten_advantages`. `kl_coef` (>= 0) weights the per-token KL
  penalty in the reward; `num_samples` may be 1 (the critic is the baseline, not the group)."""
  ROLLOUT_FEATURES = ("advantages", "returns", "old_values", "old_log_probs")
  MIN_SAMPLES = 1

  def __init__(self, model: Any = gin.REQUIRED, reward_fn=rl.exact_match_reward,
               num_samples: int = 4, max_new_tokens: int = 8, temperature: float = 1.0,
               top_k: int = 0, clip_epsilon: float = 0.2, kl_coef: float = 0.05,
               updates_per_rollout: int = 2, reference_checkpoint: Optional[str] = None,
               gamma: float = 1.0, lam: float = 0.95, vf_coef: float = 0.1,
               value_clip: float = 0.2, whiten_advantages: bool = True):
    if hasattr(model, "adapters"):
      raise NotImplementedError("PPO with LoRA adapters is not built yet (the value head reads "
                                "the hidden state past the adapters): fine-tune the whole "
                                "model, or use runs/grpo.gin with LoRA.")
    super().__init__(model, reward_fn, num_samples, max_new_tokens, temperature, top_k,
                     clip_epsilon, kl_coef, updates_per_rollout, True, reference_checkpoint)
    for name, value, low, high in (("gamma", gamma, 0.0, 1.0), ("lam", lam, 0.0, 1.0),
                                   ("vf_coef", vf_coef, 0.0, None),
                                   ("value_clip", value_clip, 0.0, None)):
      inside = (low <= value <= high) if high is not None else value > low
      if not (isinstance(value, (int, float)) and math.isfinite(value) and inside):
        raise ValueError(f"PpoModel.{name}={value!r}: it must be a finite number "
                         f"{f'in [{low}, {high}]' if high is not None else f'> {low}'}.")
    self.gamma, self.lam, self.vf_coef = float(gamma), float(lam), float(vf_coef)
    self.value_clip, self.whiten_advantages = float(value_clip), whiten_advantages

  @property
  def trainer_class(self):
    return PpoTrainer

  def rollout_shapes(self, rows: int, width: int) -> dict:
    return {k: (rows, width) for k in self.ROLLOUT_FEATURES}

  def policy_params(self, params):
    return {k: v for k, v in params.items() if k != HEAD}

  # -- the value head's parameters --------------------------------------------------------
  def _head(self, dtype=jnp.float32):
    d = self.model.config.d_model
    return {"kernel": jnp.zeros((d,), dtype), "bias": jnp.zeros((), dtype)}

  def abstract_params(self, batch=None):
    shapes, specs = self.model.abstract_params(batch)
    head = jax.eval_shape(lambda: self._head(self.model.config.param_dtype))
    return (dict(shapes, **{HEAD: head}),
            dict(specs, **{HEAD: {"kernel": jax.sharding.PartitionSpec("embed"),
                                  "bias": jax.sharding.PartitionSpec()}}))

  def init(self, rng, batch):
    policy_batch = {k: v for k, v in batch.items() if k not in self.ROLLOUT_FEATURES}
    return dict(self.model.init(rng, policy_batch),
                **{HEAD: self._head(self.model.config.param_dtype)})

  def num_params(self, batch=None) -> int:
    return sum(x.size for x in jax.tree.leaves(self.abstract_params(batch)[0]))

  def initial_params(self, directory: str, abstract_params, seed: int = 0):
    """The policy's parameters from a params checkpoint (the SFT model) and a zero value head,
    laid out like `abstract_params` (the train job starts from INITIAL_CHECKPOINT_PATH so)."""
    del seed  # the head starts at zero
    policy = checkpoints.load_params(directory, self.policy_params(abstract_params))
    head = jax.tree.map(lambda a: jax.device_put(jnp.zeros(a.shape, a.dtype), a.sharding),
                        abstract_params[HEAD])
    return dict(policy, **{HEAD: head})

  def save_params(self, directory: str, params) -> str:
    """The policy alone, exported as the model it wraps (the value head stays behind)."""
    return super().save_params(directory, self.policy_params(params))

  # -- the objective -------------------------------------------------------------------------
  def forward(self, params, batch, dropout_rng: Optional[Array] = None):
    """(token log p of the targets [n, l], values [n, l], logits [n, l, v], what the layers
    sowed) in one pass: the value head reads the hidden state the logits come from."""
    model = self.model
    rngs = None if dropout_rng is None else {"dropout": dropout_rng}
    inputs = model._module_args(batch)  # pylint: disable=protected-access
    logits, sown = model.module.apply(
        {"params": self.policy_params(params)}, *inputs, rngs=rngs,
        deterministic=dropout_rng is None, mutable=layers.SOWN_COLLECTIONS,
        capture_intermediates=lambda module, _: isinstance(module, transformer.Stack))
    hidden = sown["intermediates"]["decoder"]["__call__"][0]  # [n, l, d]
    head = params[HEAD]
    values = jnp.einsum("nld,d->nl", hidden.astype(jnp.float32),
                        head["kernel"].astype(jnp.float32)) + head["bias"].astype(jnp.float32)
    targets, _ = model._targets(batch)  # pylint: disable=protected-access
    log_z = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
    token = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0] - log_z
    return token, values, logits, sown

  def rollout(self, params, reference, rows, scores) -> tuple[dict, dict]:
    """(old_log_probs, old_values, advantages, returns [n, l]; rollout statistics) of the
    scoring `rows` of a rollout and the scores [n] of its responses (see the module
    docstring). Pure: the trainer jits it."""
    logp, values, _, _ = self.forward(params, rows)
    ref = self.token_log_probs(reference, rows)[0]
    mask = rows["decoder_loss_weights"].astype(jnp.float32)
    width = mask.shape[1]
    last = width - 1 - jnp.argmax(mask[:, ::-1], axis=1)  # each response's last token
    at_last = jax.nn.one_hot(last, width, dtype=jnp.float32) * mask
    log_ratio = (logp - ref) * mask
    rewards = -self.kl_coef * log_ratio + jnp.where(at_last > 0, scores[:, None], 0.0)
    values = values * mask
    advantages, returns = gae(rewards, values, mask, self.gamma, self.lam)
    tokens = jnp.maximum(jnp.sum(mask), 1.0)
    stats = {"kl": jnp.sum(log_ratio) / tokens,
             "explained_variance": explained_variance(values, returns, mask),
             "value/mean": jnp.sum(values) / tokens}
    if self.whiten_advantages:
      advantages = whiten(advantages, mask)
    return {"old_log_probs": logp, "old_values": values, "advantages": advantages,
            "returns": returns}, stats

  def loss_fn(self, params, batch, dropout_rng: Optional[Array] = None,
              reference: Optional[Any] = None) -> tuple[Array, dict]:
    """The token mean of the clipped surrogate + vf_coef * the clipped value loss of a rollout
    batch, and its metrics (the KL penalty is in the rollout's rewards: `reference` unused)."""
    del reference
    self.check_batch(batch)
    logp, values, logits, sown = self.forward(params, batch, dropout_rng)
    _, weights = self.model._targets(batch)  # pylint: disable=protected-access
    weights = weights.astype(jnp.float32)
    advantages, returns = batch["advantages"], batch["returns"]
    policy, clipped = rl.clipped_surrogate(logp, batch["old_log_probs"], advantages,
                                           self.clip_epsilon)
    c, old_values = self.value_clip, batch["old_values"]
    moved = jnp.clip(values - old_values, -c, c)
    value = 0.5 * jnp.maximum(jnp.square(values - returns),
                              jnp.square(old_values + moved - returns))
    value_clipped = jnp.abs(values - old_values) > c
    return rl.token_mean_loss(policy + self.vf_coef * value, logits, weights, sown,
                              policy_loss=policy, value_loss=value, clip_fraction=clipped,
                              value_clip_fraction=value_clipped)

  def flops_per_step(self, batch_shapes) -> float:
    """Per rollout: sampling, the policy's and the reference's forwards; per update the
    policy's forward and backward."""
    forward = self.model.flops_per_step(batch_shapes) / 3.0
    return forward * (3.0 + 3.0 * self.updates_per_rollout)


class PpoTrainer(rl.RolloutTrainer):
  """GRPO's rollout trainer with PPO's rollout features: values, GAE advantages, returns."""

  def __init__(self, model: PpoModel, optimizer, mesh, batch_shapes, num_microbatches: int = 1,
               vocabulary=None, **kwargs):
    super().__init__(model, optimizer, mesh, batch_shapes, num_microbatches, vocabulary,
                     **kwargs)
    if "reference" not in self.frozen_trees:
      raise ValueError("PpoTrainer needs the reference: build it with "
                       "frozen_trees=model.frozen_trees(mesh), as train.py does.")
    rows = partitioning.batch_sharding(mesh, 2)
    self._rollout = partitioning.jit(
        model.rollout, mesh,
        in_shardings=(self.state_shardings.params,
                      jax.tree.map(lambda x: x.sharding, self.frozen_trees["reference"]),
                      self.scoring_shardings, partitioning.batch_sharding(mesh, 1)),
        out_shardings=({k: rows for k in model.ROLLOUT_FEATURES},
                       partitioning.replicated(mesh)))

  def rollout_features(self, params, rows, scores: np.ndarray) -> tuple[dict, dict]:
    scores = partitioning.host_to_global({"scores": scores.astype(np.float32)}, self.mesh)
    features, stats = self._rollout(params, self.frozen_trees["reference"], rows,
                                    scores["scores"])
    metrics = {name: metrics_lib.Average(value, jnp.float32(1.0))
               for name, value in stats.items()}
    return dict(rows, **features), metrics
