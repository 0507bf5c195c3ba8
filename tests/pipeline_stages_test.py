"""Pipeline stages: same loss and gradients as one device on pipelined meshes (decoder and
encoder-decoder, with remat and gradient accumulation, GPipe and circular), checkpoints across
pipelined and unpipelined meshes, decoding a pipelined run's checkpoint, the bubble line and bad
input."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import t5x_lite
from t5x_lite import checkpoints, models, optimizers, partitioning, pipeline_stages
from t5x_lite import trainer as trainer_lib
from t5x_lite.config import TransformerConfig

# Layers per stack: 8 split into 4 stages x 2 repeats, 4 (+4) into 2 x 2.
LAYERS = {"llama_tiny": ["TransformerConfig.num_layers = 8"],
          "t5_tiny": ["TransformerConfig.num_layers = 4",
                      "TransformerConfig.num_decoder_layers = 4"]}


def pipelined(model, pipeline_microbatches, **changes):
  return type(model)(model.config.replace(pipeline_microbatches=pipeline_microbatches,
                                          **changes))


def random_batch(model, rows=8, seed=0):
  rng = np.random.default_rng(seed)
  batch = model.dummy_batch(rows, {"inputs": 12, "targets": 10})
  batch = {k: rng.integers(1, 500, v.shape).astype(np.int32) for k, v in batch.items()}
  for name in batch:
    if name.endswith("loss_weights"):
      batch[name] = (rng.random(batch[name].shape) < 0.8).astype(np.int32)
  return batch


def loss_and_grads(model, params, batch, mesh, accumulation=1):
  """(loss, gradients, parameter shardings) of `model.loss_fn` jitted on `mesh`, over
  `accumulation` gradient-accumulation microbatches as the trainer does."""
  shapes, specs = model.abstract_params(batch)
  shardings = partitioning.tree_shardings(shapes, specs, mesh)
  batch_shardings = {k: partitioning.batch_sharding(mesh) for k in batch}

  def fn(p, b):
    grads, metrics = trainer_lib.accumulate_gradients(
        lambda q, rows, _: model.loss_fn(q, rows), p, b, jax.random.PRNGKey(0), accumulation)
    return metrics["loss"].compute(), grads

  step = partitioning.jit(fn, mesh, in_shardings=(shardings, batch_shardings),
                          out_shardings=(partitioning.replicated(mesh), shardings))
  loss, grads = step(jax.device_put(params, shardings), jax.device_put(batch, batch_shardings))
  return float(loss), jax.device_get(grads), shardings


@pytest.fixture(scope="module")
def references():
  """{preset: (model with LAYERS, its params, a batch, loss and gradients on one device)},
  made when a test first asks for the preset."""
  made = {}

  def reference(preset):
    if preset not in made:
      model = models.from_gin(preset, LAYERS[preset])
      batch = random_batch(model)
      params = jax.device_get(model.init(jax.random.PRNGKey(0), batch))
      one_device = partitioning.make_mesh(devices=jax.devices()[:1])
      made[preset] = (model, params, batch) + loss_and_grads(model, params, batch,
                                                            one_device)[:2]
    return made[preset]
  return reference


# Remat and gradient accumulation (the trainer's microbatches, split again by the pipeline's)
# each on some of the meshes: every case is a compile. Circular (repeats 2): on 4 stages with
# as many microbatches (a microbatch leaves the last stage just as stage 0 wants it back), and
# on 2 stages with 4 (it waits two iterations in the buffer).
@pytest.mark.parametrize("preset, mesh_sizes, changes, accumulation", [
    ("llama_tiny", {"data": 2, "stage": 4}, {"remat_policy": "full"}, 2),
    ("llama_tiny", {"data": 1, "fsdp": 2, "tensor": 2, "stage": 2}, {}, 1),
    ("t5_tiny", {"data": 1, "fsdp": 2, "tensor": 2, "stage": 2}, {"remat_policy": "dots"}, 1),
    ("llama_tiny", {"data": 2, "stage": 4}, {"pipeline_microbatches": 4, "pipeline_repeats": 2},
     1),
    ("t5_tiny", {"data": 2, "tensor": 2, "stage": 2},
     {"pipeline_microbatches": 4, "pipeline_repeats": 2, "remat_policy": "full"}, 1),
], ids=["decoder-data2_stage4-remat-accumulate", "decoder-fsdp2_tensor2_stage2",
        "encdec-fsdp2_tensor2_stage2-remat",  # data 2 x stage 4 is the decoder's: a compile less
        "decoder-data2_stage4-circular2", "encdec-data2_tensor2_stage2-circular2-remat"])
def test_pipelined_loss_and_gradients_equal_one_devices(references, preset, mesh_sizes,
                                                        changes, accumulation, monkeypatch):
  model, params, batch, want_loss, want_grads = references(preset)
  mesh = partitioning.make_mesh(**mesh_sizes)
  stacks_run = []
  run = pipeline_stages.run
  monkeypatch.setattr(pipeline_stages, "run", lambda *a, **k: stacks_run.append(
      (k["what"], k["repeats"])) or run(*a, **k))
  changes = {"pipeline_microbatches": 2, **changes}
  loss, grads, shardings = loss_and_grads(pipelined(model, **changes), params, batch, mesh,
                                          accumulation)
  stacks = {"decoder"} if preset == "llama_tiny" else {"encoder", "decoder"}
  assert set(stacks_run) == {(stack, changes.get("pipeline_repeats", 1)) for stack in stacks}
  assert abs(loss - want_loss) <= 1e-5
  for path, got in jax.tree_util.tree_leaves_with_path(grads):
    want = want_grads
    for key in path:
      want = want[key.key]
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0,
                               err_msg=trainer_lib.param_path(path))
  # Each stage holds only its layers: the stacked axis is split over the stage axis.
  stacked = jax.tree.leaves(shardings["decoder"]["layers"])
  assert stacked and all(sharding.spec[0] == "stage" for sharding in stacked)


@pytest.mark.parametrize("stages, repeats, microbatches", [(4, 1, 4), (4, 2, 4), (2, 2, 4)])
def test_the_schedule_runs_every_layer_in_order_in_r_m_plus_s_minus_1_iterations(
    stages, repeats, microbatches):
  """Without a mesh: each row goes through the 8 layers in order, each layer told its index and
  the row's microbatch (what the dropout keys are made of), in R M + S - 1 iterations."""
  rng = np.random.default_rng(0)
  weights = jnp.asarray(rng.normal(size=(8, 3, 3)) / 2, jnp.float32)
  x = jnp.asarray(rng.normal(size=(8, 2, 3)), jnp.float32)
  scale = jnp.arange(1.0, 9.0)[:, None, None]  # a per-row argument

  def layer_fn(w, y, args, index, microbatch):
    return jnp.tanh(y @ w) * args[0] + index + 0.01 * microbatch

  def pipelined_stack(w, x, scale):
    return pipeline_stages.run(layer_fn, w, x, (scale,), microbatches, stages=stages,
                               repeats=repeats)

  want, row_microbatch = x, jnp.arange(8)[:, None, None] % microbatches  # see split_rows
  for index in range(8):
    want = layer_fn(weights[index], want, (scale,), index, row_microbatch)
  np.testing.assert_allclose(jax.jit(pipelined_stack)(weights, x, scale), want, atol=1e-5)
  loops = [e for e in jax.make_jaxpr(pipelined_stack)(weights, x, scale).eqns
           if e.primitive.name == "scan"]
  assert [e.params["length"] for e in loops] == [repeats * microbatches + stages - 1]


