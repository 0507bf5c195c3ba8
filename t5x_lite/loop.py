"""The train loop and the hooks that attach to it.

    loop = TrainLoop(trainer, state, batches, train_steps, consumed)
    loop.add(LogMetrics(writer, every=50), Checkpoint(manager, guard, every=1000), ...)
    loop.run()

The loop only runs train steps. Everything else a job does while training is a `Hook` with an
`every`: it is called after each step that is a multiple of `every` and after the last step,
in the order the hooks were added. `on_step` runs after every step for bookkeeping that must see
each step (it never waits for the device); `on_end` runs once when training is over.
"""
from __future__ import annotations

import collections
import contextlib
import json
import math
import os
import signal
import threading
import time
from typing import Any, Callable, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp

from t5x_lite import checkpoints
from t5x_lite import metrics as metrics_lib


class Hook:
  """Something the loop calls: `__call__` when due (see module docstring)."""
  every: int = 1

  def on_step(self, loop: "TrainLoop") -> None:
    pass

  def __call__(self, loop: "TrainLoop") -> None:
    pass

  def on_end(self, loop: "TrainLoop") -> None:
    pass


class TrainLoop:
  """Runs `trainer.train_step` from `state` until `train_steps`, calling the hooks.

  `batches` yields global batches (jax arrays on the mesh); the next batch is read while the
  device runs the current step. `consumed` counts the batches trained on (what a checkpoint
  records and a resume skips). After each step `metrics` holds that step's metrics (on device).
  """

  def __init__(self, trainer, state, batches: Iterator, train_steps: int, consumed: int = 0):
    self.trainer, self.state, self.batches = trainer, state, batches
    self.train_steps, self.consumed = train_steps, consumed
    self.step = int(jax.device_get(state.step))
    self.first_step = self.step
    self.metrics: dict = {}
    self.hooks: list[Hook] = []

  def add(self, *hooks: Hook) -> "TrainLoop":
    self.hooks.extend(hooks)
    return self

  def run(self):
    batch = next(self.batches) if self.step < self.train_steps else None
    while self.step < self.train_steps:
      self.state, self.metrics = self.trainer.train_step(self.state, batch)
      self.step, self.consumed = self.step + 1, self.consumed + 1
      if self.step < self.train_steps:
        batch = next(self.batches)  # overlaps with the step running on the device
      for hook in self.hooks:
        hook.on_step(self)
        if self.step % hook.every == 0 or self.step == self.train_steps:
          hook(self)
    for hook in self.hooks:
      hook.on_end(self)
    return self.state


# ---------------------------------------------------------------------------- metrics

class LogMetrics(Hook):
  """Merges every step's metrics since the last log (one host sync per log), adds throughput and
  MFU, writes them to TensorBoard and the progress bar. The first step of a run (it includes
  compilation) counts in the metrics but not in the timing."""

  def __init__(self, writer: metrics_lib.MetricsWriter, every: int, tokens_per_step: float,
               flops_per_step: float, peak_flops: float, start_time: float):
    self.writer, self.every = writer, every
    self.tokens_per_step, self.flops_per_step, self.peak = tokens_per_step, flops_per_step, peak_flops
    self.start_time = start_time
    self.history: list = []
    self.timer: Optional[tuple[float, int]] = None  # (start, steps) of the timed interval
    self.progress = None

  def on_step(self, loop):
    if self.progress is None:
      self.progress = metrics_lib.progress_bar(loop.train_steps, loop.step - 1)
    self.history.append(loop.metrics)
    if self.timer is None:
      jax.block_until_ready(loop.metrics)
      metrics_lib.log(f"First step (with compilation) took "
                      f"{time.perf_counter() - self.start_time:.1f}s since start-up.")
      self.timer = (time.perf_counter(), 0)
    else:
      self.timer = (self.timer[0], self.timer[1] + 1)
    if self.progress is not None:
      self.progress.update(1)

  def __call__(self, loop):
    scalars = metrics_lib.summarize(self.history)
    start, steps = self.timer
    if steps:
      elapsed = time.perf_counter() - start
      scalars["steps_per_second"] = steps / elapsed
      scalars["tokens_per_second"] = steps * self.tokens_per_step / elapsed
      scalars["mfu"] = steps * self.flops_per_step / elapsed / self.peak
    self.writer.write(loop.step, scalars)
    if self.progress is not None:
      self.progress.set_postfix(loss=f"{scalars['loss']:.3f}",
                                tok_s=f"{scalars.get('tokens_per_second', 0):,.0f}",
                                mfu=f"{scalars.get('mfu', 0):.1%}")
    self.history, self.timer = [], (time.perf_counter(), 0)

  def on_end(self, loop):
    if self.progress is not None:
      self.progress.close()


