"""The evaluation job: a task's seqio metrics on decoded predictions, and teacher-forced
perplexity, for one checkpoint or every checkpoint of a training run (`eval_checkpoints`,
runs/eval_metrics.gin); or the model's teacher-forced loss and accuracy on packed batches of a
params checkpoint (`evaluate`, runs/eval.gin).

    python -m t5x_lite.eval --gin_file=MODEL_DIR/model.gin --gin_file=runs/eval_metrics.gin \\
        --gin.MODEL_DIR=/tmp/my_run --gin.MIXTURE_OR_TASK_NAME=addition
    python -m t5x_lite.eval --gin_file=CKPT/model.gin --gin_file=runs/eval.gin \\
        --gin.CHECKPOINT_PATH=CKPT

For each checkpoint and each task of the mixture: decode the split (`t5x_lite.predict`, as the
inference job does), post-process predictions and targets with the task's `postprocess_fn`, run
its `metric_fns` (exact match, ROUGE, BLEU, ... whatever the task declares), and add
  log_likelihood  mean over examples of log p(targets | inputs), teacher-forced
  perplexity      exp(- sum of target log-likelihoods / number of target tokens)
Results go to TensorBoard events in OUTPUT_DIR/eval_<split>/ (scalars "<task>/<metric>" at each
checkpoint's step) and to OUTPUT_DIR/metrics_<mixture or task>_<split>.json ({step: {name:
value}}). OUTPUT_DIR defaults to MODEL_DIR, or CHECKPOINT_PATH.

Checkpoints: CHECKPOINT_PATH, a params checkpoint (reported at step `checkpoint_step`), or
MODEL_DIR, whose train-state checkpoints MODEL_DIR/checkpoints/<step>/ are all evaluated (only
their parameters are read). A soft-prompt export (a finished runs/prompt_tuning.gin run's
MODEL_DIR, as CHECKPOINT_PATH or MODEL_DIR, with its model.gin first) is evaluated as its base
with the prompt in front of every input, in both jobs.
"""
from __future__ import annotations

import sys

if __name__ == "__main__":
  # Run the importable module, so gin registers its configurables once, under t5x_lite.eval.
  from t5x_lite import eval as _module  # pylint: disable=import-self
  sys.exit(_module.main())

# pylint: disable=g-import-not-at-top,wrong-import-position
import json
import math
import os
from typing import Any, Callable, Mapping, Optional, Sequence

import gin
import jax

from t5x_lite import checkpoints, launch, optimizers, partitioning, predict, prompt_tuning
from t5x_lite import quantized_checkpoints
from t5x_lite import metrics as metrics_lib
from t5x_lite import trainer as trainer_lib


def checkpoints_to_evaluate(checkpoint_path: Optional[str], model_dir: Optional[str],
                            checkpoint_step: int = 0,
                            load_params: Optional[Callable] = None) -> list[tuple[int, Callable]]:
  """(step, load(abstract params) -> params) of every checkpoint to evaluate, by step;
  `load_params` reads CHECKPOINT_PATH (default: checkpoints.load_params)."""
  if (checkpoint_path is None) == (model_dir is None):
    raise ValueError("Give exactly one of CHECKPOINT_PATH (a params checkpoint) and MODEL_DIR "
                     "(every train-state checkpoint of a run).")
  if checkpoint_path is not None:
    return [(checkpoint_step, load_params or (
        lambda abstract: checkpoints.load_params(checkpoint_path, abstract)))]
  root = os.path.join(model_dir, checkpoints.CheckpointManager.SUBDIR)
  steps = sorted(int(name) for name in (os.listdir(root) if os.path.isdir(root) else [])
                 if name.isdigit() and os.path.isdir(os.path.join(root, name, "state")))
  if not steps:
    raise FileNotFoundError(
        f"No train-state checkpoints in {root} (expected <step>/state/ directories written by "
        "the training job); for a params checkpoint use CHECKPOINT_PATH instead.")
  return [(step, lambda abstract, step=step: checkpoints.load_train_state_params(
      os.path.join(root, str(step), "state"), abstract)) for step in steps]


def task_metrics(task, records: Sequence[dict]) -> dict[str, float]:
  """The task's metric_fns on post-processed predictions, plus likelihood and perplexity."""
  results = {}
  if task.metric_fns:
    targets = [task.postprocess_fn(r["targets"], example=r["example"], is_target=True)
               for r in records]
    predictions = [task.postprocess_fn(r["prediction"], example=r["example"], is_target=False)
                   for r in records]
    for metric_fn in task.metric_fns:
      results.update({k: float(v) for k, v in metric_fn(targets, predictions).items()})
  total = sum(r["target_log_likelihood"] for r in records)
  tokens = sum(r["target_tokens"] for r in records)
  results["log_likelihood"] = total / len(records)
  results["perplexity"] = math.exp(-total / max(tokens, 1))
  results["examples"] = float(len(records))
  return results


