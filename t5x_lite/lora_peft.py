"""Hugging Face PEFT LoRA adapters <-> t5x_lite adapter exports, without PyTorch.

    export_peft("/tmp/lora_run", "hf_adapter")   # adapter_model.safetensors + adapter_config.json
    import_peft("hf_adapter", "/ckpt/base", "/tmp/adapter")   # an adapter export over a base

PEFT's adapter of a torch Linear holds lora_A.weight [r, in] and lora_B.weight [out, r] and adds
(lora_alpha / r) * B A to the weight [out, in]; ours hold A [in..., r] and B [r, out...] for a
kernel [in..., out...], so each is the other transposed, on the HF module that holds our kernel
(`interop.hf_families`' tables: LLaMA's q_proj, ..., GPT-2's Conv1D c_attn / c_proj, whose
`fan_in_fan_out` PEFT must be told). GPT-2's c_attn holds query|key|value in one tensor: their
three adapters become one of rank 3r (A side by side, B block-diagonal), and one PEFT config has
one rank, so every module is written at the largest rank, zero-padded, with lora_alpha scaled to
keep alpha / r. Both directions are exact.
"""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from t5x_lite import checkpoints, lora, models
from t5x_lite.interop import hf
from t5x_lite.interop.hf_families import family_of_config

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
# PEFT options that change what the adapter computes and that t5x_lite does not reproduce.
UNSUPPORTED = {"use_dora": False, "use_rslora": False, "rank_pattern": {}, "alpha_pattern": {},
               "modules_to_save": None, "layers_to_transform": None, "layer_replication": None,
               "use_qalora": False, "lora_bias": False, "target_parameters": None,
               "trainable_token_indices": None, "bias": "none"}


def _kernel_modules(cfg):
  """[(HF module name, Tensor spec, layer index)] of the dense modules holding our kernels."""
  family = family_of_config(cfg)
  return family, [(name[:-len(".weight")], spec, i)
                  for name, (spec, i) in hf._expand(family, cfg).items()  # pylint: disable=protected-access
                  if spec.ours[0].endswith("/kernel")]


def _layer(x, i, scanned):
  return x[i] if scanned and i is not None else x


def export_peft(adapter_dir: str, out_dir: str) -> str:
  """Writes the adapters of a t5x_lite adapter export as a PEFT LoRA adapter directory."""
  adapters, config = lora.load_adapters(adapter_dir)
  base_gin = os.path.join(adapter_dir, checkpoints.MODEL_GIN)
  cfg = models.from_gin(base_gin).config
  if cfg.fused_qkv:
    raise ValueError("PEFT export of fused_qkv adapters is not supported; train the adapters on "
                     "a model with TransformerConfig.fused_qkv = False.")
  family, modules = _kernel_modules(cfg)
  flat = {k: np.asarray(v, np.float32) for k, v in lora.flat(adapters).items()}
  rank = config["rank"]
  pairs, layouts = {}, set()  # HF module -> (A [r', in], B [out, r']); their HF layouts
  for module, spec, i in modules:
    paths = [hf._our_path(p, i, cfg.scan_layers)[:-len("kernel")] for p in spec.ours]  # pylint: disable=protected-access
    if not any(p + "lora_a" in flat for p in paths):
      continue
    shapes = [tuple(config["kernels"].get(p + "kernel") or ()) for p in paths]
    a_cols, b_blocks = [], []
    for path, shape in zip(paths, shapes):
      if path + "lora_a" not in flat:  # a part of a fused tensor without adapters
        continue
      a = _layer(flat[path + "lora_a"], i, cfg.scan_layers)
      b = _layer(flat[path + "lora_b"], i, cfg.scan_layers)
      a_cols.append(a.reshape(-1, rank))
      b_blocks.append((paths.index(path), b.reshape(rank, -1)))
    widths = [int(np.prod(hf._layer_shape(s, i, cfg.scan_layers)[spec.n_in:])) if s else 0  # pylint: disable=protected-access
              for s in shapes]
    big_b = np.zeros((rank * len(b_blocks), sum(widths)), np.float32)
    for row, (part, b) in enumerate(b_blocks):
      start = sum(widths[:part])
      big_b[row * rank:(row + 1) * rank, start:start + b.shape[1]] = b
    pairs[module] = (np.concatenate(a_cols, axis=1).T, big_b.T)
    layouts.add(spec.layout)
  if not pairs:
    raise ValueError(f"The adapters of {adapter_dir} are on no kernel that {family.architecture} "
                     "holds in a dense module.")
  if len(layouts) > 1:
    raise ValueError("These adapters are on torch Linear and GPT-2 Conv1D modules at once; one "
                     "PEFT config has one fan_in_fan_out. Export adapters on one kind only.")
  top = max(a.shape[0] for a, _ in pairs.values())
  tensors = {}
  for module, (a, b) in pairs.items():
    pad = top - a.shape[0]
    tensors[f"{PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(np.pad(a, ((0, pad), (0, 0))))
    tensors[f"{PREFIX}{module}.lora_B.weight"] = np.ascontiguousarray(np.pad(b, ((0, 0), (0, pad))))
  os.makedirs(out_dir, exist_ok=True)
  save_file(tensors, os.path.join(out_dir, ADAPTER_WEIGHTS), metadata={"format": "pt"})
  peft_config = dict(UNSUPPORTED, peft_type="LORA", task_type=None, r=top,
                     lora_alpha=config["alpha"] * top / rank, lora_dropout=config["dropout"],
                     target_modules=sorted(pairs), init_lora_weights=True, inference_mode=True,
                     fan_in_fan_out=layouts == {"in_out"},
                     base_model_name_or_path=config.get("base"))
  with open(os.path.join(out_dir, ADAPTER_CONFIG), "w") as f:
    json.dump(peft_config, f, indent=2, sort_keys=True)
  return out_dir


def read_peft_config(peft_dir: str) -> dict:
  path = os.path.join(peft_dir, ADAPTER_CONFIG)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"No {ADAPTER_CONFIG} in {peft_dir!r}; point at a directory written "
                            "by PEFT's save_pretrained.")
  with open(path) as f:
    config = json.load(f)
  if config.get("peft_type", "LORA") != "LORA":
    raise ValueError(f"{path}: peft_type {config.get('peft_type')!r}; only LORA adapters import.")
  set_options = [f"{k}={config[k]!r}" for k, default in UNSUPPORTED.items()
                 if config.get(k) not in (default, None, {}, False) and config.get(k) != default]
  if set_options:
    raise ValueError(f"{path} uses PEFT options t5x_lite's LoRA does not reproduce: "
                     f"{', '.join(set_options)}. Only plain LoRA (one r and lora_alpha for all "
                     "modules, no DoRA / rsLoRA, bias='none', no modules_to_save) imports.")
  return config


