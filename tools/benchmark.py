#!/usr/bin/env python3
"""Benchmarks: training and decoding speed (side by side with Hugging Face transformers on
PyTorch) and the input pipeline's throughput. Sub-commands (each adds its own flags):

  train   the trainer's own train step (the one `t5x_lite.train` runs): first-step time, median
          step time, tokens/s, model FLOPs (analytic, cross-checked with XLA's cost analysis),
          MFU against a matmul peak measured beside each round, peak RSS / device memory
          python tools/benchmark.py train --shapes gpt-small t5-small bert-small --compare hf
          python tools/benchmark.py train --shapes gpt-small --variants default unrolled bf16
          python tools/benchmark.py train --shapes gpt-small --variants default fused-qkv no-donate
          python tools/benchmark.py train --shapes gpt-small t5-small --variants default lora \
              --compare hf hf-peft     # LoRA r=8 step vs the full step and vs HF PEFT LoRA
          python tools/benchmark.py train --shapes moe-small --compare hf \
              --variants moe-einsum moe-ragged moe-capacity-1.25
  decode  generated tokens/s of `model.predict_batch` (greedy, KV cache) and of HF `generate`,
          CPU seconds per call; --threads N gives both frameworks the same N CPU threads
          python tools/benchmark.py decode --shapes gpt-small t5-small --batch_sizes 1 8 --compare hf
          python tools/benchmark.py decode --shapes gpt-small --compare hf --threads 1
          python tools/benchmark.py decode --shapes gpt-small --variants fp32 int8 w8a8 int4 nf4 \
              int8-kv --compare hf-int8     # quantized (runners: tools/benchmark_quant.py)
  data    packed tokens/s of the input pipeline for each task, as the trainer would receive them
          python tools/benchmark.py data --tasks stdlib_clm stdlib_span_corruption --batches 50
          --resume-at STEP...: seconds from a resume to its first batch, per resume tier
          python tools/benchmark.py data --resume-at 0 10000 1000000
  attention  memory (XLA's analysis) and time of attention's forward + backward, "xla" against
          "blockwise", same run (runner: tools/benchmark_attention.py)
          python tools/benchmark.py attention --lengths 512 2048 8192

Every implementation runs in its own child process (its own memory peak and thread pool; the
runners are in tools/benchmark_runners.py) and they take turns: each round times a few steps of
each, so drift on a shared machine hits all of them alike; ratios are medians of per-round
ratios. `train` and `decode` end with a markdown table (command, date, machine) and write every
figure to --json. Speed lives here, never in
tests (the tests assert behaviour, not wall-clock time).
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib.metadata
import json
import os
import sys
import time
from typing import Optional, Sequence

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# The runners live in tools/benchmark_runners.py; child processes (spawned, they inherit
# sys.path) import it by name to run `_serve`.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchmark_runners import Shape, Worker  # pylint: disable=wrong-import-position
import benchmark_attention  # pylint: disable=wrong-import-position
import benchmark_data  # pylint: disable=wrong-import-position
import benchmark_quant  # pylint: disable=wrong-import-position

PRESET_DIR = os.path.join(ROOT, "gin_configs", "models")

# ============================================================================ train and decode

_SMALL = ("TransformerConfig.num_layers = 6", "TransformerConfig.d_model = 512",
          "TransformerConfig.num_heads = 8", "TransformerConfig.dropout_rate = 0.0")
# The shapes of issue 7 (all float32, AdamW, no dropout on either side).
SHAPES = {
    "gpt-small": Shape("gpt2_small", _SMALL + ("TransformerConfig.d_ff = 2048",
                                               "TransformerConfig.vocab_size = 32000"),
                       8, {"targets": 256}),
    "t5-small": Shape("t5_1_1_small", _SMALL + ("TransformerConfig.num_decoder_layers = 6",
                                                "TransformerConfig.d_ff = 1024",
                                                "TransformerConfig.head_dim = 64"),
                      8, {"inputs": 256, "targets": 64}),
    "bert-small": Shape("bert_base", _SMALL + ("TransformerConfig.d_ff = 2048",),
                        8, {"inputs": 256}),
    # Mixtral-style: 8 experts of width 1024, top 2, in every layer (issue 14).
    "moe-small": Shape("mixtral_tiny", _SMALL + ("TransformerConfig.d_ff = 1024",
                                                 "TransformerConfig.num_kv_heads = None",
                                                 "TransformerConfig.num_experts = 8",
                                                 "TransformerConfig.num_experts_per_token = 2",
                                                 "TransformerConfig.vocab_size = 32000"),
                       8, {"targets": 256}),
}

LORA = {"rank": 8, "alpha": 16.0, "dropout": 0.0}  # the `lora` variant and the hf-peft peer


def _loss_chunk_bindings(chunk_size: Optional[int]) -> tuple[str, ...]:
  return tuple(f"{cls}.loss_chunk_size = {chunk_size}"
               for cls in ("EncoderOnlyModel", "DecoderOnlyModel", "EncoderDecoderModel"))


# Speed switches: gin bindings and Trainer arguments, applied on top of a shape.
VARIANTS = {
    "default": ((), {}),
    "unrolled": (("TransformerConfig.scan_layers = False",), {}),
    "scanned": (("TransformerConfig.scan_layers = True",), {}),
    "remat-full": (("TransformerConfig.remat_policy = 'full'",), {}),
    "remat-dots": (("TransformerConfig.remat_policy = 'dots'",), {}),
    "remat-dots-no-batch": (("TransformerConfig.remat_policy = 'dots_with_no_batch_dims'",), {}),
    "bf16": (("TransformerConfig.dtype = 'bfloat16'",), {}),
    "microbatches-2": ((), {"num_microbatches": 2}),
    # One [d, 3, h, e] q/k/v matmul per self-attention (multi-head attention shapes only).
    "fused-qkv": (("TransformerConfig.fused_qkv = True",), {}),
    # The train state is not donated to the step: a second copy of params and moments.
    "no-donate": ((), {"donate_state": False}),
    # cuDNN's fused attention: NVIDIA GPUs only, and bf16/fp16 compute (run it as cudnn+bf16).
    "cudnn": (("TransformerConfig.attention_implementation = 'cudnn'",), {}),
    # MoE dispatch (t5x_lite.moe): dropless grouped matmuls, dropless one-hot einsums (capacity
    # = every token of a row), einsums with a capacity factor that drops the overflow, and the
    # same buffers filled by indexing ("gather").
    "moe-ragged": (("TransformerConfig.moe_dispatch = 'ragged'",), {}),
    "moe-einsum": (("TransformerConfig.moe_dispatch = 'einsum'",), {}),
    "moe-capacity-1.25": (("TransformerConfig.moe_dispatch = 'einsum'",
                           "TransformerConfig.expert_capacity_factor = 1.25"), {}),
    "moe-gather": (("TransformerConfig.moe_dispatch = 'gather'",), {}),
    "moe-gather-capacity-1.25": (("TransformerConfig.moe_dispatch = 'gather'",
                                  "TransformerConfig.expert_capacity_factor = 1.25"), {}),
    # The output projection + loss all at once ([b, l, v] float32 logits), or chunked by tokens
    # (losses.cross_entropy_with_head; the models' default chunk is losses.DEFAULT_CHUNK_SIZE).
    "loss-unchunked": (_loss_chunk_bindings(None), {}),
    **{f"loss-chunk-{n}": (_loss_chunk_bindings(n), {}) for n in (256, 512, 1024, 2048)},
    # LoRA r=8 (alpha 16, dropout 0) on attention q/k/v/out, the base frozen: lora.LoraModel with
    # train.trainable = lora.TRAINABLE, as runs/lora_finetune.gin trains (runners: JaxTrain).
    "lora": ((), {"lora": LORA}),
    # XLA:CPU's matmul libraries other than its default (YNNPACK): oneDNN or XNNPACK fusions of
    # the dots, or oneDNN custom calls; the child process gets the flags before JAX starts.
    "xla-onednn-dot": ((), {"xla_flags": "--xla_cpu_experimental_onednn_fusion_type=dot"}),
    "xla-onednn-call": ((), {"xla_flags": "--xla_cpu_experimental_onednn_custom_call=true"}),
    "xla-xnn-dot": ((), {"xla_flags": "--xla_cpu_experimental_xnn_fusion_type=dot"}),
}
HF_IMPLEMENTATIONS = ("hf", "hf-compile")  # transformers eager, and under torch.compile
# HF PEFT LoRA on the same attention projections, same rank and alpha, AdamW on the adapters.
TRAIN_PEERS = HF_IMPLEMENTATIONS + ("hf-peft", "hf-bf16")


def resolve_shape(name: str, batch_size: Optional[int], lengths: Optional[dict]) -> Shape:
  """A named shape, or any model preset (default batch 8, lengths 64); flags override both."""
  presets = sorted(f[:-4] for f in os.listdir(PRESET_DIR) if f.endswith(".gin"))
  if name not in SHAPES and name not in presets and not os.path.isfile(name):
    raise ValueError(f"Unknown shape {name!r}: use one of {sorted(SHAPES)}, a model preset "
                     f"{presets} or a model gin file.")
  shape = SHAPES.get(name) or Shape(name, (), 8, {"inputs": 64, "targets": 64})
  return dataclasses.replace(shape, batch_size=batch_size or shape.batch_size,
                             lengths=lengths or shape.lengths)


# ---------------------------------------------------------------------------- the rounds

def alternate(workers: dict, rounds: int, steps: int, before_round=None):
  """Per worker, the median wall time of each round, and its median CPU time; rounds interleave
  the workers, so each round's figures were taken under about the same load."""
  medians = {name: [] for name in workers}
  cpu = {name: [] for name in workers}
  for _ in range(rounds):
    if before_round:
      before_round()
    for name, worker in workers.items():
      medians[name].append(float(np.median(worker.call("run", steps))))
      cpu[name].append(float(np.median(worker.call("cpu_times"))))
  return medians, cpu


