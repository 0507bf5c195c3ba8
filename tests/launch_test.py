"""The command line every job shares: gin flags, configuration, refusals of typos."""
import pytest

from t5x_lite import launch


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
