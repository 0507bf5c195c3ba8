"""Pipeline parallelism: a scanned layer stack split into stages over the mesh's `stage` axis
and run on a GPipe schedule over microbatches, optionally circular (interleaved stages).

    TransformerConfig(..., pipeline_microbatches=8)                       +  make_mesh(stage=4)
    TransformerConfig(..., pipeline_microbatches=8, pipeline_repeats=2)   +  make_mesh(stage=4)

The stacked parameters keep their layout [L, ...]; only their logical name changes ("stage"
instead of "layers", see `transformer.Stack`), which the rules table maps onto the `stage` mesh
axis. A checkpoint therefore moves between pipelined and unpipelined meshes unchanged (Orbax
reshards on restore), whatever the repeats.

The stack is cut into S * R layer groups of K = L / (S R) layers; group g = r S + s is stage s's
r-th group, so stage s runs groups s, s + S, s + 2 S, ... (with R = 1, plain GPipe: stage s holds
layers [s K, (s + 1) K)). A microbatch goes through stages 0 .. S-1 R times, around the ring.

The schedule is written as one computation that XLA partitions, not as per-device programs:
a state [S, r, l, d] holds what each stage works on; every iteration all stages run one group
of K layers at once (`jax.vmap` over the stage axis, split over the mesh's `stage` axis, so
each device runs only its own stage), then the state shifts by one stage (`jnp.roll`, which XLA
turns into a collective permute between neighbouring stages). Stage 0 takes microbatch t mod M
from a buffer [M, r, l, d] that starts as the inputs and into which the last stage writes each
microbatch it finishes: in repeat 0 stage 0 reads an input, later the output of the previous
repeat, which is there in time when M >= S. Each stage runs G = R M (microbatch, repeat) pairs in
T = G + S - 1 iterations; in the first and last S - 1 some stages work on nothing that is kept
(the bubble), so a stage is idle (S - 1) / (R M + S - 1) of the time (`bubble_fraction`): the
repeats shrink the bubble R-fold because each iteration is R times shorter. Gradients come
from differentiating the whole schedule, which is GPipe's backward pass in reverse order.

With R > 1 the stored layout (stage s holds layers [s R K, (s + 1) R K)) is not the one the
ring runs (stage s holds groups s, s + S, ...): each pass regroups the stack's parameters across
the stage axis once (and its gradients back), before and after the loop, not per iteration.
MaxText stores the [R, S, ...] layout instead and so avoids it, at the price of checkpoints that
differ from unpipelined runs'.

Letters: S stages, R repeats, K layers per group, M microbatches, b rows, r = b / M rows per
microbatch.
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


def bubble_fraction(stages: int, microbatches: int, repeats: int = 1) -> float:
  """Share of a stage's iterations spent on no real microbatch: (S - 1) / (R M + S - 1)."""
  return (stages - 1) / (repeats * microbatches + stages - 1)


def check(num_layers: int, stages: int, microbatches: int, rows: Optional[int] = None,
          what: str = "stack", repeats: int = 1) -> None:
  """Raises a ValueError saying how to fix a split that cannot work."""
  if microbatches < 1:
    raise ValueError(f"A pipeline needs TransformerConfig.pipeline_microbatches >= 1, got "
                     f"{microbatches}.")
  if repeats < 1:
    raise ValueError(f"TransformerConfig.pipeline_repeats must be >= 1 (1: GPipe), got "
                     f"{repeats}.")
  divisors = [n for n in range(1, num_layers + 1) if num_layers % n == 0]
  if repeats == 1 and num_layers % stages:
    raise ValueError(
        f"The {what}'s {num_layers} layers do not split into make_mesh.stage={stages} pipeline "
        f"stages; choose a stage count among {divisors}, or change the number of layers.")
  if num_layers % (stages * repeats):
    raise ValueError(
        f"The {what}'s {num_layers} layers do not split into make_mesh.stage={stages} x "
        f"TransformerConfig.pipeline_repeats={repeats} = {stages * repeats} layer groups; "
        f"choose stages and repeats whose product is among {divisors}, or "
        "change the number of layers.")
  if repeats > 1 and microbatches < stages:
    raise ValueError(
        f"TransformerConfig.pipeline_repeats={repeats} (a circular pipeline) needs "
        f"pipeline_microbatches >= make_mesh.stage={stages}, got {microbatches}: a microbatch "
        "leaving the last stage goes back to stage 0, which must have finished the others "
        f"first; set pipeline_microbatches >= {stages}, or pipeline_repeats=1.")
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
  microbatches, repeats = config.pipeline_microbatches, config.pipeline_repeats
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
    check(depth, stages, microbatches, rows, what, repeats)
  groups = stages * repeats
  shape = f"{microbatches} microbatches" + (f" of {rows // microbatches} rows" if rows else "")
  bubble = bubble_fraction(stages, microbatches, repeats)
  if repeats == 1:
    per_stage = ", ".join(f"{what} {depth // stages}" for what, depth in depths.items())
    return (f"Pipeline: {stages} stages ({per_stage} layers each) x {shape}; bubble fraction "
            f"(S-1)/(M+S-1) = {stages - 1}/{microbatches + stages - 1} = {bubble:.1%} of each "
            "stage's time idle.")
  per_group = ", ".join(f"{what} {depth // groups}" for what, depth in depths.items())
  return (f"Pipeline: {stages} stages x {repeats} repeats, circular ({groups} groups of "
          f"{per_group} layers; stage s runs groups s, s+{stages}, ...) x {shape}; bubble "
          f"fraction (S-1)/(R*M+S-1) = {stages - 1}/{repeats * microbatches + stages - 1} = "
          f"{bubble:.1%} of each stage's time idle (GPipe's, R=1: "
          f"{bubble_fraction(stages, microbatches):.1%}).")


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


