"""The notebook API on params checkpoints written here: t5x_lite.load -> generate / score /
fill_mask, with the byte vocabulary."""
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

import t5x_lite
from t5x_lite import checkpoints, models

PATTERN = "abcd" * 40


def _save(directory, model, params):
  checkpoints.save_params(str(directory), params, checkpoints.model_gin(model))
  return str(directory)


@pytest.fixture(scope="module")
def gpt_dir(tmp_path_factory):
  """gpt2_tiny trained until it continues "abcd" repeated."""
  model = models.from_gin("gpt2_tiny")
  ids = np.array([[0] + [ord(c) + 3 for c in PATTERN]], np.int32)  # Byte ids are byte + 3.
  batch = {"decoder_input_tokens": ids[:, :-1], "decoder_target_tokens": ids[:, 1:],
           "decoder_loss_weights": np.ones_like(ids[:, 1:])}
  params = jax.jit(model.init)(jax.random.PRNGKey(0), batch)
  optimizer = optax.adam(3e-3)

  @jax.jit
  def train(params):
    def step(carry, _):
      params, opt_state = carry
      grads = jax.grad(lambda p: model.loss_fn(p, batch)[0])(params)
      updates, opt_state = optimizer.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), None
    return jax.lax.scan(step, (params, optimizer.init(params)), None, length=60)[0][0]
  return _save(tmp_path_factory.mktemp("gpt"), model, train(params))


@pytest.fixture(scope="module")
def gpt(gpt_dir):
  return t5x_lite.load(gpt_dir)  # One model (and its compiled decoders) for the tests below.


def test_import_is_cheap_and_load_is_imported_on_first_use():
  code = ("import sys, t5x_lite; heavy = [m for m in ('jax', 'tensorflow') if m in sys.modules]; "
          "assert not heavy, heavy; assert callable(t5x_lite.load)")
  subprocess.run([sys.executable, "-c", code], check=True,
                 env=dict(os.environ, JAX_PLATFORMS="cpu"))


def test_generate_continues_the_learned_pattern(gpt):
  assert gpt.generate(["abcdab", "cd"], max_new_tokens=10) == ["cdabcdabcd", "abcdabcdab"]
  samples = gpt.generate(["abcdab"], max_new_tokens=6, temperature=0.5, top_k=2,
                         num_decodes=3, seed=1)
  assert len(samples) == 1 and len(samples[0]) == 3 and all(len(s) == 6 for s in samples[0])
  assert gpt.generate(["abcdab"], max_new_tokens=6, beam_size=2)[0][0] == "cdabcd"


def test_score_follows_the_chain_rule_and_prefers_the_pattern(gpt):
  conditional, wrong = gpt.score(["abcdab", "abcdab"], ["cdab", "dcba"])
  joint, prefix = gpt.score(["", ""], ["abcdabcdab", "abcdab"])
  np.testing.assert_allclose(conditional, joint - prefix, rtol=1e-4, atol=1e-3)
  assert conditional > wrong and conditional > -1.0


def test_long_prompts_and_bad_decoding_parameters_are_refused(gpt):  # max_length 512
  with pytest.raises(ValueError, match="Text 0 is 600 tokens long; with max_new_tokens=20"):
    gpt.generate(["x" * 600], max_new_tokens=20)
  with pytest.raises(ValueError, match="temperature must be >= 0"):
    gpt.generate(["abc"], temperature=-1.0)
  with pytest.raises(ValueError, match="fill_mask needs an encoder-only"):
    gpt.fill_mask("a[MASK]c")
  with pytest.raises(ValueError, match=r"max_new_tokens=600: this model holds at most "
                                       r"max_length=512 tokens, so ask for 1 to 512"):
    gpt.generate(["abc"], max_new_tokens=600)
  with pytest.raises(ValueError, match=r"generate got no prompts"):
    gpt.generate([])
  with pytest.raises(ValueError, match=r"score takes two lists of the same length, at least one"):
    gpt.score([], [])


def test_loading_a_train_state_checkpoint_says_how_to_export_it(tmp_path):
  os.makedirs(tmp_path / "checkpoints" / "40" / "state")
  os.makedirs(tmp_path / "checkpoints" / "60" / "state")
  with pytest.raises(FileNotFoundError, match=r"checkpoints/60' is a train-state checkpoint .*"
                                              r"--gin.TRAIN_STEPS=60"):
    t5x_lite.load(str(tmp_path / "checkpoints" / "60"))
  with pytest.raises(FileNotFoundError, match=r"a run that has not exported its parameters "
                                              r"yet.*--gin.TRAIN_STEPS=60 to export the newest"):
    t5x_lite.load(str(tmp_path))
  with pytest.raises(FileNotFoundError, match=r"has no model.gin"):
    t5x_lite.load(str(tmp_path / "checkpoints" / "40" / "state"))


def test_encoder_decoder_generates_the_same_text_alone_or_batched(tmp_path):
  model = models.from_gin("t5_tiny")
  params = jax.jit(model.init)(jax.random.PRNGKey(0),
                               model.dummy_batch(1, {"inputs": 8, "targets": 8}))
  m = t5x_lite.load(_save(tmp_path, model, params))
  batched = m.generate(["translate: hello", "hi"], max_new_tokens=8)
  assert m.generate(["hi"], max_new_tokens=8) == batched[1:]
  assert len(m.score(["hi"], ["there"])) == 1