# ---------------------------------------------------------------------------- non-finite steps

class NonFiniteGuard(Hook):
  """Acts on the steps whose loss or gradient norm was NaN/Inf (the trainer skipped their
  update). The per-step flags stay on the device and are fetched when due or before a checkpoint
  (`check`), so the guard adds no host sync of its own.

  policy: "skip" counts and reports such steps and goes on, until more than `max_fraction` of
  the last `window` steps (of the whole run if it is shorter) were skipped: then the run is
  diverging, and it stops (FloatingPointError naming the steps) instead of going on to report
  success. "stop" raises at the first such step. Either raises before any further checkpoint
  is written. `where` names the data stream in messages.
  """
  POLICIES = ("skip", "stop")

  def __init__(self, policy: str, where: str, every: int, max_fraction: float = 0.05,
               window: int = 100):
    if policy not in self.POLICIES:
      raise ValueError(f"train.on_nonfinite={policy!r}: choose one of {self.POLICIES}.")
    if not 0 <= max_fraction <= 1 or window < 1:
      raise ValueError(f"train.max_nonfinite_fraction={max_fraction!r} must be in [0, 1] and "
                       f"train.nonfinite_window={window!r} at least 1.")
    self.policy, self.where, self.every, self.skipped = policy, where, every, 0
    self.max_fraction, self.window = max_fraction, window
    self._pending = []  # (step, index of its batch in the training stream, device flag)
    self._recent: collections.deque = collections.deque()  # skipped steps in the window
    self._window = window

  def on_step(self, loop):
    self._pending.append((loop.step, loop.consumed - 1, loop.metrics["nonfinite"].total))
    self._window = min(self.window, loop.train_steps)

  def __call__(self, loop):
    self.check()

  def check(self) -> None:
    pending, self._pending = jax.device_get(self._pending), []
    for step, batch_index, flag in pending:
      if not flag:
        continue
      self.skipped += 1
      message = (f"Step {step}: the loss or gradient norm is not finite; its update was skipped. "
                 f"It trained on batch {batch_index} of {self.where} (read it with "
                 f"t5x_lite.data.train_batches(..., skip={batch_index}) and next()).")
      if self.policy == "stop":
        raise FloatingPointError(
            message + " No checkpoint was written after it. Inspect that batch, lower the "
            "learning rate (or clip gradients), or set train.on_nonfinite = 'skip' to skip "
            "such steps and go on.")
      metrics_lib.log(f"{message} ({self.skipped} skipped so far)")
      self._recent.append(step)
      while self._recent and self._recent[0] <= step - self._window:
        self._recent.popleft()
      if len(self._recent) > self.max_fraction * self._window:
        raise FloatingPointError(
            f"The run is diverging: {len(self._recent)} step(s) in a window of {self._window} "
            f"had a non-finite loss or gradient norm and were skipped (steps "
            f"{_ranges(self._recent)}), more than train.max_nonfinite_fraction="
            f"{self.max_fraction:g} of the window. Stopped at step "
            f"{step} without writing a checkpoint or exporting; the checkpoints in MODEL_DIR are "
            "from before. Lower the learning rate or clip gradients and resume (or start from an "
            "earlier checkpoint); raise train.max_nonfinite_fraction only if such steps are "
            "expected.")


def _ranges(steps) -> str:
  """[1, 2, 3, 7] -> "1-3, 7"."""
  parts, steps = [], sorted(steps)
  for step in steps:
    if parts and step == parts[-1][1] + 1:
      parts[-1][1] = step
    else:
      parts.append([step, step])
  return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in parts)


@jax.jit
def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def check_finite_before_saving(state, step: int, what: str = "checkpoint") -> None:
  """The last line of defence: a checkpoint (or an export) holding NaN/Inf is never written."""
  if not bool(_all_finite((state.params, state.opt_state))):
    raise FloatingPointError(
        f"Step {step}: the parameters or optimizer state hold NaN/Inf, so no {what} was "
        "written (the last checkpoint is still good). Was INITIAL_CHECKPOINT_PATH already "
        "non-finite? Otherwise lower the learning rate or enable gradient clipping.")


