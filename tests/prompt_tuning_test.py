"""Prompt tuning: a prompt equal to some tokens' embeddings computes what those tokens do (so
masks and positions are untouched), only the prompt trains (the base bitwise unchanged, the loss
falling), the converter puts placeholders before every packed example with no loss on them, the
export loads over its base, and the refusals."""
import contextlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_lite import models, optimizers, partitioning, prompt_tuning
from t5x_lite import trainer as trainer_lib

N = 3  # prompt length


def texts_batch(model, texts, targets=None):
  """A teacher-forced batch (rows of ids, BOS / EOS as the base's scoring_batch puts them)."""
  targets = targets or [[5, 6, 7]] * len(texts)
  return model.scoring_batch(texts, targets, eos_id=1)


@pytest.mark.parametrize("preset", ["gpt2_tiny", "t5_tiny"])
def test_a_prompt_of_token_embeddings_computes_what_those_tokens_do(preset):
  base = models.from_gin(preset)
  model = prompt_tuning.PromptTuningModel(base, length=N)
  params = model.init(jax.random.PRNGKey(0), model.dummy_batch(2, {"inputs": 8, "targets": 8}))
  base_params, prompt = prompt_tuning.split(params)
  (path, vectors), = prompt_tuning.flat(prompt).items()
  assert path == ("encoder_embedder/prompt" if preset == "t5_tiny" else "embedder/prompt")
  assert vectors.shape == (N, base.config.d_model)
  tokens = [11, 12, 13]  # the prompt set to these tokens' embeddings
  table = prompt_tuning.flat(base_params)["token_embed/embedding"]
  params = prompt_tuning.join(base_params, {path: table[np.array(tokens)]})
  texts = [[20, 21, 22, 23], [30, 31]]
  prompted = model.scoring_batch(texts, [[5, 6, 7]] * 2, eos_id=1)
  plain = base.scoring_batch([tokens + t for t in texts], [[5, 6, 7]] * 2, eos_id=1)
  assert (np.asarray(prompted["decoder_target_tokens"]) >= 0).all()  # no placeholder targets
  np.testing.assert_allclose(model.score_batch(params, prompted), base.score_batch(
      base_params, plain), rtol=1e-5)


def test_only_the_prompt_trains_and_the_loss_falls():
  base = models.from_gin("gpt2_tiny")
  model = prompt_tuning.PromptTuningModel(base, length=N)
  rng = np.random.default_rng(0)
  rows = [list(rng.integers(2, 40, 6)) for _ in range(8)]
  batch = model.scoring_batch(rows, [[7, 8, 9, 10]] * 8, eos_id=1)
  optimizer = optimizers.create_optimizer("adamw", optimizers.create_schedule("constant", 0.1, 0))
  trainer = trainer_lib.Trainer(model, optimizer, partitioning.make_mesh(4, 2, 1),
                                {k: v.shape for k, v in batch.items()},
                                trainable=prompt_tuning.TRAINABLE)
  moments = [x.shape for x in jax.tree.leaves(trainer.abstract_state.opt_state) if x.ndim]
  assert moments == [(N, base.config.d_model)] * 2  # AdamW's two moments, for the prompt alone
  state = trainer.init_state(0)
  before = jax.device_get(state.params)
  batch = partitioning.host_to_global(batch, trainer.mesh)
  losses = []
  for _ in range(6):
    state, metrics = trainer.train_step(state, batch)
    losses.append(float(metrics["loss"].compute()))
    assert float(metrics["grad_norm"].compute()) > 0  # step 0 too: the prompt gets a gradient
  after = jax.device_get(state.params)
  base_before, prompt_before = prompt_tuning.split(before)
  base_after, prompt_after = prompt_tuning.split(after)
  jax.tree.map(np.testing.assert_array_equal, base_after, base_before)  # bitwise unchanged
  assert not np.array_equal(prompt_tuning.flat(prompt_after)["embedder/prompt"],
                            prompt_tuning.flat(prompt_before)["embedder/prompt"])
  assert losses[-1] < losses[0] - 0.1, losses


def _converted(model, examples, lengths, pack=True):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  keys = sorted(examples[0])
  ds = tf.data.Dataset.from_generator(
      lambda: ({k: np.asarray(ex[k], np.int32) for k in keys} for ex in examples),
      output_signature={k: tf.TensorSpec([None], tf.int32) for k in keys})
  return list(model.feature_converter(pack=pack)(ds, lengths).as_numpy_iterator())


def test_the_converter_prompts_every_packed_example_with_no_loss_on_the_prompt():
  placeholders = prompt_tuning.placeholder_ids(N)
  decoder = prompt_tuning.PromptTuningModel(models.from_gin("gpt2_tiny"), length=N)
  # A language-model task (targets only): BOS, the prompt, then the text; two per row.
  (row,) = _converted(decoder, [{"targets": [5, 6, 7]}, {"targets": [8, 9]}], {"targets": 8})
  np.testing.assert_array_equal(row["decoder_input_tokens"], [0, *placeholders, 5, 6, 0,
                                                              *placeholders, 8])
  assert (row["decoder_target_tokens"] >= 0).all()
  np.testing.assert_array_equal(row["decoder_loss_weights"] > 0,
                                row["decoder_target_tokens"] > 0)
  assert row["decoder_loss_weights"][:N].sum() == 0 and row["decoder_loss_weights"][N] == 1
  # Text to text: the encoder reads the prompt, then the inputs; the lengths grow by N.
  t5 = prompt_tuning.PromptTuningModel(models.from_gin("t5_tiny"), length=N)
  (row,) = _converted(t5, [{"inputs": [5, 6], "targets": [7]}, {"inputs": [8], "targets": [9]}],
                      {"inputs": 6, "targets": 2})
  np.testing.assert_array_equal(row["encoder_input_tokens"],
                                [*placeholders, 5, 6, *placeholders, 8])
  np.testing.assert_array_equal(row["encoder_positions"], [0, 1, 2, 3, 4, 0, 1, 2, 3])
  np.testing.assert_array_equal(row["decoder_target_tokens"], [7, 9])


