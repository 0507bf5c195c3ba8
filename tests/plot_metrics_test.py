"""tools/plot_metrics.py: the loss panels of any run, and an RL run's reward / KL / clip
fraction (and PPO's explained variance) from its TensorBoard events."""
import os
import sys

import numpy as np

from t5x_lite import metrics as metrics_lib

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "tools"))
import plot_metrics  # pylint: disable=g-import-not-at-top,wrong-import-position


def write_run(directory, train_tags):
  train = metrics_lib.MetricsWriter(str(directory), "train")
  for step in (10, 20, 30):
    train.write(step, {tag: 0.01 * step for tag in train_tags})
  metrics_lib.MetricsWriter(str(directory), "validation").write(30, {"loss": 0.5,
                                                                     "reward/mean": 0.4})


def test_rl_runs_get_their_curves_and_others_do_not(tmp_path):
  ppo = ("loss", "accuracy", "reward/mean", "reward/std", "kl", "clip_fraction",
         "explained_variance", "value_loss")
  write_run(tmp_path / "ppo", ppo)
  runs = {name: plot_metrics.read_scalars(str(tmp_path / "ppo" / name))
          for name in ("train", "validation")}
  steps, values = zip(*runs["train"]["kl"])
  assert steps == (10, 20, 30)
  np.testing.assert_allclose(values, [0.1, 0.2, 0.3], rtol=1e-6)  # written as float32
  assert [tag for tag, _ in plot_metrics.rl_panels(runs)] == [
      "reward/mean", "kl", "clip_fraction", "explained_variance"]
  assert os.path.getsize(plot_metrics.plot(str(tmp_path / "ppo"))) > 10_000

  write_run(tmp_path / "lm", ("loss", "accuracy"))
  lm = {"train": plot_metrics.read_scalars(str(tmp_path / "lm" / "train"))}
  assert plot_metrics.rl_panels(lm) == []


def test_compare_overlays_the_validation_curves_of_several_runs(tmp_path):
  for name in ("dense", "moe"):
    validation = metrics_lib.MetricsWriter(str(tmp_path / name), "validation")
    for step in (0, 100, 200):
      validation.write(step, {"cross_entropy": 5.0 - step / 100, "loss": 5.1 - step / 100,
                              "accuracy": step / 1000})
  out = plot_metrics.compare({"dense": str(tmp_path / "dense"), "moe": str(tmp_path / "moe")},
                             str(tmp_path / "cmp.png"))
  assert os.path.getsize(out) > 10_000
  try:
    plot_metrics.main(["--compare", "dense=" + str(tmp_path / "dense"), "moe"])
  except SystemExit as e:  # no --output and a pair without its directory: refused
    assert e.code == 2
  else:
    raise AssertionError("--compare without --output was accepted")
