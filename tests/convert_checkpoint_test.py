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
])
def test_bad_command_lines_say_what_to_give(argv, message, capsys):
  with pytest.raises(SystemExit):
    convert_checkpoint.main(argv)
  assert message in capsys.readouterr().err


def test_export_without_model_gin_says_what_is_missing(tmp_path):
  os.makedirs(tmp_path / "ckpt" / "params")
  with pytest.raises(FileNotFoundError, match="No model.gin"):
    convert_checkpoint.main(["--from", str(tmp_path / "ckpt"), "--to_hf", str(tmp_path / "hf")])
