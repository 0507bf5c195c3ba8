"""Hugging Face checkpoints (config.json + safetensors) <-> t5x_lite params, without PyTorch.

    model, params = import_hf("gpt2_dir")               # any layout: scanned or not, fp32 or bf16
    export_hf(model, params, "hf_out")                   # config.json + model.safetensors
    convert_from_hf("gpt2_dir", "ckpt")                  # ckpt/params + ckpt/model.gin
    convert_to_hf("ckpt", "hf_out")

Which HF tensor holds which of our parameters is a table per architecture in `hf_families.py`;
this module only walks those tables: it checks the file holds exactly the tensors config.json
implies (naming any missing, unexpected or misshapen ones), reshapes each tensor into our layout,
and stacks layers along a leading axis when the model scans over layers. A model with
`fused_qkv` is converted through the separate layout: its qkv kernels are split into query, key
and value on export, and stacked back on import (`import_hf(..., fused_qkv=True)`).
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
from typing import Any, Mapping, Optional

import jax
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from t5x_lite import checkpoints, hf_tokenizer, models
from t5x_lite.config import TransformerConfig
from t5x_lite.interop.hf_families import Family, family_of_config, family_of_hf_config

CONFIG_JSON = "config.json"
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
HF_CONFIG_COPY = "hf_config.json"  # The imported config.json, kept so export restores token ids.

SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------
def read_hf_config(hf_dir: str) -> dict:
  path = os.path.join(hf_dir, CONFIG_JSON)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"No {CONFIG_JSON} in {hf_dir!r}; point at a directory written by "
                            "Hugging Face save_pretrained.")
  with open(path) as f:
    return json.load(f)


class SafetensorsWeights:
  """The tensors of one checkpoint (a single file or an index of shards), read lazily.

  Names are those of the current transformers classes, as from_pretrained sees them: tensors
  saved from the base model (GPT-2's original "h.0...", no "transformer.") gain the
  architecture's `prefix`, and old LayerNorm "gamma"/"beta" become "weight"/"bias".
  """

  def __init__(self, hf_dir: str, prefix: str = ""):
    single, index = os.path.join(hf_dir, SAFETENSORS), os.path.join(hf_dir, SAFETENSORS_INDEX)
    if os.path.isfile(single):
      files = [single]
    elif os.path.isfile(index):
      with open(index) as f:
        files = sorted({os.path.join(hf_dir, v) for v in json.load(f)["weight_map"].values()})
    else:
      raise FileNotFoundError(
          f"No {SAFETENSORS} or {SAFETENSORS_INDEX} in {hf_dir!r}. Only safetensors are read "
          "(no PyTorch needed); re-save the model with save_pretrained(safe_serialization=True).")
    stored = {}  # stored name -> open safetensors file
    for path in files:
      handle = safe_open(path, framework="np")
      stored.update((name, handle) for name in handle.keys())
    add_prefix = prefix and not any(name.startswith(prefix) for name in stored)
    self._files = {}  # our name for a tensor -> (file, stored name)
    for name, handle in stored.items():
      canonical = (prefix if add_prefix else "") + name
      for old, new in ((".gamma", ".weight"), (".beta", ".bias")):
        if canonical.endswith(old):
          canonical = canonical[:-len(old)] + new
      self._files[canonical] = (handle, name)
    self._views = {}  # name -> (name of the stored tensor, index into it)

  def add_views(self, views: Mapping[str, tuple[str, tuple]]) -> None:
    """Present parts of stored tensors under other names (`Family.views`); the stored tensors
    they come from are then no longer listed."""
    self._views.update(views)

  def names(self) -> set[str]:
    sources = {source for source, _ in self._views.values()}
    return (set(self._files) - sources) | set(self._views)

  def shape(self, name: str) -> tuple[int, ...]:
    if name in self._views:
      source, index = self._views[name]
      return tuple(np.empty(self.shape(source), np.bool_)[index].shape)  # no data is read
    handle, stored = self._files[name]
    return tuple(handle.get_slice(stored).get_shape())

  def dtype(self, name: str) -> str:
    handle, stored = self._files[self._views[name][0] if name in self._views else name]
    return handle.get_slice(stored).get_dtype()

  def get(self, name: str) -> np.ndarray:
    if name in self._views:
      source, index = self._views[name]
      handle, stored = self._files[source]
      return np.asarray(handle.get_slice(stored)[index] if index else handle.get_tensor(stored))
    handle, stored = self._files[name]
    return handle.get_tensor(stored)


# ----------------------------------------------------------------------------------------------
# The walk shared by import and export
# ----------------------------------------------------------------------------------------------
def _depth(cfg: TransformerConfig, stack: str) -> int:
  # A decoder-only config has no num_decoder_layers: its decoder depth is num_layers.
  return cfg.resolved_num_decoder_layers if stack == "decoder" else cfg.num_layers


def _expand(family: Family, cfg: TransformerConfig) -> dict[str, tuple]:
  """{HF tensor name: (Tensor, layer index or None)} for every tensor the model has; a
  per-expert Tensor comes once per expert, with its `expert` set."""
  out = {}
  for spec in family.tensors(cfg):
    for i in range(_depth(cfg, spec.stack)) if spec.stack else [None]:
      if spec.experts:
        for j in range(cfg.num_experts):
          out[spec.hf.format(i=i, j=j)] = (dataclasses.replace(spec, expert=j), i)
      else:
        out[spec.hf.format(i=i)] = (spec, i)
  return out


def _tensor_shapes(spec, i: Optional[int], shapes: dict, scanned: bool) -> list[tuple]:
  """The shapes of the slices of our parameters that HF tensor `spec` of layer `i` holds."""
  skip = 0 if spec.expert is None else 1  # one expert of the experts axis
  return [_layer_shape(shapes[_our_path(p, i, scanned)], i, scanned)[skip:] for p in spec.ours]


def _stack(by_layer: dict, scanned: bool) -> np.ndarray:
  """One parameter from its slices: {layer index or None: array}, or for a per-expert one
  {(layer, expert): array}; stacked over experts, then (scanned) over layers."""
  if all(isinstance(key, tuple) for key in by_layer):
    experts = collections.defaultdict(dict)
    for (i, j), array in by_layer.items():
      experts[i][j] = array
    by_layer = {i: np.stack([e[j] for j in range(len(e))]) for i, e in experts.items()}
  if None in by_layer or not scanned:  # One array: not per layer, or one layer's own path.
    (only,) = by_layer.values()
    return only
  return np.stack([by_layer[i] for i in range(len(by_layer))])


def _our_path(template: str, i: Optional[int], scanned: bool) -> str:
  return template.format(layers="layers" if scanned or i is None else f"layers_{i}")


def _layer_shape(shape: tuple[int, ...], i: Optional[int], scanned: bool) -> tuple[int, ...]:
  return shape[1:] if scanned and i is not None else shape


def _flat_shapes(model) -> dict[str, tuple[int, ...]]:
  shapes, _ = model.abstract_params(model.dummy_batch(1, {"inputs": 8, "targets": 8}))
  return {path: tuple(x.shape) for path, x in _flatten(shapes).items()}


def _flatten(tree) -> dict[str, Any]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(str(k.key) for k in path): leaf for path, leaf in flat}


def _unflatten(flat: dict[str, Any]) -> dict:
  tree = {}
  for path, leaf in flat.items():
    *parents, name = path.split("/")
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[name] = leaf
  return tree


def _listing(names) -> str:
  names = sorted(names)
  shown = ", ".join(names[:8])
  return shown + (f", ... ({len(names) - 8} more)" if len(names) > 8 else "")


def make_model(cfg: TransformerConfig) -> models.BaseModel:
  return models.MODEL_CLASSES[cfg.family](cfg)


# ----------------------------------------------------------------------------------------------
# Fused QKV (TransformerConfig.fused_qkv) <-> separate query / key / value
# ----------------------------------------------------------------------------------------------
QKV = ("query", "key", "value")


def fuse_qkv(params):
  """Params of a model with separate projections -> those of the same model with
  `fused_qkv=True`: every self-attention's query, key and value kernels [..., d, h, e] (and
  biases [..., h, e]) stacked as qkv [..., d, 3, h, e] ([..., 3, h, e]), scanned or not.
  Cross-attention keeps its own. Nested dicts or "/"-separated flat paths, as given."""
  def fuse(flat):
    for path in [p for p in flat if p.split("/")[-3:-1] == ["self_attention", "query"]]:
      base, _, leaf = path.rsplit("/", 2)
      flat[f"{base}/qkv/{leaf}"] = np.stack(
          [np.asarray(flat.pop(f"{base}/{name}/{leaf}")) for name in QKV], axis=-3)
  return _edit_flat(params, fuse)


def split_qkv(params):
  """The inverse of `fuse_qkv`: qkv [..., d, 3, h, e] -> query, key, value [..., d, h, e]."""
  def split(flat):
    for path in [p for p in flat if p.split("/")[-2] == "qkv"]:
      base, _, leaf = path.rsplit("/", 2)
      fused = np.asarray(flat.pop(path))
      for j, name in enumerate(QKV):  # The q/k/v axis is third from last in kernels and biases.
        flat[f"{base}/{name}/{leaf}"] = np.take(fused, j, axis=fused.ndim - 3)
  return _edit_flat(params, split)


def _edit_flat(params, edit):
  """`edit` (in place) a "/"-path flat copy of `params`; returned as flat or nested as given."""
  nested = any(isinstance(v, Mapping) for v in params.values())
  flat = _flatten(params) if nested else dict(params)
  edit(flat)
  return _unflatten(flat) if nested else flat


# ----------------------------------------------------------------------------------------------
# Import
# ----------------------------------------------------------------------------------------------
def config_from_hf(hf: dict, *, scan_layers: bool = True, param_dtype: str = "float32",
                   dtype: Optional[str] = None, fused_qkv: bool = False) -> TransformerConfig:
  """The TransformerConfig of a config.json (raises on architectures or options we lack)."""
  family = family_of_hf_config(hf)
  try:
    fields = family.config_from_hf(hf)
  except KeyError as missing:
    raise ValueError(f"config.json of a {family.architecture} lacks the field {missing}; it is "
                     "not a complete Hugging Face config.") from None
  # Every field explicit: TransformerConfig is gin-configurable, and bindings left over from an
  # earlier gin file must not leak into an imported model.
  defaults = {f.name: f.default for f in dataclasses.fields(TransformerConfig)}
  return TransformerConfig(**{**defaults, **fields, "scan_layers": scan_layers,
                              "param_dtype": param_dtype, "dtype": dtype or param_dtype,
                              "fused_qkv": fused_qkv})


def import_hf(hf_dir: str, *, scan_layers: bool = True, param_dtype: Optional[str] = None,
              dtype: Optional[str] = None, fused_qkv: bool = False):
  """(model, params) from a Hugging Face checkpoint directory.

  `param_dtype` defaults to the checkpoint's own (so bf16 weights stay bf16, bit for bit) and
  `dtype`, the compute dtype, to `param_dtype`. `fused_qkv` builds the model with one qkv kernel
  per self-attention (multi-head attention only), its query/key/value tensors stacked into it.
  """
  hf = read_hf_config(hf_dir)
  family = family_of_hf_config(hf)
  weights = SafetensorsWeights(hf_dir, family.prefix)
  weights.add_views(family.views({name: weights.shape(name) for name in weights.names()}))
  if param_dtype is None:
    probe = config_from_hf(hf)  # Only to name the token embedding, whose dtype we adopt.
    first = family.tensors(probe)[0].hf
    stored = weights.dtype(first) if first in weights.names() else "F32"
    param_dtype = SAFETENSORS_DTYPES.get(stored, "float32")
  cfg = config_from_hf(hf, scan_layers=scan_layers, param_dtype=param_dtype, dtype=dtype,
                       fused_qkv=fused_qkv)
  separate = cfg.replace(fused_qkv=False)  # The layout hf_families' tables describe.
  params = _read_params(family, separate, weights, _flat_shapes(make_model(separate)), hf_dir)
  model = make_model(cfg)
  if fused_qkv:
    params = fuse_qkv(params)
    if {p: v.shape for p, v in params.items()} != _flat_shapes(model):
      raise AssertionError("fuse_qkv does not give the fused model's parameters.")
  return model, _unflatten(params)


def _read_params(family: Family, cfg: TransformerConfig, weights: SafetensorsWeights,
                 shapes: dict[str, tuple[int, ...]], where: str) -> dict[str, np.ndarray]:
  """{our path: array} for every parameter of the model, after checking the file holds exactly
  the tensors config.json implies."""
  expected = _expand(family, cfg)
  present = weights.names()
  fallbacks = family.fallbacks(cfg)
  source = {n: n if n in present else fallbacks.get(n) for n in expected}
  scanned = cfg.scan_layers

  def our_shapes(spec, i):
    return _tensor_shapes(spec, i, shapes, scanned)

  _check_weights(family, cfg, weights, expected, source, our_shapes, where)
  layers = collections.defaultdict(dict)  # our path -> {layer index (, expert): array}
  dtype = jax.numpy.dtype(cfg.param_dtype)
  for name, (spec, i) in expected.items():
    arrays = spec.to_ours(weights.get(source[name]), our_shapes(spec, i))
    key = i if spec.expert is None else (i, spec.expert)
    for template, array in zip(spec.ours, arrays):
      layers[_our_path(template, i, scanned)][key] = array.astype(dtype, copy=False)
  params = {path: _stack(by_layer, scanned) for path, by_layer in layers.items()}
  if params.keys() != shapes.keys():  # A gap in hf_families' tables, never the user's fault.
    raise AssertionError(f"hf_families.{family.architecture} tables cover "
                         f"{sorted(params.keys() ^ shapes.keys())} wrongly.")
  return params


def _check_weights(family, cfg, weights, expected, source, our_shapes, where):
  """Raise naming every missing, unexpected or misshapen tensor, and untied "tied" copies."""
  present, tied = weights.names(), family.tied_copies(cfg)
  missing = [n for n, src in source.items() if src not in present]
  unexpected = [n for n in present - expected.keys() - tied.keys() if not family.is_ignored(n)]
  if missing or unexpected:
    summary = ", ".join(f"{k}={getattr(cfg, k)}" for k in (
        "num_layers", "num_decoder_layers", "tie_embeddings", "gated_mlp"))
    raise ValueError(
        f"{where}: the safetensors weights do not match config.json ({family.architecture}: "
        f"{summary}).\n  missing tensors ({len(missing)}): {_listing(missing)}\n  unexpected "
        f"tensors ({len(unexpected)}): {_listing(unexpected)}\nCheck that config.json was saved "
        "with these weights (layer counts, tied embeddings, gated MLP).")
  misshapen = []
  for name, (spec, i) in expected.items():
    want, got = spec.hf_shape(our_shapes(spec, i)), weights.shape(source[name])
    if want != got:
      misshapen.append(f"{source[name]}: config.json implies {list(want)}, file has {list(got)}")
  if misshapen:
    raise ValueError(f"{where}: {len(misshapen)} tensor shapes do not match config.json "
                     f"({family.architecture}):\n" + "\n".join("  " + m for m in misshapen[:8]))
  for copy, original in tied.items():
    if copy in present and not np.array_equal(weights.get(copy), weights.get(original)):
      raise ValueError(
          f"{where}: config.json ties {copy} to {original}, but the file holds different values "
          "for them; the checkpoint is untied, so set tie_word_embeddings=false in config.json "
          f"(not supported for {family.architecture} if it raises again).")


def convert_from_hf(hf_dir: str, out_dir: str, *, scan_layers: bool = True,
                    param_dtype: Optional[str] = None, dtype: Optional[str] = None,
                    fused_qkv: bool = False):
  """Write a t5x_lite params checkpoint (params/ + model.gin) from an HF checkpoint, with the
  tokenizer files found next to it and its special token ids (see t5x_lite.hf_tokenizer)."""
  model, params = import_hf(hf_dir, scan_layers=scan_layers, param_dtype=param_dtype,
                            dtype=dtype, fused_qkv=fused_qkv)
  hf = read_hf_config(hf_dir)
  arch = family_of_hf_config(hf).architecture
  gin_text = (f"# Converted from the Hugging Face {arch} checkpoint {os.path.abspath(hf_dir)}.\n"
              + checkpoints.model_gin(model)
              + hf_tokenizer.import_tokenizer(hf_dir, out_dir, hf))  # copies tokenizer files
  checkpoints.save_params(out_dir, params, gin_text)
  with open(os.path.join(out_dir, HF_CONFIG_COPY), "w") as f:
    json.dump(hf, f, indent=2, sort_keys=True)
  return model


# ----------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------
def export_hf(model: models.BaseModel, params, out_dir: str,
              base_config: Optional[dict] = None) -> dict:
  """Write config.json + model.safetensors that transformers' from_pretrained loads.

  `base_config` (the config.json the model was imported from) supplies what t5x_lite does not
  model, such as special token ids; every architecture field is rewritten from `model.config`.
  Returns the config dict written. A `fused_qkv` model's qkv kernels are split into HF's
  separate query/key/value tensors (GPT-2's c_attn is their concatenation again).
  """
  cfg = model.config
  family = family_of_config(cfg)
  hf_fields = family.config_to_hf(cfg)
  flat = {path: np.asarray(x) for path, x in _flatten(params).items()}  # Device -> host once.
  shapes = _flat_shapes(model)
  wrong = sorted(p for p in flat.keys() | shapes.keys()
                 if p not in flat or p not in shapes or tuple(flat[p].shape) != shapes[p])
  if wrong:
    raise ValueError(f"params do not match the model config: {_listing(wrong)} are missing, "
                     "unexpected or of another shape; export the params with the model.gin "
                     "they were trained with.")
  if cfg.fused_qkv:  # hf_families' tables describe the separate layout.
    flat, cfg = split_qkv(flat), cfg.replace(fused_qkv=False)
  scanned = cfg.scan_layers
  tensors = {}
  for name, (spec, i) in _expand(family, cfg).items():
    arrays = [flat[_our_path(p, i, scanned)] for p in spec.ours]
    if scanned and i is not None:
      arrays = [a[i] for a in arrays]
    if spec.expert is not None:
      arrays = [a[spec.expert] for a in arrays]
    tensors[name] = spec.to_hf(arrays)
  os.makedirs(out_dir, exist_ok=True)
  save_file(tensors, os.path.join(out_dir, SAFETENSORS), metadata={"format": "pt"})
  config = {}
  if base_config and base_config.get("model_type") == family.model_type:
    config = {k: v for k, v in base_config.items() if k not in ("torch_dtype", "rope_scaling")}
  config.update(hf_fields, architectures=[family.architecture], model_type=family.model_type,
                dtype=cfg.param_dtype)
  with open(os.path.join(out_dir, CONFIG_JSON), "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
  return config


def convert_to_hf(ckpt_dir: str, out_dir: str, hf_config: Optional[str] = None):
  """Write an HF checkpoint from a t5x_lite params checkpoint (params/ + model.gin).

  `hf_config` is a config.json whose other fields (special token ids) to keep; it
  defaults to the copy an import leaves in `ckpt_dir` (a fine-tuning run's MODEL_DIR has none,
  so pass the original one).
  """
  gin_path = os.path.join(ckpt_dir, checkpoints.MODEL_GIN)
  if not os.path.isfile(gin_path):
    raise FileNotFoundError(f"No {checkpoints.MODEL_GIN} in {ckpt_dir!r}: export needs a params "
                            "checkpoint written by checkpoints.save_params with its model gin.")
  model = models.from_gin(gin_path)
  family_of_config(model.config).config_to_hf(model.config)  # Fail before reading any weights.
  shapes, _ = model.abstract_params(model.dummy_batch(1, {"inputs": 8, "targets": 8}))
  params = checkpoints.load_params(ckpt_dir, shapes)
  if hf_config is None and os.path.isfile(os.path.join(ckpt_dir, HF_CONFIG_COPY)):
    hf_config = os.path.join(ckpt_dir, HF_CONFIG_COPY)
  base = None
  if hf_config is not None:
    if not os.path.isfile(hf_config):
      raise FileNotFoundError(f"No config.json at {hf_config!r} (given as hf_config).")
    with open(hf_config) as f:
      base = json.load(f)
  export_hf(model, params, out_dir, base)
  return model
