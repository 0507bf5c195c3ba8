"""t5x_lite/data/mixing.py: rates by size and temperature, task sizes, and the realised mix
(task tags that change no row, counted per batch and logged by loop.MixProportions)."""
import gin
import numpy as np
import pytest
import seqio

from t5x_lite import loop
from t5x_lite.data import mixing, pipeline, tasks
from t5x_lite.data import vocabularies

LENGTHS = {"inputs": 48, "targets": 16}


def test_rates_by_size_temperature_and_maximum():
  sizes = {"small": 100, "large": 10_000}
  assert mixing.mixture_rates(sizes)["small"] == pytest.approx(100 / 10_100)
  assert mixing.mixture_rates(sizes, temperature=2)["small"] == pytest.approx(10 / 110)
  assert mixing.mixture_rates(sizes, maximum=1000)["small"] == pytest.approx(100 / 1100)
  assert mixing.mixture_rates(sizes, temperature=1e9)["small"] == pytest.approx(0.5)
  with pytest.raises(ValueError, match="temperature=0: it must be > 0"):
    mixing.mixture_rates(sizes, temperature=0)
  with pytest.raises(ValueError, match=r"Tasks \['small'\] have no data"):
    mixing.mixture_rates({"small": 0, "large": 1})


def test_sizes_are_counted_in_examples_or_tokens(tmp_path):
  texts = ["one two", "three", "four five six"]
  (tmp_path / "a.txt").write_text("\n".join(texts) + "\n")
  gin.bind_parameter("local_corpus.pattern", str(tmp_path / "*.txt"))
  gin.bind_parameter("local_corpus.format", "lines")
  train = seqio.TaskRegistry.get("local_clm").source.get_dataset("train", shuffle=False)
  docs = [ex["text"].numpy().decode() for ex in train]  # the train split (some are held out)
  vocab = vocabularies.get_vocabulary()
  assert mixing.task_size.__wrapped__("local_clm", "train", "examples") == len(docs)
  assert mixing.task_size.__wrapped__("local_clm", "train", "tokens") == sum(
      len(vocab.encode(d)) for d in docs)
  assert mixing.task_size.__wrapped__("local_clm", "train", "examples", maximum=1) == 1


def test_a_mixture_by_temperature_gets_its_rates_when_read():
  name = tasks.register_mixture("t5x_lite_mixing_test", ["stdlib_span_corruption",
                                                         "stdlib_prefix_lm"], by="tokens",
                                temperature=2.0, sizes={"stdlib_span_corruption": 900,
                                                        "stdlib_prefix_lm": 100})
  try:
    mixture = seqio.MixtureRegistry.get(name)
    assert {t.name: round(mixture.get_rate(t), 6) for t in mixture.tasks} == {
        "stdlib_span_corruption": 0.75, "stdlib_prefix_lm": 0.25}
    assert tasks.MODEL_FAMILIES[name] == tasks.MODEL_FAMILIES["stdlib_span_corruption"]
  finally:
    seqio.MixtureRegistry.remove(name)
    tasks.MODEL_FAMILIES.pop(name, None)  # the registry and the family table go together
  with pytest.raises(ValueError, match=r"no task named \['nope'\]"):
    tasks.register_mixture("t5x_lite_mixing_test", ["nope"])


def test_task_tags_change_no_row_and_count_every_example():
  gin.bind_parameter("stdlib_corpus.max_files", 4)
  rates = [("stdlib_span_corruption", 0.8), ("stdlib_prefix_lm", 0.2)]  # as registered
  seqio.MixtureRegistry.add("t5x_lite_untagged", rates)  # seqio's own sampling
  try:
    untagged = next(iter(pipeline.get_tf_dataset("t5x_lite_untagged", LENGTHS, seed=2)))
  finally:
    seqio.MixtureRegistry.remove("t5x_lite_untagged")
  batches = pipeline.get_dataset("stdlib_span_corruption_prefix_lm", LENGTHS, seed=2)
  batch = next(batches)
  tagged = next(iter(batches.dataset))  # the same first batch, with its tags
  assert set(batch) == set(untagged) and mixing.TASK_FEATURE not in batch
  assert all(np.array_equal(batch[k], untagged[k].numpy()) for k in batch)
  examples = sum(len(set(row[row > 0])) for row in batch["encoder_segment_ids"])
  counts = batches.mix.take(1)
  assert sum(counts.values()) == examples == (tagged[mixing.TASK_FEATURE].numpy() > 0).sum()
  assert set(counts) == {"stdlib_prefix_lm", "stdlib_span_corruption"}

  class Writer:
    written = {}

    def write(self, step, scalars):
      self.written[step] = scalars

  batches.mix.add(1, {mixing.TASK_FEATURE: np.array([[1, 2, 2, 0]])})
  hook = loop.MixProportions(batches.mix.take, Writer(), every=1)
  hook(type("Loop", (), {"consumed": 2, "step": 7})())
  assert Writer.written == {7: {"mix/stdlib_prefix_lm": 1 / 3, "mix/stdlib_span_corruption": 2 / 3}}


def test_the_realised_mix_is_summed_over_processes(monkeypatch):
  # Two processes, each counting its own rows: take() returns the global counts (an allgather).
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(mixing.jax, "process_count", lambda: 2)
  monkeypatch.setattr(multihost_utils, "process_allgather",
                      lambda x: np.stack([x, np.array([5, 0])]))  # the other process's counts
  counter = mixing.MixCounter(["a", "b"])
  counter.add(0, {mixing.TASK_FEATURE: np.array([[1, 2, 2, 0]])})
  assert counter.take(1) == {"a": 6, "b": 2}