def _median_ratio(mine: list, theirs: list) -> float:
  """Median over rounds of (their time / my time): > 1 means faster than them."""
  return float(np.median(np.asarray(theirs) / np.asarray(mine)))


def variant_settings(name: str) -> tuple[tuple[str, ...], dict]:
  """The gin bindings and Trainer arguments of a variant; "a+b" combines variants a and b."""
  bindings, kwargs = (), {}
  for part in name.split("+"):
    if part not in VARIANTS:
      raise argparse.ArgumentTypeError(
          f"unknown variant {part!r}: choose from {sorted(VARIANTS)}, joined with '+' to combine "
          "(e.g. unrolled+remat-dots)")
    bindings, kwargs = bindings + VARIANTS[part][0], {**kwargs, **VARIANTS[part][1]}
  return bindings, kwargs


def _variant(name: str) -> str:
  variant_settings(name)
  return name


def train_command(args) -> list[dict]:
  """Per shape, every variant and HF implementation runs in its own process, all alive at once
  and timed in turn in each round: every ratio (against HF and between variants) is same-run."""
  lengths = ast.literal_eval(args.lengths) if args.lengths else None
  results = []
  print(f"train: {args.rounds} rounds x {args.steps} timed steps per implementation, after "
        f"{args.warmup} warm-up step(s); {_machine(args)}", flush=True)
  print(TRAIN_HEADER + "\n" + "-" * len(TRAIN_HEADER), flush=True)
  for shape_name in args.shapes:
    shape = resolve_shape(shape_name, args.batch_size, lengths)
    workers = {}
    try:
      for i, variant in enumerate(args.variants):
        bindings, trainer_kwargs = variant_settings(variant)
        workers[variant] = Worker("JaxTrain", shape, bindings + tuple(args.gin), trainer_kwargs,
                                  args.warmup, i == 0 and not args.no_xla_flops)
      first = workers[args.variants[0]]
      for impl in args.compare:
        if first.info["hf_config"] is None:
          raise ValueError(f"--compare {impl}: no HF architecture holds {shape_name}.")
        workers[impl] = Worker("TorchTrain", first.info["hf_config"], first.info["hf_batch"],
                               impl == "hf-compile", args.warmup,
                               LORA if impl == "hf-peft" else None, impl == "hf-bf16")
      peaks = []
      times, cpu = alternate(workers, args.rounds, args.steps,
                             lambda: peaks.append(first.call("peak_flops")))
      rows = _train_rows(shape_name, args.variants, first.info, workers, times, cpu, peaks)
      for row, worker in zip(rows, workers.values()):
        if row["impl"] == "t5x_lite":
          row.update(worker.call("compiled_memory"))
      if args.alone:
        _add_alone(rows, workers, args.rounds, args.steps)
      if args.profile:
        for row, variant in zip(rows, args.variants):
          row["profile"] = workers[variant].call(
              "profile", os.path.join(os.path.abspath(args.profile), f"{shape_name}-{variant}"))
    finally:
      for worker in workers.values():
        worker.close()
    for row in rows:
      print(_format_train(row), flush=True)
      if "alone_step_s" in row:
        spread = np.percentile(row["alone_step_s_per_round"], [25, 75]) / row["alone_step_s"]
        print(f"  alone: step {row['alone_step_s']:.3f} s (rounds' interquartile range "
              f"{spread[0]:.2f}-{spread[1]:.2f}x of it); alternating / alone = "
              f"{row['alternating_over_alone']:.2f}", flush=True)
      if "profile" in row:
        p = row["profile"]
        print(f"  profile of one step ({p['trace']}): {p['matmul_share']:.0%} of op time in "
              "matmuls; top ops: " + ", ".join(f"{op} {t:.2f}s" for op, t in p["top_ops"][:6]),
              flush=True)
    results += rows
  return results


