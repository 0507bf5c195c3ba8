"""tools/benchmark.py: the `data` sub-command measures each task it is given (no time asserted)."""
import importlib.util
import os
import sys

import pytest

_TOOL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools",
                     "benchmark.py")
_spec = importlib.util.spec_from_file_location("benchmark", _TOOL)
benchmark = importlib.util.module_from_spec(_spec)
sys.modules["benchmark"] = benchmark  # its dataclasses look their module up there
_spec.loader.exec_module(benchmark)


def test_data_subcommand_reports_throughput_and_fill(capsys):
  results = benchmark.main(["data", "--tasks", "addition", "--batch_size", "4", "--batches", "2",
                            "--warmup", "1"])
  (result,) = results
  assert result["task"] == "addition" and result["lengths"] == benchmark.DATA_LENGTHS["addition"]
  assert result["tokens_per_s"] > 0 and result["batches_per_s"] > 0
  assert 0.3 < result["fill"] <= 1  # packed: well above one short example per row
  out = capsys.readouterr().out
  assert "addition" in out and "tokens/s" in out


def test_default_lengths_per_objective():
  assert benchmark.data_lengths("local_span_corruption") == {"inputs": 512, "targets": 114}
  assert benchmark.data_lengths("stdlib_span_corruption_prefix_lm")["targets"] == 114
  with pytest.raises(ValueError, match="--lengths"):
    benchmark.data_lengths("mystery")
