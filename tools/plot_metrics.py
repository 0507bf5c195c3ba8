"""Plot a run's curves: `python tools/plot_metrics.py MODEL_DIR [--output metrics.png]`.

Reads the TensorBoard event files that `t5x_lite.train` writes to MODEL_DIR/train and
MODEL_DIR/validation, and draws train and validation loss (and accuracy) against the step into
one PNG (default MODEL_DIR/metrics.png). For an RL run (runs/grpo.gin, runs/ppo.gin) a second
row draws its reward (train: the sampled responses', mean +- std; validation: the greedy ones'),
KL to the reference and clip fraction, and, for PPO, the value head's explained variance.
Needs matplotlib.
"""
from __future__ import annotations

import argparse
import glob
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # t5x_lite


def read_scalars(event_dir: str) -> dict[str, list[tuple[int, float]]]:
  """{tag: [(step, value), ...]} from every event file in `event_dir`, sorted by step."""
  from t5x_lite.quiet_start import import_tensorflow  # pylint: disable=g-import-not-at-top
  tf = import_tensorflow()  # without its start-up lines
  from tensorflow.core.util import event_pb2  # pylint: disable=g-import-not-at-top
  scalars: dict[str, dict[int, float]] = {}
  for path in sorted(glob.glob(os.path.join(event_dir, "events.out.tfevents.*"))):
    for record in tf.data.TFRecordDataset(path):
      event = event_pb2.Event.FromString(record.numpy())
      for value in event.summary.value:
        number = (float(tf.make_ndarray(value.tensor)) if value.HasField("tensor")
                  else value.simple_value)
        scalars.setdefault(value.tag, {})[event.step] = number  # a resumed run overwrites
  return {tag: sorted(points.items()) for tag, points in scalars.items()}


# Loss-curve panels, then the RL panels a run has: (tag, y-axis label).
LOSS_PANELS = (("loss", "loss (cross entropy, nats per target token)"),
               ("accuracy", "accuracy (next-token argmax)"))
RL_PANELS = (("reward/mean", "reward (mean per response)"),
             ("kl", "KL to the reference (nats per token)"),
             ("clip_fraction", "clip fraction (share of tokens)"),
             ("explained_variance", "value head: explained variance"))


def rl_panels(runs: dict[str, dict]) -> list[tuple[str, str]]:
  """The RL panels whose tag any of `runs` ({name: {tag: points}}) has, in RL_PANELS order."""
  return [(tag, label) for tag, label in RL_PANELS
          if any(tag in scalars for scalars in runs.values())]


def _draw(axis, runs: dict[str, dict], tag: str, label: str) -> None:
  for name, scalars in runs.items():
    if tag not in scalars:
      continue
    steps, values = np.array(scalars[tag]).T
    line, = axis.plot(steps, values, marker="o" if name == "validation" else None, label=name)
    spread = dict(scalars.get("reward/std", [])) if tag == "reward/mean" else {}
    if spread and name == "train":  # the sampled rewards' spread within each logged step
      std = np.array([spread.get(s, 0.0) for s in steps])
      axis.fill_between(steps, values - std, values + std, color=line.get_color(), alpha=0.15)
  axis.set_xlabel("step")
  axis.set_ylabel(label)
  axis.grid(alpha=0.3)
  axis.legend()


def plot(model_dir: str, output: str | None = None) -> str:
  """Writes the PNG and returns its path."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")  # no display needed
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  runs = {name: read_scalars(os.path.join(model_dir, name)) for name in ("train", "validation")}
  if not any(runs.values()):
    raise FileNotFoundError(f"No metrics in {model_dir}/train or {model_dir}/validation; is it "
                            "the MODEL_DIR of a t5x_lite.train run?")
  rows = [list(LOSS_PANELS)] + ([rl_panels(runs)] if rl_panels(runs) else [])
  columns = max(map(len, rows))
  figure, axes = plt.subplots(len(rows), columns, figsize=(5.5 * columns, 4 * len(rows)),
                              squeeze=False)
  for row, panels in enumerate(rows):
    for column in range(columns):
      if column < len(panels):
        _draw(axes[row][column], runs, *panels[column])
      else:
        axes[row][column].axis("off")
  figure.suptitle(os.path.basename(os.path.abspath(model_dir)))
  figure.tight_layout()
  output = output or os.path.join(model_dir, "metrics.png")
  figure.savefig(output, dpi=100)
  plt.close(figure)
  return output


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("model_dir")
  parser.add_argument("--output", help="PNG path (default MODEL_DIR/metrics.png)")
  args = parser.parse_args(argv)
  print(plot(args.model_dir, args.output))


if __name__ == "__main__":
  sys.exit(main())
