"""Hugging Face interop: small random HF models built offline from config objects, saved with
save_pretrained, converted, and compared with transformers logit by logit; round trips bit-exact;
bad checkpoints rejected with the offending tensor names."""
import json
import os

import jax
import numpy as np
import pytest
import torch
import transformers as tf
from safetensors.numpy import load_file, save_file

from t5x_lite import checkpoints, models
from t5x_lite.interop import hf

VOCAB = 97
ENC_IDS = np.random.RandomState(0).randint(1, VOCAB, size=(2, 24))  # 0 is padding: none here.
DEC_IDS = np.concatenate([np.zeros((2, 1), np.int64),  # T5's decoder starts with id 0.
                          np.random.RandomState(1).randint(1, VOCAB, size=(2, 19))], axis=1)

# name: (HF class, config). Shapes are small, but every option of the issue is exercised: tied and
# untied heads, T5 v1.0 (relu, rescaled tied head, deeper decoder) and v1.1 (gated-gelu), GQA, MQA.
CASES = {
    "gpt2": (tf.GPT2LMHeadModel, dict(n_positions=32, n_embd=32, n_layer=2, n_head=4)),
    "gpt2_untied": (tf.GPT2LMHeadModel, dict(n_positions=32, n_embd=32, n_layer=3, n_head=2,
                                             n_inner=48, tie_word_embeddings=False)),
    "bert": (tf.BertForMaskedLM, dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=64, max_position_embeddings=32)),
    "t5_v1_0": (tf.T5ForConditionalGeneration, dict(
        d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=3, num_heads=4,
        feed_forward_proj="relu", relative_attention_num_buckets=16,
        relative_attention_max_distance=20)),
    "t5_v1_1": (tf.T5ForConditionalGeneration, dict(
        d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=3, feed_forward_proj="gated-gelu",
        tie_word_embeddings=False, relative_attention_num_buckets=16,
        relative_attention_max_distance=20)),
    "mt5": (tf.MT5ForConditionalGeneration, dict(
        d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=3, feed_forward_proj="gated-gelu",
        tie_word_embeddings=False, relative_attention_num_buckets=16,
        relative_attention_max_distance=20)),
    "llama_gqa": (tf.LlamaForCausalLM, dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rope_theta=5000.0, rms_norm_eps=1e-5)),
    "llama_mqa_tied": (tf.LlamaForCausalLM, dict(
        hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=8, tie_word_embeddings=True)),
    "mixtral": (tf.MixtralForCausalLM, dict(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, rope_theta=5000.0,
        rms_norm_eps=1e-5, max_position_embeddings=64)),
}


def _config(name):
  cls, kwargs = CASES[name]
  return cls, cls.config_class(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                               **kwargs)


