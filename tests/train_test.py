"""The training job end to end on the embedded stdlib corpus, on the 8 simulated devices."""
import json
import os
import shutil
import socket
import sys

import jax
import numpy as np
import pytest

from t5x_lite import checkpoints, launch, lora, models, run_dir
from t5x_lite import metrics as metrics_lib
from t5x_lite import train as train_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Small and fast: few corpus files, short sequences, a (2, 2, 2) mesh.
COMMON = [
    "stdlib_corpus.max_files = 40",
    "TASK_FEATURE_LENGTHS = {'targets': 32}",
    "BATCH_SIZE = 8",
    "MIXTURE_OR_TASK_NAME = 'stdlib_clm'",
    "make_mesh.data = 2", "make_mesh.fsdp = 2", "make_mesh.tensor = 2",
    "create_optimizer.name = 'adamw'",
    "create_schedule.kind = 'constant'", "create_schedule.peak_value = 0.003",
    "create_schedule.warmup_steps = 0",
    "train.log_every = 1", "train.eval_every = 2", "train.eval_batches = 1",
    "train.checkpoint_every = 2",
]


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
  """The runs here compile the same train step several times (straight, then stopped and
  resumed, ...): a persistent compilation cache makes the repeats cheap."""
  from jax.experimental.compilation_cache import compilation_cache as cache  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  cache.reset_cache()
  yield
  jax.config.update("jax_compilation_cache_dir", None)
  cache.reset_cache()


def run_job(model_dir, *bindings, preset="models/gpt2_tiny.gin", run_file="runs/pretrain.gin"):
  """`python -m t5x_lite.train --gin_file=PRESET --gin_file=RUN --gin.X=...`, in-process."""
  launch.configure([preset, run_file], [f"MODEL_DIR = '{model_dir}'"] + COMMON + list(bindings))
  return train_lib.train()


def params_of(model_dir):
  return checkpoints.load_params(str(model_dir))


def read_scalars(event_dir):
  sys.path.insert(0, os.path.join(REPO, "tools"))
  import plot_metrics  # pylint: disable=g-import-not-at-top
  return plot_metrics.read_scalars(str(event_dir))


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
  """Four steps in one go, logged every 2 (the reference for resuming)."""
  model_dir = tmp_path_factory.mktemp("straight")
  metrics = run_job(model_dir, "TRAIN_STEPS = 4", "train.log_every = 2")
  return model_dir, metrics


def test_resumed_run_equals_the_straight_run(straight_run, tmp_path):
  reference, _ = straight_run
  # Step 2 is saved mid-run, its next batch already fetched.
  run_job(tmp_path, "TRAIN_STEPS = 3", "train.log_every = 2")
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "3"]
  shutil.rmtree(tmp_path / "checkpoints" / "3")  # as if killed before the last save
  # Restarts from step 2 (reclaiming the lock a killed job would leave), skips the 2 batches
  # used.
  (tmp_path / "train.lock").write_text('{"host": "%s", "pid": 1}' % socket.gethostname())
  run_job(tmp_path, "TRAIN_STEPS = 4", "train.log_every = 2")
  for a, b in zip(jax.tree.leaves(params_of(reference)), jax.tree.leaves(params_of(tmp_path)),
                  strict=True):
    np.testing.assert_array_equal(a, b)
  # The losses logged are the same too: step 4's is the mean of steps 3 and 4 in both runs
  # (step 3 being the resumed run's first, compiling step). Step 3 is logged only by the
  # killed run, at its end.
  straight = dict(read_scalars(reference / "train")["loss"])
  resumed = dict(read_scalars(tmp_path / "train")["loss"])
  assert sorted(straight) == [2, 4] and sorted(resumed) == [2, 3, 4]
  assert {step: resumed[step] for step in straight} == straight


