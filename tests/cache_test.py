"""t5x_lite/data/cache.py and tools/cache_task.py: the packed cache's rows, their order (a
seeded permutation per epoch), elastic reading by any number of data shards, and refusals."""
import json
import os
import sys

import numpy as np
import pytest

from t5x_lite.data import cache

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tools"))
import cache_task  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

LENGTHS = {"targets": 16}
ROWS = 100


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  """100 packed stdlib_clm rows in shards of 30 (4 shards), written by the tool."""
  directory = str(tmp_path_factory.mktemp("cache") / "stdlib_clm_16")
  assert cache_task.main(["--task", "stdlib_clm", "--lengths", str(LENGTHS), "--output_dir",
                          directory, "--max_rows", str(ROWS), "--rows_per_shard", "30",
                          "--gin", "stdlib_corpus.max_files=6"]) == 0
  return directory


def reader(directory, batch, shard=(0, 1), start_row=0, seed=3):
  return cache.CachedBatches(cache.PackedCache(directory), batch, shard, seed, start_row)


def test_the_tool_writes_fixed_shape_shards_and_a_meta_record(cache_dir):
  with open(os.path.join(cache_dir, cache.META)) as f:
    meta = json.load(f)
  assert (meta["task"], meta["rows"], meta["shards"], meta["family"]) == (
      "stdlib_clm", ROWS, 4, "decoder")
  rows = cache.PackedCache(cache_dir).rows_at(np.arange(ROWS))
  assert rows["decoder_target_tokens"].shape == (ROWS, 16)
  assert (rows["decoder_target_tokens"] != 0).mean() > 0.9  # packed rows
  assert not os.path.exists(cache_dir + ".tmp")


def test_every_row_once_per_epoch_in_a_new_order_each_epoch(cache_dir):
  stream = reader(cache_dir, 8)
  first, second = stream.row_indices(0, ROWS), stream.row_indices(ROWS, ROWS)
  assert sorted(first) == sorted(second) == list(range(ROWS))
  assert list(first) != list(second)
  # A batch across the epoch boundary: the end of epoch 0, then the start of epoch 1.
  np.testing.assert_array_equal(stream.row_indices(96, 8), np.r_[first[96:], second[:4]])


def test_any_number_of_readers_reads_the_same_global_batches_from_any_row(cache_dir):
  one = reader(cache_dir, 8)
  global_batches = [next(one) for _ in range(15)]  # crosses an epoch
  halves = [reader(cache_dir, 8, shard=(i, 2)) for i in range(2)]
  for want in global_batches:
    got = [next(h) for h in halves]
    for k in want:
      np.testing.assert_array_equal(np.concatenate([g[k] for g in got]), want[k])
  resumed = reader(cache_dir, 8, start_row=5 * 8)  # the position: rows consumed
  np.testing.assert_array_equal(next(resumed)["decoder_target_tokens"],
                                global_batches[5]["decoder_target_tokens"])
  # Another batch size goes on with the same rows.
  wide = next(reader(cache_dir, 16, start_row=5 * 8))["decoder_target_tokens"]
  np.testing.assert_array_equal(wide, np.concatenate([global_batches[5]["decoder_target_tokens"],
                                                      global_batches[6]["decoder_target_tokens"]]))


def test_a_cache_of_other_data_is_refused_before_any_work(cache_dir, tmp_path):
  sha = cache.PackedCache(cache_dir).meta["vocabulary"]
  cache.PackedCache.open(cache_dir, "stdlib_clm", LENGTHS, "decoder", sha)
  with pytest.raises(ValueError, match=r"feature_lengths \{'targets': 16\} \(run: \{'targets': "
                                       r"32\}\).*tools/cache_task.py"):
    cache.PackedCache.open(cache_dir, "stdlib_clm", {"targets": 32}, "decoder", sha)
  with pytest.raises(ValueError, match=r"family 'decoder' \(run: 'encoder'\); vocabulary"):
    cache.PackedCache.open(cache_dir, "stdlib_clm", LENGTHS, "encoder", "other")
  with pytest.raises(FileNotFoundError, match="not a packed cache"):
    cache.PackedCache(str(tmp_path))
  with pytest.raises(SystemExit):
    cache_task.main(["--task", "stdlib_clm", "--lengths", "targets=16", "--output_dir", "x"])
