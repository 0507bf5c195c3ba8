"""Quantized inference: int8 / int4 / nf4 weights, int8 x int8 matmuls (w8a8), every family.

    qmodel = quantization.QuantizedModel(model, mode="int4", group_size=128)
    qparams = qmodel.quantize(params)                 # from float parameters
    qmodel.predict_batch(qparams, batch)              # every method of the model, quantized
    t5x_lite.load(ckpt, quantize="int8")              # the same from a checkpoint

Modes (symmetric absmax, no zero point):
  int8   weight-only: int8 kernels with one float32 scale per output channel; the matmul reads
         the int8 kernel converted to the compute dtype and scales its output. (In a decoding
         loop XLA hoists the weight-only modes' dequantization out of the loop: a call holds
         float copies of the kernels while it runs, and its steps are float matmuls.)
  w8a8   the int8 parameters of "int8"; activations are quantized per token (absmax over the
         contracted dims) when the layer runs, and the matmul is int8 x int8 -> int32
         (`lax.dot_general(preferred_element_type=int32)`), rescaled by both scales.
  int4   weight-only: int4 values in groups of `group_size` along the contracted (input) axis,
         one float32 scale per group and output channel, two values packed per byte (uint8;
         `jnp.int4` takes a whole byte per element on CPU, so it would save nothing).
  nf4    weight-only NormalFloat4 (QLoRA): int4's layout, but each nibble indexes one of the 16
         NF4_LEVELS (normal quantiles in [-1, 1]) and the scale is the group's absmax;
         dequantized by looking the levels up.

What is quantized: the kernel of every `layers.DenseGeneral` (attention q/k/v/out or fused qkv,
MLP, BERT's head transform) and the experts of `moe.MoeMlp` (dequantized to the compute dtype
when the layer runs, whatever the mode); with `embeddings=True` also the token / position /
type tables (as the kernels: int8 per row, or int4 in groups along the row; used by lookup and
by the tied head) and an untied output head.
Norms, biases, T5's relative-position tables and MoE routers stay float: they are small and
their errors reach every token.

How: like `t5x_lite.lora`, flax's `nn.intercept_methods` around DenseGeneral, Embed and
MoeMlp, so no model file changes and every family, layout (scanned or unrolled layers, fused
QKV, layer groups) and decoding path works. A quantized layer's parameters are named after what
they hold: "kernel_int8" [in, out...], "kernel_int4" or "kernel_nf4" [in / 2, out...] (the
input axes flattened into one) and "kernel_scale" [groups, out...] (groups = 1 for
per-channel), stacked on the `layers` axis when scanned; each keeps its kernel's logical axis
names, so it shards like the kernel did. A params checkpoint written by
`quantized_checkpoints.save_checkpoint` holds exactly these integers and scales plus
`quantization.json`; loading it never builds a float kernel.

qwix 0.1.8 was tried first and not used: its PTQ provider fails on DenseGeneral's
`kernel.astype` ("Unsupported type: QArray"), its sub-channel tiles follow one kernel axis (our
attention output kernel's input is (heads, head_dim), so a 128-group over both cannot be
asked for), its `quantize_params` tiles the stacked [layers, ...] kernels of scanned models on
the wrong axis, and it stores int4 as `jnp.int4` (and nf4 as `jnp.uint4` indices), one byte
per element on CPU.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from t5x_lite import checkpoints, interception, layers, moe
from t5x_lite.quantized_arrays import (KINDS, dequantize_array, fused_matmul, quantize_activations,
                                       quantize_array)

Array = jax.Array
MODES = ("int8", "int4", "nf4", "w8a8")
WEIGHT_ONLY_MODES = ("int8", "int4", "nf4")  # what QLoRA's frozen base may be (t5x_lite.lora)
GROUP_SIZES = (32, 64, 128)  # the int4 / nf4 group sizes offered (any even divisor works)


NO_QAT = ("quantization-aware training does not exist in t5x_lite yet. Train (or fine-tune) "
          "the float model, i.e. without QUANTIZE / quantize=, and quantize its checkpoint "
          "afterwards (tools/convert_checkpoint.py --from DIR --quantize int8 --to QDIR); to "
          "train LoRA adapters over a frozen quantized base (QLoRA), use "
          "--gin_file=runs/qlora_finetune.gin.")


def undefined_macro_hint(name: str) -> Optional[str]:
  """Why a job whose gin files read no QUANTIZE* macro (training) refuses one, with the fix;
  None for other names (`launch.configure` asks before calling it a typo)."""
  if not name.startswith("QUANTIZE"):
    return None
  return (f"this job does not quantize: {name} belongs to runs/infer.gin, "
          f"runs/eval_metrics.gin and runs/qlora_finetune.gin; {NO_QAT}")


# ---------------------------------------------------------------------------- settings

@dataclasses.dataclass(frozen=True)
class Settings:
  """How a model is quantized (mode, group_size, embeddings: what `quantization.json` records)
  and how its weight-only matmuls run (fused_max_rows, not stored: the arrays are the same)."""
  mode: str = "int8"
  group_size: int = 128  # int4 / nf4 only; int8 / w8a8 kernels are per output channel
  embeddings: bool = False
  # Weight-only matmuls of at most this many rows (decoding steps) run as `fused_matmul`; 0
  # keeps the dequantize + dot everywhere, which measured faster on XLA-CPU (see
  # `fused_matmul`); tools/benchmark_quant.py's "+fused" variants ask for 16.
  fused_max_rows: int = 0

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"quantize={self.mode!r} is not a quantization mode; choose one of "
                       f"{list(MODES)} (or None for float).")
    if self.bits == 4 and (not isinstance(self.group_size, int) or self.group_size < 2
                           or self.group_size % 2):
      raise ValueError(f"{self.mode} group_size must be an even int (e.g. one of "
                       f"{list(GROUP_SIZES)}), got {self.group_size!r}.")
    if (not isinstance(self.fused_max_rows, int) or isinstance(self.fused_max_rows, bool)
        or self.fused_max_rows < 0):
      raise ValueError(f"fused_max_rows must be an int >= 0 (0: never fused), got "
                       f"{self.fused_max_rows!r}.")
    if self.fused_max_rows and self.mode not in WEIGHT_ONLY_MODES:
      raise ValueError(f"fused_max_rows is for the weight-only modes {list(WEIGHT_ONLY_MODES)}; "
                       f"{self.mode} matmuls are int8 x int8 (give fused_max_rows=0).")

  @property
  def bits(self) -> int:
    return 4 if self.mode in ("int4", "nf4") else 8

  @property
  def kind(self) -> str:
    """What the arrays hold (their parameters' suffix): "int8", "int4" or "nf4"."""
    return self.mode if self.mode in KINDS else "int8"

  @property
  def storage(self) -> dict:
    """What the parameters hold; modes with equal storage read each other's checkpoints."""
    return {"values": self.kind, "group_size": self.group_size if self.bits == 4 else None,
            "embeddings": self.embeddings}

  def kernel_group(self, size: int, where: str) -> Optional[int]:
    """The group size for a contracted axis of `size` (None: per channel), checked."""
    if self.bits == 8:
      return None
    if size % self.group_size:
      divisors = [g for g in GROUP_SIZES if size % g == 0]
      raise ValueError(
          f"{self.mode} group_size={self.group_size} does not divide the input dimension "
          f"{size} of {where}; choose a group size that divides every kernel's input dimension"
          + (f" (here {divisors} do)" if divisors else " (an even divisor of it)")
          + ", e.g. --group_size 32, or quantize with int8.")
    return self.group_size


# ---------------------------------------------------------------------------- the interceptor

def _param(module: nn.Module, name: str, shape, axes, dtype) -> Array:
  """A quantized parameter; its initializer only runs to give `abstract_params` its shape."""
  return layers.param(module, name, nn.initializers.zeros, shape, axes, dtype)


def _kernel_params(module, prefix: str, in_size: int, in_axis, out_shape, out_axes,
                   settings: Settings, where: str, lead: tuple = (), lead_axes: tuple = ()):
  """(q, scale) of a kernel [lead..., in, out...] with its logical axes."""
  group = settings.kernel_group(in_size, where)
  bits = settings.bits
  q = _param(module, f"{prefix}_{settings.kind}", lead + (in_size * bits // 8,) + out_shape,
             lead_axes + (in_axis,) + out_axes, jnp.int8 if bits == 8 else jnp.uint8)
  groups = 1 if group is None else in_size // group
  scale = _param(module, f"{prefix}_scale", lead + (groups,) + out_shape,
                 lead_axes + (None,) + out_axes, jnp.float32)
  return q, scale


def _is_head(module: layers.DenseGeneral) -> bool:
  return "vocab" in tuple(module.out_axes)


def _dense(module: layers.DenseGeneral, x: Array, settings: Settings) -> Array:
  """What DenseGeneral computes, from quantized parameters."""
  n_in = len(module.in_axes)
  in_shape, out_shape = x.shape[-n_in:], tuple(module.features)
  in_size = math.prod(in_shape)
  where = "/".join(module.path) + "/kernel"
  q, scale = _kernel_params(module, "kernel", in_size, module.in_axes[0], out_shape,
                            tuple(module.out_axes), settings, f"{where} {in_shape + out_shape}")
  dtype = module.dtype
  x = x.reshape(x.shape[:-n_in] + (in_size,))
  contract = (((x.ndim - 1,), (0,)), ((), ()))
  if settings.mode == "w8a8":
    xq, x_scale = quantize_activations(x, 1)
    acc = jax.lax.dot_general(xq, q, contract, preferred_element_type=jnp.int32)
    x_scale = x_scale.reshape(x_scale.shape[:-1] + (1,) * len(out_shape))
    y = (acc.astype(jnp.float32) * x_scale * scale[0]).astype(dtype)
  elif math.prod(x.shape[:-1]) <= settings.fused_max_rows:  # decoding: a few rows
    y = fused_matmul(x, q, scale, settings.kind).astype(dtype)
  elif settings.bits == 8:  # per channel: scale the output, not every weight
    y = jax.lax.dot_general(x.astype(dtype), q.astype(dtype), contract) * scale[0].astype(dtype)
  else:
    w = dequantize_array(q, scale, 0, settings.kind, dtype)
    y = jax.lax.dot_general(x.astype(dtype), w, contract)
  if module.use_bias:
    y = y + layers.param(module, "bias", nn.initializers.zeros, out_shape,
                         tuple(module.out_axes), module.param_dtype).astype(dtype)
  return y


def _embedding_params(module: layers.Embed, settings: Settings) -> None:
  """The quantized table [v, d] (int4: [v, d / 2]) and its scales [v, groups] along d: one per
  row (int8) or per group of a row (int4). Embed makes its table in setup, so these too."""
  v, d = module.num_embeddings, module.features
  group = settings.kernel_group(d, f"{'/'.join(module.path)}/embedding {(v, d)}") or d
  bits = settings.bits
  _param(module, f"embedding_{settings.kind}", (v, d * bits // 8), tuple(module.axes),
         jnp.int8 if bits == 8 else jnp.uint8)
  _param(module, "embedding_scale", (v, d // group), (module.axes[0], None), jnp.float32)


def _embed_call(module: layers.Embed, method: str, x: Array, settings: Settings) -> Array:
  q, scale = (nn.meta.unbox(module.get_variable("params", f"embedding_{n}"))
              for n in (settings.kind, "scale"))
  dtype = module.dtype
  if method == "__call__":  # the rows, then dequantized
    return dequantize_array(jnp.take(q, x, axis=0), jnp.take(scale, x, axis=0), x.ndim,
                            settings.kind, dtype)
  if settings.mode == "w8a8":  # attend, the tied head: int8 x int8 as the kernels
    xq, x_scale = quantize_activations(x, 1)
    acc = jnp.einsum("bld,vd->blv", xq, q, preferred_element_type=jnp.int32)
    return (acc.astype(jnp.float32) * x_scale * scale[:, 0]).astype(dtype)
  if math.prod(x.shape[:-1]) <= settings.fused_max_rows:  # decoding: a few rows
    return fused_matmul(x, q, scale, settings.kind, axis=1).astype(dtype)
  if settings.bits == 8:  # a row's scale is its logit's
    logits = jnp.einsum("bld,vd->blv", x.astype(dtype), q.astype(dtype))
    return logits * scale[:, 0].astype(dtype)
  table = dequantize_array(q, scale, 1, settings.kind, dtype)
  return jnp.einsum("bld,vd->blv", x.astype(dtype), table)


def _expert_kernels(module: moe.MoeMlp, settings: Settings) -> dict:
  """What `MoeMlp._kernels` returns, dequantized from the experts' quantized kernels."""
  cfg = module.config
  e, d, f = cfg.num_experts, cfg.d_model, cfg.d_ff
  names = ("wi_0", "wi_1") if cfg.gated_mlp else ("wi",)
  shapes = {n: (d, f, ("embed", "mlp")) for n in names}
  shapes["wo"] = (f, d, ("mlp", "embed"))
  out = {}
  for name, (n_in, n_out, (in_axis, out_axis)) in shapes.items():
    where = f"{'/'.join(module.path)}/{name}_kernel {(e, n_in, n_out)}"
    q, scale = _kernel_params(module, f"{name}_kernel", n_in, in_axis, (n_out,), (out_axis,),
                              settings, where, lead=(e,), lead_axes=("expert",))
    kernel = dequantize_array(q, scale, 1, settings.kind, cfg.dtype)
    bias = None
    if cfg.use_bias:
      bias = layers.param(module, f"{name}_bias", nn.initializers.zeros, (e, n_out),
                          ("expert", out_axis), cfg.param_dtype).astype(cfg.dtype)
    out[name] = (kernel, bias)
  return out


_ATTENTION_ARGS = inspect.signature(layers.Attention.__call__)


def _empty_int8_cache(cache: dict) -> dict:
  """The int8 cache (`layers.quantize_kv`'s layout) of an empty float one (`init_cache` makes
  zeros), made as zeros: quantizing the zeros would be exact too, but XLA would spend minutes
  constant-folding the absmax of large zero arrays."""
  out = {}
  for name in ("key", "value"):
    out[name] = jnp.zeros(cache[name].shape, jnp.int8)
    out[f"{name}_scale"] = jnp.ones(cache[name].shape[:-1], jnp.float32)
  return out


def _with_int8_cache(next_fun, module, args, kwargs):
  """Attention called with its (empty) float decoding cache replaced by an int8 one: on the
  first call of a decode (the prefill, or an encoder-decoder's first step); later calls get
  the int8 cache back from the decoding loop."""
  bound = _ATTENTION_ARGS.bind(module, *args, **kwargs)
  cache = bound.arguments.get("cache")
  if cache is not None and "key_scale" not in cache:
    bound.arguments["cache"] = _empty_int8_cache(cache)
  return next_fun(*bound.args[1:], **bound.kwargs)


def _interceptor(settings: Optional[Settings], kv_cache: Optional[str], sites: dict):
  """Runs quantized DenseGeneral / Embed / MoeMlp layers (no weights with `settings` None) and
  int8 KV caches (`kv_cache` "int8"); records each layer it quantizes in `sites` (its path ->
  (kind, number of input dims, number of output dims))."""
  def intercept(next_fun, args, kwargs, context):
    module, method = context.module, context.method_name
    path = "/".join(module.path)
    if kv_cache and isinstance(module, layers.Attention) and method == "__call__":
      return _with_int8_cache(next_fun, module, args, kwargs)
    if settings is None:
      return next_fun(*args, **kwargs)
    if interception.is_dense_call(context):
      if _is_head(module) and not settings.embeddings:
        return next_fun(*args, **kwargs)
      sites[path] = ("dense", len(module.in_axes), len(module.features))
      return _dense(module, args[0], settings)
    if isinstance(module, layers.Embed) and settings.embeddings:
      if method == "setup":  # instead of the float table
        sites[path] = ("embed", 1, 1)
        return _embedding_params(module, settings)
      if method in ("__call__", "attend"):
        return _embed_call(module, method, args[0], settings)
    if isinstance(module, moe.MoeMlp) and method == "_kernels":
      sites[path] = ("experts", 1, 1)
      return _expert_kernels(module, settings)
    return next_fun(*args, **kwargs)
  return intercept


# ---------------------------------------------------------------------------- the model

class QuantizedModel(interception.InterceptedModel):
  """`model` running on quantized parameters (see the module docstring).

  Every method of the base model (scoring, decoding, fill_mask, ...) runs quantized; attributes
  that are not methods are the base's. Training is refused: there is no quantization-aware
  training, so gradients of rounded integers would be meaningless. `fused_max_rows` (weight-only
  modes): matmuls of at most that many rows run as `quantized_arrays.fused_matmul` (see
  `Settings`); 0, the default, never.
  """
  RESERVED = ("base", "settings", "kv_cache", "_sites")

  def __init__(self, model: Any, mode: Optional[str] = "int8", group_size: int = 128,
               embeddings: bool = False, kv_cache: Optional[str] = None,
               fused_max_rows: int = 0):
    if isinstance(model, QuantizedModel):
      raise ValueError("This model is already quantized; wrap the float model once.")
    if type(model).__name__ == "LoraModel":
      raise ValueError("Quantize a model without LoRA adapters: merge them first "
                       "(tools/lora.py merge), then quantize the merged checkpoint; to train "
                       "adapters over a quantized base, use LoraModel(model, quantize='int4').")
    if kv_cache not in (None, "int8"):
      raise ValueError(f"kv_cache={kv_cache!r}: the KV cache is float (None) or 'int8'.")
    if mode is None and kv_cache is None:
      raise ValueError(f"Nothing to quantize: give a mode ({list(MODES)}) or kv_cache='int8'.")
    if mode is None and fused_max_rows:
      raise ValueError("fused_max_rows runs quantized weights: give a weight-only mode "
                       f"{list(WEIGHT_ONLY_MODES)} with it.")
    self.base = _fresh_copy(model)  # its own compiled functions: the interceptor is traced in
    self.settings = (None if mode is None
                     else Settings(mode, group_size, embeddings, fused_max_rows))
    self.kv_cache = kv_cache
    self._sites: dict = {}

  @contextlib.contextmanager
  def quantized(self):
    """While active, every quantized layer of the base model reads quantized parameters."""
    with nn.intercept_methods(_interceptor(self.settings, self.kv_cache, self._sites)):
      yield

  def _runner(self):
    return self.base

  def _context(self):
    return self.quantized()

  def __repr__(self):
    return (f"QuantizedModel({type(self.base).__name__}, {self.settings}, "
            f"kv_cache={self.kv_cache})")

  @property
  def mode(self) -> Optional[str]:
    return None if self.settings is None else self.settings.mode

  @property
  def uses_dropout(self) -> bool:
    """Asked by the trainer alone, as it builds a train step: refused, as `loss_fn` is."""
    return self.loss_fn()

  def loss_fn(self, *args, **kwargs):
    raise ValueError(f"A quantized model ({self.mode or 'int8 KV cache'}) is for inference "
                     f"only: {NO_QAT}")

  # -- parameters ---------------------------------------------------------------------------------
  def abstract_params(self, batch=None):
    """(shapes, logical specs) of the quantized parameters; refuses bad group sizes."""
    self._sites.clear()
    with self.quantized():
      shapes, specs = self.base.abstract_params(batch)
    if self.settings is not None and not self._sites:
      raise ValueError(f"{type(self.base).__name__} has no layer that {self.settings.mode} "
                       "quantizes.")
    return shapes, specs

  def num_params(self, batch=None, active: bool = False) -> int:
    return self.base.num_params(batch, active)  # the model's own count, not of stored arrays

  def init(self, rng, batch):
    return self.quantize(self.base.init(rng, batch))

  def sites(self) -> dict:
    """{layer path: (kind, input dims, output dims)} of the layers quantized."""
    if not self._sites:
      self.abstract_params()
    return dict(self._sites)

  def quantize(self, params, out_shardings=None):
    """The quantized parameters of the base model's float `params` (any layout), jitted; with
    `out_shardings` (a tree like `abstract_params`' shapes) laid out that way."""
    if self.settings is None:
      return params if out_shardings is None else jax.device_put(params, out_shardings)
    sites = self.sites()
    return jax.jit(functools.partial(_quantize_tree, sites, self.settings),
                   out_shardings=out_shardings)(params)

  def float_abstract(self, like=None):
    """The base model's abstract parameters, on the mesh of `like` (quantized abstract
    parameters with shardings) when they have one: what a float checkpoint is read into."""
    shapes, specs = self.base.abstract_params()
    sharding = next(iter(jax.tree.leaves(like)), None) if like is not None else None
    mesh = getattr(getattr(sharding, "sharding", None), "mesh", None)
    if mesh is None:
      device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
                          shapes)
    from t5x_lite import partitioning  # pylint: disable=g-import-not-at-top
    return checkpoints.abstract_with_shardings(
        shapes, partitioning.tree_shardings(shapes, specs, mesh))


def cached_score(model, params, batch) -> Array:
  """A decoder-only model's teacher-forced log-likelihood of each row's targets [b], as
  `score_batch`, but computed by prefilling a decoding cache with the whole row, so attention
  reads its keys and values from the cache as generation does (an int8 one for a
  QuantizedModel with kv_cache='int8'): what the KV cache costs in perplexity."""
  base = model.base if isinstance(model, QuantizedModel) else model
  if not hasattr(base, "generation_batch") or "encoder_input_tokens" in base.REQUIRED_FEATURES:
    raise ValueError(f"cached_score needs a decoder-only model, not {type(base).__name__}.")
  context = model.quantized() if isinstance(model, QuantizedModel) else contextlib.nullcontext()
  with context:
    return jax.jit(functools.partial(_cached_score, base))(params, dict(batch))


def _cached_score(base, params, batch):
  from t5x_lite import transformer  # pylint: disable=g-import-not-at-top
  tokens = batch["decoder_input_tokens"]
  _, apply = base._decoder(params)  # pylint: disable=protected-access  # decoding's own layout
  cache = transformer.init_cache(base.config, tokens.shape[0], tokens.shape[1])
  logits, _ = apply(tokens, batch.get("decoder_segment_ids"), batch.get("decoder_positions"),
                    None, cache=cache)
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
  scores = jnp.take_along_axis(log_probs, batch["decoder_target_tokens"][..., None], -1)[..., 0]
  return jnp.sum(scores * batch["decoder_loss_weights"], axis=-1)


def _fresh_copy(model):
  """Another instance of `model`'s class with the same constructor arguments."""
  names = list(inspect.signature(type(model).__init__).parameters)[1:]
  try:
    return type(model)(**{name: getattr(model, name) for name in names})
  except (AttributeError, TypeError) as e:
    raise ValueError(f"Cannot quantize a {type(model).__name__}: its constructor arguments "
                     f"{names} are not all attributes of it ({e}).") from e


def _quantize_tree(sites: dict, settings: Settings, params):
  """Replaces each quantized layer's float parameters in `params` (nested dicts)."""
  out = jax.tree.map(lambda x: x, params)  # a copy whose dicts may be edited
  for path, (kind, n_in, n_out) in sites.items():
    node = _node(out, path)
    if node is None:
      raise ValueError(f"The parameters have no layer {path!r}; were they made for this model?")
    if kind == "embed":
      table = node.pop("embedding")
      group = settings.kernel_group(table.shape[1], f"{path}/embedding {tuple(table.shape)}")
      node[f"embedding_{settings.kind}"], node["embedding_scale"] = quantize_array(
          table, 1, settings.kind, group)
      continue
    names = ["kernel"] if kind == "dense" else [k for k in list(node) if k.endswith("_kernel")
                                                and k != "router"]
    for name in names:
      kernel = node.pop(name)
      lead = kernel.ndim - n_in - n_out  # stacked layers (and experts)
      in_size = math.prod(kernel.shape[lead:lead + n_in])
      flat = kernel.reshape(kernel.shape[:lead] + (in_size,) + kernel.shape[lead + n_in:])
      group = settings.kernel_group(in_size, f"{path}/{name} {tuple(kernel.shape)}")
      q, scale = quantize_array(flat, lead, settings.kind, group)
      node[f"{name}_{settings.kind}"], node[f"{name}_scale"] = q, scale
  return out


def _node(tree: dict, path: str):
  """The dict of `tree` at a module path, trying scanned layers' stacked names."""
  for name in path.split("/"):
    if not isinstance(tree, dict) or name not in tree:
      return None
    tree = tree[name]
  return tree


# ---------------------------------------------------------------------------- memory

def param_bytes(params) -> int:
  """Bytes the parameter arrays take (device arrays or checkpoint metadata)."""
  return int(sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize
                 for x in jax.tree.leaves(params)))
