"""Knowledge distillation: a student learns from a frozen teacher's soft targets.

    student = models.from_gin("gpt2_tiny", ["TransformerConfig.d_model = 48"])
    model = distillation.DistillationModel(student, teacher_checkpoint="/tmp/teacher",
                                           alpha=0.5, temperature=2.0)
    trainer = Trainer(model, optimizer, mesh, shapes, frozen_trees=model.frozen_trees(mesh))

The loss over the batch's target tokens (those the student's own loss weights) is

    alpha * CE(y, student) + (1 - alpha) * T^2 * KL(teacher_T || student_T)

where `_T` is the softmax of the logits divided by the temperature T (Hinton et al. 2015; T^2
keeps the soft term's gradients the size of the hard term's whatever T is), and CE is the
student's own loss (its z-loss and label smoothing included). Both terms are token means, so
`metrics["loss"].count` is the number of target tokens (which weights microbatches).

The teacher is a params checkpoint (params/ + model.gin: any finished run's MODEL_DIR or a
converted model) of any preset whose model reads the same batch features as the student's: a
GPT-2 teacher for a LLaMA student, a Mixtral for a GPT-2, T5 for T5, BERT for BERT. Its logits
must be over the same vocabulary (same size, and the same ids where the checkpoint records its
vocabulary). It is a frozen tree of the trainer (`frozen_trees`): laid out once on the mesh by
its own logical axes, in `teacher_dtype` (bfloat16 by default: half the memory, bf16 compute),
never donated, never updated. The export is the student alone, as a plain params checkpoint.
"""
from __future__ import annotations

import math
import os
from typing import Any, Mapping, Optional

import gin
import jax
import jax.numpy as jnp

from t5x_lite import checkpoints, layers, losses, models, partitioning
from t5x_lite import metrics as metrics_lib

Array = jax.Array
TEACHER = "teacher"  # the frozen tree's name: loss_fn's keyword argument


def distillation_terms(student_logits: Array, teacher_logits: Array, targets: Array,
                       weights: Array, temperature: float) -> dict[str, Array]:
  """Per-token sums over weighted tokens: "kl" (T^2 * KL(teacher_T || student_T)),
  "teacher_cross_entropy" (the teacher's own CE on the targets) and "agreement" (the student's
  top token is the teacher's). Logits [b, l, v]; targets, weights [b, l]."""
  weights = weights.astype(jnp.float32)
  student = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature)
  teacher = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature)
  kl = jnp.sum(jnp.exp(teacher) * (teacher - student), axis=-1) * temperature ** 2
  teacher_log_probs = jax.nn.log_softmax(teacher_logits.astype(jnp.float32))
  teacher_ce = -jnp.take_along_axis(teacher_log_probs, targets[..., None], axis=-1)[..., 0]
  # argmax of logits / T is argmax of logits: compare the top tokens without a variadic argmax.
  student_top = student >= jnp.max(student, axis=-1, keepdims=True)
  teacher_top = jnp.argmax(teacher_logits, axis=-1)
  agree = jnp.take_along_axis(student_top, teacher_top[..., None], axis=-1)[..., 0]
  return {"kl": jnp.sum(kl * weights), "teacher_cross_entropy": jnp.sum(teacher_ce * weights),
          "agreement": jnp.sum(agree.astype(jnp.float32) * weights)}


