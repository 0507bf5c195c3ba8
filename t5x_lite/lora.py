"""LoRA: low-rank adapters on the kernels of any model, trained with the base frozen.

    model = lora.LoraModel(models.from_gin("llama_tiny"), rank=8, alpha=16.0)
    params = model.init(rng, batch)            # the base's parameters plus lora_a / lora_b
    trainer = Trainer(model, optimizer, mesh, shapes, trainable=lora.TRAINABLE)

Every `layers.DenseGeneral` whose kernel path ("decoder/layers/self_attention/query/kernel")
fully matches `targets` gains two parameters beside its kernel [in..., out...]:
  lora_a [in..., r]  random (fan-in scaled), logical axes: the kernel's input axes, then None;
  lora_b [r, out...] zeros, logical axes: None, then the kernel's output axes;
and computes  y = x W + (alpha / r) * dropout(x) A B.  B starts at zero, so step 0 is the base.
A and B are sharded like the kernel on the dimensions they share with it, scanned layers stack
them on the `layers` axis like every other parameter, and they compute in the model's dtype.

How: flax's `nn.intercept_methods` wraps every DenseGeneral call while the model runs, so no
model file changes and every family, preset and layer layout (scanned or not, fused QKV) works.
`LoraModel` wraps a model and runs each of its methods inside that interceptor; everything else
(feature converter, FLOPs, decoding, scoring) is the base model's own. qwix 0.1.8 was tried
first: its LoRA flattens the kernel's output axes into one dimension (so B cannot keep the
kernel's logical names), it needs its own wrapper module (the decoders rebuild
`type(module)(config)`), and with quantization it fails on DenseGeneral's `kernel.astype`.

Adapters are leaves named `lora_a` / `lora_b`: `TRAINABLE` selects them for `train.trainable`,
`split` / `merge` / `save_adapters` / `load_adapters` work on any params tree.

QLoRA: `LoraModel(model, quantize="int4")` (or "nf4", "int8") trains the adapters over a
frozen base held in its integer form (`t5x_lite.quantization`, weight-only): the base's kernels
are `kernel_int4` / `kernel_nf4` / `kernel_int8` + `kernel_scale` leaves, which the trainer
keeps frozen like any other base leaf; the adapters stay float. The quantization interceptor
runs inside the LoRA one, so each adapted layer computes quantized(x) + (alpha / r) * dropout(x)
A B.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
from typing import Any, Optional

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np

from t5x_lite import checkpoints, interception, layers, matmuls
from t5x_lite.trainer import param_path

ATTENTION = r".*attention/(query|key|value|out|qkv)/kernel"
MLP = r".*mlp/(wi|wi_0|wi_1|wo)/kernel"
ATTENTION_AND_MLP = f"({ATTENTION})|({MLP})"
TRAINABLE = r".*/lora_[ab]"  # the `train.trainable` of a LoRA run: the adapters alone

ADAPTERS_DIR = "adapters"       # an adapter export: adapters/ (Orbax), adapter.json, model.gin
ADAPTER_JSON = "adapter.json"
MERGED_JSON = "lora_merged.json"  # in a merged params checkpoint: the adapters merged into it


_SCANNED = re.compile(r"/layers_\d+/")


def is_adapter(path: str) -> bool:
  return path.rsplit("/", 1)[-1] in ("lora_a", "lora_b")


def _init_a(key, shape, dtype):
  """A [in..., r]: fan-in scaled over all input dims, so x A has the scale of x W."""
  flat = layers.default_kernel_init(key, (math.prod(shape[:-1]), shape[-1]), dtype)
  return flat.reshape(shape)


def _interceptor(pattern: re.Pattern, rank: int, scale: float, dropout: float, seen: list):
  """The `nn.intercept_methods` interceptor adding the adapters to matching DenseGenerals."""
  def intercept(next_fun, args, kwargs, context):
    module = context.module
    if not interception.is_dense_call(context):
      return next_fun(*args, **kwargs)
    path = "/".join(module.path) + "/kernel"
    seen.append(path)
    # Decoding unrolls scanned layers (layers_0, layers_1, ...): their adapters are the same.
    if not (pattern.fullmatch(path) or pattern.fullmatch(_SCANNED.sub("/layers/", path))):
      return next_fun(*args, **kwargs)
    y = next_fun(*args, **kwargs)
    x = args[0]
    n_in = len(module.in_axes)
    in_shape, out_shape = x.shape[-n_in:], tuple(module.features)
    if rank >= min(math.prod(in_shape), math.prod(out_shape)):
      raise ValueError(
          f"LoRA rank {rank} is not below min(in, out) = min({math.prod(in_shape)}, "
          f"{math.prod(out_shape)}) of {path} {in_shape + out_shape}: a full-rank adapter "
          "saves nothing. Choose a smaller LoraModel.rank, or leave this kernel out of targets.")
    a = layers.param(module, "lora_a", _init_a, in_shape + (rank,),
                     tuple(module.in_axes) + (None,), module.param_dtype)
    b = layers.param(module, "lora_b", nn.initializers.zeros, (rank,) + out_shape,
                     (None,) + tuple(module.out_axes), module.param_dtype)
    if dropout > 0.0 and module.has_rng("dropout"):  # an rng is given only when training
      keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - dropout, x.shape)
      x = jnp.where(keep, x / (1.0 - dropout), 0.0).astype(x.dtype)
    # The base kernel's 2-D matmul (its gradients need no transposing copies).
    h = matmuls.dense_matmul(x, a, n_in, module.dtype)
    delta = matmuls.dense_matmul(h, b, 1, module.dtype)
    return y + (scale * delta).astype(y.dtype)
  return intercept


@gin.configurable(module="t5x_lite.lora")
class LoraModel(interception.InterceptedModel):
  """`model` with LoRA adapters on the kernels matching `targets` (see the module docstring).

  Every method of the base model (loss, scoring, decoding, init, ...) runs with the adapters;
  attributes that are not methods are the base's. `rank` r, `alpha` (the update is scaled by
  alpha / r), `dropout` on the adapters' input while training; `quantize` ("int4" / "nf4" / "int8",
  `quantize_group_size`) holds the frozen base quantized (QLoRA).
  """
  RESERVED = ("base", "quantized_base", "_model")

  def __init__(self, model: Any = gin.REQUIRED, rank: int = 8, alpha: float = 16.0,
               dropout: float = 0.0, targets: str = ATTENTION,
               base_checkpoint: Optional[str] = None, quantize: Optional[str] = None,
               quantize_group_size: int = 128):
    if isinstance(model, LoraModel):
      raise ValueError("This model already has LoRA adapters; wrap the base model once.")
    if not isinstance(rank, int) or rank < 1 or alpha <= 0 or not 0.0 <= dropout < 1.0:
      raise ValueError(f"LoraModel needs rank >= 1 (got {rank!r}), alpha > 0 (got {alpha!r}) "
                       f"and 0 <= dropout < 1 (got {dropout!r}).")
    self.base, self.rank, self.alpha, self.dropout = model, rank, float(alpha), float(dropout)
    self.targets, self.base_checkpoint = targets, base_checkpoint
    self.quantize, self.quantize_group_size = quantize, quantize_group_size
    self.quantized_base = _quantized_base(model, quantize, quantize_group_size)
    # Methods run on the quantized base's own copy of the model (its compiled functions are
    # traced with the quantization interceptor), else on the model itself.
    self._model = model if self.quantized_base is None else self.quantized_base.base
    self._pattern = re.compile(targets)
    self._seen: list[str] = []  # the DenseGeneral kernel paths the last trace went through

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  @property
  def uses_dropout(self) -> bool:
    """Whether a train step needs a dropout rng (the trainer asks)."""
    return self.dropout > 0.0 or self.base.config.dropout_rate > 0.0

  @contextlib.contextmanager
  def adapters(self):
    """While active, every DenseGeneral matching `targets` runs with its adapter (on the
    quantized base's layers for QLoRA: the LoRA interceptor is the outer one)."""
    quantized = (contextlib.nullcontext() if self.quantized_base is None
                 else self.quantized_base.quantized())
    with nn.intercept_methods(_interceptor(self._pattern, self.rank, self.scale, self.dropout,
                                           self._seen)), quantized:
      yield

  def _runner(self):
    return self._model

  def _context(self):
    return self.adapters()

  def abstract_params(self, batch=None):
    """The base's (shapes, logical specs) plus the adapters'; refuses targets matching nothing."""
    self._seen.clear()
    with self.adapters():
      shapes, specs = self._model.abstract_params(batch)
    if not any(is_adapter(p) for p in _paths(shapes)):
      raise ValueError(
          f"LoRA targets {self.targets!r} match no kernel; the kernels are: "
          f"{sorted(set(self._seen))}. Set LoraModel.targets to a regex matching whole paths "
          f"(e.g. lora.ATTENTION, lora.MLP or lora.ATTENTION_AND_MLP).")
    return shapes, specs

  def init(self, rng, batch):
    self.abstract_params(batch)  # the checks, before any work
    if self.quantized_base is not None:  # float base + adapters, then the base quantized
      with nn.intercept_methods(_interceptor(self._pattern, self.rank, self.scale,
                                             self.dropout, self._seen)):
        return self.quantized_base.init(rng, batch)
    with self.adapters():
      return self.base.init(rng, batch)

  def num_params(self, batch=None) -> int:
    return sum(x.size for x in jax.tree.leaves(self.abstract_params(batch)[0]))

  # -- from a base checkpoint, to an adapter export ----------------------------------------
  def initial_params(self, directory: str, abstract_params, seed: int = 0):
    """The base parameters of a params checkpoint plus fresh adapters, laid out like
    `abstract_params` (the whole tree, adapters included, with shardings)."""
    base_abstract = split(abstract_params)[0]
    if self.quantized_base is None:
      _refuse_quantized_checkpoint(directory)
      base = checkpoints.load_params(directory, base_abstract)
    else:
      from t5x_lite import quantized_checkpoints  # pylint: disable=g-import-not-at-top
      base = quantized_checkpoints.frozen_base_params(self.quantized_base, directory,
                                                      base_abstract)
    self.base_checkpoint = os.path.abspath(directory)
    return join(base, self.fresh_adapters(abstract_params, seed))

  def fresh_adapters(self, abstract_params, seed: int = 0):
    """Adapters as `init` makes them (A random, B zero) for the kernels of `abstract_params`
    (shapes with shardings, adapters included), without tracing or initialising the base."""
    shapes = flat(abstract_params)
    kernels = flat(self.float_kernels() or abstract_params)
    names = sorted(name for name in shapes if name.endswith("/lora_a"))

    def make(rng):
      out = {}
      for index, name in enumerate(names):
        a, b = shapes[name], shapes[name[:-1] + "b"]
        stacked = a.ndim + b.ndim - 2 - kernels[name[:-len("lora_a")] + "kernel"].ndim
        # Stacked layers are a batch axis of the initialiser: each layer's fan-in is its own.
        init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                                batch_axis=tuple(range(stacked)))
        lead, rank = a.shape[:stacked], a.shape[-1]
        matrix = init(jax.random.fold_in(rng, index),
                      lead + (math.prod(a.shape[stacked:-1]), rank), a.dtype)
        out[name] = matrix.reshape(a.shape)
        out[name[:-1] + "b"] = jnp.zeros(b.shape, b.dtype)
      return join(out)
    shardings = jax.tree.map(lambda x: x.sharding, split(abstract_params)[1])
    return jax.jit(make, out_shardings=shardings)(jax.random.PRNGKey(seed))

  def float_kernels(self):
    """QLoRA: the float base's abstract parameters (its kernels' shapes, which the quantized
    ones flatten); None for LoRA on a float base, whose parameters hold the kernels."""
    if self.quantized_base is None:
      return None
    return self.quantized_base.base.abstract_params()[0]

  def save_params(self, directory: str, params) -> str:
    """An adapter export (a few MB): adapters/, adapter.json naming the base, model.gin."""
    return save_adapters(directory, self, params)

  def adapter_config(self) -> dict:
    config = {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout,
              "targets": self.targets}
    if self.quantized_base is not None:  # QLoRA: what the adapters were trained over
      config["base_quantization"] = {"mode": self.quantize,
                                     "group_size": self.quantized_base.settings.storage[
                                         "group_size"]}
    return config


