"""t5x_lite/alignment.py: DPO (the published losses on fixed logits, log 2 at the reference, the
reference never changes, LoRA's base as the reference), reward models of every family, bad
input. (The train job with runs/dpo.gin is the README's demonstration: a test of it cost about
40 s of CPU, past this file's budget.)"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_lite import alignment, checkpoints, lora, models, optimizers, partitioning
from t5x_lite import trainer as trainer_lib

TINY = ["TransformerConfig.num_layers = 1", "TransformerConfig.d_model = 16",
        "TransformerConfig.num_heads = 2", "TransformerConfig.d_ff = 32",
        "TransformerConfig.max_length = 64"]
B, L = 4, 12


def tiny(preset, *more):
  extra = ["TransformerConfig.num_kv_heads = 1"] if preset == "llama_tiny" else []
  return models.from_gin(preset, TINY + extra + list(more))


def pair_batch(rng=0, prompt=6):
  """Decoder pairs [B, 2, L]: a shared prompt, then responses of different lengths."""
  r = np.random.RandomState(rng)
  targets = r.randint(2, 300, size=(B, 2, L)).astype(np.int32)
  targets[:, 1, :prompt] = targets[:, 0, :prompt]
  weights = np.zeros_like(targets)
  for i in range(B):
    for j, n in enumerate((3 + i % 3, 4)):
      weights[i, j, prompt:prompt + n] = 1
      targets[i, j, prompt + n:] = 0
  inputs = np.pad(targets[..., :-1], ((0, 0), (0, 0), (1, 0)))
  return {"decoder_input_tokens": inputs, "decoder_target_tokens": targets,
          "decoder_loss_weights": weights}


@pytest.fixture(scope="module")
def decoder():
  """(model, policy, reference, DPO of beta 0.5 around it, its jitted loss_fn): compiled once."""
  model = tiny("llama_tiny")
  policy = jax.jit(model.init)(jax.random.PRNGKey(1), alignment.flatten_pairs(pair_batch()))
  noise = jax.random.normal(jax.random.PRNGKey(2), (1,))
  reference = jax.tree.map(lambda x: x * (1.0 + 0.3 * noise[0]) + 0.01, policy)
  dpo = alignment.DpoModel(model, beta=0.5, reference_checkpoint="unused")
  return model, policy, reference, dpo, jax.jit(dpo.loss_fn)


_JITTED = {}


def _logits(model):
  return _JITTED.setdefault(id(model), jax.jit(model.logits))


def response_log_probs(model, params, batch):
  """log p(response) [B, 2], computed here in numpy from the model's logits."""
  flat = alignment.flatten_pairs(batch)
  logits = np.asarray(_logits(model)(params, flat), np.float64)
  logits = logits - logits.max(-1, keepdims=True)
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  token = np.take_along_axis(log_probs, flat["decoder_target_tokens"][..., None], -1)[..., 0]
  return (token * flat["decoder_loss_weights"]).sum(-1).reshape(B, 2)


def log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def test_dpo_losses_are_the_published_formulas_on_fixed_logits(decoder):
  model, policy, reference, dpo, loss_fn = decoder
  batch = pair_batch()
  pi, ref = response_log_probs(model, policy, batch), response_log_probs(model, reference, batch)
  h = (pi[:, 0] - pi[:, 1]) - (ref[:, 0] - ref[:, 1])
  tokens = batch["decoder_loss_weights"].sum(-1)
  beta, eps = 0.5, 0.2
  loss, metrics = loss_fn(policy, batch, None, reference)  # the whole path: logits to loss
  np.testing.assert_allclose(float(loss), (-log_sigmoid(beta * h)).mean(), rtol=2e-5)
  assert float(metrics["loss"].count) == B  # pairs weight microbatches
  rewards = beta * (pi - ref)
  np.testing.assert_allclose(float(metrics["rewards/chosen"]), rewards[:, 0].mean(), rtol=1e-4)
  np.testing.assert_allclose(float(metrics["rewards/margins"]),
                             (rewards[:, 0] - rewards[:, 1]).mean(), rtol=1e-4)
  assert float(metrics["accuracy"]) == np.mean(rewards[:, 0] > rewards[:, 1])
  assert 0.0 < float(metrics["accuracy"]) < 1.0  # both outcomes occur in this batch
  avg = (pi - ref) / tokens
  variants = {  # conservative DPO (Mitchell 2023), IPO (Azar et al. 2023, eq. 17; TRL's form)
      ("sigmoid", eps): -(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h),
      ("ipo", 0.0): (avg[:, 0] - avg[:, 1] - 1 / (2 * beta)) ** 2,
  }
  for (loss_type, smoothing), expected in variants.items():
    variant = alignment.DpoModel(model, beta=beta, loss_type=loss_type,
                                 label_smoothing=smoothing, reference_checkpoint="unused")
    np.testing.assert_allclose(np.asarray(variant.losses(jnp.asarray(pi), jnp.asarray(ref),
                                                         jnp.asarray(tokens, jnp.float32))),
                               expected, rtol=2e-5, err_msg=loss_type)


