"""Plot a run's loss curves: `python tools/plot_metrics.py MODEL_DIR [--output loss.png]`.

Reads the TensorBoard event files that `t5x_lite.train` writes to MODEL_DIR/train and
MODEL_DIR/validation, and draws train and validation loss (and accuracy) against the step into
one PNG (default MODEL_DIR/metrics.png). Needs matplotlib.
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
  from t5x_lite.quiet_tf import import_tensorflow  # pylint: disable=g-import-not-at-top
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


def plot(model_dir: str, output: str | None = None) -> str:
  """Writes the PNG and returns its path."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")  # no display needed
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  runs = {name: read_scalars(os.path.join(model_dir, name)) for name in ("train", "validation")}
  if not any(runs.values()):
    raise FileNotFoundError(f"No metrics in {model_dir}/train or {model_dir}/validation; is it "
                            "the MODEL_DIR of a t5x_lite.train run?")
  figure, axes = plt.subplots(1, 2, figsize=(11, 4))
  for axis, tag in zip(axes, ("loss", "accuracy")):
    for name, scalars in runs.items():
      if tag in scalars:
        steps, values = np.array(scalars[tag]).T
        axis.plot(steps, values, marker="o" if name == "validation" else None, label=name)
    axis.set_xlabel("step")
    axis.set_ylabel({"loss": "loss (cross entropy, nats per target token)",
                     "accuracy": "accuracy (next-token argmax)"}[tag])
    axis.grid(alpha=0.3)
    axis.legend()
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
