"""The command line every job shares: gin flags, configuration, refusals of typos and of
values of the wrong type, one message per known error."""
import errno
import os
import resource
import signal
import subprocess
import sys

import gin
import pytest

from t5x_lite import launch, run_dir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("flag, binding", [
    ("--gin.MODEL_DIR=/tmp/run 1", "MODEL_DIR = '/tmp/run 1'"),
    ("--gin.TRAIN_STEPS=100", "TRAIN_STEPS = 100"),
    ("--gin.TASK_FEATURE_LENGTHS={'targets': 64}", "TASK_FEATURE_LENGTHS = {'targets': 64}"),
    ("--gin.train.optimizer=@create_optimizer()", "train.optimizer = @create_optimizer()"),
    ("--gin.MODEL_DIR='/quoted'", "MODEL_DIR = '/quoted'"),
])
def test_gin_flags_become_bindings(flag, binding):
  args = launch.parse_flags(["--gin_file=runs/quickstart.gin", flag])
  assert args.gin_bindings == [binding]


def test_unknown_gin_names_and_flags_are_refused():
  with pytest.raises(ValueError, match="no gin file defines the macro TRAIN_STEP"):
    launch.configure(["runs/quickstart.gin"], ["TRAIN_STEP = 5"])
  with pytest.raises(ValueError, match="No configurable matching 'trian'"):
    launch.configure(["runs/quickstart.gin"], ["trian.seed = 5"])
  with pytest.raises(FileNotFoundError, match="runs/nope.gin"):
    launch.configure(["runs/nope.gin"], [])
  with pytest.raises(SystemExit):
    launch.parse_flags(["--gin_file=runs/quickstart.gin", "--train_steps=5"])


@pytest.mark.parametrize("binding, message", [
    ("TRAIN_STEPS = 'ten'", r"--gin.TRAIN_STEPS takes a whole number \(its value before this "
                            r"flag: \d+\), not 'ten'; nothing was run"),  # the quickstart's
    ("BATCH_SIZE = 16.5", r"--gin.BATCH_SIZE takes a whole number .*not 16.5"),
    ("create_schedule.peak_value = 'fast'", r"peak_value takes a number .*0\.\d+.*not 'fast'"),
    ("TASK_FEATURE_LENGTHS = 'targets:64'", r"TASK_FEATURE_LENGTHS takes a dict"),
    ("train.sample_prompts = 5", r"train.sample_prompts takes a list"),
])
def test_flag_values_of_the_wrong_type_are_refused_naming_the_flag(binding, message):
  with pytest.raises(ValueError, match=message):
    launch.configure(["runs/quickstart.gin"], [binding])


def test_fitting_flag_values_pass():
  launch.configure(["runs/quickstart.gin"], ["create_schedule.peak_value = 1",
                                             "TRAIN_STEPS = 3", "MODEL_DIR = '/tmp/x'"])
  assert gin.query_parameter("create_schedule.peak_value") == 1


