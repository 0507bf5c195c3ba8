"""tools/benchmark.py (and its runners, tools/benchmark_runners.py): `train` and `decode` run on
the tiny presets (beside HF PyTorch),
with CPU-time figures and, for decode, a thread count shared by both frameworks; the analytic
FLOP count they report agrees with XLA's cost analysis. No time is asserted."""
import json
import os
import sys

import pytest

import tool_module  # tests/tool_module.py

benchmark = tool_module.load("benchmark.py")
# Loading the tool put tools/ on sys.path, where its runners module lives.
import benchmark_runners as runners  # pylint: disable=wrong-import-position


# ---------------------------------------------------------------------------- train and decode

@pytest.mark.parametrize("preset", ["gpt2_tiny", "llama_tiny", "t5_tiny", "bert_tiny"])
def test_analytic_train_flops_are_within_10_percent_of_xla(preset):
  from t5x_lite import models  # pylint: disable=g-import-not-at-top
  model = models.from_gin(preset)
  batch = runners.make_batch(model, 8, {"inputs": 64, "targets": 32})
  shapes = {k: v.shape for k, v in batch.items()}
  xla = runners.xla_train_flops(preset, (), shapes)
  analytic = model.flops_per_step(shapes)
  assert abs(analytic - xla) < 0.1 * xla


def test_named_shapes_are_the_issue_models():
  from t5x_lite import models  # pylint: disable=g-import-not-at-top
  gpt = models.from_gin("gpt2_small", benchmark.SHAPES["gpt-small"].bindings).config
  assert (gpt.num_layers, gpt.d_model, gpt.num_heads, gpt.vocab_size) == (6, 512, 8, 32000)
  t5 = models.from_gin("t5_1_1_small", benchmark.SHAPES["t5-small"].bindings).config
  assert (t5.num_layers, t5.resolved_num_decoder_layers, t5.d_ff) == (6, 6, 1024)
  assert benchmark.SHAPES["t5-small"].lengths == {"inputs": 256, "targets": 64}
  moe = models.from_gin("mixtral_tiny", benchmark.SHAPES["moe-small"].bindings).config
  assert (moe.num_layers, moe.d_model, moe.num_experts, moe.num_experts_per_token, moe.d_ff) == (
      6, 512, 8, 2, 1024)
  assert benchmark.SHAPES["moe-small"].batch_size == 8
  assert benchmark.SHAPES["moe-small"].lengths == {"targets": 256}


def test_bert_batches_carry_the_loss_on_15_percent_in_both_frameworks():
  from t5x_lite import models  # pylint: disable=g-import-not-at-top
  batch = runners.make_batch(models.from_gin("bert_tiny"), 8, {"inputs": 256})
  assert 0.1 < batch["encoder_loss_weights"].mean() < 0.2
  hf = runners.hf_batch(batch)
  assert ((hf["labels"] != -100) == (batch["encoder_loss_weights"] > 0)).all()
  assert runners.token_counts(batch) == (batch["encoder_loss_weights"].sum(), 8 * 256)


@pytest.fixture
def one_device(monkeypatch):
  """The tool's child processes see one CPU device (as a user's run does), not the 8 simulated
  ones of the test harness: compiling for one is much faster."""
  monkeypatch.setenv("XLA_FLAGS", "")


def test_train_runs_a_tiny_preset_beside_hf(tmp_path, one_device):
  """The `lora` variant (the JaxTrain runner with adapters; the full step's FLOP count is
  test_analytic_train_flops_are_within_10_percent_of_xla's) beside HF eager."""
  path = str(tmp_path / "train.json")
  rows = benchmark.main(["train", "--shapes", "t5_tiny", "--variants", "lora", "--compare", "hf",
                         "--rounds", "1", "--steps", "1", "--warmup", "0", "--alone", "--json",
                         path])
  assert [(r["shape"], r["impl"]) for r in rows] == [("t5_tiny", "t5x_lite"), ("t5_tiny", "hf")]
  for row in rows:
    assert row["step_s"] > 0 and row["tokens_per_s"] > 0 and row["mfu"] > 0
    assert row["rss_gib"] > 0
    assert row["alternating_over_alone"] == pytest.approx(row["step_s"] / row["alone_step_s"])
  ours, hf = rows
  assert 0 < ours["xla_temp_gib"] < ours["xla_peak_gib"]  # XLA's analysis of the compiled step
  # Adapters alone train: no weight-gradient matmuls for the frozen kernels. XLA counts 0.81x
  # the full step's analytic FLOPs here (weight matmuls 2x forward instead of 3x; attention's
  # score matmuls, which have no weights, 3x in both); with the frozen kernels' gradients it
  # would count at least the full step's, within 10% of the analytic count (the test above).
  assert 0.5 * ours["gflop_per_step"] < ours["xla_gflop_per_step"] < 0.85 * ours["gflop_per_step"]
  assert 0 < ours["trainable_params"] < 0.2 * hf["trainable_params"]  # t5_tiny: 10.7%
  assert ours["vs"]["hf"] > 0
  # 8 rows x 64 encoder + 8 x 64 decoder tokens; the loss is on the 8 x 64 targets.
  assert ours["tokens_per_s"] == pytest.approx(ours["target_tokens_per_s"] * 2)
  with open(path) as f:
    report = json.load(f)
  assert report["command"].startswith("python tools/benchmark.py train --shapes t5_tiny")
  assert [r["impl"] for r in report["results"]] == ["t5x_lite", "hf"]


