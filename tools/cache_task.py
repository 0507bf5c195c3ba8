#!/usr/bin/env python3
"""Write a task's (or mixture's) packed training rows to an offline cache that the train job
reads in O(1) from any position (t5x_lite/data/cache.py):

    python tools/cache_task.py --task stdlib_clm --lengths "{'targets': 512}" \
        --output_dir /data/cache/stdlib_clm_512
    # then, in gin:  train.data_cache = '/data/cache/stdlib_clm_512'

One pass over the task's train split (shuffled with --seed), packed for --family models (default:
the family the task is registered for); --max_rows caps it (needed for a task that never ends,
such as addition). Gin files and bindings (--gin_file, --gin.NAME=VALUE: the corpus, the
vocabulary) are those the train job will use: the cache records the vocabulary's fingerprint and
the job refuses a cache of another vocabulary, task, lengths or family.
"""
from __future__ import annotations

import argparse
import ast
import os
import sys
from typing import Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--task", required=True, help="registered task or mixture name")
  parser.add_argument("--lengths", required=True, help="TASK_FEATURE_LENGTHS, e.g. "
                      "\"{'inputs': 512, 'targets': 114}\"")
  parser.add_argument("--output_dir", required=True, help="replaced once the cache is complete")
  parser.add_argument("--family", default=None, choices=["decoder", "encoder_decoder", "encoder"])
  parser.add_argument("--seed", type=int, default=0, help="of the pass's shuffling and noise")
  parser.add_argument("--max_rows", type=int, default=None)
  parser.add_argument("--rows_per_shard", type=int, default=65536)
  parser.add_argument("--gin_file", action="append", default=[])
  parser.add_argument("--gin", action="append", default=[], metavar="NAME=VALUE")
  args = parser.parse_args(argv)
  try:
    args.lengths = ast.literal_eval(args.lengths)
  except (ValueError, SyntaxError):
    parser.error(f"--lengths={args.lengths!r} is not a Python dict, e.g. \"{{'targets': 512}}\".")
  if not isinstance(args.lengths, dict):
    parser.error(f"--lengths must be a dict of feature lengths, got {args.lengths!r}.")
  return args


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parse_args(argv)
  import gin  # pylint: disable=g-import-not-at-top
  from t5x_lite import data, run_dir  # pylint: disable=g-import-not-at-top
  from t5x_lite.data import cache  # pylint: disable=g-import-not-at-top
  gin.parse_config_files_and_bindings(args.gin_file, args.gin, skip_unknown=True)
  if args.task not in data.registered_names():
    data.get_provider(args.task)  # raises naming the closest registered names
  family = args.family or data.default_model_family(args.task)
  sha = run_dir.vocabulary_record(data.get_vocabulary())["sha256"]
  meta = cache.write_cache(args.output_dir, args.task, args.lengths, family, args.seed,
                           args.max_rows, args.rows_per_shard, sha)
  for fault in meta["data_faults"]:
    print(f"  skipped: {fault}")
  print(f"Train with: --gin.train.data_cache='{os.path.abspath(args.output_dir)}'")
  return 0


if __name__ == "__main__":
  sys.exit(main())
