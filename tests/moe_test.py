"""Mixture of experts (t5x_lite.moe): routing against a per-token loop, the two dispatch paths,
the auxiliary losses and statistics, layer groups in the scan, expert parallelism on the 8
simulated devices (with the all-to-alls read from the compiled HLO), cached decoding, packing and
padding, bf16, and the config's refusals."""
import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_lite import layers, models, moe, partitioning, trainer, transformer
from t5x_lite.config import TransformerConfig

SMALL = dict(family="decoder", vocab_size=64, d_model=16, num_heads=2, d_ff=24, num_layers=2,
             mlp="moe", num_experts=4, num_experts_per_token=2)


def _layer(**changes):
  """A lone MoE layer, its params for x [2, 6, 16], and x."""
  cfg = TransformerConfig(**{**SMALL, **changes})
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 6, cfg.d_model))
  params = nn.meta.unbox(moe.MoeMlp(cfg).init(jax.random.PRNGKey(0), x)["params"])
  return cfg, params, x


def _apply(cfg, params, x, mask=None):
  """(output, sown) of the layer; one compile per config (the tests share x's shape)."""
  return _apply_jit(cfg, params, x, jnp.ones(x.shape[:2], bool) if mask is None else mask)


@functools.partial(jax.jit, static_argnums=0)
def _apply_jit(cfg, params, x, mask):
  return moe.MoeMlp(cfg).apply({"params": params}, x, mask, mutable=layers.SOWN_COLLECTIONS)


def _per_token(cfg, params, x, mask):
  """The MoE layer written out token by token in numpy: router softmax, top k, the Mixtral
  renormalisation (Switch's full probability for k = 1), each chosen expert's MLP."""
  p = jax.tree.map(np.asarray, params)
  act = {"silu": lambda a: a / (1 + np.exp(-a)), "relu": lambda a: np.maximum(a, 0)}[
      cfg.activation]
  out = np.zeros(x.shape, np.float32)
  for b in range(x.shape[0]):
    for t in range(x.shape[1]):
      if not mask[b, t]:
        continue  # padding: no expert, the residual alone
      token = np.asarray(x[b, t], np.float64)
      logits = token @ p["router"]
      probs = np.exp(logits - logits.max())
      probs /= probs.sum()
      chosen = np.argsort(-probs, kind="stable")[:cfg.num_experts_per_token]
      weights = probs[chosen] / (probs[chosen].sum() if len(chosen) > 1 else 1.0)
      bias = lambda name, e: p[f"{name}_bias"][e] if cfg.use_bias else 0.0
      for e, w in zip(chosen, weights):
        if cfg.gated_mlp:
          h = act(token @ p["wi_0_kernel"][e]) * (token @ p["wi_1_kernel"][e])
        else:
          h = act(token @ p["wi_kernel"][e] + bias("wi", e))
        out[b, t] += w * (h @ p["wo_kernel"][e] + bias("wo", e))
  return out


@pytest.mark.parametrize("changes", [{}, dict(num_experts_per_token=1, gated_mlp=False,
                                               activation="relu", use_bias=True)])
def test_batched_routing_equals_a_per_token_loop(changes):
  cfg, params, x = _layer(**changes)
  if cfg.use_bias:  # zeros at init: make them show
    params = jax.tree.map(lambda p: p + 0.1, params)
  mask = np.ones(x.shape[:2], bool)
  mask[1, 4:] = False  # padding
  for dispatch in ("einsum", "ragged", "gather"):
    y, _ = _apply(cfg.replace(moe_dispatch=dispatch), params, x, jnp.asarray(mask))
    np.testing.assert_allclose(y, _per_token(cfg, params, x, mask), atol=1e-5)


