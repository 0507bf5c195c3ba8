"""t5x_lite/run_dir.py: the run manifest a resume is checked against, and the MODEL_DIR lock."""
import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from t5x_lite import run_dir, vocabulary

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BYTES = {"kind": "byte", "vocab_size": 360, "extra_ids": 101, "sha256": "b" * 64}


def current(**changes):
  record = run_dir.manifest(task="stdlib_clm", feature_lengths={"targets": 32}, batch_size=8,
                            seed=0, data_shards=1, vocabulary=BYTES,
                            model_config={"d_model": 64}, corpus={"stdlib_corpus": {}})
  record.update(changes)
  return record


def test_the_first_start_records_the_run_and_a_same_resume_passes(tmp_path):
  recorded = run_dir.check_manifest(str(tmp_path), current(), resuming=False)
  on_disk = json.loads((tmp_path / run_dir.MANIFEST).read_text())
  assert on_disk == recorded and on_disk["BATCH_SIZE"] == 8 and on_disk["changes"] == []
  assert on_disk["TASK_FEATURE_LENGTHS"] == {"targets": 32} and on_disk["t5x_lite_version"]
  assert run_dir.check_manifest(str(tmp_path), current(), resuming=True) == recorded


def test_a_resume_that_changes_the_data_or_the_token_ids_is_refused(tmp_path):
  run_dir.check_manifest(str(tmp_path), current(), resuming=False)
  before = (tmp_path / run_dir.MANIFEST).read_text()
  other_vocab = dict(BYTES, kind="sentencepiece", sha256="s" * 64, file="/tmp/spm.model")
  with pytest.raises(run_dir.RunDirError, match=(
      r"(?s)change the data stream or the meaning of token ids:\n  BATCH_SIZE: 8 \(recorded\) "
      r"-> 16 \(now\)\n  vocabulary: byte \(360 ids.*-> sentencepiece /tmp/spm.model.*Nothing "
      r"was written.*fresh MODEL_DIR.*--gin.train.allow_changes=\"\['BATCH_SIZE', "
      r"'vocabulary'\]\"")):
    run_dir.check_manifest(str(tmp_path), current(BATCH_SIZE=16, vocabulary=other_vocab),
                           resuming=True)
  assert (tmp_path / run_dir.MANIFEST).read_text() == before
  with pytest.raises(run_dir.RunDirError, match="allow_changes names \\['batch'\\]"):
    run_dir.check_manifest(str(tmp_path), current(), resuming=True, allow_changes=["batch"])


def test_an_allowed_change_is_recorded_and_a_model_change_only_reported(tmp_path):
  run_dir.check_manifest(str(tmp_path), current(), resuming=False)
  logged = []
  record = run_dir.check_manifest(
      str(tmp_path), current(BATCH_SIZE=16, model={"d_model": 64, "dropout_rate": 0.1}),
      resuming=True, allow_changes=["BATCH_SIZE"], step=40, log=logged.append)
  assert record["BATCH_SIZE"] == 16 and record["model"] == {"d_model": 64}
  (change,) = record["changes"]
  assert change["step"] == 40 and change["BATCH_SIZE"] == {"from": 8, "to": 16}
  assert json.loads((tmp_path / run_dir.MANIFEST).read_text()) == record
  assert any("model differs" in line for line in logged)
  assert any("Allowed change" in line and "BATCH_SIZE: 8 -> 16" in line for line in logged)
  # The next resume at the new size passes without allow_changes.
  run_dir.check_manifest(str(tmp_path), current(BATCH_SIZE=16), resuming=True)


class FakeSentencePiece(vocabulary.Vocabulary):
  """What vocabulary_record reads of a SentencePiece vocabulary (ours or seqio's)."""
  kind, vocab_size = "sentencepiece", 8000

  def __init__(self, path):  # pylint: disable=super-init-not-called
    self.extra_ids = 100
    self.sentencepiece_model_file = path
    with open(path, "rb") as f:
      self.sp_model = f.read()

  def _content(self) -> bytes:  # what the fingerprint covers, as SentencePieceVocabulary's
    return self.sp_model


