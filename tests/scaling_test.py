"""t5x_lite/scaling.py: parameter counts exact for every preset, FLOPs and memory against XLA's
own analyses of the compiled step, the compute-optimal planner against Hoffmann et al. 2022's
published figures, and the law fit on synthetic losses with known exponents."""
import math
import os

import jax
import numpy as np
import pytest

from t5x_lite import models, optimizers, partitioning, scaling
from t5x_lite import trainer as trainer_lib

PRESETS = sorted(f[:-4] for f in os.listdir(models.PRESET_DIR) if f.endswith(".gin"))
GOPHER_FLOPS = 5.76e23  # Gopher's and Chinchilla's training budget (Hoffmann et al., table 3)


# ---------------------------------------------------------------------------- parameters

@pytest.mark.parametrize("preset", PRESETS)
def test_param_counts_are_exact_for_every_preset(preset):
  model = models.from_gin(preset)
  counted = scaling.count_params(model.config)
  assert counted == scaling.tree_param_counts(model)
  assert counted.total == model.num_params()
  assert 0 < counted.non_embedding < counted.total
  assert (counted.active < counted.total) == (model.config.mlp == "moe")


@pytest.mark.parametrize("preset,bindings", [
    ("gpt2_tiny", ["TransformerConfig.fused_qkv = True"]),
    ("gpt2_tiny", ["TransformerConfig.position_type = 'sinusoidal'",
                   "TransformerConfig.num_kv_heads = 1"]),
    ("llama_tiny", ["TransformerConfig.position_type = 'relative'"]),
    ("bert_tiny", ["TransformerConfig.tie_embeddings = False",
                   "TransformerConfig.position_type = 'relative'"]),
    ("t5_tiny", ["TransformerConfig.position_type = 'learned'", "TransformerConfig.use_bias = True",
                 "TransformerConfig.norm_position = 'post'",
                 "TransformerConfig.type_vocab_size = 2", "TransformerConfig.tie_embeddings = True"]),
])
def test_param_counts_are_exact_for_every_architecture_choice(preset, bindings):
  model = models.from_gin(preset, bindings)
  assert scaling.count_params(model.config) == scaling.tree_param_counts(model)


# ---------------------------------------------------------------------------- FLOPs

def _unrolled(preset, bindings, remat="none"):
  """XLA counts a scanned loop's body once, so compare against the same model unrolled."""
  return models.from_gin(preset, list(bindings) + [
      "TransformerConfig.scan_layers = False", f"TransformerConfig.remat_policy = '{remat}'"])


def _xla_train_flops(model, batch):
  """XLA's count of forward + backward of the loss (what the model FLOPs of a step count; the
  optimizer's element-wise update is not model FLOPs)."""
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), batch)
  grad = jax.jit(jax.grad(lambda p, b: model.loss_fn(p, b)[0]))
  analysis = grad.lower(params, batch).cost_analysis()
  return float((analysis[0] if isinstance(analysis, list) else analysis)["flops"])


# d_model 512: XLA also counts element-wise work (norms, activations, softmax, the loss), which
# the analytic count leaves out and which shrinks against the matmuls as 1 / d_model; at the
# tiny presets' d_model 64 it is a few percent.
WIDE = ["TransformerConfig.d_model = 512", "TransformerConfig.num_heads = 8"]
FAMILIES = [("gpt2_tiny", ["TransformerConfig.d_ff = 2048"], {"targets": 64}),
            ("llama_tiny", ["TransformerConfig.d_ff = 1536", "TransformerConfig.num_kv_heads = 2"],
             {"targets": 64}),
            ("t5_tiny", ["TransformerConfig.d_ff = 1024", "TransformerConfig.head_dim = 64"],
             {"inputs": 64, "targets": 32}),
            ("bert_tiny", ["TransformerConfig.d_ff = 2048"], {"inputs": 64})]


@pytest.mark.parametrize("preset,bindings,lengths", FAMILIES)
def test_flops_are_within_2_percent_of_xla(preset, bindings, lengths):
  model = _unrolled(preset, WIDE + bindings)
  batch = model.dummy_batch(4, lengths)
  analytic = scaling.flops_per_step(model, {k: v.shape for k, v in batch.items()})
  assert analytic == pytest.approx(_xla_train_flops(model, batch), rel=0.02)


def test_flops_leave_out_remat_recomputation():
  """MFU counts the model's FLOPs, not the forward pass that remat runs a second time."""
  lengths = {"targets": 64}
  none, full = (_unrolled("gpt2_tiny", WIDE, remat) for remat in ("none", "full"))
  batch = none.dummy_batch(4, lengths)
  shapes = {k: v.shape for k, v in batch.items()}
  assert scaling.flops_per_step(none, shapes) == scaling.flops_per_step(full, shapes)
  assert _xla_train_flops(full, batch) > 1.2 * _xla_train_flops(none, batch)


