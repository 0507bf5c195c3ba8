"""`tools/benchmark.py data --resume-at 0 10000 1000000`: seconds from a resume to its first
batch, for each resume tier (t5x_lite/data/resume.py), at each step:

  replay    the fallback: the pipeline is built and skips the consumed batches. Measured where
            the replay fits --max-replay-s, else estimated from the measured per-batch cost
            (marked ~).
  iterator  the pipeline is built (as the train job does for its first batch) and its iterator
            state restored. Restoring reads the saved state whatever the step; the state itself
            is made here by skipping to the step once (not timed; the restored pipeline holds
            the same skip op, as a run's that once fell back to replay does), so a step whose
            replay does not fit --max-replay-s is not measured (n/a).
  cache     a packed cache (written once, not timed) opened at the step's row cursor.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time


def _first_batch_seconds(make) -> tuple[float, object]:
  start = time.perf_counter()
  batches = make()
  next(batches)
  return time.perf_counter() - start, batches


def _iterator_state(stream_of, step: int, directory: str) -> str:
  """The state after `step` batches, as a checkpoint of the train job holds it."""
  stream = stream_of()
  batches = stream.open(skip=step)
  next(batches)  # the loop reads one batch ahead
  stream.stage_state(directory, step)
  batches.close()
  return directory


def resume_rows(task: str, lengths: dict, batch_size: int, steps: list[int],
                max_replay_s: float, cache_rows: int) -> list[dict]:
  from t5x_lite import data, run_dir  # pylint: disable=g-import-not-at-top
  from t5x_lite.data import cache as cache_lib  # pylint: disable=g-import-not-at-top
  from t5x_lite.data import resume  # pylint: disable=g-import-not-at-top
  family = data.default_model_family(task)
  sha = run_dir.vocabulary_record(data.get_vocabulary())["sha256"]
  workdir = tempfile.mkdtemp(prefix="t5x_lite_resume_bench_")
  try:
    cache_dir = os.path.join(workdir, "cache")
    cache_lib.write_cache(cache_dir, task, lengths, family, max_rows=cache_rows,
                          vocabulary_sha=sha, log=lambda _: None)
    stream_of = lambda cache=None: resume.TrainStream(task, lengths, batch_size, batch_size,
                                                      family, 0, (0, 1), sha, cache)
    fresh, _ = _first_batch_seconds(lambda: stream_of().open())
    per_batch, rows = None, []
    for step in sorted(steps):
      row = {"task": task, "step": step, "fresh_s": fresh}
      if per_batch is None or step * per_batch <= max_replay_s:
        row["replay_s"], batches = _first_batch_seconds(lambda: stream_of().open(skip=step))
        batches.close()
        if step:
          per_batch = max(row["replay_s"] - fresh, 0.0) / step
        state = _iterator_state(stream_of, step, os.path.join(workdir, f"state_{step}"))
        prefix = os.path.join(state, resume.process_files())

        built = {}

        def restored():  # the state was made by skipping: its graph holds that skip
          batches = stream_of().open(skip=step)
          built["s"] = time.perf_counter()
          batches.read_state(prefix, step)
          return batches
        row["iterator_s"], batches = _first_batch_seconds(restored)
        row["restore_s"] = time.perf_counter() - built["s"]  # restore + first batch only
        batches.close()
      else:
        row["replay_s_estimated"] = fresh + step * per_batch
      row["cache_s"], _ = _first_batch_seconds(
          lambda: stream_of(cache_dir).open(start_row=step * batch_size))
      rows.append(row)
    return rows
  finally:
    shutil.rmtree(workdir, ignore_errors=True)


def _cell(row: dict, key: str) -> str:
  if key in row:
    return f"{row[key]:.2f}"
  if key == "replay_s" and "replay_s_estimated" in row:
    return f"~{row['replay_s_estimated']:,.0f}"
  return "n/a"


def resume_command(args) -> list[dict]:
  import ast  # pylint: disable=g-import-not-at-top
  from benchmark import data_lengths  # pylint: disable=g-import-not-at-top
  tasks = args.tasks if args.tasks_given else ["stdlib_clm", "stdlib_span_corruption"]
  print(f"Seconds from a resume to its first batch, batch {args.batch_size}, on "
        f"{os.cpu_count()} CPU cores (replay measured up to {args.max_replay_s:.0f}s, ~ "
        "estimated beyond; the cache holds "
        f"{args.cache_rows} rows)", flush=True)
  header = (f"{'task':<26}{'step':>10}{'fresh':>8}{'replay':>12}{'iterator':>10}"
            f"{'(restore)':>10}{'cache':>8}")
  print(header + "\n" + "-" * len(header), flush=True)
  results = []
  for task in tasks:
    lengths = ast.literal_eval(args.lengths) if args.lengths else data_lengths(task)
    for row in resume_rows(task, lengths, args.batch_size, args.resume_at, args.max_replay_s,
                           args.cache_rows):
      results.append(row)
      print(f"{task:<26}{row['step']:>10,}{row['fresh_s']:>8.2f}{_cell(row, 'replay_s'):>12}"
            f"{_cell(row, 'iterator_s'):>10}{_cell(row, 'restore_s'):>10}"
            f"{_cell(row, 'cache_s'):>8}", flush=True)
  print("\nfresh: a pipeline's first batch at step 0; iterator: built and restored, (restore): "
        "of which the restore and first batch; cache: opened at the row cursor (rows = step x "
        "batch).")
  return results
