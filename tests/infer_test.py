"""The inference job on params checkpoints written here: JSON Lines per task, every family."""
import json
import os
import sys

import jax
import pytest

from t5x_lite import checkpoints, infer, models, partitioning

FEATURES = ("inputs", "targets", "prediction", "prediction_score", "target_log_likelihood",
            "target_tokens")


def _checkpoint(directory, preset, *bindings, edit=None):
  model = models.from_gin(preset, list(bindings))
  params = jax.jit(model.init)(jax.random.PRNGKey(0),
                               model.dummy_batch(1, {"inputs": 8, "targets": 8}))
  if edit:
    params = edit(params)
  checkpoints.save_params(str(directory), params, checkpoints.model_gin(model))
  return model, str(directory)


def _read(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_the_command_line_job_writes_one_line_per_example(tmp_path):
  _, ckpt = _checkpoint(tmp_path / "t5", "t5_tiny")
  infer.main([f"--gin_file={ckpt}/model.gin", "--gin_file=runs/infer.gin",
              f"--gin.CHECKPOINT_PATH={ckpt}", f"--gin.OUTPUT_DIR={tmp_path}/out",
              "--gin.MAX_EXAMPLES=5", "--gin.BATCH_SIZE=8",
              "--gin.TASK_FEATURE_LENGTHS={'inputs': 24, 'targets': 8}"])
  records = _read(tmp_path / "out" / "addition_validation.jsonl")
  assert len(records) == 5 and all(sorted(r) == sorted(FEATURES) for r in records)
  for r in records:
    a, b = r["inputs"].removeprefix("add: ").split(" + ")
    assert int(r["targets"]) == int(a) + int(b)
    assert r["target_tokens"] == len(r["targets"]) + 1  # Bytes plus EOS.
    assert r["target_log_likelihood"] < 0 and r["prediction_score"] < 0
    assert len(r["prediction"].encode()) <= 8


def test_a_decoder_only_model_decodes_prefix_lm_batches_with_beam_search(tmp_path):
  model, ckpt = _checkpoint(tmp_path / "gpt", "gpt2_tiny")
  mesh = lambda: partitioning.make_mesh(data=2, fsdp=2, tensor=2)
  greedy, beams = (
      _read(infer.infer(model, ckpt, "addition", {"inputs": 24, "targets": 6},
                        output_dir=str(tmp_path / name), batch_size=4, max_examples=3,
                        decode_params=params, mesh_fn=mesh)[0])
      for name, params in (("greedy", None), ("beam", {"beam_size": 2, "alpha": 0.0})))
  assert [r["inputs"] for r in greedy] == [r["inputs"] for r in beams]
  for g, b in zip(greedy, beams):  # Beam search finds sequences at least as likely as greedy.
    assert b["prediction_score"] >= g["prediction_score"] - 1e-4
    assert b["target_log_likelihood"] == pytest.approx(g["target_log_likelihood"])


def test_an_encoder_only_model_fills_its_masks(tmp_path):
  z = ord("z") + 3  # Byte ids are byte + 3.
  model, ckpt = _checkpoint(tmp_path / "bert", "bert_tiny",
                            edit=lambda p: dict(p, mlm_bias=p["mlm_bias"].at[z].set(50.0)))
  path = infer.infer(model, ckpt, "stdlib_mlm", {"inputs": 32, "targets": 32}, batch_size=8,
                     max_examples=2, mesh_fn=lambda: partitioning.make_mesh(data=8))[0]
  for r in _read(path):
    assert "z" in r["prediction"] and len(r["prediction"]) == len(r["targets"])
    assert r["prediction_score"] is None and r["target_tokens"] > 0


def test_a_checkpoint_trained_with_another_vocabulary_is_refused(tmp_path):
  model, ckpt = _checkpoint(tmp_path / "t5", "t5_tiny")
  with pytest.raises(ValueError, match="top_p must be in"):
    infer.infer(model, ckpt, "addition", {"inputs": 24, "targets": 8},
                decode_params={"top_p": 2.0})
  with open(os.path.join(ckpt, "config.gin"), "w") as f:  # What its training run recorded.
    f.write("get_vocabulary.kind = 'byte'\nget_vocabulary.extra_ids = 20\n")
  with pytest.raises(ValueError, match="was trained with .*get_vocabulary"):
    infer.infer(model, ckpt, "addition", {"inputs": 24, "targets": 8})
  small, small_ckpt = _checkpoint(tmp_path / "small", "t5_tiny",
                                  "TransformerConfig.vocab_size = 256")
  with pytest.raises(ValueError, match="360 ids but the checkpoint's model has vocab_size=256"):
    infer.infer(small, small_ckpt, "addition", {"inputs": 24, "targets": 8})


def test_a_prompt_export_decodes_as_its_base_with_the_prompt_in_front(tmp_path, capsys):
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from prompt_tuning_test import compilation_cache, write_export  # pylint: disable=g-import-not-at-top
  model, params, _, prompt_dir = write_export(tmp_path, "gpt2_tiny")
  lengths = {"inputs": 24, "targets": 6}
  with compilation_cache(tmp_path / "jax_cache"):
    infer.main([f"--gin_file={prompt_dir}/model.gin", "--gin_file=runs/infer.gin",
                f"--gin.CHECKPOINT_PATH={prompt_dir}", f"--gin.OUTPUT_DIR={tmp_path}/out",
                "--gin.MAX_EXAMPLES=3", "--gin.BATCH_SIZE=8",
                f"--gin.TASK_FEATURE_LENGTHS={lengths}"])
    assert "is a soft-prompt export (3 vectors" in capsys.readouterr().out
    # The same prompted model over one params checkpoint holding base and prompt.
    joined = checkpoints.save_params(str(tmp_path / "joined"), params)
    expected = _read(infer.infer(model, joined, "addition", lengths, batch_size=8,
                                 max_examples=3)[0])
  assert _read(tmp_path / "out" / "addition_validation.jsonl") == expected
