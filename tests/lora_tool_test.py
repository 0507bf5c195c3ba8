"""LoRA end to end: a train job with runs/lora_finetune.gin over a base checkpoint trains the
adapters alone and exports them; tools/lora.py merges them (and refuses to twice, or into a base
of other shapes) and counts their optimizer state."""
import json
import os
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from t5x_lite import checkpoints, launch, lora, models
from t5x_lite import train as train_lib

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tools"))
import lora as lora_tool  # noqa: E402  pylint: disable=wrong-import-position

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lora_test import host_params, random_batch  # noqa: E402  pylint: disable=wrong-import-position

JOB = ["stdlib_corpus.max_files = 20", "TASK_FEATURE_LENGTHS = {'targets': 32}", "BATCH_SIZE = 8",
       "MIXTURE_OR_TASK_NAME = 'stdlib_clm'", "make_mesh.data = 2", "make_mesh.fsdp = 2",
       "make_mesh.tensor = 2", "TRAIN_STEPS = 1", "train.log_every = 1", "train.eval_batches = 0", "LoraModel.rank = 4",
       "create_schedule.peak_value = 0.01"]


def save_base(directory, preset, bindings=()):
  base = models.from_gin(preset, bindings)
  checkpoints.save_params(str(directory), host_params(base), checkpoints.model_gin(base))
  return directory


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
  """One LoRA step over a gpt2_tiny base: (base dir, run dir)."""
  base_dir = save_base(tmp_path_factory.mktemp("base"), "gpt2_tiny")
  run_dir = tmp_path_factory.mktemp("lora_run")
  launch.configure([str(base_dir / "model.gin"), "runs/lora_finetune.gin"],
                   [f"MODEL_DIR = '{run_dir}'", f"INITIAL_CHECKPOINT_PATH = '{base_dir}'"] + JOB)
  train_lib.train()
  return base_dir, run_dir


def test_the_job_trains_and_exports_only_adapters_naming_the_base(lora_run):
  base_dir, run_dir = lora_run
  assert not os.path.exists(run_dir / "params")  # no full copy of the base
  record = json.loads((run_dir / "adapter.json").read_text())
  assert record["base"] == str(base_dir) and record["rank"] == 4 and record["alpha"] == 16.0
  assert sorted(record["kernels"])[0] == "decoder/layers/self_attention/key/kernel"
  adapters, _ = lora.load_adapters(str(run_dir))
  for name, value in lora.flat(adapters).items():
    assert lora.is_adapter(name) and np.abs(np.asarray(value)).max() > 0, name  # B trained
  # After the step the base is bitwise the checkpoint's, and the optimizer holds state for the
  # adapters alone.
  state_dir = str(run_dir / "checkpoints" / "1" / "state")
  base_params = checkpoints.load_params(str(base_dir))
  after = lora.flat(checkpoints.load_train_state_params(state_dir, lora.join(
      base_params, adapters)))
  for name, value in lora.flat(base_params).items():
    np.testing.assert_array_equal(np.asarray(after[name]), np.asarray(value), err_msg=name)
  for name, value in lora.flat(adapters).items():
    np.testing.assert_array_equal(np.asarray(after[name]), np.asarray(value), err_msg=name)
  state = ocp.StandardCheckpointer().metadata(state_dir).item_metadata.tree
  moments = sorted(tuple(x.shape) for x in jax.tree.leaves(state["opt_state"]) if x.shape)
  assert moments == sorted([tuple(x.shape) for x in lora.flat(adapters).values()] * 2)
  size = sum(f.stat().st_size for f in (run_dir / "adapters").rglob("*") if f.is_file())
  base_size = sum(f.stat().st_size for f in (base_dir / "params").rglob("*") if f.is_file())
  assert size < base_size / 4


def test_merge_gives_the_adapted_logits_and_refuses_twice(lora_run, tmp_path):
  base_dir, run_dir = lora_run
  out = lora_tool.main(["merge", str(run_dir), "--out", str(tmp_path / "merged")])
  base = models.from_gin(str(base_dir / "model.gin"))
  model = lora.LoraModel(base, rank=4)
  batch = random_batch(base)
  unmerged = lora.join(checkpoints.load_params(str(base_dir)), lora.load_adapters(str(run_dir))[0])
  merged = checkpoints.load_params(out)
  adapted, merged_logits = jax.jit(lambda u, m: (model.logits(u, batch), base.logits(m, batch)))(
      unmerged, merged)
  np.testing.assert_allclose(merged_logits, adapted, atol=1e-5)
  with pytest.raises(SystemExit, match=r"already merged into .*merged \(its lora_merged.json"):
    lora_tool.main(["merge", str(run_dir), "--base", out, "--out", str(tmp_path / "twice")])


def test_adapters_over_a_base_of_other_shapes_are_refused_naming_both(lora_run, tmp_path):
  _, run_dir = lora_run
  other = save_base(tmp_path / "wide", "gpt2_tiny", ["TransformerConfig.d_model = 32"])
  with pytest.raises(SystemExit, match=r"The adapters in .*lora_run.* were trained on a base of "
                     r"other shapes than .*wide: decoder/layers/self_attention/key/kernel: "
                     r"adapters \(2, 64, 4, 16\), base \(2, 32, 4, 8\)"):
    lora_tool.main(["merge", str(run_dir), "--base", str(other), "--out", str(tmp_path / "o")])


def test_memory_counts_the_optimizer_state_of_adapters_and_of_everything(capsys):
  report = lora_tool.main(["memory", "--gin_file=models/llama_tiny.gin", "--rank", "4"])
  # Per layer: q A 64x4 + B 4x64, k and v A 64x4 + B 4x32, out A 64x4 + B 4x64; two layers.
  assert report["lora_params"] == 2 * (2 * 512 + 2 * 384)
  # AdamW: two float32 moments per trainable parameter, plus its step counts.
  assert 0 < report["lora_optimizer_bytes"] - 8 * report["lora_params"] <= 16
  assert 0 < report["full_optimizer_bytes"] - 8 * report["full_params"] <= 16
  assert "| LoRA | 3,584 |" in capsys.readouterr().out


def test_the_run_gin_uses_the_library_regexes():
  text = open(os.path.join(models.PRESET_DIR, "..", "runs", "lora_finetune.gin")).read()
  for name in ("ATTENTION", "MLP", "ATTENTION_AND_MLP", "TRAINABLE"):
    assert f"LORA_{name} = '{getattr(lora, name)}'" in text, name