def test_hf_peft_peer_trains_the_attention_adapters_alone():
  """The hf-peft runner in this process (no worker): PEFT LoRA on GPT-2's attention (fused
  c_attn and its c_proj, not the MLP's), the optimizer holding the adapters alone."""
  from t5x_lite import models  # pylint: disable=g-import-not-at-top
  model = models.from_gin("gpt2_tiny")
  batch = runners.hf_batch(runners.make_batch(model, 2, {"targets": 16}))
  peer = runners.TorchTrain(runners._hf_config(model.config), batch, False, 0,  # pylint: disable=protected-access
                            benchmark.LORA)
  names = [n for n, p in peer.model.named_parameters() if p.requires_grad]
  layers = model.config.num_layers
  assert len(names) == 2 * 2 * layers and all("lora_" in n and ".attn." in n for n in names)
  before = [p.detach().clone() for p in peer.params]
  peer.run(1)
  assert any(not (a == b).all() for a, b in zip(before, peer.params))


@pytest.mark.parametrize("preset", ["t5_tiny", "llama_tiny"])
def test_hf_peer_of_an_untied_model_has_its_own_head(preset):
  """transformers 5 ties the head of any model built from a config; the peer of an untied
  model (T5 v1.1, LLaMA) gets its own, so both sides train the same parameters."""
  from t5x_lite import models  # pylint: disable=g-import-not-at-top
  model = models.from_gin(preset)
  batch = runners.hf_batch(runners.make_batch(model, 2, {"inputs": 8, "targets": 8}))
  peer = runners.TorchTrain(runners._hf_config(model.config), batch, False, 0)  # pylint: disable=protected-access
  head, embedding = peer.model.get_output_embeddings(), peer.model.get_input_embeddings()
  assert head.weight is not embedding.weight
  assert peer.info["trainable_params"] == model.num_params()


def test_hf_bf16_peer_computes_in_bf16_and_keeps_fp32_weights():
  """The hf-bf16 runner: HF eager under torch.autocast bfloat16, as PyTorch users train in mixed
  precision: the projections compute in bf16, the weights and AdamW stay float32."""
  from t5x_lite import models  # pylint: disable=g-import-not-at-top
  model = models.from_gin("gpt2_tiny")
  batch = runners.hf_batch(runners.make_batch(model, 2, {"targets": 16}))
  peer = runners.TorchTrain(runners._hf_config(model.config), batch, False, 0, None, True)  # pylint: disable=protected-access
  seen = []
  head = peer.model.get_output_embeddings()
  head.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
  before = [p.detach().clone() for p in peer.params]
  peer.run(1)
  assert seen == [peer.torch.bfloat16]
  assert all(p.dtype == peer.torch.float32 for p in peer.params)
  assert any(not (a == b).all() for a, b in zip(before, peer.params))


def test_decode_with_one_thread_beside_hf_reports_cpu_time(tmp_path, capsys, one_device):
  path = str(tmp_path / "decode.json")
  rows = benchmark.main(["decode", "--shapes", "gpt2_tiny", "--batch_sizes", "1",
                         "--prompt", "8", "--new_tokens", "4", "--rounds", "1", "--steps", "1",
                         "--warmup", "0", "--compare", "hf", "--threads", "1", "--json", path])
  assert [r["impl"] for r in rows] == ["t5x_lite", "hf"]
  ours, hf = rows
  assert hf["new_tokens"] == 4  # HF never stops early; ours counts the steps it took
  assert ours["batch_size"] == 1 and 1 <= ours["new_tokens"] <= 4
  assert ours["tokens_per_s"] == pytest.approx(ours["new_tokens"] / ours["call_s"])
  for row in rows:
    assert row["threads"] == 1 and row["cpu_s"] >= 0 and len(row["cpu_s_per_round"]) == 1
  assert set(ours["vs"]) == set(ours["vs_cpu"]) == {"hf"}
  # The memory floor: every parameter read once per step at the bandwidth measured beside it.
  assert ours["param_mib"] > 0
  assert ours["read_gb_per_s"] > 0 and ours["ms_per_token"] > 0
  assert ours["floor_ms_per_token"] == pytest.approx(
      1e3 * ours["param_mib"] * 2 ** 20 / (ours["read_gb_per_s"] * 1e9))
  assert "ms_per_token" not in hf
  out = capsys.readouterr().out
  assert "1 CPU thread(s) each" in out and "CPU s" in out and "(CPU time " in out
  assert "| gpt2_tiny | t5x_lite | 1 |" in out  # the markdown table
  with open(path) as f:
    assert [r["threads"] for r in json.load(f)["results"]] == [1, 1]


def test_one_thread_sets_xla_flags_and_torch_threads(monkeypatch):
  """What a decode child does with --threads 1 before it imports JAX or builds HF's model."""
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
  monkeypatch.setattr(runners, "_THREADS", None)
  monkeypatch.delitem(sys.modules, "jax", raising=False)  # as in a fresh child
  runners._limit_threads(1)  # pylint: disable=protected-access
  assert os.environ["XLA_FLAGS"] == ("--xla_force_host_platform_device_count=1 "
                                     "--xla_cpu_multi_thread_eigen=false "
                                     "intra_op_parallelism_threads=1")
  assert runners._THREADS == 1  # pylint: disable=protected-access  # read by _torch_model


def test_unknown_shapes_and_variants_are_refused_with_the_choices():
  with pytest.raises(ValueError, match="gpt-small"):
    benchmark.main(["train", "--shapes", "gpt-smal"])
  with pytest.raises(SystemExit):
    benchmark.main(["train", "--variants", "fastest"])
