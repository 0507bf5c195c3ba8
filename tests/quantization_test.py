"""t5x_lite.quantization: int8 / w8a8 / int4 weights and the int8 KV cache.

One small LLaMA-style decoder (d_model 128, so int4 groups of 128 fit) is trained for a few
dozen steps on Python source bytes in a module fixture; its held-out perplexity and greedy
continuations, float against quantized, bound what quantization may cost. Quantized
checkpoints (t5x_lite.quantized_checkpoints) are tested in tests/quantized_checkpoints_test.py.
"""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from t5x_lite import models, partitioning, quantization, quantized_arrays
from t5x_lite.quantization import QuantizedModel

LENGTH = 64
BINDINGS = ["TransformerConfig.d_model = 128", "TransformerConfig.d_ff = 256",
            "TransformerConfig.num_layers = 1", "TransformerConfig.max_length = 128",
            "TransformerConfig.vocab_size = 260"]


def _source_bytes() -> np.ndarray:
  """Python's own json package, as byte ids + 3 (0 pad / BOS, 1 EOS kept free)."""
  root = os.path.join(os.path.dirname(os.__file__), "json")
  text = b"".join(open(os.path.join(root, name), "rb").read()
                  for name in sorted(os.listdir(root)) if name.endswith(".py"))
  return np.frombuffer(text, np.uint8).astype(np.int32) + 3


def _batch(ids: np.ndarray, rows: int, start: int) -> dict:
  windows = np.stack([ids[start + i * LENGTH:start + (i + 1) * LENGTH] for i in range(rows)])
  inputs = np.concatenate([np.zeros((rows, 1), np.int32), windows[:, :-1]], axis=1)
  return {"decoder_input_tokens": inputs, "decoder_target_tokens": windows,
          "decoder_loss_weights": np.ones_like(windows, np.float32)}


@pytest.fixture(scope="module")
def trained():
  """(model, params, validation batch) after 40 AdamW steps."""
  model = models.from_gin("llama_tiny", BINDINGS)
  ids = _source_bytes()
  split = int(len(ids) * 0.9)
  params = model.init(jax.random.PRNGKey(0), _batch(ids, 2, 0))
  optimizer = optax.adamw(3e-3)

  @jax.jit
  def step(params, state, batch):
    grads = jax.grad(lambda p: model.loss_fn(p, batch)[0])(params)
    updates, state = optimizer.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state, rng = optimizer.init(params), np.random.default_rng(0)
  for _ in range(40):
    starts = rng.integers(0, split - LENGTH, 8)
    rows = [ids[s:s + LENGTH] for s in starts]
    params, state = step(params, state, _batch(np.concatenate(rows), 8, 0))
  return model, params, _batch(ids, 16, split)


def _perplexity(scores, batch) -> float:
  return float(np.exp(-np.sum(scores) / np.sum(batch["decoder_loss_weights"])))


def _prompts(batch):
  return {"decoder_input_tokens": batch["decoder_input_tokens"][:8, :24],
          "decoder_causal_attention": np.ones((8, 24), np.int32)}


def test_trained_model_perplexity_and_greedy_agreement(trained):
  model, params, batch = trained
  base_ppl = _perplexity(model.score_batch(params, batch), batch)
  assert base_ppl < 30  # it learned something (uniform over bytes is 260)
  reference, _ = model.predict_batch(params, _prompts(batch), max_new_tokens=16)
  bounds = {"int8": 0.005, "w8a8": 0.005, "int4": 0.05, "nf4": 0.05, "int8-kv": 0.005}
  for name, limit in bounds.items():
    if name == "int8-kv":
      qmodel, qparams = QuantizedModel(model, None, kv_cache="int8"), params
      ppl = _perplexity(quantization.cached_score(qmodel, qparams, batch), batch)
    else:
      qmodel = QuantizedModel(model, name, group_size=128)
      qparams = qmodel.quantize(params)
      ppl = _perplexity(qmodel.score_batch(qparams, batch), batch)
    print(f"{name}: perplexity {base_ppl:.4f} -> {ppl:.4f} ({ppl / base_ppl - 1:+.3%})")
    assert abs(ppl / base_ppl - 1) <= limit, name
    if name in ("int4", "nf4", "int8-kv"):  # those that change decoding most (slow compiles)
      tokens, _ = qmodel.predict_batch(qparams, _prompts(batch), max_new_tokens=16)
      agreement = float(np.mean(np.asarray(tokens) == np.asarray(reference)))
      print(f"{name}: greedy agreement {agreement:.3f}")
      assert agreement >= {"int4": 0.7, "nf4": 0.6, "int8-kv": 0.9}[name], name


def test_nf4_trained_error_and_qlora(trained):
  model, params, batch = trained
  qparams = {}
  for kind in ("int4", "nf4"):
    qmodel = QuantizedModel(model, kind, group_size=64)
    qparams[kind] = qmodel.quantize(params)
    error = _weight_error(qmodel, params)
    print(f"trained kernels g64: relative error {kind} {error:.4f}")
    assert error < 0.12, kind
  # QLoRA takes nf4 as its frozen base: step 0 is the nf4 model.
  from t5x_lite import lora  # pylint: disable=g-import-not-at-top
  qlora = lora.LoraModel(model, rank=2, quantize="nf4", quantize_group_size=64)
  adapters = lora.split(qlora.init(jax.random.PRNGKey(1), batch))[1]
  np.testing.assert_array_equal(jax.jit(qlora.logits)(lora.join(qparams["nf4"], adapters),
                                                       batch),
                                jax.jit(qmodel.logits)(qparams["nf4"], batch))