def _layer_groups(params, stages: int, repeats: int):
  """Stacked [L, ...] -> [R, S, K, ...] (layer (r S + s) K + k), the S dim split over the stage
  axis, so each stage holds its R groups (with R > 1 a regrouping across stages)."""
  per_group = jax.tree.leaves(params)[0].shape[0] // (stages * repeats)
  return jax.tree.map(lambda p: _constrain(
      p.reshape((repeats, stages, per_group) + p.shape[1:]), (None, "stage")), params)


def run(layer_fn: LayerFn, params, x: Array, args: tuple, microbatches: int,
        stages: Optional[int] = None, what: str = "stack", repeats: int = 1) -> Array:
  """The stack's output [b, l, d] for input `x` [b, l, d]: `params` (stacked [L, ...]) split
  into `stages` (default: the mesh's) x `repeats` layer groups and run on the (circular, with
  repeats > 1) GPipe schedule over `microbatches`.

  `args` are the layers' other inputs (pytrees): a leaf whose leading dim is b has one row per
  row of `x` (masks, positions, encoder outputs) and is split with it; anything else (and the
  `SHARED_FIELDS`) is passed whole to every stage.
  """
  stages = mesh_stages() if stages is None else stages
  num_layers = jax.tree.leaves(params)[0].shape[0]
  rows = x.shape[0]
  check(num_layers, stages, microbatches, rows, what, repeats)
  per_group = num_layers // (stages * repeats)
  group_params = _layer_groups(params, stages, repeats)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(args)
  per_row = [_is_per_row(path, leaf, rows) for path, leaf in leaves]
  micro_args = [split_rows(leaf, microbatches) if split else None
                for (_, leaf), split in zip(leaves, per_row)]

  def stage(params_s, x_s, args_s, micro_id, repeat_id, stage_id):
    """One stage's group of K layers for repeat `repeat_id` on its microbatch."""
    if repeats > 1:
      params_s = jax.tree.map(lambda p: jax.lax.dynamic_index_in_dim(p, repeat_id, 0, False),
                              params_s)
    else:
      params_s = jax.tree.map(lambda p: p[0], params_s)
    full_args = treedef.unflatten([mine if split else leaf for (_, leaf), mine, split
                                   in zip(leaves, args_s, per_row)])
    first_layer = (repeat_id * stages + stage_id) * per_group

    def layer(y, inputs):
      layer_params, k = inputs
      return layer_fn(layer_params, y, full_args, first_layer + k, micro_id), None
    return jax.lax.scan(layer, x_s, (params_s, jnp.arange(per_group)))[0]

  run_stages = jax.vmap(stage, in_axes=(1, 0, 0, 0, 0, 0), spmd_axis_name=_stage_axis_name())
  return merge_rows(_schedule(run_stages, group_params, split_rows(x, microbatches),
                              micro_args, stages, repeats))


def _schedule(run_stages, group_params, micro_x: Array, micro_args: list, stages: int,
              repeats: int) -> Array:
  """The iterations of the schedule; returns the last stage's outputs [M, r, l, d]."""
  microbatches = micro_x.shape[0]
  pairs = repeats * microbatches  # the (microbatch, repeat) pairs each stage runs
  stage_ids = jnp.arange(stages)
  activation = ("activation_stage", "activation_batch")
  first = (stage_ids == 0).reshape((stages,) + (1,) * (micro_x.ndim - 1))

  def iteration(carry, t):
    state, buffer = carry
    # Stage s gets what stage s - 1 made last iteration; stage 0 microbatch t mod M as the
    # buffer holds it (an input in repeat 0, then the last repeat's output; after the last
    # pair, something whose outputs are never kept).
    fresh = jax.lax.dynamic_index_in_dim(buffer, t % microbatches, 0, False)
    state = _constrain(jnp.where(first, fresh[None], jnp.roll(state, 1, axis=0)), activation)
    started = jnp.clip(t - stage_ids, 0, pairs - 1)  # stage s runs pair t - s
    micro_ids, repeat_ids = started % microbatches, started // microbatches
    stage_args = [None if a is None else _constrain(a[micro_ids], activation)
                  for a in micro_args]
    state = _constrain(run_stages(group_params, state, stage_args, micro_ids, repeat_ids,
                                  stage_ids), activation)
    # The last stage finished pair t - (S - 1) (none yet while that is negative).
    done = t - (stages - 1)
    slot = jnp.maximum(done, 0) % microbatches
    kept = jax.lax.dynamic_index_in_dim(buffer, slot, 0, False)
    finished = jnp.where(done >= 0, state[stages - 1], kept)
    buffer = jax.lax.dynamic_update_index_in_dim(buffer, finished, slot, 0)
    return (state, _constrain(buffer, (None, "activation_batch"))), None

  state = _constrain(jnp.zeros((stages,) + micro_x.shape[1:], micro_x.dtype), activation)
  buffer = _constrain(micro_x, (None, "activation_batch"))
  (_, buffer), _ = jax.lax.scan(iteration, (state, buffer), jnp.arange(pairs + stages - 1))
  return buffer
