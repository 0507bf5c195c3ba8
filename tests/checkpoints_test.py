"""Params checkpoints, the model gin, and train-state checkpoints across meshes."""
import asyncio
import os
import resource
import signal

import jax
import numpy as np
import pytest

from t5x_lite import checkpoints, models, optimizers, partitioning, trainer as trainer_lib


def gpt2_trainer(mesh, preset="gpt2_tiny", bindings=()):
  model = models.from_gin(preset, bindings)
  shapes = {k: (8, 16) for k in model.REQUIRED_FEATURES}
  return trainer_lib.Trainer(model, optimizers.create_optimizer("adamw"), mesh, shapes)


def assert_trees_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


BATCH = {"decoder_input_tokens": np.random.default_rng(0).integers(2, 500, (8, 16), np.int32),
         "decoder_target_tokens": np.random.default_rng(1).integers(2, 500, (8, 16), np.int32),
         "decoder_loss_weights": np.ones((8, 16), np.int32)}


def continue_training(trainer, state, steps=2):
  """Losses of `steps` more steps on BATCH (the first measures the restored params, the next
  what the restored optimizer state did with them)."""
  losses = []
  for _ in range(steps):
    state, metrics = trainer.train_step(state, partitioning.host_to_global(BATCH, trainer.mesh))
    losses.append(float(metrics["loss"]))
  return losses


@pytest.fixture(scope="module")
def saved_on_8_devices(tmp_path_factory):
  """A train state (not at its initial values) saved from a (2, 2, 2) mesh, and the losses of
  the two steps that follow it there."""
  trainer = gpt2_trainer(partitioning.make_mesh(2, 2, 2))
  state = trainer.init_state(seed=1)
  state = state.replace(step=state.step + 5, opt_state=jax.tree.map(
      lambda x: x + 0.5 if x.dtype == np.float32 else x, state.opt_state))
  model_dir = str(tmp_path_factory.mktemp("run"))
  with checkpoints.CheckpointManager(model_dir, save_interval_steps=5) as manager:
    assert manager.save(5, state, batches_consumed=17)
    manager.wait_until_finished()
  saved = jax.device_get(state)
  return model_dir, saved, continue_training(trainer, state)


@pytest.mark.parametrize("num_devices, mesh_sizes", [(4, (1, 2, 2)), (1, (1, 1, 1))])
def test_a_state_saved_on_8_devices_restores_onto_fewer(saved_on_8_devices, num_devices,
                                                        mesh_sizes):
  model_dir, saved, losses_on_8 = saved_on_8_devices
  mesh = partitioning.make_mesh(*mesh_sizes, devices=jax.devices()[:num_devices])
  trainer = gpt2_trainer(mesh)
  with checkpoints.CheckpointManager(model_dir) as manager:
    assert manager.latest_step() == 5
    state, consumed = manager.restore(trainer.abstract_state)
  assert consumed == 17 and int(state.step) == 5
  assert_trees_equal(state, saved)
  for leaf, sharding in zip(jax.tree.leaves(state), jax.tree.leaves(trainer.state_shardings)):
    assert leaf.sharding == sharding and len(leaf.sharding.device_set) == num_devices
  # Training goes on where it left off: the same losses as on 8 devices (up to the order of
  # floating-point sums, which the device count changes).
  np.testing.assert_allclose(continue_training(trainer, state), losses_on_8, rtol=2e-5)


def test_a_checkpoint_of_another_model_shape_is_refused(saved_on_8_devices):
  model_dir, _, _ = saved_on_8_devices
  wider = gpt2_trainer(partitioning.make_mesh(), bindings=["TransformerConfig.d_model = 128"])
  with checkpoints.CheckpointManager(model_dir) as manager:
    with pytest.raises(ValueError, match=r"different model.*checkpoint \(64,\) vs model "
                                         r"\(128,\).*a fresh MODEL_DIR"):
      manager.restore(wider.abstract_state)


def test_manager_saves_on_interval_keeps_the_last_k_and_ignores_unfinished(tmp_path):
  state = {"w": np.arange(4.0, dtype=np.float32)}
  with checkpoints.CheckpointManager(str(tmp_path), save_interval_steps=2,
                                     max_to_keep=2) as manager:
    saved = [step for step in range(1, 8) if manager.save(step, state, batches_consumed=step)]
    assert manager.save(7, state, batches_consumed=7, force=True)  # the final save
    manager.wait_until_finished()
    assert saved == [2, 4, 6]
    assert manager.all_steps() == [6, 7]
  # A save that died half-way sits in a temporary directory that no resume picks up.
  os.makedirs(tmp_path / "checkpoints" / "9.orbax-checkpoint-tmp-1234" / "state")
  with checkpoints.CheckpointManager(str(tmp_path)) as manager:
    assert manager.latest_step() == 7
    restored, consumed = manager.restore(jax.eval_shape(lambda: state))
  assert consumed == 7
  np.testing.assert_array_equal(restored["w"], state["w"])


