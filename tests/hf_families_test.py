"""The per-architecture tables: tensor layouts, config.json <-> TransformerConfig, and agreement
with the real transformers modules (built on the meta device, so even llama_1b costs nothing)."""
import numpy as np
import pytest
import torch
import transformers as tf

from t5x_lite import models
from t5x_lite.interop import hf, hf_families
from t5x_lite.interop.hf_families import Tensor

PRESETS = ["bert_base", "bert_tiny", "gpt2_small", "gpt2_tiny", "llama_1b", "llama_tiny",
           "t5_1_1_small", "t5_1_1_base", "t5_tiny", "mixtral_tiny", "mixtral_8x7b"]


def _meta_hf_model(cfg):
  family = hf_families.family_of_config(cfg)
  config = tf.AutoConfig.for_model(family.model_type, **family.config_to_hf(cfg))
  with torch.device("meta"):
    return family, getattr(tf, family.architecture)(config)


@pytest.mark.parametrize("preset", PRESETS)
def test_tables_name_exactly_the_tensors_of_the_hf_module(preset):
  cfg = models.from_gin(preset).config
  family, module = _meta_hf_model(cfg)
  # state_dict holds tied copies under every name; the table lists each tensor once. Mixtral's
  # table names the per-expert tensors save_pretrained writes, which `views` reads fused.
  in_hf = {n for n in module.state_dict() if not family.is_ignored(n)}
  shapes = {n: tuple(t.shape) for n, t in module.state_dict().items()}
  views = family.views(shapes)
  in_hf = (in_hf - {source for source, _ in views.values()}) | set(views)
  in_table = set(hf._expand(family, cfg))
  assert in_table <= in_hf
  assert in_hf - in_table <= set(family.tied_copies(cfg)) | set(family.fallbacks(cfg))
  ours = hf._flat_shapes(models.from_gin(preset))
  for name, (spec, i) in hf._expand(family, cfg).items():
    our_shapes = hf._tensor_shapes(spec, i, ours, cfg.scan_layers)
    if spec.experts:  # HF holds them fused in memory: [e, ...] (gate|up stacked for w1, w3)
      fused = name.replace("block_sparse_moe", "mlp").rsplit(".", 3)[0]
      fused += ".down_proj" if ".w2." in name else ".gate_up_proj"
      assert spec.hf_shape(our_shapes) == shapes[fused][1:] or (
          spec.hf_shape(our_shapes)[0] * 2, spec.hf_shape(our_shapes)[1]) == shapes[fused][1:]
      continue
    assert spec.hf_shape(our_shapes) == shapes[name.replace("block_sparse_moe", "mlp")], name


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_have_the_parameter_count_of_their_hf_model(preset):
  model = models.from_gin(preset)
  _, module = _meta_hf_model(model.config)
  count = sum(p.numel() for p in module.parameters())  # Tied parameters count once.
  if (model.config.family == "encoder_decoder" and not model.config.tie_embeddings
      and module.lm_head.weight is module.shared.weight):
    # transformers >= 5 ties T5 v1.1's head when building from a config; checkpoints have it.
    count += module.lm_head.weight.numel()
  assert count == model.num_params()


@pytest.mark.parametrize("preset", PRESETS)
def test_config_survives_hf_and_back(preset):
  cfg = models.from_gin(preset).config
  family = hf_families.family_of_config(cfg)
  hf_config = dict(family.config_to_hf(cfg), architectures=[family.architecture])
  for field, value in family.config_from_hf(hf_config).items():
    assert getattr(cfg, field) == value, field


def test_linear_layout_transposes_and_splits_heads():
  w = np.arange(24.0).reshape(6, 4)  # torch Linear [out = h*e = 2*3, in = d = 4]
  spec = Tensor("q.weight", ("q",), "linear")
  (q,) = spec.to_ours(w, [(4, 2, 3)])
  assert q[1, 1, 2] == w[1 * 3 + 2, 1]
  assert spec.hf_shape([(4, 2, 3)]) == (6, 4)
  np.testing.assert_array_equal(spec.to_hf([q]), w)

  out = Tensor("o.weight", ("out",), "linear", n_in=2)  # [d = 4, h*e = 6] -> ours [h, e, d]
  (o,) = out.to_ours(w.T, [(2, 3, 4)])
  assert o[1, 2, 3] == w.T[3, 1 * 3 + 2]
  np.testing.assert_array_equal(out.to_hf([o]), w.T)