def _add_alone(rows: list[dict], workers: dict, rounds: int, steps: int) -> None:
  """The calibration of --alone: each implementation's rounds back to back, after the
  alternating ones, so a row's alternating and alone step times can be compared. (While one
  runs the others are stopped, see benchmark_runners.Worker.)"""
  for row, worker in zip(rows, workers.values()):
    alone = [float(np.median(worker.call("run", steps))) for _ in range(rounds)]
    worker.call("cpu_times")  # not this row's CPU figures
    row["alone_step_s"], row["alone_step_s_per_round"] = float(np.median(alone)), alone
    row["alternating_over_alone"] = row["step_s"] / row["alone_step_s"]


def _train_rows(shape_name, variants, info, workers, times, cpu, peaks) -> list[dict]:
  peak = float(np.median([p["measured"] for p in peaks]))
  sheet = peaks[0]["sheet"]
  rows = []
  for name, worker in workers.items():
    ours = name in variants
    step = float(np.median(times[name]))
    row = {"shape": shape_name, "impl": "t5x_lite" if ours else name,
           "variant": name if ours else "-", "first_step_s": worker.info[
               "first_step_s"], "step_s": step, "step_s_per_round": times[name],
           "cpu_s": float(np.median(cpu[name])),
           "tokens_per_s": info["tokens"] / step, "target_tokens_per_s": info["target_tokens"] / step,
           "gflop_per_step": info["flops"] / 1e9,
           # XLA's count of this variant's own step (the first's, and LoRA's), else None.
           "xla_gflop_per_step": worker.info["xla_flops"] / 1e9
                                 if "xla_flops" in worker.info else None,
           "trainable_params": worker.info.get("trainable_params"),
           "gflop_per_s": info["flops"] / step / 1e9, "mfu": info["flops"] / step / (sheet or peak),
           "peak_gflop_per_s": (sheet or peak) / 1e9, "matmul_gflop_per_s": peak / 1e9,
           **worker.call("memory")}
    if ours:  # against HF, and each later variant against the first
      others = [o for o in workers if o not in variants] + ([variants[0]] if name != variants[0]
                                                            else [])
      row["vs"] = {o: _median_ratio(times[name], times[o]) for o in others}
      row["vs_cpu"] = {o: _median_ratio(cpu[name], cpu[o]) for o in others}
    rows.append(row)
  return rows


