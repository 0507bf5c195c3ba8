"""Learning from preferences: DPO (and IPO, conservative DPO) and Bradley-Terry reward models.

    policy = alignment.DpoModel(models.from_gin("llama_tiny"), beta=0.1,
                                reference_checkpoint="/tmp/sft")
    trainer = Trainer(policy, optimizer, mesh, shapes, frozen_trees=policy.frozen_trees(mesh))
    rm = alignment.RewardModel(models.from_gin("t5_tiny"))

Both wrap a family model and train on preference batches from `data.preferences`: every
feature is [b, 2, l], row 0 of a pair the chosen answer and row 1 the rejected one, and one
forward pass over the [2b, l] rows scores both. Everything else (decoding, scoring, FLOPs of
the stacks) is the wrapped model's own. The loss is averaged over pairs, and
`metrics["loss"].count` is the number of pairs (which weights microbatches).

DPO (Rafailov et al. 2023) with h = [log pi(y_w) - log pi(y_l)] - [log ref(y_w) - log ref(y_l)],
sequence log-probabilities summed over the response's tokens only:
  sigmoid  -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)   (eps = label_smoothing:
           conservative DPO; eps = 0 is DPO)
  ipo      (h' - 1 / (2 beta))^2   (Azar et al. 2023, eq. 17), where h' takes each log-ratio
           averaged over its response's tokens, as TRL does (the IPO authors' normalisation,
           so that beta does not depend on response length)
The reference is a frozen tree (`frozen_trees`: the parameters of `reference_checkpoint`, the
policy's starting point; never donated or updated), or, when the policy is a `lora.LoraModel`,
the base model run on the same parameters without its adapters: no second copy of the weights.

The reward model adds a scalar head (`reward_head`: kernel [d], bias []) on the final hidden
state of the last stack: the last token of the sequence for a decoder (the one that predicts the
response's EOS), the first token for an encoder, the decoder's last token for an
encoder-decoder. Its loss is Bradley-Terry's -log sigmoid(r_chosen - r_rejected). The head
starts at zero (every reward 0, loss log 2), the rest from `INITIAL_CHECKPOINT_PATH`.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Mapping, Optional, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np

from t5x_lite import checkpoints, layers, partitioning, transformer
from t5x_lite import metrics as metrics_lib

Array = jax.Array
LOSS_TYPES = ("sigmoid", "ipo")
HEAD = "reward_head"


def _flat_shape(shape) -> tuple:
  return (shape[0] * shape[1],) + tuple(shape[2:])


def flatten_pairs(batch: Mapping[str, Any]) -> dict:
  """[b, 2, ...] features -> [2b, ...]: rows 2i (chosen) and 2i + 1 (rejected) of pair i."""
  def flat(x):
    if isinstance(x, jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct(_flat_shape(x.shape), x.dtype)
    return x.reshape(_flat_shape(x.shape))
  return {k: flat(v) for k, v in batch.items()}


class PairModel:
  """What DPO and reward models share: a family model fed preference pairs [b, 2, l]."""
  GENERATES = False

  def __init__(self, model: Any):
    if not hasattr(model, "loss_fn") or not hasattr(model, "config"):
      raise TypeError(f"{type(self).__name__} wraps a t5x_lite model (models.from_gin(...), "
                      f"or %MODEL in gin); got {model!r}.")
    if isinstance(model, PairModel):
      raise ValueError(f"{type(model).__name__} already trains on preference pairs; wrap the "
                       "family model itself.")
    self.model = model

  def __getattr__(self, name):
    # Everything that is not about pairs (config, decoding, scoring, HF classes) is the model's.
    if name.startswith("__") or name == "model":
      raise AttributeError(name)
    return getattr(self.model, name)

  def feature_converter(self, pack: bool = True):
    """Pairs are padded, not packed, whatever `pack` says."""
    from t5x_lite.data import preferences  # pylint: disable=g-import-not-at-top  # TensorFlow
    del pack
    return preferences.pair_feature_converter(self.model.config.family)

  def check_batch(self, batch) -> None:
    shapes = {k: tuple(v) if isinstance(v, tuple) else tuple(v.shape) for k, v in batch.items()}
    self.model.check_batch(shapes)
    wrong = {k: s for k, s in shapes.items() if len(s) != 3 or s[1] != 2}
    if wrong:
      raise ValueError(
          f"{type(self).__name__} trains on preference pairs: every feature [b, 2, l] (chosen, "
          f"rejected); got {wrong}. Use a preference task (e.g. MIXTURE_OR_TASK_NAME="
          "'addition_preferences') with the model's feature_converter().")

  def dummy_batch(self, batch_size: int, lengths: Mapping[str, int]) -> dict:
    flat = self.model.dummy_batch(2 * batch_size, lengths)
    return {k: v.reshape((batch_size, 2) + v.shape[1:]) for k, v in flat.items()}

  def init(self, rng, batch):
    self.check_batch(batch)
    return self.model.init(rng, flatten_pairs(batch))

  def abstract_params(self, batch=None):
    return self.model.abstract_params(None if batch is None else flatten_pairs(batch))

  def num_params(self, batch=None) -> int:
    return sum(x.size for x in jax.tree.leaves(self.abstract_params(batch)[0]))

  def stacks(self, batch_shapes):
    return self.model.stacks({k: _flat_shape(v) for k, v in batch_shapes.items()})

  def flops_per_step(self, batch_shapes) -> float:
    return self.model.flops_per_step({k: _flat_shape(v) for k, v in batch_shapes.items()})

  def activation_bytes(self, batch_shapes, tensor_shards: int = 1) -> float:
    return self.model.activation_bytes({k: (v[0] * 2,) + tuple(v[2:])
                                        for k, v in batch_shapes.items()}, tensor_shards)


def _pair_metrics(loss_per_pair, chosen, rejected, prefix: str) -> dict:
  """The loss (averaged over pairs) and the preference metrics of [b] chosen/rejected scores."""
  n = loss_per_pair.shape[0]
  mean = lambda x: metrics_lib.Average(jnp.sum(x.astype(jnp.float32)), jnp.float32(n))
  return {"loss": mean(loss_per_pair), f"{prefix}/chosen": mean(chosen),
          f"{prefix}/rejected": mean(rejected), f"{prefix}/margins": mean(chosen - rejected),
          "accuracy": mean(chosen > rejected)}  # the preference accuracy (what the loop logs)


def load_reference(model, checkpoint: str, mesh, setting: str) -> Any:
  """The parameters of the params checkpoint `checkpoint`, laid out on `mesh` as `model`'s: a
  frozen reference (DPO, RL). `setting` names the gin binding in the error message."""
  shapes, specs = model.abstract_params()
  abstract = checkpoints.abstract_with_shardings(
      shapes, partitioning.tree_shardings(shapes, specs, mesh))
  try:
    return checkpoints.load_params(checkpoint, abstract)
  except ValueError as e:
    raise ValueError(
        f"{setting}={checkpoint!r} cannot be the reference of this model: {e} The reference is "
        f"the checkpoint the policy starts from (the same model gin): set --gin.{setting} "
        "(runs/dpo.gin, runs/grpo.gin: INITIAL_CHECKPOINT_PATH) to it.") from None


# ---------------------------------------------------------------------------------------- DPO

@gin.configurable(module="t5x_lite.alignment")
class DpoModel(PairModel):
  """Direct preference optimisation of a decoder-only or encoder-decoder `model` (see the
  module docstring). `beta` > 0 scales the implicit reward; `loss_type` is "sigmoid" (DPO,
  conservative with `label_smoothing` in [0, 0.5)) or "ipo"; `reference_checkpoint` is the
  params checkpoint of the reference (runs/dpo.gin: INITIAL_CHECKPOINT_PATH), optional when
  `model` is a LoraModel (the base without adapters is the reference)."""

  def __init__(self, model: Any = gin.REQUIRED, beta: float = 0.1, loss_type: str = "sigmoid",
               label_smoothing: float = 0.0, reference_checkpoint: Optional[str] = None):
    super().__init__(model)
    if not model.GENERATES:
      raise ValueError("DPO needs a model that scores responses left to right (decoder-only or "
                       f"encoder-decoder); {type(model).__name__} does not. Train a "
                       "RewardModel on an encoder instead.")
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
      raise ValueError(f"DpoModel.beta={beta!r}: it must be a finite number > 0 (0.1 is usual; "
                       "larger keeps the policy closer to the reference).")
    if loss_type not in LOSS_TYPES:
      raise ValueError(f"DpoModel.loss_type={loss_type!r}: choose one of {LOSS_TYPES}.")
    if not 0.0 <= label_smoothing < 0.5:
      raise ValueError(f"DpoModel.label_smoothing={label_smoothing!r}: it must be in [0, 0.5) "
                       "(the assumed share of flipped preference labels).")
    self.beta, self.loss_type = float(beta), loss_type
    self.label_smoothing = float(label_smoothing)
    self.reference_checkpoint = reference_checkpoint
    # A LoraModel's base, run on the same parameters, is the model without its adapters.
    self._adapters_off = getattr(model, "base", None) if hasattr(model, "adapters") else None
    if self._adapters_off is None and not reference_checkpoint:
      raise ValueError(
          "DPO needs a reference: set DpoModel.reference_checkpoint to the params checkpoint "
          "the policy starts from (runs/dpo.gin sets it to %INITIAL_CHECKPOINT_PATH), or train "
          "LoRA adapters (runs/dpo_lora.gin), whose base without adapters is the reference.")

  def frozen_trees(self, mesh) -> dict:
    """{"reference": parameters of `reference_checkpoint` laid out on `mesh`}, or {} when the
    reference is the LoRA base (then it is the policy's own frozen parameters)."""
    if not self.reference_checkpoint:
      return {}
    return {"reference": load_reference(self._adapters_off or self.model,
                                        self.reference_checkpoint, mesh,
                                        "DpoModel.reference_checkpoint")}

  def sequence_log_probs(self, params, batch, dropout_rng=None, model=None):
    """(log p(response) [b, 2] summed over each row's loss-weighted tokens, those tokens [b, 2],
    what the layers sowed)."""
    model = model or self.model
    flat = flatten_pairs(batch)
    logits, sown = model.apply(params, flat, dropout_rng)
    targets, weights = self.model._targets(flat)  # pylint: disable=protected-access
    token = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    token = token - jax.nn.logsumexp(logits, axis=-1)
    pairs = batch[next(iter(batch))].shape[:2]
    return (jnp.sum(token * weights, axis=-1).reshape(pairs),
            jnp.sum(weights, axis=-1).astype(jnp.float32).reshape(pairs), sown)

  def losses(self, policy: Array, reference: Array, tokens: Array) -> Array:
    """The loss of each pair from [b, 2] policy and reference log-probabilities of responses
    of `tokens` [b, 2] tokens."""
    ratios = policy - reference
    if self.loss_type == "ipo":
      ratios = ratios / jnp.maximum(tokens, 1.0)
      return (ratios[:, 0] - ratios[:, 1] - 1.0 / (2.0 * self.beta)) ** 2
    h = ratios[:, 0] - ratios[:, 1]
    eps = self.label_smoothing
    return (-(1.0 - eps) * jax.nn.log_sigmoid(self.beta * h)
            - eps * jax.nn.log_sigmoid(-self.beta * h))

  def loss_fn(self, params, batch, dropout_rng: Optional[Array] = None,
              reference: Optional[Any] = None) -> tuple[Array, dict]:
    """The DPO loss of a pair batch, its metrics and every auxiliary loss the layers sowed."""
    self.check_batch(batch)
    policy, tokens, sown = self.sequence_log_probs(params, batch, dropout_rng)
    if reference is not None:
      ref = self.sequence_log_probs(reference, batch, model=self._adapters_off or self.model)[0]
    elif self._adapters_off is not None:
      ref = self.sequence_log_probs(params, batch, model=self._adapters_off)[0]
    else:
      raise ValueError("DpoModel.loss_fn needs reference= (the trainer passes the tree of "
                       "frozen_trees(mesh): Trainer(frozen_trees=model.frozen_trees(mesh))).")
    ref = jax.lax.stop_gradient(ref)
    per_pair = self.losses(policy, ref, tokens)
    rewards = self.beta * (policy - ref)
    metrics = _pair_metrics(per_pair, rewards[:, 0], rewards[:, 1], "rewards")
    metrics["logps/chosen"] = metrics_lib.Average(jnp.sum(policy[:, 0]),
                                                  jnp.float32(policy.shape[0]))
    metrics["logps/rejected"] = metrics_lib.Average(jnp.sum(policy[:, 1]),
                                                    jnp.float32(policy.shape[0]))
    return layers.add_sown(jnp.mean(per_pair), metrics, sown)

  def flops_per_step(self, batch_shapes) -> float:
    """The policy's forward and backward (3 forwards) plus the reference's forward."""
    return super().flops_per_step(batch_shapes) * 4.0 / 3.0

  def save_params(self, directory: str, params) -> str:
    """The policy, exported as the model it wraps (a plain LM checkpoint, or LoRA adapters)."""
    save = getattr(self.model, "save_params", None)
    if save:
      return save(directory, params)
    return checkpoints.save_params(directory, params, checkpoints.model_gin(self.model))


# ---------------------------------------------------------------------------- reward model

@gin.configurable(module="t5x_lite.alignment")
class RewardModel(PairModel):
  """A scalar reward on any family's final hidden state, trained with Bradley-Terry's loss
  (see the module docstring). `rewards` / `reward_texts` score (prompt, response) rows."""

  def __init__(self, model: Any = gin.REQUIRED):
    super().__init__(model)
    if hasattr(model, "adapters"):
      raise ValueError("RewardModel wraps the family model itself (LoRA adapters are not "
                       "supported here); train the head and a subset with train.trainable.")
    # The last stack's output is the hidden state read: the decoder's if there is one.
    self._stack = "decoder" if "decoder_input_tokens" in model.REQUIRED_FEATURES else "encoder"

  def _head(self, dtype=jnp.float32):
    d = self.model.config.d_model
    return {"kernel": jnp.zeros((d,), dtype), "bias": jnp.zeros((), dtype)}

  def abstract_params(self, batch=None):
    shapes, specs = super().abstract_params(batch)
    head = jax.eval_shape(functools.partial(self._head, self.model.config.param_dtype))
    return (dict(shapes, **{HEAD: head}),
            dict(specs, **{HEAD: {"kernel": jax.sharding.PartitionSpec("embed"),
                                  "bias": jax.sharding.PartitionSpec()}}))

  def init(self, rng, batch):
    return dict(super().init(rng, batch), **{HEAD: self._head(self.model.config.param_dtype)})

  def initial_params(self, directory: str, abstract_params, seed: int = 0):
    """The base parameters of a params checkpoint (an SFT or pretrained model) and a zero head,
    laid out like `abstract_params` (the train job starts from INITIAL_CHECKPOINT_PATH so)."""
    del seed  # the head starts at zero
    base_abstract = {k: v for k, v in abstract_params.items() if k != HEAD}
    base = checkpoints.load_params(directory, base_abstract)
    head = jax.tree.map(lambda a: jax.device_put(jnp.zeros(a.shape, a.dtype), a.sharding),
                        abstract_params[HEAD])
    return dict(base, **{HEAD: head})

  def rewards(self, params, flat_batch, dropout_rng: Optional[Array] = None):
    """(reward [n] of each row of a [n, l] batch, what the layers sowed)."""
    base = {k: v for k, v in params.items() if k != HEAD}
    model = self.model
    rngs = None if dropout_rng is None else {"dropout": dropout_rng}
    _, sown = model.module.apply(
        {"params": base}, *model._module_args(flat_batch), rngs=rngs,  # pylint: disable=protected-access
        deterministic=dropout_rng is None, mutable=layers.SOWN_COLLECTIONS,
        capture_intermediates=lambda module, _: isinstance(module, transformer.Stack))
    hidden = sown["intermediates"][self._stack]["__call__"][0]  # [n, l, d]
    if self._stack == "decoder":  # the last non-padding target: it predicts the response's EOS
      index = jnp.sum(flat_batch["decoder_target_tokens"] != 0, axis=-1) - 1
    else:
      index = jnp.zeros(hidden.shape[:1], jnp.int32)
    last = jnp.take_along_axis(hidden, jnp.maximum(index, 0)[:, None, None], axis=1)[:, 0]
    head = params[HEAD]
    reward = jnp.einsum("nd,d->n", last.astype(jnp.float32), head["kernel"].astype(jnp.float32))
    return reward + head["bias"].astype(jnp.float32), sown

  def loss_fn(self, params, batch, dropout_rng: Optional[Array] = None) -> tuple[Array, dict]:
    """Bradley-Terry: -log sigmoid(r_chosen - r_rejected), averaged over pairs."""
    self.check_batch(batch)
    reward, sown = self.rewards(params, flatten_pairs(batch), dropout_rng)
    reward = reward.reshape(batch[next(iter(batch))].shape[:2])
    per_pair = -jax.nn.log_sigmoid(reward[:, 0] - reward[:, 1])
    return layers.add_sown(jnp.mean(per_pair), _pair_metrics(per_pair, reward[:, 0],
                                                            reward[:, 1], "reward"), sown)

  # -- text in, rewards out -------------------------------------------------------------------
  def reward_batch(self, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                   eos_id: int) -> dict:
    """[n, l] rows laid out as data.preferences.PairFeatureConverter lays out one answer:
    prompt and response each end with EOS."""
    prompts = [list(p) + [eos_id] for p in prompts]
    responses = [list(r) + [eos_id] for r in responses]
    if self._stack == "encoder":
      rows = [p + r for p, r in zip(prompts, responses)]
      tokens = _pad(rows, self.model.config.max_length)
      return {"encoder_input_tokens": tokens, "encoder_target_tokens": tokens,
              "encoder_loss_weights": np.zeros_like(tokens)}
    if "encoder_input_tokens" in self.model.REQUIRED_FEATURES:
      targets = _pad(responses, self.model.config.max_length)
      return {"encoder_input_tokens": _pad(prompts, self.model.config.max_length),
              "decoder_target_tokens": targets,
              "decoder_input_tokens": np.pad(targets[:, :-1], ((0, 0), (1, 0))),
              "decoder_loss_weights": (targets > 0).astype(np.int32)}
    targets = _pad([p + r for p, r in zip(prompts, responses)], self.model.config.max_length)
    weights = np.zeros_like(targets)
    prompt = np.zeros_like(targets)  # BOS and the prompt, as the prefix-LM converter marks them
    for row, (p, r) in enumerate(zip(prompts, responses)):
      weights[row, len(p):len(p) + len(r)] = 1
      prompt[row, :len(p) + 1] = 1
    return {"decoder_target_tokens": targets,
            "decoder_input_tokens": np.pad(targets[:, :-1], ((0, 0), (1, 0))),
            "decoder_loss_weights": weights, "decoder_causal_attention": prompt}

  def reward_texts(self, params, prompts: Sequence[Sequence[int]],
                   responses: Sequence[Sequence[int]], eos_id: int) -> np.ndarray:
    """The reward [n] of each (prompt ids, response ids)."""
    if isinstance(prompts, str) or isinstance(responses, str) or len(prompts) != len(
        responses) or not len(prompts):
      raise ValueError("reward takes two lists of the same length, at least one item each: "
                       "prompts and their responses, e.g. reward([\"add: 1 + 1\"], [\"2\"]).")
    batch = self.reward_batch(prompts, responses, eos_id)
    n = len(prompts)  # rows padded to a power of two: similar calls share one compilation
    rows = max(8, 1 << (n - 1).bit_length())
    batch = {k: np.pad(v, ((0, rows - n), (0, 0))) for k, v in batch.items()}
    return np.asarray(self._jitted_rewards(params, batch))[:n]

  @functools.cached_property
  def _jitted_rewards(self):
    return jax.jit(lambda params, batch: self.rewards(params, batch)[0])

  def save_params(self, directory: str, params) -> str:
    return checkpoints.save_params(directory, params, self.model_gin())

  def model_gin(self) -> str:
    """The wrapped model's gin with MODEL = RewardModel(that model): `t5x_lite.load` and
    `models.from_gin` rebuild the reward model."""
    lines = checkpoints.model_gin(self.model).splitlines()
    model_line = next(i for i, line in enumerate(lines) if line.startswith("MODEL = @"))
    lines[model_line:model_line + 1] = [
        "import t5x_lite.alignment", f"REWARD_BASE = {lines[model_line][len('MODEL = '):]}",
        "MODEL = @RewardModel()", "RewardModel.model = %REWARD_BASE"]
    return "\n".join(lines) + "\n"


def _pad(rows: Sequence[Sequence[int]], max_length: int) -> np.ndarray:
  """Rows right-padded to a power of two (at least 8) so similar calls share one compilation."""
  longest = max(map(len, rows))
  if longest > max_length:
    raise ValueError(f"A prompt + response is {longest} tokens; this model takes at most "
                     f"max_length={max_length}. Shorten it.")
  width = min(max(8, 1 << (longest - 1).bit_length()), max_length)
  out = np.zeros((len(rows), width), np.int32)
  for i, ids in enumerate(rows):
    out[i, :len(ids)] = ids
  return out
