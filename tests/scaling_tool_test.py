"""tools/scaling.py: the params / flops / memory / plan sub-commands on gin configs, the sweep's
grid (dry run) and the flags it gives the train job, and its analysis and figure on synthetic
runs whose law is known. The real sweep trains for minutes, so it is not run here."""
import json
import os

import gin
import numpy as np
import pytest

from t5x_lite import scaling

import tool_module  # tests/tool_module.py

tool = tool_module.load("scaling.py", "scaling_tool")


def test_params_of_a_preset(capsys):
  counts = tool.main(["params", "--gin_file=models/gpt2_tiny.gin"])
  assert counts["total"] == 165_632 and counts["non_embedding"] == 165_632 - 65_536
  assert "165,632" in capsys.readouterr().out


def test_params_take_gin_bindings():
  counts = tool.main(["params", "--gin_file=models/llama_tiny.gin",
                      "--gin.TransformerConfig.num_layers=4", "--json"])
  two_layers = tool.main(["params", "--gin_file=models/llama_tiny.gin", "--json"])
  assert counts["non_embedding"] - 64 == 2 * (two_layers["non_embedding"] - 64)  # final norm


def test_flops_per_token_of_a_run_gin():
  data = tool.main(["flops", "--gin_file=runs/quickstart.gin", "--json"])
  assert data["tokens_per_step"] == 8 * 256  # BATCH_SIZE and TASK_FEATURE_LENGTHS of the run
  assert data["flops_per_token"] > data["six_n"]  # attention over 256 positions on top of 6N


def test_memory_on_the_mesh_from_gin():
  data = tool.main(["memory", "--gin_file=models/gpt2_tiny.gin", "--gin.make_mesh.data=4",
                    "--gin.make_mesh.fsdp=2", "--batch_size", "16", "--lengths", "targets=64",
                    "--json"])
  assert data["mesh"]["fsdp"] == 2 and data["mesh"]["data"] == 4
  estimate = data["estimate"]
  assert estimate["total"] == pytest.approx(
      estimate["state"] + estimate["gradients"] + estimate["activations"])
  assert estimate["params"] < estimate["state"]


def test_plan_gives_shapes_and_flags(capsys):
  data = tool.main(["plan", "--flops", "1e21", "--gin_file=models/gpt2_small.gin",
                    "--batch_size", "512", "--lengths", "targets=1024", "--json"])
  assert json.loads(capsys.readouterr().out)["flops"] == 1e21
  assert data["row_tokens"] == 1024 and data["batch_size"] == 512
  for row in data["plans"]:
    assert row["shape_params"] == pytest.approx(row["params"], rel=0.05)
    assert "--gin.BATCH_SIZE=512" in row["gin_flags"]


def test_plan_from_chip_hours():
  data = tool.main(["plan", "--chip_hours", "100", "--chip", "h100", "--mfu", "0.5", "--json"])
  assert data["flops"] == pytest.approx(100 * 3600 * 989e12 * 0.5)


def test_plan_needs_a_budget():
  with pytest.raises(SystemExit, match="--flops"):
    tool.main(["plan", "--chip", "v5p"])
  with pytest.raises(SystemExit, match="--gin_file"):
    tool.main(["params"])


SWEEP = ["sweep", "--sizes", "32x1", "64x2", "--budgets", "1e10", "3e10", "--batch_size", "4",
         "--length", "64"]


def test_sweep_dry_run_prints_the_grid_and_its_flops(capsys):
  runs = tool.main(SWEEP + ["--dry_run"])["runs"]
  assert [r["name"] for r in runs] == ["C1e10_32x1", "C3e10_32x1", "C1e10_64x2", "C3e10_64x2"]
  for run in runs:
    assert run["flops"] == pytest.approx(run["budget"], rel=0.02)
    assert run["tokens"] == run["steps"] * 4 * 64
  assert runs[2]["shape"] == {"num_layers": 2, "d_model": 64, "num_heads": 2, "d_ff": 256}
  assert "total" in capsys.readouterr().out


def test_sweep_flags_configure_the_train_job(tmp_path):
  args, gin_argv = tool.parse_args(SWEEP)
  run = tool.sweep_grid(args, gin_argv)[0]
  flags = tool._job_flags(run, args, gin_argv, str(tmp_path))  # pylint: disable=protected-access
  tool.configure(flags)
  assert gin.query_parameter("%TRAIN_STEPS") == run["steps"]
  assert gin.query_parameter("%MODEL_DIR") == str(tmp_path)
  assert gin.query_parameter("TransformerConfig.d_model") == 32
  assert tool.final_validation_loss(str(tmp_path), run["steps"]) is None  # not trained yet


def test_analysis_and_figure_recover_a_known_law(tmp_path):
  law = scaling.Law("known", E=1.0, A=50.0, B=400.0, alpha=0.35, beta=0.4)
  cost = scaling.FlopsPerToken(k=7.0, p=1.0)
  runs = []
  for budget in (1e11, 1e12, 1e13):
    optimum, _ = scaling.constrained_optimum(law, budget, cost)
    for params in optimum * np.geomspace(0.1, 10, 5):
      tokens = budget / cost(params)
      runs.append({"budget": budget, "params": params, "tokens": tokens,
                   "flops_per_token": cost(params), "loss": float(law.loss(params, tokens))})
  result = tool.analyse(runs, starts=8)
  assert result["law"]["alpha"] == pytest.approx(0.35, abs=0.01)
  assert result["law"]["beta"] == pytest.approx(0.4, abs=0.01)
  for point in result["frontier"]:
    expected, _ = scaling.constrained_optimum(law, point["budget"], cost)
    assert point["params"] == pytest.approx(expected, rel=0.05)
    assert point["isoflop_params"] == pytest.approx(expected, rel=0.3)  # a parabola's vertex
  path = tool.draw(runs, result, str(tmp_path / "isoflop.png"))
  assert os.path.getsize(path) > 10_000
