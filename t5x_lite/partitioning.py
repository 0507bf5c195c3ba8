"""Device mesh and the one table that maps logical axis names onto it.

Model code names every parameter and activation axis logically (`batch`, `embed`, `heads`, ...);
`LOGICAL_AXIS_RULES` decides which mesh axis (`data`, `fsdp`, `tensor`) each one is split over.
Changing the parallelism of a run is therefore a change of mesh sizes in gin, never of code.
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional, Sequence

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