# ------------------------------------------------------------------ checkpoints and decoding

@pytest.fixture(scope="module")
def llama(references):
  return references("llama_tiny")[:2]


def make_trainer(model, mesh):
  shapes = {k: (8, 10) for k in model.REQUIRED_FEATURES}
  return trainer_lib.Trainer(model, optimizers.create_optimizer("adamw"), mesh, shapes)


def save_state(directory, state):
  with checkpoints.CheckpointManager(directory, save_interval_steps=1) as manager:
    assert manager.save(int(state.step), state, batches_consumed=int(state.step))
    manager.wait_until_finished()


@pytest.fixture(scope="module")
def pipelined_run(llama, tmp_path_factory):
  """A circular pipelined trainer's state on a (data 2, stage 4) mesh, saved (the gradient
  tests above check the steps; an optimizer state off its initial values is enough here). The
  stored layout is the same whatever the repeats."""
  model, params = llama
  trainer = make_trainer(pipelined(model, 4, pipeline_repeats=2),
                         partitioning.make_mesh(data=2, stage=4))
  state = trainer_lib.state_around(params, trainer.optimizer, jax.random.PRNGKey(3))
  state = state.replace(step=state.step + 3, opt_state=jax.tree.map(
      lambda x: x + 0.5 if x.dtype == np.float32 else x, state.opt_state))
  state = jax.device_put(state, trainer.state_shardings)
  directory = str(tmp_path_factory.mktemp("pipelined_run"))
  save_state(directory, state)
  return trainer, directory, jax.device_get(state)


