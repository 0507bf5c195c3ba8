"""Orbax checkpoints: params checkpoints for exchange, and train-state checkpoints for resuming.

A *params checkpoint* (what inference, fine-tuning from `INITIAL_CHECKPOINT_PATH` and the
Hugging Face converter exchange) is a directory holding:
  params/      the parameter pytree exactly as `model.init` returns it, saved by Orbax;
  model.gin    the gin model config that rebuilds the model (`models.from_gin(dir/model.gin)`).
A training run exports one into its MODEL_DIR at the end, so a MODEL_DIR is itself a params
checkpoint for inference and for fine-tuning.

A *train-state checkpoint* (`CheckpointManager`) lives in MODEL_DIR/checkpoints/<step>/ and holds
  state/   the whole TrainState: step, params, optimizer state, dropout RNG;
  data/    the data position: how many batches (and, for a packed cache, rows) the run has
           consumed, and what they were read from (task, feature lengths, seed, vocabulary
           fingerprint, data shards: see t5x_lite/data/resume.py);
  data_iterator/  each process's input-iterator state (process_<i>-of-<n>.*), when the run reads
           an on-the-fly pipeline: a resumed run restores it instead of replaying the stream.
Orbax writes each step into a temporary directory and renames it only once complete, so a
crash (or a full disk) mid-save never leaves a checkpoint that a later resume would pick up, and
the previous one stays usable. A finished checkpoint damaged later (truncated by a copy, a disk
error) is set aside as <step>.corrupt and the resume falls back to the previous good step.
Restoring takes abstract arrays carrying shardings, so a checkpoint written on one mesh restores
onto another.
"""
from __future__ import annotations

import contextlib
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
  save_tree(os.path.join(directory, PARAMS_DIR), params)
  if model_gin is not None:
    with open(os.path.join(directory, MODEL_GIN), "w") as f:
      f.write(model_gin)
  return directory


def save_tree(target: str, tree: Any) -> None:
  """An Orbax tree (params, LoRA adapters, a soft prompt) written to `target`, replacing it."""
  if os.path.exists(target):
    shutil.rmtree(target)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(target, tree)


def load_params(directory: str, abstract_params: Optional[Any] = None) -> Any:
  """Read a params checkpoint; with `abstract_params` (jax.ShapeDtypeStruct leaves, optionally
  with `.sharding`), arrays are restored directly into that layout and shapes are checked."""
  target = os.path.join(os.path.abspath(directory), PARAMS_DIR)
  if not os.path.isdir(target):
    raise FileNotFoundError(
        f"No params checkpoint at {directory!r} (expected a {PARAMS_DIR}/ directory written by "
        "t5x_lite.checkpoints.save_params or tools/convert_checkpoint.py).")
  with _unreadable_params(target):
    metadata = params_metadata(directory)
  if abstract_params is None:
    # Onto this process's first device, whatever devices the checkpoint was written from.
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract_params = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata)
  check_shapes(metadata, abstract_params, f"Params checkpoint {directory!r}")
  with _unreadable_params(target), ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.restore(target, abstract_params)


def restore_on_first_device(target: str) -> Any:
  """An Orbax tree (a params checkpoint, LoRA adapters, a soft prompt) restored onto this
  process's first device, whatever devices it was written from."""
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  with ocp.StandardCheckpointer() as checkpointer:
    metadata = checkpointer.metadata(target).item_metadata.tree
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                            metadata)
    return checkpointer.restore(target, abstract)


@contextlib.contextmanager
def _unreadable_params(target: str):
  """Orbax's errors on a damaged params/ directory, as one sentence with the fix."""
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except  # tensorstore, JSON, OS errors
    raise ValueError(_unreadable_message(target, e)) from e


def _unreadable_message(target: str, error: Exception) -> str:
  first_line = (str(error).strip().splitlines() or [""])[0][:200]
  return (f"{target} is not a readable params checkpoint ({type(error).__name__}: "
          f"{first_line}): it is damaged (e.g. a copy cut short) or was not written by Orbax. "
          "Export it again (rerun the training job, checkpoints.save_params or "
          "tools/convert_checkpoint.py) or point to another checkpoint.")


def load_train_state_params(state_dir: str, abstract_params: Any) -> Any:
  """Only the parameters of a train-state checkpoint (no optimizer state is read)."""
  found = ocp.StandardCheckpointer().metadata(state_dir).item_metadata.tree
  check_shapes(found["params"], abstract_params, f"Checkpoint {state_dir!r}")
  restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding),
                              abstract_params)
  with ocp.PyTreeCheckpointer() as checkpointer:
    return checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(
        item={"params": abstract_params}, restore_args={"params": restore_args},
        partial_restore=True))["params"]


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


