"""Plot a run's curves: `python tools/plot_metrics.py MODEL_DIR [--output metrics.png]`.

Or compare runs: `python tools/plot_metrics.py --compare dense=DIR moe=DIR --output cmp.png`
draws each run's validation cross entropy, loss and accuracy against the step, one line a run
(the runs of one sweep or ablation, e.g. dense against MoE at the same active size).

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


# Validation panels of a comparison: cross entropy alone, then loss (with the z-loss and any
# auxiliary losses, such as MoE balance terms, that only some of the runs pay), then accuracy.
COMPARE_PANELS = (("cross_entropy", "validation cross entropy (nats per target token)"),
                  ("loss", "validation loss (with z-loss and auxiliary losses)"),
                  ("accuracy", "validation accuracy (next-token argmax)"))


def compare(runs: dict[str, str], output: str, title: str | None = None) -> str:
  """{label: MODEL_DIR} -> one PNG of their validation curves (step 0, before training, left
  out so the scale shows the differences); returns its path."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  curves = {}
  for label, model_dir in runs.items():
    scalars = read_scalars(os.path.join(model_dir, "validation"))
    if not scalars:
      raise FileNotFoundError(f"No validation metrics in {model_dir}/validation (run {label!r}); "
                              "is it the MODEL_DIR of a t5x_lite.train run that validated?")
    curves[label] = {tag: [p for p in points if p[0] > 0] for tag, points in scalars.items()}
  panels = [(tag, label) for tag, label in COMPARE_PANELS
            if any(tag in scalars for scalars in curves.values())]
  figure, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.5), squeeze=False)
  for axis, (tag, label) in zip(axes[0], panels):
    _draw(axis, curves, tag, label)
    for line in axis.get_lines():
      line.set_marker("o")
  figure.suptitle(title or " vs ".join(runs))
  figure.tight_layout()
  figure.savefig(output, dpi=90)
  plt.close(figure)
  return output


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("model_dir", nargs="?")
  parser.add_argument("--output", help="PNG path (default MODEL_DIR/metrics.png)")
  parser.add_argument("--compare", nargs="+", metavar="LABEL=MODEL_DIR",
                      help="overlay these runs' validation curves instead (needs --output)")
  parser.add_argument("--title", help="the comparison's title (default: its labels)")
  args = parser.parse_args(argv)
  if args.compare:
    pairs = [item.partition("=") for item in args.compare]
    if args.model_dir or not args.output or any(not label or not d for label, _, d in pairs):
      parser.error("--compare takes LABEL=MODEL_DIR pairs and --output, and no MODEL_DIR, e.g. "
                   "--compare dense=/tmp/q_dense moe=/tmp/q_moe8 --output cmp.png")
    print(compare({label: d for label, _, d in pairs}, args.output, args.title))
  elif args.model_dir:
    print(plot(args.model_dir, args.output))
  else:
    parser.error("give a MODEL_DIR, or --compare LABEL=MODEL_DIR ... --output PNG")


if __name__ == "__main__":
  sys.exit(main())
