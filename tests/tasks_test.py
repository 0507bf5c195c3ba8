"""t5x_lite/data/tasks.py: every registered task and mixture gives batches its model takes."""
import json

import gin
import jax
import numpy as np
import pytest
import seqio

from t5x_lite import data, models
from t5x_lite.data import finetune_tasks, sources, tasks

ENC_DEC = {"encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens",
           "decoder_loss_weights", "encoder_segment_ids", "encoder_positions",
           "decoder_segment_ids", "decoder_positions"}
DECODER = {"decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights",
           "decoder_segment_ids", "decoder_positions"}
ENCODER = {"encoder_input_tokens", "encoder_target_tokens", "encoder_loss_weights",
           "encoder_segment_ids", "encoder_positions"}
SEQ2SEQ = {"inputs": 64, "targets": 16}

# family -> (model preset, [(task or mixture, task feature lengths, expected model features)])
CASES = {
    "decoder": ("gpt2_tiny", [
        ("stdlib_clm", {"targets": 64}, DECODER),
        ("stdlib_prefix_lm", {"inputs": 32, "targets": 32}, DECODER | {"decoder_causal_attention"}),
        ("addition", {"inputs": 32, "targets": 8}, DECODER | {"decoder_causal_attention"}),
    ]),
    "encoder_decoder": ("t5_tiny", [
        ("stdlib_span_corruption", SEQ2SEQ, ENC_DEC),
        ("stdlib_span_corruption_prefix_lm", SEQ2SEQ, ENC_DEC),  # with stdlib_prefix_lm
        ("code_to_docstring_and_addition", SEQ2SEQ, ENC_DEC),  # with both text-to-text tasks
    ]),
    "encoder": ("bert_tiny", [("stdlib_mlm", {"inputs": 64, "targets": 64}, ENCODER)]),
}


@pytest.fixture(autouse=True)
def _small_corpus():
  gin.bind_parameter("stdlib_corpus.max_files", 8)  # a batch needs only a few files
  yield


def first_batch(name, lengths, family=None, batch_size=4, split="train", seed=0):
  it = data.get_dataset(name, lengths, split=split, batch_size=batch_size, seed=seed,
                        feature_converter=family)
  try:
    return next(it)
  finally:
    it.close()


def test_the_documented_names_are_registered():
  names = set(data.registered_names())
  for corpus in ("stdlib", "local", "tfds"):
    assert {f"{corpus}_{o}" for o in ("clm", "prefix_lm", "span_corruption", "mlm")} <= names
  assert {"code_to_docstring", "addition", "stdlib_span_corruption_prefix_lm",
          "local_span_corruption_prefix_lm", "code_to_docstring_and_addition"} <= names
  assert set(tasks.MODEL_FAMILIES) <= names
  mixture = seqio.get_mixture_or_task("stdlib_span_corruption_prefix_lm")
  assert mixture.get_rate(seqio.get_mixture_or_task("stdlib_span_corruption")) == 0.8
  assert seqio.get_mixture_or_task("addition").metric_fns == [finetune_tasks.exact_match]


@pytest.mark.parametrize("family", sorted(CASES))
def test_a_batch_of_every_task_fits_the_model_it_is_meant_for(family):
  preset, cases = CASES[family]
  model = models.from_gin(preset)
  for name, lengths, expected in cases:
    batch = first_batch(name, lengths, family)
    assert set(batch) == expected, name
    model.check_batch(batch)
    assert all(v.shape[0] == 4 and v.dtype == np.int32 for v in batch.values()), name
    token_keys = [k for k in batch if k.endswith("_tokens")]
    assert all(batch[k].max() < data.get_vocabulary().vocab_size <= model.config.vocab_size
               for k in token_keys), name
    weights = next(v for k, v in batch.items() if k.endswith("loss_weights"))
    assert weights.sum() > 0, name
    # Trace the model's loss on the batch's shapes (no compute: the training tests run it).
    params, _ = model.abstract_params(batch)
    loss, _ = jax.eval_shape(model.loss_fn, params, batch)
    assert loss.shape == (), name
  if family == "encoder":
    real = batch["encoder_input_tokens"] > 1
    assert 0.12 < batch["encoder_loss_weights"].sum() / real.sum() < 0.18


