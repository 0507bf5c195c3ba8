"""tools/convert_checkpoint.py: the command line a user runs, both directions."""
import importlib.util
import json
import os

import numpy as np
import pytest
import torch
import transformers as tf
from safetensors.numpy import load_file

from t5x_lite import checkpoints, models

_TOOL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools",
                     "convert_checkpoint.py")
_spec = importlib.util.spec_from_file_location("convert_checkpoint", _TOOL)
convert_checkpoint = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(convert_checkpoint)


def _hf_t5(directory):
  config = tf.T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4,
                       feed_forward_proj="gated-gelu", tie_word_embeddings=False)
  torch.manual_seed(0)
  tf.T5ForConditionalGeneration(config).to(torch.bfloat16).save_pretrained(directory)
  return str(directory)


def test_from_hf_then_to_hf_on_the_command_line(tmp_path, capsys):
  hf_dir = _hf_t5(tmp_path / "hf")
  ckpt = str(tmp_path / "ckpt")
  convert_checkpoint.main(["--from_hf", hf_dir, "--to", ckpt, "--no-scan_layers",
                           "--dtype", "float32"])
  assert "EncoderDecoderModel" in capsys.readouterr().out
  model = models.from_gin(os.path.join(ckpt, "model.gin"))
  assert (model.config.scan_layers, model.config.param_dtype, model.config.dtype) == (
      False, "bfloat16", "float32")
  params = checkpoints.load_params(ckpt)
  assert "layers_1" in params["decoder"]

  convert_checkpoint.main(["--from", ckpt, "--to_hf", str(tmp_path / "back")])
  before = load_file(os.path.join(hf_dir, "model.safetensors"))
  after = load_file(str(tmp_path / "back" / "model.safetensors"))
  # This transformers saved T5 v1.1's lm_head as tied to `shared`; the export writes it out, so
  # that older transformers (which read tie_word_embeddings=false as untied) load it too.
  assert after.keys() - before.keys() == {"lm_head.weight"}
  assert np.array_equal(after["lm_head.weight"], before["shared.weight"])
  assert all(np.array_equal(before[k], after[k]) and before[k].dtype == after[k].dtype
             for k in before)
  loaded = tf.T5ForConditionalGeneration.from_pretrained(str(tmp_path / "back"))
  assert loaded.dtype == torch.bfloat16


def test_export_of_a_checkpoint_without_the_import_copy_takes_hf_config(tmp_path):
  # A fine-tuning run's MODEL_DIR has params/ and model.gin only; token ids come from --hf_config.
  hf_dir = _hf_t5(tmp_path / "hf")
  ckpt = str(tmp_path / "ckpt")
  convert_checkpoint.main(["--from_hf", hf_dir, "--to", ckpt])
  os.remove(os.path.join(ckpt, "hf_config.json"))
  convert_checkpoint.main(["--from", ckpt, "--to_hf", str(tmp_path / "plain")])
  with open(tmp_path / "plain" / "config.json") as f:
    assert "eos_token_id" not in json.load(f)
  convert_checkpoint.main(["--from", ckpt, "--to_hf", str(tmp_path / "back"), "--hf_config",
                           os.path.join(hf_dir, "config.json")])
  with open(tmp_path / "back" / "config.json") as f:
    config = json.load(f)
  assert (config["eos_token_id"], config["pad_token_id"], config["d_model"]) == (1, 0, 16)
  with pytest.raises(FileNotFoundError, match="No config.json at"):
    convert_checkpoint.main(["--from", ckpt, "--to_hf", str(tmp_path / "x"), "--hf_config",
                             str(tmp_path / "nowhere.json")])


@pytest.mark.parametrize("argv,message", [
    (["--from_hf", "a"], "either --from_hf DIR --to DIR"),
    (["--from_hf", "a", "--to_hf", "b"], "either --from_hf DIR --to DIR"),
    (["--from", "a", "--to_hf", "b", "--dtype", "bfloat16"], "--dtype apply to import"),
    (["--from_hf", "a", "--to", "b", "--hf_config", "c"], "--hf_config applies to export"),
    (["--from", "a", "--to_hf", "b", "--quantize", "int8"], "--quantize writes --to DIR"),
    (["--from", "a", "--to_hf", "b", "--group_size", "64"], "apply with --quantize"),
])
def test_bad_command_lines_say_what_to_give(argv, message, capsys):
  with pytest.raises(SystemExit):
    convert_checkpoint.main(argv)
  assert message in capsys.readouterr().err


