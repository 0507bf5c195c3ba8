#!/usr/bin/env python3
"""Soft prompts (runs/prompt_tuning.gin exports) for Hugging Face PEFT.

  to-peft  adapter_model.safetensors + adapter_config.json (PEFT prompt tuning) for the base
           exported to HF (tools/convert_checkpoint.py --from BASE --to_hf HF_DIR), which
           peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(HF_DIR), OUT)
           loads; decoder-only bases
           python tools/prompt_tuning.py to-peft /tmp/prompt --out ~/hf/my_prompt [--base DIR]

The virtual tokens are the base's BOS embedding (id 0) and then the prompt, so PEFT reads them
as the prompt-tuned model reads BOS, prompt, text: feed PEFT the text's ids alone.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python tools/prompt_tuning.py", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  commands = parser.add_subparsers(dest="command", required=True)
  to_peft = commands.add_parser("to-peft", help="export a soft prompt for Hugging Face PEFT")
  to_peft.add_argument("prompt", help="a prompt export (the MODEL_DIR of a prompt-tuning run)")
  to_peft.add_argument("--out", required=True, help="PEFT adapter directory to write")
  to_peft.add_argument("--base", help="base params checkpoint (default: the one "
                                      "prompt_tuning.json names)")
  return parser


def main(argv: Optional[Sequence[str]] = None) -> str:
  args = _parser().parse_args(argv)
  from t5x_lite import prompt_tuning  # pylint: disable=g-import-not-at-top
  try:
    out = prompt_tuning.export_peft(args.prompt, args.out, args.base)
  except (ValueError, FileNotFoundError) as error:
    raise SystemExit(f"python tools/prompt_tuning.py {args.command}: error: {error}") from None
  print(f"Wrote {out}: the soft prompt of {args.prompt} for PEFT "
        "(peft.PeftModel.from_pretrained(hf_base, out)).")
  return out


if __name__ == "__main__":
  main()
