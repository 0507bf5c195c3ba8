"""Kill a training run at random moments, resume it, and check it ends exactly where an
uninterrupted run ends.

    python tools/chaos.py --kills 20 --workdir /tmp/chaos

1. Trains a tiny preset (`--preset`, default gpt2_tiny on the stdlib corpus, a (2, 2, 2) mesh of
   8 simulated CPU devices) for `--steps` steps in one go: the reference.
2. Trains the same config in another MODEL_DIR as a subprocess with a checkpoint every
   `--checkpoint_every` steps (asynchronous), sends SIGKILL at a random moment 1 to
   2 x checkpoint_every steps after it resumed (anywhere within a step, so some kills land during
   a checkpoint write), restarts the same command, and
   repeats `--kills` times; then `--sigterms` times SIGTERM (a preemption notice: the run must
   save a final checkpoint and exit with 143, losing no step); then lets it finish.
3. Reports kills, resumes, steps lost, kills that cut a checkpoint write, damaged checkpoints the
   resumes fell back from, MODEL_DIR locks taken over from killed lives, and divergence: final
   params compared bitwise with the reference, and every logged training loss (including steps
   re-run after a resume) with the reference's; a step the reference logged and the interrupted
   run never did counts as missing.

Exit status 0 when every restart resumed, no SIGTERM lost a step, and nothing diverged.
Bitwise equality holds on CPU, where XLA's reductions are deterministic.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from typing import Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Small and fast: a few corpus files, short sequences, logs every step, frequent checkpoints.
RUN_BINDINGS = [
    "stdlib_corpus.max_files=40",
    "TASK_FEATURE_LENGTHS={'targets': 32}",
    "BATCH_SIZE=8",
    "MIXTURE_OR_TASK_NAME=stdlib_clm",
    "make_mesh.data=2", "make_mesh.fsdp=2", "make_mesh.tensor=2",
    "create_optimizer.name=adamw",
    "create_schedule.kind=constant", "create_schedule.peak_value=0.003",
    "create_schedule.warmup_steps=0",
    "train.log_every=1", "train.eval_batches=0", "train.keep_checkpoints=3",
]


def command(model_dir: str, preset: str, steps: int, checkpoint_every: int) -> list[str]:
  return [sys.executable, "-m", "t5x_lite.train", f"--gin_file={preset}",
          "--gin_file=runs/pretrain.gin", f"--gin.MODEL_DIR={model_dir}",
          f"--gin.TRAIN_STEPS={steps}", f"--gin.train.checkpoint_every={checkpoint_every}"] + [
              f"--gin.{b}" for b in RUN_BINDINGS]


def environment(cache_dir: str) -> dict[str, str]:
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8")
  env.update(JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="3",
             PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""),
             # Restarts reuse the compiled train step, as a production restart would.
             JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             TQDM_MININTERVAL="0")  # the progress bar prints every step: steps reached
  return env


class Life:
  """One process of the run, from start to exit or kill; its output goes to `log`."""

  def __init__(self, cmd: list[str], env: dict[str, str], log: str):
    self.log = log
    self._file = open(log, "w")  # pylint: disable=consider-using-with
    self.process = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self._file,
                                    stderr=subprocess.STDOUT)

  def text(self) -> str:
    with open(self.log, errors="replace") as f:
      return f.read()

  def wait_for_training(self, timeout: float = 600) -> bool:
    """Waits until the first step has run; False if the process ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      if "First step (with compilation)" in self.text():
        return True
      if self.process.poll() is not None:
        return False
      time.sleep(0.05)
    raise TimeoutError(f"No training step within {timeout}s; see {self.log}")

  def seconds_per_step(self, timeout: float = 600) -> float:
    """Waits for the end, timing the steps after the second (the first two include start-up,
    compilation and the first checkpoint)."""
    seen, deadline = {}, time.monotonic() + timeout
    while self.process.poll() is None and time.monotonic() < deadline:
      seen.setdefault(self.steps_reached(), time.monotonic())
      time.sleep(0.02)
    steps = sorted(s for s in seen if s >= 2)
    if len(steps) < 2:
      raise RuntimeError(f"Too few steps to time; raise --steps (see {self.log})")
    return (seen[steps[-1]] - seen[steps[0]]) / (steps[-1] - steps[0])

  def finish(self, timeout: float = 600) -> int:
    code = self.process.wait(timeout)
    self._file.close()
    return code

  def resumed_from(self) -> int:
    found = re.search(r"Resumed from .*/(\d+) \(", self.text())
    return int(found.group(1)) if found else 0

  def steps_reached(self) -> int:
    """The last step the progress bar reported (it prints after every step)."""
    reached = [int(m) for m in re.findall(r"(\d+)/\d+ \[", self.text())]
    return max(reached, default=0)

  def damaged_checkpoints(self) -> int:
    return self.text().count("is unreadable")

  def reclaimed_lock(self) -> bool:
    """Whether it took over the MODEL_DIR lock a killed life left behind."""
    return "Reclaimed the lock" in self.text()