def test_params_checkpoint_round_trips_with_a_loadable_model_gin(tmp_path):
  model = models.from_gin("t5_tiny", ["EncoderDecoderModel.z_loss = 0.001",
                                      "TransformerConfig.dropout_rate = 0.1"])
  batch = model.dummy_batch(2, {"inputs": 8, "targets": 8})
  params = jax.jit(model.init)(jax.random.PRNGKey(0), batch)
  checkpoints.save_params(str(tmp_path), params, checkpoints.model_gin(model))
  rebuilt = models.from_gin(str(tmp_path / "model.gin"))
  assert type(rebuilt) is type(model) and rebuilt.config == model.config
  assert rebuilt.z_loss == 0.001
  shapes, specs = rebuilt.abstract_params(batch)
  mesh = partitioning.make_mesh(2, 2, 2)
  abstract = checkpoints.abstract_with_shardings(
      shapes, partitioning.tree_shardings(shapes, specs, mesh))
  loaded = checkpoints.load_params(str(tmp_path), abstract)
  assert_trees_equal(loaded, params)
  kernel = loaded["encoder"]["layers"]["mlp"]["wo"]["kernel"]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "tensor", "fsdp")


def test_loading_params_into_another_shape_or_from_nowhere_says_so(tmp_path):
  model = models.from_gin("gpt2_tiny")
  batch = model.dummy_batch(1, {"targets": 8})
  checkpoints.save_params(str(tmp_path), jax.jit(model.init)(jax.random.PRNGKey(0), batch))
  other = models.from_gin("gpt2_tiny", ["TransformerConfig.num_layers = 3"])
  shapes, _ = other.abstract_params(batch)
  with pytest.raises(ValueError, match=r"shapes differ.*\(2, 64, 256\) vs model \(3, 64, 256\)"):
    checkpoints.load_params(str(tmp_path), shapes)
  with pytest.raises(FileNotFoundError, match="No params checkpoint"):
    checkpoints.load_params(str(tmp_path / "missing"), shapes)


def small_state(step):
  """200 kB of incompressible numbers, different at every step."""
  return {"w": np.random.default_rng(step).random(50_000, dtype=np.float32)}


def small_run(directory, steps=(2, 4)):
  """A manager holding train-state checkpoints of a small state at `steps`."""
  manager = checkpoints.CheckpointManager(str(directory), save_interval_steps=2)
  for step in steps:
    manager.save(step, small_state(step), batches_consumed=10 * step)
  manager.wait_until_finished()
  return manager


ABSTRACT = {"w": jax.ShapeDtypeStruct((50_000,), np.float32)}


@pytest.mark.parametrize("damage", ["truncate arrays", "delete metadata", "garble position"])
def test_a_damaged_checkpoint_is_set_aside_and_the_previous_step_restored(tmp_path, damage):
  small_run(tmp_path).close()
  step_dir = tmp_path / "checkpoints" / "4"
  if damage == "truncate arrays":  # e.g. a copy cut short
    for path in (step_dir / "state").rglob("d/*"):
      os.truncate(path, path.stat().st_size // 2)
  elif damage == "delete metadata":
    os.remove(step_dir / "state" / "_METADATA")
  else:
    (step_dir / "data" / "metadata").write_text('{"batches_cons')
  with checkpoints.CheckpointManager(str(tmp_path), save_interval_steps=2) as manager:
    state, consumed = manager.restore(ABSTRACT)
    assert manager.restored_step == 2 and consumed == 20
    np.testing.assert_array_equal(state["w"], small_state(2)["w"])
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4.corrupt"]  # kept to inspect
    # Training on re-saves step 4, which the next resume reads.
    assert manager.save(4, small_state(4), batches_consumed=40)
    manager.wait_until_finished()
    assert manager.restore(ABSTRACT)[1] == 40


def test_all_checkpoints_damaged_says_so(tmp_path):
  small_run(tmp_path, steps=(2,)).close()
  os.remove(tmp_path / "checkpoints" / "2" / "state" / "_METADATA")
  with checkpoints.CheckpointManager(str(tmp_path)) as manager:
    with pytest.raises(ValueError, match=r"No readable train-state checkpoint.*2\.corrupt.*Rerun"):
      manager.restore(ABSTRACT)


def test_a_disk_filling_up_during_a_save_leaves_the_previous_checkpoint_usable(tmp_path):
  """A file-size limit (RLIMIT_FSIZE, as a quota would) makes the write of step 4 fail."""
  manager = small_run(tmp_path, steps=(2,))
  soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
  previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
  resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, hard))
  try:
    with pytest.raises(OSError, match=r"step 4 .*File too large.*the previous checkpoint "
                                      r"\(step 2\) is intact.*Free disk space"):
      manager.save(4, small_state(4), batches_consumed=40)
      manager.wait_until_finished()
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    signal.signal(signal.SIGXFSZ, previous_handler)
  manager.close()
  with checkpoints.CheckpointManager(str(tmp_path)) as manager:
    state, consumed = manager.restore(ABSTRACT)
    assert manager.restored_step == 2 and consumed == 20
    np.testing.assert_array_equal(state["w"], small_state(2)["w"])
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]  # the partial save is cleaned up