def assert_trees_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_a_pipelined_checkpoint_restores_unpipelined_and_back(llama, pipelined_run, tmp_path):
  piped_trainer, piped_dir, saved = pipelined_run
  flat = make_trainer(llama[0], partitioning.make_mesh(data=8))  # a plain data-parallel run
  with checkpoints.CheckpointManager(piped_dir) as manager:
    restored, _ = manager.restore(flat.abstract_state)
  assert_trees_equal(restored, saved)
  kernel = restored.params["decoder"]["layers"]["mlp"]["wi_0"]["kernel"]
  assert kernel.sharding.spec[0] is None

  # And back: the unpipelined state onto the pipelined mesh, each stage its layers.
  flat_dir = str(tmp_path / "flat")
  save_state(flat_dir, restored)
  with checkpoints.CheckpointManager(flat_dir) as manager:
    again, _ = manager.restore(piped_trainer.abstract_state)
  assert_trees_equal(again, saved)
  kernel = again.params["decoder"]["layers"]["mlp"]["wi_0"]["kernel"]
  assert kernel.sharding.spec[0] == "stage"


def test_a_pipelined_runs_params_decode(llama, pipelined_run, tmp_path):
  piped_trainer, _, saved = pipelined_run
  export = str(tmp_path / "export")
  checkpoints.save_params(export, saved.params, checkpoints.model_gin(piped_trainer.model))
  loaded = t5x_lite.load(export)
  config = loaded.model.config  # the checkpoint's model, pipelined
  assert (config.pipeline_microbatches, config.pipeline_repeats) == (4, 2)
  prompt = jnp.asarray([[0, 17, 42, 99]], jnp.int32)
  tokens, _ = loaded.model.predict_batch(
      loaded.params, {"decoder_input_tokens": prompt,
                      "decoder_causal_attention": jnp.ones_like(prompt)},
      max_new_tokens=3)
  tokens = np.asarray(tokens)[0, 0]
  if 1 in tokens:  # after EOS (1), a row holds 0: compare up to it
    tokens = tokens[:list(tokens).index(1) + 1]
  # Greedy: each new token is the argmax of the teacher-forced logits before it.
  sequence = jnp.concatenate([prompt, jnp.asarray(tokens[None, :-1])], axis=1)
  logits = jax.jit(lambda p, t: loaded.model.logits(
      p, {"decoder_input_tokens": t, "decoder_target_tokens": t,
          "decoder_loss_weights": jnp.ones_like(t)}))(loaded.params, sequence)
  np.testing.assert_array_equal(np.argmax(np.asarray(logits)[0, 3:], axis=-1), tokens)


# ------------------------------------------------------------------ start-up line, bad input

def test_the_start_up_line_gives_the_bubble_fraction():
  config = TransformerConfig(family="encoder_decoder", num_layers=4, num_decoder_layers=8,
                             pipeline_microbatches=8)
  line = pipeline_stages.describe(config, {"data": 2, "stage": 4}, batch_size=32,
                                  accumulation_steps=2)
  assert line == ("Pipeline: 4 stages (encoder 1, decoder 2 layers each) x 8 microbatches of 2 "
                  "rows; bubble fraction (S-1)/(M+S-1) = 3/11 = 27.3% of each stage's time idle.")
  assert pipeline_stages.bubble_fraction(1, 8) == 0.0
  circular = TransformerConfig(num_layers=8, pipeline_microbatches=8, pipeline_repeats=2)
  assert pipeline_stages.describe(circular, {"data": 2, "stage": 4}, batch_size=16) == (
      "Pipeline: 4 stages x 2 repeats, circular (8 groups of stack 1 layers; stage s runs "
      "groups s, s+4, ...) x 8 microbatches of 2 rows; bubble fraction (S-1)/(R*M+S-1) = 3/19 "
      "= 15.8% of each stage's time idle (GPipe's, R=1: 27.3%).")
  assert pipeline_stages.describe(TransformerConfig(), {"stage": 1}, 8) == ""


