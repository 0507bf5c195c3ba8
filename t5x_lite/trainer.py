"""The train state, pure `train_step` / `eval_step`, and the `Trainer` that jits them on a mesh.

    trainer = Trainer(model, optimizer, mesh, {"decoder_input_tokens": (8, 256), ...})
    state = trainer.init_state(seed=0)            # sharded over the mesh from birth
    state, metrics = trainer.train_step(state, batch)   # state donated: updated in place
    metrics = trainer.eval_step(state.params, batch)

Metrics stay on the device; the caller fetches them only when it logs, so the host never waits
for a step it does not need to. Mixed precision, remat and scan over layers are model choices
(`TransformerConfig.dtype = 'bfloat16'` keeps fp32 parameters with bf16 compute, `remat_policy`,
`scan_layers`), and z-loss / label smoothing come from the model's loss.

Letters in shapes: b batch, m microbatches, l length.
"""
from __future__ import annotations

import functools
import logging
import time
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from t5x_lite import partitioning
from t5x_lite.config import TransformerConfig
from t5x_lite.optimizers import Optimizer

# Metrics averaged over target tokens (weighted by num_tokens when combining microbatches).
TOKEN_MEAN_METRICS = ("loss", "cross_entropy", "z_loss", "accuracy")


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs besides the data position (kept by the checkpoint)."""
  step: jax.Array       # int32 scalar: optimizer updates done
  params: Any
  opt_state: Any
  rng: jax.Array        # base dropout key; step `s` uses fold_in(rng, s)


def init_state(model, optimizer: Optimizer, batch: Mapping[str, jax.Array],
               rng: jax.Array) -> TrainState:
  params_rng, dropout_rng = jax.random.split(rng)
  params = model.init(params_rng, batch)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=optimizer.tx.init(params), rng=dropout_rng)


def _loss_and_grads(model, params, batch, rng):
  """(grads, metrics) of one (micro)batch; dropout only when the model has any."""
  dropout_rng = rng if model.config.dropout_rate > 0 else None
  grad_fn = jax.value_and_grad(model.loss_fn, has_aux=True)
  (_, metrics), grads = grad_fn(params, batch, dropout_rng)
  return grads, metrics


def _split_microbatches(batch, num_microbatches: int):
  """[b, l] -> [m, b/m, l]. Microbatch j takes rows j, j+m, j+2m, ... so that every device's
  contiguous block of rows splits locally (no data moves between devices)."""
  def split(x):
    b = x.shape[0]
    x = x.reshape((b // num_microbatches, num_microbatches) + x.shape[1:]).swapaxes(0, 1)
    return nn.with_logical_constraint(x, (None, "batch") + (None,) * (x.ndim - 2))
  return jax.tree.map(split, batch)


def accumulate_gradients(model, params, batch, rng, num_microbatches: int):
  """Gradients and metrics of the whole batch, computed `num_microbatches` rows at a time.

  Each microbatch's mean loss is weighted by its number of target tokens, so the result equals
  the full batch's token-mean loss and gradient whatever the padding per microbatch.
  """
  if num_microbatches == 1:
    return _loss_and_grads(model, params, batch, rng)
  micro = _split_microbatches(batch, num_microbatches)

  def body(carry, xs):
    grad_sum, metric_sum = carry
    index, microbatch = xs
    grads, metrics = _loss_and_grads(model, params, microbatch, jax.random.fold_in(rng, index))
    n = metrics["num_tokens"]
    grad_sum = jax.tree.map(lambda s, g: s + n * g, grad_sum, grads)
    metric_sum = {k: metric_sum[k] + (n * v if k in TOKEN_MEAN_METRICS else v)
                  for k, v in metrics.items()}
    return (grad_sum, metric_sum), None

  zeros_grads = jax.tree.map(jnp.zeros_like, params)
  zero_metrics = {k: jnp.zeros((), jnp.float32) for k in TOKEN_MEAN_METRICS + ("num_tokens",)}
  (grad_sum, metric_sum), _ = jax.lax.scan(
      body, (zeros_grads, zero_metrics), (jnp.arange(num_microbatches), micro))
  total = jnp.maximum(metric_sum["num_tokens"], 1.0)
  grads = jax.tree.map(lambda g: g / total, grad_sum)
  metrics = {k: (v / total if k in TOKEN_MEAN_METRICS else v) for k, v in metric_sum.items()}
  return grads, metrics


def train_step(model, optimizer: Optimizer, num_microbatches: int, state: TrainState,
               batch: Mapping[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer update on `batch`; a pure function of (state, batch).

  If the loss or the gradient norm is not finite (NaN/Inf), the update is skipped: parameters
  and optimizer state stay as they were, the step still advances (so the data position and the
  schedule stay aligned), and metrics["nonfinite"] is 1. The caller decides whether to go on.
  """
  rng = jax.random.fold_in(state.rng, state.step)
  grads, metrics = accumulate_gradients(model, state.params, batch, rng, num_microbatches)
  updates, opt_state = optimizer.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
  params, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                   (params, opt_state), (state.params, state.opt_state))
  metrics = dict(metrics, learning_rate=jnp.asarray(optimizer.schedule(state.step), jnp.float32),
                 grad_norm=grad_norm, nonfinite=1.0 - finite.astype(jnp.float32))
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(model, params, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """Metrics of `batch` without dropout (token-weighted means, plus num_tokens)."""
  return model.loss_fn(params, batch)[1]


class Trainer:
  """`init_state`, `train_step` and `eval_step` compiled once for one batch shape on one mesh.

  Args:
    model: a t5x_lite model.
    optimizer: from `optimizers.create_optimizer`.
    mesh: from `partitioning.make_mesh`.
    batch_shapes: global shape of every batch feature, e.g. {"decoder_input_tokens": (8, 256)}.
    num_microbatches: accumulate gradients over this many slices of each batch (divides the
      per-device batch best; must divide the global batch).
    donate_state: donate the train state to `train_step`, which then updates it in place (one
      copy of params and optimizer state alive, not two); the state passed in is invalid after
      the call. False keeps it usable, at the cost of that memory (and, on accelerators, the copy).
  """

  def __init__(self, model, optimizer: Optimizer, mesh: Mesh,
               batch_shapes: Mapping[str, Sequence[int]], num_microbatches: int = 1,
               donate_state: bool = True):
    self.model, self.optimizer, self.mesh = model, optimizer, mesh
    self.batch_shapes = {k: tuple(v) for k, v in batch_shapes.items()}
    model.check_batch(self.batch_shapes)
    global_batch = next(iter(self.batch_shapes.values()))[0]
    partitioning.data_shard_info(mesh, global_batch)  # raises if data x fsdp does not divide it
    if num_microbatches < 1 or global_batch % num_microbatches:
      raise ValueError(f"num_microbatches={num_microbatches} must be >= 1 and divide the batch "
                       f"size {global_batch}.")
    self.num_microbatches, self.donate_state = num_microbatches, donate_state

    replicated = partitioning.replicated(mesh)
    self.batch_shardings = {k: partitioning.batch_sharding(mesh, len(v))
                            for k, v in self.batch_shapes.items()}
    self.abstract_state, self.state_shardings = self._abstract_state()
    self._init = partitioning.jit(
        lambda rng: init_state(model, optimizer, self._zeros_batch(), rng), mesh,
        in_shardings=(replicated,), out_shardings=self.state_shardings)
    self._from_params = partitioning.jit(
        lambda params, rng: TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                       opt_state=optimizer.tx.init(params),
                                       rng=jax.random.split(rng)[1]), mesh,
        in_shardings=(self.state_shardings.params, replicated),
        out_shardings=self.state_shardings)
    self._train_step = partitioning.jit(
        functools.partial(train_step, model, optimizer, num_microbatches), mesh,
        in_shardings=(self.state_shardings, self.batch_shardings),
        out_shardings=(self.state_shardings, replicated),
        donate_argnums=(0,) if donate_state else ())
    self._eval_step = partitioning.jit(
        functools.partial(eval_step, model), mesh,
        in_shardings=(self.state_shardings.params, self.batch_shardings),
        out_shardings=replicated)

  def _zeros_batch(self):
    return {k: jnp.zeros(v, jnp.int32) for k, v in self.batch_shapes.items()}

  def _abstract_state(self):
    """(TrainState of ShapeDtypeStructs carrying shardings, TrainState of shardings)."""
    mesh, replicated = self.mesh, partitioning.replicated(self.mesh)
    abstract_batch = {k: jax.ShapeDtypeStruct(v, jnp.int32) for k, v in self.batch_shapes.items()}
    param_shapes, param_specs = self.model.abstract_params(abstract_batch)
    param_shardings = partitioning.tree_shardings(param_shapes, param_specs, mesh)
    shapes = jax.eval_shape(functools.partial(init_state, self.model, self.optimizer),
                            abstract_batch, jax.random.PRNGKey(0))
    # Optimizer statistics shaped like their parameter are sharded like it; anything else
    # (counts, Adafactor's factored row/column statistics) is small and replicated.
    opt_shardings = optax.tree_map_params(
        self.optimizer.tx,
        lambda leaf, sharding, param: sharding if leaf.shape == param.shape else replicated,
        shapes.opt_state, param_shardings, param_shapes,
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
    not use it afterwards."""
    return self._train_step(state, self._check(batch))

  def eval_step(self, params, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    return self._eval_step(params, self._check(batch))

  def _check(self, batch):
    shapes = {k: tuple(v.shape) for k, v in batch.items()}
    if shapes != self.batch_shapes:
      raise ValueError(f"Batch shapes {shapes} differ from those the trainer was compiled for "
                       f"{self.batch_shapes}; every batch must have the same features and shapes "
                       "(pad, and drop the last partial batch).")
    return batch

  def compile_train_step(self) -> float:
    """Compiles the train step ahead of the first batch; returns the seconds it took."""
    start = time.perf_counter()
    abstract_batch = {k: jax.ShapeDtypeStruct(v, jnp.int32, sharding=self.batch_shardings[k])
                      for k, v in self.batch_shapes.items()}
    self._train_step.lower(self.abstract_state, abstract_batch).compile()
    return time.perf_counter() - start

  def flops_per_step(self) -> float:
    return model_flops_per_step(self.model.config, self.batch_shapes)


# ---------------------------------------------------------------------------- FLOPs and MFU

def model_flops_per_step(config: TransformerConfig, batch_shapes: Mapping[str, Sequence[int]]
                         ) -> float:
  """Model FLOPs of one training step (forward + backward = 3x forward; recomputation by remat
  is not counted, as MFU demands). Matmuls count 2 FLOPs per multiply-add; attention counts the
  full l x l score matrix, as in the PaLM paper's MFU."""
  d, f, v = config.d_model, config.d_ff, config.vocab_size
  he = config.num_heads * config.resolved_head_dim
  ke = config.resolved_num_kv_heads * config.resolved_head_dim
  mlp = 2 * d * f * (2 if config.gated_mlp else 1) + 2 * f * d
  self_proj = 2 * d * he * 2 + 2 * d * ke * 2  # q, out; k, v

  def stack(tokens, length, layers):
    return layers * tokens * (self_proj + mlp + 4 * length * he)

  forward = 0.0
  if "encoder_input_tokens" in batch_shapes:
    b, s = batch_shapes["encoder_input_tokens"]
    forward += stack(b * s, s, config.num_layers)
    if config.family == "encoder":  # MLM transform (d x d) and the vocabulary projection.
      forward += b * s * (2 * d * d + 2 * d * v)
  if "decoder_input_tokens" in batch_shapes:
    b, l = batch_shapes["decoder_input_tokens"]
    layers = (config.resolved_num_decoder_layers if config.family == "encoder_decoder"
              else config.num_layers)
    forward += stack(b * l, l, layers) + b * l * 2 * d * v
    if config.family == "encoder_decoder":  # cross-attention: q/out on l, k/v on s tokens.
      s = batch_shapes["encoder_input_tokens"][1]
      forward += layers * (b * l * (2 * d * he * 2 + 4 * s * he) + b * s * 2 * d * ke * 2)
  return 3.0 * forward


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


def mean_metrics(history: Sequence[Mapping[str, Any]]) -> dict[str, float]:
  """Combines per-step metrics (fetched from the device together): token-weighted means for the
  loss metrics, plain means for the rest, and the total token count."""
  history = jax.device_get(list(history))
  tokens = np.array([float(m["num_tokens"]) for m in history])
  out = {}
  for name in history[0]:
    values = np.array([float(m[name]) for m in history])
    if name == "num_tokens":
      out[name] = float(values.sum())
    elif name in TOKEN_MEAN_METRICS:
      out[name] = float((values * tokens).sum() / max(tokens.sum(), 1.0))
    else:
      out[name] = float(values.mean())
  return out