def _quantized_base(model, quantize: Optional[str], group_size: int):
  """QLoRA's frozen base: `model` quantized weight-only (None: LoRA on the float model)."""
  if quantize is None:
    return None
  from t5x_lite import quantization  # pylint: disable=g-import-not-at-top
  if quantize not in quantization.WEIGHT_ONLY_MODES:
    raise ValueError(
        f"LoraModel.quantize={quantize!r}: QLoRA's frozen base is quantized weight-only, one of "
        f"{list(quantization.WEIGHT_ONLY_MODES)} (w8a8 rounds the activations, so no gradient "
        "would reach the adapters of earlier layers through it), or None for LoRA on the float "
        "model.")
  return quantization.QuantizedModel(model, quantize, group_size)


def _refuse_quantized_checkpoint(directory: str, fix: Optional[str] = None) -> None:
  from t5x_lite import quantized_checkpoints  # pylint: disable=g-import-not-at-top
  stored = quantized_checkpoints.read_settings(directory)
  if stored is not None:
    raise ValueError(
        f"{directory!r} is a quantized checkpoint ({stored.mode}); " + (fix or (
            "LoRA over a quantized base is QLoRA: use runs/qlora_finetune.gin (or "
            f"LoraModel(quantize={stored.mode!r})), or start from the float checkpoint it came "
            "from")) + ".")


