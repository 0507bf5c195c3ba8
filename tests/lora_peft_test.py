"""PEFT interop: adapters exported for the HF base load in peft.PeftModel with our logits, and
PEFT adapters import back exactly; unsupported PEFT options are refused."""
import json
import os
import sys

import jax
import numpy as np
import pytest

from t5x_lite import checkpoints, lora, lora_peft, models
from t5x_lite.interop import hf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lora_test import host_params  # noqa: E402  pylint: disable=wrong-import-position

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("preset,hf_class", [("llama_tiny", "LlamaForCausalLM"),
                                             ("gpt2_tiny", "GPT2LMHeadModel")])
def test_peft_loads_our_adapters_with_our_logits_and_they_import_back(tmp_path, preset,
                                                                      hf_class):
  base = models.from_gin(preset)
  model = lora.LoraModel(base, rank=4, alpha=8.0, targets=lora.ATTENTION_AND_MLP,
                         base_checkpoint=str(tmp_path / "base"))
  params = host_params(model, adapters_b=0.05)
  base_params, adapters = lora.split(params)
  checkpoints.save_params(str(tmp_path / "base"), base_params, checkpoints.model_gin(base))
  lora.save_adapters(str(tmp_path / "run"), model, params)
  hf.export_hf(base, base_params, str(tmp_path / "hf"))
  lora_peft.export_peft(str(tmp_path / "run"), str(tmp_path / "peft"))

  ids = np.random.default_rng(0).integers(1, base.config.vocab_size, (2, 8)).astype(np.int32)
  ours = np.asarray(jax.jit(model.logits)(params, {name: ids for name in base.REQUIRED_FEATURES}))
  hf_model = getattr(transformers, hf_class).from_pretrained(str(tmp_path / "hf")).eval()
  with torch.no_grad():
    plain = hf_model(input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy()
    adapted = peft.PeftModel.from_pretrained(hf_model, str(tmp_path / "peft")).eval()(
        input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy()
  assert np.abs(adapted - plain).max() > 1e-2  # PEFT applied the adapters
  np.testing.assert_allclose(adapted, ours, atol=1e-4, rtol=0)

  lora_peft.import_peft(str(tmp_path / "peft"), str(tmp_path / "base"), str(tmp_path / "back"))
  back, config = lora.load_adapters(str(tmp_path / "back"))
  imported = lora.LoraModel(base, rank=config["rank"], alpha=config["alpha"],
                            targets=config["targets"])
  again = jax.jit(imported.logits)(lora.join(base_params, back),
                                   {name: ids for name in base.REQUIRED_FEATURES})
  np.testing.assert_allclose(np.asarray(again), ours, atol=1e-5, rtol=0)


@pytest.mark.parametrize("option,value", [("use_dora", True), ("rank_pattern", {"q_proj": 2}),
                                          ("use_rslora", True)])
def test_unsupported_peft_options_are_refused(tmp_path, option, value):
  (tmp_path / "adapter_config.json").write_text(json.dumps(
      {"peft_type": "LORA", "r": 4, "lora_alpha": 8, option: value, "bias": "none"}))
  with pytest.raises(ValueError, match=rf"PEFT options t5x_lite's LoRA does not reproduce: "
                                       rf"{option}=.*Only plain LoRA"):
    lora_peft.import_peft(str(tmp_path), str(tmp_path), str(tmp_path / "out"))


@pytest.mark.parametrize("preset", ["t5_tiny", "bert_tiny"])
def test_t5_and_bert_adapters_go_to_peft_and_back_unchanged(tmp_path, preset):
  base = models.from_gin(preset)
  model = lora.LoraModel(base, rank=2, targets=lora.ATTENTION_AND_MLP)
  params = host_params(model, adapters_b=0.05)
  base_params, adapters = lora.split(params)
  checkpoints.save_params(str(tmp_path / "base"), base_params, checkpoints.model_gin(base))
  lora.save_adapters(str(tmp_path / "run"), model, params)
  lora_peft.export_peft(str(tmp_path / "run"), str(tmp_path / "peft"))
  config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
  assert config["r"] == 2 and not config["fan_in_fan_out"]
  lora_peft.import_peft(str(tmp_path / "peft"), str(tmp_path / "base"), str(tmp_path / "back"))
  back = lora.flat(lora.load_adapters(str(tmp_path / "back"))[0])
  assert sorted(back) == sorted(lora.flat(adapters))
  for name, value in lora.flat(adapters).items():
    np.testing.assert_array_equal(np.asarray(back[name]), np.asarray(value), err_msg=name)
