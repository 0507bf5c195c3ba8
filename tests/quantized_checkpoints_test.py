"""t5x_lite.quantized_checkpoints: tools/convert_checkpoint.py --quantize writes what
t5x_lite.load reads back as stored (and only as stored), and what is not a float params
checkpoint is refused with the fix.

The model is tests/quantization_test.py's decoder; its weights need not be trained here (a
checkpoint's integers must come back exactly whatever they are), so they are drawn at random.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import t5x_lite
from t5x_lite import checkpoints, models, quantized_checkpoints
from t5x_lite.quantization import QuantizedModel
from convert_checkpoint_test import convert_checkpoint  # the tool, imported by that test
from quantization_test import BINDINGS


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """(model, float params, float params checkpoint dir)."""
  model = models.from_gin("llama_tiny", BINDINGS)
  shapes, _ = model.abstract_params()
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.1, s.shape), s.dtype), shapes)
  directory = str(tmp_path_factory.mktemp("float"))
  checkpoints.save_params(directory, params, checkpoints.model_gin(model))
  return model, params, directory


def test_an_nf4_checkpoint_loads_as_stored_and_only_so(saved, tmp_path):
  model, params, directory = saved
  out = str(tmp_path / "nf4")
  convert_checkpoint.main(["--from", directory, "--to", out, "--quantize", "nf4",
                           "--group_size", "64"])
  loaded = t5x_lite.load(out, vocabulary=_Bytes())
  assert loaded.model.mode == "nf4" and loaded.model.settings.group_size == 64
  expected = QuantizedModel(model, "nf4", group_size=64).quantize(params)
  jax.tree.map(np.testing.assert_array_equal, loaded.params, expected)
  with pytest.raises(ValueError, match=r"already quantized \(nf4, group size 64\).*as int4"):
    t5x_lite.load(out, quantize="int4", group_size=64, vocabulary=_Bytes())


def test_bad_checkpoints_and_modes_are_refused_with_the_fix(saved, tmp_path):
  _, _, directory = saved
  with pytest.raises(ValueError, match="not a quantization mode"):
    t5x_lite.load(directory, quantize="int3", vocabulary=_Bytes())
  state_dir = tmp_path / "run" / "checkpoints" / "7" / "state"
  os.makedirs(state_dir)
  with pytest.raises(FileNotFoundError, match="train-state checkpoint"):
    quantized_checkpoints.quantize_checkpoint(str(state_dir.parent), str(tmp_path / "q"), "int8")
  with pytest.raises(FileNotFoundError, match="train-state checkpoint"):
    t5x_lite.load(str(state_dir.parent), quantize="int8")


class _Bytes:
  """The model's vocabulary: bytes + 3."""
  vocab_size, eos_id, bos_id = 259, 1, None

  def encode(self, text):
    return [b + 3 for b in text.encode()]

  def decode(self, ids):
    return bytes(i - 3 for i in ids if 3 <= i < 259).decode("utf-8", "replace")
