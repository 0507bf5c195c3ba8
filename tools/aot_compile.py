"""Compile the train step for a TPU slice ahead of time, on any machine (no TPU needed).

    python tools/aot_compile.py --topology v5p:2x2x4 --gin_file=models/llama_1b.gin \\
        --gin.make_mesh.data=1 --gin.make_mesh.fsdp=16 --gin.BATCH_SIZE=64 \\
        --gin.TASK_FEATURE_LENGTHS="{'targets': 2048}"

Builds the Trainer and train step exactly as `python -m t5x_lite.train` does from the same gin
files and flags (model, optimizer, mesh, batch, microbatches, trainable parameters), lays the
mesh over the devices of the TPU topology that libtpu describes, and compiles the step for them
(MaxText's train_compile.py does the same). Nothing runs and nothing is allocated. Printed:
per-device HBM (arguments, temporaries, outputs; XLA's memory analysis) against the chip's HBM,
the compiler's estimated step time and the MFU it implies, and a verdict: "fits", or "does not
fit" with the flags to try (estimates: compile again with them to check).

Without a run gin, runs/pretrain.gin supplies the run's macros (BATCH_SIZE,
TASK_FEATURE_LENGTHS, the optimizer), as for the train job. Needs libtpu:
`pip install -e '.[tpu]'` (jax[tpu], the libtpu release matching the installed jax).
Topology names are libtpu's: v4:2x2x1, v5e:2x2, v5e:4x4, v5p:2x2x1, v5p:2x2x4, v6e:2x2, ...
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import sys
from typing import Optional, Sequence

# Only compiles: the host's backend runs nothing, so no accelerator needs to be initialised,
# and libtpu's lock on the TPU chips (one process at a time) is not needed to describe a slice.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gin  # noqa: E402  pylint: disable=wrong-import-position
import jax  # noqa: E402  pylint: disable=wrong-import-position

from t5x_lite import launch, optimizers, partitioning, scaling  # noqa: E402  pylint: disable=wrong-import-position
from t5x_lite import trainer as trainer_lib  # noqa: E402  pylint: disable=wrong-import-position

GiB = 2 ** 30
DEFAULT_RUN_GIN = "runs/pretrain.gin"


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU chip, from Google Cloud's data sheets: HBM and dense bf16 peak."""
  name: str
  hbm_bytes: float
  bf16_flops: float


# Keyed by the prefix of libtpu's topology names.
CHIPS = {
    "v4": Chip("TPU v4", 32 * GiB, 275e12),
    "v5e": Chip("TPU v5e", 16 * GiB, 197e12),
    "v5p": Chip("TPU v5p", 95 * GiB, 459e12),
    "v6e": Chip("TPU v6e (Trillium)", 32 * GiB, 918e12),
}


class AotError(ValueError):
  """Bad input to the tool: the message says what was wrong and what to do."""


# ---------------------------------------------------------------------------- the slice

def chip_of(topology: str) -> Chip:
  generation = topology.split(":", 1)[0].lower()
  if generation not in CHIPS or ":" not in topology:
    raise AotError(f"--topology {topology!r}: give GENERATION:SHAPE with a generation among "
                   f"{sorted(CHIPS)}, e.g. v5e:2x2, v5p:2x2x4, v4:2x2x1, v6e:4x4.")
  return CHIPS[generation]


def check_libtpu() -> None:
  if importlib.util.find_spec("libtpu") is None:
    raise AotError(
        "libtpu is not installed, and it is what compiles for TPU (on any machine). Install "
        f"the release matching jax {jax.__version__}: pip install -e '.[tpu]' (or pip install "
        f"'jax[tpu]=={jax.__version__}').")


def topology_devices(topology: str) -> list:
  """The devices of the named slice, as libtpu describes them (no TPU needed)."""
  chip_of(topology)
  check_libtpu()
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  try:
    return list(topologies.get_topology_desc(topology_name=topology, platform="tpu").devices)
  except Exception as error:  # pylint: disable=broad-except  (libtpu's JaxRuntimeError)
    raise AotError(f"--topology {topology!r}: libtpu does not know it ({error}). Shapes are "
                   "chips per axis: v5e/v6e take 2D shapes (v5e:2x2, v5e:4x8), v4/v5p 3D ones "
                   "(v4:2x2x1, v5p:2x2x4), each a multiple of a host's chips.") from error


