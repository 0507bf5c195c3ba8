"""`python tools/benchmark.py attention`: memory and time of attention's forward + backward,
"xla" (the [b, h, l, s] logits) against "blockwise" (t5x_lite.attention), in the same process.

    python tools/benchmark.py attention --lengths 512 2048 8192

For each length, each implementation's jitted gradient of a causal self-attention (the mask
built from segment ids and positions inside the step, as the models do) is compiled; XLA's
memory analysis gives its temporaries (the peak it plans beyond inputs and outputs). The
implementations then take turns for --rounds rounds (so drift on a shared machine hits both
alike): the time of one step is the median over rounds, and the speed ratio the median of the
per-round ratios. A step whose temporaries exceed half the machine's available memory is
compiled but not run (said in the table).
"""
from __future__ import annotations

import functools
import json
import os
import time
from typing import Sequence

IMPLEMENTATIONS = ("xla", "blockwise")


def add_command(commands) -> None:
  """Registers the `attention` sub-command on tools/benchmark.py's parser."""
  parser = commands.add_parser("attention", help="attention fwd+bwd memory and time, xla vs "
                               "blockwise")
  parser.add_argument("--lengths", nargs="+", type=int, default=[512, 2048, 8192])
  parser.add_argument("--batch_size", type=int, default=1)
  parser.add_argument("--heads", type=int, default=8)
  parser.add_argument("--kv_heads", type=int, default=8)
  parser.add_argument("--head_dim", type=int, default=64)
  parser.add_argument("--block", type=int, default=512, help="blockwise's query/key block")
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--json", default="benchmark_attention.json")
  parser.set_defaults(func=command)


def _step(implementation: str, args, length: int):
  """(jitted fwd+bwd step, its arguments): gradients of sum(attention * w) w.r.t. q, k, v
  (w an argument too, so XLA cannot fold it into the program as a constant)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from t5x_lite import attention, layers  # pylint: disable=g-import-not-at-top
  b, h, k, e = args.batch_size, args.heads, args.kv_heads, args.head_dim
  dtype = jnp.dtype(args.dtype)
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  q = jax.random.normal(keys[0], (b, length, h, e), dtype)
  kv = [jax.random.normal(key, (b, length, k, e), dtype) for key in keys[1:3]]
  weights = jax.random.normal(keys[3], (b, length, h, e), dtype)
  segments = jnp.ones((b, length), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(length), (b, length))
  if implementation == "blockwise":
    kernel = functools.partial(attention.blockwise_attention, block_q=args.block,
                               block_k=args.block)
  else:
    kernel = functools.partial(layers.dot_product_attention, implementation="xla")

  def loss(q, k, v, weights, segments, positions):
    mask = layers.attention_mask(segments, segments, causal=True, q_positions=positions,
                                 k_positions=positions)
    out = kernel(q, k, v, mask, scale=e ** -0.5)
    return jnp.sum(out.astype(jnp.float32) * weights)

  step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  return step, (q, *kv, weights, segments, positions)


def _available_bytes() -> float:
  with open("/proc/meminfo") as f:
    meminfo = dict(line.split(":", 1) for line in f)
  return float(meminfo["MemAvailable"].split()[0]) * 1024


def _time(step, inputs) -> float:
  import jax  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  jax.block_until_ready(step(*inputs))
  return time.perf_counter() - start


def measure(args, length: int) -> list[dict]:
  """The rows of one length: XLA temporaries and fwd+bwd seconds of each implementation."""
  rows, runs = [], {}
  for implementation in IMPLEMENTATIONS:
    step, inputs = _step(implementation, args, length)
    compiled = step.lower(*inputs).compile()
    stats = compiled.memory_analysis()
    temporaries = float(stats.temp_size_in_bytes)
    row = {"length": length, "impl": implementation, "temp_bytes": temporaries}
    if temporaries < 0.5 * _available_bytes():
      runs[implementation] = (compiled, inputs)
      _time(compiled, inputs)  # warm-up
    else:
      row["skipped"] = "temporaries over half the available memory"
    rows.append(row)
  times = {name: [] for name in runs}
  for _ in range(args.rounds):
    for name, (compiled, inputs) in runs.items():
      times[name].append(_time(compiled, inputs))
  xla = rows[0]
  for row in rows:
    row["temp_vs_xla"] = xla["temp_bytes"] / max(row["temp_bytes"], 1.0)
    if row["impl"] in times:
      row["seconds"] = float(sorted(times[row["impl"]])[len(times[row["impl"]]) // 2])
    if row["impl"] in times and "xla" in times:
      ratios = sorted(x / t for x, t in zip(times["xla"], times[row["impl"]]))
      row["speed_vs_xla"] = ratios[len(ratios) // 2]
  return rows


def _mib(x: float) -> str:
  return f"{x / 2 ** 20:,.1f} MiB"


def markdown(rows: Sequence[dict], args) -> str:
  lines = [f"Causal self-attention fwd+bwd, batch {args.batch_size}, {args.heads} heads "
           f"({args.kv_heads} key/value), head dim {args.head_dim}, {args.dtype}, blocks of "
           f"{args.block}; median of {args.rounds} alternating rounds.", "",
           "| length | impl | XLA temporaries | xla / impl temporaries | fwd+bwd s | "
           "speed vs xla |", "|---|---|---|---|---|---|"]
  for r in rows:
    seconds = f"{r['seconds']:.3f}" if "seconds" in r else f"not run ({r.get('skipped')})"
    speed = f"{r['speed_vs_xla']:.2f}x" if "speed_vs_xla" in r else "-"
    lines.append(f"| {r['length']} | {r['impl']} | {_mib(r['temp_bytes'])} | "
                 f"{r['temp_vs_xla']:.1f}x | {seconds} | {speed} |")
  return "\n".join(lines)


def command(args) -> list[dict]:
  bad = [n for n in args.lengths if n < 1]
  if bad or args.heads % args.kv_heads or args.rounds < 1 or args.block < 1:
    raise SystemExit(f"attention: lengths must be >= 1 (got {bad or args.lengths}), kv_heads "
                     f"must divide heads ({args.kv_heads} vs {args.heads}), rounds and block "
                     ">= 1.")
  rows = [row for length in args.lengths for row in measure(args, length)]
  print(markdown(rows, args))
  with open(args.json, "w") as f:
    json.dump({"command": "python tools/benchmark.py " + " ".join(args.argv),
               "date": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count(),
               "results": rows}, f, indent=1)
  print(f"\nResults written to {args.json}")
  return rows