def _randomize(model, seed):
  """HF starts norms at 1 and biases at 0; random values make every tensor show in the logits."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if p.ndim == 2 and any(e in name for e in ("embed", "shared", "wte", "wpe")):
        p.copy_(noise)  # Unit scale, as T5 initialises its embedding.
      elif name.endswith(".q.weight"):  # T5 folds 1/sqrt(head_dim) into its queries.
        p.copy_(noise * (p.shape[-1] * model.config.d_kv) ** -0.5)
      elif p.ndim in (2, 3):  # 3: Mixtral's experts [e, out, in]
        p.copy_(noise * p.shape[-1] ** -0.5)
      elif "bias" in name:
        p.copy_(noise * 0.1)
      else:  # A norm's scale.
        p.copy_(1.0 + noise * 0.2)


def save_hf(name, directory, seed=0, dtype=torch.float32, untie_t5_head=True):
  """A random HF checkpoint on disk, as save_pretrained writes it."""
  cls, config = _config(name)
  torch.manual_seed(seed)
  model = cls(config)
  _randomize(model, seed)
  if name in ("t5_v1_1", "mt5") and untie_t5_head:
    # Real T5 v1.1 checkpoints have their own lm_head; newer transformers tie it when building
    # from a config, so give it one (from_pretrained keeps it untied, as for google/t5-v1_1-*).
    model.lm_head.weight = torch.nn.Parameter(torch.randn(VOCAB, config.d_model) * 0.2)
  model.to(dtype).save_pretrained(directory, safe_serialization=True)
  return str(directory)


def hf_logits(name, hf_dir, dtype=torch.float32):
  cls, _ = _config(name)
  model = cls.from_pretrained(hf_dir, dtype=dtype).float().eval()
  with torch.no_grad():
    if cls in (tf.T5ForConditionalGeneration, tf.MT5ForConditionalGeneration):
      out = model(input_ids=torch.tensor(ENC_IDS), decoder_input_ids=torch.tensor(DEC_IDS))
    else:
      out = model(input_ids=torch.tensor(ENC_IDS))
  return out.logits.numpy()


def our_logits(model, params):
  if model.config.family == "encoder_decoder":
    batch = {"encoder_input_tokens": ENC_IDS, "decoder_input_tokens": DEC_IDS}
  elif model.config.family == "encoder":
    batch = {"encoder_input_tokens": ENC_IDS}
  else:
    batch = {"decoder_input_tokens": ENC_IDS}
  return np.asarray(jax.jit(model.logits)(params, batch))  # One compile, not one per op.


@pytest.mark.parametrize("name,scan_layers", [
    ("gpt2", True), ("gpt2_untied", False), ("bert", True), ("bert", False), ("t5_v1_0", False),
    ("t5_v1_1", True), ("mt5", True), ("llama_gqa", True), ("llama_mqa_tied", False),
    ("mixtral", True)])
def test_converted_checkpoint_gives_hf_logits(tmp_path, name, scan_layers):
  hf_dir = save_hf(name, tmp_path / "hf")
  hf.convert_from_hf(hf_dir, str(tmp_path / "ckpt"), scan_layers=scan_layers)
  # What a user does next: rebuild the model from the written gin file and restore the params.
  model = models.from_gin(str(tmp_path / "ckpt" / "model.gin"))
  assert model.config.scan_layers == scan_layers
  shapes, _ = model.abstract_params(model.dummy_batch(1, {"inputs": 8, "targets": 8}))
  params = checkpoints.load_params(str(tmp_path / "ckpt"), shapes)
  expected = hf_logits(name, hf_dir)
  assert expected.std() > 0.5  # Logits large enough for 1e-4 to mean something.
  np.testing.assert_allclose(our_logits(model, params), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa", "t5_v1_1", "mixtral"])
def test_converted_checkpoint_generates_hf_greedy_tokens(tmp_path, name):
  hf_dir = save_hf(name, tmp_path / "hf")
  hf.convert_from_hf(hf_dir, str(tmp_path / "ckpt"))
  model = models.from_gin(str(tmp_path / "ckpt" / "model.gin"))
  params = checkpoints.load_params(str(tmp_path / "ckpt"))
  cls, config = _config(name)
  reference = cls.from_pretrained(hf_dir).eval()
  prompts, new = ENC_IDS[:, :10], 12
  options = dict(max_new_tokens=new, do_sample=False, num_beams=1, eos_token_id=2, pad_token_id=0)
  with torch.no_grad():
    if config.is_encoder_decoder:
      expected = reference.generate(input_ids=torch.tensor(prompts), decoder_start_token_id=0,
                                    **options).numpy()[:, 1:]  # Drop the start token.
      batch = {"encoder_input_tokens": prompts}
    else:
      expected = reference.generate(input_ids=torch.tensor(prompts), **options).numpy()[
          :, prompts.shape[1]:]
      batch = {"decoder_input_tokens": prompts, "decoder_causal_attention": np.ones_like(prompts)}
  # HF stops once every row has ended, then pads with pad_token_id (0), as our rows do after EOS.
  expected = np.pad(expected, ((0, 0), (0, new - expected.shape[1])))
  tokens, _ = model.predict_batch(params, batch, max_new_tokens=new, eos_id=2)
  np.testing.assert_array_equal(np.asarray(tokens)[:, 0], expected)


def test_t5_v1_1_saved_by_new_transformers_reads_its_head_from_shared(tmp_path):
  # transformers >= 5 ties T5 v1.1's lm_head to `shared` and saves only `shared`.
  hf_dir = save_hf("t5_v1_1", tmp_path / "hf", untie_t5_head=False)
  assert "lm_head.weight" not in load_file(os.path.join(hf_dir, "model.safetensors"))
  model, params = hf.import_hf(hf_dir)
  assert not model.config.tie_embeddings
  np.testing.assert_array_equal(params["lm_head"]["kernel"], params["token_embed"]["embedding"].T)
  np.testing.assert_allclose(our_logits(model, params), hf_logits("t5_v1_1", hf_dir), atol=1e-4,
                             rtol=0)


@pytest.mark.parametrize("name", ["gpt2", "bert", "t5_v1_0", "t5_v1_1", "llama_gqa", "mixtral"])
def test_hf_to_t5x_lite_to_hf_is_bit_exact(tmp_path, name):
  hf_dir = save_hf(name, tmp_path / "hf")
  model, params = hf.import_hf(hf_dir, scan_layers=name != "bert")
  hf.export_hf(model, params, str(tmp_path / "back"))
  before = load_file(os.path.join(hf_dir, "model.safetensors"))
  after = load_file(str(tmp_path / "back" / "model.safetensors"))
  assert before.keys() == after.keys()
  for key in before:
    assert before[key].dtype == after[key].dtype and np.array_equal(before[key], after[key]), key


@pytest.mark.parametrize("preset,scan_layers,param_dtype,fused_qkv", [
    ("gpt2_tiny", True, "float32", False), ("bert_tiny", False, "float32", False),
    ("t5_tiny", True, "bfloat16", False), ("llama_tiny", False, "bfloat16", False),
    ("gpt2_tiny", False, "float32", True), ("t5_tiny", True, "float32", True)])
def test_t5x_lite_to_hf_to_t5x_lite_is_bit_exact(tmp_path, preset, scan_layers, param_dtype,
                                                 fused_qkv):
  """With fused_qkv, export splits the qkv kernels (GPT-2's c_attn: q|k|v; T5's q, k, v) and
  import with fused_qkv=True stacks them back."""
  model = models.from_gin(preset, [f"TransformerConfig.scan_layers = {scan_layers}",
                                   f"TransformerConfig.param_dtype = '{param_dtype}'",
                                   f"TransformerConfig.fused_qkv = {fused_qkv}"])
  batch = model.dummy_batch(1, {"inputs": 8, "targets": 8})
  shapes, _ = model.abstract_params(batch)
  # Random values everywhere (init would start norms at 1 and biases at 0).
  rng = np.random.RandomState(1)
  params = jax.tree.map(lambda s: (rng.normal(size=s.shape) * 0.3).astype(s.dtype), shapes)
  hf.export_hf(model, params, str(tmp_path / "hf"))

  # transformers loads the export with every weight accounted for, and agrees with our logits.
  auto = {"encoder": tf.AutoModelForMaskedLM, "decoder": tf.AutoModelForCausalLM,
          "encoder_decoder": tf.AutoModelForSeq2SeqLM}[model.config.family]
  loaded, info = auto.from_pretrained(str(tmp_path / "hf"), output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  assert str(loaded.dtype) == f"torch.{param_dtype}"
  if param_dtype == "float32":
    with torch.no_grad():
      ids = torch.tensor(ENC_IDS)
      kwargs = ({"decoder_input_ids": torch.tensor(DEC_IDS)}
                if model.config.family == "encoder_decoder" else {})
      expected = loaded.eval()(input_ids=ids, **kwargs).logits.numpy()
    np.testing.assert_allclose(our_logits(model, params), expected, atol=1e-4, rtol=0)

  # config.json stores weights, not our compute dtype: the one setting asked for again.
  back, back_params = hf.import_hf(str(tmp_path / "hf"), scan_layers=scan_layers,
                                   dtype=model.config.dtype, fused_qkv=fused_qkv)
  assert back.config == model.config
  flat, back_flat = hf._flatten(params), hf._flatten(back_params)
  assert flat.keys() == back_flat.keys()
  for path, value in flat.items():
    assert back_flat[path].dtype == value.dtype, path
    assert np.array_equal(np.asarray(back_flat[path]), np.asarray(value)), path


def test_fused_qkv_import_of_grouped_kv_heads_is_refused_with_the_fix(tmp_path):
  hf_dir = save_hf("llama_gqa", tmp_path / "hf")
  with pytest.raises(ValueError, match="fused_qkv=True.*num_kv_heads=2.*set fused_qkv=False"):
    hf.import_hf(hf_dir, fused_qkv=True)


def test_bf16_weights_import_as_bf16_and_match_hf(tmp_path):
  hf_dir = save_hf("llama_gqa", tmp_path / "hf", dtype=torch.bfloat16)
  model, params = hf.import_hf(hf_dir, dtype="float32")  # bf16 weights, fp32 arithmetic.
  assert model.config.param_dtype == "bfloat16"
  assert all(x.dtype == jax.numpy.bfloat16 for x in jax.tree.leaves(params))
  # The same bf16 numbers, computed in fp32 on both sides.
  np.testing.assert_allclose(our_logits(model, params),
                             hf_logits("llama_gqa", hf_dir, dtype=torch.bfloat16),
                             atol=1e-4, rtol=0)
  hf.export_hf(model, params, str(tmp_path / "back"))
  before = load_file(os.path.join(hf_dir, "model.safetensors"))
  after = load_file(str(tmp_path / "back" / "model.safetensors"))
  for key in before:
    assert after[key].dtype == before[key].dtype and np.array_equal(after[key], before[key]), key
  with open(tmp_path / "back" / "config.json") as f:
    assert json.load(f)["dtype"] == "bfloat16"


def test_checkpoints_in_older_layouts_are_read(tmp_path):
  # As on the Hub: GPT-2's original file has no "transformer." prefix and carries attention-mask
  # buffers; bert-base-* files use LayerNorm gamma/beta and hold BertForPreTraining's extra heads.
  gpt2 = save_hf("gpt2", tmp_path / "gpt2")

  def strip_prefix(tensors):
    for name in list(tensors):
      tensors[name[len("transformer."):]] = tensors.pop(name)
    tensors["h.0.attn.bias"] = np.tril(np.ones((1, 1, 32, 32), np.float32))

  _edit_weights(gpt2, strip_prefix)
  bert = save_hf("bert", tmp_path / "bert")

  def old_bert(tensors):
    for name in [n for n in tensors if "LayerNorm" in n]:
      tensors[name.replace(".weight", ".gamma").replace(".bias", ".beta")] = tensors.pop(name)
    tensors["bert.pooler.dense.weight"] = np.zeros((32, 32), np.float32)
    tensors["cls.seq_relationship.weight"] = np.zeros((2, 32), np.float32)

  _edit_weights(bert, old_bert)
  for name, hf_dir in (("gpt2", gpt2), ("bert", bert)):
    model, params = hf.import_hf(hf_dir)
    np.testing.assert_allclose(our_logits(model, params), hf_logits(name, hf_dir), atol=1e-4,
                               rtol=0)


def test_export_keeps_special_token_ids_of_the_imported_config(tmp_path):
  hf_dir = save_hf("llama_gqa", tmp_path / "hf")
  hf.convert_from_hf(hf_dir, str(tmp_path / "ckpt"))
  hf.convert_to_hf(str(tmp_path / "ckpt"), str(tmp_path / "back"))
  with open(tmp_path / "back" / "config.json") as f:
    config = json.load(f)
  assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 0)
  assert config["rope_parameters"]["rope_theta"] == 5000.0


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------
def _edit_config(hf_dir, **changes):
  path = os.path.join(hf_dir, "config.json")
  with open(path) as f:
    config = json.load(f)
  config.update(changes)
  with open(path, "w") as f:
    json.dump(config, f)


def _edit_weights(hf_dir, edit):
  path = os.path.join(hf_dir, "model.safetensors")
  tensors = load_file(path)
  edit(tensors)
  save_file(tensors, path, metadata={"format": "pt"})


def test_unsupported_architecture_is_named(tmp_path):
  hf_dir = save_hf("llama_gqa", tmp_path / "hf")
  _edit_config(hf_dir, architectures=["MistralForCausalLM"], model_type="mistral")
  with pytest.raises(ValueError, match=r"Unsupported .*MistralForCausalLM.*LlamaForCausalLM"):
    hf.import_hf(hf_dir)


def test_mixtral_in_the_fused_layout_of_transformers_5_is_read(tmp_path):
  """transformers 5 holds Mixtral's experts fused (mlp.experts.gate_up_proj, down_proj) and
  save_pretrained splits them per expert; a file with the fused tensors reads the same."""
  hf_dir = save_hf("mixtral", tmp_path / "hf")
  _, expected = hf.import_hf(hf_dir)
  cls, _ = _config("mixtral")
  fused = {k: v.numpy() for k, v in cls.from_pretrained(hf_dir).state_dict().items()}
  assert "model.layers.1.mlp.experts.gate_up_proj" in fused
  _edit_weights(hf_dir, lambda tensors: (tensors.clear(), tensors.update(fused)))
  _, params = hf.import_hf(hf_dir)
  for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)


def test_other_moe_architectures_are_refused_by_name(tmp_path):
  hf_dir = save_hf("llama_gqa", tmp_path / "hf")
  _edit_config(hf_dir, architectures=["Qwen2MoeForCausalLM"], model_type="qwen2_moe",
               num_experts=4)
  with pytest.raises(ValueError, match=r"Qwen2MoeForCausalLM.*is a mixture-of-experts "
                                       r"architecture t5x_lite does not convert.*only "
                                       r"MixtralForCausalLM"):
    hf.import_hf(hf_dir)


def test_config_with_more_layers_than_the_weights_names_missing_tensors(tmp_path):
  hf_dir = save_hf("gpt2", tmp_path / "hf")
  _edit_config(hf_dir, n_layer=3)
  with pytest.raises(ValueError, match=r"missing tensors \(12\): transformer\.h\.2\.attn\.c_attn"
                                       r"\.bias, transformer\.h\.2\.attn\.c_attn\.weight"):
    hf.import_hf(hf_dir)


def test_config_with_wrong_mlp_type_names_missing_and_unexpected_tensors(tmp_path):
  hf_dir = save_hf("t5_v1_0", tmp_path / "hf")
  _edit_config(hf_dir, feed_forward_proj="gated-gelu")
  with pytest.raises(ValueError) as error:
    hf.import_hf(hf_dir)
  assert "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in str(error.value)  # Missing.
  assert "encoder.block.0.layer.1.DenseReluDense.wi.weight" in str(error.value)  # Unexpected.


def test_config_with_wrong_width_names_tensor_and_shapes(tmp_path):
  hf_dir = save_hf("llama_gqa", tmp_path / "hf")
  _edit_config(hf_dir, intermediate_size=80)
  with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj\.weight: config\.json "
                                       r"implies \[32, 80\], file has \[32, 64\]"):
    hf.import_hf(hf_dir)


def test_missing_and_unexpected_tensors_are_named(tmp_path):
  hf_dir = save_hf("bert", tmp_path / "hf")

  def edit(tensors):
    del tensors["bert.encoder.layer.1.output.LayerNorm.bias"]
    tensors["bert.encoder.layer.2.output.dense.weight"] = np.zeros((32, 64), np.float32)

  _edit_weights(hf_dir, edit)
  with pytest.raises(ValueError, match=r"missing tensors \(1\): bert\.encoder\.layer\.1\.output"
                                       r"\.LayerNorm\.bias\n.*unexpected tensors \(1\): "
                                       r"bert\.encoder\.layer\.2\.output\.dense\.weight"):
    hf.import_hf(hf_dir)


def test_untied_head_under_a_tied_config_is_rejected(tmp_path):
  hf_dir = save_hf("gpt2", tmp_path / "hf")
  _edit_weights(hf_dir, lambda t: t.update(
      {"lm_head.weight": t["transformer.wte.weight"] + np.float32(1.0)}))
  with pytest.raises(ValueError, match=r"ties lm_head\.weight to transformer\.wte\.weight.*"
                                       r"tie_word_embeddings=false"):
    hf.import_hf(hf_dir)


def test_options_our_model_lacks_are_refused(tmp_path):
  hf_dir = save_hf("llama_gqa", tmp_path / "hf")
  _edit_config(hf_dir, rope_parameters={"rope_type": "linear", "factor": 2.0,
                                        "rope_theta": 5000.0})
  with pytest.raises(ValueError, match=r"RoPE scaling of type 'linear'"):
    hf.import_hf(hf_dir)


def test_pytorch_bin_checkpoints_are_refused_with_the_fix(tmp_path):
  hf_dir = save_hf("gpt2", tmp_path / "hf")
  os.rename(os.path.join(hf_dir, "model.safetensors"), os.path.join(hf_dir, "pytorch_model.bin"))
  with pytest.raises(FileNotFoundError, match=r"safe_serialization=True"):
    hf.import_hf(hf_dir)


def _zeros(model):
  shapes, _ = model.abstract_params(model.dummy_batch(1, {"targets": 8}))
  return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)


def test_export_refuses_a_model_hf_cannot_hold(tmp_path):
  model = models.from_gin("llama_tiny", ["TransformerConfig.norm_type = 'layernorm'",
                                         "TransformerConfig.use_bias = True"])
  params = _zeros(model)
  with pytest.raises(ValueError, match=r"LlamaForCausalLM cannot hold .*norm_type='layernorm' "
                                       r"\(needs 'rmsnorm'\), use_bias=True \(needs False\)"):
    hf.export_hf(model, params, str(tmp_path / "hf"))
  assert not os.path.exists(tmp_path / "hf" / "model.safetensors")


def test_export_refuses_params_of_another_model(tmp_path):
  model = models.from_gin("gpt2_tiny")
  other = models.from_gin("gpt2_tiny", ["TransformerConfig.d_ff = 128"])
  params = _zeros(other)
  with pytest.raises(ValueError, match=r"decoder/layers/mlp/wi/bias.*export the params with the "
                                       r"model\.gin"):
    hf.export_hf(model, params, str(tmp_path / "hf"))
