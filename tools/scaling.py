#!/usr/bin/env python3
"""Scaling-law tools: what a config costs, what a compute budget should buy, and a sweep that
fits its own law. Sub-commands (each adds its own flags; --json prints JSON instead of tables):

  params  total, embedding, non-embedding and active parameters of a gin config
          python tools/scaling.py params --gin_file=models/llama_1b.gin
  flops   training FLOPs per step and per token, as the trainer counts them for MFU
          python tools/scaling.py flops --gin_file=models/gpt2_small.gin --batch_size 512 \\
            --lengths targets=1024
  memory  per-device memory of a train step for a mesh, batch, optimizer and remat policy (the
          train job's own estimate; --xla compiles the step and adds XLA's memory analysis)
          python tools/scaling.py memory --gin_file=models/llama_1b.gin --devices 64 \\
            --gin.make_mesh.data=1 --gin.make_mesh.fsdp=64 --batch_size 256 \\
            --lengths targets=2048 --gin.TransformerConfig.remat_policy=full
  plan    compute-optimal parameters and tokens for a budget (Hoffmann et al. 2022's 20
          tokens/param and approach-3 law, Besiroglu et al. 2024's refit), the nearest shape of
          the gin config's architecture and the flags that train it
          python tools/scaling.py plan --flops 1e21
          python tools/scaling.py plan --chip_hours 1000 --chip v5p --mfu 0.4 \\
            --gin_file=models/llama_1b.gin --batch_size 512 --lengths targets=2048
  sweep   trains a grid of model sizes on IsoFLOP budgets with the real train job
          (`python -m t5x_lite.train`), collects their final validation losses, fits L(N, D)
          with Hoffmann et al.'s Huber objective and draws the IsoFLOP curves to a PNG
          python tools/scaling.py sweep --dry_run
          python tools/scaling.py sweep --output_dir /tmp/t5x_lite_scaling

Model and run options are gin flags, as for the train job: --gin_file (repeatable),
--gin.NAME=VALUE, --gin_search_paths. Budgets count FLOPs as the trainer does for MFU.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from typing import Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from t5x_lite import scaling  # pylint: disable=wrong-import-position  (imports no jax)

DEFAULT_GIN_FILE = {"plan": "models/llama_1b.gin", "sweep": "runs/quickstart.gin"}
DEFAULT_SIZES = ("32x1", "32x2", "64x2", "96x3")  # d_model x num_layers
DEFAULT_BUDGETS = (2e11, 6e11, 2e12)  # training FLOPs per run


# ---------------------------------------------------------------------------- flags and gin

def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python tools/scaling.py", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  commands = parser.add_subparsers(dest="command", required=True)
  for name in ("params", "flops", "memory", "plan", "sweep"):
    command = commands.add_parser(name)
    command.add_argument("--json", action="store_true", help="print JSON instead of tables")
    if name in ("flops", "memory", "plan"):
      command.add_argument("--batch_size", type=int,
                           help="global batch (default: the gin BATCH_SIZE, else 8; plan: 256)")
      command.add_argument("--lengths", nargs="+", metavar="FEATURE=LENGTH",
                           help="e.g. targets=2048 or inputs=512 targets=114 (default: the gin "
                                "TASK_FEATURE_LENGTHS, else the model's max_length up to 2048)")
  memory = commands.choices["memory"]
  memory.add_argument("--devices", type=int, default=1,
                      help="simulated CPU devices for the mesh (make_mesh.* from gin)")
  memory.add_argument("--num_microbatches", type=int, default=1)
  memory.add_argument("--xla", action="store_true",
                      help="also compile the step and report XLA's memory analysis")
  plan = commands.choices["plan"]
  plan.add_argument("--flops", type=float, help="training budget in FLOPs")
  plan.add_argument("--chip_hours", type=float, help="or: chip-hours of --chip at --mfu")
  plan.add_argument("--chip", help="e.g. v5p, v4, h100 (a unique part of a known chip name)")
  plan.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation (0, 1]")
  sweep = commands.choices["sweep"]
  sweep.add_argument("--sizes", nargs="+", default=list(DEFAULT_SIZES), metavar="DxL",
                     help="d_model x num_layers of each model (the gin config's architecture)")
  sweep.add_argument("--budgets", nargs="+", type=float, default=list(DEFAULT_BUDGETS),
                     help="training FLOPs of each IsoFLOP curve")
  sweep.add_argument("--batch_size", type=int, default=8)
  sweep.add_argument("--length", type=int, default=128, help="targets length of each row")
  sweep.add_argument("--eval_batches", type=int, default=16)
  sweep.add_argument("--output_dir", default="/tmp/t5x_lite_scaling")
  sweep.add_argument("--starts", type=int, default=32, help="L-BFGS starts of the fit")
  sweep.add_argument("--dry_run", action="store_true", help="print the grid and its FLOPs only")
  return parser


def parse_args(argv: Optional[Sequence[str]]):
  """(tool flags, gin flags): what the sub-command does not know is for gin."""
  args, rest = _parser().parse_known_args(argv)
  if not any(flag.startswith("--gin_file") for flag in rest):
    if args.command not in DEFAULT_GIN_FILE:
      raise SystemExit(f"scaling.py {args.command}: give the model with --gin_file, e.g. "
                       "--gin_file=models/llama_1b.gin (any preset in gin_configs/models/).")
    rest = [f"--gin_file={DEFAULT_GIN_FILE[args.command]}"] + rest
  return args, rest


def configure(gin_argv: Sequence[str], extra_bindings: Sequence[str] = ()) -> None:
  """Parses gin files and bindings exactly as the train job does."""
  from t5x_lite import launch  # pylint: disable=g-import-not-at-top
  flags = launch.parse_flags(list(gin_argv), prog="python tools/scaling.py")
  launch.configure(flags.gin_file, list(flags.gin_bindings) + list(extra_bindings),
                   flags.gin_search_paths)


def configured_model():
  import gin  # pylint: disable=g-import-not-at-top
  try:
    return gin.query_parameter("%MODEL").scoped_configurable_fn()
  except ValueError:
    raise SystemExit("The gin files define no MODEL; give a model preset first, e.g. "
                     "--gin_file=models/gpt2_small.gin.") from None


def _macro(name: str, default):
  import gin  # pylint: disable=g-import-not-at-top
  try:
    return gin.query_parameter(f"%{name}")
  except ValueError:
    return default


def _lengths(model, flags: Optional[Sequence[str]]) -> dict[str, int]:
  if flags:
    try:
      return {k: int(v) for k, v in (flag.split("=", 1) for flag in flags)}
    except ValueError:
      raise SystemExit(f"--lengths {' '.join(flags)}: write FEATURE=LENGTH, e.g. "
                       "--lengths inputs=512 targets=114.") from None
  default = min(model.config.max_length, 2048)
  return dict(_macro("TASK_FEATURE_LENGTHS", {"inputs": default, "targets": default}))


def _shapes(model, args, default_batch: int = 8) -> dict[str, tuple]:
  batch = args.batch_size or _macro("BATCH_SIZE", default_batch)
  return scaling.batch_shapes(model, batch, _lengths(model, args.lengths))


# ---------------------------------------------------------------------------- output

def _table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
  lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def _si(x: float) -> str:
  for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
    if abs(x) >= scale:
      return f"{x / scale:.3g}{unit}"
  return f"{x:.3g}"


def _bytes(x: float) -> str:
  for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
    if x >= scale:
      return f"{x / scale:.3g} {unit}"
  return f"{x:.0f} B"


def _emit(args, data: dict, text: str) -> None:
  print(json.dumps(data, indent=1) if args.json else text)


# ---------------------------------------------------------------------------- sub-commands

def cmd_params(args, gin_argv) -> dict:
  configure(gin_argv)
  model = configured_model()
  counts = scaling.tree_param_counts(model).as_dict()
  _emit(args, counts, _table(["total", "embedding", "non-embedding", "active"],
                             [[f"{counts[k]:,}" for k in ("total", "embedding",
                                                          "non_embedding", "active")]]))
  return counts


def cmd_flops(args, gin_argv) -> dict:
  configure(gin_argv)
  model = configured_model()
  shapes = _shapes(model, args)
  step = scaling.flops_per_step(model, shapes)
  tokens = scaling.tokens_per_step(shapes)
  params = scaling.tree_param_counts(model).total
  data = {"batch_shapes": shapes, "flops_per_step": step, "tokens_per_step": tokens,
          "flops_per_token": step / tokens, "six_n": 6.0 * params}
  _emit(args, data, _table(
      ["batch", "tokens/step", "FLOPs/step", "FLOPs/token", "6N (Kaplan's approximation)"],
      [[shapes, f"{tokens:,}", f"{step:.4g}", f"{step / tokens:.4g}", f"{6.0 * params:.4g}"]]))
  return data


def cmd_memory(args, gin_argv) -> dict:
  configure(gin_argv)
  from t5x_lite import optimizers, partitioning, trainer as trainer_lib  # pylint: disable=g-import-not-at-top
  model = configured_model()
  shapes = _shapes(model, args)
  mesh = partitioning.make_mesh()
  trainer = trainer_lib.Trainer(model, optimizers.create_optimizer(), mesh, shapes,
                                args.num_microbatches)
  data = {"mesh": dict(mesh.shape), "batch_shapes": shapes,
          "remat_policy": model.config.remat_policy, "estimate": scaling.estimate_memory(trainer)}
  text = (f"mesh {data['mesh']}, batch {shapes}, remat {data['remat_policy']}\n"
          + _table(["per device"] + list(data["estimate"]),
                   [["estimate"] + [_bytes(v) for v in data["estimate"].values()]]))
  if args.xla:
    data["xla"] = scaling.xla_memory(scaling.compile_train_step(trainer))
    text += "\n\n" + _table(["per device"] + list(data["xla"]),
                              [["XLA memory_analysis"] + [_bytes(v) for v in data["xla"].values()]])
  _emit(args, data, text)
  return data


def _budget(args) -> float:
  if args.flops is not None:
    return args.flops
  if args.chip_hours is None or args.chip is None:
    raise SystemExit("plan: give --flops, or --chip_hours with --chip (and --mfu).")
  return scaling.budget_flops(args.chip_hours, args.chip, args.mfu)


def cmd_plan(args, gin_argv) -> dict:
  flops = _budget(args)
  configure(gin_argv)
  model = configured_model()
  shapes = _shapes(model, args, default_batch=256)
  batch = next(iter(shapes.values()))[0]
  row_tokens = scaling.tokens_per_step(shapes) // batch
  rows = scaling.plan(flops)
  for row in rows:
    shape = scaling.nearest_shape(model.config, row["params"])
    row["shape"] = scaling.shape_dict(shape)
    row["shape_params"] = scaling.count_params(shape).total
    row["gin_flags"] = scaling.gin_flags(shape, row["tokens"], batch, row_tokens)
  data = {"flops": flops, "batch_size": batch, "row_tokens": row_tokens, "plans": rows,
          "laws": {law.name: law.as_dict() for law in scaling.LAWS.values()}}
  table = _table(
      ["method", "params N", "tokens D", "D/N", "predicted loss", "nearest shape", "its params"],
      [[r["method"], _si(r["params"]), _si(r["tokens"]), f"{r['tokens_per_param']:.1f}",
        f"{r['loss']:.3f}", " ".join(f"{k}={v}" for k, v in r["shape"].items()),
        _si(r["shape_params"])] for r in rows])
  flags = "\n".join(f"{r['method']}: {' '.join(r['gin_flags'])}" for r in rows)
  _emit(args, data, f"budget {flops:.3g} FLOPs (C = 6 N D); predicted losses are on "
        f"Hoffmann et al.'s data, not ours\n{table}\n\n{flags}")
  return data


# ---------------------------------------------------------------------------- sweep

def _size(text: str) -> tuple[int, int]:
  try:
    d_model, layers = (int(x) for x in text.lower().split("x"))
    return d_model, layers
  except ValueError:
    raise SystemExit(f"--sizes {text!r}: write d_model x num_layers, e.g. 64x2.") from None


def sweep_grid(args, gin_argv) -> list[dict]:
  """One row per (budget, size): the model, its steps and the bindings that train it."""
  grid = []
  lengths = {"targets": args.length}
  for text in args.sizes:
    configure(gin_argv)
    base = configured_model().config
    shape = scaling.shape_dict(scaling.scaled_config(base, *_size(text)))
    shape_bindings = [f"TransformerConfig.{k} = {v}" for k, v in shape.items()]
    configure(gin_argv, shape_bindings)
    model = configured_model()
    shapes = scaling.batch_shapes(model, args.batch_size, lengths)
    step_flops = scaling.flops_per_step(model, shapes)
    params = scaling.tree_param_counts(model)
    for budget in args.budgets:
      steps = max(1, round(budget / step_flops))
      grid.append({"name": f"C{budget:.0e}_{text}".replace("+", ""), "budget": budget,
                   "size": text, "shape": shape, "params": params.total,
                   "non_embedding": params.non_embedding, "steps": steps,
                   "tokens": steps * scaling.tokens_per_step(shapes),
                   "flops": steps * step_flops, "flops_per_token":
                   step_flops / scaling.tokens_per_step(shapes)})
  return grid


def _job_flags(run: dict, args, gin_argv, model_dir: str) -> list[str]:
  steps = run["steps"]
  flags = list(gin_argv) + [f"--gin.TransformerConfig.{k}={v}" for k, v in run["shape"].items()]
  return flags + [
      f"--gin.MODEL_DIR={model_dir}", f"--gin.TRAIN_STEPS={steps}",
      f"--gin.BATCH_SIZE={args.batch_size}",
      f"--gin.TASK_FEATURE_LENGTHS={{'targets': {args.length}}}",
      "--gin.train.sample_prompts=[]", f"--gin.train.eval_every={steps}",
      f"--gin.train.eval_batches={args.eval_batches}", f"--gin.train.checkpoint_every={steps}",
      f"--gin.train.log_every={max(1, steps // 5)}",
      # Hoffmann et al. match the cosine cycle to each run's length; warm up over a tenth of it.
      f"--gin.create_schedule.warmup_steps={max(1, min(50, steps // 10))}",
  ]


def final_validation_loss(model_dir: str, step: int) -> Optional[float]:
  """The validation loss the job wrote at `step`, or None if it has not got there."""
  from plot_metrics import read_scalars  # pylint: disable=g-import-not-at-top
  path = os.path.join(model_dir, "validation")
  if not os.path.isdir(path):
    return None
  losses = dict(read_scalars(path).get("loss", []))
  return losses.get(step)


def run_job(run: dict, args, gin_argv) -> dict:
  """Trains one grid point with the train job (resuming, or skipping one already done)."""
  model_dir = os.path.join(os.path.abspath(args.output_dir), run["name"])
  flags = _job_flags(run, args, gin_argv, model_dir)
  _check_same_run(model_dir, flags)
  loss = final_validation_loss(model_dir, run["steps"])
  seconds = None
  if loss is None:
    start = time.perf_counter()
    with open(os.path.join(model_dir, "train.log"), "w") as log:
      status = subprocess.call([sys.executable, "-m", "t5x_lite.train"] + flags, stdout=log,
                               stderr=subprocess.STDOUT, cwd=ROOT)
    seconds = time.perf_counter() - start
    loss = final_validation_loss(model_dir, run["steps"])
    if status or loss is None:
      raise SystemExit(f"The train job for {run['name']} failed (status {status}); see "
                       f"{model_dir}/train.log.")
  return dict(run, loss=loss, seconds=seconds, model_dir=model_dir)


def _check_same_run(model_dir: str, flags: Sequence[str]) -> None:
  """A run directory is reused only for the same job flags (names do not say the batch, the
  length or the gin flags)."""
  path = os.path.join(model_dir, "sweep_flags.json")
  if os.path.exists(path):
    with open(path) as f:
      if json.load(f) != list(flags):
        raise SystemExit(f"{model_dir} holds a run with other flags (see {path}); give the sweep "
                         "another --output_dir.")
    return
  os.makedirs(model_dir, exist_ok=True)
  with open(path, "w") as f:
    json.dump(list(flags), f, indent=1)


def analyse(runs: Sequence[dict], starts: int) -> dict:
  """The fitted law, its compute-optimal frontier at each budget (under the sweep's own FLOPs per
  token and under C = 6 N D) and approach 2's IsoFLOP minima."""
  params = [r["params"] for r in runs]
  law = scaling.fit_law(params, [r["tokens"] for r in runs], [r["loss"] for r in runs],
                        starts=starts, name="sweep")
  cost = scaling.FlopsPerToken.fit(params, [r["flops_per_token"] for r in runs])
  frontier = []
  for budget in sorted({r["budget"] for r in runs}):
    curve = sorted((r for r in runs if r["budget"] == budget), key=lambda r: r["params"])
    n, d = scaling.constrained_optimum(law, budget, cost)
    n6, d6 = law.optimum(budget)
    isoflop = (scaling.isoflop_minimum([r["params"] for r in curve], [r["loss"] for r in curve])
               if len(curve) >= 3 else float("nan"))
    frontier.append({"budget": budget, "params": n, "tokens": d, "tokens_per_param": d / n,
                     "params_6nd": n6, "tokens_per_param_6nd": d6 / n6,
                     "isoflop_params": isoflop})
  return {"law": law.as_dict(), "a": law.beta / (law.alpha + law.beta),
          "flops_per_token": {"k": cost.k, "p": cost.p}, "frontier": frontier,
          "notes": _caveats(law, runs, frontier)}