def test_dropless_ragged_equals_einsum_and_capacity_drops_the_same_tokens_on_both_paths():
  cfg, params, x = _layer()
  outputs = {}
  for dispatch, factor in [("einsum", None), ("ragged", None), ("gather", None), ("einsum", 100.0),
                           ("einsum", 0.5), ("ragged", 0.5), ("gather", 0.5)]:
    outputs[dispatch, factor] = _apply(
        cfg.replace(moe_dispatch=dispatch, expert_capacity_factor=factor), params, x)
  dropless = outputs["einsum", None][0]
  for key in [("ragged", None), ("gather", None), ("einsum", 100.0)]:
    np.testing.assert_allclose(outputs[key][0], dropless, atol=1e-5)
  for path in ("ragged", "gather"):
    np.testing.assert_allclose(outputs[path, 0.5][0], outputs["einsum", 0.5][0], atol=1e-5)
  assert np.abs(outputs["einsum", 0.5][0] - dropless).max() > 1e-3  # some tokens were dropped
  dropped = lambda key: outputs[key][1][layers.SOWN_METRICS]["moe/dropped_token_fraction"][0]
  np.testing.assert_array_equal(dropped(("einsum", None)), [0.0, 24.0])  # [dropped, assigned]
  # ceil(0.5 * 2 * 6 / 4) = 2 slots per expert and row: at most 16 of the 24 assignments fit.
  assert moe.capacity(cfg.replace(expert_capacity_factor=0.5), 6) == 2
  assert float(dropped(("ragged", 0.5))[0]) >= 8
  np.testing.assert_array_equal(dropped(("ragged", 0.5)), dropped(("einsum", 0.5)))


def test_shared_experts_add_a_dense_mlp_every_token_passes_through():
  cfg, params, x = _layer(num_shared_experts=2, moe_dispatch="einsum")
  routed = {k: v for k, v in params.items() if k != "shared_experts"}
  y, _ = _apply(cfg, params, x)
  y_routed, _ = _apply(cfg.replace(num_shared_experts=0), routed, x)
  shared = layers.Mlp(cfg.replace(d_ff=2 * cfg.d_ff)).apply(
      {"params": params["shared_experts"]}, x)
  np.testing.assert_allclose(y, y_routed + shared, atol=1e-5)
  model = models.from_gin("mixtral_tiny", ["TransformerConfig.num_shared_experts = 1"])
  assert model.num_params() == model.analytic_param_counts()[0]
  assert model.num_params(active=True) - models.from_gin("mixtral_tiny").num_params(
      active=True) == 2 * 3 * 64 * 128  # one SwiGLU expert per layer


def test_bf16_experts_follow_float32():
  cfg, params, x = _layer()
  cfg = cfg.replace(moe_dispatch="einsum")  # compiled already by the test above
  y, _ = _apply(cfg, params, x)
  y16, _ = _apply(cfg.replace(dtype="bfloat16"), params, x)
  assert y16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y16, np.float32), y, atol=0.05 * float(jnp.abs(y).max()))


@functools.partial(jax.jit, static_argnums=(2, 3))
def _statistics(logits, mask, k, slots):
  return moe.router_statistics(logits, moe.route(logits, mask, k, slots))


def test_load_balance_loss_is_one_at_uniform_routing_and_more_when_skewed():
  mask = jnp.ones((2, 8), bool)
  uniform = jnp.zeros((2, 8, 4))
  stats = _statistics(uniform, mask, 2, 8)
  np.testing.assert_allclose(stats["load_balance"], 1.0, rtol=1e-6)
  # Balanced assignments with balanced probabilities: token t prefers experts t and t + 1.
  balanced = jax.nn.one_hot(jnp.arange(8) % 4, 4) * 3 + jax.nn.one_hot((jnp.arange(8) + 1) % 4, 4)
  balanced = jnp.broadcast_to(balanced, (2, 8, 4))
  stats = _statistics(balanced, mask, 2, 8)
  np.testing.assert_allclose(stats["load_balance"], 1.0, rtol=1e-6)
  np.testing.assert_allclose(stats["fraction"], 0.25)
  skewed = jnp.broadcast_to(jnp.array([4.0, 2.0, 0.0, 0.0]), (2, 8, 4))
  stats = _statistics(skewed, mask, 2, 8)
  assert float(stats["load_balance"]) > 1.5
  np.testing.assert_allclose(stats["fraction"], [0.5, 0.5, 0, 0])
  # Padding does not count: only the unpadded tokens' (skewed) routing remains.
  half = mask.at[:, 4:].set(False)
  mixed = jnp.concatenate([skewed[:, :4], balanced[:, 4:]], axis=1)
  np.testing.assert_allclose(_statistics(mixed, half, 2, 8)["fraction"],
                             [0.5, 0.5, 0, 0])


# ------------------------------------------------------------------------------ whole models