def test_run_writes_config_metrics_and_an_exported_model(straight_run):
  model_dir, metrics = straight_run
  assert metrics["loss"] > 0 and 0 <= metrics["accuracy"] <= 1
  config = (model_dir / "config.gin").read_text()
  assert "TRAIN_STEPS = 4" in config and "stdlib_clm" in config
  model = models.from_gin(str(model_dir / "model.gin"))
  assert model.config.d_model == 64 and model.config.family == "decoder"
  manifest = json.loads((model_dir / "manifest.json").read_text())
  assert manifest["BATCH_SIZE"] == 8 and manifest["vocabulary"]["kind"] == "byte"
  assert manifest["corpus"] == {"local_corpus": {"pattern": None},
                                "stdlib_corpus": {"max_files": 40}}
  assert not (model_dir / "train.lock").exists()  # released at the end
  train_scalars = read_scalars(model_dir / "train")
  assert [step for step, _ in train_scalars["loss"]] == [2, 4]
  # Step 1 includes compilation: it is in the metrics (see loop_test) but not in the timing.
  assert [step for step, _ in train_scalars["tokens_per_second"]] == [2, 4]
  assert {"learning_rate", "grad_norm", "tokens_per_second", "mfu", "z_loss"} <= set(
      train_scalars)
  validation = read_scalars(model_dir / "validation")
  assert [step for step, _ in validation["loss"]] == [0, 2, 4]
  import plot_metrics  # pylint: disable=g-import-not-at-top
  assert os.path.getsize(plot_metrics.plot(str(model_dir))) > 10_000


@pytest.mark.parametrize("preset, task, lengths", [
    ("models/t5_tiny.gin", "stdlib_span_corruption", "{'inputs': 64, 'targets': 16}"),
    ("models/bert_tiny.gin", "stdlib_mlm", "{'inputs': 32, 'targets': 32}"),
])
def test_other_families_train_on_their_objectives(tmp_path, preset, task, lengths):
  run_job(tmp_path, "TRAIN_STEPS = 2", f"MIXTURE_OR_TASK_NAME = '{task}'",
          f"TASK_FEATURE_LENGTHS = {lengths}", "train.eval_batches = 0", preset=preset)
  losses = [loss for _, loss in read_scalars(tmp_path / "train")["loss"]]
  assert len(losses) == 2 and np.isfinite(losses).all()
  assert os.path.isdir(tmp_path / "params")


def test_finetuning_starts_from_the_initial_checkpoint(straight_run, tmp_path):
  pretrained, _ = straight_run
  run_job(tmp_path, "TRAIN_STEPS = 0", f"INITIAL_CHECKPOINT_PATH = '{pretrained}'",
          "train.eval_batches = 0", preset=str(pretrained / "model.gin"),
          run_file="runs/finetune.gin")
  for a, b in zip(jax.tree.leaves(params_of(pretrained)), jax.tree.leaves(params_of(tmp_path))):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("bindings, error, message", [
    (["INITIAL_CHECKPOINT_PATH = '/nonexistent/run'"], FileNotFoundError,
     "INITIAL_CHECKPOINT_PATH='/nonexistent/run' is not a params checkpoint"),
    (["BATCH_SIZE = 6"], ValueError, "BATCH_SIZE=6 is not divisible by the data-parallel size"),
    (["TransformerConfig.vocab_size = 256"], ValueError,
     "vocab_size=360"),
    (["MIXTURE_OR_TASK_NAME = 'stdlib_clmm'"], ValueError,
     "No task or mixture named 'stdlib_clmm'. Did you mean"),
    (["TASK_FEATURE_LENGTHS = {'targets': 1024}"], ValueError,
     "length 1024 but the model accepts at most max_length=512; shorten TASK_FEATURE_LENGTHS"),
    (["TransformerConfig.d_model = 8192", "TransformerConfig.d_ff = 32768",
      "TransformerConfig.num_heads = 64", "TransformerConfig.num_layers = 64"], MemoryError,
     r"needs about [\d.]+ GiB per device \(train state .* GiB are available per device. Lower "
     "BATCH_SIZE"),
    (["train.on_nonfinite = 'ignore'"], ValueError,
     r"train.on_nonfinite='ignore': choose one of \('skip', 'stop'\)"),
    (["TRAIN_STEPS = 'ten'"], ValueError,
     r"--gin.TRAIN_STEPS takes a whole number \(its value before this flag: 1\), not 'ten'"),
    (["BATCH_SIZE = 8.5"], ValueError, r"--gin.BATCH_SIZE takes a whole number .*not 8.5"),
    (["create_schedule.peak_value = 'high'"], ValueError,
     r"--gin.create_schedule.peak_value takes a number \(its value before this flag: 0.003"),
    (["BATCH_SIZE = 0"], ValueError, r"BATCH_SIZE=0: it must be a whole number >= 1"),
    (["TRAIN_STEPS = -5"], ValueError, r"TRAIN_STEPS=-5: it must be a whole number >= 0"),
])
def test_bad_runs_say_what_to_change(tmp_path, bindings, error, message):
  with pytest.raises(error, match=message):
    run_job(tmp_path, "TRAIN_STEPS = 1", *bindings)