def _weight_error(qmodel, params) -> float:
  """sqrt(sum (w - dequantized w)^2 / sum w^2) over the kernels `qmodel` quantizes."""
  kind, group = qmodel.settings.kind, qmodel.settings.group_size
  num = den = 0.0
  for path, (_, n_in, n_out) in qmodel.sites().items():
    kernel = functools.reduce(lambda node, key: node[key], path.split("/"), params)["kernel"]
    lead = kernel.ndim - n_in - n_out  # scanned layers stack on leading axes
    w = kernel.reshape(kernel.shape[:lead] + (-1,) + kernel.shape[lead + n_in:])
    error = quantized_arrays.relative_error(w, lead, kind, group)
    square = float(jnp.sum(w ** 2))
    num, den = num + error ** 2 * square, den + square
  return (num / den) ** 0.5


def _host_params(model, seed=0):
  """Random parameters of the model's shapes drawn with numpy (no compiled init)."""
  shapes, _ = model.abstract_params()
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.1, s.shape), s.dtype), shapes)


def test_every_family_and_moe_experts_quantize():
  for preset, mode in (("t5_tiny", "int8"), ("bert_tiny", "w8a8"), ("mixtral_tiny", "int4")):
    model = models.from_gin(preset)
    batch = jax.tree.map(lambda x: x + 1, model.dummy_batch(2, {"inputs": 8, "targets": 8}))
    params = _host_params(model)
    qmodel = QuantizedModel(model, mode, group_size=32, embeddings=True, kv_cache="int8")
    qparams = qmodel.quantize(params)
    names = _names(qparams)
    assert not any(name.endswith("kernel") for name in names), preset
    if preset == "t5_tiny":  # an encoder-decoder decodes over int8 self and cross caches
      tokens, _ = qmodel.predict_batch(qparams, {"encoder_input_tokens": batch[
          "encoder_input_tokens"]}, max_new_tokens=4, beam_size=2)
      assert tokens.shape == (2, 2, 4)
    elif preset == "mixtral_tiny":  # (int4 of random weights: only that it runs, on int4)
      assert any(name.endswith("wi_0_kernel_int4") for name in names)
      assert bool(jnp.all(jnp.isfinite(qmodel.logits(qparams, batch))))
    else:
      reference, logits = model.logits(params, batch), qmodel.logits(qparams, batch)
      error = float(jnp.max(jnp.abs(logits - reference)) / jnp.max(jnp.abs(reference)))
      assert error < 0.1, (preset, error)


def test_fused_max_rows_takes_the_fused_path(monkeypatch):
  # Rows (batch x length) <= fused_max_rows: every weight-only kernel and the quantized tied
  # head run as fused_matmul and compute what the dequantize + dot does; 0 never fuses.
  model = models.from_gin("llama_tiny", ["TransformerConfig.num_layers = 1"])
  batch = jax.tree.map(lambda x: x + 1, model.dummy_batch(1, {"targets": 4}))
  params = _host_params(model)
  calls = []
  fused = quantization.fused_matmul
  monkeypatch.setattr(quantization, "fused_matmul",
                      lambda *args, **kwargs: calls.append(1) or fused(*args, **kwargs))
  logits = {}
  for rows in (0, 4):
    qmodel = QuantizedModel(model, "int4", group_size=32, embeddings=True, fused_max_rows=rows)
    calls.clear()
    logits[rows] = qmodel.logits(qmodel.quantize(params), batch)
    assert bool(calls) == bool(rows), rows
  np.testing.assert_allclose(logits[4], logits[0], rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="weight-only modes.*int8 x int8"):
    QuantizedModel(model, "w8a8", fused_max_rows=16)
  with pytest.raises(ValueError, match="int >= 0"):
    QuantizedModel(model, "int8", fused_max_rows=-1)
  with pytest.raises(ValueError, match="give a weight-only mode"):
    QuantizedModel(model, None, kv_cache="int8", fused_max_rows=16)


def test_bad_input_is_refused_with_the_fix(trained):
  model, params, batch = trained
  with pytest.raises(ValueError, match="group_size=48 must be|even int"):
    QuantizedModel(model, "int4", group_size=47)
  with pytest.raises(ValueError, match=r"group_size=256 does not divide the input dimension "
                                       r"128 of .*\[32, 64, 128\] do"):
    QuantizedModel(model, "int4", group_size=256).abstract_params()
  from t5x_lite import optimizers, trainer as trainer_lib  # pylint: disable=g-import-not-at-top
  mesh = partitioning.make_mesh()
  qmodel = QuantizedModel(model, "int8")
  trainer = trainer_lib.Trainer(qmodel, optimizers.create_optimizer(), mesh,
                                {k: v.shape for k, v in batch.items()})
  with pytest.raises(ValueError, match="inference only.*Train .* the float model"):
    trainer.train_step(trainer.state_from_params(qmodel.quantize(params)), batch)
  from t5x_lite import launch  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="QUANTIZE.*does not quantize.*quantization-aware "
                                       "training does not exist.*qlora_finetune.gin"):
    launch.configure(["models/gpt2_tiny.gin", "runs/finetune.gin"], ["QUANTIZE='int4'"])


def _names(tree) -> list[str]:
  return [jax.tree_util.keystr(path) .replace("['", "/").replace("']", "").lstrip("/")
          for path, _ in jax.tree_util.tree_leaves_with_path(tree)]