def _random_params(model, batch):
  """Random parameters of the model's shapes, drawn on the host (no init to compile): norm
  scales near 1, everything else small."""
  shapes, _ = model.abstract_params(batch)
  rng = np.random.default_rng(0)

  def draw(path, leaf):
    noise = rng.normal(size=leaf.shape).astype(np.float32)
    return 1.0 + 0.1 * noise if path[-1].key == "scale" else 0.1 * noise

  return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope="module")
def mixtral():
  """mixtral_tiny (4 experts, top 2, dropless) with a router z-loss, its params, a batch whose
  row 0 packs two examples [a | b] and row 1 holds b alone then padding, the jitted loss with
  gradients and logits, and the loss and gradients on one device."""
  model = models.from_gin("mixtral_tiny", ["TransformerConfig.router_z_loss_weight = 0.001"])
  rng = np.random.default_rng(0)
  tokens = rng.integers(2, 500, (8, 12)).astype(np.int32)
  segments = np.ones_like(tokens)
  positions = np.broadcast_to(np.arange(12, dtype=np.int32), tokens.shape).copy()
  tokens[1, :7] = tokens[0, 5:]
  segments[0, 5:], positions[0, 5:] = 2, np.arange(7)
  segments[1, 7:], positions[1, 7:] = 0, 0
  batch = {"decoder_input_tokens": tokens, "decoder_target_tokens": np.roll(tokens, -1, 1),
           "decoder_loss_weights": (segments > 0).astype(np.int32),
           "decoder_segment_ids": segments, "decoder_positions": positions}
  params = _random_params(model, batch)
  grad_fn = jax.jit(jax.value_and_grad(model.loss_fn, has_aux=True))
  return model, params, batch, grad_fn(params, batch), grad_fn, jax.jit(model.logits)


def test_router_gets_gradient_and_losses_reach_the_loss(mixtral):
  (loss, metrics), grads = mixtral[3]
  router = grads["decoder"]["layers"]["mlp"]["router"]
  assert float(jnp.abs(router).min(axis=(1, 2)).max()) > 0  # every layer's router learns
  extra = float(metrics["aux/load_balance_loss"]) + float(metrics["aux/router_z_loss"])
  assert extra > 0
  np.testing.assert_allclose(float(loss), float(metrics["cross_entropy"]) + float(
      metrics["z_loss"]) + extra, rtol=1e-5)
  assert 1.0 <= float(metrics["moe/max_expert_load"]) <= 4.0
  assert float(metrics["moe/min_expert_load"]) <= 1.0
  assert float(metrics["moe/dropped_token_fraction"]) == 0.0


def test_packed_rows_and_padding_route_like_separate_rows(mixtral):
  """Dropless routing is per token: an example packed after another gets the logits it gets
  alone, and what padding holds changes no statistic (nor the loss)."""
  model, params, batch, ((loss, metrics), _), grad_fn, logits_fn = mixtral
  logits = logits_fn(params, batch)
  np.testing.assert_allclose(logits[0, 5:], logits[1, :7], atol=1e-4)
  other_padding = dict(batch, decoder_input_tokens=batch["decoder_input_tokens"].copy())
  other_padding["decoder_input_tokens"][1, 7:] = [7, 7, 9, 9, 11]
  (loss_2, metrics_2), _ = grad_fn(params, other_padding)
  moe_metrics = lambda m: {k: float(v) for k, v in m.items() if k.startswith("moe/")}
  assert len(moe_metrics(metrics)) == 4
  assert moe_metrics(metrics_2) == pytest.approx(moe_metrics(metrics), rel=1e-6)
  np.testing.assert_allclose(loss_2, loss, rtol=1e-6)
  del model


def test_cached_decoding_equals_the_full_forward(mixtral):
  model, params, batch, _, _, logits_fn = mixtral
  tokens = batch["decoder_input_tokens"]
  unpacked = dict(batch, decoder_segment_ids=np.ones_like(tokens),
                  decoder_positions=np.broadcast_to(np.arange(12, dtype=np.int32), tokens.shape))
  full = logits_fn(params, unpacked)
  _, apply = model._decoder(params)  # pylint: disable=protected-access  # unrolled layers

  @jax.jit
  def decode(tokens):
    cache = transformer.init_cache(model.config, 8, 12)
    logits, cache = apply(tokens[:, :10], cache=cache)  # prefill 10, then one token at a time
    steps = [logits]
    for t in range(10, 12):
      logits, cache = apply(tokens[:, t:t + 1], None, jnp.full((8, 1), t), cache=cache)
      steps.append(logits)
    return jnp.concatenate(steps, axis=1)

  np.testing.assert_allclose(decode(tokens), full, atol=1e-4)


