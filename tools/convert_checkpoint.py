"""Convert checkpoints between Hugging Face (config.json + safetensors) and t5x_lite.

  # HF -> t5x_lite params checkpoint (params/ + model.gin, loadable by models.from_gin):
  python tools/convert_checkpoint.py --from_hf ~/hf/TinyLlama-1.1B --to ckpt/tinyllama
  # t5x_lite -> HF directory that transformers' from_pretrained loads:
  python tools/convert_checkpoint.py --from ckpt/tinyllama --to_hf ~/hf/tinyllama-finetuned
  # after fine-tuning, keep the original's special token ids:
  python tools/convert_checkpoint.py --from runs/finetuned --to_hf ~/hf/finetuned \
      --hf_config ~/hf/TinyLlama-1.1B/config.json
  # a quantized params checkpoint (integers + scales; t5x_lite.load reads it quantized):
  python tools/convert_checkpoint.py --from ckpt/tinyllama --to ckpt/tinyllama_int4 \
      --quantize int4 --group_size 128       # or --quantize int8 / w8a8; --from_hf works too

Supports GPT2LMHeadModel, BertForMaskedLM, T5ForConditionalGeneration (v1.0 and v1.1),
LlamaForCausalLM and MixtralForCausalLM (per-expert tensors as save_pretrained writes them, or
the fused gate_up_proj / down_proj layout transformers 5 holds in memory; exported per expert).
No PyTorch is needed.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from t5x_lite.config import DTYPES  # noqa: E402
from t5x_lite.interop import hf  # noqa: E402


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--from_hf", help="Hugging Face checkpoint directory to import.")
  parser.add_argument("--to", help="t5x_lite params checkpoint directory to write.")
  parser.add_argument("--from", dest="from_dir", help="t5x_lite params checkpoint to export.")
  parser.add_argument("--to_hf", help="Hugging Face directory to write.")
  parser.add_argument("--hf_config",
                      help="Export: a config.json whose other fields (special token ids) to keep "
                           "(default: the copy an import wrote into the --from directory).")
  parser.add_argument("--scan_layers", action=argparse.BooleanOptionalAction, default=True,
                      help="Import with params stacked on a leading layer axis (nn.scan, the "
                           "default) or as layers_0, layers_1, ...")
  parser.add_argument("--param_dtype", choices=DTYPES,
                      help="Parameter dtype of the import (default: the checkpoint's own).")
  parser.add_argument("--dtype", choices=DTYPES,
                      help="Compute dtype written to model.gin (default: --param_dtype).")
  parser.add_argument("--quantize", choices=("int8", "int4", "nf4", "w8a8"),
                      help="Write --to as a quantized params checkpoint of --from (or of the "
                           "--from_hf import): int8 per output channel, int4 / nf4 in groups.")
  parser.add_argument("--group_size", type=int, default=128,
                      help="int4 / nf4: values per scale along each kernel's input (32, 64, "
                           "128).")
  parser.add_argument("--quantize_embeddings", action="store_true",
                      help="Also quantize embedding tables and an untied output head (int8).")
  args = parser.parse_args(argv)
  if args.quantize:
    if not (args.to and (args.from_dir or args.from_hf)) or args.to_hf or (
        args.from_dir and args.from_hf):
      parser.error("--quantize writes --to DIR from --from DIR (a t5x_lite params checkpoint) "
                   "or from --from_hf DIR.")
    return args
  if args.group_size != 128 or args.quantize_embeddings:
    parser.error("--group_size / --quantize_embeddings apply with --quantize.")
  importing, exporting = bool(args.from_hf or args.to), bool(args.from_dir or args.to_hf)
  if importing == exporting or (importing and not (args.from_hf and args.to)) or (
      exporting and not (args.from_dir and args.to_hf)):
    parser.error("give either --from_hf DIR --to DIR (import) or --from DIR --to_hf DIR "
                 "(export).")
  if exporting and (args.param_dtype or args.dtype):
    parser.error("--param_dtype/--dtype apply to import; export writes the params' own dtype.")
  if importing and args.hf_config:
    parser.error("--hf_config applies to export (--to_hf).")
  return args


def quantize(args: argparse.Namespace) -> str:
  """--quantize: the quantized copy of a params checkpoint (imported first with --from_hf)."""
  from t5x_lite import quantized_checkpoints  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as tmp:
    source = args.from_dir
    if args.from_hf:
      source = os.path.join(tmp, "float")
      hf.convert_from_hf(args.from_hf, source, scan_layers=args.scan_layers,
                         param_dtype=args.param_dtype, dtype=args.dtype)
    model, sizes = quantized_checkpoints.quantize_checkpoint(
        source, args.to, args.quantize, args.group_size, args.quantize_embeddings)
  ratio = sizes["float_bytes"] / sizes["quantized_bytes"]
  print(f"Wrote {args.to} ({type(model.base).__name__}, {args.quantize}"
        + (f" in groups of {args.group_size}" if args.quantize in ("int4", "nf4") else "")
        + f", {len(model.sites())} layers quantized): parameters {sizes['quantized_bytes']:,} "
        f"bytes, {ratio:.2f}x smaller than {sizes['float_bytes']:,}.")
  return args.to


def main(argv: Optional[Sequence[str]] = None) -> str:
  args = parse_args(argv)
  if args.quantize:
    return quantize(args)
  if args.from_hf:
    model = hf.convert_from_hf(args.from_hf, args.to, scan_layers=args.scan_layers,
                               param_dtype=args.param_dtype, dtype=args.dtype)
    out = args.to
  else:
    model = hf.convert_to_hf(args.from_dir, args.to_hf, args.hf_config)
    out = args.to_hf
  total, active = model.num_params(), model.num_params(active=True)
  counts = f"{total:,} parameters" + (f", {active:,} active per token" if active < total else "")
  print(f"Wrote {out} ({type(model).__name__}, {counts}, {model.config.param_dtype}).")
  return out


def run(argv: Optional[Sequence[str]] = None) -> int:
  """The command line: 0 on success; a refusal (what is wrong and how to fix it) is printed
  without a traceback and exits 2, as argparse's errors do. Other errors keep their traceback."""
  try:
    main(argv)
  except (ValueError, FileNotFoundError) as e:
    print(f"convert_checkpoint.py: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(run())