def load_teacher(checkpoint: str, dtype: Optional[str]):
  """The model a teacher params checkpoint's model.gin describes, computing in `dtype`, with
  parameters held in it; a clear error if the directory is not a params checkpoint."""
  if not checkpoint:
    raise ValueError("DistillationModel.teacher_checkpoint is not set: point it "
                     "(--gin.TEACHER_CHECKPOINT='/path') to the teacher's params checkpoint "
                     "(the MODEL_DIR of its finished run, or tools/convert_checkpoint.py's "
                     "output).")
  checkpoint = os.path.abspath(os.path.expanduser(checkpoint))
  gin_file = os.path.join(checkpoint, checkpoints.MODEL_GIN)
  if not (os.path.isdir(os.path.join(checkpoint, checkpoints.PARAMS_DIR))
          and os.path.isfile(gin_file)):
    raise FileNotFoundError(
        f"TEACHER_CHECKPOINT={checkpoint!r} is not a params checkpoint (it needs "
        f"{checkpoints.PARAMS_DIR}/ and {checkpoints.MODEL_GIN}): train the teacher first "
        "(its MODEL_DIR is one once the run finishes) or convert one with "
        "tools/convert_checkpoint.py.")
  bindings = [] if dtype is None else [f"TransformerConfig.dtype = '{dtype}'",
                                       f"TransformerConfig.param_dtype = '{dtype}'"]
  teacher = models.from_gin(gin_file, bindings)
  if not getattr(teacher, "REQUIRED_FEATURES", None) or not hasattr(teacher, "apply"):
    raise ValueError(f"{gin_file} describes {type(teacher).__name__}, not a language model "
                     "whose logits a student can learn from.")
  return teacher