def test_switch_t5_scans_groups_with_remat_like_unrolled_layers():
  scanned = models.from_gin("switch_t5_tiny", ["TransformerConfig.remat_policy = 'full'"])
  unrolled = models.from_gin("switch_t5_tiny", ["TransformerConfig.scan_layers = False"])
  rng = np.random.default_rng(3)
  batch = {k: rng.integers(2, 500, (2, 8)).astype(np.int32) for k in scanned.REQUIRED_FEATURES}
  batch["decoder_loss_weights"] = np.ones((2, 8), np.int32)
  params = _random_params(scanned, batch)
  groups = params["decoder"]["layers"]
  assert sorted(groups) == ["block_0", "block_1"]  # scanned over groups of (dense, MoE)
  assert "router" in groups["block_1"]["mlp"] and "wi" in groups["block_0"]["mlp"]
  loss, metrics = jax.jit(scanned.loss_fn)(params, batch)
  loss_unrolled, _ = jax.jit(unrolled.loss_fn)(transformer.unstack_layers(params), batch)
  np.testing.assert_allclose(loss, loss_unrolled, rtol=1e-5)
  assert float(metrics["aux/load_balance_loss"]) > 0  # the encoder's and decoder's MoE layers
  assert scanned.num_params(active=True) < scanned.num_params()


def _global_norm(tree):
  return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def test_microbatches_merge_the_moe_metrics(mixtral):
  model, params, batch, ((_, metrics), grads), _, _ = mixtral
  micro_grads, micro = jax.jit(lambda p, b: trainer.accumulate_gradients(
      lambda p, b, rng: model.loss_fn(p, b), p, b, jax.random.PRNGKey(0), 2))(params, batch)
  # Cross entropy is a token mean either way; the balance losses are per microbatch, so the
  # gradients differ by their (small) share only.
  np.testing.assert_allclose(float(micro["cross_entropy"]), float(metrics["cross_entropy"]),
                             rtol=1e-5)
  assert micro["moe/max_expert_load"].count == 2 * metrics["moe/max_expert_load"].count
  assert float(micro["moe/dropped_token_fraction"]) == 0.0
  norm = lambda tree: float(_global_norm(tree))
  difference = jax.tree.map(lambda a, b: a - b, grads, micro_grads)
  assert norm(difference) < 0.02 * norm(grads)


def test_grouped_layers_unstack_in_depth_order():
  grouped = {"decoder": {"layers": {"block_0": {"w": np.array([0, 2])},
                                    "block_1": {"w": np.array([1, 3])}}}}
  unstacked = transformer.unstack_layers(grouped)["decoder"]
  assert [int(unstacked[f"layers_{i}"]["w"]) for i in range(4)] == [0, 1, 2, 3]


def test_bert_moe_has_biased_experts_in_every_other_layer():
  shapes, specs = models.from_gin("bert_moe_tiny").abstract_params()
  layers_ = shapes["encoder"]["layers"]
  assert layers_["block_1"]["mlp"]["wi_bias"].shape == (1, 4, 256)  # [groups, experts, f]
  assert tuple(specs["encoder"]["layers"]["block_1"]["mlp"]["wi_kernel"]) == (
      "layers", "expert", "embed", "mlp")
  assert "kernel" in layers_["block_0"]["mlp"]["wi"]  # the dense layer of the group


# ------------------------------------------------------------------------------ expert parallelism

def test_expert_parallel_meshes_match_one_device_and_move_tokens_with_all_to_all(mixtral):
  model, params, batch, ((loss, _), grads), _, _ = mixtral
  _, specs = model.abstract_params(batch)
  grad_fn = jax.value_and_grad(lambda p, b: model.loss_fn(p, b)[0])
  kernel = params["decoder"]["layers"]["mlp"]["wi_0_kernel"].shape[1:]  # [e, d, f]
  whole = {",".join(map(str, kernel)), ",".join(map(str, (kernel[0], kernel[2], kernel[1])))}
  for sizes in (dict(data=2, expert=4), dict(data=2, fsdp=2, expert=2)):
    mesh = partitioning.make_mesh(**sizes)
    shardings = partitioning.tree_shardings(params, specs, mesh)
    step = partitioning.jit(grad_fn, mesh, (shardings, partitioning.batch_sharding(mesh)),
                            (partitioning.replicated(mesh), shardings))
    args = (jax.device_put(params, shardings), partitioning.host_to_global(batch, mesh))
    compiled = step.lower(*args).compile()
    sharded_loss, sharded_grads = compiled(*args)
    np.testing.assert_allclose(sharded_loss, loss, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(sharded_grads)):
      np.testing.assert_allclose(b, a, atol=1e-5)
    text = compiled.as_text()
    assert "all-to-all" in text, sizes
    # No expert kernel is gathered whole over the expert axis (fsdp may gather its own slice).
    gathered = re.findall(r"= f32\[([\d,]+)\][^\n]* all-gather\(", text)
    assert not [shape for shape in gathered if any(shape.endswith(w) for w in whole)], sizes


