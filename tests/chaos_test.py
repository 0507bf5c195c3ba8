"""tools/chaos.py, small: a real training process killed (SIGKILL), preempted (SIGTERM) and
resumed ends with the same params, bit for bit, as an uninterrupted run."""
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
  assert figures["sigterm_steps_lost"] == 0  # SIGTERM saved the step it stopped at
  assert figures["params"] == {"arrays": 20, "arrays_differing": 0, "max_abs_difference": 0.0}
  # Every logged loss, including the steps trained again after the kill, equals the reference.
  assert figures["losses_compared"] >= 5 and figures["losses_differing"] == 0
  assert figures["ok"]
