"""Orbax checkpoints.

A *params checkpoint* (what inference, fine-tuning from `INITIAL_CHECKPOINT_PATH` and the
Hugging Face converter exchange) is a directory holding:
  params/      the parameter pytree exactly as `model.init` returns it, saved by Orbax;
  model.gin    the gin model config that rebuilds the model (`models.from_gin(dir/model.gin)`).
"""
from __future__ import annotations

import os
import shutil
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

PARAMS_DIR = "params"
MODEL_GIN = "model.gin"


def save_params(directory: str, params: Any, model_gin: Optional[str] = None) -> str:
  """Write a params checkpoint (and the model's gin config, if given) to `directory`."""
  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  target = os.path.join(directory, PARAMS_DIR)
  if os.path.exists(target):
    shutil.rmtree(target)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(target, params)
  if model_gin is not None:
    with open(os.path.join(directory, MODEL_GIN), "w") as f:
      f.write(model_gin)
  return directory


def load_params(directory: str, abstract_params: Optional[Any] = None) -> Any:
  """Read a params checkpoint; with `abstract_params` (jax.ShapeDtypeStruct leaves, optionally
  with `.sharding`), arrays are restored directly into that layout and shapes are checked."""
  target = os.path.join(os.path.abspath(directory), PARAMS_DIR)
  if not os.path.isdir(target):
    raise FileNotFoundError(
        f"No params checkpoint at {directory!r} (expected a {PARAMS_DIR}/ directory written by "
        "t5x_lite.checkpoints.save_params or tools/convert_checkpoint.py).")
  with ocp.StandardCheckpointer() as checkpointer:
    if abstract_params is None:
      return checkpointer.restore(target)
    return checkpointer.restore(target, abstract_params)


def abstract_with_shardings(shapes: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying the shardings to restore into."""
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      shapes, shardings)
