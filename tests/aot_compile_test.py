"""tools/aot_compile.py: the train job's step compiled for a TPU slice (v5e:2x2) from a CPU
machine, one tiny preset of each family on a data / fsdp / tensor mesh (the decoder with splash
attention, whose Mosaic kernels only a TPU compile checks), the report and verdict, and its
refusals. The compiles are real TPU compiles: a sharding or kernel TPU rejects fails here.

They need libtpu (the `tpu` and `test` extras install it); without it they are skipped, saying
so, and only the refusals run."""
import importlib.util
import json

import pytest

import tool_module  # tests/tool_module.py

tool = tool_module.load("aot_compile.py", "aot_compile_tool")

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not installed (pip install -e '.[tpu]'): TPU compiles not checked")

TINY = ["--gin.BATCH_SIZE=8", "--gin.TASK_FEATURE_LENGTHS={'inputs': 128, 'targets': 128}"]


@needs_libtpu
@pytest.mark.parametrize("preset, mesh, extra", [
    ("llama_tiny", {"data": 1, "fsdp": 2, "tensor": 2},
     ["--gin.TransformerConfig.attention_implementation=splash"]),
    ("t5_tiny", {"data": 4}, []),
    ("bert_tiny", {"data": 1, "tensor": 4}, []),
])
def test_each_family_compiles_for_a_tpu_slice(preset, mesh, extra, capsys):
  flags = [f"--gin.make_mesh.{axis}={size}" for axis, size in mesh.items()]
  report = tool.run(["--topology", "v5e:2x2", "--json", f"--gin_file=models/{preset}.gin",
                     *TINY, *flags, *extra])
  assert report["chip"] == "TPU v5e" and report["devices"] == 4
  assert report["mesh"] == {axis: size for axis, size in mesh.items() if size > 1}
  memory = report["memory"]
  assert 0 < memory["arguments"] < memory["total"] <= report["hbm_bytes"] == 16 * 2 ** 30
  assert report["fits"] and "advice" not in report
  assert 0 < report["step_seconds"] < 1 and 0 < report["mfu"] < 1
  assert json.loads(capsys.readouterr().out)["topology"] == "v5e:2x2"


def test_the_report_and_advice_of_a_step_that_does_not_fit():
  """The text a user reads, and the flags it suggests, for a step 3x over a v5e's HBM."""
  gib = 2 ** 30
  report = {"chip": "TPU v5e", "devices": 4, "devices_per_chip": 1, "mesh": {"data": 4},
            "batch_shapes": {"decoder_input_tokens": (32, 2048)}, "num_microbatches": 1,
            "remat_policy": "none", "memory": {"arguments": 6 * gib, "outputs": 0.0,
                                               "temporaries": 42 * gib, "total": 48 * gib},
            "hbm_bytes": 16 * gib, "peak_flops_per_device": 197e12, "step_seconds": 0.5,
            "step_time_source": "XLA's cost model", "model_flops_per_step": 1e14, "mfu": 0.25,
            "fits": False}
  report["advice"] = tool.advice(report)
  # fsdp over all 4 data devices shards the 6 GiB state to 1.5; 42 GiB of temporaries then
  # need 4 microbatches to come under 90% of 16 GiB.
  assert report["advice"] == ["--gin.make_mesh.data=1 --gin.make_mesh.fsdp=4",
                              "--gin.TransformerConfig.remat_policy=full",
                              "--gin.train.num_microbatches=4"]
  text = tool.format_report(report)
  assert "total 48.00 GiB of 16.00 GiB (300%)" in text
  assert "MFU 25.0% of 4 x 197 TFLOP/s" in text
  assert text.endswith("verdict: does not fit: try --gin.make_mesh.data=1 --gin.make_mesh.fsdp=4, "
                       "--gin.TransformerConfig.remat_policy=full, --gin.train.num_microbatches=4 "
                       "(estimates: compile again with them to check)")


def test_the_step_time_counts_every_trip_of_a_loop():
  """XLA's cost analysis counts a loop body once: the estimate scales to the step's FLOPs."""
  assert tool.step_time({"optimal_seconds": 2.0, "flops": 10.0}, 10.0)[0] == 2.0
  seconds, how = tool.step_time({"optimal_seconds": 2.0, "flops": 10.0}, 60.0)
  assert seconds == 12.0 and "counted once" in how


def test_bad_input_is_refused_before_any_work(monkeypatch, capsys):
  assert tool.main(["--topology", "v9:2x2", "--gin_file=models/llama_tiny.gin"]) == 1
  assert "generation among ['v4', 'v5e', 'v5p', 'v6e']" in capsys.readouterr().err
  monkeypatch.setattr(tool.importlib.util, "find_spec", lambda name: None)
  assert tool.main(["--topology", "v5e:2x2", "--gin_file=models/llama_tiny.gin"]) == 1
  err = capsys.readouterr().err
  assert "libtpu is not installed" in err and "pip install -e '.[tpu]'" in err


@needs_libtpu
def test_a_shape_libtpu_does_not_know_is_refused(capsys):
  assert tool.main(["--topology", "v5e:3x3", "--gin_file=models/llama_tiny.gin"]) == 1
  err = capsys.readouterr().err
  assert "--topology 'v5e:3x3': libtpu does not know it" in err and "v5e:2x2" in err
