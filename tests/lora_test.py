"""LoRA adapters: step 0 is the base, merged equals unmerged, only adapters train (sharded on the
mesh), scanned / unrolled / fused QKV / bf16 layouts, and the refusals."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_lite import lora, models, optimizers, partitioning, transformer
from t5x_lite import trainer as trainer_lib

PRESETS = ("gpt2_tiny", "llama_tiny", "t5_tiny", "bert_tiny")


def random_batch(model, batch_size=8, length=8, seed=0):
  rng = np.random.default_rng(seed)
  batch = {name: rng.integers(2, model.config.vocab_size, (batch_size, length)).astype(np.int32)
           for name in model.REQUIRED_FEATURES}
  for name in ("encoder_loss_weights", "decoder_loss_weights"):
    if name in batch:
      batch[name] = np.ones_like(batch[name])
  return batch


def host_params(model, adapters_b=0.0, seed=0):
  """Parameters made on the host from the abstract shapes (no init to compile): random, with
  B = 0 (as `init` makes it) or B random at scale `adapters_b` (as after training)."""
  shapes, _ = model.abstract_params(model.dummy_batch(1, {"inputs": 8, "targets": 8}))
  rng = np.random.default_rng(seed)
  def make(path, x):
    if path.endswith("lora_b"):
      return (adapters_b * rng.standard_normal(x.shape)).astype(x.dtype)
    scale = 1.0 if path.endswith("scale") else 0.1
    return (scale * rng.standard_normal(x.shape)).astype(x.dtype)
  return lora.join({p: make(p, x) for p, x in lora.flat(shapes).items()})


@pytest.mark.parametrize("preset", PRESETS)
def test_step_0_is_the_base_and_merged_equals_unmerged(preset):
  base = models.from_gin(preset)
  model = lora.LoraModel(base, rank=4, alpha=8.0)
  batch = random_batch(base)
  params, trained = host_params(model), host_params(model, adapters_b=0.02)
  base_params, adapters = lora.split(params)
  assert adapters and all(lora.is_adapter(p) for p in lora.flat(adapters))

  def logits(params, trained, batch):  # one compile per family, each model traced once
    stack = lambda *trees: jax.tree.map(lambda *xs: jnp.stack(xs), *trees)
    plain = jax.vmap(base.logits, (0, None))(
        stack(lora.split(params)[0], lora.merge(trained, model.scale)), batch)
    adapted = jax.vmap(model.logits, (0, None))(stack(params, trained), batch)
    return plain[0], adapted[0], adapted[1], plain[1]
  base_logits, step_0, adapted, merged = jax.jit(logits)(params, trained, batch)
  np.testing.assert_array_equal(step_0, base_logits)  # B = 0: exactly the base
  assert float(jnp.max(jnp.abs(adapted - base_logits))) > 1e-2  # the adapters act
  np.testing.assert_allclose(merged, adapted, rtol=1e-5, atol=1e-5)  # W + AB rounds in fp32
  merged_params = lora.merge(trained, model.scale)
  assert jax.tree.structure(merged_params) == jax.tree.structure(base_params)
  with pytest.raises(ValueError, match="no LoRA adapters .* merged already"):
    lora.merge(merged_params, model.scale)


@pytest.fixture(scope="module")
def lora_trainer():
  """llama_tiny with adapters on attention and MLP on a (2, 2, 2) mesh (nothing compiled: the
  train step itself runs in lora_tool_test's train job)."""
  model = lora.LoraModel(models.from_gin("llama_tiny"), rank=4, alpha=8.0, dropout=0.1,
                         targets=lora.ATTENTION_AND_MLP)
  optimizer = optimizers.create_optimizer("adamw", optimizers.create_schedule("constant", 1e-2, 0))
  shapes = {k: v.shape for k, v in random_batch(model).items()}
  return trainer_lib.Trainer(model, optimizer, partitioning.make_mesh(2, 2, 2), shapes,
                             trainable=lora.TRAINABLE)


def test_only_adapters_get_gradients_and_optimizer_state(lora_trainer):
  state = lora_trainer.abstract_state
  params = lora.flat(state.params)
  adapter_shapes = sorted(x.shape for p, x in params.items() if lora.is_adapter(p))
  # AdamW's two moments, one per adapter, and nothing for the frozen base.
  moments = [x.shape for x in jax.tree.leaves(state.opt_state) if x.ndim]
  assert sorted(moments) == sorted(adapter_shapes * 2)
  trainable = [p for p, m in lora.flat(lora_trainer.mask).items() if m]
  assert trainable and all(lora.is_adapter(p) for p in trainable)
  assert lora_trainer.model.uses_dropout  # the adapters' dropout gets its rng


def test_adapters_are_sharded_like_their_kernel(lora_trainer):
  trainer = lora_trainer
  specs = {p: s.spec for p, s in lora.flat(trainer.state_shardings.params).items()}
  for kernel in ("decoder/layers/self_attention/query", "decoder/layers/mlp/wo"):
    kernel_spec, a, b = (specs[f"{kernel}/{n}"] for n in ("kernel", "lora_a", "lora_b"))
    # [L, in..., out...] -> A [L, in..., r] and B [L, r, out...]; r is never split.
    n_out = len(kernel_spec) - len(a) + 1
    assert tuple(a) == tuple(kernel_spec[:len(a) - 1]) + (None,), (kernel, a)
    assert tuple(b)[0] == kernel_spec[0] and b[1] is None
    assert tuple(b)[2:] == tuple(kernel_spec[len(kernel_spec) - n_out:]), (kernel, b)
  # On this (2, 2, 2) mesh the query kernel is split over fsdp (embed) and tensor (heads), and
  # so are A (embed) and B (heads).
  assert "fsdp" in str(specs["decoder/layers/self_attention/query/lora_a"])
  assert "tensor" in str(specs["decoder/layers/self_attention/query/lora_b"])


def test_unrolled_fused_and_bf16_layouts():
  unrolled = lora.LoraModel(models.from_gin("gpt2_tiny", ["TransformerConfig.scan_layers = False",
                                                          "TransformerConfig.fused_qkv = True"]),
                            rank=2)
  shapes = lora.flat(unrolled.abstract_params()[0])
  assert shapes["decoder/layers_1/self_attention/qkv/lora_a"].shape == (64, 2)
  assert shapes["decoder/layers_1/self_attention/qkv/lora_b"].shape == (2, 3, 4, 16)
  assert "decoder/layers_0/self_attention/out/lora_b" in shapes
  bf16 = lora.LoraModel(models.from_gin("llama_tiny", ["TransformerConfig.dtype = 'bfloat16'",
                                                       "TransformerConfig.param_dtype = 'bfloat16'"]))
  batch = random_batch(bf16, 2)
  shapes = lora.flat(bf16.abstract_params()[0])
  assert {x.dtype for p, x in shapes.items() if lora.is_adapter(p)} == {jnp.dtype(jnp.bfloat16)}
  out = jax.eval_shape(bf16.logits, host_params(bf16), batch)  # computes in bf16, logits fp32
  assert out.dtype == jnp.float32 and out.shape == (2, 8, 512)


def test_bad_settings_are_refused_with_the_fix():
  llama = models.from_gin("llama_tiny")
  with pytest.raises(ValueError, match=r"match no kernel; the kernels are: .*"
                     r"'decoder/layers/self_attention/query/kernel'.* LoraModel.targets"):
    lora.LoraModel(llama, targets="decoder/layers/attn/q/kernel").abstract_params()
  with pytest.raises(ValueError, match=r"rank 32 is not below min\(in, out\) = min\(64, 32\) of "
                     r"decoder/layers/self_attention/key/kernel"):
    lora.LoraModel(llama, rank=32).abstract_params()
  with pytest.raises(ValueError, match="already has LoRA adapters"):
    lora.LoraModel(lora.LoraModel(llama))
  with pytest.raises(ValueError, match="rank >= 1"):
    lora.LoraModel(llama, rank=0)


def test_fresh_adapters_start_as_init_does_sharded_like_the_state(lora_trainer):
  abstract = lora_trainer.abstract_state.params
  adapters = lora.flat(lora_trainer.model.fresh_adapters(abstract, seed=0))
  shapes = lora.flat(abstract)
  assert sorted(adapters) == sorted(p for p in shapes if lora.is_adapter(p))
  for name, value in adapters.items():
    assert value.shape == shapes[name].shape and value.sharding == shapes[name].sharding, name
    if name.endswith("lora_b"):
      assert not np.asarray(value).any(), name  # B = 0: step 0 is the base
  # A's fan-in is each layer's kernel input: the query's d = 64, the MLP output's f = 192.
  for name, fan_in in (("self_attention/query", 64), ("mlp/wo", 192)):
    a = np.asarray(adapters[f"decoder/layers/{name}/lora_a"])
    assert 0.7 < a.std() * np.sqrt(fan_in) < 1.3, (name, a.std())


def test_unrolled_layers_as_decoding_runs_them_use_the_scanned_adapters():
  # Decoding unrolls scanned layers (layers_0, ...); a regex naming the scanned path must still
  # find their adapters there, or decoding would silently run the base.
  targets = "decoder/layers/mlp/wo/kernel"
  scanned = lora.LoraModel(models.from_gin("llama_tiny"), rank=4, targets=targets)
  unrolled = lora.LoraModel(models.from_gin("llama_tiny", ["TransformerConfig.scan_layers = False"]),
                            rank=4, targets=targets)
  trained = host_params(scanned, adapters_b=0.5)
  batch = random_batch(scanned, 2)
  expected = jax.jit(scanned.logits)(trained, batch)
  got = jax.jit(unrolled.logits)(transformer.unstack_layers(trained), batch)
  np.testing.assert_allclose(got, expected, atol=1e-5)
  base = jax.jit(unrolled.base.logits)(transformer.unstack_layers(lora.split(trained)[0]), batch)
  assert float(np.abs(np.asarray(got) - np.asarray(base)).max()) > 1e-2


def test_qlora_trains_adapters_over_a_frozen_integer_base():
  """QLoRA: step 0 over an int8 base is the quantized base; over int4 a few steps lower the
  loss while the integer kernels stay as they were and only the adapters hold optimizer state."""
  from t5x_lite.quantization import QuantizedModel  # pylint: disable=g-import-not-at-top
  base = models.from_gin("llama_tiny")
  batch = random_batch(base, 4)
  float_params = lora.split(host_params(lora.LoraModel(base, rank=4)))[0]
  int8 = lora.LoraModel(base, rank=4, quantize="int8")
  quantized = QuantizedModel(base, "int8")
  base_int8 = quantized.quantize(float_params)
  params = lora.join(base_int8, lora.split(host_params(int8))[1])
  assert "kernel_int8" in params["decoder"]["layers"]["self_attention"]["query"]
  np.testing.assert_array_equal(jax.jit(int8.logits)(params, batch),
                                jax.jit(quantized.logits)(base_int8, batch))

  model = lora.LoraModel(base, rank=4, alpha=8.0, quantize="int4", quantize_group_size=32)
  optimizer = optimizers.create_optimizer("adamw", optimizers.create_schedule("constant", 3e-2, 0))
  trainer = trainer_lib.Trainer(model, optimizer, partitioning.make_mesh(2, 2, 2),
                                {k: v.shape for k, v in batch.items()}, trainable=lora.TRAINABLE)
  abstract = trainer.abstract_state.params  # adapters as a run from a base checkpoint makes them
  params = lora.join(lora.split(model.init(jax.random.PRNGKey(0), batch))[0],
                     model.fresh_adapters(abstract))
  assert lora.kernel_shapes(params, model.float_kernels())[
      "decoder/layers/self_attention/query/kernel"] == [2, 64, 4, 16]
  state = trainer.state_from_params(params)
  before = {p: np.asarray(x) for p, x in lora.flat(state.params).items() if not lora.is_adapter(p)}
  assert any(p.endswith("kernel_int4") for p in before)
  moments = [x.shape for x in jax.tree.leaves(state.opt_state) if x.ndim]
  assert sorted(moments) == sorted([x.shape for p, x in lora.flat(state.params).items()
                                    if lora.is_adapter(p)] * 2)
  losses = []
  for _ in range(4):
    state, metrics = trainer.train_step(state, batch)
    losses.append(float(metrics["loss"]))
  assert losses[-1] < losses[0] - 0.05, losses
  for name, value in lora.flat(state.params).items():
    if name in before:
      np.testing.assert_array_equal(np.asarray(value), before[name], err_msg=name)
  with pytest.raises(ValueError, match="weight-only.*w8a8 rounds the activations"):
    lora.LoraModel(base, quantize="w8a8")