def test_unfinished_saves_are_removed_before_a_manager_is_used(tmp_path, monkeypatch):
  """Orbax removes them in a background thread that only its first save waited for, so a
  resumed run (or a test) could still see one: issue 13's flaky disk-full test."""
  from orbax.checkpoint._src.path import temporary_paths  # pylint: disable=g-import-not-at-top
  cleanup = temporary_paths.cleanup_temporary_paths

  async def slow_cleanup(*args, **kwargs):
    await asyncio.sleep(0.5)  # a loaded machine
    return await cleanup(*args, **kwargs)

  monkeypatch.setattr(temporary_paths, "cleanup_temporary_paths", slow_cleanup)
  small_run(tmp_path, steps=(2,)).close()
  os.makedirs(tmp_path / "checkpoints" / "4.orbax-checkpoint-tmp" / "state")
  with checkpoints.CheckpointManager(str(tmp_path)) as manager:
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]
    assert manager.all_steps() == [2]


def test_every_process_waits_for_a_damaged_checkpoint_to_be_set_aside(tmp_path, monkeypatch):
  """Multi-host: process 0 renames, all reload; a barrier on each side of the rename."""
  small_run(tmp_path).close()
  os.remove(tmp_path / "checkpoints" / "4" / "state" / "_METADATA")
  seen = []
  monkeypatch.setattr(checkpoints, "_sync_processes", lambda name: seen.append(
      (name, sorted(os.listdir(tmp_path / "checkpoints")))))
  with checkpoints.CheckpointManager(str(tmp_path), save_interval_steps=2) as manager:
    assert manager.restore(ABSTRACT)[1] == 20
  assert seen == [("t5x_lite: set aside checkpoint 4?", ["2", "4"]),
                  ("t5x_lite: set aside checkpoint 4", ["2", "4.corrupt"])]


def test_the_data_position_records_its_batch_size(tmp_path):
  with checkpoints.CheckpointManager(str(tmp_path), save_interval_steps=2) as manager:
    manager.save(2, small_state(2), batches_consumed=7, batch_size=16)
    manager.wait_until_finished()
    manager.restore(ABSTRACT)
    assert manager.restored_position == {"batches_consumed": 7, "batch_size": 16}


class FakeStream:
  """A data stream as the train job's (data/resume.py): a position and staged state files."""

  def position(self, consumed):
    return {"task": "t", "tier": "iterator"}

  def stage_state(self, directory, consumed):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "process_0-of-1.index"), "w") as f:
      f.write(f"consumed {consumed}")
    return directory


def test_each_save_carries_the_data_position_and_the_iterator_state(tmp_path):
  with checkpoints.CheckpointManager(str(tmp_path), save_interval_steps=2,
                                     max_to_keep=1) as manager:
    manager.data_stream = FakeStream()
    for step in (2, 4):
      manager.save(step, small_state(step), batches_consumed=step + 1, batch_size=8)
    manager.wait_until_finished()
    manager.restore(ABSTRACT)
    assert manager.restored_position == {"batches_consumed": 5, "batch_size": 8, "task": "t",
                                         "tier": "iterator"}
    iterator_dir = os.path.join(manager.step_directory(4),
                                checkpoints.CheckpointManager.ITERATOR_ITEM)
  with open(os.path.join(iterator_dir, "process_0-of-1.index")) as f:
    assert f.read() == "consumed 5"  # moved into the step, deleted with it (max_to_keep=1)
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4"]
  assert not os.listdir(tmp_path / "data_iterator_staging" / "process_0")  # nothing left staged


@pytest.mark.parametrize("damage", ["junk files", "truncated arrays"])
def test_a_damaged_params_checkpoint_is_named_with_the_fix(tmp_path, damage):
  checkpoints.save_params(str(tmp_path), small_state(1))
  params_dir = tmp_path / checkpoints.PARAMS_DIR
  if damage == "junk files":
    for path in params_dir.rglob("*"):
      if path.is_file():
        path.write_bytes(b"junk")
  else:
    for path in (params_dir / "d").rglob("*"):
      os.truncate(path, path.stat().st_size // 2)
  with pytest.raises(ValueError, match=r"params is not a readable params checkpoint .*damaged.*"
                                       r"Export it again"):
    checkpoints.load_params(str(tmp_path))
