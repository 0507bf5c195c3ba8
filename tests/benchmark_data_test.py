"""tools/benchmark_data.py, through tools/benchmark.py's `data` sub-command: it measures each
task it is given, with default lengths per objective. No time is asserted."""

import pytest

import tool_module  # tests/tool_module.py

benchmark = tool_module.load("benchmark.py")
# Loading the tool put tools/ on sys.path, where the data module lives.
import benchmark_data  # pylint: disable=wrong-import-position


def test_data_subcommand_reports_throughput_and_fill(capsys):
  results = benchmark.main(["data", "--tasks", "addition", "--batch_size", "4", "--batches", "2",
                            "--warmup", "1"])
  (result,) = results
  assert result["task"] == "addition" and result["lengths"] == benchmark_data.DATA_LENGTHS["addition"]
  assert result["tokens_per_s"] > 0 and result["batches_per_s"] > 0
  assert 0.3 < result["fill"] <= 1  # packed: well above one short example per row
  out = capsys.readouterr().out
  assert "addition" in out and "tokens/s" in out


def test_default_lengths_per_objective():
  assert benchmark_data.data_lengths("local_span_corruption") == {"inputs": 512, "targets": 114}
  assert benchmark_data.data_lengths("stdlib_span_corruption_prefix_lm")["targets"] == 114
  with pytest.raises(ValueError, match="--lengths"):
    benchmark_data.data_lengths("mystery")