@gin.configurable(module="t5x_lite.eval")
def eval_checkpoints(model: Any = gin.REQUIRED, mixture_or_task_name: str = gin.REQUIRED,
             task_feature_lengths: Mapping[str, int] = gin.REQUIRED,
             checkpoint_path: Optional[str] = None, model_dir: Optional[str] = None,
             checkpoint_step: int = 0, output_dir: Optional[str] = None,
             split: str = "validation", batch_size: int = 16, max_examples: Optional[int] = None,
             decode_params: Optional[Mapping[str, Any]] = None,
             mesh_fn: Callable = partitioning.make_mesh, seed: int = 0,
             quantize: Optional[str] = None, quantize_group_size: int = 128,
             kv_cache: Optional[str] = None) -> dict[int, dict]:
  """Evaluates each checkpoint (see module docstring); returns {step: {"task/metric": value}}.
  `quantize` / `kv_cache` (QUANTIZE in runs/eval_metrics.gin) evaluate the checkpoints
  quantized as they are read, as runs/infer.gin does."""
  predict.decode_options(model, task_feature_lengths, decode_params)  # Bad input fails first.
  # A soft-prompt export (CHECKPOINT_PATH, or a finished prompt-tuning run's MODEL_DIR) runs as
  # its base with the prompt in front (t5x_lite.prompt_tuning).
  source = prompt_tuning.for_checkpoint(model, checkpoint_path or model_dir, quantize, kv_cache)
  model = quantized_checkpoints.for_checkpoint(
      source.model, checkpoint_path and source.params_dir, quantize, quantize_group_size,
      kv_cache=kv_cache)
  to_evaluate = checkpoints_to_evaluate(checkpoint_path, model_dir, checkpoint_step,
                                        source.load)
  output_dir = output_dir or model_dir or checkpoint_path
  vocab_source = source.vocabulary_dir
  tasks = predict.tasks_of(mixture_or_task_name)
  vocabs = [predict.check_vocabulary(model, vocab_source, task) for task in tasks]
  mesh = mesh_fn()
  writer = metrics_lib.MetricsWriter(output_dir, f"eval_{split}")
  results = {}
  for step, load in to_evaluate:
    params = predict.restore_params(
        model, mesh, quantized_checkpoints.loader(model, load, checkpoint_path and
                                                  source.params_dir))
    results[step] = {}
    for task, vocab in zip(tasks, vocabs):
      records = predict.predict_task(model, params, mesh, task, task_feature_lengths, split,
                                   batch_size, vocab, max_examples, decode_params, seed)
      results[step].update({f"{task.name}/{k}": v for k, v in task_metrics(task, records).items()})
    writer.write(step, results[step])
    print(f"step {step}: {json.dumps(results[step])}", flush=True)
  if jax.process_index() == 0:
    path = os.path.join(output_dir, f"metrics_{mixture_or_task_name}_{split}.json")
    with open(path, "w") as f:
      json.dump({str(step): metrics for step, metrics in results.items()}, f, indent=1)
  return results


@gin.configurable(module="t5x_lite.eval")
def evaluate(model: Any = gin.REQUIRED, checkpoint_path: str = gin.REQUIRED,
             mixture_or_task_name: str = gin.REQUIRED,
             task_feature_lengths: Mapping[str, int] = gin.REQUIRED,
             batch_size: int = gin.REQUIRED, eval_batches: int = 50, split: str = "validation",
             mesh_fn: Callable = partitioning.make_mesh, seed: int = 0) -> dict[str, float]:
  """Teacher-forced metrics (the model's loss, accuracy, ...) of a params checkpoint on the first
  `eval_batches` packed batches of `split`, as the training job's validation computes them;
  printed as JSON and written to `checkpoint_path`/eval_<task>_<split>.json."""
  import t5x_lite.data as data  # TensorFlow: imported only when a job runs
  source = prompt_tuning.for_checkpoint(model, checkpoint_path)  # a soft-prompt export: prompted
  model = source.model
  data.check_vocabulary_fits(model.config.vocab_size)
  mesh = mesh_fn()
  shard = partitioning.data_shard_info(mesh, batch_size)
  ds = data.get_tf_dataset(mixture_or_task_name, task_feature_lengths, split=split,
                           batch_size=batch_size // shard[1],
                           feature_converter=model.feature_converter(), shuffle=False, seed=seed,
                           shard_info=shard)
  batches = list(data.BatchIterator(ds.take(eval_batches), f"{mixture_or_task_name!r} {split}"))
  shapes = {k: (batch_size,) + v.shape[1:] for k, v in batches[0].items()}
  trainer = trainer_lib.Trainer(model, optimizers.create_optimizer(), mesh, shapes)
  params = source.load(trainer.abstract_state.params)
  metrics = metrics_lib.summarize(
      [trainer.eval_step(params, partitioning.host_to_global(b, mesh)) for b in batches])
  metrics["batches"] = len(batches)
  metrics_lib.log(json.dumps(metrics, indent=1))
  if jax.process_index() == 0:
    with open(os.path.join(checkpoint_path, f"eval_{mixture_or_task_name}_{split}.json"),
              "w") as f:
      json.dump(metrics, f, indent=1)
  return metrics


@gin.configurable(module="t5x_lite.eval")
def run(job: Callable = eval_checkpoints):
  """What `python -m t5x_lite.eval` runs: `eval_checkpoints` (runs/eval_metrics.gin), or
  `evaluate` when a gin file says `run.job = @evaluate` (runs/eval.gin)."""
  return job()


def main(argv: Optional[Sequence[str]] = None) -> None:
  launch.main(run, argv, "python -m t5x_lite.eval", __doc__)
