"""Pipeline parallelism: a scanned layer stack split into stages over the mesh's `stage` axis
and run on a GPipe schedule over microbatches.

    TransformerConfig(..., pipeline_microbatches=8)  +  make_mesh(data=2, stage=4)

The stacked parameters keep their layout [L, ...]; only their logical name changes ("stage"
instead of "layers", see `transformer.Stack`), which the rules table maps onto the `stage` mesh
axis, so stage s holds layers [s * K, (s + 1) * K) with K = L / S. A checkpoint therefore moves
between pipelined and unpipelined meshes unchanged (Orbax reshards on restore).

The schedule is written as one computation that XLA partitions, not as per-device programs:
a state [S, r, l, d] holds what each stage works on; every iteration all stages run their K
layers at once (`jax.vmap` over the stage axis, split over the mesh's `stage` axis, so each
device runs only its own stage), then the state shifts by one stage (`jnp.roll`, which XLA
turns into a collective permute between neighbouring stages) and stage 0 takes the next
microbatch. After M + S - 1 iterations the last stage has produced every microbatch; in the
first and last S - 1 iterations some stages work on nothing that is kept (the bubble), so a
stage is idle (S - 1) / (M + S - 1) of the time (`bubble_fraction`). Gradients come from
differentiating the whole schedule, which is GPipe's backward pass in reverse order.

Letters: S stages, K layers per stage, M microbatches, T = M + S - 1 iterations, b rows,
r = b / M rows per microbatch.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

Array = jax.Array
# layer_fn(one layer's params, x [r, l, d], that microbatch's args, layer index, microbatch
# index) -> x [r, l, d]
LayerFn = Callable[[Any, Array, tuple, Array, Array], Array]


def mesh_stages() -> int:
  """Slots of the `stage` axis of the mesh being traced under (1 outside a mesh)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or "stage" not in mesh.axis_names:
    return 1
  return mesh.shape["stage"]


def bubble_fraction(stages: int, microbatches: int) -> float:
  """Share of a stage's iterations spent on no real microbatch: (S - 1) / (M + S - 1)."""
  return (stages - 1) / (microbatches + stages - 1)


def check(num_layers: int, stages: int, microbatches: int, rows: Optional[int] = None,
          what: str = "stack") -> None:
  """Raises a ValueError saying how to fix a split that cannot work."""
  if microbatches < 1:
    raise ValueError(f"A pipeline needs TransformerConfig.pipeline_microbatches >= 1, got "
                     f"{microbatches}.")
  if num_layers % stages:
    divisors = [n for n in range(1, num_layers + 1) if num_layers % n == 0]
    raise ValueError(
        f"The {what}'s {num_layers} layers do not split into make_mesh.stage={stages} pipeline "
        f"stages; choose a stage count among {divisors}, or change the number of layers.")
  if rows is not None and rows % microbatches:
    raise ValueError(
        f"TransformerConfig.pipeline_microbatches={microbatches} must divide the {rows} rows "
        "each pipeline pass gets (BATCH_SIZE / train.num_microbatches); choose a divisor of it.")


def describe(config, mesh_shape: dict, batch_size: int, accumulation_steps: int = 1) -> str:
  """Checks a run's pipeline before any work; returns the start-up line that says its bubble
  ("" without a pipeline).

  One forward pass gets `batch_size / accumulation_steps` rows (train.num_microbatches: the
  trainer's gradient accumulation, which the pipeline's microbatches then split further).
  """
  stages = mesh_shape.get("stage", 1)
  microbatches = config.pipeline_microbatches
  if not microbatches:
    if stages > 1:
      raise ValueError(
          f"make_mesh.stage={stages} splits the layers into pipeline stages, which needs "
          f"TransformerConfig.pipeline_microbatches >= 1 (e.g. {4 * stages}); or set "
          "make_mesh.stage=1.")
    return ""
  # A batch the accumulation steps do not divide is the trainer's to refuse.
  rows = batch_size // accumulation_steps if batch_size % accumulation_steps == 0 else None
  depths = config.stack_depths
  for what, depth in depths.items():
    check(depth, stages, microbatches, rows, what)
  per_stage = ", ".join(f"{what} {depth // stages}" for what, depth in depths.items())
  shape = f"{microbatches} microbatches" + (f" of {rows // microbatches} rows" if rows else "")
  return (f"Pipeline: {stages} stages ({per_stage} layers each) x {shape}; bubble fraction "
          f"(S-1)/(M+S-1) = {stages - 1}/{microbatches + stages - 1} = "
          f"{bubble_fraction(stages, microbatches):.1%} of each stage's time idle.")


