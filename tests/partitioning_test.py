"""Mesh, logical-axis resolution, sharded jit, data shards and multi-host on the 8 simulated
devices (and two real processes)."""
import ast
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from t5x_lite import models, optimizers, partitioning, trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_mesh_fills_the_free_axis():
  mesh = partitioning.make_mesh(data=-1, fsdp=2, tensor=2)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert dict(partitioning.make_mesh().shape) == {"data": 8, "fsdp": 1, "tensor": 1}


@pytest.mark.parametrize("sizes, message", [
    (dict(data=3, fsdp=1, tensor=1), "multiple of 3 devices"),
    (dict(data=-1, fsdp=-1, tensor=1), "at most one -1"),
    (dict(data=2, fsdp=2, tensor=1), "set one axis to -1"),
    (dict(data=0, fsdp=1, tensor=1), "positive sizes"),
])
def test_bad_mesh_is_refused_with_the_fix(sizes, message):
  with pytest.raises(ValueError, match=message):
    partitioning.make_mesh(**sizes)


def test_parameters_split_over_fsdp_and_tensor_activations_over_batch():
  mesh = partitioning.make_mesh(2, 2, 2)
  mlp_in = partitioning.logical_to_sharding(P("embed", "mlp"), (64, 256), mesh)
  assert mlp_in.spec == P("fsdp", "tensor")
  scanned = partitioning.logical_to_sharding(P("layers", "embed", "mlp"), (4, 64, 256), mesh)
  assert scanned.spec == P(None, "fsdp", "tensor")
  activations = partitioning.logical_to_sharding(P("batch", "length", "embed"), (8, 16, 64), mesh)
  assert activations.spec == P(("data", "fsdp"), None, None)


def test_dimensions_the_mesh_does_not_divide_stay_whole():
  mesh = partitioning.make_mesh(2, 2, 2)
  single_kv_head = partitioning.logical_to_sharding(P("embed", "kv_heads", "kv"), (64, 1, 16), mesh)
  assert single_kv_head.spec == P("fsdp", None, None)
  byte_vocab = partitioning.logical_to_sharding(P("vocab", "embed"), (259, 64), mesh)
  assert byte_vocab.spec == P(None, "fsdp")
  odd_batch = partitioning.logical_to_sharding(P("batch", "length"), (2, 8), mesh)
  assert odd_batch.spec == P("data", None)
  assert jax.device_count() == 8


# ------------------------------------------------------------------ jit, data shards, multi-host

def test_single_process_reads_the_whole_batch_and_checks_divisibility():
  mesh = partitioning.make_mesh(2, 2, 2)
  assert partitioning.data_shard_info(mesh, 8) == (0, 1)
  with pytest.raises(ValueError, match="BATCH_SIZE=6 is not divisible by the data-parallel size "
                                       "data x fsdp = 2 x 2 = 4"):
    partitioning.data_shard_info(mesh, 6)


def test_host_batches_become_global_arrays_split_over_data_and_fsdp():
  mesh = partitioning.make_mesh(2, 2, 2)
  local = {"tokens": np.arange(8 * 3, dtype=np.int32).reshape(8, 3)}
  tokens = partitioning.host_to_global(local, mesh)["tokens"]
  assert tokens.shape == (8, 3) and tokens.sharding.spec == P(("data", "fsdp"), None)
  assert {s.data.shape for s in tokens.addressable_shards} == {(2, 3)}
  np.testing.assert_array_equal(tokens, local["tokens"])


def test_jit_applies_shardings_rules_and_donation():
  mesh = partitioning.make_mesh(2, 2, 2)
  x_sharding = partitioning.logical_to_sharding(P("embed", "mlp"), (8, 16), mesh)

  def step(x, batch):
    h = nn.with_logical_constraint(batch @ x, ("batch", "mlp"))  # resolved by the rules
    return x + 1, h.sum()

  fn = partitioning.jit(step, mesh, (x_sharding, partitioning.batch_sharding(mesh)),
                        (x_sharding, partitioning.replicated(mesh)), donate_argnums=(0,))
  x = jax.device_put(jnp.zeros((8, 16)), x_sharding)
  batch = partitioning.host_to_global({"b": np.ones((4, 8), np.float32)}, mesh)["b"]
  new_x, total = fn(x, batch)
  assert x.is_deleted() and new_x.sharding == x_sharding and float(total) == 0.0
  assert "sharding_constraint" in fn.lower(new_x, batch).as_text()


def test_multi_host_start_up_needs_every_flag():
  partitioning.initialize_distributed()  # a single process: nothing to do
  with pytest.raises(ValueError, match="--num_processes and --process_id"):
    partitioning.initialize_distributed("localhost:1234", num_processes=2)
  with pytest.raises(ValueError, match=r"--process_id=2 must be in \[0, 2\)"):
    partitioning.initialize_distributed("localhost:1234", 2, 2)


# Each process trains gpt2_tiny on its own rows of one global batch; both print the losses.
WORKER = """
import sys
import jax, numpy as np
from t5x_lite import models, optimizers, partitioning, trainer
partitioning.initialize_distributed(sys.argv[1], 2, int(sys.argv[2]))
model = models.from_gin("gpt2_tiny")
mesh = partitioning.make_mesh(data=2, fsdp=2)
index, count = partitioning.data_shard_info(mesh, 8)
rows = np.random.default_rng(0).integers(2, 500, (8, 16)).astype(np.int32)
batch = {k: rows for k in model.REQUIRED_FEATURES}
local = {k: v[index * 8 // count:(index + 1) * 8 // count] for k, v in batch.items()}
t = trainer.Trainer(model, optimizers.create_optimizer("adamw"), mesh, {k: (8, 16) for k in batch})
state = t.init_state(0)
losses = []
for _ in range(2):
  state, metrics = t.train_step(state, partitioning.host_to_global(local, mesh))
  losses.append(float(metrics["loss"]))
print("SHARD", index, count, "LOSSES", repr(losses), flush=True)
"""


def test_two_processes_train_as_one_mesh():
  """Two processes x 2 CPU devices (gloo collectives) give the losses of one 4-device process."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  address = f"localhost:{20000 + os.getpid() % 20000}"
  procs = [subprocess.Popen([sys.executable, "-c", WORKER, address, str(i)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  outputs = [p.communicate(timeout=300)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outputs)
  results = [line.split() for o in outputs for line in o.splitlines() if line.startswith("SHARD")]
  assert sorted((r[1], r[2]) for r in results) == [("0", "2"), ("1", "2")]

  # The same model, data and steps in this process, on 4 of its devices.
  model = models.from_gin("gpt2_tiny")
  mesh = partitioning.make_mesh(data=2, fsdp=2, devices=jax.devices()[:4])
  rows = np.random.default_rng(0).integers(2, 500, (8, 16)).astype(np.int32)
  batch = partitioning.host_to_global({k: rows for k in model.REQUIRED_FEATURES}, mesh)
  t = trainer.Trainer(model, optimizers.create_optimizer("adamw"), mesh,
                      {k: (8, 16) for k in batch})
  state, expected = t.init_state(0), []
  for _ in range(2):
    state, metrics = t.train_step(state, batch)
    expected.append(float(metrics["loss"]))
  for result in results:
    np.testing.assert_allclose(ast.literal_eval(" ".join(result[4:])), expected, rtol=1e-5)