def _caveats(law: scaling.Law, runs: Sequence[dict], frontier: Sequence[dict]) -> list[str]:
  """What the sweep's points do not pin down."""
  notes = []
  if law.E < 0.05 * min(r["loss"] for r in runs):
    notes.append(f"E fitted as {law.E:.3g}: these points do not determine the irreducible "
                 "loss, and alpha and beta trade off against it; train longer or larger.")
  low, high = min(r["params"] for r in runs), max(r["params"] for r in runs)
  for point in frontier:
    if not low <= point["params"] <= high:
      notes.append(f"At C = {point['budget']:.1e} the fitted optimum N = "
                   f"{point['params']:.3g} lies outside the sizes tried ({low:,} to {high:,}): "
                   "an extrapolation; add sizes towards it.")
    if not low <= point["isoflop_params"] <= high:  # also NaN: no valley at all
      notes.append(f"At C = {point['budget']:.1e} the runs bracket no IsoFLOP minimum: it lies "
                   "outside the sizes tried.")
  return notes


def draw(runs: Sequence[dict], result: dict, path: str) -> str:
  """IsoFLOP curves (measured and fitted) and the fitted compute-optimal frontier."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  law = scaling.Law(**result["law"])
  cost = scaling.FlopsPerToken(**result["flops_per_token"])
  figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
  sizes = [r["params"] for r in runs] + [p["params"] for p in result["frontier"]]
  grid = np.geomspace(min(sizes) / 1.5, max(sizes) * 1.5, 200)
  colors = plt.cm.viridis(np.linspace(0, 0.85, len(result["frontier"])))
  for point, color in zip(result["frontier"], colors):
    curve = sorted((r for r in runs if r["budget"] == point["budget"]), key=lambda r: r["params"])
    label = f"C = {point['budget']:.1e}"
    left.plot([r["params"] for r in curve], [r["loss"] for r in curve], "o", color=color,
              label=label)
    left.plot(grid, law.loss(grid, point["budget"] / cost(grid)), "-", color=color, alpha=0.7)
    left.plot(point["params"], law.loss(point["params"], point["tokens"]), "*", color=color,
              markersize=14)
  left.set(xscale="log", xlabel="parameters N", ylabel="final validation loss",
           title="IsoFLOP curves: runs (dots), fitted law (lines), its optimum (stars)")
  left.legend()
  budgets = np.array([p["budget"] for p in result["frontier"]])
  span = np.geomspace(budgets.min() / 3, budgets.max() * 3, 50)
  right.plot(span, [scaling.constrained_optimum(law, c, cost)[0] for c in span], "-",
             label="fitted law, this sweep's FLOPs/token")
  right.plot(span, [law.optimum(c)[0] for c in span], "--", label="fitted law, C = 6ND")
  right.plot(span, [scaling.fixed_ratio_optimum(c)[0] for c in span], ":",
             label="20 tokens/param, C = 6ND")
  right.plot(budgets, [p["isoflop_params"] for p in result["frontier"]], "kx", markersize=10,
             label="IsoFLOP parabola minima (approach 2)")
  right.set(xscale="log", yscale="log", xlabel="training FLOPs C", ylabel="optimal N",
            title=f"alpha {law.alpha:.3f}, beta {law.beta:.3f}, N_opt ~ C^{result['a']:.3f}")
  right.legend()
  figure.tight_layout()
  figure.savefig(path, dpi=110)
  plt.close(figure)
  return path


def cmd_sweep(args, gin_argv) -> dict:
  grid = sweep_grid(args, gin_argv)
  headers = ["run", "params", "steps", "tokens", "D/N", "FLOPs"]
  cells = lambda r: [r["name"], f"{r['params']:,}", r["steps"], f"{r['tokens']:,}",
                     f"{r['tokens'] / r['params']:.1f}", f"{r['flops']:.3g}"]
  total = sum(r["flops"] for r in grid)
  if args.dry_run:
    _emit(args, {"runs": grid, "total_flops": total},
          _table(headers, [cells(r) for r in grid]) + f"\n\ntotal {total:.3g} FLOPs")
    return {"runs": grid}
  runs = []
  for run in grid:
    runs.append(run_job(run, args, gin_argv))
    print(f"{run['name']}: loss {runs[-1]['loss']:.4f}", file=sys.stderr, flush=True)
  result = analyse(runs, args.starts)
  result["figure"] = draw(runs, result, os.path.join(args.output_dir, "isoflop.png"))
  data = {"runs": runs, "total_flops": total, **result}
  with open(os.path.join(args.output_dir, "sweep.json"), "w") as f:
    json.dump(data, f, indent=1)
  law = result["law"]
  text = (_table(headers + ["val loss", "s"], [cells(r) + [f"{r['loss']:.4f}", _seconds(r)]
                                               for r in runs])
          + f"\n\nfitted L(N, D) = {law['E']:.3f} + {law['A']:.4g} / N^{law['alpha']:.3f} + "
          f"{law['B']:.4g} / D^{law['beta']:.3f}\n\n"
          + _table(["budget", "N_opt", "D_opt/N_opt", "N_opt (6ND)", "D/N (6ND)",
                    "IsoFLOP minimum N"],
                   [[f"{p['budget']:.1e}", _si(p["params"]), f"{p['tokens_per_param']:.1f}",
                     _si(p["params_6nd"]), f"{p['tokens_per_param_6nd']:.1f}",
                     _si(p["isoflop_params"]) if math.isfinite(p["isoflop_params"]) else "none"]
                    for p in result["frontier"]])
          + "".join(f"\n- {note}" for note in result["notes"])
          + f"\n\nfigure: {result['figure']}")
  _emit(args, data, text)
  return data


def _seconds(run: dict) -> str:
  return "done before" if run["seconds"] is None else f"{run['seconds']:.0f}"


COMMANDS = {"params": cmd_params, "flops": cmd_flops, "memory": cmd_memory, "plan": cmd_plan,
            "sweep": cmd_sweep}


def _simulate_devices(count: int) -> None:
  """On CPU, `count` simulated devices for the mesh (must run before jax is imported)."""
  if os.environ.get("JAX_PLATFORMS", "cpu") == "cpu" and count > 1:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={count}").strip()


def main(argv: Optional[Sequence[str]] = None) -> dict:
  args, gin_argv = parse_args(argv)
  _simulate_devices(getattr(args, "devices", 1))
  return COMMANDS[args.command](args, gin_argv)


if __name__ == "__main__":
  main()