TRAIN_HEADER = (f"{'shape':<12}{'impl':<12}{'variant':<16}{'1st step s':>11}{'step s':>9}"
                f"{'CPU s':>8}"
                f"{'tok/s':>9}{'tgt tok/s':>10}{'GFLOP':>8}{'XLA GFLOP':>10}{'GFLOP/s':>9}"
                f"{'MFU':>7}{'RSS GiB':>8}{'XLA GiB':>8}  speed vs")


def _vs(row) -> str:
  """Speed ratios against each HF run: wall time and CPU time."""
  cpu = row.get("vs_cpu", {})
  return ", ".join(f"{r:.2f}x {k}" + (f" (CPU time {cpu[k]:.2f}x)" if k in cpu else "")
                   for k, r in row.get("vs", {}).items())


def _format_train(r: dict) -> str:
  xla = f"{r['xla_gflop_per_step']:.1f}" if r["xla_gflop_per_step"] else "-"
  return (f"{r['shape']:<12}{r['impl']:<12}{r['variant']:<16}{r['first_step_s']:>11.1f}"
          f"{r['step_s']:>9.3f}{r['cpu_s']:>8.2f}{r['tokens_per_s']:>9.0f}{r['target_tokens_per_s']:>10.0f}"
          f"{r['gflop_per_step']:>8.1f}{xla:>10}{r['gflop_per_s']:>9.1f}{r['mfu']:>7.1%}"
          f"{r['rss_gib']:>8.2f}{_gib(r.get('xla_peak_gib')):>8}  {_vs(r)}")


