"""Quantized params checkpoints: write (integers + scales + quantization.json), read without
building a float kernel, and choose the model a checkpoint runs with.

    quantize_checkpoint("/tmp/run", "/tmp/run_int4", "int4", group_size=128)
    model = for_checkpoint(float_model, "/tmp/run_int4", mode=None)   # QuantizedModel, int4
    params = predict.restore_params(model, mesh, loader(model, load_float, "/tmp/run_int4"))

The arrays and the model are `t5x_lite.quantization`'s; this module is what touches disk.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any, Callable, Optional

import jax

from t5x_lite import checkpoints
from t5x_lite.quantization import QuantizedModel, Settings, param_bytes

QUANTIZATION_JSON = "quantization.json"  # in a quantized params checkpoint: how it was made
FORMAT = "t5x_lite.quantization/1"


def directory_bytes(directory: str) -> int:
  """Bytes of the files under `directory` (a checkpoint on disk)."""
  return sum(os.path.getsize(os.path.join(root, name))
             for root, _, names in os.walk(directory) for name in names)


def read_settings(directory: str) -> Optional[Settings]:
  """The settings a quantized params checkpoint was written with; None for a float one."""
  path = os.path.join(directory, QUANTIZATION_JSON)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    record = json.load(f)
  return Settings(record["mode"], record.get("group_size") or 128, record["embeddings"])


def check_params_checkpoint(directory: str) -> None:
  """Refuses what is not a params checkpoint (a train-state step, a run without its export)."""
  if not os.path.isfile(os.path.join(directory, checkpoints.MODEL_GIN)):
    from t5x_lite import loaded_model  # pylint: disable=g-import-not-at-top
    why = loaded_model._not_a_params_checkpoint(directory)  # pylint: disable=protected-access
    raise FileNotFoundError("Quantization reads a params checkpoint. " + why)


def for_checkpoint(model, directory: Optional[str], mode: Optional[str],
                   group_size: int = 128, embeddings: bool = False,
                   kv_cache: Optional[str] = None, fused_max_rows: int = 0):
  """The model to run a checkpoint with: `model` itself (float), or a QuantizedModel as `mode`
  and `kv_cache` ask or as the checkpoint was quantized (its weight-only matmuls of at most
  `fused_max_rows` rows fused, see QuantizedModel). A checkpoint quantized otherwise is
  refused."""
  stored = read_settings(directory) if directory else None
  if stored is None:
    if mode is None and kv_cache is None:
      return model
    return QuantizedModel(model, mode, group_size, embeddings, kv_cache, fused_max_rows)
  if mode is None:
    return QuantizedModel(model, stored.mode, stored.group_size, stored.embeddings, kv_cache,
                          fused_max_rows)
  wanted = Settings(mode, group_size, stored.embeddings)
  if wanted.storage != stored.storage:
    raise ValueError(
        f"{directory!r} is already quantized ({stored.mode}"
        + (f", group size {stored.group_size}" if stored.bits == 4 else "")
        + f"), which cannot be read as {mode}"
        + (f" with group size {group_size}" if wanted.bits == 4 else "")
        + ". Load it with quantize=None (as stored)"
        + (" or 'w8a8'/'int8'" if stored.bits == 8 else "")
        + ", or quantize the float checkpoint it came from.")
  return QuantizedModel(model, mode, stored.group_size, stored.embeddings, kv_cache,
                        fused_max_rows)


def loader(model, load_float: Callable[[Any], Any],
           directory: Optional[str] = None) -> Callable[[Any], Any]:
  """`load(abstract params) -> params` for `predict.restore_params`: `load_float` itself for a
  float model; for a QuantizedModel the stored integers of a quantized checkpoint in
  `directory`, or the float parameters `load_float` reads, quantized into the same layout."""
  if not isinstance(model, QuantizedModel) or model.settings is None:
    return load_float

  def load(abstract):
    if directory and read_settings(directory) is not None:
      return checkpoints.load_params(directory, abstract)
    shardings = jax.tree.map(lambda a: getattr(a, "sharding", None), abstract)
    return model.quantize(load_float(model.float_abstract(abstract)), shardings)
  return load


def frozen_base_params(qmodel: QuantizedModel, directory: str, abstract):
  """QLoRA's frozen base: the parameters of the params checkpoint `directory` laid out as
  `abstract` (the quantized base's, with shardings): a quantized checkpoint's integers as
  stored (its storage must be `qmodel`'s), a float one's quantized as read."""
  check_params_checkpoint(directory)
  stored = read_settings(directory)
  if stored is not None and stored.storage != qmodel.settings.storage:
    raise ValueError(
        f"{directory!r} is quantized as {stored.mode} {stored.storage}, but QLoRA asks for "
        f"{qmodel.settings.mode} {qmodel.settings.storage}; set QUANTIZE / "
        "QUANTIZE_GROUP_SIZE to the checkpoint's, or start from the float checkpoint.")
  return loader(qmodel, lambda a: checkpoints.load_params(directory, a), directory)(abstract)


def save_checkpoint(directory: str, qmodel: QuantizedModel, params,
                    model_gin: str, source: Optional[str] = None) -> str:
  """A quantized params checkpoint: params/ (integers and scales), the base's model.gin and
  quantization.json (mode, group size, embeddings, source, bytes)."""
  checkpoints.save_params(directory, params, model_gin)
  record = {"format": FORMAT, "mode": qmodel.settings.mode,
            "group_size": qmodel.settings.group_size if qmodel.settings.bits == 4 else None,
            "embeddings": qmodel.settings.embeddings, "source": source,
            "param_bytes": param_bytes(params)}
  if jax.process_index() == 0:
    with open(os.path.join(directory, QUANTIZATION_JSON), "w") as f:
      json.dump(record, f, indent=1)
  return directory


def quantize_checkpoint(source: str, out: str, mode: str, group_size: int = 128,
                        embeddings: bool = False) -> tuple[QuantizedModel, dict]:
  """Reads the float params checkpoint `source`, writes its quantized copy to `out`; returns
  the model and {"float_bytes", "quantized_bytes"} of the arrays."""
  from t5x_lite import models  # pylint: disable=g-import-not-at-top
  check_params_checkpoint(source)
  if read_settings(source) is not None:
    raise ValueError(f"{source!r} is already quantized ({read_settings(source).mode}); "
                     "quantize the float checkpoint it came from.")
  if os.path.abspath(source) == os.path.abspath(out):
    raise ValueError("--to must be another directory than --from: the float checkpoint is kept.")
  gin_path = os.path.join(source, checkpoints.MODEL_GIN)
  qmodel = QuantizedModel(models.from_gin(gin_path), mode, group_size, embeddings)
  qmodel.abstract_params()  # group sizes checked before anything is read
  float_params = checkpoints.load_params(source, qmodel.float_abstract())
  params = qmodel.quantize(float_params)
  with open(gin_path) as f:
    model_gin = f.read()
  save_checkpoint(out, qmodel, params, model_gin, os.path.abspath(source))
  for name in os.listdir(source):  # the tokenizer and ids travel with the weights
    if name.startswith(("tokenizer", "special_tokens", "vocab", "hf_config", "spiece",
                        "sentencepiece", "config.gin")) and os.path.isfile(
                            os.path.join(source, name)):
      shutil.copy(os.path.join(source, name), os.path.join(out, name))
  return qmodel, {"float_bytes": param_bytes(float_params), "quantized_bytes": param_bytes(params)}