def split_rows(x: Array, microbatches: int) -> Array:
  """[b, ...] -> [M, b/M, ...]; microbatch j takes rows j, j+M, ..., so a device's contiguous
  block of rows splits locally (as the trainer's gradient-accumulation microbatches)."""
  x = x.reshape((x.shape[0] // microbatches, microbatches) + x.shape[1:])
  return x.swapaxes(0, 1)


def merge_rows(x: Array) -> Array:
  """The inverse of `split_rows`: [M, b/M, ...] -> [b, ...]."""
  x = x.swapaxes(0, 1)
  return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def _constrain(x: Array, leading: Sequence[str]) -> Array:
  """`x` with its leading dims split as the logical activation names say; XLA chooses the
  rest. A no-op outside a mesh and rules context."""
  if jax.sharding.get_abstract_mesh().empty or not nn.get_logical_axis_rules():
    return x
  axes = tuple(nn.logical_to_mesh_axes(tuple(leading)))
  return jax.lax.with_sharding_constraint(
      x, PartitionSpec(*axes, *[PartitionSpec.UNCONSTRAINED] * (x.ndim - len(axes))))


def _stage_axis_name():
  """The mesh axes the stage dim is split over (vmap's spmd_axis_name), or None."""
  if jax.sharding.get_abstract_mesh().empty or not nn.get_logical_axis_rules():
    return None
  (axes,) = nn.logical_to_mesh_axes(("activation_stage",))
  return axes


# Fields of the layers' arguments that are lookup tables shared by all rows, even where their
# leading size happens to equal the rows' (attention.RelativeBias.table: [buckets, h]).
SHARED_FIELDS = ("table",)


def _is_per_row(path, leaf, rows: int) -> bool:
  """Whether an argument leaf has one entry per row of the batch (and is split with it)."""
  shared = bool(path) and getattr(path[-1], "name", None) in SHARED_FIELDS
  return not shared and getattr(leaf, "ndim", 0) > 0 and leaf.shape[0] == rows


def run(layer_fn: LayerFn, params, x: Array, args: tuple, microbatches: int,
        stages: Optional[int] = None, what: str = "stack") -> Array:
  """The stack's output [b, l, d] for input `x` [b, l, d]: `params` (stacked [L, ...]) split
  into `stages` (default: the mesh's) and run on the GPipe schedule over `microbatches`.

  `args` are the layers' other inputs (pytrees): a leaf whose leading dim is b has one row per
  row of `x` (masks, positions, encoder outputs) and is split with it; anything else (and the
  `SHARED_FIELDS`) is passed whole to every stage.
  """
  stages = mesh_stages() if stages is None else stages
  num_layers = jax.tree.leaves(params)[0].shape[0]
  rows = x.shape[0]
  check(num_layers, stages, microbatches, rows, what)
  per_layer = num_layers // stages
  stage_params = jax.tree.map(
      lambda p: _constrain(p.reshape((stages, per_layer) + p.shape[1:]), ("stage",)), params)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(args)
  per_row = [_is_per_row(path, leaf, rows) for path, leaf in leaves]
  micro_args = [split_rows(leaf, microbatches) if split else None
                for (_, leaf), split in zip(leaves, per_row)]
  micro_x = split_rows(x, microbatches)
  stage_ids = jnp.arange(stages)

  def stage(params_s, x_s, args_s, micro_id, stage_id):
    """One stage's K layers on its microbatch."""
    full_args = treedef.unflatten([mine if split else leaf for (_, leaf), mine, split
                                   in zip(leaves, args_s, per_row)])
    def layer(y, inputs):
      layer_params, k = inputs
      return layer_fn(layer_params, y, full_args, stage_id * per_layer + k, micro_id), None
    return jax.lax.scan(layer, x_s, (params_s, jnp.arange(per_layer)))[0]

  run_stages = jax.vmap(stage, spmd_axis_name=_stage_axis_name())
  activation = ("activation_stage", "activation_batch")

  def iteration(state, t):
    # Stage s gets what stage s - 1 made last iteration (microbatch t - s); stage 0 the next
    # microbatch (after the last one, a repeat of it, whose outputs are never kept).
    fresh = jax.lax.dynamic_index_in_dim(micro_x, jnp.minimum(t, microbatches - 1), 0, False)
    shifted = jnp.roll(state, 1, axis=0)
    first = (stage_ids == 0).reshape((stages,) + (1,) * fresh.ndim)
    state = _constrain(jnp.where(first, fresh[None], shifted), activation)
    micro_ids = jnp.clip(t - stage_ids, 0, microbatches - 1)
    stage_args = [None if a is None else _constrain(a[micro_ids], activation)
                  for a in micro_args]
    state = _constrain(run_stages(stage_params, state, stage_args, micro_ids, stage_ids),
                       activation)
    return state, state[stages - 1]

  state = _constrain(jnp.zeros((stages,) + micro_x.shape[1:], x.dtype), activation)
  _, outputs = jax.lax.scan(iteration, state, jnp.arange(microbatches + stages - 1))
  return merge_rows(outputs[stages - 1:])  # the last stage's output of microbatch t - (S - 1)