def _gib(value: Optional[float]) -> str:
  return "-" if value is None else f"{value:.2f}"


def decode_command(args) -> list[dict]:
  results = []
  threads = f"{args.threads} CPU thread(s) each" if args.threads else "threads = cores"
  print(f"decode: greedy, {args.new_tokens} new tokens after a {args.prompt}-token prompt; "
        f"{args.rounds} rounds x {args.steps} calls per implementation; {threads}; "
        f"{_machine(args)}", flush=True)
  print(DECODE_HEADER + "\n" + "-" * len(DECODE_HEADER), flush=True)
  for shape_name in args.shapes:
    shape = resolve_shape(shape_name, None, None)
    for batch_size in args.batch_sizes:
      workers = {}
      try:
        workers["jax"] = Worker("JaxDecode", shape, tuple(args.gin), batch_size, args.prompt,
                                args.new_tokens, args.warmup, threads=args.threads)
        info = workers["jax"].info
        for variant in [v for v in args.variants if v != "fp32"]:  # tools/benchmark_quant.py
          workers[f"jax-{variant}"] = Worker(
              "benchmark_quant:JaxQuantDecode", shape, tuple(args.gin), batch_size, args.prompt,
              args.new_tokens, args.warmup, variant, threads=args.threads)
        for impl in args.compare:
          if info["hf_config"] is None:
            raise ValueError(f"--compare {impl}: no HF architecture holds {shape_name}.")
          workers[impl] = Worker("TorchDecode", info["hf_config"], info["hf_inputs"],
                                 args.new_tokens, impl == "hf-compile", args.warmup,
                                 threads=args.threads) if impl != "hf-int8" else Worker(
              "benchmark_quant:TorchInt8Decode", info["hf_config"], info["hf_inputs"],
              args.new_tokens, args.warmup, threads=args.threads)
        bandwidths = []  # measured beside each round, in the fp32 worker's own process
        times, cpu = alternate(workers, args.rounds, args.steps,
                               lambda: bandwidths.append(workers["jax"].call("read_bandwidth")))
        rows = _decode_rows(shape_name, batch_size, info["steps"], workers, times, cpu, args)
        _add_memory_floor(rows, workers, float(np.median(bandwidths)))
      finally:
        for worker in workers.values():
          worker.close()
      for row in rows:
        print(_format_decode(row), flush=True)
      if info["steps"] < args.new_tokens:  # HF's rows never stop early (min_new_tokens)
        print(f"  t5x_lite: every row reached EOS after {info['steps']} of {args.new_tokens} "
              "new tokens; its tokens/s and ratios count the tokens really generated",
              flush=True)
      results += rows
  return results