def written_by_the_run(model_dir):
  return {name: (model_dir / name).read_text() for name in ("config.gin", "manifest.json")}


def test_a_model_dir_of_another_model_is_refused(straight_run):
  model_dir, _ = straight_run
  before = written_by_the_run(model_dir)
  with pytest.raises(ValueError, match="different model.*a fresh MODEL_DIR"):
    run_job(model_dir, "TRAIN_STEPS = 5", "TransformerConfig.d_model = 32")
  assert written_by_the_run(model_dir) == before


@pytest.mark.parametrize("bindings, differs", [
    (["BATCH_SIZE = 16"], r"BATCH_SIZE: 8 \(recorded\) -> 16 \(now\)"),
    (["get_vocabulary.extra_ids = 50"], r"vocabulary: byte \(360 ids.* -> byte \(310 ids"),
    (["train.seed = 1"], r"train.seed: 0 \(recorded\) -> 1"),
    (["stdlib_corpus.max_files = 41"], r"corpus: .*\"max_files\": 40.* -> .*41"),
])
def test_a_resume_that_changes_the_data_or_the_token_ids_is_refused(straight_run, bindings,
                                                                    differs):
  model_dir, _ = straight_run
  before = written_by_the_run(model_dir)
  with pytest.raises(run_dir.RunDirError, match=rf"(?s){differs}.*Nothing was written.*fresh "
                                                r"MODEL_DIR.*--gin.train.allow_changes="):
    run_job(model_dir, "TRAIN_STEPS = 6", *bindings)
  assert written_by_the_run(model_dir) == before  # config.gin included


def test_a_model_dir_in_use_by_another_job_is_refused(straight_run):
  model_dir, _ = straight_run
  before = written_by_the_run(model_dir)
  with run_dir.locked(str(model_dir), command="the other job"):
    with pytest.raises(run_dir.RunDirError, match=r"in use by another training job: .*pid "
                                                  rf"{os.getpid()}.*\(the other job\)"):
      run_job(model_dir, "TRAIN_STEPS = 6")
  assert written_by_the_run(model_dir) == before


@pytest.mark.parametrize("consumed, saved, now, expected", [
    (20, 8, 16, 10), (20, 16, 8, 40), (5, 8, 16, 2), (7, None, 16, 7), (7, 8, 8, 7)])
def test_an_allowed_batch_size_change_keeps_the_data_position_in_rows(consumed, saved, now,
                                                                       expected):
  assert train_lib._at_batch_size(consumed, saved, now) == expected  # pylint: disable=protected-access


@pytest.fixture(scope="module")
def poisoned_checkpoint(straight_run, tmp_path_factory):
  """The straight run's params with NaN embeddings: every step's loss is NaN."""
  model_dir, _ = straight_run
  params = jax.tree.map(np.array, params_of(model_dir))  # writable host copies
  params["token_embed"]["embedding"][5] = np.nan
  directory = tmp_path_factory.mktemp("poisoned")
  checkpoints.save_params(str(directory), params, (model_dir / "model.gin").read_text())
  return directory


def finetune_from(checkpoint, model_dir, *bindings):
  return run_job(model_dir, "TRAIN_STEPS = 2", f"INITIAL_CHECKPOINT_PATH = '{checkpoint}'",
                 "train.eval_batches = 0", *bindings, preset=str(checkpoint / "model.gin"),
                 run_file="runs/finetune.gin")


def test_a_non_finite_loss_stops_the_run_naming_step_and_batch(poisoned_checkpoint, tmp_path):
  with pytest.raises(FloatingPointError, match=r"Step 1: the loss or gradient norm is not finite.*"
                                               r"batch 0 of 'stdlib_clm' split 'train' \(seed 0\)"
                                               r".*train.on_nonfinite = 'skip'"):
    finetune_from(poisoned_checkpoint, tmp_path, "train.on_nonfinite = 'stop'")
  assert os.listdir(tmp_path / "checkpoints") == []  # nothing was saved after it