def read_losses(event_dir: str) -> dict[int, list[float]]:
  """{step: [every logged training loss]}; a record cut short by a kill ends its file."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tensorflow.core.util import event_pb2  # pylint: disable=g-import-not-at-top
  losses: dict[int, list[float]] = {}
  for path in sorted(glob.glob(os.path.join(event_dir, "events.out.tfevents.*"))):
    try:
      for record in tf.data.TFRecordDataset(path):
        event = event_pb2.Event.FromString(record.numpy())
        for value in event.summary.value:
          if value.tag == "loss":
            losses.setdefault(event.step, []).append(float(tf.make_ndarray(value.tensor)))
    except tf.errors.DataLossError:
      pass
  return losses


def compare_params(reference_dir: str, model_dir: str) -> dict[str, float]:
  """Bitwise comparison of two exported params checkpoints, read onto one CPU device."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from t5x_lite import checkpoints  # pylint: disable=g-import-not-at-top
  a = jax.tree.leaves(checkpoints.load_params(reference_dir))
  b = jax.tree.leaves(checkpoints.load_params(model_dir))
  differ = [float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(a, b)
            if not np.array_equal(np.asarray(x), np.asarray(y))]
  return {"arrays": len(a), "arrays_differing": len(differ) + abs(len(a) - len(b)),
          "max_abs_difference": max(differ, default=0.0)}


def run_chaos(workdir: str, kills: int = 20, sigterms: int = 1, steps: int = 120,
              checkpoint_every: int = 2, preset: str = "models/gpt2_tiny.gin",
              seed: int = 0, log=print) -> dict[str, object]:
  """Runs the experiment in `workdir` (wiped) and returns the figures."""
  most_per_life = 2 * checkpoint_every + 1
  if steps <= (kills + sigterms) * most_per_life:
    raise ValueError(f"--steps={steps} is too few: each interrupted life trains up to "
                     f"{most_per_life} steps; use more than {(kills + sigterms) * most_per_life}.")
  shutil.rmtree(workdir, ignore_errors=True)
  os.makedirs(workdir)
  rng = random.Random(seed)
  env = environment(os.path.join(workdir, "jax_cache"))
  reference_dir, chaos_dir = os.path.join(workdir, "reference"), os.path.join(workdir, "chaos")

  start = time.monotonic()
  seconds_per_step = run_reference(command(reference_dir, preset, steps, checkpoint_every), env,
                                   os.path.join(workdir, "reference.log"))
  log(f"reference: {steps} steps in {time.monotonic() - start:.0f}s "
      f"({seconds_per_step:.3f}s per step)")
  interruptions = ["SIGKILL"] * kills + ["SIGTERM"] * sigterms + [None]
  figures = run_interrupted(command(chaos_dir, preset, steps, checkpoint_every), env, workdir,
                            chaos_dir, interruptions, rng, checkpoint_every, seconds_per_step,
                            log)

  figures["params"] = compare_params(reference_dir, chaos_dir)
  reference_losses, chaos_losses = read_losses(os.path.join(reference_dir, "train")), read_losses(
      os.path.join(chaos_dir, "train"))
  figures.update(compare_losses(reference_losses, chaos_losses))
  figures["seconds"] = round(time.monotonic() - start, 1)
  figures["ok"] = (figures["resumes"] == len(interruptions) - 1
                   and figures["sigterm_steps_lost"] == 0
                   and figures["params"]["arrays_differing"] == 0
                   and figures["losses_differing"] == 0 and figures["losses_missing"] == 0)
  return figures


def run_reference(cmd: list[str], env: dict[str, str], log: str) -> float:
  """The uninterrupted run, to its end; returns its seconds per step after start-up."""
  reference = Life(cmd, env, log)
  reference.wait_for_training()
  seconds_per_step = reference.seconds_per_step()
  if reference.finish():
    raise RuntimeError(f"The reference run failed; see {reference.log}")
  return seconds_per_step