@gin.configurable(module="t5x_lite.distillation")
class DistillationModel:
  """A student `model` trained on `alpha` * its own loss + (1 - alpha) * T^2 * KL to the
  teacher of `teacher_checkpoint` at `temperature` (see the module docstring)."""

  def __init__(self, model: Any = gin.REQUIRED, teacher_checkpoint: str = gin.REQUIRED,
               alpha: float = 0.5, temperature: float = 2.0,
               teacher_dtype: Optional[str] = "bfloat16"):
    if not hasattr(model, "loss_fn") or not hasattr(model, "config"):
      raise TypeError("DistillationModel.model is the student: a t5x_lite model "
                      f"(models.from_gin(...), or %MODEL in gin); got {model!r}.")
    if not (isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0):
      raise ValueError(f"DistillationModel.alpha={alpha!r}: it must be in [0, 1] (the weight "
                       "of the student's own loss; 0 learns from the teacher alone).")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature)
            and temperature > 0):
      raise ValueError(f"DistillationModel.temperature={temperature!r}: it must be a finite "
                       "number > 0 (1 is the teacher's own distribution; 2-4 is usual).")
    self.model, self.alpha, self.temperature = model, float(alpha), float(temperature)
    self.teacher_checkpoint = os.path.abspath(os.path.expanduser(teacher_checkpoint or ""))
    self.teacher = load_teacher(teacher_checkpoint, teacher_dtype)
    self._check_pairing()

  def __getattr__(self, name):
    # Everything but the loss (config, decoding, scoring, converters) is the student's.
    if name.startswith("__") or name in ("model", "teacher"):
      raise AttributeError(name)
    return getattr(self.model, name)

  def _check_pairing(self) -> None:
    student, teacher = self.model, self.teacher
    if teacher.config.vocab_size != student.config.vocab_size:
      raise ValueError(
          f"The teacher {self.teacher_checkpoint} has vocab_size={teacher.config.vocab_size} "
          f"but the student has {student.config.vocab_size}: distillation compares their "
          "distributions token by token, so both need the same vocabulary. Set the student's "
          f"TransformerConfig.vocab_size = {teacher.config.vocab_size} and train on the "
          "teacher's vocabulary (its get_vocabulary.* bindings).")
    if set(teacher.REQUIRED_FEATURES) != set(student.REQUIRED_FEATURES):
      raise ValueError(
          f"The teacher is a {type(teacher).__name__} (features "
          f"{sorted(teacher.REQUIRED_FEATURES)}) and the student a {type(student).__name__} "
          f"({sorted(student.REQUIRED_FEATURES)}): they do not predict the same targets from "
          "the same batch. Pair models of the same kind (decoder-only with decoder-only, e.g. "
          "gpt2 -> llama; encoder-decoder with encoder-decoder; encoder with encoder).")

  def check_vocabulary(self, vocab) -> None:
    """Refuses a run whose vocabulary is not the one the teacher records (when it records one:
    a tokenizer file or the get_vocabulary bindings of its run's config.gin)."""
    from t5x_lite import loaded_model, vocabulary  # pylint: disable=g-import-not-at-top
    trained = loaded_model.checkpoint_vocabulary(self.teacher_checkpoint)
    if trained is not None and not vocabulary.same(trained, getattr(vocab, "resolved", vocab)):
      raise ValueError(
          f"The teacher {self.teacher_checkpoint} was trained with {trained} but this run "
          f"reads {vocab}: the same ids would mean other tokens to the teacher. Set "
          "get_vocabulary.* as in the teacher's run (its config.gin).")

  def frozen_trees(self, mesh) -> dict:
    """{"teacher": its parameters in `teacher_dtype`, laid out on `mesh` by its logical axes}.
    Checks the run's vocabulary against the teacher's first (train.py calls this before any
    step)."""
    from t5x_lite import data  # pylint: disable=g-import-not-at-top  # TensorFlow
    self.check_vocabulary(data.get_vocabulary())
    shapes, specs = self.teacher.abstract_params()
    abstract = checkpoints.abstract_with_shardings(
        shapes, partitioning.tree_shardings(shapes, specs, mesh))
    try:  # Orbax casts each array to the abstract dtype as it reads it: no fp32 copy is kept.
      return {TEACHER: checkpoints.load_params(self.teacher_checkpoint, abstract)}
    except ValueError as e:
      raise ValueError(f"The teacher checkpoint cannot be read as its model.gin says: {e}"
                       ) from None

  def check_batch(self, batch) -> None:
    self.model.check_batch(batch)
    longest = max(tuple(v)[1] if isinstance(v, tuple) else v.shape[1] for v in batch.values())
    if longest > self.teacher.config.max_length:
      raise ValueError(
          f"Batches are {longest} tokens long but the teacher takes at most max_length="
          f"{self.teacher.config.max_length}: lower TASK_FEATURE_LENGTHS to fit the teacher.")

  def loss_fn(self, params, batch: Mapping[str, Array], dropout_rng: Optional[Array] = None,
              teacher: Optional[Any] = None) -> tuple[Array, dict]:
    """The distillation loss of a batch, its metrics and the auxiliary losses the student's
    layers sowed (the teacher's are not the student's to minimise)."""
    if teacher is None:
      raise ValueError("DistillationModel.loss_fn needs teacher= (the trainer passes the tree "
                       "of frozen_trees(mesh): Trainer(frozen_trees=model.frozen_trees(mesh))).")
    self.check_batch(batch)
    logits, sown = self.model.apply(params, batch, dropout_rng)
    teacher_logits = jax.lax.stop_gradient(self.teacher.apply(teacher, batch)[0])
    targets, weights = self.model._targets(batch)  # pylint: disable=protected-access
    _, metrics = losses.cross_entropy_with_logits(
        logits, targets, weights, label_smoothing=self.model.label_smoothing,
        z_loss=self.model.z_loss)
    terms = distillation_terms(logits, teacher_logits, targets, weights, self.temperature)
    tokens = metrics["num_tokens"].total
    total = self.alpha * metrics["loss"].total + (1.0 - self.alpha) * terms["kl"]
    metrics = dict(metrics, loss=metrics_lib.Average(total, tokens),
                   **{name: metrics_lib.Average(value, tokens) for name, value in terms.items()})
    return layers.add_sown(total / jnp.maximum(tokens, 1.0), metrics, sown)

  def flops_per_step(self, batch_shapes) -> float:
    """The student's forward and backward plus the teacher's forward."""
    return self.model.flops_per_step(batch_shapes) + self.teacher.flops_per_step(
        batch_shapes) / 3.0

  def activation_bytes(self, batch_shapes, tensor_shards: int = 1) -> float:
    """The student's, and the teacher's logits, which the KL term keeps for the backward."""
    from t5x_lite import costs  # pylint: disable=g-import-not-at-top
    head_tokens = self.teacher._head_tokens(batch_shapes)  # pylint: disable=protected-access
    teacher_logits = costs.logits_bytes(self.teacher.config, head_tokens, tensor_shards)
    return self.model.activation_bytes(batch_shapes, tensor_shards) + teacher_logits

  def save_params(self, directory: str, params) -> str:
    """The student, exported as the model it is (a plain checkpoint, or LoRA adapters)."""
    save = getattr(self.model, "save_params", None)
    if save:
      return save(directory, params)
    return checkpoints.save_params(directory, params, checkpoints.model_gin(self.model))
