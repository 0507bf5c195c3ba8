"""t5x_lite/distillation.py: the loss against the formula on fixed logits, the teacher frozen and
held once in bf16 on the mesh through the trainer, runs/distill.gin, bad input. (The train job
with runs/distill.gin is the README's figure: a student distilled vs trained from scratch.)"""
import gin
import jax
import numpy as np
import pytest

from t5x_lite import checkpoints, distillation, launch, models, optimizers, partitioning
from t5x_lite import trainer as trainer_lib

TINY = ["TransformerConfig.num_layers = 1", "TransformerConfig.d_model = 16",
        "TransformerConfig.num_heads = 2", "TransformerConfig.d_ff = 32",
        "TransformerConfig.max_length = 64"]
B, L = 8, 12


def tiny(preset, *more):
  extra = ["TransformerConfig.num_kv_heads = 1"] if preset == "llama_tiny" else []
  return models.from_gin(preset, TINY + extra + list(more))


def lm_batch(seed=0):
  r = np.random.RandomState(seed)
  targets = r.randint(2, 500, size=(B, L)).astype(np.int32)
  weights = np.ones_like(targets)
  weights[:, :3] = 0  # a prompt the loss skips
  weights[0, 8:], targets[0, 8:] = 0, 0  # a padded row
  return {"decoder_input_tokens": np.pad(targets[:, :-1], ((0, 0), (1, 0))),
          "decoder_target_tokens": targets, "decoder_loss_weights": weights}


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
  """A GPT-2 teacher's params checkpoint (random, but not the student's)."""
  teacher = tiny("gpt2_tiny")
  params = teacher.init(jax.random.PRNGKey(7), lm_batch())
  directory = str(tmp_path_factory.mktemp("teacher"))
  checkpoints.save_params(directory, params, checkpoints.model_gin(teacher))
  return directory, teacher, params


def log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_loss_is_the_formula_on_fixed_logits(teacher_dir):
  directory, teacher, teacher_params = teacher_dir
  student = tiny("llama_tiny")  # another family sharing the targets
  alpha, t = 0.3, 2.5
  model = distillation.DistillationModel(student, directory, alpha=alpha, temperature=t,
                                         teacher_dtype=None)
  batch = lm_batch()
  params = student.init(jax.random.PRNGKey(1), batch)
  loss, metrics = jax.jit(model.loss_fn)(params, batch, None, teacher_params)

  s = np.asarray(jax.jit(student.logits)(params, batch), np.float64)
  q = np.asarray(jax.jit(teacher.logits)(teacher_params, batch), np.float64)
  y, w = batch["decoder_target_tokens"], batch["decoder_loss_weights"]
  log_zs = np.log(np.exp(s - s.max(-1, keepdims=True)).sum(-1)) + s.max(-1)
  ce = -np.take_along_axis(log_softmax(s), y[..., None], -1)[..., 0]
  ce_with_z = ce + student.z_loss * log_zs ** 2
  p_t, p_s = log_softmax(q / t), log_softmax(s / t)
  kl = (np.exp(p_t) * (p_t - p_s)).sum(-1) * t * t
  expected = ((alpha * ce_with_z + (1 - alpha) * kl) * w).sum() / w.sum()
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["loss"].compute()), expected, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["kl"].compute()), (kl * w).sum() / w.sum(), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["cross_entropy"].compute()),
                             (ce * w).sum() / w.sum(), rtol=1e-5)
  assert float(metrics["loss"].count) == w.sum()  # the normaliser: target tokens

  # A student whose logits are its teacher's has KL 0 and agrees everywhere.
  same = distillation.distillation_terms(q, q, y, w, t)
  assert abs(float(same["kl"])) < 1e-6 and float(same["agreement"]) == w.sum()


