"""The lm-evaluation-harness adapter: lm_eval's command line on local tasks (YAML + JSON Lines
written here, few-shot), its log-likelihoods against `model.score_batch`, for a decoder-only and
an encoder-decoder checkpoint on the 8-device mesh."""
import glob
import json
import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local files only; read when datasets loads

# pylint: disable=wrong-import-position
import jax
import numpy as np
import optax
import pytest
from lm_eval.api.instance import Instance
from lm_eval.tasks import TaskManager

from t5x_lite import checkpoints, lm_eval_adapter, models

PATTERN = "abcdabcd|" * 6  # what the decoder learns: few-shot examples separated by "|"
MC_TASK = """\
task: t5x_lite_letters
dataset_path: json
dataset_kwargs:
  data_files:
    train: {train}
    test: {test}
training_split: train
fewshot_split: train
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: choices
doc_to_target: answer
target_delimiter: ""
fewshot_delimiter: "|"
metric_list:
  - metric: acc
"""
GEN_TASK = """\
task: t5x_lite_continue
dataset_path: json
dataset_kwargs:
  data_files:
    train: {train}
    test: {test}
training_split: train
fewshot_split: train
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{choices[answer]}}}}"
target_delimiter: ""
fewshot_delimiter: "|"
generation_kwargs:
  until: ["|"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
"""


def _checkpoint(directory, preset: str, train_steps: int = 0) -> str:
  """A one-layer tiny model (max_length 64), trained `train_steps` on PATTERN, saved."""
  model = models.from_gin(preset, ["TransformerConfig.max_length = 64",
                                   "TransformerConfig.num_layers = 1"]
                          + ["TransformerConfig.num_decoder_layers = 1"] * (preset == "t5_tiny"))
  ids = [ord(c) + 3 for c in PATTERN]  # byte ids are byte + 3
  batch = model.scoring_batch([[]], [ids], eos_id=1)
  # Random parameters of the model's shapes: compiling model.init would cost more CPU-seconds
  # than everything else here.
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map_with_path(
      lambda path, s: ((1.0 if "scale" in jax.tree_util.keystr(path) else 0.0)
                       + 0.05 * rng.standard_normal(s.shape)).astype(s.dtype),
      model.abstract_params(batch)[0])
  optimizer = optax.adam(3e-3)

  @jax.jit
  def train(params):
    def step(carry, _):
      params, opt_state = carry
      grads = jax.grad(lambda p: model.loss_fn(p, batch)[0])(params)
      updates, opt_state = optimizer.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), None
    return jax.lax.scan(step, (params, optimizer.init(params)), None, length=train_steps)[0][0]
  checkpoints.save_params(str(directory), train(params) if train_steps else params,
                          checkpoints.model_gin(model))
  return str(directory)


@pytest.fixture(scope="module")
def gpt_dir(tmp_path_factory):
  return _checkpoint(tmp_path_factory.mktemp("gpt"), "gpt2_tiny", train_steps=60)


@pytest.fixture(scope="module")
def gpt(gpt_dir):
  return lm_eval_adapter.T5xLiteLM(gpt_dir, batch_size=8)  # one model, compiled once


def _task_files(tmp_path) -> str:
  docs = [{"question": "abcdab", "choices": ["cd", "dc", "ba"], "answer": 0}] * 6
  for split, rows in (("train", docs[:4]), ("test", docs[4:])):
    with open(tmp_path / f"{split}.jsonl", "w") as f:
      f.writelines(json.dumps(row) + "\n" for row in rows)
  files = {"train": tmp_path / "train.jsonl", "test": tmp_path / "test.jsonl"}
  (tmp_path / "tasks").mkdir()
  (tmp_path / "tasks" / "letters.yaml").write_text(MC_TASK.format(**files))
  (tmp_path / "tasks" / "continue.yaml").write_text(GEN_TASK.format(**files))
  return str(tmp_path / "tasks")


def test_the_command_line_scores_as_score_batch_does_with_few_shot_examples(gpt, gpt_dir,
                                                                           tmp_path, monkeypatch):
  # The command line indexes lm_eval's thousands of built-in tasks first (~12 CPU-s); this run
  # needs only the local ones.
  init = TaskManager.__init__
  monkeypatch.setattr(TaskManager, "__init__",
                      lambda self, *a, **k: init(self, *a, **{**k, "include_defaults": False}))
  lm_eval_adapter.main([
      "--model", "t5x_lite", "--model_args", f"checkpoint={gpt_dir}", "--tasks",
      "t5x_lite_letters,t5x_lite_continue", "--include_path", _task_files(tmp_path),
      "--num_fewshot", "2", "--batch_size", "8", "--log_samples",
      "--output_path", str(tmp_path / "out")])
  samples = {}
  for path in glob.glob(str(tmp_path / "out" / "*" / "samples_*.jsonl")):
    with open(path) as f:
      samples[os.path.basename(path).split("_2")[0]] = [json.loads(line) for line in f]
  letters, continued = samples["samples_t5x_lite_letters"], samples["samples_t5x_lite_continue"]
  assert len(letters) == 2 and len(continued) == 2
  # Every (context, choice) request: lm_eval's log-likelihood is the model's score_batch.
  pairs = [(a["arg_0"], a["arg_1"]) for s in letters for a in s["arguments"].values()]
  assert all(context.count("|") == 2 for context, _ in pairs)  # two few-shot examples each
  responses = [r for s in letters for r in s["filtered_resps"]]  # written as strings
  encode = lambda texts: [list(gpt.vocab.encode(t)) for t in texts]
  batch = gpt.model.scoring_batch(encode([p[0] for p in pairs]), encode([p[1] for p in pairs]),
                                  gpt.vocab.eos_id)
  np.testing.assert_allclose([float(r[0]) for r in responses],
                             gpt.model.score_batch(gpt.lm.params, batch), rtol=1e-5, atol=1e-5)
  # Trained on the pattern: the right choice is the greedy one, and generation continues it.
  assert [r[1] for r in responses] == ["True", "False", "False"] * 2
  assert [s["filtered_resps"][0] for s in continued] == ["cd", "cd"]