def test_a_sentencepiece_model_is_fingerprinted_and_copied_into_the_run(tmp_path):
  original = tmp_path / "spm.model"
  original.write_bytes(b"model one")
  record = run_dir.vocabulary_record(FakeSentencePiece(str(original)))
  assert record["kind"] == "sentencepiece" and record["file"] == str(original)
  model_dir = tmp_path / "run"
  model_dir.mkdir()
  run_dir.check_manifest(str(model_dir), current(vocabulary=record), resuming=False)
  assert (model_dir / run_dir.SPM_COPY).read_bytes() == b"model one"  # kept with the run
  # The same content elsewhere is the same vocabulary; other content under the same path is not.
  moved = tmp_path / "moved.model"
  moved.write_bytes(b"model one")
  run_dir.check_manifest(str(model_dir), current(
      vocabulary=run_dir.vocabulary_record(FakeSentencePiece(str(moved)))), resuming=True)
  original.write_bytes(b"model two")
  with pytest.raises(run_dir.RunDirError, match="vocabulary: sentencepiece"):
    run_dir.check_manifest(str(model_dir), current(
        vocabulary=run_dir.vocabulary_record(FakeSentencePiece(str(original)))), resuming=True)


def test_a_held_lock_refuses_a_second_writer_and_is_gone_after_release(tmp_path):
  lock = run_dir.acquire(str(tmp_path), command="first job")
  holder = json.loads((tmp_path / run_dir.LOCK).read_text())
  assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
  with pytest.raises(run_dir.RunDirError, match=rf"in use by another training job: host .*pid "
                                                rf"{os.getpid()}.*\(first job\).*another "
                                                "MODEL_DIR"):
    run_dir.acquire(str(tmp_path))
  lock.release()
  assert not (tmp_path / run_dir.LOCK).exists()
  with run_dir.locked(str(tmp_path)):  # free again
    assert (tmp_path / run_dir.LOCK).exists()
  assert not (tmp_path / run_dir.LOCK).exists()


HOLD = ("import sys, time; from t5x_lite import run_dir; run_dir.acquire(sys.argv[1], 'other "
        "job'); print('held', flush=True); time.sleep(600)")


def test_a_live_writer_in_another_process_is_refused_and_its_lock_reclaimed_once_killed(
    tmp_path):
  other = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE,
                           cwd=REPO, text=True)
  try:
    assert other.stdout.readline().strip() == "held"
    with pytest.raises(run_dir.RunDirError, match=rf"pid {other.pid}.*\(other job\)"):
      run_dir.acquire(str(tmp_path))
  finally:
    other.send_signal(signal.SIGKILL)  # dies without releasing: the lock file stays
    other.wait()
  assert (tmp_path / run_dir.LOCK).exists()
  warnings = []
  run_dir.acquire(str(tmp_path), log=warnings.append).release()
  assert len(warnings) == 1 and "Reclaimed the lock" in warnings[0]
  assert f"pid {other.pid}" in warnings[0]


def test_a_lock_written_on_another_host_is_refused_naming_the_file(tmp_path):
  (tmp_path / run_dir.LOCK).write_text(json.dumps(
      {"host": "worker-7", "pid": 12, "started": "2026-01-01T00:00:00"}))
  with pytest.raises(run_dir.RunDirError, match=r"locked by a job on another host: host "
                                                r"'worker-7', pid 12.*delete .*train.lock"):
    run_dir.acquire(str(tmp_path))


def test_other_processes_of_a_multi_host_run_refuse_too_but_write_nothing(tmp_path):
  run_dir.check_manifest(str(tmp_path), current(), resuming=False)
  before = (tmp_path / run_dir.MANIFEST).read_text()
  with pytest.raises(run_dir.RunDirError, match="BATCH_SIZE: 8"):
    run_dir.check_manifest(str(tmp_path), current(BATCH_SIZE=16), resuming=True, write=False)
  run_dir.check_manifest(str(tmp_path), current(BATCH_SIZE=16), resuming=True, write=False,
                         allow_changes=["BATCH_SIZE"])
  assert (tmp_path / run_dir.MANIFEST).read_text() == before
