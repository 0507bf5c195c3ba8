"""The evaluation job: task metrics and perplexity for a params checkpoint or every train-state
checkpoint of a run, written as TensorBoard events and JSON."""
import json
import math
import os
import sys

import jax
import numpy as np
import pytest
import seqio

from t5x_lite import checkpoints, eval as eval_lib, launch, models, optimizers, partitioning
from t5x_lite import trainer as trainer_lib

LENGTHS = {"inputs": 24, "targets": 8}


def test_metrics_are_the_tasks_on_postprocessed_text_plus_perplexity():
  import t5x_lite.data  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import  # tasks
  task = seqio.get_mixture_or_task("addition")
  records = [
      {"targets": "12", "prediction": " 12 ", "target_log_likelihood": -2.0, "target_tokens": 3,
       "example": {}},
      {"targets": "7", "prediction": "8", "target_log_likelihood": -4.0, "target_tokens": 2,
       "example": {}},
  ]
  metrics = eval_lib.task_metrics(task, records)
  assert metrics["exact_match"] == 50.0  # The task's postprocess_fn strips " 12 ".
  assert metrics["log_likelihood"] == -3.0 and metrics["examples"] == 2
  assert metrics["perplexity"] == pytest.approx(math.exp(6.0 / 5))


def test_every_train_state_checkpoint_of_a_run_is_evaluated(tmp_path):
  model = models.from_gin("gpt2_tiny")
  batch = model.dummy_batch(8, {"targets": 8})
  state = jax.jit(lambda rng: trainer_lib.init_state(
      model, optimizers.create_optimizer(), batch, rng))(jax.random.PRNGKey(0))
  with checkpoints.CheckpointManager(str(tmp_path), async_save=False) as manager:
    manager.save(10, state, batches_consumed=10, force=True)
    # A later checkpoint whose parameters differ: its scores must differ too.
    later = state.replace(params=jax.tree.map(lambda p: p * 1.5, state.params))
    manager.save(20, later, batches_consumed=20, force=True)

  results = eval_lib.eval_checkpoints(
      model, "addition", LENGTHS, model_dir=str(tmp_path), batch_size=8, max_examples=6,
      mesh_fn=lambda: partitioning.make_mesh(data=2, fsdp=2, tensor=2))
  assert sorted(results) == [10, 20]
  for metrics in results.values():
    assert sorted(metrics) == ["addition/exact_match", "addition/examples",
                               "addition/log_likelihood", "addition/perplexity"]
    assert metrics["addition/examples"] == 6
  assert results[10]["addition/perplexity"] != pytest.approx(results[20]["addition/perplexity"])
  with open(tmp_path / "metrics_addition_validation.json") as f:
    assert json.load(f) == {str(step): m for step, m in results.items()}
  assert os.listdir(tmp_path / "eval_validation")  # TensorBoard events.


def test_the_command_line_job_evaluates_a_params_checkpoint(tmp_path):
  model = models.from_gin("t5_tiny")
  params = jax.jit(model.init)(jax.random.PRNGKey(0), model.dummy_batch(1, {"inputs": 8,
                                                                             "targets": 8}))
  ckpt = checkpoints.save_params(str(tmp_path / "ckpt"), params, checkpoints.model_gin(model))
  eval_lib.main([f"--gin_file={ckpt}/model.gin", "--gin_file=runs/eval_metrics.gin",
                 f"--gin.CHECKPOINT_PATH={ckpt}", f"--gin.OUTPUT_DIR={tmp_path}/out",
                 "--gin.MAX_EXAMPLES=4", "--gin.BATCH_SIZE=8",
                 "--gin.TASK_FEATURE_LENGTHS={'inputs': 24, 'targets': 8}"])
  with open(tmp_path / "out" / "metrics_addition_validation.json") as f:
    metrics = json.load(f)["0"]
  assert metrics["addition/examples"] == 4 and np.isfinite(metrics["addition/perplexity"])


def test_the_checkpoints_to_evaluate_must_be_named_once_and_exist(tmp_path):
  model = models.from_gin("t5_tiny")
  with pytest.raises(ValueError, match="exactly one of CHECKPOINT_PATH"):
    eval_lib.eval_checkpoints(model, "addition", LENGTHS, checkpoint_path=str(tmp_path),
                              model_dir=str(tmp_path))
  with pytest.raises(FileNotFoundError, match="No train-state checkpoints"):
    eval_lib.eval_checkpoints(model, "addition", LENGTHS, model_dir=str(tmp_path / "empty"))


def test_the_teacher_forced_job_reports_a_params_checkpoint(tmp_path):
  model = models.from_gin("gpt2_tiny")
  params = jax.jit(model.init)(jax.random.PRNGKey(0), model.dummy_batch(1, {"targets": 8}))
  ckpt = checkpoints.save_params(str(tmp_path), params, checkpoints.model_gin(model))
  launch.configure([f"{ckpt}/model.gin", "runs/eval.gin"], [
      f"CHECKPOINT_PATH = '{ckpt}'", "MIXTURE_OR_TASK_NAME = 'stdlib_clm'",
      "TASK_FEATURE_LENGTHS = {'targets': 32}", "BATCH_SIZE = 8", "evaluate.eval_batches = 2",
      "stdlib_corpus.max_files = 40"])
  metrics = eval_lib.run()
  assert metrics["batches"] == 2 and np.isfinite(metrics["loss"]) and metrics["num_tokens"] > 0
  with open(tmp_path / "eval_stdlib_clm_validation.json") as f:
    assert json.load(f)["loss"] == pytest.approx(metrics["loss"])


def test_both_jobs_evaluate_a_prompt_export_as_its_base_with_the_prompt(tmp_path, capsys):
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from prompt_tuning_test import compilation_cache, write_export  # pylint: disable=g-import-not-at-top
  model, params, _, prompt_dir = write_export(tmp_path, "gpt2_tiny")
  with compilation_cache(tmp_path / "jax_cache"):
    eval_lib.main([f"--gin_file={prompt_dir}/model.gin", "--gin_file=runs/eval_metrics.gin",
                   f"--gin.CHECKPOINT_PATH={prompt_dir}", f"--gin.OUTPUT_DIR={tmp_path}/out",
                   "--gin.MAX_EXAMPLES=4", "--gin.BATCH_SIZE=8",
                   f"--gin.TASK_FEATURE_LENGTHS={LENGTHS}"])
    assert "is a soft-prompt export (3 vectors" in capsys.readouterr().out
    with open(tmp_path / "out" / "metrics_addition_validation.json") as f:
      metrics = json.load(f)["0"]  # the decoding path is infer's, tested against the reference
    assert metrics["addition/examples"] == 4 and np.isfinite(metrics["addition/perplexity"])

    launch.configure([f"{prompt_dir}/model.gin", "runs/eval.gin"], [
        f"CHECKPOINT_PATH = '{prompt_dir}'", "MIXTURE_OR_TASK_NAME = 'stdlib_clm'",
        "TASK_FEATURE_LENGTHS = {'targets': 32}", "BATCH_SIZE = 8", "evaluate.eval_batches = 2",
        "stdlib_corpus.max_files = 40"])
    metrics = eval_lib.run()
    assert "is a soft-prompt export" in capsys.readouterr().out
    # The same prompted model over one params checkpoint holding base and prompt.
    joined = checkpoints.save_params(str(tmp_path / "joined"), params)
    expected = eval_lib.evaluate(model, joined, "stdlib_clm", {"targets": 32}, 8,
                                 eval_batches=2)
  assert metrics == pytest.approx(expected)