def test_the_trainer_holds_the_teacher_frozen_once_in_bf16(teacher_dir):
  directory, teacher, teacher_params = teacher_dir
  model = distillation.DistillationModel(tiny("gpt2_tiny", "TransformerConfig.d_model = 8",
                                              "TransformerConfig.num_heads = 1"),
                                         directory, alpha=0.5, temperature=2.0)
  mesh = partitioning.make_mesh(data=2, fsdp=2, tensor=2)
  frozen = model.frozen_trees(mesh)
  shapes, specs = teacher.abstract_params()
  expected = partitioning.tree_shardings(shapes, specs, mesh)
  for leaf, sharding, original in zip(jax.tree.leaves(frozen["teacher"]),
                                      jax.tree.leaves(expected), jax.tree.leaves(teacher_params)):
    assert leaf.dtype == np.dtype("bfloat16") and leaf.sharding == sharding
    np.testing.assert_array_equal(np.asarray(leaf), np.asarray(original).astype(leaf.dtype))
  before = [np.asarray(x) for x in jax.tree.leaves(frozen)]
  batch = lm_batch()
  trainer = trainer_lib.Trainer(model, optimizers.create_optimizer(name="adamw"), mesh,
                                {k: v.shape for k, v in batch.items()}, frozen_trees=frozen)
  state = trainer.init_state(0)
  global_batch = partitioning.host_to_global(batch, mesh)
  losses = []
  for _ in range(4):
    state, metrics = trainer.train_step(state, global_batch)
    losses.append(float(metrics["loss"].compute()))
  assert losses[-1] < losses[0]
  assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(before, jax.tree.leaves(frozen)))
  # 1 student forward + backward (3) and 1 teacher forward.
  ratio = model.flops_per_step(trainer.batch_shapes) / model.model.flops_per_step(
      trainer.batch_shapes)
  assert 1.0 < ratio < 1.0 + teacher.flops_per_step(trainer.batch_shapes) / 3 / (
      model.model.flops_per_step(trainer.batch_shapes)) + 1e-6


def test_runs_distill_gin_builds_the_distillation_model(teacher_dir):
  directory = teacher_dir[0]
  launch.configure(["models/gpt2_tiny.gin", "runs/distill.gin"],
                   [f"TEACHER_CHECKPOINT = '{directory}'"] + TINY)
  model = gin.query_parameter("train.model").scoped_configurable_fn()
  assert isinstance(model, distillation.DistillationModel)
  assert (model.alpha, model.temperature) == (0.5, 2.0)
  assert model.teacher.config.dtype == "bfloat16" and model.config.d_model == 16


def test_bad_input_is_refused_before_any_work(teacher_dir, tmp_path):
  directory = teacher_dir[0]
  student = tiny("gpt2_tiny")
  with pytest.raises(FileNotFoundError, match="not a params checkpoint"):
    distillation.DistillationModel(student, str(tmp_path / "nowhere"))
  with pytest.raises(ValueError, match="TEACHER_CHECKPOINT"):
    distillation.DistillationModel(student, None)
  with pytest.raises(ValueError, match="vocab_size=512 but the student has 300"):
    distillation.DistillationModel(tiny("gpt2_tiny", "TransformerConfig.vocab_size = 300"),
                                   directory)
  with pytest.raises(ValueError, match="do not predict the same targets"):
    distillation.DistillationModel(tiny("t5_tiny", "TransformerConfig.vocab_size = 512"),
                                   directory)
  with pytest.raises(ValueError, match="alpha"):
    distillation.DistillationModel(student, directory, alpha=1.5)
  with pytest.raises(ValueError, match="temperature"):
    distillation.DistillationModel(student, directory, temperature=0.0)
  # A teacher trained on other ids (its run's config.gin records the vocabulary).
  with open(f"{directory}/config.gin", "w") as f:
    f.write("get_vocabulary.kind = 'sentencepiece'\n"
            f"get_vocabulary.spm_path = '{launch.GIN_CONFIGS}/vocab/stdlib_2k.model'\n")
  model = distillation.DistillationModel(student, directory)
  from t5x_lite import vocabulary  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="get_vocabulary"):
    model.check_vocabulary(vocabulary.build("byte"))
  with pytest.raises(ValueError, match="the teacher takes at most max_length=64"):
    model.check_batch({k: (B, 80) for k in lm_batch()})
