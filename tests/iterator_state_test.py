"""tools/iterator_state.py: a tf.data iterator checkpoint's RNG counters are read, and a state
advanced by a factor restores (same batches as TF's own restore at factor 1; counters moved on
at another), so the resume benchmark can time a restore at a step it cannot replay to."""
import os
import sys

import numpy as np
import tensorflow as tf

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tools"))
import iterator_state  # pylint: disable=wrong-import-position


def _pipeline(skip: int = 0):
  ds = tf.data.Dataset.range(10 ** 9).shuffle(50, seed=3).skip(skip)
  options = tf.data.Options()  # nothing read ahead: the counters are exact
  options.autotune.enabled = False
  options.experimental_optimization.inject_prefetch = False
  return tf.data.Dataset.zip(ds, tf.data.Dataset.random(seed=4)).batch(10).with_options(options)


def _saved(tmp_path, reads: int) -> str:
  iterator = iter(_pipeline())
  for _ in range(reads):
    next(iterator)
  return tf.train.Checkpoint(iterator=iterator).write(str(tmp_path / f"state_{reads}"))


def test_counters_grow_with_the_elements_drawn(tmp_path):
  found = [iterator_state.counters(_saved(tmp_path, reads)) for reads in (2, 7)]
  shuffles = [c for f in found for name, c in f.items() if name.endswith("::Shuffle")]
  randoms = [c for f in found for name, c in f.items() if name.endswith("::Random")]
  drawn = [c["num_random_samples"] for c in shuffles]
  assert drawn == [20, 70]  # one draw per element
  assert randoms[1]["num_random_samples"] > randoms[0]["num_random_samples"] > 0
  assert all(0 < c["slices_end_0"] - c["slices_start_0"] <= 50 for c in shuffles)  # its buffer


def test_advanced_state_restores_with_its_counters_moved_on(tmp_path):
  prefix = _saved(tmp_path, 4)
  (drawn,) = [c["num_random_samples"] for name, c in iterator_state.counters(prefix).items()
              if name.endswith("::Shuffle")]
  reference = iter(_pipeline())
  tf.train.Checkpoint(iterator=reference).read(prefix).assert_consumed()
  same = iter(_pipeline())
  iterator_state.restore_variant(same, iterator_state.advance(prefix, 1.0))
  for _ in range(3):
    a, b = next(reference), next(same)
    np.testing.assert_array_equal(a[0], b[0]), np.testing.assert_array_equal(a[1], b[1])
  advanced = iter(_pipeline())
  iterator_state.restore_variant(advanced, iterator_state.advance(prefix, 5.0))
  next(advanced)  # restorable and readable
  resaved = iterator_state.counters(
      tf.train.Checkpoint(iterator=advanced).write(str(tmp_path / "resaved")))
  shuffle = next(c for name, c in resaved.items() if name.endswith("::Shuffle"))
  assert drawn == 40 and shuffle["num_random_samples"] == 5 * 40 + 10  # 5x, then one batch
