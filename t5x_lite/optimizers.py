"""Optimizers and learning-rate schedules (optax), chosen by name in gin.

    optimizer = create_optimizer("adamw", schedule=create_schedule("cosine", 3e-4, 100, 10_000))
    optimizer.tx                  # optax.GradientTransformation: clip -> adamw (masked decay)
    optimizer.schedule(step)      # the learning rate at `step`, also logged by the trainer

Weight decay never touches norm scales or biases (`decay_mask`); gradient accumulation over
microbatches lives in the trainer's step, not here, so one optimizer update is one data batch.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import gin
import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ("adamw", "adafactor", "lion")
SCHEDULES = ("constant", "rsqrt", "cosine")

Schedule = Callable[[jax.Array], jax.Array]


@gin.configurable(module="t5x_lite.optimizers")
def create_schedule(kind: str = "rsqrt", peak_value: float = 1e-2, warmup_steps: int = 10_000,
                    total_steps: Optional[int] = None, end_fraction: float = 0.1) -> Schedule:
  """Learning rate as a function of the step.

  constant: linear warm-up from 0 to `peak_value` over `warmup_steps`, then flat.
  rsqrt:    T5's inverse square root: `peak_value * sqrt(warmup / max(step, warmup))`, i.e. flat
            at the peak for the first `warmup_steps` (T5: peak 0.01, warm-up 10k gives
            1/sqrt(max(step, 10k))) and decaying as 1/sqrt(step) after.
  cosine:   linear warm-up to `peak_value`, then cosine decay to `end_fraction * peak_value` at
            `total_steps` (required; gin: `create_schedule.total_steps = %TRAIN_STEPS`).
  """
  if kind not in SCHEDULES:
    raise ValueError(f"create_schedule.kind={kind!r} is not supported; choose one of {SCHEDULES}.")
  if peak_value <= 0 or warmup_steps < 0:
    raise ValueError(f"create_schedule needs peak_value > 0 and warmup_steps >= 0, got "
                     f"peak_value={peak_value}, warmup_steps={warmup_steps}.")
  if kind == "rsqrt":
    warmup = max(warmup_steps, 1)
    return lambda step: peak_value * jax.lax.rsqrt(
        jnp.maximum(jnp.asarray(step, jnp.float32), warmup) / warmup)
  warmup = optax.linear_schedule(0.0, peak_value, warmup_steps) if warmup_steps else None
  if kind == "constant":
    after = optax.constant_schedule(peak_value)
  else:
    if total_steps is None or total_steps <= warmup_steps:
      raise ValueError(f"create_schedule(kind='cosine') needs total_steps > warmup_steps "
                       f"({warmup_steps}), got {total_steps}; bind "
                       "create_schedule.total_steps = %TRAIN_STEPS.")
    after = optax.cosine_decay_schedule(peak_value, total_steps - warmup_steps,
                                        alpha=end_fraction)
  if warmup is None:
    return after
  return optax.join_schedules([warmup, after], [warmup_steps])


def decay_mask(params: Any) -> Any:
  """True for leaves that get weight decay: matrices and embeddings, not norm scales or biases.

  Decided by name, not rank: with scanned layers a norm scale is [layers, d], a matrix's rank.
  """
  def wants_decay(path, _):
    name = str(getattr(path[-1], "key", path[-1]))
    return not (name == "scale" or name.endswith("bias"))
  return jax.tree_util.tree_map_with_path(wants_decay, params)


@dataclasses.dataclass(frozen=True)
class Optimizer:
  """An optax transformation and the schedule it follows (kept for logging the rate)."""
  tx: optax.GradientTransformation
  schedule: Schedule


@gin.configurable(module="t5x_lite.optimizers")
def create_optimizer(name: str = "adamw", schedule: Optional[Schedule] = None,
                     weight_decay: float = 0.0, clip_grad_norm: Optional[float] = 1.0,
                     b1: float = 0.9, b2: Optional[float] = None, eps: float = 1e-8,
                     adafactor_momentum: Optional[float] = None) -> Optimizer:
  """`name` in {"adamw", "adafactor", "lion"}, after global-norm clipping.

  Args:
    schedule: learning rate per step (default `create_schedule()`, whose gin bindings apply).
    weight_decay: decoupled weight decay, applied only where `decay_mask` says (for adafactor it
      is optax's `weight_decay_rate`: added to the update as is, not scaled by the learning
      rate, so use a much smaller value there).
    clip_grad_norm: clip gradients to this global norm first; None or 0 disables it.
    b1, b2: moment decay rates (b2 default: 0.999 for AdamW, 0.99 for Lion; unused by Adafactor,
      which uses T5's 0.8 decay-rate schedule).
    eps: AdamW's epsilon.
    adafactor_momentum: first-moment decay for Adafactor (None: no first moment, as T5).
  """
  if name not in OPTIMIZERS:
    raise ValueError(f"create_optimizer.name={name!r} is not supported; choose one of "
                     f"{OPTIMIZERS}.")
  if weight_decay < 0:
    raise ValueError(f"create_optimizer.weight_decay must be >= 0, got {weight_decay}.")
  schedule = schedule or create_schedule()
  if name == "adamw":
    tx = optax.adamw(schedule, b1=b1, b2=0.999 if b2 is None else b2, eps=eps,
                     weight_decay=weight_decay, mask=decay_mask)
  elif name == "lion":
    tx = optax.lion(schedule, b1=b1, b2=0.99 if b2 is None else b2, weight_decay=weight_decay,
                    mask=decay_mask)
  else:
    # Factored second moments (row and column statistics) for every matrix: T5's memory saver.
    tx = optax.adafactor(schedule, factored=True, momentum=adafactor_momentum,
                         weight_decay_rate=weight_decay or None,
                         weight_decay_mask=decay_mask if weight_decay else None)
  if clip_grad_norm:
    tx = optax.chain(optax.clip_by_global_norm(clip_grad_norm), tx)
  return Optimizer(tx=tx, schedule=schedule)