def test_export_without_model_gin_says_what_is_missing(tmp_path):
  os.makedirs(tmp_path / "ckpt" / "params")
  with pytest.raises(FileNotFoundError, match="No model.gin"):
    convert_checkpoint.main(["--from", str(tmp_path / "ckpt"), "--to_hf", str(tmp_path / "hf")])


def test_a_converted_gpt2_generates_what_the_transformers_pipeline_does(tmp_path):
  # The seeds' first example, offline: a random GPT-2 saved with a locally trained tokenizer.
  from hf_tokenizer_test import gpt2_tokenizer  # pylint: disable=g-import-not-at-top
  import t5x_lite  # pylint: disable=g-import-not-at-top
  hf_dir = gpt2_tokenizer(tmp_path / "hf")
  tokenizer = tf.AutoTokenizer.from_pretrained(hf_dir)
  config = tf.GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2,
                         n_head=4, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
  torch.manual_seed(0)
  hf_model = tf.GPT2LMHeadModel(config).eval()
  hf_model.save_pretrained(hf_dir)
  ckpt = str(tmp_path / "ckpt")
  convert_checkpoint.main(["--from_hf", hf_dir, "--to", ckpt])
  assert os.path.isfile(os.path.join(ckpt, "tokenizer.json"))
  with open(os.path.join(ckpt, "model.gin")) as f:
    gin_text = f.read()
  assert "HF_TOKENIZER = 'tokenizer.json'" in gin_text and "EOS_ID = 400" in gin_text
  assert "BOS_ID = 400" in gin_text and "PAD_ID = None" in gin_text

  prompts = ["The capital of France is", "def f(x):\n    return x ±"]
  generator = tf.pipeline("text-generation", model=hf_model, tokenizer=tokenizer, device="cpu")
  expected = [generator(p, max_new_tokens=12, do_sample=False, return_full_text=False,
                        pad_token_id=tokenizer.eos_token_id)[0]["generated_text"]
              for p in prompts]
  loaded = t5x_lite.load(ckpt)
  assert loaded.eos_id == 400 and loaded.vocabulary.kind == "hf_tokenizer"
  assert loaded.generate(prompts, max_new_tokens=12) == expected
  # An EOS of the caller's choice ends the text where that token first comes.
  ids = tokenizer(prompts[0]).input_ids
  greedy = hf_model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)[0, len(ids):].tolist()
  stop = greedy[3]
  cut = tokenizer.decode(greedy[:greedy.index(stop)], skip_special_tokens=True)
  assert loaded.generate(prompts[:1], max_new_tokens=12, eos_id=stop) == [cut]
  # Scores are transformers' log-likelihoods of the continuation too.
  with torch.no_grad():
    logits = hf_model(torch.tensor([ids + greedy[:4]])).logits[0].log_softmax(-1)
  hf_score = sum(float(logits[len(ids) - 1 + t, tok]) for t, tok in enumerate(greedy[:4]))
  target = tokenizer.decode(greedy[:4])
  assert tokenizer(target, add_special_tokens=False).input_ids == greedy[:4]
  np.testing.assert_allclose(loaded.score(prompts[:1], [target]), [hf_score], rtol=1e-4)


def test_a_checkpoint_without_a_tokenizer_says_so(tmp_path):
  import t5x_lite  # pylint: disable=g-import-not-at-top
  hf_dir = _hf_t5(tmp_path / "hf")
  ckpt = str(tmp_path / "ckpt")
  with pytest.warns(UserWarning, match="has no tokenizer.*save_pretrained"):
    convert_checkpoint.main(["--from_hf", hf_dir, "--to", ckpt])
  with open(os.path.join(ckpt, "model.gin")) as f:
    gin_text = f.read()
  # T5's ids come from its config.json: EOS 1, PAD 0, the decoder starts at 0.
  assert "HF_TOKENIZER = None" in gin_text and "EOS_ID = 1" in gin_text
  assert "DECODER_START_ID = 0" in gin_text
  with pytest.warns(UserWarning, match="without its tokenizer.*falls back to bytes"):
    with pytest.raises(ValueError, match="does not fit.*tokenizer.json"):  # 64 ids < 360 bytes
      t5x_lite.load(ckpt)


def test_refusals_are_printed_without_a_traceback(tmp_path, capsys):
  os.makedirs(tmp_path / "hf")
  assert convert_checkpoint.run(["--from_hf", str(tmp_path / "hf"), "--to",
                                 str(tmp_path / "out")]) == 2
  err = capsys.readouterr().err
  assert err.startswith("convert_checkpoint.py: error: No config.json in")
  assert "Traceback" not in err
