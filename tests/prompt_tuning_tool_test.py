"""tools/prompt_tuning.py to-peft: a soft prompt exported for the base exported to Hugging Face
loads in peft.PeftModel and gives our prompt-tuned model's logits on the real tokens (PEFT puts
its virtual tokens first, so the export's first one is our BOS: positions match)."""
import json
import os
import sys

import jax
import numpy as np
import pytest

from t5x_lite import prompt_tuning
from t5x_lite.interop import hf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from prompt_tuning_test import write_export  # noqa: E402  pylint: disable=wrong-import-position
import tool_module  # noqa: E402  tests/tool_module.py

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tool():
  return tool_module.load("prompt_tuning.py", "prompt_tuning_tool")


def test_peft_reads_our_prompt_with_our_logits_on_the_real_tokens(tmp_path):
  model, params, base_dir, prompt_dir = write_export(tmp_path, "gpt2_tiny", length=4)
  base_params, _ = prompt_tuning.split(params)
  hf.export_hf(model.base, base_params, str(tmp_path / "hf"))
  _tool().main(["to-peft", prompt_dir, "--out", str(tmp_path / "peft")])
  config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
  assert config["peft_type"] == "PROMPT_TUNING" and config["num_virtual_tokens"] == 4 + 1

  text = np.random.default_rng(0).integers(1, model.config.vocab_size, (2, 7)).astype(np.int32)
  virtual = [0] + prompt_tuning.placeholder_ids(4)  # BOS, then the prompt
  tokens = np.concatenate([np.tile(virtual, (2, 1)), text], axis=1).astype(np.int32)
  ours = np.asarray(jax.jit(model.logits)(params, {name: tokens for name in
                                                   model.base.REQUIRED_FEATURES}))[:, 5:]
  hf_model = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "hf")).eval()
  with torch.no_grad():
    plain = hf_model(input_ids=torch.tensor(text, dtype=torch.long)).logits.numpy()
    prompted = peft.PeftModel.from_pretrained(hf_model, str(tmp_path / "peft")).eval()(
        input_ids=torch.tensor(text, dtype=torch.long)).logits.numpy()
  assert prompted.shape[1] == 5 + 7  # PEFT returns the virtual positions' logits too
  assert np.abs(prompted[:, 5:] - plain).max() > 1e-2  # PEFT read the prompt
  np.testing.assert_allclose(prompted[:, 5:], ours, atol=1e-4, rtol=0)