def test_fill_mask_returns_the_encoders_top_tokens_as_text(tmp_path):
  model = models.from_gin("bert_tiny")
  params = jax.jit(model.init)(jax.random.PRNGKey(0), model.dummy_batch(1, {"inputs": 8}))
  params["mlm_bias"] = params["mlm_bias"].at[ord("z") + 3].set(50.0)  # Force "z" everywhere.
  m = t5x_lite.load(_save(tmp_path, model, params))
  predictions = m.fill_mask("pi[MASK]a and [MASK]", top_k=3)
  assert len(predictions) == 2 and all(len(p) == 3 for p in predictions)
  assert predictions[0][0]["text"] == "z" and predictions[0][0]["prob"] > 0.99
  assert predictions[1][0]["token"] == ord("z") + 3
  with pytest.raises(ValueError, match="put \\[MASK\\] where"):
    m.fill_mask("no mask here")
  with pytest.raises(ValueError, match="use fill_mask"):
    m.generate(["pizza"])


def test_a_vocabulary_the_model_cannot_hold_is_refused(tmp_path):
  model = models.from_gin("gpt2_tiny", ["TransformerConfig.vocab_size = 256"])
  params = jax.jit(model.init)(jax.random.PRNGKey(0), model.dummy_batch(1, {"targets": 4}))
  directory = _save(tmp_path, model, params)
  with pytest.raises(ValueError, match="360 ids.*vocab_size=256.*not the vocabulary"):
    t5x_lite.load(directory)
  with open(os.path.join(directory, "config.gin"), "w") as f:  # What a training run leaves.
    f.write("get_vocabulary.kind = 'sentencepiece'\n"
            "get_vocabulary.spm_path = '/nonexistent.model'\n")
  with pytest.raises(FileNotFoundError, match="nonexistent.model"):
    t5x_lite.load(directory)
  with open(os.path.join(directory, "sentencepiece.model"), "wb") as f:  # The run's copy.
    f.write(b"a SentencePiece model")
  with pytest.raises(FileNotFoundError, match=r"nonexistent.model.*kept a copy.*vocabulary="
                                              r"'.*sentencepiece.model'"):
    t5x_lite.load(directory)


def _bert_dir(directory):
  model = models.from_gin("bert_tiny")
  params = jax.jit(model.init)(jax.random.PRNGKey(0), model.dummy_batch(1, {"inputs": 8}))
  return _save(directory, model, params)


def test_load_generate_score_and_fill_mask_never_import_tensorflow(gpt_dir, tmp_path):
  code = ("import sys, t5x_lite\n"
          f"gpt = t5x_lite.load({gpt_dir!r})\n"
          "assert gpt.generate(['abcdab'], max_new_tokens=4) == ['cdab']\n"
          "gpt.score(['ab'], ['cd'])\n"
          f"t5x_lite.load({_bert_dir(tmp_path)!r}).fill_mask('a[MASK]c', top_k=1)\n"
          "heavy = [m for m in ('tensorflow', 'seqio') if m in sys.modules]\n"
          "assert not heavy, heavy\n")
  subprocess.run([sys.executable, "-c", code], check=True,
                 env=dict(os.environ, JAX_PLATFORMS="cpu"))


def test_load_takes_a_seqio_vocabulary_or_a_sentencepiece_path(gpt_dir, tmp_path):
  import seqio  # pylint: disable=g-import-not-at-top
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  from t5x_lite import loaded_model, vocabulary  # pylint: disable=g-import-not-at-top
  m = t5x_lite.load(gpt_dir, vocabulary=seqio.ByteVocabulary(extra_ids=101))
  assert isinstance(m.vocabulary, seqio.ByteVocabulary)
  assert m.generate(["abcdab"], max_new_tokens=4) == ["cdab"]
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter([PATTERN, "def f(x): return x"] * 50),
      model_prefix=str(tmp_path / "s"),
      vocab_size=300, hard_vocab_limit=False, byte_fallback=True, pad_id=0, eos_id=1, unk_id=2,
      bos_id=-1, minloglevel=2)
  path = str(tmp_path / "s.model")
  m = t5x_lite.load(gpt_dir, vocabulary=path)
  assert isinstance(m.vocabulary, vocabulary.SentencePieceVocabulary)
  assert m.vocabulary.extra_ids == 100 and m.vocabulary.decode(m.vocabulary.encode("abc")) == "abc"
  # A checkpoint holding a copy of the model (as a training run keeps it) records the same one.
  copy = str(tmp_path / "ckpt")
  shutil.copytree(gpt_dir, copy)
  shutil.copyfile(path, os.path.join(copy, loaded_model.SPM_FILE))
  trained = loaded_model.checkpoint_vocabulary(copy)
  assert vocabulary.same(trained, seqio.SentencePieceVocabulary(path, extra_ids=100))
  assert not vocabulary.same(trained, seqio.SentencePieceVocabulary(path, extra_ids=10))


def test_a_prompt_export_loads_as_its_base_with_the_prompt_in_front(tmp_path):
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from prompt_tuning_test import write_export  # pylint: disable=g-import-not-at-top
  # A prompt equal to the embeddings of "abc" reads as "abc" written before the text.
  _, _, base_dir, prompt_dir = write_export(tmp_path, "gpt2_tiny", [ord(c) + 3 for c in "abc"])
  prompted, base = t5x_lite.load(prompt_dir), t5x_lite.load(base_dir)
  assert type(prompted.model).__name__ == "PromptTuningModel"
  np.testing.assert_allclose(prompted.score(["de", "d"], ["fg", "e"]),
                             base.score(["abcde", "abcd"], ["fg", "e"]), rtol=1e-5)