def test_rolling_log_likelihood_covers_every_token_once(gpt):
  text = PATTERN + "xyz" * 30  # 144 bytes: windows of 63 predicted tokens (max_length 64)
  rolling, = gpt.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
  pieces = [("", text[:63]), ("", text[63:126]), (text[144 - 63:126], text[126:])]
  np.testing.assert_allclose(rolling, sum(gpt.lm.score(*zip(*pieces))), rtol=1e-5)
  assert lm_eval_adapter.rolling_windows(list(range(5)), 2) == [([], [0, 1]), ([], [2, 3]),
                                                                 ([3], [4])]


def test_contexts_too_long_lose_their_oldest_tokens(gpt):
  (long_score, _), = gpt.loglikelihood([Instance("loglikelihood", {}, ("z" * 100 + "ab", "cd"),
                                                 0)])
  np.testing.assert_allclose(long_score, gpt.lm.score(["z" * 59 + "ab"], ["cd"])[0], rtol=1e-5)


def test_an_encoder_decoder_scores_the_continuation_without_eos(tmp_path):
  lm = lm_eval_adapter.T5xLiteLM(_checkpoint(tmp_path, "t5_tiny"), batch_size=8)
  requests = [("abcd", "ab"), ("", "xyz"), ("q" * 80, "c")]
  got = [score for score, _ in lm.loglikelihood(
      [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(requests)])]
  sources = [list(lm.vocab.encode(c))[-63:] for c, _ in requests]
  targets = [list(lm.vocab.encode(t)) for _, t in requests]
  batch = lm.model.scoring_batch(sources, targets, lm.vocab.eos_id)
  weights = np.zeros_like(batch["decoder_loss_weights"])
  for row, ids in enumerate(targets):
    weights[row, :len(ids)] = 1  # the continuation's tokens, not the EOS after them
  batch["decoder_loss_weights"] = weights
  np.testing.assert_allclose(got, lm.model.score_batch(lm.lm.params, batch), rtol=1e-5)


def test_a_converted_hf_decoder_scores_and_generates_as_lm_evals_hf_model(tmp_path):
  """lm_eval's own HF model on the original (a random GPT-2 with a locally trained tokenizer,
  no BOS before the context) and ours on the conversion give the same answers."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from lm_eval.models.huggingface import HFLM  # pylint: disable=g-import-not-at-top
  from hf_tokenizer_test import gpt2_tokenizer  # pylint: disable=g-import-not-at-top
  from t5x_lite.interop import hf  # pylint: disable=g-import-not-at-top
  hf_dir = gpt2_tokenizer(tmp_path / "hf")
  config = transformers.GPT2Config(vocab_size=401, n_positions=64, n_embd=32, n_layer=2,
                                   n_head=4, bos_token_id=400, eos_token_id=400)
  torch.manual_seed(0)
  transformers.GPT2LMHeadModel(config).save_pretrained(hf_dir)
  ckpt = str(tmp_path / "ckpt")
  hf.convert_from_hf(hf_dir, ckpt)
  ours = lm_eval_adapter.T5xLiteLM(ckpt, batch_size=8)
  theirs = HFLM(pretrained=hf_dir, device="cpu", batch_size=4, max_length=64)
  # (A context too long for the model keeps one token fewer here than lm_eval's HF model keeps.)
  pairs = [("The capital of France is", " Paris"), ("", "def f(x):"), ("a b c", " d e")]
  requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
  np.testing.assert_allclose([s for s, _ in ours.loglikelihood(requests)],
                             [s for s, _ in theirs.loglikelihood(requests)], rtol=1e-4, atol=1e-4)
  rolling = [Instance("loglikelihood_rolling", {}, ("import os\nprint(os.sep)",), 0)]
  np.testing.assert_allclose(ours.loglikelihood_rolling(rolling),
                             theirs.loglikelihood_rolling(rolling), rtol=1e-4)
  kwargs = {"until": ["\n\n"], "max_gen_toks": 6, "do_sample": False}
  generate = [Instance("generate_until", {}, (p, kwargs), i)
              for i, p in enumerate(["The capital of France is", "def f(x):"])]
  assert ours.generate_until(generate) == theirs.generate_until(generate)


def test_bad_model_arguments_say_what_to_pass(tmp_path):
  with pytest.raises(ValueError, match="needs a checkpoint: --model_args checkpoint=DIR"):
    lm_eval_adapter.T5xLiteLM()
  with pytest.raises(ValueError, match="--batch_size 'auto': the t5x_lite model takes a whole"):
    lm_eval_adapter.T5xLiteLM(str(tmp_path), batch_size="auto")
  with pytest.raises(ValueError, match="--batch_size 4 is not divisible by data x fsdp = 8"):
    lm_eval_adapter.T5xLiteLM(str(tmp_path), batch_size=4)