@contextlib.contextmanager
def compilation_cache(directory):
  """A persistent compilation cache in `directory` while active: a job's test compares it with
  the same computation run another way, which then compiles once."""
  from jax.experimental.compilation_cache import compilation_cache as cache  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_compilation_cache_dir", str(directory))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  cache.reset_cache()
  try:
    yield
  finally:
    jax.config.update("jax_compilation_cache_dir", None)
    cache.reset_cache()


def write_export(directory, preset="gpt2_tiny", tokens=None, length=N, seed=1):
  """A base params checkpoint in directory/base and a prompt export over it in directory/prompt
  (the prompt: the token embeddings of `tokens` if given, else its random start). Returns the
  prompted model, its params, and the two directories."""
  from t5x_lite import checkpoints  # pylint: disable=g-import-not-at-top
  base = models.from_gin(preset)
  model = prompt_tuning.PromptTuningModel(base, length=length,
                                          base_checkpoint=str(directory / "base"))
  params = model.init(jax.random.PRNGKey(seed),
                      model.dummy_batch(1, {"inputs": 8, "targets": 8}))
  base_params, prompt = prompt_tuning.split(params)
  if tokens is not None:
    table = prompt_tuning.flat(base_params)["token_embed/embedding"]
    (path,) = prompt_tuning.flat(prompt)
    params = prompt_tuning.join(base_params, {path: table[np.array(tokens)]})
  checkpoints.save_params(str(directory / "base"), base_params, checkpoints.model_gin(base))
  model.save_params(str(directory / "prompt"), params)
  return model, params, str(directory / "base"), str(directory / "prompt")


def test_export_loads_over_its_base_and_generates(tmp_path):
  model, params, base_dir, prompt_dir = write_export(tmp_path)
  config = prompt_tuning.read_prompt_config(prompt_dir)
  assert config["base"] == base_dir and config["length"] == N
  loaded = prompt_tuning.load(prompt_dir)
  np.testing.assert_array_equal(prompt_tuning.flat(loaded.params)["embedder/prompt"],
                                prompt_tuning.flat(params)["embedder/prompt"])
  (text,) = loaded.generate(["ab"], max_new_tokens=3)
  assert isinstance(text, str)
  encode = lambda text: list(loaded.vocabulary.encode(text))
  batch = model.scoring_batch([encode("ab")], [encode("cd")], eos_id=1)
  expected = float(model.score_batch(params, batch)[0])
  assert loaded.score(["ab"], ["cd"])[0] == pytest.approx(expected, rel=1e-5)
  with pytest.raises(FileNotFoundError, match="not a prompt-tuning export"):
    prompt_tuning.load(base_dir)
  with pytest.raises(ValueError, match="quantized runs with a prompt are not built"):
    prompt_tuning.for_checkpoint(model.base, prompt_dir, quantize="int8")


def test_data_cache_with_a_prompt_is_refused_before_any_work(tmp_path):
  from t5x_lite import train  # pylint: disable=g-import-not-at-top
  model = prompt_tuning.PromptTuningModel(models.from_gin("gpt2_tiny"), length=N)
  with pytest.raises(ValueError, match=r"data_cache=.*PromptTuningModel.*placeholder.*"
                                       r"--gin.train.data_cache=None"):
    train.train(model, str(tmp_path / "run"), "stdlib_clm", {"targets": 16}, 10, 8,
                data_cache=str(tmp_path / "cache"))
  assert not (tmp_path / "run").exists()


def test_peft_export_refuses_what_peft_would_compute_otherwise(tmp_path):
  from t5x_lite import checkpoints  # pylint: disable=g-import-not-at-top
  (tmp_path / prompt_tuning.PROMPT_JSON).write_text(json.dumps({"length": N, "base": None}))
  for preset, why in (("t5_tiny", "decoder-only bases.*'encoder_decoder'"),
                      ("gpt2_tiny", "reads its inputs bidirectionally")):
    model = models.from_gin(preset, ["DecoderOnlyModel.inputs_bidirectional_attention = True"]
                            if preset == "gpt2_tiny" else [])
    (tmp_path / "model.gin").write_text(checkpoints.model_gin(model))
    with pytest.raises(ValueError, match=why):
      prompt_tuning.export_peft(str(tmp_path), str(tmp_path / "peft"))
  assert not (tmp_path / "peft").exists()


def test_refusals():
  base = models.from_gin("gpt2_tiny")
  for length in (0, -2, 2.5):
    with pytest.raises(ValueError, match="length"):
      prompt_tuning.PromptTuningModel(base, length=length)
  with pytest.raises(ValueError, match=r"matches no token embedder.*\['embedder'\]"):
    prompt_tuning.PromptTuningModel(base, length=2, embedders="decoder").abstract_params()
  with pytest.raises(ValueError, match="once"):
    prompt_tuning.PromptTuningModel(prompt_tuning.PromptTuningModel(base), length=2)