# ---------------------------------------------------------------------------- checkpoints

class Checkpoint(Hook):
  """Saves the train state and data position every `every` steps and after the last step
  (asynchronously), after the guard has seen every step it would save; waits for the writes and
  closes the manager at the end."""

  def __init__(self, manager: checkpoints.CheckpointManager, guard: NonFiniteGuard,
               batch_size: Optional[int] = None):
    self.manager, self.guard, self.batch_size = manager, guard, batch_size
    self.every = manager.save_interval_steps

  def __call__(self, loop):
    self.save(loop, force=loop.step == loop.train_steps)

  def save(self, loop, force: bool = False) -> None:
    if not force and loop.step % self.every:
      return
    self.guard.check()  # "stop" raises here, before a step it refuses is checkpointed
    if loop.step not in self.manager.all_steps():
      check_finite_before_saving(loop.state, loop.step)
    self.manager.save(loop.step, loop.state, loop.consumed, force=force,
                      batch_size=self.batch_size)

  def on_end(self, loop):
    self.save(loop, force=True)  # a resumed run with nothing left to do saves nothing new
    self.close()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


class Preempted(SystemExit):
  """Raised once SIGTERM's final checkpoint is written. Exit status 143 (as if killed by SIGTERM)
  tells a scheduler the run was interrupted, not finished: rerunning resumes it."""

  def __init__(self, message: str):
    super().__init__(143)
    self.message = message


@contextlib.contextmanager
def sigterm_received():
  """Yields a list that becomes non-empty when SIGTERM arrives: the preemption notice that TPU
  VMs, spot instances and Kubernetes send before killing. Off the main thread (where Python
  cannot install handlers) it never fills."""
  received = []
  if threading.current_thread() is not threading.main_thread():
    yield received
    return
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
  try:
    yield received
  finally:
    signal.signal(signal.SIGTERM, previous)


class Preemption(Hook):
  """After a step during which SIGTERM arrived: writes a checkpoint and exits (`Preempted`)."""

  def __init__(self, received: list, checkpoint: Checkpoint, progress: Optional[LogMetrics]):
    self.received, self.checkpoint, self.progress = received, checkpoint, progress

  def on_step(self, loop):
    if not self.received or loop.step >= loop.train_steps:
      return
    if self.progress is not None:
      self.progress.on_end(loop)
    self.checkpoint.save(loop, force=True)
    self.checkpoint.close()
    message = (f"SIGTERM received: saved checkpoint {self.checkpoint.manager.directory}/"
               f"{loop.step}; rerun the same command to resume.")
    metrics_lib.log(message)
    raise Preempted(message)


# ---------------------------------------------------------------------------- evaluation

class Evaluate(Hook):
  """Teacher-forced metrics of fixed validation batches, every `every` steps and at the end
  (and before the first step of a run that starts at step 0). A non-finite validation loss
  stops the run (FloatingPointError): such parameters are never exported as a result."""

  def __init__(self, batches: Sequence[dict], writer: metrics_lib.MetricsWriter, every: int):
    self.batches, self.writer, self.every = batches, writer, every
    self.last: dict[str, float] = {}

  def evaluate(self, trainer, params, step: int) -> dict[str, float]:
    if not self.batches:
      return {}
    self.last = metrics_lib.summarize([trainer.eval_step(params, b) for b in self.batches])
    self.writer.write(step, self.last)
    metrics_lib.log(f"step {step}: validation loss {self.last['loss']:.4f}, "
                    f"accuracy {self.last.get('accuracy', float('nan')):.4f}")
    if not math.isfinite(self.last["loss"]):
      raise FloatingPointError(
          f"Step {step}: the validation loss is {self.last['loss']}: the parameters no longer "
          "compute finite outputs, so the run stopped without exporting them. Resume from an "
          "earlier checkpoint (delete the later ones in MODEL_DIR/checkpoints) with a lower "
          "learning rate or gradient clipping.")
    return self.last

  def __call__(self, loop):
    self.evaluate(loop.trainer, loop.state.params, loop.step)