def _decode_rows(shape_name, batch_size, jax_steps, workers, times, cpu, args) -> list[dict]:
  """One row per implementation; t5x_lite's ratios are per generated token, in wall and CPU
  time, since its rows may stop at EOS before --new_tokens (HF's never do)."""
  steps = {name: jax_steps if name == "jax" else worker.info.get("steps", args.new_tokens)
           for name, worker in workers.items()}  # quantized variants may stop elsewhere
  rows = []
  for name, worker in workers.items():
    seconds = float(np.median(times[name]))
    row = {"shape": shape_name, "impl": name.replace("jax", "t5x_lite", 1),
           "batch_size": batch_size, "prompt": args.prompt, "new_tokens": steps[name],
           "threads": args.threads, "first_call_s": worker.info["first_step_s"],
           "call_s": seconds, "call_s_per_round": times[name],
           "cpu_s": float(np.median(cpu[name])), "cpu_s_per_round": cpu[name],
           "tokens_per_s": batch_size * steps[name] / seconds, **worker.call("memory")}
    if name.startswith("jax"):
      def per_token(figures, o):
        return [t / steps[o] for t in figures[o]]
      row["vs"] = {o: _median_ratio(per_token(times, name), per_token(times, o))
                   for o in workers if o != name}
      row["vs_cpu"] = {o: _median_ratio(per_token(cpu, name), per_token(cpu, o))
                       for o in workers if o != name}
    rows.append(row)
  return rows


def _add_memory_floor(rows: list[dict], workers: dict, bandwidth: float) -> None:
  """Per t5x_lite row: ms per generated token (the call over its steps, prefill included) and
  the floor set by memory: each step reads every parameter it uses once (an encoder's run once
  per call, on the prompt), at the measured bandwidth."""
  for row, worker in zip(rows, workers.values()):
    if row["impl"].startswith("t5x_lite") and "param_bytes" in worker.info:
      row["read_gb_per_s"] = bandwidth / 1e9
      row["param_mib"] = worker.info["param_bytes"] / 2 ** 20
      row["ms_per_token"] = 1e3 * row["call_s"] / row["new_tokens"]
      row["floor_ms_per_token"] = 1e3 * worker.info["param_bytes"] / bandwidth
      row["of_floor"] = row["floor_ms_per_token"] / row["ms_per_token"]


DECODE_HEADER = (f"{'shape':<12}{'impl':<12}{'batch':>6}{'new tok':>8}{'1st call s':>11}"
                 f"{'call s':>9}{'CPU s':>8}{'tok/s':>9}{'RSS GiB':>8}  vs HF")


def _format_decode(r: dict) -> str:
  return (f"{r['shape']:<12}{r['impl']:<12}{r['batch_size']:>6}{r['new_tokens']:>8}"
          f"{r['first_call_s']:>11.1f}{r['call_s']:>9.3f}{r['cpu_s']:>8.3f}"
          f"{r['tokens_per_s']:>9.1f}{r['rss_gib']:>8.2f}  {_vs(r)}")


# ---------------------------------------------------------------------------- reporting

# The CPU features that decide matmul speed, named in every report: AMX and AVX512-BF16 have
# bf16 dot instructions, AVX-512 and AVX2 only fp32 FMAs.
MATMUL_FLAGS = ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2")


def _machine(args) -> str:
  if args.machine:
    return args.machine
  model, flags = "CPU", []
  try:
    with open("/proc/cpuinfo") as f:
      first_cpu = f.read().split("\n\n")[0].splitlines()
    info = {k.strip(): v.strip() for k, v in (l.split(":", 1) for l in first_cpu if ":" in l)}
    model = info.get("model name", model)
    flags = [f for f in MATMUL_FLAGS if f in info.get("flags", "").split()]
  except OSError:
    pass
  return f"{os.cpu_count()}-core {model} ({', '.join(flags) or 'no AVX2'})"