# ---------------------------------------------------------------------------- params trees

def _paths(tree) -> list[str]:
  return [param_path(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]


def split(params):
  """(base, adapters): two nested dicts, the leaves of `params` that are not / are adapters."""
  base, adapters = {}, {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    name = param_path(path)
    _set(adapters if is_adapter(name) else base, name, leaf)
  return base, adapters


def join(*trees):
  """One nested dict holding the leaves of all `trees` (the inverse of `split`)."""
  out = {}
  for tree in trees:
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
      _set(out, param_path(path), leaf)
  return out


def _set(tree: dict, path: str, leaf) -> None:
  *parents, name = path.split("/")
  for key in parents:
    tree = tree.setdefault(key, {})
  tree[name] = leaf


def flat(tree) -> dict[str, Any]:
  return {param_path(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def kernel_delta(kernel_shape, a, b, scale: float):
  """scale * A B as a kernel-shaped update. A [L.., in..., r], B [L.., r, out...] where the
  leading L.. (stacked layers) are shared by both and by the kernel."""
  stacked = a.ndim + b.ndim - 2 - len(kernel_shape)
  n_in = a.ndim - 1 - stacked
  letters = "abcdefghijklmnopqrstuvwxyz"
  lead, ins, outs = letters[:stacked], letters[stacked:stacked + n_in], letters[
      stacked + n_in:len(kernel_shape)]
  delta = jnp.einsum(f"{lead}{ins}R,{lead}R{outs}->{lead}{ins}{outs}",
                     a.astype(jnp.float32), b.astype(jnp.float32))
  return scale * delta


def merge(params, scale: float):
  """The parameters with every adapter folded into its kernel (W + scale A B) and removed:
  the base model's parameters, computing what the adapted model computes."""
  base, adapters = split(params)
  if not adapters:
    raise ValueError("These parameters hold no LoRA adapters (lora_a / lora_b): nothing to merge. "
                     "Were they merged already?")
  kernels, flat_adapters = flat(base), flat(adapters)
  for name in sorted(flat_adapters):
    if name.endswith("/lora_a"):
      kernel_name = name[:-len("lora_a")] + "kernel"
      kernel = kernels[kernel_name]
      delta = kernel_delta(kernel.shape, flat_adapters[name],
                           flat_adapters[name[:-1] + "b"], scale)
      kernels[kernel_name] = (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)
  return join(kernels)


# ---------------------------------------------------------------------------- adapter exports

def kernel_shapes(params, kernels=None) -> dict[str, list[int]]:
  """{kernel path: shape} of the kernels that carry adapters in `params`, read from `kernels`
  (default `params`; a QLoRA model's `float_kernels()`, as its own are quantized)."""
  names, kernels = flat(params), flat(params if kernels is None else kernels)
  return {name[:-len("lora_a")] + "kernel": list(kernels[name[:-len("lora_a")] + "kernel"].shape)
          for name in names if name.endswith("/lora_a")}


def save_adapters(directory: str, model: LoraModel, params) -> str:
  """Writes the adapters of `params` (adapters/), adapter.json (LoRA settings, the base
  checkpoint, the shapes of the kernels adapted, an id) and the base's model.gin."""
  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  adapters = split(params)[1]
  checkpoints.save_tree(os.path.join(directory, ADAPTERS_DIR), adapters)
  shapes = kernel_shapes(params, model.float_kernels())
  record = dict(model.adapter_config(), format="t5x_lite.lora/1", base=model.base_checkpoint,
                kernels=shapes, id=_adapter_id(adapters, shapes, model.adapter_config()))
  if jax.process_index() == 0:
    with open(os.path.join(directory, ADAPTER_JSON), "w") as f:
      json.dump(record, f, indent=1)
    with open(os.path.join(directory, checkpoints.MODEL_GIN), "w") as f:
      f.write(checkpoints.model_gin(model.base))
  return directory


def _adapter_id(adapters, shapes, config) -> str:
  """A fingerprint of the adapters' values (what `merge` records, so it can refuse a repeat)."""
  digest = hashlib.sha256(json.dumps([shapes, config], sort_keys=True).encode())
  for name, leaf in sorted(flat(adapters).items()):
    digest.update(name.encode())
    digest.update(np.asarray(jax.device_get(leaf), np.float32).tobytes())
  return digest.hexdigest()[:16]


def read_adapter_config(directory: str) -> dict:
  path = os.path.join(directory, ADAPTER_JSON)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"{directory!r} is not a LoRA adapter export (no {ADAPTER_JSON}); point at the MODEL_DIR "
        "of a finished LoRA run (runs/lora_finetune.gin) or a directory from save_adapters.")
  with open(path) as f:
    return json.load(f)


def load_adapters(directory: str) -> tuple[dict, dict]:
  """(adapters tree on this process's first device, adapter.json) of an adapter export."""
  config = read_adapter_config(directory)
  target = os.path.join(os.path.abspath(directory), ADAPTERS_DIR)
  return checkpoints.restore_on_first_device(target), config


def check_base(config: dict, base_shapes: dict[str, Any], adapter_dir: str,
               base_dir: str) -> None:
  """Refuses adapters trained on kernels of other shapes than the base's, naming both."""
  wrong = []
  for name, shape in sorted(config["kernels"].items()):
    found = base_shapes.get(name)
    if found is None or list(found) != list(shape):
      wrong.append(f"{name}: adapters {tuple(shape)}, base "
                   f"{'missing' if found is None else tuple(found)}")
  if wrong:
    raise ValueError(
        f"The adapters in {adapter_dir} were trained on a base of other shapes than "
        f"{base_dir}: {'; '.join(wrong[:3])}{' ...' if len(wrong) > 3 else ''}. Use the base "
        f"they were trained on (adapter.json names it: {config.get('base')!r}).")


def merged_ids(directory: str) -> list[str]:
  path = os.path.join(directory, MERGED_JSON)
  if not os.path.isfile(path):
    return []
  with open(path) as f:
    return [entry["id"] for entry in json.load(f)]


def merge_checkpoint(adapter_dir: str, out_dir: str, base_dir: Optional[str] = None) -> str:
  """Writes to `out_dir` a full params checkpoint: the base (`base_dir`, default the one
  adapter.json names) with the adapters of `adapter_dir` merged into its kernels."""
  config = read_adapter_config(adapter_dir)
  base_dir = base_dir or config.get("base")
  if not base_dir:
    raise ValueError(f"{adapter_dir}/{ADAPTER_JSON} names no base checkpoint; give it (--base).")
  _refuse_quantized_checkpoint(base_dir, "merge the adapters into the float checkpoint it "
                               "came from (--base), then quantize the merged one")
  if config["id"] in merged_ids(base_dir):
    raise ValueError(
        f"The adapters of {adapter_dir} (id {config['id']}) are already merged into {base_dir} "
        f"(its {MERGED_JSON} says so); merging them twice would add their update twice. Merge "
        "into the original base instead.")
  base_meta = checkpoints.params_metadata(base_dir)
  check_base(config, {k: v.shape for k, v in flat(base_meta).items()}, adapter_dir, base_dir)
  adapters, _ = load_adapters(adapter_dir)
  merged = merge(join(checkpoints.load_params(base_dir), adapters), config["alpha"] /
                 config["rank"])
  with open(os.path.join(base_dir, checkpoints.MODEL_GIN)) as f:
    model_gin = f.read()
  checkpoints.save_params(out_dir, merged, model_gin)
  history = [{"id": i} for i in merged_ids(base_dir)] + [
      {"id": config["id"], "adapters": os.path.abspath(adapter_dir),
       "base": os.path.abspath(base_dir)}]
  with open(os.path.join(out_dir, MERGED_JSON), "w") as f:
    json.dump(history, f, indent=1)
  return out_dir


# ---------------------------------------------------------------------------- memory

def optimizer_state_bytes(model, optimizer, trainable=None) -> int:
  """Bytes of the optimizer state for the `trainable` parameters of `model` (all by default),
  from abstract shapes (jax.eval_shape: nothing is allocated)."""
  from t5x_lite import trainer as trainer_lib  # pylint: disable=g-import-not-at-top
  shapes, _ = model.abstract_params()
  mask = trainer_lib.trainable_mask(shapes, trainable)
  state = jax.eval_shape(optimizer.tx.init, trainer_lib.partition(shapes, mask)[0])
  return int(sum(x.size * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(state)))
