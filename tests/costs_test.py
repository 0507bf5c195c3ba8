"""Analytic FLOPs and activation memory, as the models count them with t5x_lite.costs."""
import jax
import pytest

from t5x_lite import costs, models


@pytest.mark.parametrize("preset", ["gpt2_tiny", "t5_tiny"])
def test_model_flops_match_the_compiled_forward_pass(preset):
  """The analytic count (used for MFU) agrees with XLA's count of the forward pass, which also
  includes the elementwise work the analytic count leaves out."""
  model = models.from_gin(preset, ["TransformerConfig.scan_layers = False"])
  batch = model.dummy_batch(4, {"inputs": 64, "targets": 32})
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), batch)
  analysis = jax.jit(model.logits).lower(params, batch).compile().cost_analysis()
  analysis = analysis[0] if isinstance(analysis, list) else analysis
  analytic_forward = model.flops_per_step({k: v.shape for k, v in batch.items()}) / 3
  assert 0.92 * analysis["flops"] < analytic_forward <= analysis["flops"]


def test_cross_attention_and_grouped_heads_change_the_count_as_they_should():
  config = models.from_gin("t5_tiny").config
  plain = costs.StackShape(batch=2, length=16, layers=3)
  crossing = costs.StackShape(batch=2, length=16, layers=3, cross_length=32)
  d, he = config.d_model, config.num_heads * config.resolved_head_dim
  extra = 3 * (2 * 16 * (2 * d * he * 2 + 4 * 32 * he) + 2 * 32 * 2 * d * he * 2)
  assert costs.stack_flops(config, crossing) - costs.stack_flops(config, plain) == extra
  mqa = config.replace(num_kv_heads=1)
  assert costs.stack_flops(mqa, plain) < costs.stack_flops(config, plain)


def test_activation_memory_follows_batch_remat_and_tensor_sharding():
  model = models.from_gin("gpt2_tiny")
  shapes = {k: (8, 64) for k in model.REQUIRED_FEATURES}
  half = {k: (4, 64) for k in model.REQUIRED_FEATURES}
  full = model.activation_bytes(shapes)
  assert model.activation_bytes(half) == pytest.approx(full / 2)
  assert model.activation_bytes(shapes, tensor_shards=2) < full
  remat = models.from_gin("gpt2_tiny", ["TransformerConfig.remat_policy = 'full'"])
  assert remat.activation_bytes(shapes) < full / 3


def test_moe_flops_and_params_count_the_active_experts_only():
  moe = models.from_gin("mixtral_tiny").config
  dense = moe.replace(mlp="dense", num_experts=0)
  d, e, k = moe.d_model, moe.num_experts, moe.num_experts_per_token
  assert costs.mlp_flops_per_token(moe, "moe") == 2 * d * e + k * costs.mlp_flops_per_token(dense)
  assert costs.mlp_params(moe, "moe") == d * e + e * costs.mlp_params(dense)
  assert costs.mlp_params(moe, "moe", active=True) == d * e + k * costs.mlp_params(dense)
  # Every other layer (Switch): half the layers are dense.
  switch = moe.replace(moe_layer_interval=2, num_layers=4)
  stack = costs.StackShape(batch=1, length=1, layers=4)
  expected = 4 * costs.layer_params(dense, False) + 2 * (
      costs.mlp_params(moe, "moe") - costs.mlp_params(dense)) + costs.norm_params(moe)
  assert costs.stack_params(switch, stack) == expected


def test_mixtral_8x7b_has_hfs_parameter_count():
  model = models.from_gin("mixtral_8x7b")
  assert model.analytic_param_counts()[0] == 46_702_792_704  # HF MixtralForCausalLM
  assert round(model.analytic_param_counts(active=True)[0] / 1e9, 1) == 12.9