@pytest.mark.parametrize("config, mesh_shape, batch_size, message", [
    (dict(num_layers=6, pipeline_microbatches=4), {"stage": 4}, 8,
     r"stack's 6 layers do not split into make_mesh.stage=4 pipeline stages; choose a stage "
     r"count among \[1, 2, 3, 6\]"),
    (dict(family="encoder_decoder", num_layers=4, num_decoder_layers=6,
          pipeline_microbatches=4), {"stage": 4}, 8, "decoder's 6 layers do not split"),
    (dict(num_layers=4, pipeline_microbatches=3), {"stage": 2}, 8,
     "pipeline_microbatches=3 must divide the 8 rows"),
    (dict(num_layers=4), {"stage": 2}, 8,
     r"make_mesh.stage=2 splits the layers into pipeline stages, which needs "
     r"TransformerConfig.pipeline_microbatches >= 1 \(e.g. 8\); or set make_mesh.stage=1"),
    (dict(num_layers=4, pipeline_microbatches=4, pipeline_repeats=2), {"stage": 4}, 8,
     r"stack's 4 layers do not split into make_mesh.stage=4 x "
     r"TransformerConfig.pipeline_repeats=2 = 8 layer groups; choose stages and repeats whose "
     r"product is among \[1, 2, 4\]"),
    (dict(num_layers=8, pipeline_microbatches=2, pipeline_repeats=2), {"stage": 4}, 8,
     r"pipeline_repeats=2 \(a circular pipeline\) needs pipeline_microbatches >= "
     r"make_mesh.stage=4, got 2.*set pipeline_microbatches >= 4, or pipeline_repeats=1"),
])
def test_a_split_that_cannot_work_is_refused_with_the_fix(config, mesh_shape, batch_size,
                                                          message):
  with pytest.raises(ValueError, match=message):
    pipeline_stages.describe(TransformerConfig(**config), mesh_shape, batch_size)


def test_bad_configs_are_refused_with_the_fix():
  with pytest.raises(ValueError, match="pipeline_microbatches=4 needs scan_layers=True"):
    TransformerConfig(scan_layers=False, pipeline_microbatches=4)
  with pytest.raises(ValueError, match="does not support mlp='moe'"):
    TransformerConfig(mlp="moe", num_experts=4, pipeline_microbatches=4)
  with pytest.raises(ValueError, match="must be >= 0"):
    TransformerConfig(pipeline_microbatches=-1)
  with pytest.raises(ValueError, match="pipeline_repeats must be >= 1"):
    TransformerConfig(pipeline_microbatches=4, pipeline_repeats=0)
  with pytest.raises(ValueError, match="pipeline_repeats=2 only applies to a pipeline: set "
                                       "pipeline_microbatches"):
    TransformerConfig(pipeline_repeats=2)
  with pytest.raises(ValueError, match=r"pipeline_repeats=4 does not divide the decoder's 6 "
                                       r"layers .*choose among \[1, 2, 3, 6\]"):
    TransformerConfig(family="encoder_decoder", num_layers=4, num_decoder_layers=6,
                      pipeline_microbatches=4, pipeline_repeats=4)
  # Decoding unrolls the layers, which turns the pipeline off rather than failing.
  unrolled = TransformerConfig(num_layers=4, pipeline_microbatches=4,
                               pipeline_repeats=2).replace(scan_layers=False)
  assert (unrolled.pipeline_microbatches, unrolled.pipeline_repeats) == (0, 1)


def test_the_stack_refuses_a_mesh_whose_stages_do_not_divide_its_layers(llama):
  model = pipelined(llama[0], 8, pipeline_repeats=2)
  batch = random_batch(model)
  shapes, _ = model.abstract_params(batch)
  with partitioning.activation_sharding(partitioning.make_mesh(data=1, stage=8)):
    with pytest.raises(ValueError, match="decoder's 8 layers do not split into "
                                         "make_mesh.stage=8 x TransformerConfig.pipeline_"
                                         "repeats=2 = 16 layer groups"):
      jax.eval_shape(model.loss_fn, shapes, batch)
