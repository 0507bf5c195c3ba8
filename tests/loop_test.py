"""The train loop and its hooks, with a stand-in trainer (no model, nothing to compile): what
is logged after a resume, when non-finite steps stop a run, a non-finite validation loss."""
import math

import jax.numpy as jnp
import numpy as np
import pytest

from t5x_lite import loop
from t5x_lite import metrics as metrics_lib
from t5x_lite.trainer import TrainState


class FakeTrainer:
  """Step s has loss `losses[s - 1]` over `tokens[s - 1]` tokens, non-finite where the loss is;
  evaluation returns `validation_loss`."""

  def __init__(self, losses, tokens=None, validation_loss=1.0):
    self.losses, self.validation_loss = losses, validation_loss
    self.tokens = tokens or [10.0] * len(losses)

  def train_step(self, state, batch):
    del batch
    step = int(state.step)
    loss, tokens = self.losses[step], self.tokens[step]
    metrics = {"loss": metrics_lib.Average.of(loss, tokens),
               "nonfinite": metrics_lib.Sum.of(0.0 if math.isfinite(loss) else 1.0)}
    return state.replace(step=jnp.asarray(step + 1)), metrics

  def eval_step(self, params, batch):
    del params, batch
    return {"loss": metrics_lib.Average.of(self.validation_loss, 1.0)}


class Writer:
  def __init__(self):
    self.written = {}

  def write(self, step, scalars):
    self.written[step] = dict(scalars)


def state_at(step, params=None):
  return TrainState(step=jnp.asarray(step), params=params or {"w": jnp.ones(2)},
                    opt_state={}, rng=jnp.zeros(2, jnp.uint32))


def run(trainer, start, steps, *hooks):
  batches = iter(range(10_000))
  return loop.TrainLoop(trainer, state_at(start), batches, steps, consumed=start).add(
      *hooks).run()


def logged_losses(trainer, start, steps, every):
  writer = Writer()
  run(trainer, start, steps, loop.LogMetrics(writer, every, 1.0, 1.0, 1.0, start_time=0.0))
  return {step: scalars["loss"] for step, scalars in writer.written.items()}


def test_logged_losses_of_a_resumed_run_equal_the_uninterrupted_runs():
  trainer = FakeTrainer([5.0, 4.0, 3.5, 3.0, 2.0, 1.5], tokens=[10, 20, 30, 40, 50, 60])
  straight = logged_losses(trainer, 0, 6, every=2)
  assert straight[4] == pytest.approx((3.5 * 30 + 3.0 * 40) / 70)  # token-weighted
  # Killed after the checkpoint of step 2, resumed there: its first step (3, which also
  # compiles) counts in the interval it belongs to.
  resumed = logged_losses(trainer, 2, 6, every=2)
  assert resumed == {4: straight[4], 6: straight[6]}


def guard(policy="skip", max_fraction=0.05, window=100):
  return loop.NonFiniteGuard(policy, "'task' split 'train' (seed 0)", every=1,
                             max_fraction=max_fraction, window=window)


def test_skipping_stops_a_run_that_diverges_naming_the_steps():
  losses = [2.0] + [float("nan")] * 19  # 19 of 20 steps skipped, as in issue 13
  with pytest.raises(FloatingPointError, match=r"diverging: 2 step\(s\) in a window of 20.*steps "
                                               r"2-3\).*max_nonfinite_fraction=0.05.*without "
                                               r"writing a checkpoint or exporting"):
    run(FakeTrainer(losses), 0, 20, guard())


def test_a_few_non_finite_steps_are_skipped_and_the_run_goes_on():
  nan = float("nan")
  losses = [2.0] * 200
  losses[10] = losses[150] = nan  # 1 in any window of 100 steps
  skipping = guard(window=100)
  state = run(FakeTrainer(losses), 0, 200, skipping)
  assert int(state.step) == 200 and skipping.skipped == 2
  losses[40] = losses[60] = losses[80] = losses[90] = losses[99] = nan  # 6 in steps 11-100
  with pytest.raises(FloatingPointError, match=r"6 step\(s\) in a window of 100.*steps 11, 41, 61, "
                                               r"81, 91, 100\)"):
    run(FakeTrainer(losses), 0, 200, guard(window=100))


def test_stop_policy_stops_at_the_first_non_finite_step():
  with pytest.raises(FloatingPointError, match=r"Step 3: the loss .*batch 2 of 'task'"):
    run(FakeTrainer([1.0, 1.0, float("inf"), 1.0]), 0, 4, guard("stop"))
  with pytest.raises(ValueError, match="max_nonfinite_fraction=2"):
    guard(max_fraction=2)


def test_a_non_finite_validation_loss_stops_the_run():
  evaluate = loop.Evaluate([{"x": 0}], Writer(), every=2)
  exported = []
  with pytest.raises(FloatingPointError, match=r"Step 2: the validation loss is nan.*without "
                                               r"exporting"):
    run(FakeTrainer([1.0] * 4, validation_loss=float("nan")), 0, 4, evaluate,
        loop.AtEnd(exported.append))
  assert not exported


def test_non_finite_parameters_are_never_saved_or_exported():
  loop.check_finite_before_saving(state_at(3), 3)
  poisoned = state_at(3, params={"w": jnp.array([1.0, np.nan])})
  with pytest.raises(FloatingPointError, match="Step 3: .*hold NaN/Inf, so no export was "
                                               "written"):
    loop.check_finite_before_saving(poisoned, 3, what="export")