def run_interrupted(cmd: list[str], env: dict[str, str], workdir: str, model_dir: str,
                    interruptions: Sequence[Optional[str]], rng: random.Random,
                    checkpoint_every: int, seconds_per_step: float, log) -> dict[str, int]:
  """One life of `cmd` (training in `model_dir`) per entry of `interruptions` ("SIGKILL",
  "SIGTERM", or None: let it finish), each resuming from the last; returns the tallies."""
  figures = {"kills": 0, "kills_during_checkpoint_write": 0, "sigterms": 0, "resumes": 0,
             "steps_lost": 0, "sigterm_steps_lost": 0, "damaged_checkpoints_seen": 0,
             "stale_locks_reclaimed": 0}
  previous: Optional[Life] = None
  for number, signal_name in enumerate(interruptions):
    life = Life(cmd, env, os.path.join(workdir, f"life_{number}.log"))
    started = life.wait_for_training()
    if previous is not None:
      figures["resumes"] += started
      figures["steps_lost"] += max(0, previous.steps_reached() - life.resumed_from())
    figures["damaged_checkpoints_seen"] += life.damaged_checkpoints()
    figures["stale_locks_reclaimed"] += started and life.reclaimed_lock()
    if signal_name is None or not started:
      if life.finish():
        raise RuntimeError(f"Life {number} failed (exit {life.process.returncode}); see {life.log}")
      if signal_name is None:
        break
      continue  # it finished before we could interrupt it: nothing left to interrupt
    # A random step 1 to 2 checkpoint intervals on, then a random moment within the next step:
    # every life makes progress, and the kills spread over steps and checkpoint writes.
    at_step = life.resumed_from() + rng.randint(1, 2 * checkpoint_every)
    code = interrupt_life(life, number, signal_name, at_step, rng.uniform(0, seconds_per_step),
                          model_dir, figures)
    log(f"life {number}: {signal_name} at step {life.steps_reached()} (resumed from "
        f"{life.resumed_from()}), exit {code}")
    previous = life
  return figures


def interrupt_life(life: Life, number: int, signal_name: str, at_step: int, delay: float,
                   model_dir: str, figures: dict[str, int]) -> int:
  """Sends `signal_name` to life `number` `delay` seconds after it reached `at_step`, counts it
  in `figures`, and returns its exit status."""
  while life.steps_reached() < at_step and life.process.poll() is None:
    time.sleep(0.01)
  time.sleep(delay)
  if life.process.poll() is not None:
    raise RuntimeError(f"Life {number} ended (exit {life.process.returncode}) before its "
                       f"{signal_name}; see {life.log}")
  if signal_name == "SIGKILL":
    life.process.kill()
    code = life.finish()
    figures["kills"] += 1
    writing = glob.glob(os.path.join(model_dir, "checkpoints", "*.orbax-checkpoint-tmp*"))
    figures["kills_during_checkpoint_write"] += bool(writing) and code == -signal.SIGKILL
    return code
  life.process.send_signal(signal.SIGTERM)
  code = life.finish()
  figures["sigterms"] += 1
  if code not in (143, 0):
    raise RuntimeError(f"SIGTERM: exit status {code}, expected 143; see {life.log}")
  if code == 143:  # the final checkpoint is the step it stopped at: nothing to lose
    saved = re.search(r"saved checkpoint .*/(\d+);", life.text())
    lost = life.steps_reached() - int(saved.group(1)) if saved else life.steps_reached()
    figures["sigterm_steps_lost"] += lost
  return code


def compare_losses(reference: dict[int, list[float]],
                   chaos: dict[int, list[float]]) -> dict[str, int]:
  """Every loss the interrupted run logged (a step re-run after a resume is logged again)
  against the reference's, bit for bit; a step the reference logged that the interrupted run
  never logged is missing, one the reference never logged is extra."""
  logged = [(step, value) for step, values in chaos.items() for value in values]
  return {"losses_compared": sum(step in reference for step, _ in logged),
          "losses_differing": sum(step in reference and value != reference[step][0]
                                  for step, value in logged),
          "losses_missing": len(set(reference) - set(chaos)),
          "losses_extra": len(set(chaos) - set(reference))}


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", default="/tmp/t5x_lite_chaos", help="wiped first")
  parser.add_argument("--kills", type=int, default=20)
  parser.add_argument("--sigterms", type=int, default=1)
  parser.add_argument("--steps", type=int, default=120)
  parser.add_argument("--checkpoint_every", type=int, default=2)
  parser.add_argument("--preset", default="models/gpt2_tiny.gin")
  parser.add_argument("--seed", type=int, default=0, help="of the kill times")
  args = parser.parse_args(argv)
  figures = run_chaos(args.workdir, args.kills, args.sigterms, args.steps, args.checkpoint_every,
                      args.preset, args.seed)
  print(json.dumps(figures, indent=1))
  return 0 if figures["ok"] else 1


if __name__ == "__main__":
  sys.exit(main())
