"""Orbax checkpoints: params checkpoints for exchange, and train-state checkpoints for resuming.

A *params checkpoint* (what inference, fine-tuning from `INITIAL_CHECKPOINT_PATH` and the
Hugging Face converter exchange) is a directory holding:
  params/      the parameter pytree exactly as `model.init` returns it, saved by Orbax;
  model.gin    the gin model config that rebuilds the model (`models.from_gin(dir/model.gin)`).
A training run exports one into its MODEL_DIR at the end, so a MODEL_DIR is itself a params
checkpoint for inference and for fine-tuning.

A *train-state checkpoint* (`CheckpointManager`) lives in MODEL_DIR/checkpoints/<step>/ and holds
  state/   the whole TrainState: step, params, optimizer state, dropout RNG;
  data/    the data-iterator position: how many batches the run has consumed, so a resumed run
           fast-forwards its (seeded, deterministic) input pipeline to exactly where it stopped.
Orbax writes each step into a temporary directory and renames it only once complete, so a
crash mid-save never leaves a checkpoint that a later resume would pick up. Restoring takes
abstract arrays carrying shardings, so a checkpoint written on one mesh restores onto another.
"""
from __future__ import annotations

import dataclasses
import inspect
import logging
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
  metadata = params_metadata(directory)
  if abstract_params is None:
    # Onto this process's first device, whatever devices the checkpoint was written from.
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract_params = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata)
  check_shapes(metadata, abstract_params, f"Params checkpoint {directory!r}")
  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.restore(target, abstract_params)


def abstract_with_shardings(shapes: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying the shardings to restore into."""
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      shapes, shardings)


def model_gin(model) -> str:
  """The gin text that rebuilds `model` (class, constructor arguments, every config field)."""
  cls = type(model).__name__
  lines = ["# Written by t5x_lite: rebuilds the trained model with models.from_gin(this file).",
           "import t5x_lite.config", "import t5x_lite.models", "",
           f"MODEL = @{cls}()", f"{cls}.config = @TransformerConfig()"]
  for name in list(inspect.signature(type(model).__init__).parameters)[2:]:  # skip self, config
    lines.append(f"{cls}.{name} = {getattr(model, name)!r}")
  for field in dataclasses.fields(model.config):
    lines.append(f"TransformerConfig.{field.name} = {getattr(model.config, field.name)!r}")
  return "\n".join(lines) + "\n"


def check_shapes(found: Any, expected: Any, where: str) -> None:
  """Raises if two trees of arrays (or array metadata) differ in structure or shapes."""
  def shapes(tree):
    return {jax.tree_util.keystr(path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}
  found, expected = shapes(found), shapes(expected)
  if found == expected:
    return
  missing = sorted(set(expected) - set(found))
  extra = sorted(set(found) - set(expected))
  differ = [f"{k}: checkpoint {found[k]} vs model {expected[k]}"
            for k in sorted(set(found) & set(expected)) if found[k] != expected[k]]
  raise ValueError(
      f"{where} holds parameters of a different model: "
      + "; ".join(filter(None, [f"missing {missing[:3]}" if missing else "",
                                f"unexpected {extra[:3]}" if extra else "",
                                f"shapes differ: {differ[:3]}" if differ else ""]))
      + ". Use the model gin the checkpoint was written with, or another directory (a fresh "
        "MODEL_DIR, or the right INITIAL_CHECKPOINT_PATH).")


def params_metadata(directory: str) -> Any:
  """Shapes and dtypes of a params checkpoint's arrays, without reading them."""
  target = os.path.join(os.path.abspath(directory), PARAMS_DIR)
  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.metadata(target).item_metadata.tree


class CheckpointManager:
  """Train-state checkpoints of one run in `model_dir/checkpoints`.

  Saves every `save_interval_steps` steps (and whenever `force`d: at the end), asynchronously:
  `save` returns once the arrays are copied off the devices and writes in the background.
  Keeps the newest `max_to_keep`.
  """
  SUBDIR = "checkpoints"

  def __init__(self, model_dir: str, save_interval_steps: int = 1000, max_to_keep: int = 3,
               async_save: bool = True):
    if save_interval_steps < 1 or max_to_keep < 1:
      raise ValueError(f"save_interval_steps ({save_interval_steps}) and max_to_keep "
                       f"({max_to_keep}) must be >= 1.")
    self.directory = os.path.join(os.path.abspath(model_dir), self.SUBDIR)
    self.save_interval_steps = save_interval_steps
    # The interval is applied in `save` (Orbax alone would also save the very first step).
    self._manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
        save_interval_steps=1, max_to_keep=max_to_keep,
        enable_async_checkpointing=async_save, create=True),
        # Named handlers let a fresh manager read metadata of existing steps before any save.
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, batches_consumed: int, force: bool = False) -> bool:
    """Saves if `step` is a multiple of the interval (or `force`); returns whether a save was
    started."""
    if (step % self.save_interval_steps and not force) or step in self._manager.all_steps():
      return False
    return self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave({"batches_consumed": int(batches_consumed)})), force=force)

  def restore(self, abstract_state: Any, step: Optional[int] = None) -> tuple[Any, int]:
    """(state, batches_consumed) of `step` (default: the latest), laid out as `abstract_state`
    says (ShapeDtypeStructs with shardings: any mesh or device count)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"No train-state checkpoint in {self.directory}.")
    metadata = self._manager.item_metadata(step)["state"]
    tree = getattr(metadata, "tree", metadata)
    if hasattr(abstract_state, "params"):  # a TrainState: name the parameters that differ
      check_shapes(tree["params"], abstract_state.params, f"Checkpoint {self.directory}/{step}")
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    logging.info("Restored step %d from %s.", step, self.directory)
    return restored.state, int(restored.data["batches_consumed"])

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
