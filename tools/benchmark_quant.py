"""Runners of `tools/benchmark.py decode --variants ...` (quantized t5x_lite) and of its
`--compare hf-int8` peer (PyTorch dynamic int8 on the HF model), each in its own process as
benchmark_runners.Worker runs them ("benchmark_quant:JaxQuantDecode").

    python tools/benchmark.py decode --shapes gpt-small --batch_sizes 1 8 \
        --variants int8 w8a8 int4 nf4 int8-kv --compare hf hf-int8

Variants: fp32 (the model as configured), int8 / w8a8 / int4 / nf4 (t5x_lite.quantization,
int4 and nf4 in groups of 128) and int8-kv (an int8 KV cache); "int8+int8-kv" combines; "+emb"
quantizes the embeddings and head too; "+fused" runs weight-only matmuls of <= 16 rows
(decoding steps) as `quantized_arrays.fused_matmul` (the experiment that measured slower than the
dot on XLA-CPU). The peer is
`torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)`: int8
weights per output channel and int8 activations quantized per call, like w8a8. GPT-2's
projections are transformers' `Conv1D`, not `nn.Linear`, so they are converted to equal
`nn.Linear` layers first (or quantize_dynamic would leave them float).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from benchmark_runners import JaxDecode, Shape, TorchDecode  # pylint: disable=g-bad-import-order
from benchmark_runners import _timed, step_param_bytes  # pylint: disable=g-bad-import-order

VARIANTS = ("fp32", "int8", "w8a8", "int4", "nf4", "int8-kv", "emb", "fused")


def variant_options(name: str) -> dict:
  """QuantizedModel arguments of a variant: "a+b" combines a weight mode with int8-kv and/or
  emb (the embeddings and output head quantized too, as quantize_dynamic does the lm_head)."""
  options = {"mode": None, "kv_cache": None, "embeddings": False, "fused_max_rows": 0}
  for part in name.split("+"):
    if part not in VARIANTS:
      raise ValueError(f"unknown decode variant {part!r}: choose from {list(VARIANTS)}, joined "
                       "with '+' (e.g. int8+int8-kv, w8a8+emb)")
    if part == "int8-kv":
      options["kv_cache"] = "int8"
    elif part == "emb":
      options["embeddings"] = True
    elif part == "fused":  # weight-only matmuls of <= 16 rows as quantized_arrays.fused_matmul
      options["fused_max_rows"] = 16
    elif part != "fp32":
      options["mode"] = part
  if options["fused_max_rows"] and options["mode"] not in ("int8", "int4", "nf4"):
    raise ValueError(f"decode variant {name!r}: fused is for the weight-only modes (int8, int4, "
                     "nf4), e.g. int4+fused")
  return options


class JaxQuantDecode(JaxDecode):
  """`predict_batch` of the quantized model (its parameters quantized from the float ones)."""

  def __init__(self, shape: Shape, bindings: Sequence[str], batch_size: int, prompt: int,
               new_tokens: int, warmup: int, variant: str):
    from t5x_lite import quantization  # pylint: disable=g-import-not-at-top
    self._variant = variant_options(variant)
    self._quantization = quantization
    super().__init__(shape, bindings, batch_size, prompt, new_tokens, warmup)
    self.info["param_bytes"] = step_param_bytes(self.params)

  def _call(self):
    if not isinstance(self.model, self._quantization.QuantizedModel) and any(
        self._variant.values()):  # first call: quantize (JaxDecode built the float params)
      self.model = self._quantization.QuantizedModel(self.model, **self._variant)
      self.params = self.model.quantize(self.params)
    super()._call()


def _linear_gpt2(torch, model) -> None:
  """transformers' Conv1D layers (GPT-2's projections, weight [in, out]) as nn.Linear."""
  from transformers.pytorch_utils import Conv1D  # pylint: disable=g-import-not-at-top
  for parent in list(model.modules()):
    for name, child in list(parent.named_children()):
      if isinstance(child, Conv1D):
        linear = torch.nn.Linear(child.weight.shape[0], child.weight.shape[1])
        linear.weight.data = child.weight.data.t().contiguous()
        linear.bias.data = child.bias.data
        setattr(parent, name, linear)


class TorchInt8Decode(TorchDecode):
  """HF `generate` on `quantize_dynamic`'s int8 model (see the module docstring)."""

  def __init__(self, hf_config: dict, inputs: np.ndarray, new_tokens: int, warmup: int):
    super().__init__(hf_config, inputs, new_tokens, False, 0)
    torch = self.torch
    _linear_gpt2(torch, self.model)
    self.model = torch.ao.quantization.quantize_dynamic(self.model, {torch.nn.Linear},
                                                        dtype=torch.qint8)
    self.info = {"first_step_s": _timed(self._call, 1)[0]}
    _timed(self._call, warmup)


def checked_variant(name: str) -> str:
  """argparse type of --variants: the name, once known to be one."""
  import argparse  # pylint: disable=g-import-not-at-top
  try:
    variant_options(name)
  except ValueError as e:
    raise argparse.ArgumentTypeError(str(e)) from e
  return name