def markdown(command: str, rows: list[dict], args) -> str:
  """The README table: the figures that matter, with the command and date."""
  lines = [f"`python tools/benchmark.py {' '.join(args.argv)}` — {time.strftime('%Y-%m-%d')}, "
           f"{_machine(args)}", ""]
  if command == "train":
    lines += ["| shape | impl | variant | trainable | 1st step s | step s | CPU s | tokens/s "
              "| GFLOP/step (XLA) | GFLOP/s | MFU | RSS GiB | XLA peak GiB | speed vs |",
              "|" + "---|" * 14]
    for r in rows:
      xla = f" ({r['xla_gflop_per_step']:.1f})" if r["xla_gflop_per_step"] else ""
      trainable = f"{r['trainable_params']:,}" if r.get("trainable_params") else "-"
      lines.append(f"| {r['shape']} | {r['impl']} | {r['variant']} | {trainable} | "
                   f"{r['first_step_s']:.1f} | "
                   f"{r['step_s']:.2f} | {r['cpu_s']:.2f} | {r['tokens_per_s']:.0f} | "
                   f"{r['gflop_per_step']:.1f}"
                   f"{xla} | {r['gflop_per_s']:.1f} | {r['mfu']:.0%} | {r['rss_gib']:.2f} | "
                   f"{_gib(r.get('xla_peak_gib'))} | {_vs(r)} |")
    lines += ["", "MFU = model FLOP/s over the matmul peak measured beside each round "
              f"(median {np.median([r['matmul_gflop_per_s'] for r in rows]):.0f} GFLOP/s); "
              "tokens/s counts all input tokens; CPU s = CPU seconds per step of the process (all "
              "threads); XLA peak GiB = the compiled step's peak memory on one device by XLA's "
              "memory analysis (params, optimizer state, batch and temporaries); GFLOP/step = "
              "the full step's model FLOPs on every row (MFU too), XLA's count the row's own "
              "step (LoRA's has no weight gradients of frozen kernels); trainable = parameters "
              "the optimizer updates; speed vs = median over rounds of the speed ratio against "
              "each HF run "
              "(and against the first variant), in wall and in CPU time."]
  else:
    lines += ["| shape | impl | batch | new tokens | 1st call s | call s | CPU s | tokens/s "
              "| ms/token (memory floor) | vs HF |", "|" + "---|" * 10]
    for r in rows:
      floor = (f"{r['ms_per_token']:.1f} ({r['floor_ms_per_token']:.1f}: {r['of_floor']:.0%})"
               if "ms_per_token" in r else "")
      lines.append(f"| {r['shape']} | {r['impl']} | {r['batch_size']} | {r['new_tokens']} | "
                   f"{r['first_call_s']:.1f} | {r['call_s']:.2f} | {r['cpu_s']:.2f} | "
                   f"{r['tokens_per_s']:.1f} | {floor} | {_vs(r)} |")
    threads = f"{args.threads} CPU thread(s) each" if args.threads else "threads = cores"
    lines += ["", f"Greedy, {threads}; tokens/s counts generated tokens (batch x new tokens) "
              "over the whole call, prefill included; CPU s = CPU seconds per call of the "
              "process (all threads); ms/token = call time over the steps taken; memory "
              "floor = the bytes of the parameters a step reads (all but an encoder's) over the "
              "read bandwidth measured beside each round (% = the share of the floor reached); "
              "vs HF "
              "= median over rounds of the speed ratio per generated token, in wall and in CPU "
              "time."]
  return "\n".join(lines)


def _write_json(path: str, command: str, rows: list, args) -> None:
  versions = {}
  for name in ("jax", "flax", "torch", "transformers", "peft"):
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  report = {"command": f"python tools/benchmark.py {' '.join(args.argv)}",
            "date": time.strftime("%Y-%m-%d %H:%M"), "machine": _machine(args),
            "versions": versions, "results": rows}
  with open(path, "w") as f:
    json.dump(report, f, indent=1, default=float)


