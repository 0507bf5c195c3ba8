"""The train state, pure `train_step` / `eval_step`, and the `Trainer` that jits them on a mesh.

    trainer = Trainer(model, optimizer, mesh, {"decoder_input_tokens": (8, 256), ...})
    state = trainer.init_state(seed=0)            # sharded over the mesh from birth
    state, metrics = trainer.train_step(state, batch)   # state donated: updated in place
    metrics = trainer.eval_step(state.params, batch)

The trainer knows no loss: it minimises `model.loss_fn`, whose metrics merge themselves (see
`t5x_lite.metrics`; the loss's own normaliser weights microbatches). `trainable` chooses the
parameters the optimizer updates (the rest are frozen: no gradient kept, no optimizer state, no
update), and `frozen_trees` are further trees the loss reads but nobody trains (a reference
model, a teacher), passed to `model.loss_fn` as keyword arguments.

Metrics stay on the device; the caller fetches them only when it logs, so the host never waits
for a step it does not need to. Mixed precision, remat and scan over layers are model choices
(`TransformerConfig.dtype = 'bfloat16'` keeps fp32 parameters with bf16 compute, `remat_policy`,
`scan_layers`).

Letters in shapes: b batch, m microbatches, l length.
"""
from __future__ import annotations

import functools
import logging
import re
import time
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from t5x_lite import metrics as metrics_lib
from t5x_lite import partitioning
from t5x_lite.optimizers import Optimizer