class _StagedFilesHandler(ocp.CheckpointHandler):
  """A checkpoint item made of the files each process wrote (staged) before the save began: its
  input iterator's state. They are moved into the step's item directory, so they are committed
  with the step, or discarded with an unfinished one, and deleted with it."""

  def save(self, directory, args: "StagedFilesSave"):
    directory = str(directory)
    os.makedirs(directory, exist_ok=True)
    for name in os.listdir(args.staging):
      shutil.move(os.path.join(args.staging, name), os.path.join(directory, name))
    os.rmdir(args.staging)

  def restore(self, directory, args=None):
    return str(directory)  # the data stream reads its own files

  def metadata(self, directory):
    return None


@ocp.args.register_with_handler(_StagedFilesHandler, for_save=True)
@dataclasses.dataclass
class StagedFilesSave(ocp.args.CheckpointArgs):
  staging: str


@ocp.args.register_with_handler(_StagedFilesHandler, for_restore=True)
@dataclasses.dataclass
class StagedFilesRestore(ocp.args.CheckpointArgs):
  pass


class CheckpointManager:
  """Train-state checkpoints of one run in `model_dir/checkpoints`.

  Saves every `save_interval_steps` steps (and whenever `force`d: at the end), asynchronously:
  `save` returns once the arrays are copied off the devices and writes in the background.
  Keeps the newest `max_to_keep`. With `data_stream` set (the train job's, see
  data/resume.py), each save records its position and the input iterator's state.
  """
  SUBDIR = "checkpoints"
  ITERATOR_ITEM = "data_iterator"

  def __init__(self, model_dir: str, save_interval_steps: int = 1000, max_to_keep: int = 3,
               async_save: bool = True):
    if save_interval_steps < 1 or max_to_keep < 1:
      raise ValueError(f"save_interval_steps ({save_interval_steps}) and max_to_keep "
                       f"({max_to_keep}) must be >= 1.")
    self.directory = os.path.join(os.path.abspath(model_dir), self.SUBDIR)
    self.save_interval_steps = save_interval_steps
    self.restored_step: Optional[int] = None  # the step `restore` read (after any fallback)
    self.restored_position: dict = {}  # its data position: batches_consumed (and batch_size)
    self.data_stream = None  # position(consumed) -> dict; stage_state(directory, consumed)
    # Where this process writes its iterator state before a save hands it to Orbax; what a
    # killed run left there is stale.
    self._staging = os.path.join(os.path.abspath(model_dir), "data_iterator_staging",
                                 f"process_{jax.process_index()}")
    shutil.rmtree(self._staging, ignore_errors=True)
    self._saving: Optional[int] = None  # the step whose asynchronous write may be under way
    # The interval is applied in `save` (Orbax alone would also save the very first step).
    # Temporary directories of saves cut short (a kill, a full disk) are removed on start-up.
    self._manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
        save_interval_steps=1, max_to_keep=max_to_keep, cleanup_tmp_directories=True,
        enable_async_checkpointing=async_save, create=True),
        # Named handlers let a fresh manager read metadata of existing steps before any save.
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": ocp.JsonCheckpointHandler(),
                       self.ITERATOR_ITEM: _StagedFilesHandler()})
    # Orbax removes those temporary directories in a background thread that only its first
    # save waits for: wait now, so that no removal is still under way while this run reads or
    # lists its checkpoints, or after it closed.
    getattr(self._manager, "_maybe_await_cleanup_tmp_directory", lambda: None)()
    self._closed = False

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, batches_consumed: int, force: bool = False,
           batch_size: Optional[int] = None) -> bool:
    """Saves if `step` is a multiple of the interval (or `force`); returns whether a save was
    started. `batch_size` (the global batch size the batches were consumed at) is recorded with
    the position, so a resume at another batch size can convert it. Raises OSError naming the
    fix if this or the previous asynchronous save failed."""
    if (step % self.save_interval_steps and not force) or step in self._manager.all_steps():
      return False
    position = {"batches_consumed": int(batches_consumed)}
    if batch_size is not None:
      position["batch_size"] = int(batch_size)
    items = {}
    if self.data_stream is not None:
      position.update(self.data_stream.position(batches_consumed))
      # Written now, before the iterator moves on; Orbax only moves the files into the step.
      staged = self.data_stream.stage_state(os.path.join(self._staging, str(step)),
                                            batches_consumed)
      if staged:
        items[self.ITERATOR_ITEM] = StagedFilesSave(staged)
    with self._explain_save_errors():
      started = self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(position), **items),
          force=force)
    if not started and items:
      shutil.rmtree(items[self.ITERATOR_ITEM].staging, ignore_errors=True)
    self._saving = step if started else self._saving
    return started

  def step_directory(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  @contextlib.contextmanager
  def _explain_save_errors(self):
    """Orbax reports a failed background write (e.g. no space left) at the next call."""
    try:
      yield
    except Exception as e:  # pylint: disable=broad-except
      good = [s for s in self.all_steps() if s != self._saving]
      raise OSError(
          f"Saving train-state checkpoint step {self._saving} to {self.directory} failed: "
          f"{type(e).__name__}: {e}. The unfinished save is ignored on resume; "
          + (f"the previous checkpoint (step {max(good)}) is intact. " if good else "")
          + "Free disk space (or point MODEL_DIR to a larger disk) and rerun to resume.") from e

  def restore(self, abstract_state: Any, step: Optional[int] = None) -> tuple[Any, int]:
    """(state, batches_consumed) of `step` (default: the newest readable one), laid out as
    `abstract_state` says (ShapeDtypeStructs with shardings: any mesh or device count).

    Without `step`, a checkpoint that cannot be read (truncated or damaged files) is renamed to
    <step>.corrupt, with a warning, and the previous step is tried: a resume never reads a
    damaged checkpoint and never stops at one. A checkpoint of another model shape is an error.
    """
    steps = sorted(self.all_steps(), reverse=True) if step is None else [step]
    if not steps:
      raise FileNotFoundError(f"No train-state checkpoint in {self.directory}.")
    set_aside = []
    for candidate in steps:
      try:
        metadata = self._manager.item_metadata(candidate)["state"]
        tree = getattr(metadata, "tree", metadata)
        if tree is None:
          raise FileNotFoundError("no state/ metadata")
      except Exception as e:  # pylint: disable=broad-except  # any damage: try the previous step
        if step is not None:
          raise
        set_aside.append(self._set_aside(candidate, e))
        continue
      if hasattr(abstract_state, "params"):  # a TrainState: name the parameters that differ
        check_shapes(tree["params"], abstract_state.params,
                     f"Checkpoint {self.directory}/{candidate}")
      try:
        restored = self._manager.restore(candidate, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        consumed = int(restored.data["batches_consumed"])
      except Exception as e:  # pylint: disable=broad-except
        if step is not None:
          raise
        set_aside.append(self._set_aside(candidate, e))
        continue
      if set_aside:
        logging.warning("Resuming from step %d, the newest readable checkpoint in %s.",
                        candidate, self.directory)
      self.restored_step, self.restored_position = candidate, dict(restored.data)
      return restored.state, consumed
    raise ValueError(
        f"No readable train-state checkpoint in {self.directory}: all were damaged and set "
        f"aside as {set_aside}. Rerun to start from step 0, or copy good checkpoints back.")

  def _set_aside(self, step: int, error: Exception) -> str:
    """Renames a damaged step directory so that no resume (nor a later save of the same step)
    trips over it again; it is kept for inspection."""
    path = os.path.join(self.directory, str(step))
    target = path + ".corrupt"
    _sync_processes(f"t5x_lite: set aside checkpoint {step}?")  # every process saw the damage
    if jax.process_index() == 0:
      suffix = 1
      while os.path.exists(target):
        target, suffix = f"{path}.corrupt{suffix}", suffix + 1
      os.rename(path, target)
    logging.warning("Train-state checkpoint %s is unreadable (%s: %s); set aside as %s, falling "
                    "back to the previous step.", path, type(error).__name__,
                    str(error)[:300], target)
    # No process lists the steps again before process 0's rename is done, so all agree on them.
    _sync_processes(f"t5x_lite: set aside checkpoint {step}")
    self._manager.reload()
    return target

  def wait_until_finished(self) -> None:
    with self._explain_save_errors():
      self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for the background writes, then stops Orbax's threads (again: a no-op)."""
    if self._closed:
      return
    self._closed = True
    with self._explain_save_errors():
      self._manager.close()

  def close_after_error(self) -> None:
    """`close` for a job that is already failing: a save error found now is logged, not
    raised over the job's own error, and no Orbax thread outlives the job."""
    try:
      self.close()
    except OSError as e:
      logging.warning("%s", e)

  def __enter__(self):
    return self

  def __exit__(self, exc_type, *exc):
    if exc_type is None:
      self.close()
    else:
      self.close_after_error()


def _sync_processes(name: str) -> None:
  """A barrier across the processes of a multi-host run (nothing to wait for with one)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)