def test_skipping_stops_a_diverged_run_and_never_writes_non_finite_params(poisoned_checkpoint,
                                                                          tmp_path, capsys):
  # Every step is skipped: the run stops at the first check (by default, more than 5% of the
  # steps skipped) without a checkpoint or an export.
  with pytest.raises(FloatingPointError, match=r"diverging: 1 step\(s\) in a window of 2 "
                                               r".*\(steps 1\)"):
    finetune_from(poisoned_checkpoint, tmp_path, "train.on_nonfinite = 'skip'")
  assert "Step 1: the loss or gradient norm is not finite" in capsys.readouterr().out
  assert os.listdir(tmp_path / "checkpoints") == [] and not (tmp_path / "params").exists()


def test_a_non_finite_validation_loss_stops_the_run_before_training(poisoned_checkpoint,
                                                                     tmp_path):
  with pytest.raises(FloatingPointError, match=r"Step 0: the validation loss is nan"):
    finetune_from(poisoned_checkpoint, tmp_path, "train.eval_batches = 1")
  assert not (tmp_path / "params").exists()


def test_forgetting_report_evaluates_the_base_task_before_and_after(straight_run, tmp_path):
  # LoRA (the model wraps another; its export is adapters) over the pretrained run, on another
  # task: the report must equal the plain model's evaluation of the base and of the merged
  # result. (Full fine-tuning takes the same path with the plain model: the README's runs.)
  pretrained, _ = straight_run
  run_job(tmp_path, "TRAIN_STEPS = 2", f"INITIAL_CHECKPOINT_PATH = '{pretrained}'",
          "MIXTURE_OR_TASK_NAME = 'addition'",
          "TASK_FEATURE_LENGTHS = {'inputs': 16, 'targets': 8}", "train.eval_batches = 2",
          "FORGETTING_EVAL_TASK = 'stdlib_clm'", "FORGETTING_FEATURE_LENGTHS = {'targets': 32}",
          preset=str(pretrained / "model.gin"), run_file="runs/lora_finetune.gin")
  report = json.loads((tmp_path / "forgetting.json").read_text())
  assert report["task"] == "stdlib_clm" and report["batches"] == 2
  assert report["before"]["step"] == 0 and report["after"]["step"] == 2
  # Independently: the plain model's metrics of the same validation batches, unsharded.
  model = models.from_gin(str(pretrained / "model.gin"))
  from t5x_lite import data  # pylint: disable=g-import-not-at-top
  batches = data.validation_batches("stdlib_clm", {"targets": 32}, 8, model.feature_converter(),
                                    0, (0, 1), 2)
  evaluate = lambda params: metrics_lib.summarize(
      [model.loss_fn(params, b, None)[1] for b in batches])
  adapters, config = lora.load_adapters(str(tmp_path))
  final = lora.merge(lora.join(params_of(pretrained), adapters), config["alpha"] / config["rank"])
  for when, params in (("before", params_of(pretrained)), ("after", final)):
    expected = evaluate(params)
    for name in ("loss", "accuracy"):
      np.testing.assert_allclose(report[when][name], expected[name], rtol=1e-5, err_msg=when)
  assert report["change"]["loss"] == report["after"]["loss"] - report["before"]["loss"]
  assert report["change"]["loss"] != 0  # the two steps changed what the base computes
  scalars = read_scalars(tmp_path / "validation")
  assert scalars["forgetting/stdlib_clm/loss_before"] == [(0, pytest.approx(
      report["before"]["loss"]))]
  assert scalars["forgetting/stdlib_clm/loss_after"] == [(2, pytest.approx(
      report["after"]["loss"]))]
  assert scalars["forgetting/stdlib_clm/loss_change"] == [(2, pytest.approx(
      report["change"]["loss"], rel=1e-4))]


def test_an_unknown_forgetting_task_is_refused_before_any_work(tmp_path):
  with pytest.raises(ValueError, match=r"FORGETTING_EVAL_TASK='stdlib_clmm' is not a "
                                       r"registered task.*'stdlib_clm'.*or to None"):
    run_job(tmp_path / "run", "TRAIN_STEPS = 1", "train.forgetting_eval_task = 'stdlib_clmm'")
  assert not (tmp_path / "run").exists()