class Forgetting(Hook):
  """How much a run forgot of a second task (e.g. the pretraining task while fine-tuning): its
  teacher-forced metrics on fixed validation batches before the first update (`start`) and after
  the last (`on_end`), and the change. Logged, written to TensorBoard as
  forgetting/<task>/{loss,accuracy}_{before,after,change} and to `path` (JSON).

  `evaluator` has `eval_step(params, batch)` for these batches' shapes. `record` (task, feature
  lengths, batches) says what makes two evaluations comparable: a resumed run reads the "before"
  values from `path` only if they were measured the same way.
  """
  REPORTED = ("loss", "accuracy")

  def __init__(self, batches: Sequence[dict], evaluator, writer: metrics_lib.MetricsWriter,
               path: str, record: dict):
    self.batches, self.evaluator, self.writer, self.path = batches, evaluator, writer, path
    self.record, self.task = dict(record), record["task"]
    self.before: Optional[dict] = None

  def evaluate(self, params) -> dict[str, float]:
    return metrics_lib.summarize([self.evaluator.eval_step(params, b) for b in self.batches])

  def start(self, params, step: int) -> None:
    """Measures "before" at step 0; a resumed run takes it from `path`."""
    if step == 0:
      self.before = dict(step=0, **self.evaluate(params))
      self._report("before", self.before)
      self._save(dict(self.record, before=self.before))
      return
    saved = self._load()
    if {k: saved.get(k) for k in self.record} == self.record and "before" in saved:
      self.before = saved["before"]
    else:
      metrics_lib.log(f"forgetting/{self.task}: no step-0 evaluation of {self.record} in "
                      f"{self.path} (the run started without it), so only the values after "
                      "training are reported.")

  def on_end(self, loop):
    after = dict(step=loop.step, **self.evaluate(loop.state.params))
    self._report("after", after)
    report = dict(self.record, before=self.before, after=after)
    if self.before is not None:
      report["change"] = {k: after[k] - self.before[k] for k in self.REPORTED if k in after}
      self._report("change", dict(report["change"], step=loop.step))
    self._save(report)
    metrics_lib.log(f"forgetting/{self.task}: written to {self.path}")

  def _report(self, when: str, values: dict) -> None:
    shown = {k: values[k] for k in self.REPORTED if k in values}
    self.writer.write(values["step"], {f"forgetting/{self.task}/{k}_{when}": v
                                       for k, v in shown.items()})
    sign = "+" if when == "change" else ""
    metrics_lib.log(f"forgetting/{self.task} {when} (step {values['step']}): " + ", ".join(
        f"{k} {v:{sign}.4f}" for k, v in shown.items()))

  def _load(self) -> dict:
    if not os.path.exists(self.path):
      return {}
    with open(self.path) as f:
      return json.load(f)

  def _save(self, report: dict) -> None:
    if jax.process_index() != 0:
      return
    with open(self.path + ".tmp", "w") as f:
      json.dump(report, f, indent=2)
    os.replace(self.path + ".tmp", self.path)  # a reader never sees half a file


class MixProportions(Hook):
  """The realised mix of a mixture: each task's share of the examples in the batches trained on
  since the last log (this process's rows), as mix/<task> in TensorBoard and in the log.
  `take(upto)` returns (and forgets) the example counts of the batches before index `upto`."""

  def __init__(self, take: Callable[[int], dict], writer: metrics_lib.MetricsWriter, every: int):
    self.take, self.writer, self.every = take, writer, every

  def __call__(self, loop):
    counts = self.take(loop.consumed)
    total = sum(counts.values())
    if not total:
      return
    self.writer.write(loop.step, {f"mix/{task}": n / total for task, n in counts.items()})
    metrics_lib.log(f"step {loop.step}: mix of {total} examples: " + ", ".join(
        f"{task} {n / total:.1%}" for task, n in counts.items()))


class AtEnd(Hook):
  """Calls `fn(loop)` once, after training (exporting parameters, printing samples)."""

  def __init__(self, fn: Callable[["TrainLoop"], Any]):
    self.fn = fn

  def on_end(self, loop):
    self.fn(loop)


class DataFaults(Hook):
  """Reports, after training, the records the input pipeline skipped (missing text key,
  malformed lines, undecodable bytes): `faults()` returns one line per kind and file."""

  def __init__(self, faults: Callable[[], Sequence[str]]):
    self.faults = faults

  def on_end(self, loop):
    lines = self.faults()
    if lines:
      metrics_lib.log("Data faults (skipped records):\n  " + "\n  ".join(lines))
