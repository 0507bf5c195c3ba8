"""Device mesh and the one table that maps logical axis names onto it.

Model code names every parameter and activation axis logically; the rules table decides which
mesh axes each name is split over. The table is `axis_rules()`, a gin-configurable function
(defaults: `DEFAULT_RULES`), and every function here that takes `rules` uses it unless given one,
so changing the parallelism of a run is a gin change (`make_mesh.*` sizes, `axis_rules.*`),
never a change of code.

Parameters and activations have distinct names. Parameters carry `embed`, `mlp`, `heads`,
`kv_heads`, `kv`, `qkv`, `vocab`, `layers`, `expert`, `stage`, ...; activations are named through
`layers.constrain`, which reads its short names (`batch`, `length`, `embed`, ...) as
`activation_batch`, `activation_length`, `activation_embed`, ... So weights and the activations
they multiply are split independently: by default a weight's `embed` axis is split over fsdp
(ZeRO-3 style) while activations keep `embed` whole and split `batch` over data x fsdp. Rule order
matters only between rules for the same name: a later one is a fallback, used where an earlier
one's mesh axes are already taken by another dimension of the same array.

The mesh always has the five axes of `MESH_AXES`; `expert` (MoE experts) and `stage` (pipeline
stages) have size 1 unless a run asks for more. The batch is split over the mesh axes of the
`activation_batch` rule (`batch_axes`), which is also what `batch_sharding`, `data_shard_info`
and `host_to_global` use.

It also holds what turns a function and host data into work on the mesh: `jit` (a `jax.jit`
with shardings and donation, traced under the rules), `initialize_distributed` (multi-host
start-up), `data_shard_info` (which slice of the global batch this process reads) and
`host_to_global` (this process's numpy rows -> one global jax.Array sharded over the batch axes).
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

Rules = tuple[tuple[str, Optional[str | tuple[str, ...]]], ...]

# Device layout, outermost axis first. Axes that talk most get the nearest devices: tensor
# exchanges activations in every layer, expert routes tokens (all-to-all) in every MoE layer,
# fsdp gathers weights per layer, stage passes activations only between stages, and data
# reduces gradients once per step. Size-1 axes do not change which device gets which slice.
MESH_AXES = ("data", "stage", "fsdp", "expert", "tensor")

DEFAULT_RULES: Rules = (
    # Parameters: the model width over fsdp (ZeRO-3 style), the wide axes over tensor.
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("expert", "expert"),  # the experts of an MoE layer, a group per expert-axis slot
    ("router", None),  # an MoE router's expert scores: small, so routing needs no communication
    ("stage", "stage"),  # the layers of a pipeline stage, a stage per stage-axis slot
    ("kv", None),
    ("qkv", None),  # the query/key/value axis of a fused qkv kernel (TransformerConfig.fused_qkv)
    ("layers", None),
    ("relpos_buckets", None),
    ("abspos_buckets", None),
    # Activations (`layers.constrain`): rows over every data-parallel axis, the model width
    # whole (a device holds whole rows of the residual stream), the wide axes over tensor.
    # Outside MoE layers the expert axis is one more data-parallel axis; inside, the experts'
    # buffers are split by expert and their rows by the other batch axes, so tokens reach their
    # experts with an all-to-all.
    ("activation_batch", ("data", "fsdp", "expert")),
    ("activation_expert_group", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_vocab", "tensor"),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_kv", None),
    ("activation_qkv", None),
    ("activation_expert", "expert"),
    ("activation_stage", "stage"),
)


@gin.configurable(module="t5x_lite.partitioning")
def axis_rules(rules: Sequence = DEFAULT_RULES, overrides: Sequence = ()) -> Rules:
  """The rules table of a run: `overrides` first (so they win), then `rules`.

  Bind `axis_rules.overrides` to move a few names, e.g. `[("activation_length", "tensor")]`
  (sequence-split activations), or `axis_rules.rules` to replace the whole table.
  """
  return _checked(tuple(overrides) + tuple(rules))


def _checked(rules: Sequence) -> Rules:
  """`rules` as a tuple of (name, None | mesh axis | tuple of mesh axes), or a ValueError."""
  checked = []
  for rule in rules:
    if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)):
      raise ValueError(f"Axis rule {rule!r} must be a pair (logical name, mesh axes).")
    axes = (rule[1],) if isinstance(rule[1], str) else tuple(rule[1] or ())
    unknown = [a for a in axes if a not in MESH_AXES]
    if unknown:
      raise ValueError(f"Axis rule {tuple(rule)!r} names mesh axes {unknown}; the mesh axes "
                       f"are {MESH_AXES}.")
    checked.append((rule[0], None if not axes else axes[0] if len(axes) == 1 else axes))
  return tuple(checked)


def _rules(rules: Optional[Sequence]) -> Rules:
  return axis_rules() if rules is None else _checked(rules)


@gin.configurable(module="t5x_lite.partitioning")
def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, expert: int = 1, stage: int = 1,
              devices: Optional[Sequence[jax.Device]] = None,
              axis_order: Sequence[str] = MESH_AXES) -> Mesh:
  """A mesh of all `MESH_AXES` over `devices` (default: all); one size may be -1 (the rest).

  `axis_order` lays the devices out, outermost axis first (see `MESH_AXES` for why).
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = _mesh_sizes({"data": data, "fsdp": fsdp, "tensor": tensor, "expert": expert,
                       "stage": stage}, len(devices))
  if sorted(axis_order) != sorted(MESH_AXES):
    raise ValueError(f"make_mesh.axis_order={tuple(axis_order)} must order exactly the axes "
                     f"{MESH_AXES}.")
  shape = tuple(sizes[name] for name in axis_order)
  return Mesh(np.asarray(devices).reshape(shape), tuple(axis_order))