def test_dpo_loss_is_exactly_log_2_when_the_policy_is_the_reference(decoder):
  _, policy, _, _, loss_fn = decoder
  loss, metrics = loss_fn(policy, pair_batch(), None, policy)
  assert np.float32(loss) == np.float32(math.log(2))
  assert float(metrics["rewards/margins"]) == 0.0


def test_a_train_step_leaves_the_reference_bitwise_unchanged_and_moves_the_policy(decoder):
  model, _, reference, dpo, _ = decoder
  mesh = partitioning.make_mesh(data=2, fsdp=2, tensor=2)
  batch = pair_batch()
  shapes, specs = dpo.abstract_params()
  on_mesh = jax.device_put(reference, partitioning.tree_shardings(shapes, specs, mesh))
  before = jax.tree.map(np.asarray, reference)
  optimizer = optimizers.create_optimizer(
      "adamw", schedule=optimizers.create_schedule("constant", 3e-3, warmup_steps=0))
  trainer = trainer_lib.Trainer(dpo, optimizer, mesh, {k: v.shape for k, v in batch.items()},
                                frozen_trees={"reference": on_mesh})
  state = trainer.state_from_params(jax.tree.map(jnp.copy, on_mesh))
  global_batch = partitioning.host_to_global(batch, mesh)
  losses = []
  for _ in range(3):
    state, metrics = trainer.train_step(state, global_batch)
    losses.append(float(metrics["loss"]))
  assert losses[0] == pytest.approx(math.log(2), abs=1e-6) and losses[-1] < losses[0]
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, on_mesh), before)
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != b)),
                                       state.params, before))
  assert any(moved)
  del model


def test_with_lora_the_reference_is_the_base_without_adapters(decoder):
  model = decoder[0]
  dpo = alignment.DpoModel(lora.LoraModel(model, rank=2))
  batch = pair_batch()
  params = dpo.init(jax.random.PRNGKey(0), batch)

  @jax.jit
  def run(params):
    off = dpo.sequence_log_probs(params, batch, model=dpo._adapters_off)[0]  # pylint: disable=protected-access
    return dpo.loss_fn(params, batch)[0], off, dpo.sequence_log_probs(params, batch)[0]
  loss, _, _ = run(params)
  assert np.float32(loss) == np.float32(math.log(2))  # B = 0: the adapted model is the base
  base, adapters = lora.split(params)
  params = lora.join(base, jax.tree.map(lambda x: x + 0.5, adapters))  # adapters now matter
  _, off, adapted = run(params)
  np.testing.assert_allclose(np.asarray(off), response_log_probs(model, base, batch), rtol=1e-5)
  assert not np.allclose(np.asarray(adapted), np.asarray(off))
  assert dpo.frozen_trees(None) == {}  # no second copy of the weights


@pytest.mark.parametrize("kwargs, message", [
    ({"beta": 0.0}, "beta=0.0: it must be a finite number > 0"),
    ({"beta": -1.0}, "beta=-1.0"),
    ({"beta": float("nan")}, "beta=nan"),
    ({"loss_type": "hinge"}, "loss_type='hinge': choose one of"),
    ({"label_smoothing": 0.5}, r"label_smoothing=0.5: it must be in \[0, 0.5\)"),
    ({"reference_checkpoint": None}, "DPO needs a reference: set DpoModel.reference_checkpoint"),
])
def test_bad_dpo_settings_are_refused_with_the_fix(decoder, kwargs, message):
  kwargs = {"reference_checkpoint": "/ckpt", **kwargs}
  with pytest.raises(ValueError, match=message):
    alignment.DpoModel(decoder[0], **kwargs)