def text_of(tokens):
  """Byte-vocabulary text of all ordinary tokens (decode() would stop at the first EOS)."""
  return data.get_vocabulary().decode([int(t) for t in np.ravel(tokens) if 2 < t < 259])


def test_local_corpus_tasks_read_the_gin_pattern(tmp_path):
  words = "alpha beta gamma delta epsilon".split()
  for split, n in (("train", 200), ("validation", 20)):
    with open(tmp_path / f"{split}-00000-of-00001.jsonl", "w") as f:
      for i in range(n):
        f.write(json.dumps({"text": f"{split} {i}: " + " ".join(words[(i + j) % 5]
                                                               for j in range(30))}) + "\n")
  gin.bind_parameter("local_corpus.pattern", str(tmp_path / "{split}-*.jsonl"))
  batch = first_batch("local_clm", {"targets": 64})
  assert "alpha" in text_of(batch["decoder_target_tokens"])
  batch = first_batch("local_span_corruption_prefix_lm", SEQ2SEQ, split="validation")
  text = text_of(batch["encoder_input_tokens"])
  assert "validation" in text and "train" not in text
  assert set(first_batch("local_mlm", {"inputs": 32, "targets": 32})) == ENCODER
  assert "decoder_causal_attention" in first_batch("local_prefix_lm", {"inputs": 32,
                                                                       "targets": 32})


def test_tfds_tasks_read_a_prepared_dataset(tmp_path):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  with tfds.core.registered.skip_registration():

    class T5xLiteTasksText(tfds.core.GeneratorBasedBuilder):
      VERSION = tfds.core.Version("0.1.0")

      def _info(self):
        return tfds.core.DatasetInfo(
            builder=self, features=tfds.features.FeaturesDict({"content": tfds.features.Text()}))

      def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(100), "test": self._generate_examples(10)}

      def _generate_examples(self, n):
        for i in range(n):
          yield i, {"content": f"tfds text number {i} " * 5}

    T5xLiteTasksText(data_dir=str(tmp_path)).download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  gin.parse_config(["tfds_corpus.name = 't5x_lite_tasks_text'",
                    f"tfds_corpus.data_dir = '{tmp_path}'", "tfds_corpus.text_key = 'content'",
                    "tfds_corpus.validation_split = 'test'"])
  batch = first_batch("tfds_span_corruption", SEQ2SEQ, split="validation")
  assert "tfds text number" in text_of(batch["encoder_input_tokens"])
  assert set(first_batch("tfds_clm", {"targets": 32})) == DECODER


def test_mixture_samples_tasks_at_their_rates():
  mixture = seqio.get_mixture_or_task("stdlib_span_corruption_prefix_lm")
  ds = mixture.get_dataset(SEQ2SEQ, split="train", seed=1, num_epochs=None)
  sentinel_floor = data.special_ids(data.get_vocabulary()).sentinel(99)
  from_span = [bool((ex["inputs"] >= sentinel_floor).any())
               for ex in ds.take(400).as_numpy_iterator()]
  assert np.mean(from_span) == pytest.approx(0.8, abs=0.06)


def test_register_corpus_tasks_with_custom_hyperparameters(tmp_path):
  (tmp_path / "c.txt").write_text("".join(f"line {i} " * 20 + "\n" for i in range(100)))
  source = sources.TextFileSource(sources.CorpusConfig(str(tmp_path / "c.txt"),
                                                       validation_percent=0))
  names = tasks.register_corpus_tasks("t5x_lite_test_custom", source, ["span_corruption"],
                                      span_corruption={"noise_density": 0.5})
  assert names == ["t5x_lite_test_custom_span_corruption"]
  task = seqio.get_mixture_or_task(names[0])
  ex = next(task.get_dataset({"inputs": 64, "targets": 80}, seed=0).as_numpy_iterator())
  spans = int((ex["inputs"] > 259).sum())
  noise = len(ex["targets"]) - 1 - spans
  assert noise / (len(ex["inputs"]) - 1 - spans + noise) == pytest.approx(0.5, abs=0.02)
  seqio.TaskRegistry.remove(names[0])
