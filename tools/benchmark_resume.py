"""`tools/benchmark.py data --resume-at 0 10000 1000000`: seconds from a resume to its first
batch, for each resume tier (t5x_lite/data/resume.py), at each step:

  replay    the fallback: the pipeline is built and skips the consumed batches. Measured where
            the replay fits --max-replay-s, else estimated from the measured per-batch cost
            (marked ~).
  iterator  the pipeline is built (as a resumed train job does for its first batch) and its
            iterator state restored; "(restore)" is the restore and first batch alone. The state
            at a step is the replayed pipeline's (the replay column's run, its state written as
            the train job writes it; the restored pipeline holds the same skip op, as a run's
            that once fell back to replay does). A step whose replay does not fit
            --max-replay-s gets a state made from the last replayed step's: the same buffers,
            its growing counters (RNG draws, shuffle bounds, skip count) moved on to the step
            (tools/iterator_state.py; marked *). TF restores a shuffle or Dataset.random by
            redrawing every sample drawn so far, so that is the part of a restore that grows
            with the step; the buffers (shuffle, packing, prefetch) are bounded.
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


def _replayed(stream_of, step: int, directory: str) -> tuple[float, str]:
  """Seconds to the first batch by replaying `step` batches; the replayed pipeline's state is
  then written as a checkpoint of the train job holds it (the loop reads one batch ahead)."""
  stream = stream_of()
  seconds, batches = _first_batch_seconds(lambda: stream.open(skip=step))
  stream.stage_state(directory, step)
  batches.close()
  return seconds, os.path.join(directory, _process_files())


def _process_files() -> str:
  from t5x_lite.data import resume  # pylint: disable=g-import-not-at-top
  return resume.process_files()


def _restored(stream_of, step: int, restore) -> dict:
  """Build (as a resumed train job does) + `restore(batches)` + first batch, in seconds."""
  start = time.perf_counter()
  batches = stream_of().open(skip=step)  # the state was made by skipping: its graph holds it
  built = time.perf_counter()
  restore(batches)
  next(batches)
  done = time.perf_counter()
  batches.close()
  return {"iterator_s": done - start, "restore_s": done - built}


def _advanced(stream_of, step: int, base: tuple[int, str]) -> dict:
  """The iterator tier at a step too far to replay: the state at the last replayed step with its
  growing counters moved on to `step` (tools/iterator_state.py), restored and read from TF."""
  import iterator_state  # pylint: disable=g-import-not-at-top
  base_step, prefix = base
  try:
    state = iterator_state.advance(prefix, step / base_step)
  except ValueError as e:
    print(f"  (iterator state at {step:,} not made: {e})", flush=True)
    return {}
  row = _restored(stream_of, step, lambda b: iterator_state.restore_variant(
      b._iterator, state))  # pylint: disable=protected-access
  return {k + "_advanced": v for k, v in row.items()}


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
    per_batch, base, rows = None, None, []
    for step in sorted(steps):
      row = {"task": task, "step": step, "fresh_s": fresh}
      if per_batch is None or step * per_batch <= max_replay_s:
        row["replay_s"], prefix = _replayed(stream_of, step,
                                            os.path.join(workdir, f"state_{step}"))
        if step:
          per_batch = max(row["replay_s"] - fresh, 0.0) / step
          base = (step, prefix)
        row.update(_restored(stream_of, step, lambda b: b.read_state(prefix, step)))
      else:
        row["replay_s_estimated"] = fresh + step * per_batch
        if base:
          row.update(_advanced(stream_of, step, base))
      row["cache_s"], _ = _first_batch_seconds(
          lambda: stream_of(cache_dir).open(start_row=step * batch_size))
      rows.append(row)
    return rows
  finally:
    shutil.rmtree(workdir, ignore_errors=True)


def _cell(row: dict, key: str) -> str:
  if key in row:
    return f"{row[key]:.2f}"
  if key + "_advanced" in row:
    return f"{row[key + '_advanced']:.2f}*"
  if key == "replay_s" and "replay_s_estimated" in row:
    return f"~{row['replay_s_estimated']:,.0f}"
  return "n/a"


def resume_command(args) -> list[dict]:
  import ast  # pylint: disable=g-import-not-at-top
  from benchmark_data import data_lengths  # pylint: disable=g-import-not-at-top
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
        "batch). * : a state made from the last replayed step's, its counters (RNG draws, "
        "shuffle bounds, skip) moved on to the step (tools/iterator_state.py).")
  return results
