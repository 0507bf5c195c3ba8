"""tools/benchmark.py attention (runner: tools/benchmark_attention.py): one tiny length, both
implementations compiled, measured and reported; bad flags refused. Speeds are not asserted."""
import json

import pytest

import tool_module  # tests/tool_module.py

benchmark = tool_module.load("benchmark.py")


def test_attention_rows_for_both_implementations(tmp_path, capsys):
  path = str(tmp_path / "attention.json")
  rows = benchmark.main(["attention", "--lengths", "96", "--rounds", "1", "--heads", "2",
                         "--kv_heads", "1", "--head_dim", "8", "--block", "32", "--json", path])
  assert [(r["length"], r["impl"]) for r in rows] == [(96, "xla"), (96, "blockwise")]
  assert all(r["temp_bytes"] > 0 and r["seconds"] > 0 and r["speed_vs_xla"] > 0 for r in rows)
  assert rows[0]["temp_vs_xla"] == 1.0
  assert "| 96 | blockwise |" in capsys.readouterr().out
  assert json.load(open(path))["results"][1]["impl"] == "blockwise"


def test_attention_refuses_bad_flags():
  with pytest.raises(SystemExit, match="kv_heads must divide heads"):
    benchmark.main(["attention", "--lengths", "64", "--heads", "3", "--kv_heads", "2"])