def devices_per_chip(devices: Sequence) -> int:
  """2 on v4 (libtpu lists its two TensorCores as devices), else 1."""
  chips = {tuple(getattr(d, "coords", (d.id,))) for d in devices}
  return max(1, len(devices) // len(chips))


# ---------------------------------------------------------------------------- the train job's objects

def _value(bound):
  """A gin binding's value as the train job receives it (references evaluated)."""
  if isinstance(bound, gin.config.ConfigurableReference):
    return bound.scoped_configurable_fn() if bound.evaluate else bound.scoped_configurable_fn
  return bound


def train_argument(name: str, default=None):
  try:
    return _value(gin.query_parameter(f"train.{name}"))
  except ValueError:  # not bound: the train function's default
    return default


def configure(gin_argv: Sequence[str]) -> list[str]:
  """Parses gin as the train job does, after runs/pretrain.gin when no given file binds
  train.model (a model gin alone). Returns the gin files parsed."""
  flags = launch.parse_flags(list(gin_argv), prog="python tools/aot_compile.py")
  files = list(flags.gin_file)
  launch.configure(files, [], flags.gin_search_paths)
  try:
    gin.query_parameter("train.model")
  except ValueError:
    files.append(DEFAULT_RUN_GIN)
  launch.configure(files, flags.gin_bindings, flags.gin_search_paths)
  return files


def build_trainer(devices: Sequence) -> trainer_lib.Trainer:
  """The train job's Trainer (t5x_lite.train.train's objects, from the same gin bindings) on a
  mesh over `devices`."""
  model = train_argument("model")
  batch_size = train_argument("batch_size")
  lengths = train_argument("task_feature_lengths")
  if not isinstance(batch_size, int) or not lengths:
    raise AotError(f"BATCH_SIZE={batch_size!r}, TASK_FEATURE_LENGTHS={lengths!r}: give both, "
                   "e.g. --gin.BATCH_SIZE=64 --gin.TASK_FEATURE_LENGTHS=\"{'targets': 2048}\".")
  if getattr(model, "frozen_trees", None) is not None:
    raise AotError(f"{type(model).__name__} reads frozen trees that it places on real devices "
                   "(a reference or teacher model); ahead-of-time compiling it is not supported.")
  optimizer = train_argument("optimizer") or optimizers.create_optimizer()
  mesh_fn = train_argument("mesh_fn", partitioning.make_mesh)
  mesh = mesh_fn(devices=devices)
  shapes = scaling.batch_shapes(model, batch_size, dict(lengths))
  # Under the slice's mesh, the model's shape evaluation sees the platform it is built for
  # (TPU kernels such as splash attention check it), not this host's.
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    return trainer_lib.Trainer(model, optimizer, mesh, shapes,
                               train_argument("num_microbatches", 1),
                               trainable=train_argument("trainable"))


# ---------------------------------------------------------------------------- compile and report

def step_time(cost: dict, model_flops_per_device: float) -> tuple[float, str]:
  """(seconds, how) of one step from XLA's cost model (`optimal_seconds`).

  XLA's cost analysis counts a loop's body once, not once per trip, so for a program with the
  layer scan (or the microbatch loop) its time and FLOPs cover one layer. The estimate is then
  the cost model's time per FLOP times the step's model FLOPs; the loop-free program's (an
  unrolled stack, one microbatch) is the cost model's time as it is.
  """
  seconds, flops = float(cost.get("optimal_seconds", 0.0)), float(cost.get("flops", 0.0))
  if seconds <= 0 or flops <= 0:
    return float("nan"), (f"no estimate: XLA's cost model gave optimal_seconds="
                          f"{cost.get('optimal_seconds')}, flops={cost.get('flops')}")
  if flops >= 0.9 * model_flops_per_device:
    return seconds, "XLA's cost model"
  return seconds * model_flops_per_device / flops, (
      f"XLA's cost model, {seconds * 1e3:.3g} ms for {flops / 1e12:.3g} TFLOP with loop bodies "
      "counted once, scaled to the step's model FLOPs")


def compile_report(trainer, chip: Chip, per_chip: int) -> dict:
  """Per-device memory and time of the compiled train step, against the chip's."""
  compiled = scaling.compile_train_step(trainer)
  memory = scaling.xla_memory(compiled)
  cost = compiled.cost_analysis()
  cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
  devices = trainer.mesh.devices.size
  peak = chip.bf16_flops / per_chip  # per device
  flops = trainer.flops_per_step()
  seconds, how = step_time(cost, flops / devices)
  return {"chip": chip.name, "devices": devices, "devices_per_chip": per_chip,
          "mesh": {k: int(v) for k, v in trainer.mesh.shape.items() if v > 1},
          "batch_shapes": trainer.batch_shapes, "num_microbatches": trainer.num_microbatches,
          "remat_policy": trainer.model.config.remat_policy,
          "memory": memory, "hbm_bytes": chip.hbm_bytes / per_chip,
          "peak_flops_per_device": peak, "step_seconds": seconds, "step_time_source": how,
          "model_flops_per_step": flops, "mfu": flops / (seconds * devices * peak),
          "fits": memory["total"] <= chip.hbm_bytes / per_chip}


def advice(report: dict) -> list[str]:
  """Flags that should bring a step that does not fit under the HBM (estimates)."""
  hbm, memory, mesh = report["hbm_bytes"], report["memory"], report["mesh"]
  data, fsdp = mesh.get("data", 1), mesh.get("fsdp", 1)
  arguments = memory["arguments"] + memory["outputs"]
  tips = []
  if data > 1:  # the state is sharded over fsdp only: shard it over the data devices too
    tips.append(f"--gin.make_mesh.data=1 --gin.make_mesh.fsdp={data * fsdp}")
    arguments *= fsdp / (data * fsdp)
  if report["remat_policy"] == "none":
    tips.append("--gin.TransformerConfig.remat_policy=full")
  rows = next(iter(report["batch_shapes"].values()))[0] // (data * fsdp)
  micro = report["num_microbatches"]
  room = 0.9 * hbm - arguments
  if room > 0:
    need = math.ceil(micro * memory["temporaries"] / room)
    fitting = [m for m in range(max(need, micro + 1), rows + 1) if rows % m == 0]
    if fitting and memory["temporaries"] > room:
      tips.append(f"--gin.train.num_microbatches={fitting[0]}")
  if room <= 0 or not tips:
    tips.append("more chips (a larger --topology) or a smaller BATCH_SIZE / model")
  return tips


def _gib(x: float) -> str:
  for unit, scale in (("GiB", GiB), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
    if x >= scale:
      return f"{x / scale:.2f} {unit}"
  return f"{x:.0f} B"


def format_report(report: dict) -> str:
  memory, hbm = report["memory"], report["hbm_bytes"]
  per = "device" if report["devices_per_chip"] == 1 else "device (TensorCore; 2 per v4 chip)"
  lines = [
      f"{report['chip']}: {report['devices']} devices, mesh {report['mesh'] or 'replicated'}, "
      f"batch {' '.join(sorted({str(s) for s in report['batch_shapes'].values()}))}, microbatches {report['num_microbatches']}, remat "
      f"{report['remat_policy']}",
      f"HBM per {per}: arguments {_gib(memory['arguments'])}, temporaries "
      f"{_gib(memory['temporaries'])}, outputs {_gib(memory['outputs'])}; total "
      f"{_gib(memory['total'])} of {_gib(hbm)} ({100 * memory['total'] / hbm:.0f}%)",
      f"estimated step time {report['step_seconds'] * 1e3:.1f} ms ({report['step_time_source']}); "
      f"{report['model_flops_per_step'] / 1e12:.3g} model TFLOP per step: MFU "
      f"{100 * report['mfu']:.1f}% of {report['devices']} x "
      f"{report['peak_flops_per_device'] / 1e12:.0f} TFLOP/s bf16 peak"]
  if report["fits"]:
    lines.append("verdict: fits")
  else:
    lines.append("verdict: does not fit: try " + ", ".join(report["advice"])
                 + " (estimates: compile again with them to check)")
  return "\n".join(lines)


# ---------------------------------------------------------------------------- command line

def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
  parser = argparse.ArgumentParser(prog="python tools/aot_compile.py", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--topology", required=True, help="libtpu topology name, e.g. v5e:4x4")
  parser.add_argument("--json", action="store_true", help="print the report as JSON")
  args, rest = parser.parse_known_args(argv)
  if not any(flag.startswith("--gin_file") for flag in rest):
    parser.error("give the model with --gin_file, e.g. --gin_file=models/llama_1b.gin")
  return args, rest


def run(argv: Optional[Sequence[str]] = None) -> dict:
  """The report of one compile (raises AotError / ValueError on bad input)."""
  args, gin_argv = parse_args(sys.argv[1:] if argv is None else argv)
  chip = chip_of(args.topology)
  devices = topology_devices(args.topology)  # before any gin work: a bad name fails first
  configure(gin_argv)
  report = compile_report(build_trainer(devices), chip, devices_per_chip(devices))
  report["topology"] = args.topology
  if not report["fits"]:
    report["advice"] = advice(report)
  print(json.dumps(report, indent=1, default=str) if args.json else format_report(report))
  return report


def main(argv: Optional[Sequence[str]] = None) -> int:
  try:
    run(argv)
  except launch.KNOWN_ERRORS as error:
    if os.environ.get("T5X_LITE_TRACEBACK"):
      raise
    print(f"aot_compile.py: error: {launch.error_message(error)}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