def test_tokens_per_step_counts_encoder_and_decoder_positions():
  model = models.from_gin("t5_tiny")
  shapes = scaling.batch_shapes(model, 8, {"inputs": 64, "targets": 16})
  assert shapes["encoder_input_tokens"] == (8, 64)
  assert scaling.tokens_per_step(shapes) == 8 * (64 + 16)


# ---------------------------------------------------------------------------- memory

@pytest.mark.parametrize("preset,bindings,lengths,mesh", [
    ("gpt2_tiny", [], {"targets": 128}, (8, 1, 1)),
    ("gpt2_tiny", [], {"targets": 128}, (2, 2, 2)),
    ("llama_tiny", ["TransformerConfig.num_heads = 4"], {"targets": 128}, (8, 1, 1)),
    ("t5_tiny", ["TransformerConfig.num_heads = 4"], {"inputs": 128, "targets": 64}, (8, 1, 1)),
    ("bert_tiny", [], {"inputs": 128}, (8, 1, 1)),
])
def test_memory_estimate_is_within_20_percent_of_xla(preset, bindings, lengths, mesh):
  """Without remat; with remat the estimate keeps only each layer's input and leaves out the
  layer recomputed during the backward pass, so it is lower than XLA's plan."""
  model = models.from_gin(preset, bindings + ["TransformerConfig.d_model = 256",
                                              "TransformerConfig.d_ff = 1024"])
  trainer = trainer_lib.Trainer(model, optimizers.create_optimizer("adamw"),
                                partitioning.make_mesh(*mesh),
                                scaling.batch_shapes(model, 16, lengths))
  estimate = scaling.estimate_memory(trainer)
  xla = scaling.xla_memory(scaling.compile_train_step(trainer))
  assert estimate["state"] == pytest.approx(xla["arguments"], rel=0.01)  # exact, from shardings
  assert estimate["params"] + estimate["optimizer_state"] == pytest.approx(estimate["state"],
                                                                          rel=0.01)
  assert estimate["optimizer_state"] == pytest.approx(2 * estimate["params"], rel=0.01)  # AdamW
  assert estimate["total"] == pytest.approx(xla["total"], rel=0.2)


# ---------------------------------------------------------------------------- planning

def test_approach_3_optimum_at_gophers_budget():
  """Equation 4 with equation 10's printed coefficients: 32.2B parameters on 2.98T tokens, far
  from 20 tokens/param (the paper's own approach-3 figure, 40B, uses the unrounded exponents)."""
  params, tokens = scaling.HOFFMANN.optimum(GOPHER_FLOPS)
  assert f"{params:.3g} {tokens:.3g}" == "3.22e+10 2.98e+12"
  assert 6 * params * tokens == pytest.approx(GOPHER_FLOPS)


def test_approach_3_with_unrounded_exponents_gives_the_papers_40b():
  """Figure 4: "We project the optimal model size given the Gopher FLOP budget to be 40B
  parameters", with the exponents of the paper's TeX source, 0.3392 and 0.2849."""
  law = scaling.Law("tex", E=1.69, A=406.4, B=410.7, alpha=0.3392, beta=0.2849)
  params, _ = law.optimum(GOPHER_FLOPS)
  assert f"{params:.2g}" == "4e+10"
  assert law.beta / (law.alpha + law.beta) == pytest.approx(0.46, abs=0.005)  # table 2's a


def test_twenty_tokens_per_parameter_at_gophers_budget():
  params, tokens = scaling.fixed_ratio_optimum(GOPHER_FLOPS)
  assert f"{params:.3g} {tokens:.3g}" == "6.93e+10 1.39e+12"  # table 3: 67B on 1.5T


def test_refit_is_close_to_twenty_tokens_per_parameter():
  """Besiroglu et al.: their refit is "compatible with the findings from the first two
  estimation procedures" (20 tokens/param)."""
  params, tokens = scaling.BESIROGLU.optimum(GOPHER_FLOPS)
  assert 15 < tokens / params < 25


@pytest.mark.parametrize("law", [scaling.HOFFMANN, scaling.BESIROGLU])
def test_closed_form_optimum_is_the_numerical_minimum(law):
  for flops in (1e18, 1e21, GOPHER_FLOPS):
    closed = law.optimum(flops)
    numeric = scaling.constrained_optimum(law, flops, scaling.SIX_N)
    assert numeric == pytest.approx(closed, rel=1e-5)
    loss = float(law.loss(*closed))
    assert loss < float(law.loss(closed[0] * 1.1, closed[1] / 1.1))
    assert loss < float(law.loss(closed[0] / 1.1, closed[1] * 1.1))


