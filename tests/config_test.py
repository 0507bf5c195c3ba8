"""A config that cannot work is refused at construction, naming the field and what is allowed."""
import pytest

from t5x_lite.config import TransformerConfig


@pytest.mark.parametrize("changes, field, allowed", [
    (dict(d_model=100, num_heads=8), "num_heads", "divisors of d_model"),
    (dict(num_heads=8, num_kv_heads=3), "num_kv_heads", "[1, 2, 4, 8]"),
    (dict(activation="swish"), "activation", "'relu', 'gelu', 'gelu_tanh', 'silu'"),
    (dict(position_type="alibi"), "position_type", "'learned', 'sinusoidal', 'rope', 'relative'"),
    (dict(norm_type="batchnorm"), "norm_type", "'layernorm', 'rmsnorm'"),
    (dict(family="decoder_only"), "family", "'encoder', 'decoder', 'encoder_decoder'"),
    (dict(attention_implementation="flash"), "attention_implementation", "'xla', 'cudnn'"),
    (dict(d_model=96, num_heads=4, head_dim=13, position_type="rope", num_kv_heads=None),
     "position_type", "even head_dim"),
    (dict(family="decoder", num_decoder_layers=4), "num_decoder_layers", "encoder_decoder"),
    (dict(num_heads=8, num_kv_heads=2, fused_qkv=True), "fused_qkv", "set fused_qkv=False"),
])
def test_bad_config_names_field_and_allowed_values(changes, field, allowed):
  with pytest.raises(ValueError) as error:
    TransformerConfig(**changes)
  assert field in str(error.value)
  assert allowed in str(error.value)


def test_defaults_resolve_head_dim_and_kv_heads():
  cfg = TransformerConfig(d_model=512, num_heads=8)
  assert cfg.resolved_head_dim == 64
  assert cfg.resolved_num_kv_heads == 8
  gqa = cfg.replace(num_kv_heads=2, head_dim=32)
  assert (gqa.resolved_num_kv_heads, gqa.resolved_head_dim) == (2, 32)
  enc_dec = TransformerConfig(family="encoder_decoder", num_layers=3)
  assert enc_dec.resolved_num_decoder_layers == 3
  # Fused QKV takes multi-head attention, also when num_kv_heads spells out num_heads.
  assert TransformerConfig(num_heads=8, num_kv_heads=8, fused_qkv=True).fused_qkv