# Which parameters train: None (all), a regular expression that must match the whole path of a
# parameter ("decoder/layers/mlp/wo/kernel"), or a function of that path.
Trainable = Union[None, str, Callable[[str], bool]]


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs besides the data position (kept by the checkpoint)."""
  step: jax.Array       # int32 scalar: optimizer updates done
  params: Any           # all parameters, trainable and frozen
  opt_state: Any        # the optimizer's state of the trainable parameters only
  rng: jax.Array        # base dropout key; step `s` uses fold_in(rng, s)


# ---------------------------------------------------------------------------- trainable subsets

def param_path(path) -> str:
  """"decoder/layers/mlp/wo/kernel": a parameter's path as `trainable` patterns see it."""
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def trainable_mask(params, trainable: Trainable):
  """A tree of bools shaped like `params`: True where the parameter trains."""
  if trainable is None:
    return jax.tree.map(lambda _: True, params)
  if isinstance(trainable, str):
    pattern = re.compile(trainable)
    trainable = lambda path: pattern.fullmatch(path) is not None
  mask = jax.tree_util.tree_map_with_path(lambda path, _: bool(trainable(param_path(path))),
                                          params)
  if not any(jax.tree.leaves(mask)):
    paths = [param_path(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    raise ValueError(f"trainable={trainable!r} matches no parameter; paths look like "
                     f"{paths[:4]}.")
  return mask


def partition(tree, mask):
  """(trainable part, frozen part): the same structure, None where the other part holds a leaf."""
  return (jax.tree.map(lambda x, m: x if m else None, tree, mask),
          jax.tree.map(lambda x, m: None if m else x, tree, mask))


def combine(trainable, frozen):
  """The inverse of `partition`."""
  return jax.tree.map(lambda t, f: f if t is None else t, trainable, frozen,
                      is_leaf=lambda x: x is None)


# ---------------------------------------------------------------------------- pure steps

def init_state(model, optimizer: Optimizer, batch: Mapping[str, jax.Array], rng: jax.Array,
               mask=None) -> TrainState:
  params_rng, dropout_rng = jax.random.split(rng)
  return state_around(model.init(params_rng, batch), optimizer, dropout_rng, mask)


def state_around(params, optimizer: Optimizer, rng: jax.Array, mask=None) -> TrainState:
  """Step 0 and a fresh optimizer state (for the trainable leaves of `mask`) around `params`."""
  trainable = params if mask is None else partition(params, mask)[0]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=optimizer.tx.init(trainable), rng=rng)


def _checked(loss_fn):
  """`loss_fn`, refusing (at trace time) metrics that cannot be merged."""
  @functools.wraps(loss_fn)
  def checked(*args, **kwargs):
    loss, metrics = loss_fn(*args, **kwargs)
    bad = sorted(name for name, value in metrics.items() if not metrics_lib.is_metric(value))
    if bad or not isinstance(metrics.get("loss"), metrics_lib.Average):
      raise TypeError(
          f"A loss must return (loss, metrics) with every metric a t5x_lite.metrics Average or "
          f"Sum and metrics['loss'] the Average of the loss (its count is the normaliser that "
          f"weights microbatches); got plain values for {bad or ['loss']}.")
    return loss, metrics
  return checked


def _split_microbatches(batch, num_microbatches: int):
  """[b, l] -> [m, b/m, l]. Microbatch j takes rows j, j+m, j+2m, ... so that every device's
  contiguous block of rows splits locally (no data moves between devices)."""
  def split(x):
    b = x.shape[0]
    x = x.reshape((b // num_microbatches, num_microbatches) + x.shape[1:]).swapaxes(0, 1)
    return nn.with_logical_constraint(x, (None, "activation_batch") + (None,) * (x.ndim - 2))
  return jax.tree.map(split, batch)


def accumulate_gradients(loss_fn, params, batch, rng, num_microbatches: int):
  """Gradients and merged metrics of `loss_fn(params, batch, rng)` over the whole batch,
  computed `num_microbatches` rows at a time.

  Each microbatch's gradient is weighted by its loss's normaliser (`metrics["loss"].count`:
  target tokens for cross entropy), so the result equals the full batch's whatever the padding
  per microbatch; every metric merges by its own rule.
  """
  grad_fn = jax.value_and_grad(_checked(loss_fn), has_aux=True)
  if num_microbatches == 1:
    (_, metrics), grads = grad_fn(params, batch, rng)
    return grads, metrics
  micro = _split_microbatches(batch, num_microbatches)

  def microbatch(index, rows):
    (_, metrics), grads = grad_fn(params, rows, jax.random.fold_in(rng, index))
    return grads, metrics

  def body(carry, xs):
    grad_sum, metric_sum = carry
    grads, metrics = microbatch(*xs)
    weight = metrics["loss"].count
    grad_sum = jax.tree.map(lambda s, g: s + weight * g, grad_sum, grads)
    return (grad_sum, metrics_lib.merge(metric_sum, metrics)), None

  shapes = jax.eval_shape(microbatch, 0, jax.tree.map(lambda x: x[0], micro))
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  (grad_sum, metrics), _ = jax.lax.scan(body, zeros, (jnp.arange(num_microbatches), micro))
  total = jnp.maximum(metrics["loss"].count, 1e-9)
  return jax.tree.map(lambda g: g / total, grad_sum), metrics


def train_step(model, optimizer: Optimizer, num_microbatches: int, state: TrainState, frozen,
               batch: Mapping[str, jax.Array], frozen_trees: Mapping[str, Any]
               ) -> tuple[TrainState, dict]:
  """One optimizer update on `batch`; a pure function of its arguments.

  `state.params` holds the trainable parameters (None where frozen) and `frozen` the others
  (None where trainable). If the loss or the gradient norm is not finite (NaN/Inf), the update
  is skipped: parameters and optimizer state stay as they were, the step still advances (so the
  data position and the schedule stay aligned), and metrics["nonfinite"] is 1. The caller
  decides whether to go on.
  """
  # A model may need dropout beyond its config's (LoRA's adapter dropout says so itself).
  use_dropout = getattr(model, "uses_dropout", model.config.dropout_rate > 0)

  def loss_fn(trainable, rows, rng):
    return model.loss_fn(combine(trainable, frozen), rows, rng if use_dropout else None,
                         **frozen_trees)

  rng = jax.random.fold_in(state.rng, state.step)
  grads, metrics = accumulate_gradients(loss_fn, state.params, batch, rng, num_microbatches)
  updates, opt_state = optimizer.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(metrics["loss"].compute()) & jnp.isfinite(grad_norm)
  params, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                   (params, opt_state), (state.params, state.opt_state))
  metrics = dict(metrics, learning_rate=metrics_lib.Average.of(optimizer.schedule(state.step)),
                 grad_norm=metrics_lib.Average.of(grad_norm),
                 nonfinite=metrics_lib.Sum.of(1.0 - finite.astype(jnp.float32)))
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(model, params, batch: Mapping[str, jax.Array],
              frozen_trees: Mapping[str, Any]) -> dict:
  """Metrics of `batch` without dropout."""
  return _checked(model.loss_fn)(params, batch, None, **frozen_trees)[1]


class Trainer:
  """`init_state`, `train_step` and `eval_step` compiled once for one batch shape on one mesh.

  Args:
    model: a t5x_lite model (anything with its `init`, `abstract_params`, `loss_fn`, ...).
    optimizer: from `optimizers.create_optimizer`.
    mesh: from `partitioning.make_mesh`.
    batch_shapes: global shape of every batch feature, e.g. {"decoder_input_tokens": (8, 256)}.
    num_microbatches: accumulate gradients over this many slices of each batch (divides the
      per-device batch best; must divide the global batch).
    donate_state: donate the train state to `train_step`, which then updates it in place (one
      copy of params and optimizer state alive, not two); the state passed in is invalid after
      the call. False keeps it usable, at the cost of that memory (and, on accelerators, the copy).
      Frozen parameters are never donated.
    trainable: which parameters train (see `Trainable`); the others get no optimizer state and
      never change.
    frozen_trees: {name: tree of jax arrays already on the mesh} passed to every `loss_fn` call
      as keyword arguments and never updated (e.g. a DPO reference or a distillation teacher).
      A tree that is the frozen part of the parameters is the same buffers, not a copy.
  """

  def __init__(self, model, optimizer: Optimizer, mesh: Mesh,
               batch_shapes: Mapping[str, Sequence[int]], num_microbatches: int = 1,
               donate_state: bool = True, trainable: Trainable = None,
               frozen_trees: Optional[Mapping[str, Any]] = None):
    self.model, self.optimizer, self.mesh = model, optimizer, mesh
    self.batch_shapes = {k: tuple(v) for k, v in batch_shapes.items()}
    model.check_batch(self.batch_shapes)
    global_batch = next(iter(self.batch_shapes.values()))[0]
    partitioning.data_shard_info(mesh, global_batch)  # raises if data x fsdp does not divide it
    if num_microbatches < 1 or global_batch % num_microbatches:
      raise ValueError(f"num_microbatches={num_microbatches} must be >= 1 and divide the batch "
                       f"size {global_batch}.")
    self.num_microbatches, self.donate_state = num_microbatches, donate_state
    self.frozen_trees = dict(frozen_trees or {})

    abstract_batch = {k: jax.ShapeDtypeStruct(v, jnp.int32) for k, v in self.batch_shapes.items()}
    param_shapes, self.param_specs = model.abstract_params(abstract_batch)
    self.mask = trainable_mask(param_shapes, trainable)
    self.abstract_state, self.state_shardings = self._abstract_state(param_shapes)
    self._compile(model, optimizer, mesh)

  def _compile(self, model, optimizer, mesh):
    replicated = partitioning.replicated(mesh)
    self.batch_shardings = {k: partitioning.batch_sharding(mesh, len(v))
                            for k, v in self.batch_shapes.items()}
    trees_shardings = jax.tree.map(lambda x: x.sharding, self.frozen_trees)
    shardings = self.state_shardings
    trainable, frozen = partition(shardings.params, self.mask)
    self._init = partitioning.jit(
        lambda rng: init_state(model, optimizer, self._zeros_batch(), rng, self.mask), mesh,
        in_shardings=(replicated,), out_shardings=shardings)
    self._from_params = partitioning.jit(
        lambda params, rng: state_around(params, optimizer, jax.random.split(rng)[1], self.mask),
        mesh, in_shardings=(shardings.params, replicated), out_shardings=shardings)
    self._train_step = partitioning.jit(
        functools.partial(train_step, model, optimizer, self.num_microbatches), mesh,
        in_shardings=(shardings.replace(params=trainable), frozen, self.batch_shardings,
                      trees_shardings),
        out_shardings=(shardings.replace(params=trainable), replicated),
        donate_argnums=(0,) if self.donate_state else ())
    self._eval_step = partitioning.jit(
        functools.partial(eval_step, model), mesh,
        in_shardings=(shardings.params, self.batch_shardings, trees_shardings),
        out_shardings=replicated)

  def _zeros_batch(self):
    return {k: jnp.zeros(v, jnp.int32) for k, v in self.batch_shapes.items()}

  def _abstract_state(self, param_shapes):
    """(TrainState of ShapeDtypeStructs carrying shardings, TrainState of shardings)."""
    mesh, replicated = self.mesh, partitioning.replicated(self.mesh)
    param_shardings = partitioning.tree_shardings(param_shapes, self.param_specs, mesh)
    shapes = jax.eval_shape(
        lambda p: state_around(p, self.optimizer, jax.random.PRNGKey(0), self.mask), param_shapes)
    # Optimizer statistics shaped like their parameter are sharded like it; anything else
    # (counts, Adafactor's factored row/column statistics) is small and replicated.
    trainable_shapes = partition(param_shapes, self.mask)[0]
    trainable_shardings = partition(param_shardings, self.mask)[0]
    opt_shardings = optax.tree_map_params(
        self.optimizer.tx,
        lambda leaf, sharding, param: sharding if leaf.shape == param.shape else replicated,
        shapes.opt_state, trainable_shardings, trainable_shapes,
        transform_non_params=lambda _: replicated)
    shardings = TrainState(step=replicated, params=param_shardings, opt_state=opt_shardings,
                           rng=replicated)
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            shapes, shardings)
    return abstract, shardings

  def init_state(self, seed: int = 0) -> TrainState:
    return self._init(jax.random.PRNGKey(seed))

  def state_from_params(self, params, seed: int = 0) -> TrainState:
    """A fresh train state (step 0, new optimizer state) around existing `params`."""
    return self._from_params(params, jax.random.PRNGKey(seed))

  def train_step(self, state: TrainState, batch: Mapping[str, jax.Array]):
    """(new state, metrics on device). `state` is donated (unless `donate_state=False`): do
    not use it afterwards (its frozen parameters stay valid: they are not donated)."""
    trainable, frozen = partition(state.params, self.mask)
    new, metrics = self._train_step(state.replace(params=trainable), frozen, self._check(batch),
                                    self.frozen_trees)
    return new.replace(params=combine(new.params, frozen)), metrics

  def eval_step(self, params, batch: Mapping[str, jax.Array]) -> dict:
    return self._eval_step(params, self._check(batch), self.frozen_trees)

  def _check(self, batch):
    shapes = {k: tuple(v.shape) for k, v in batch.items()}
    if shapes != self.batch_shapes:
      raise ValueError(f"Batch shapes {shapes} differ from those the trainer was compiled for "
                       f"{self.batch_shapes}; every batch must have the same features and shapes "
                       "(pad, and drop the last partial batch).")
    return batch

  def flops_per_step(self) -> float:
    return self.model.flops_per_step(self.batch_shapes)

  def estimate_memory(self) -> dict[str, float]:
    """Bytes per device a train step needs, estimated before compiling: the train state's shard
    and the gradients of the trainable parameters (exact, from the shardings) and the
    activations kept for the backward pass (`model.activation_bytes`, an estimate that errs low,
    so that it refuses only runs that cannot fit)."""
    def shard_bytes(leaf):
      shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
      return float(np.prod(shape)) * np.dtype(leaf.dtype).itemsize
    state = sum(shard_bytes(x) for x in jax.tree.leaves(self.abstract_state))
    trainable = partition(self.abstract_state.params, self.mask)[0]
    grads = sum(shard_bytes(x) for x in jax.tree.leaves(trainable))
    rows = partitioning.data_parallel_size(self.mesh) * self.num_microbatches
    per_device = {k: (v[0] / rows,) + v[1:] for k, v in self.batch_shapes.items()}
    activations = self.model.activation_bytes(per_device, self.mesh.shape["tensor"])
    return {"state": state, "gradients": grads, "activations": activations,
            "total": state + grads + activations}

  def check_memory(self) -> None:
    """Refuses, with the estimate, a run that cannot fit before spending minutes compiling it."""
    need, have = self.estimate_memory(), available_memory_per_device()
    if need["total"] > have:
      gib = {k: f"{v / 2**30:.2f}" for k, v in need.items()}
      raise MemoryError(
          f"This run needs about {gib['total']} GiB per device (train state {gib['state']}, "
          f"gradients {gib['gradients']}, activations {gib['activations']}) but "
          f"{have / 2**30:.2f} GiB are available per device. Lower BATCH_SIZE or the "
          "TASK_FEATURE_LENGTHS, raise train.num_microbatches, set "
          "TransformerConfig.remat_policy, shard more (make_mesh.fsdp / .tensor), or use a "
          "smaller model.")


def available_memory_per_device() -> float:
  """Free bytes per local device: the accelerator's limit, or on CPU the host's available
  memory shared by the (possibly simulated) local devices."""
  device = jax.local_devices()[0]
  stats = device.memory_stats() if device.platform != "cpu" else None
  if stats and "bytes_limit" in stats:
    return float(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
  with open("/proc/meminfo") as f:
    meminfo = dict(line.split(":", 1) for line in f)
  return float(meminfo["MemAvailable"].split()[0]) * 1024 / jax.local_device_count()


# ---------------------------------------------------------------------------- MFU

# Dense bf16 peaks per chip, from the vendors' data sheets.
KNOWN_PEAK_FLOPS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12,
                    "TPU v5p": 459e12, "TPU v6 lite": 918e12, "NVIDIA A100": 312e12,
                    "NVIDIA H100": 989e12, "NVIDIA H200": 989e12}


def measure_matmul_flops(device: Optional[jax.Device] = None, n: int = 2048,
                         dtype=jnp.float32, repeats: int = 5) -> float:
  """FLOP/s of the best of `repeats` n x n matmuls on `device` (after one warm-up)."""
  device = device or jax.local_devices()[0]
  x = jax.device_put(jnp.ones((n, n), dtype), device)
  matmul = jax.jit(lambda a: a @ a)
  matmul(x).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(x).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2.0 * n ** 3 / best


def peak_flops_per_second() -> float:
  """The whole run's peak: the data-sheet peak per chip times the chips, or on CPU (where the
  simulated devices of one process share its cores) a matmul measured once, per process."""
  device = jax.devices()[0]
  if device.platform == "cpu":
    return measure_matmul_flops(jax.local_devices()[0]) * jax.process_count()
  for kind, peak in KNOWN_PEAK_FLOPS.items():
    if device.device_kind.startswith(kind):
      return peak * jax.device_count()
  logging.warning("Unknown device kind %r: MFU is relative to a measured bf16 matmul.",
                  device.device_kind)
  return measure_matmul_flops(n=8192, dtype=jnp.bfloat16) * jax.device_count()