def test_fused_qkv_splits_along_the_output_axis_in_order():
  w = np.arange(4 * 18.0).reshape(4, 18)  # GPT-2's c_attn [d, 3 * h*e], q|k|v.
  spec = Tensor("c_attn.weight", ("q", "k", "v"))
  q, k, v = spec.to_ours(w, [(4, 2, 3)] * 3)
  assert q[0, 0, 0] == w[0, 0] and k[2, 1, 1] == w[2, 6 + 3 + 1] and v[3, 1, 2] == w[3, 17]
  np.testing.assert_array_equal(spec.to_hf([q, k, v]), w)
  bias = Tensor("c_attn.bias", ("q", "k", "v"), "vector")
  qb, kb, vb = bias.to_ours(np.arange(18.0), [(2, 3)] * 3)
  assert kb[1, 0] == 9.0 and bias.hf_shape([(2, 3)] * 3) == (18,)


def test_older_transformers_configs_are_read():
  # transformers 4.x: rope_theta at the top level; T5 v1.1 marked by tie_word_embeddings=false.
  llama = hf_families.LLAMA.config_from_hf(dict(
      vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
      num_attention_heads=2, rope_theta=500000.0, rope_scaling=None))
  assert llama["rope_theta"] == 500000.0 and llama["num_kv_heads"] is None
  t5 = dict(vocab_size=10, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2,
            feed_forward_proj="gated-gelu")
  assert not hf_families.T5.config_from_hf(dict(t5, tie_word_embeddings=False))["tie_embeddings"]
  assert hf_families.T5.config_from_hf(dict(t5, feed_forward_proj="relu"))["tie_embeddings"]
  assert hf_families.T5.config_from_hf(t5)["activation"] == "gelu_tanh"


GPT2 = dict(vocab_size=10, n_embd=8, n_head=2, n_layer=1, n_positions=16)
BERT = dict(vocab_size=10, hidden_size=8, num_attention_heads=2, intermediate_size=16,
            num_hidden_layers=1, max_position_embeddings=16)
LLAMA = dict(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
             num_attention_heads=2)


@pytest.mark.parametrize("family,config,message", [
    (hf_families.GPT2, dict(GPT2, scale_attn_by_inverse_layer_idx=True),
     "scale_attn_by_inverse_layer_idx=true"),
    (hf_families.GPT2, dict(GPT2, activation_function="quick_gelu"),
     "activation_function='quick_gelu' is not supported"),
    (hf_families.BERT, dict(BERT, position_embedding_type="relative_key"),
     "position_embedding_type other than 'absolute'"),
    (hf_families.BERT, dict(BERT, tie_word_embeddings=False), "tie_word_embeddings=false"),
    (hf_families.LLAMA, dict(LLAMA, attention_bias=True, mlp_bias=True),
     "attention_bias=true; mlp_bias=true"),
    (hf_families.LLAMA, dict(LLAMA, rope_scaling={"type": "dynamic", "factor": 2.0}),
     "RoPE scaling of type 'dynamic'"),
])
def test_hf_options_we_cannot_run_are_refused_by_name(family, config, message):
  with pytest.raises(ValueError, match=message):
    family.config_from_hf(config)


def test_incomplete_config_json_names_the_missing_field():
  config = dict(GPT2, architectures=["GPT2LMHeadModel"])
  del config["n_embd"]
  with pytest.raises(ValueError, match="GPT2LMHeadModel lacks the field 'n_embd'"):
    hf.config_from_hf(config)


def test_configs_hf_cannot_hold_are_refused_by_name():
  t5 = models.from_gin("t5_tiny", ["TransformerConfig.activation = 'gelu'"]).config
  with pytest.raises(ValueError, match="'gated-gelu' is the tanh approximation"):
    hf_families.T5.config_to_hf(t5)
  decoder = models.from_gin("gpt2_tiny", ["TransformerConfig.position_type = 'sinusoidal'"]).config
  with pytest.raises(ValueError, match="position_type='sinusoidal'"):
    hf_families.family_of_config(decoder)
  bert = models.from_gin("bert_tiny", ["TransformerConfig.tie_embeddings = False"]).config
  with pytest.raises(ValueError, match=r"tie_embeddings=False \(needs True\)"):
    hf_families.BERT.config_to_hf(bert)