def import_peft(peft_dir: str, base_dir: str, out_dir: str) -> str:
  """Writes an adapter export over `base_dir` (a t5x_lite params checkpoint of the HF base)
  holding the PEFT LoRA adapters of `peft_dir`."""
  config = read_peft_config(peft_dir)
  base = models.from_gin(os.path.join(base_dir, checkpoints.MODEL_GIN))
  cfg = base.config
  _, modules = _kernel_modules(cfg)
  weights = load_file(os.path.join(peft_dir, ADAPTER_WEIGHTS))
  weights = {k[len(PREFIX):] if k.startswith(PREFIX) else k: v for k, v in weights.items()}
  rank = int(config["r"])
  base_meta = lora.flat(checkpoints.params_metadata(base_dir))
  per_layer: dict[str, dict[int, Any]] = {}  # our adapter path -> {layer: array}
  used = set()
  for module, spec, i in modules:
    a_name, b_name = f"{module}.lora_A.weight", f"{module}.lora_B.weight"
    if a_name not in weights:
      continue
    used |= {a_name, b_name}
    a, b = weights[a_name].astype(np.float32), weights[b_name].astype(np.float32)
    start = 0
    for template in spec.ours:
      path = hf._our_path(template, i, cfg.scan_layers)[:-len("kernel")]  # pylint: disable=protected-access
      shape = hf._layer_shape(tuple(base_meta[path + "kernel"].shape), i, cfg.scan_layers)  # pylint: disable=protected-access
      width = int(np.prod(shape[spec.n_in:]))
      per_layer.setdefault(path + "lora_a", {})[i] = a.T.reshape(shape[:spec.n_in] + (rank,))
      per_layer.setdefault(path + "lora_b", {})[i] = b[start:start + width].T.reshape(
          (rank,) + shape[spec.n_in:])
      start += width
  unknown = sorted(set(weights) - used)
  if unknown or not used:
    raise ValueError(f"{peft_dir}: adapters on modules {cfg.family} models of this base do not "
                     f"have as dense kernels: {unknown[:4] or 'none found'}; "
                     f"adaptable modules look like {[m for m, _, _ in modules[:4]]}.")
  adapters = {path: _stack(layers_, path, base_meta, cfg.scan_layers)
              for path, layers_ in per_layer.items()}
  targets = "|".join(sorted(p[:-len("lora_a")] + "kernel" for p in adapters
                            if p.endswith("lora_a")))
  model = lora.LoraModel(base, rank=rank, alpha=float(config["lora_alpha"]),
                         dropout=float(config.get("lora_dropout") or 0.0), targets=targets,
                         base_checkpoint=os.path.abspath(base_dir))
  kernels = {p[:-len("lora_a")] + "kernel": base_meta[p[:-len("lora_a")] + "kernel"]
             for p in adapters if p.endswith("lora_a")}
  return lora.save_adapters(out_dir, model, lora.join(kernels, adapters))


def _stack(by_layer: dict, path: str, base_meta, scanned: bool) -> np.ndarray:
  """One layer's adapter, or the scanned stack over every layer (zeros for layers PEFT left
  unadapted: B = 0 adds nothing, so the result is exact)."""
  if not scanned or None in by_layer:
    return next(iter(by_layer.values()))
  depth = base_meta[path.rsplit("/", 1)[0] + "/kernel"].shape[0]
  example = next(iter(by_layer.values()))
  return np.stack([by_layer.get(i, np.zeros_like(example)) for i in range(depth)])
