#!/usr/bin/env python3
"""Decode speed: t5x_lite's KV-cache greedy decoding beside Hugging Face `generate` (PyTorch),
same GPT-2 shape, same prompt and number of new tokens, float32, on this machine's CPU.

    python tools/benchmark_decode.py                      # gpt-small: 6 layers, d 512, 8 heads
    python tools/benchmark_decode.py --batch_sizes 1 --flatness 32 64 128 256

tokens/s counts generated tokens only (batch x new tokens) over the whole call, prefill included;
tokens per CPU-second divides by the process's CPU time instead (steadier on a shared machine).
`--flatness` times one batch at several numbers of new tokens: with a working cache the cost per
new token stays about flat (without one, every step re-reads the whole prefix and it grows).
`--threads` gives both frameworks the same number of CPU threads (default 1: on a machine other
jobs share, PyTorch's spinning OpenMP threads collapse when oversubscribed, ~6x slower at 2).
Nothing here is a test: speed is measured, never asserted.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position


def _shape_bindings(args) -> list[str]:
  longest = args.prompt + max(args.flatness + [args.new])
  return [f"TransformerConfig.num_layers = {args.layers}",
          f"TransformerConfig.d_model = {args.d_model}",
          f"TransformerConfig.num_heads = {args.heads}",
          f"TransformerConfig.d_ff = {4 * args.d_model}",
          f"TransformerConfig.vocab_size = {args.vocab}",
          f"TransformerConfig.max_length = {max(1024, longest)}"]


def _time(fn, repeats: int) -> tuple[float, float]:
  """(wall seconds, process CPU seconds) of the fastest of `repeats` calls, after a warm-up.

  CPU seconds (all threads of this process) are steadier than wall time on a shared machine."""
  fn()  # compile / warm up
  best = (float("inf"), float("inf"))
  for _ in range(repeats):
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    best = min(best, (time.perf_counter() - wall, time.process_time() - cpu))
  return best


def t5x_lite_decoder(args):
  """A function (batch, new_tokens) -> seconds for one greedy decode, best of `repeats`."""
  import jax  # pylint: disable=g-import-not-at-top
  from t5x_lite import models  # pylint: disable=g-import-not-at-top
  model = models.from_gin("gpt2_small", _shape_bindings(args))
  params = jax.jit(model.init)(jax.random.PRNGKey(0), model.dummy_batch(1, {"targets": 8}))
  eos = args.vocab - 1  # A random model must not stop early: check below that no row did.

  def run(batch_size, new_tokens):
    rng = np.random.default_rng(0)
    tokens = rng.integers(2, args.vocab - 1, (batch_size, args.prompt)).astype(np.int32)
    tokens[:, 0] = 0  # BOS
    batch = {"decoder_input_tokens": tokens,
             "decoder_causal_attention": np.ones_like(tokens)}
    def call():
      out, _ = model.predict_batch(params, batch, max_new_tokens=new_tokens, eos_id=eos)
      out = np.asarray(out)
      assert (out != 0).all() and (out != eos).all(), "a row stopped early"
    return _time(call, args.repeats)
  return run


def hf_decoder(args):
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  config = transformers.GPT2Config(
      vocab_size=args.vocab, n_positions=max(1024, args.prompt + args.new), n_embd=args.d_model,
      n_layer=args.layers, n_head=args.heads, n_inner=4 * args.d_model)
  torch.manual_seed(0)
  torch.set_num_threads(args.threads)
  model = transformers.GPT2LMHeadModel(config).eval()

  def run(batch_size, new_tokens):
    rng = np.random.default_rng(0)
    ids = torch.tensor(rng.integers(2, args.vocab - 1, (batch_size, args.prompt)))
    def call():
      with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             pad_token_id=0, eos_token_id=args.vocab - 1, use_cache=True)
      assert out.shape[1] == args.prompt + new_tokens
    return _time(call, args.repeats)
  return run


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 8])
  parser.add_argument("--prompt", type=int, default=128)
  parser.add_argument("--new", type=int, default=128)
  parser.add_argument("--layers", type=int, default=6)
  parser.add_argument("--d_model", type=int, default=512)
  parser.add_argument("--heads", type=int, default=8)
  parser.add_argument("--vocab", type=int, default=32000)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--flatness", type=int, nargs="*", default=[],
                      help="also time batch 1 at these numbers of new tokens")
  parser.add_argument("--threads", type=int, default=1, help="CPU threads for each framework")
  parser.add_argument("--skip_hf", action="store_true")
  args = parser.parse_args()
  if args.threads == 1:  # Before JAX starts: XLA's CPU client reads these once.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen="
                               "false intra_op_parallelism_threads=1").strip()

  ours = t5x_lite_decoder(args)
  theirs = None if args.skip_hf else hf_decoder(args)
  print(f"GPT-2 shape: {args.layers} layers, d_model {args.d_model}, {args.heads} heads, vocab "
        f"{args.vocab}; prompt {args.prompt}, {args.new} new tokens, greedy, float32, CPU "
        f"({os.cpu_count()} cores, {args.threads} thread(s) each)")
  print(f"{'batch':>5} {'t5x_lite tok/s':>15} {'HF tok/s':>10} {'ratio':>6}   "
        f"{'t5x_lite tok/CPU-s':>18} {'HF tok/CPU-s':>13} {'ratio':>6}")
  for batch_size in args.batch_sizes:
    generated = batch_size * args.new
    (ours_wall, ours_cpu) = ours(batch_size, args.new)
    (hf_wall, hf_cpu) = theirs(batch_size, args.new) if theirs else (float("nan"),) * 2
    print(f"{batch_size:>5} {generated / ours_wall:>15.1f} {generated / hf_wall:>10.1f} "
          f"{hf_wall / ours_wall:>6.2f}   {generated / ours_cpu:>18.1f} "
          f"{generated / hf_cpu:>13.1f} {hf_cpu / ours_cpu:>6.2f}", flush=True)
  if args.flatness:
    print(f"\nbatch 1, prompt {args.prompt}: ms per new token (prefill included), wall and CPU")
    for new_tokens in args.flatness:
      wall, cpu = ours(1, new_tokens)
      print(f"  {new_tokens:>4} new tokens: {1e3 * wall / new_tokens:7.2f} ms  "
            f"{1e3 * cpu / new_tokens:7.2f} CPU-ms", flush=True)

if __name__ == "__main__":
  main()