def test_experts_must_divide_the_expert_axis():
  model = models.from_gin("mixtral_tiny", ["TransformerConfig.num_experts = 3"])
  mesh = partitioning.make_mesh(data=2, expert=4)
  batch = model.dummy_batch(8, {"targets": 4})
  with partitioning.activation_sharding(mesh):
    with pytest.raises(ValueError, match=r"num_experts=3 is not divisible by the expert mesh "
                                         r"axis \(make_mesh.expert=4\)"):
      jax.eval_shape(model.init, jax.random.PRNGKey(0), batch)


# ------------------------------------------------------------------------------ config

@pytest.mark.parametrize("changes, message", [
    (dict(num_experts=0), r"mlp='moe' needs num_experts >= 1"),
    (dict(num_experts_per_token=5), r"num_experts_per_token=5 must be in \[1, num_experts=4\]"),
    (dict(mlp="dense"), r"num_experts=4 only applies to mlp='moe'.*set mlp='moe'"),
    (dict(moe_layer_interval=3), r"moe_layer_interval=3 must be >= 1 and divide num_layers=2.*"
                                 r"\[1, 2\]"),
    (dict(expert_capacity_factor=0.0), r"expert_capacity_factor=0.0 must be positive.*or None"),
    (dict(moe_dispatch="sorted"), r"moe_dispatch='sorted' is not supported; allowed values: "
                                  r"\['auto', 'ragged', 'einsum', 'gather'\]"),
    (dict(router_z_loss_weight=-1.0), r"router_z_loss_weight must be >= 0"),
])
def test_bad_moe_configs_are_refused_with_the_fix(changes, message):
  with pytest.raises(ValueError, match=message):
    TransformerConfig(**{**SMALL, **changes})


def test_layer_kinds_and_the_default_dispatch():
  cfg = TransformerConfig(**{**SMALL, "num_layers": 4, "moe_layer_interval": 2})
  assert [cfg.layer_mlp(i) for i in range(4)] == ["dense", "moe", "dense", "moe"]
  assert moe.dispatch_path(cfg) == "ragged"  # on CPU (and GPU), without an expert mesh axis
  with partitioning.activation_sharding(partitioning.make_mesh(data=2, expert=4)):
    assert moe.dispatch_path(cfg) == "einsum"  # the all-to-alls
    assert moe.dispatch_path(cfg.replace(moe_dispatch="gather")) == "gather"
  assert moe.capacity(cfg, 100) == 100  # dropless: every assignment fits


def test_blocked_grouped_matmul_equals_ragged_dot_in_values_and_gradients():
  sizes = jnp.asarray([0, 200, 37, 63], jnp.int32)  # an empty group, one over a block
  rows = jax.random.normal(jax.random.PRNGKey(0), (300, 16))
  kernel = jax.random.normal(jax.random.PRNGKey(1), (4, 16, 8))
  weights = jax.random.normal(jax.random.PRNGKey(2), (300, 8))

  def loss(rows, kernel, blocked):
    groups = moe.Groups.of(sizes, 300, blocked=blocked)
    out = groups.scatter(groups.matmul(groups.gather(rows), kernel))
    return jnp.sum(out * weights), out

  (_, blocked), grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(rows, kernel, True)
  (_, ragged), ragged_grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(rows, kernel, False)
  np.testing.assert_allclose(blocked, ragged, atol=1e-4)
  for got, want in zip(grads, ragged_grads):
    np.testing.assert_allclose(got, want, atol=1e-4)
  assert moe.Groups.of(sizes, 300, blocked=True).block_group.shape == (3 + 4,)
