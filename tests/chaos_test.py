"""tools/chaos.py, small: a real training process killed (SIGKILL), preempted (SIGTERM) and
resumed ends with the same params, bit for bit, as an uninterrupted run, and logs the same
losses at every step."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tools"))
import chaos  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position


def test_killed_and_preempted_run_resumes_to_the_uninterrupted_result(tmp_path):
  figures = chaos.run_chaos(str(tmp_path / "chaos"), kills=1, sigterms=1, steps=20,
                            checkpoint_every=2, seed=0)
  assert figures["kills"] == 1 and figures["sigterms"] == 1
  assert figures["resumes"] == 2  # every restart got back to training
  assert figures["stale_locks_reclaimed"] == 1  # the killed life's lock, not the preempted one's
  assert figures["sigterm_steps_lost"] == 0  # SIGTERM saved the step it stopped at
  assert figures["params"] == {"arrays": 20, "arrays_differing": 0, "max_abs_difference": 0.0}
  # Every logged loss, including the steps trained again after the kill, equals the reference.
  assert figures["losses_compared"] >= 20 and figures["losses_differing"] == 0
  assert figures["losses_missing"] == 0 and figures["losses_extra"] == 0  # all 20 steps logged
  assert figures["ok"]


def test_every_logged_loss_is_compared():
  reference = {1: [5.0], 2: [4.0], 3: [3.0]}
  assert chaos.compare_losses(reference, {1: [5.0], 2: [4.0, 4.0], 3: [3.0]}) == {
      "losses_compared": 4, "losses_differing": 0, "losses_missing": 0, "losses_extra": 0}
  # A re-run step logged differently, a step never logged, a step the reference lacks.
  assert chaos.compare_losses(reference, {1: [5.0], 2: [4.0, 4.5], 4: [2.0]}) == {
      "losses_compared": 3, "losses_differing": 1, "losses_missing": 1, "losses_extra": 1}