def test_plan_rows():
  rows = {r["method"]: r for r in scaling.plan(1e21)}
  assert rows["20 tokens/param"]["tokens_per_param"] == pytest.approx(20)
  assert rows["hoffmann2022"]["tokens_per_param"] > 40  # approach 3 favours data
  for row in rows.values():
    assert 6 * row["params"] * row["tokens"] == pytest.approx(1e21)
    assert 1.69 < row["loss"] < 4


def test_budget_from_chip_hours():
  assert scaling.budget_flops(1000, "v5p", 0.4) == pytest.approx(
      1000 * 3600 * trainer_lib.KNOWN_PEAK_FLOPS["TPU v5p"] * 0.4)
  with pytest.raises(ValueError, match="unique part"):
    scaling.budget_flops(1000, "v5", 0.4)  # v5 lite, v5e and v5p
  with pytest.raises(ValueError, match="mfu"):
    scaling.budget_flops(1000, "v5p", 40)
  with pytest.raises(ValueError, match="flops must be a positive"):
    scaling.HOFFMANN.optimum(-1)


def test_nearest_shape_of_a_preset_is_the_preset():
  config = models.from_gin("llama_1b").config
  shape = scaling.nearest_shape(config, scaling.count_params(config).total)
  assert scaling.shape_dict(shape) == scaling.shape_dict(config)


@pytest.mark.parametrize("preset", ["llama_1b", "gpt2_small", "t5_1_1_base", "bert_base"])
def test_nearest_shape_is_within_5_percent_and_buildable(preset):
  base = models.from_gin(preset).config
  for target in (3e8, 3e9, 3.2e10):
    shape = scaling.nearest_shape(base, target)
    assert scaling.count_params(shape).total == pytest.approx(target, rel=0.05)
    assert shape.resolved_head_dim == base.resolved_head_dim
    assert shape.num_heads % shape.resolved_num_kv_heads == 0


def test_gin_flags_train_at_least_the_planned_tokens():
  shape = scaling.nearest_shape(models.from_gin("gpt2_small").config, 3e8)
  flags = scaling.gin_flags(shape, tokens=6e9, batch_size=256, row_tokens=1024)
  steps = int(next(f for f in flags if f.startswith("--gin.TRAIN_STEPS=")).split("=")[1])
  assert steps == math.ceil(6e9 / (256 * 1024))
  assert f"--gin.TransformerConfig.d_model={shape.d_model}" in flags


# ---------------------------------------------------------------------------- fitting

def _synthetic(law, noise, seed=0):
  rng = np.random.default_rng(seed)
  params = np.repeat(np.geomspace(1e7, 1e10, 8), 8)
  tokens = np.tile(np.geomspace(1e9, 1e12, 8), 8)
  return params, tokens, law.loss(params, tokens) * np.exp(rng.normal(0, noise, params.shape))


@pytest.mark.parametrize("law", [scaling.HOFFMANN, scaling.BESIROGLU])
def test_fit_recovers_known_exponents_from_noisy_losses(law):
  fitted = scaling.fit_law(*_synthetic(law, noise=0.005), starts=8)
  assert fitted.alpha == pytest.approx(law.alpha, abs=0.02)
  assert fitted.beta == pytest.approx(law.beta, abs=0.02)
  assert fitted.E == pytest.approx(law.E, abs=0.05)


def test_fit_refuses_too_few_points():
  with pytest.raises(ValueError, match="at least 5"):
    scaling.fit_law([1e6] * 4, [1e8] * 4, [3.0] * 4)


def test_isoflop_minimum_finds_the_parabola_vertex():
  params = np.geomspace(1e6, 1e8, 5)
  losses = 2.0 + 0.1 * (np.log(params) - np.log(1e7)) ** 2
  assert scaling.isoflop_minimum(params, losses) == pytest.approx(1e7, rel=1e-6)
  assert math.isnan(scaling.isoflop_minimum(params, -losses))  # no valley
  with pytest.raises(ValueError, match="3 or more"):
    scaling.isoflop_minimum(params[:2], losses[:2])


def test_flops_per_token_fit_is_exact_on_a_power_law():
  cost = scaling.FlopsPerToken.fit([1e5, 1e6, 1e7], [7e5, 6.5e6, 6.2e7])
  assert cost.p == pytest.approx(0.98, abs=0.02)
  assert scaling.SIX_N(1e6) == 6e6
