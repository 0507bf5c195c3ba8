"""Device mesh and the one table that maps logical axis names onto it.

Model code names every parameter and activation axis logically (`batch`, `embed`, `heads`, ...);
`LOGICAL_AXIS_RULES` decides which mesh axis (`data`, `fsdp`, `tensor`) each one is split over.
Changing the parallelism of a run is therefore a change of mesh sizes in gin, never of code.

It also holds what turns a function and host data into work on the mesh: `jit` (a `jax.jit`
with shardings and donation, traced under the rules), `initialize_distributed` (multi-host
start-up), `data_shard_info` (which slice of the global batch this process reads) and
`host_to_global` (this process's numpy rows -> one global jax.Array sharded over data x fsdp).
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
from typing import Any, Callable, Mapping, Optional, Sequence

import flax.linen as nn
import gin
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Order matters: a mesh axis is used at most once per array, by the first rule that claims it.
# So activations, whose `batch` axis takes data x fsdp, keep `embed` whole, while parameters
# (which have no batch axis) are split over fsdp along `embed` (ZeRO-3 style).
LOGICAL_AXIS_RULES: tuple[tuple[str, Optional[str | tuple[str, ...]]], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("embed", "fsdp"),
    ("kv", None),
    ("qkv", None),  # the query/key/value axis of a fused qkv kernel (TransformerConfig.fused_qkv)
    ("length", None),
    ("layers", None),
    ("relpos_buckets", None),
    ("abspos_buckets", None),
)


@gin.configurable(module="t5x_lite.partitioning")
def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A (data, fsdp, tensor) mesh over `devices` (default: all); one size may be -1 (the rest)."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
  free = [name for name, size in sizes.items() if size == -1]
  if len(free) > 1 or any(size == 0 or size < -1 for size in sizes.values()):
    raise ValueError(f"Mesh sizes {sizes} are invalid: use positive sizes and at most one -1 "
                     "(meaning: all remaining devices).")
  fixed = math.prod(size for size in sizes.values() if size != -1)
  if len(devices) % fixed:
    raise ValueError(
        f"Mesh {sizes} needs a multiple of {fixed} devices but {len(devices)} are available; "
        f"choose data x fsdp x tensor dividing {len(devices)} (e.g. make_mesh.data = -1).")
  if free:
    sizes[free[0]] = len(devices) // fixed
  if math.prod(sizes.values()) != len(devices):
    raise ValueError(f"Mesh {sizes} has {math.prod(sizes.values())} slots but there are "
                     f"{len(devices)} devices; set one axis to -1 to use them all.")
  shape = tuple(sizes[name] for name in MESH_AXES)
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def logical_to_sharding(logical_spec: PartitionSpec, shape: Sequence[int], mesh: Mesh,
                        rules=LOGICAL_AXIS_RULES) -> NamedSharding:
  """Resolve a logical PartitionSpec for an array of `shape`.

  A dimension whose size the mesh axes do not divide (a single K/V head over 2-way tensor
  parallelism, a 259-token byte vocabulary) is left whole rather than failing.
  """
  mesh_axes = nn.logical_to_mesh_axes(tuple(logical_spec), rules)
  resolved = []
  for dim, axes in zip(shape, tuple(mesh_axes) + (None,) * (len(shape) - len(mesh_axes))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    kept = []
    for name in names:
      if dim % (math.prod(mesh.shape[n] for n in kept) * mesh.shape[name]) == 0:
        kept.append(name)
    resolved.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return NamedSharding(mesh, PartitionSpec(*resolved))


def tree_shardings(abstract_tree, logical_specs, mesh: Mesh, rules=LOGICAL_AXIS_RULES):
  """Shardings for every leaf of `abstract_tree` from the matching logical specs."""
  return jax.tree.map(lambda spec, leaf: logical_to_sharding(spec, leaf.shape, mesh, rules),
                      logical_specs, abstract_tree,
                      is_leaf=lambda x: isinstance(x, PartitionSpec))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Batches are split along their leading axis over data x fsdp and replicated over tensor."""
  return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules=LOGICAL_AXIS_RULES):
  """Context under which the model's `constrain` calls become real sharding constraints."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def jit(fn: Callable, mesh: Mesh, in_shardings: Any, out_shardings: Any,
        donate_argnums: Sequence[int] = ()) -> Callable:
  """`jax.jit(fn)` with explicit shardings and donation, traced under `activation_sharding`.

  The model's logical `constrain` calls only mean something while the mesh and rules are set,
  i.e. at trace time, so every call (which traces on first use) enters that context. Donated
  arguments (the train state) are updated in place instead of keeping two copies alive.
  """
  jitted = jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings,
                   donate_argnums=tuple(donate_argnums))

  @functools.wraps(fn)
  def call(*args):
    with activation_sharding(mesh):
      return jitted(*args)

  def lower(*args):
    with activation_sharding(mesh):
      return jitted.lower(*args)

  call.lower = lower
  return call


@gin.configurable(module="t5x_lite.partitioning")
def initialize_distributed(coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None) -> None:
  """Joins this process to a multi-host run (`jax.distributed.initialize`) before any jax use.

  Nothing to do for a single process. `coordinator_address="auto"` lets jax detect the cluster
  (Cloud TPU pods, SLURM); otherwise give "host:port" of process 0, the process count and this
  process's id (0..num_processes-1). On CPU the processes talk through gloo collectives.
  """
  if coordinator_address is None and (num_processes or 1) == 1:
    return
  if coordinator_address == "auto":
    jax.distributed.initialize()
  else:
    if coordinator_address is None or num_processes is None or process_id is None:
      raise ValueError(
          "A multi-host run needs all of --coordinator_address=HOST:PORT (process 0's address), "
          f"--num_processes and --process_id; got {coordinator_address!r}, {num_processes!r}, "
          f"{process_id!r}.")
    if not 0 <= process_id < num_processes:
      raise ValueError(f"--process_id={process_id} must be in [0, {num_processes}).")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  logging.info("Process %d of %d, %d local / %d global devices.", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def data_parallel_size(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]


def data_shard_info(mesh: Mesh, global_batch_size: Optional[int] = None) -> tuple[int, int]:
  """(index, num_shards): which share of the data this process reads.

  Processes whose devices hold the same rows of the global batch (e.g. when the `tensor` axis
  spans hosts) read the same shard; the per-process batch is `global_batch_size // num_shards`.
  With `global_batch_size`, also checks that the data-parallel size divides it.
  """
  slots = data_parallel_size(mesh)
  if global_batch_size is not None and global_batch_size % slots:
    raise ValueError(
        f"BATCH_SIZE={global_batch_size} is not divisible by the data-parallel size "
        f"data x fsdp = {mesh.shape['data']} x {mesh.shape['fsdp']} = {slots}; "
        "choose a multiple of it, or change make_mesh.data / make_mesh.fsdp.")
  # One row per data-parallel slot is enough to see which process holds which rows.
  rows_of_process: dict[int, set[tuple[int, int]]] = {}
  for device, (rows,) in batch_sharding(mesh, 1).devices_indices_map((slots,)).items():
    rows_of_process.setdefault(device.process_index, set()).add(
        (rows.start or 0, slots if rows.stop is None else rows.stop))
  blocks = {}
  for process, ranges in rows_of_process.items():
    start, stop = min(r[0] for r in ranges), max(r[1] for r in ranges)
    if sum(b - a for a, b in ranges) != stop - start:
      raise ValueError(f"Process {process}'s devices hold non-contiguous rows {sorted(ranges)} of "
                       "the batch; order the mesh devices by process.")
    blocks[process] = (start, stop)
  distinct = sorted(set(blocks.values()))
  return distinct.index(blocks[jax.process_index()]), len(distinct)


def host_to_global(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's rows of a batch ([b_local, ...] numpy) -> global arrays sharded over data."""
  _, num_shards = data_shard_info(mesh)
  return {name: jax.make_array_from_process_local_data(
              batch_sharding(mesh, local.ndim), local,
              (local.shape[0] * num_shards,) + local.shape[1:])
          for name, local in batch.items()}