def _mesh_sizes(sizes: dict[str, int], num_devices: int) -> dict[str, int]:
  """`sizes` with the -1 (if any) resolved, or a ValueError that says how to fix them."""
  free = [name for name, size in sizes.items() if size == -1]
  if len(free) > 1 or any(size == 0 or size < -1 for size in sizes.values()):
    raise ValueError(f"Mesh sizes {sizes} are invalid: use positive sizes and at most one -1 "
                     "(meaning: all remaining devices).")
  fixed = math.prod(size for size in sizes.values() if size != -1)
  if num_devices % fixed:
    raise ValueError(
        f"Mesh {sizes} needs a multiple of {fixed} devices but {num_devices} are available; "
        f"choose {' x '.join(sizes)} dividing {num_devices} (e.g. make_mesh.data = -1).")
  if free:
    sizes = dict(sizes, **{free[0]: num_devices // fixed})
  if math.prod(sizes.values()) != num_devices:
    raise ValueError(f"Mesh {sizes} has {math.prod(sizes.values())} slots but there are "
                     f"{num_devices} devices; set one axis to -1 to use them all.")
  return sizes


def logical_to_sharding(logical_spec: PartitionSpec, shape: Sequence[int], mesh: Mesh,
                        rules: Optional[Sequence] = None) -> NamedSharding:
  """Resolve a logical PartitionSpec for an array of `shape` (rules: default `axis_rules()`).

  A dimension whose size the mesh axes do not divide (a single K/V head over 2-way tensor
  parallelism, a 259-token byte vocabulary) is left whole rather than failing.
  """
  mesh_axes = tuple(nn.logical_to_mesh_axes(tuple(logical_spec), _rules(rules)))
  resolved = []
  for dim, axes in zip(shape, mesh_axes + (None,) * (len(shape) - len(mesh_axes))):
    kept = []
    for name in (axes,) if isinstance(axes, str) else tuple(axes or ()):
      if dim % (math.prod(mesh.shape[n] for n in kept) * mesh.shape[name]) == 0:
        kept.append(name)
    resolved.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return NamedSharding(mesh, PartitionSpec(*resolved))


def tree_shardings(abstract_tree, logical_specs, mesh: Mesh, rules: Optional[Sequence] = None):
  """Shardings for every leaf of `abstract_tree` from the matching logical specs."""
  rules = _rules(rules)
  return jax.tree.map(lambda spec, leaf: logical_to_sharding(spec, leaf.shape, mesh, rules),
                      logical_specs, abstract_tree,
                      is_leaf=lambda x: isinstance(x, PartitionSpec))


def batch_axes(rules: Optional[Sequence] = None) -> tuple[str, ...]:
  """The mesh axes a batch's rows are split over: those of the `activation_batch` rule."""
  (axes,) = nn.logical_to_mesh_axes(("activation_batch",), _rules(rules))
  return (axes,) if isinstance(axes, str) else tuple(axes or ())


def batch_sharding(mesh: Mesh, ndim: int = 2, rules: Optional[Sequence] = None) -> NamedSharding:
  """Batches are split along their leading axis over `batch_axes` and replicated otherwise."""
  return NamedSharding(mesh, PartitionSpec(batch_axes(rules) or None, *([None] * (ndim - 1))))


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Optional[Sequence] = None):
  """Context under which the model's `constrain` calls become real sharding constraints."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(_rules(rules)):
    yield


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def jit(fn: Callable, mesh: Mesh, in_shardings: Any, out_shardings: Any,
        donate_argnums: Sequence[int] = (), rules: Optional[Sequence] = None) -> Callable:
  """`jax.jit(fn)` with explicit shardings and donation, traced under `activation_sharding`.

  The model's logical `constrain` calls only mean something while the mesh and rules are set,
  i.e. at trace time, so every call (which traces on first use) enters that context. Donated
  arguments (the train state) are updated in place instead of keeping two copies alive. The
  rules are read once, here: jax reuses a trace, so a later change of the gin bindings must not
  reach only the functions traced after it.
  """
  rules = _rules(rules)
  jitted = jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings,
                   donate_argnums=tuple(donate_argnums))

  @functools.wraps(fn)
  def call(*args):
    with activation_sharding(mesh, rules):
      return jitted(*args)

  def lower(*args):
    with activation_sharding(mesh, rules):
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


def data_parallel_size(mesh: Mesh, rules: Optional[Sequence] = None) -> int:
  return math.prod(mesh.shape[axis] for axis in batch_axes(rules))


def data_shard_info(mesh: Mesh, global_batch_size: Optional[int] = None,
                    rules: Optional[Sequence] = None) -> tuple[int, int]:
  """(index, num_shards): which share of the data this process reads.

  Processes whose devices hold the same rows of the global batch (e.g. when the `tensor` axis
  spans hosts) read the same shard; the per-process batch is `global_batch_size // num_shards`.
  With `global_batch_size`, also checks that the data-parallel size divides it.
  """
  slots = data_parallel_size(mesh, rules)
  if global_batch_size is not None and global_batch_size % slots:
    axes = [a for a in batch_axes(rules) if mesh.shape[a] > 1]  # size-1 axes change nothing
    raise ValueError(
        f"BATCH_SIZE={global_batch_size} is not divisible by the data-parallel size "
        f"{' x '.join(axes)} = {' x '.join(str(mesh.shape[a]) for a in axes)} = {slots}; "
        f"choose a multiple of it, or change {' / '.join('make_mesh.' + a for a in axes)}.")
  # One row per data-parallel slot is enough to see which process holds which rows.
  rows_of_process: dict[int, set[tuple[int, int]]] = {}
  for device, (rows,) in batch_sharding(mesh, 1, rules).devices_indices_map((slots,)).items():
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


def host_to_global(batch: Mapping[str, np.ndarray], mesh: Mesh,
                   rules: Optional[Sequence] = None) -> dict[str, jax.Array]:
  """This process's rows of a batch ([b_local, ...] numpy) -> global arrays split over the
  batch axes."""
  _, num_shards = data_shard_info(mesh, rules=rules)
  return {name: jax.make_array_from_process_local_data(
              batch_sharding(mesh, local.ndim, rules), local,
              (local.shape[0] * num_shards,) + local.shape[1:])
          for name, local in batch.items()}
