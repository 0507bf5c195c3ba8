"""`tools/benchmark.py data`: packed tokens/s of the input pipeline for each task, as the trainer
would receive them (and, with --resume-at, the seconds from a resume to its first batch per
resume tier: tools/benchmark_resume.py).

  python tools/benchmark.py data --tasks stdlib_clm stdlib_span_corruption --batches 50
  python tools/benchmark.py data --resume-at 0 10000 1000000
"""
from __future__ import annotations

import ast
import os
import time

# T5X-style training lengths for each registered task (the pipeline's cost depends on them).
DATA_LENGTHS = {
    "clm": {"targets": 512},
    "prefix_lm": {"inputs": 256, "targets": 256},
    "span_corruption": {"inputs": 512, "targets": 114},
    "mlm": {"inputs": 512, "targets": 512},
    "code_to_docstring": {"inputs": 512, "targets": 64},
    "addition": {"inputs": 48, "targets": 16},
    "stdlib_span_corruption_prefix_lm": {"inputs": 512, "targets": 114},
}
DEFAULT_DATA_TASKS = ("stdlib_clm", "stdlib_prefix_lm", "stdlib_span_corruption", "stdlib_mlm",
                      "code_to_docstring", "addition", "stdlib_span_corruption_prefix_lm")


def data_lengths(name: str) -> dict[str, int]:
  if name in DATA_LENGTHS:
    return DATA_LENGTHS[name]
  for key, lengths in DATA_LENGTHS.items():
    if name == key or name.endswith("_" + key):
      return lengths
  raise ValueError(f"No default lengths for {name!r}; pass --lengths.")


def _real_tokens(batch) -> int:
  """Non-padding tokens the model sees: decoder targets (+ encoder inputs when present)."""
  count = 0
  for key in ("decoder_target_tokens", "encoder_input_tokens"):
    if key in batch:
      count += int((batch[key] != 0).sum())
  return count


def bench_data(name: str, lengths: dict[str, int], batch_size: int, batches: int,
               warmup: int, seed: int = 0) -> dict:
  from t5x_lite import data  # pylint: disable=g-import-not-at-top  # TensorFlow is slow to import
  start = time.perf_counter()
  it = data.get_dataset(name, lengths, split="train", batch_size=batch_size, seed=seed)
  for _ in range(warmup):  # graph building, file listing, filling shuffle buffers
    next(it)
  first = time.perf_counter() - start
  real = slots = 0
  start = time.perf_counter()
  for _ in range(batches):
    batch = next(it)
    real += _real_tokens(batch)
    slots += sum(v.size for k, v in batch.items()
                 if k in ("decoder_target_tokens", "encoder_input_tokens"))
  seconds = time.perf_counter() - start
  it.close()
  return {"task": name, "lengths": lengths, "startup_s": first, "batches_per_s": batches / seconds,
          "tokens_per_s": real / seconds, "fill": real / slots}


def data_command(args) -> list[dict]:
  if args.resume_at:
    from benchmark_resume import resume_command  # pylint: disable=g-import-not-at-top
    return resume_command(args)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  print(f"tf.data on {os.cpu_count()} CPU cores, batch {args.batch_size}, {args.batches} batches "
        f"after {args.warmup} warm-up batches (TensorFlow {tf.__version__})", flush=True)
  header = f"{'task':<34}{'lengths':<32}{'startup s':>10}{'batch/s':>10}{'tokens/s':>12}{'fill':>7}"
  print(header + "\n" + "-" * len(header), flush=True)
  results = []
  for name in args.tasks:
    lengths = ast.literal_eval(args.lengths) if args.lengths else data_lengths(name)
    r = bench_data(name, lengths, args.batch_size, args.batches, args.warmup)
    results.append(r)
    print(f"{name:<34}{str(lengths):<32}{r['startup_s']:>10.1f}{r['batches_per_s']:>10.1f}"
          f"{r['tokens_per_s']:>12,.0f}{r['fill']:>7.1%}", flush=True)
  print("\ntokens/s counts non-padding decoder targets plus encoder inputs; fill = share of the "
        "batch's token slots that are not padding (packing works when it is near 100%).")
  return results


def add_command(commands) -> None:
  """Registers the `data` sub-command on tools/benchmark.py's parser."""
  data = commands.add_parser("data", help="input-pipeline throughput per task")
  data.add_argument("--tasks", nargs="+", default=list(DEFAULT_DATA_TASKS))
  data.add_argument("--lengths", default=None,
                    help="task feature lengths for all tasks, e.g. \"{'targets': 1024}\"")
  data.add_argument("--batch_size", type=int, default=32)
  data.add_argument("--batches", type=int, default=50)
  data.add_argument("--warmup", type=int, default=5)
  data.add_argument("--resume-at", type=int, nargs="+", default=None, metavar="STEP",
                    help="instead: seconds from a resume at each STEP to its first batch, per "
                         "resume tier (tools/benchmark_resume.py)")
  data.add_argument("--max-replay-s", type=float, default=120.0,
                    help="with --resume-at: the longest replay measured (longer: estimated)")
  data.add_argument("--cache-rows", type=int, default=4096,
                    help="with --resume-at: rows of the packed cache written for the cache tier")
  data.set_defaults(func=data_command)