def test_bad_dpo_inputs_are_refused_with_the_fix(decoder, tmp_path):
  with pytest.raises(ValueError, match="Train a RewardModel on an encoder instead"):
    alignment.DpoModel(tiny("bert_tiny"), reference_checkpoint="/ckpt")
  model = decoder[0]
  dpo = alignment.DpoModel(model, reference_checkpoint=str(tmp_path))
  flat = alignment.flatten_pairs(pair_batch())
  with pytest.raises(ValueError, match=r"preference pairs: every feature \[b, 2, l\]"):
    dpo.loss_fn(decoder[1], flat, reference=decoder[1])
  other = tiny("llama_tiny", "TransformerConfig.d_model = 32")
  zeros = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), other.abstract_params()[0])
  checkpoints.save_params(str(tmp_path), zeros, checkpoints.model_gin(other))
  with pytest.raises(ValueError, match="cannot be the reference of this model: .*shapes differ"
                     ".*set --gin.DpoModel.reference_checkpoint"):
    dpo.frozen_trees(partitioning.make_mesh())


# ---------------------------------------------------------------------------- reward models

def family_pairs(model, rng=0):
  """Random pairs of any family's features, [B, 2, l], padding at the end of each row."""
  r = np.random.RandomState(rng)
  batch = {}
  for name in model.REQUIRED_FEATURES:
    batch[name] = r.randint(2, 300, size=(B, 2, L)).astype(np.int32)
    batch[name][:, :, L - 3:] = 0
    if name.endswith("loss_weights"):
      batch[name] = (batch[name] > 0).astype(np.int32)
  return batch


# The encoder-decoder reads its decoder's last token as the decoder does (the same code).
@pytest.mark.parametrize("preset", ["gpt2_tiny", "bert_tiny"])
def test_reward_models_of_every_family_give_bradley_terry(preset):
  rm = alignment.RewardModel(tiny(preset))
  batch = family_pairs(rm.model)
  params = rm.init(jax.random.PRNGKey(0), batch)
  assert not params["reward_head"]["kernel"].any()  # a fresh head: every reward 0, loss log 2
  params["reward_head"]["kernel"] = jax.random.normal(jax.random.PRNGKey(1), (16,))
  loss, metrics, rewards = jax.jit(lambda p, b: rm.loss_fn(p, b) + (
      rm.rewards(p, alignment.flatten_pairs(b))[0],))(params, batch)
  rewards = np.asarray(rewards).reshape(B, 2)
  np.testing.assert_allclose(float(loss), (-log_sigmoid(rewards[:, 0] - rewards[:, 1])).mean(),
                             rtol=1e-5)
  assert float(metrics["accuracy"]) == np.mean(rewards[:, 0] > rewards[:, 1])
  np.testing.assert_allclose(float(metrics["reward/margins"]),
                             (rewards[:, 0] - rewards[:, 1]).mean(), rtol=1e-4, atol=1e-6)


def test_reward_reads_the_last_token_and_loads_from_its_export(tmp_path):
  import t5x_lite  # pylint: disable=g-import-not-at-top
  rm = alignment.RewardModel(tiny("gpt2_tiny"))
  params = rm.init(jax.random.PRNGKey(0), family_pairs(rm.model))
  params["reward_head"]["kernel"] = jax.random.normal(jax.random.PRNGKey(1), (16,))
  prompts, responses = [[40, 41, 42], [50]], [[60, 61], [70, 71, 72, 73]]
  rewards = rm.reward_texts(params, prompts, responses, eos_id=1)
  alone = rm.reward_texts(params, prompts[1:], responses[1:], eos_id=1)  # other padding
  np.testing.assert_allclose(rewards[1], alone[0], rtol=1e-5)
  changed = rm.reward_texts(params, prompts, [[60, 62], [70, 71, 72, 73]], eos_id=1)
  assert changed[0] != rewards[0] and changed[1] == pytest.approx(rewards[1], rel=1e-5)
  rm.save_params(str(tmp_path), params)
  loaded = t5x_lite.load(str(tmp_path))
  assert loaded.model.num_params() == rm.num_params()  # its model.gin spells dtypes as strings
  texts = loaded.reward(["add: 1 + 2", "add: 3"], ["3", "4"])
  ids = [list(loaded.vocabulary.encode(t)) for t in ("add: 1 + 2", "add: 3", "3", "4")]
  np.testing.assert_allclose(texts, rm.reward_texts(params, ids[:2], ids[2:], 1), rtol=1e-5)
  with pytest.raises(ValueError, match="reward takes two lists of the same length"):
    loaded.reward(["a"], ["b", "c"])