def _add_common(parser, shapes, peers=HF_IMPLEMENTATIONS):
  parser.add_argument("--shapes", nargs="+", default=list(shapes),
                      help=f"{sorted(SHAPES)} or any model preset (e.g. gpt2_tiny)")
  parser.add_argument("--compare", nargs="*", default=[], choices=peers,
                      help="also run HF transformers on PyTorch, eager and/or torch.compile"
                           + (" (hf-int8: torch's quantize_dynamic int8)" if
                              "hf-int8" in peers else "")
                           + (" (hf-peft: HF PEFT LoRA r=8 on attention, beside --variants lora;"
                              " hf-bf16: eager under torch.autocast bfloat16)"
                              if "hf-peft" in peers else ""))
  parser.add_argument("--gin", nargs="*", default=[],
                      help="extra gin bindings for every run, e.g. \"TransformerConfig.dtype = "
                           "'bfloat16'\"")
  parser.add_argument("--rounds", type=int, default=10,
                      help="rounds; each times --steps calls of every implementation in turn")
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--json", default=None, help="where to write the results (default: "
                      "benchmark_<command>.json)")
  parser.add_argument("--machine", default=None, help="how to name the machine in the report")


def main(argv: Sequence[str] | None = None):
  argv = list(sys.argv[1:] if argv is None else argv)
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  commands = parser.add_subparsers(dest="command", required=True)
  train = commands.add_parser("train", help="train-step speed and MFU, optionally against HF")
  _add_common(train, SHAPES, TRAIN_PEERS)
  train.add_argument("--variants", nargs="+", default=["default"], type=_variant,
                     help=f"speed switches to run, side by side: {sorted(VARIANTS)}, or several "
                          "joined with '+' (e.g. unrolled+remat-dots)")
  train.add_argument("--steps", type=int, default=1, help="timed steps per round")
  train.add_argument("--batch_size", type=int, default=None)
  train.add_argument("--lengths", default=None, help="e.g. \"{'inputs': 256, 'targets': 64}\"")
  train.add_argument("--profile", default=None, metavar="DIR",
                     help="also trace one step of each run with jax.profiler into DIR and "
                          "print the time per XLA op")
  train.add_argument("--alone", action="store_true",
                     help="calibration: after the alternating rounds, time each implementation's "
                          "rounds back to back and print how its alternating step time compares")
  train.add_argument("--no_xla_flops", action="store_true",
                     help="skip the cross-check of the FLOP count with XLA's cost analysis")
  train.set_defaults(func=train_command)
  decode = commands.add_parser("decode", help="generation speed, optionally against HF generate")
  _add_common(decode, ("gpt-small", "t5-small"), HF_IMPLEMENTATIONS + ("hf-int8",))
  decode.add_argument("--variants", nargs="+", default=["fp32"],
                      type=benchmark_quant.checked_variant,
                      help="t5x_lite runs: fp32, int8, w8a8, int4, nf4, int8-kv (a+b combines; "
                           "tools/benchmark_quant.py)")
  decode.add_argument("--batch_sizes", nargs="+", type=int, default=[1, 8])
  decode.add_argument("--prompt", type=int, default=128, help="prompt (encoder input) length")
  decode.add_argument("--new_tokens", type=int, default=64)
  decode.add_argument("--steps", type=int, default=2, help="timed calls per round")
  decode.add_argument("--threads", type=int, default=None,
                      help="CPU threads for each framework (default: as many as cores); on a "
                           "shared machine 1 keeps PyTorch's spinning OpenMP threads from "
                           "collapsing when the cores are oversubscribed")
  decode.set_defaults(func=decode_command)
  benchmark_data.add_command(commands)
  benchmark_attention.add_command(commands)
  args = parser.parse_args(argv)
  args.argv = argv
  args.tasks_given = "--tasks" in argv
  results = args.func(args)
  if args.command in ("train", "decode"):
    print("\n" + markdown(args.command, results, args))
    path = args.json or f"benchmark_{args.command}.json"
    _write_json(path, args.command, results, args)
    print(f"\nResults written to {path}")
  return results


if __name__ == "__main__":
  main()
