#!/usr/bin/env python3
"""LoRA adapters: merge them into their base, count what they cost, and trade them with
Hugging Face PEFT.

  merge    a full params checkpoint: the base with the adapters of a LoRA run merged in
           python tools/lora.py merge /tmp/lora_run --out /tmp/merged [--base /ckpt/llama]
  memory   optimizer-state bytes of LoRA against full fine-tuning (abstract shapes only)
           python tools/lora.py memory --gin_file=models/llama_1b.gin --rank 8
  to-peft  adapter_model.safetensors + adapter_config.json for the base exported to HF
           (tools/convert_checkpoint.py --to_hf), which peft.PeftModel loads
           python tools/lora.py to-peft /tmp/lora_run --out ~/hf/my_adapter
  from-peft  a PEFT LoRA adapter directory as a t5x_lite adapter export over a base checkpoint
           python tools/lora.py from-peft ~/hf/my_adapter --base /ckpt/llama --out /tmp/adapter
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from t5x_lite import lora  # noqa: E402


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python tools/lora.py", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  commands = parser.add_subparsers(dest="command", required=True)
  merge = commands.add_parser("merge", help="merge adapters into their base")
  merge.add_argument("adapters", help="an adapter export (the MODEL_DIR of a LoRA run)")
  merge.add_argument("--out", required=True, help="params checkpoint directory to write")
  merge.add_argument("--base", help="base params checkpoint (default: the one adapter.json names)")
  memory = commands.add_parser("memory", help="optimizer-state bytes, LoRA vs full fine-tuning")
  memory.add_argument("--gin_file", action="append", required=True, help="model gin file")
  memory.add_argument("--gin", action="append", default=[], dest="bindings",
                      help="a gin binding, e.g. --gin 'TransformerConfig.num_layers = 2'")
  memory.add_argument("--rank", type=int, default=8)
  memory.add_argument("--targets", default="attention", choices=sorted(TARGETS))
  memory.add_argument("--optimizer", default="adamw", choices=("adamw", "adafactor", "lion"))
  memory.add_argument("--json", action="store_true", help="print JSON instead of a table")
  to_peft = commands.add_parser("to-peft", help="export adapters for Hugging Face PEFT")
  to_peft.add_argument("adapters", help="an adapter export (the MODEL_DIR of a LoRA run)")
  to_peft.add_argument("--out", required=True, help="PEFT adapter directory to write")
  from_peft = commands.add_parser("from-peft", help="import Hugging Face PEFT LoRA adapters")
  from_peft.add_argument("peft_dir", help="adapter_config.json + adapter_model.safetensors")
  from_peft.add_argument("--base", required=True, help="the base's t5x_lite params checkpoint")
  from_peft.add_argument("--out", required=True, help="adapter export directory to write")
  return parser


TARGETS = {"attention": lora.ATTENTION, "mlp": lora.MLP, "attention_and_mlp": lora.ATTENTION_AND_MLP}


def memory(gin_files: Sequence[str], bindings: Sequence[str], rank: int, targets: str,
           optimizer_name: str) -> dict:
  """Optimizer-state bytes and trainable parameters of full fine-tuning and of LoRA."""
  from t5x_lite import models, optimizers  # pylint: disable=g-import-not-at-top
  path = gin_files[0]
  if not os.path.exists(path):  # models/llama_1b.gin, as the train job finds it in gin_configs/
    path = os.path.join(os.path.dirname(models.PRESET_DIR), path)
  base = models.from_gin(path, list(bindings))
  model = lora.LoraModel(base, rank=rank, alpha=2.0 * rank, targets=TARGETS[targets])
  optimizer = optimizers.create_optimizer(optimizer_name,
                                          optimizers.create_schedule("constant", 1e-3, 0))
  shapes = lora.flat(model.abstract_params()[0])
  adapters = sum(x.size for p, x in shapes.items() if lora.is_adapter(p))
  return {"model": gin_files[0], "optimizer": optimizer_name, "rank": rank, "targets": targets,
          "full_params": base.num_params(), "lora_params": int(adapters),
          "full_optimizer_bytes": lora.optimizer_state_bytes(base, optimizer),
          "lora_optimizer_bytes": lora.optimizer_state_bytes(model, optimizer, lora.TRAINABLE)}


def _print_memory(report: dict) -> None:
  full, mine = report["full_optimizer_bytes"], report["lora_optimizer_bytes"]
  print(f"{report['model']}, {report['optimizer']}, LoRA r={report['rank']} on "
        f"{report['targets']}:")
  print("| fine-tuning | trainable parameters | optimizer state |")
  print("|---|---|---|")
  print(f"| full | {report['full_params']:,} | {full:,} B ({full / 2**30:.2f} GiB) |")
  print(f"| LoRA | {report['lora_params']:,} | {mine:,} B ({mine / 2**20:.2f} MiB) |")
  print(f"LoRA keeps {mine / full:.3%} of full fine-tuning's optimizer state.")


def main(argv: Optional[Sequence[str]] = None):
  args = _parser().parse_args(argv)
  try:
    if args.command == "merge":
      out = lora.merge_checkpoint(args.adapters, args.out, args.base)
      print(f"Wrote {out}: the base with the adapters of {args.adapters} merged in.")
      return out
    if args.command == "memory":
      report = memory(args.gin_file, args.bindings, args.rank, args.targets, args.optimizer)
      print(json.dumps(report, indent=1)) if args.json else _print_memory(report)
      return report
    from t5x_lite import lora_peft  # pylint: disable=g-import-not-at-top
    if args.command == "to-peft":
      out = lora_peft.export_peft(args.adapters, args.out)
    else:
      out = lora_peft.import_peft(args.peft_dir, args.base, args.out)
    print(f"Wrote {out}.")
    return out
  except (ValueError, FileNotFoundError) as error:
    raise SystemExit(f"python tools/lora.py {args.command}: error: {error}") from None


if __name__ == "__main__":
  main()