def test_a_job_from_a_checkpoint_reads_text_with_the_checkpoints_vocabulary(tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  from t5x_lite import data  # pylint: disable=g-import-not-at-top
  ckpt = tmp_path / "ckpt"
  os.makedirs(ckpt)
  shutil.copyfile(os.path.join(launch.GIN_CONFIGS, "vocab", "stdlib_2k.model"), ckpt / "vocab.model")
  job = ["models/gpt2_tiny.gin", "runs/infer.gin"]
  launch.configure(job, [f"CHECKPOINT_PATH='{ckpt}'"])
  assert gin.query_parameter("get_vocabulary.kind") == "sentencepiece"
  assert data.get_vocabulary().vocab_size == 2048 + 100  # the model's pieces and the sentinels
  launch.configure(job, [f"CHECKPOINT_PATH='{ckpt}'", "get_vocabulary.kind='byte'"])
  assert gin.query_parameter("get_vocabulary.kind") == "byte"  # a run's own choice stands
  launch.configure(["models/gpt2_tiny.gin", "runs/finetune.gin"],
                   [f"INITIAL_CHECKPOINT_PATH='{ckpt}'", "MODEL_DIR='/unused'"])
  assert gin.query_parameter("get_vocabulary.spm_path") == str(ckpt / "vocab.model")


def test_a_run_gin_without_a_model_gin_says_to_give_one_first():
  with pytest.raises(ValueError, match=r"No model: give a model gin first.*"
                                       r"--gin_file=models/gpt2_tiny.gin"):
    launch.configure(["runs/pretrain.gin"], ["MODEL_DIR = '/tmp/x'"])


def failing_job(error):
  def job():
    raise error
  return job


def test_a_known_error_ends_the_job_with_one_message_and_status_1(capsys, monkeypatch):
  monkeypatch.delenv("T5X_LITE_TRACEBACK", raising=False)
  error = ValueError("BATCH_SIZE=6 is not divisible.\n  In call to configurable 'train' (<f>)")
  with pytest.raises(SystemExit) as exit_info:
    launch.main(failing_job(error), ["--gin_file=runs/quickstart.gin"], "python -m job")
  assert exit_info.value.code == 1
  assert capsys.readouterr().err == "python -m job: error: BATCH_SIZE=6 is not divisible.\n"
  monkeypatch.setenv("T5X_LITE_TRACEBACK", "1")  # the traceback, for a bug report
  with pytest.raises(ValueError, match="not divisible"):
    launch.main(failing_job(error), ["--gin_file=runs/quickstart.gin"], "python -m job")
  with pytest.raises(KeyError):  # unknown errors keep their traceback
    launch.main(failing_job(KeyError("x")), ["--gin_file=runs/quickstart.gin"])


def test_a_full_disk_is_named_with_the_fix():
  error = OSError(errno.ENOSPC, "No space left on device", "/run/config.gin")
  assert launch.error_message(error) == (
      "the disk is full writing /run/config.gin ([Errno 28] No space left on device: "
      "'/run/config.gin'). Free space on it, or point MODEL_DIR to a larger disk, and rerun (a "
      "run resumes from its last good checkpoint).")


@gin.configurable("launch_test_big_config")
def write_big_config(model_dir):
  run_dir.append_config(model_dir, "start at step 0", "x = 1\n" * 10_000)


def test_a_disk_filling_up_at_start_up_ends_the_job_naming_the_file(tmp_path, capsys):
  """A file-size limit (RLIMIT_FSIZE, as a quota would) makes writing config.gin fail, inside a
  gin configurable as the jobs are (gin re-raises the error as a proxy without its errno)."""
  soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
  previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
  resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, hard))
  try:
    with pytest.raises(SystemExit):
      launch.main(lambda: write_big_config(str(tmp_path)), ["--gin_file=runs/quickstart.gin"],
                  "job")
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    signal.signal(signal.SIGXFSZ, previous_handler)
  assert capsys.readouterr().err.startswith(
      f"job: error: the disk is full writing {tmp_path}/config.gin ([Errno 27] File too large")


def test_the_command_line_prints_one_error_and_no_traceback(tmp_path):
  """A real job failing after it opened its checkpoint manager (Orbax threads running) and
  imported TensorFlow, in a user's environment: no TF_CPP_MIN_LOG_LEVEL, CUDA not hidden."""
  env = {k: v for k, v in os.environ.items()
         if k not in ("TF_CPP_MIN_LOG_LEVEL", "CUDA_VISIBLE_DEVICES")}
  result = subprocess.run(
      [sys.executable, "-m", "t5x_lite.train", "--gin_file=models/gpt2_tiny.gin",
       "--gin_file=runs/pretrain.gin", f"--gin.MODEL_DIR={tmp_path}",
       "--gin.MIXTURE_OR_TASK_NAME=stdlib_clmm"], capture_output=True, text=True, cwd=REPO,
      env=dict(env, JAX_PLATFORMS="cpu", T5X_LITE_TRACEBACK=""), timeout=300)
  assert result.returncode == 1
  assert "Traceback" not in result.stderr and "cannot schedule" not in result.stderr
  # TensorFlow's start-up lines (t5x_lite/quiet_start.py) are gone: the error is all there is.
  for noise in ("oneDNN", "cuInit", "cuda drivers", "TF-TRT", "absl::InitializeLog"):
    assert noise not in result.stderr, result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(
      "python -m t5x_lite.train: error: No task or mixture named 'stdlib_clmm'. Did you mean")
  assert not (tmp_path / "train.lock").exists()
