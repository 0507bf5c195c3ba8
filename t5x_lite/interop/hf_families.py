"""The Hugging Face architectures in t5x_lite terms (GPT-2, BERT, T5 and mT5, LLaMA, Mixtral).

For each family: how its config.json maps onto `TransformerConfig` fields (both ways, refusing the
options our model code cannot reproduce), and a table pairing every HF tensor with the t5x_lite
parameter(s) holding the same numbers. `hf.py` reads the tables in both directions, so import and
export cannot disagree.

Axis letters: d model width, h query heads, k key/value heads, e head width, f MLP width,
v vocabulary, n relative-position buckets.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Callable, Optional

import numpy as np

from t5x_lite.config import TransformerConfig

# HF activation names -> ours. "gelu_new" and "gelu_pytorch_tanh" are the tanh approximation.
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                  "relu": "relu", "silu": "silu", "swish": "silu"}
OUR_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "silu": "silu"}


@dataclasses.dataclass(frozen=True)
class Tensor:
  """One HF tensor and the t5x_lite parameter(s) it holds.

  `hf` may contain "{i}", the layer index; `stack` then names the stack ("encoder" or "decoder")
  whose layers it repeats over. `ours` are "/"-separated parameter paths in which "{layers}"
  stands for `layers` (scanned: one array with a leading layer axis) or `layers_{i}`.
  Several paths in `ours` mean a fused HF tensor (GPT-2's c_attn = q|k|v), split along its
  output axis in the order given.

  `layout` says how HF stores it, seen as an [in, out] matrix:
    "linear": torch.nn.Linear's weight [out, in]; our kernel is [in..., out...] with `n_in`
              input axes (q: [d, h, e] has n_in=1; the output projection [h, e, d] has n_in=2);
    "in_out": stored [in, out] already (GPT-2's Conv1D, embedding tables [v, d], bias tables);
    "vector": a 1-D tensor (biases, norm scales) that we may hold as [h, e].
  """
  hf: str
  ours: tuple[str, ...]
  layout: str = "in_out"
  n_in: int = 1
  stack: Optional[str] = None
  # A per-expert tensor: `hf` also contains "{j}", and our parameter holds every expert's on an
  # axis after the layer axis. `hf._expand` binds `expert` to each j in turn.
  experts: bool = False
  expert: Optional[int] = None

  @property
  def _in_axes(self) -> int:
    return 0 if self.layout == "vector" else self.n_in

  def hf_shape(self, our_shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    n_in = self._in_axes
    rows = math.prod(our_shapes[0][:n_in])
    cols = sum(math.prod(s[n_in:]) for s in our_shapes)
    return {"linear": (cols, rows), "in_out": (rows, cols), "vector": (cols,)}[self.layout]

  def to_ours(self, w: np.ndarray, our_shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
    matrix = {"linear": w.T, "in_out": w, "vector": w.reshape(1, -1)}[self.layout]
    n_in = self._in_axes
    splits = np.cumsum([math.prod(s[n_in:]) for s in our_shapes])[:-1]
    return [np.ascontiguousarray(part).reshape(shape)
            for part, shape in zip(np.split(matrix, splits, axis=1), our_shapes)]

  def to_hf(self, arrays: list[np.ndarray]) -> np.ndarray:
    n_in = self._in_axes
    matrix = np.concatenate([a.reshape(math.prod(a.shape[:n_in]), -1) for a in arrays], axis=1)
    out = {"linear": matrix.T, "in_out": matrix, "vector": matrix.reshape(-1)}[self.layout]
    return np.ascontiguousarray(out)


@dataclasses.dataclass(frozen=True)
class Family:
  """What `hf.py` needs to know about one HF architecture."""
  architecture: str  # The class named in config.json's "architectures", e.g. "GPT2LMHeadModel".
  model_type: str  # config.json's "model_type".
  config_from_hf: Callable  # HF config dict -> TransformerConfig fields (raises on what we lack).
  config_to_hf: Callable  # TransformerConfig -> HF config dict (raises if HF cannot express it).
  tensors: Callable  # TransformerConfig -> list[Tensor].
  tied_copies: Callable  # TransformerConfig -> {HF name: name of the tensor it must equal}.
  fallbacks: Callable = lambda cfg: {}  # {HF name: HF name to read when the first is absent}.
  # Regexes of tensors some checkpoints of this architecture carry that it does not use (old
  # non-weight buffers, heads of sibling classes); transformers skips them too.
  ignored: tuple[str, ...] = ()
  prefix: str = ""  # The base model's name prefix (base_model_prefix + ".").
  # {name as the tables have it: (stored name, index into it)} for checkpoints that store some
  # tensors in another layout (Mixtral's fused experts), given the stored names and shapes.
  views: Callable = lambda shapes: {}

  def is_ignored(self, name: str) -> bool:
    return any(re.fullmatch(p, name) for p in self.ignored)


# ----------------------------------------------------------------------------------------------
# Config helpers
# ----------------------------------------------------------------------------------------------
def _get(hf: dict, key: str, default=None):
  value = hf.get(key, default)
  return default if value is None else value


def _refuse(arch: str, options: dict[str, bool]):
  """Raise naming every option in `options` that is set (True) in a config.json."""
  problems = [name for name, present in options.items() if present]
  if problems:
    raise ValueError(f"{arch}: config.json asks for what t5x_lite's model code does not "
                     f"implement: {'; '.join(problems)}. Only checkpoints without these options "
                     "can be converted.")


def _activation(arch: str, key: str, name: str) -> str:
  if name not in HF_ACTIVATIONS:
    raise ValueError(f"{arch}: config.json {key}={name!r} is not supported; supported: "
                     f"{sorted(HF_ACTIVATIONS)}.")
  return HF_ACTIVATIONS[name]


def _needs(cfg: TransformerConfig, arch: str, **required):
  """Raise if `cfg` has fields HF's `arch` cannot express, naming all of them."""
  wrong = [f"{k}={getattr(cfg, k)!r} (needs {v!r})" for k, v in required.items()
           if getattr(cfg, k) != v]
  if wrong:
    raise ValueError(f"{arch} cannot hold this t5x_lite model: TransformerConfig "
                     f"{', '.join(wrong)}. Export a model whose config matches the architecture.")


def _canonical_heads(d_model: int, num_heads: int, num_kv_heads: int, head_dim: int) -> dict:
  """head_dim / num_kv_heads as the LLaMA presets write them: None when they are the default."""
  return {"num_heads": num_heads,
          "num_kv_heads": None if num_kv_heads == num_heads else num_kv_heads,
          "head_dim": None if num_heads * head_dim == d_model else head_dim}


def _ln(hf_module: str, ours: str, bias: bool, stack: Optional[str] = None) -> list[Tensor]:
  """A norm module `hf_module` (weight, optional bias) -> our Norm at `ours` (scale, bias)."""
  out = [Tensor(f"{hf_module}.weight", (f"{ours}/scale",), "vector", stack=stack)]
  if bias:
    out.append(Tensor(f"{hf_module}.bias", (f"{ours}/bias",), "vector", stack=stack))
  return out


def _dense(hf_module: str, ours: str, layout: str, n_in: int = 1, bias: bool = True,
           stack: Optional[str] = None) -> list[Tensor]:
  """A dense module (weight, optional bias) -> our DenseGeneral at `ours` (kernel, bias)."""
  out = [Tensor(f"{hf_module}.weight", (f"{ours}/kernel",), layout, n_in, stack)]
  if bias:
    out.append(Tensor(f"{hf_module}.bias", (f"{ours}/bias",), "vector", stack=stack))
  return out


# ----------------------------------------------------------------------------------------------
# GPT-2 (GPT2LMHeadModel): pre-LayerNorm, learned positions, Conv1D weights [in, out], fused qkv.
# ----------------------------------------------------------------------------------------------
def _gpt2_from_hf(hf: dict) -> dict:
  arch = "GPT2LMHeadModel"
  _refuse(arch, {
      "scale_attn_weights=false": not _get(hf, "scale_attn_weights", True),
      "scale_attn_by_inverse_layer_idx=true": _get(hf, "scale_attn_by_inverse_layer_idx", False),
      "add_cross_attention=true": _get(hf, "add_cross_attention", False)})
  d = hf["n_embd"]
  return dict(family="decoder", vocab_size=hf["vocab_size"], d_model=d, num_heads=hf["n_head"],
              d_ff=_get(hf, "n_inner", 4 * d), num_layers=hf["n_layer"],
              max_length=hf["n_positions"], position_type="learned", norm_type="layernorm",
              norm_position="pre", norm_eps=_get(hf, "layer_norm_epsilon", 1e-5),
              activation=_activation(arch, "activation_function",
                                     _get(hf, "activation_function", "gelu_new")),
              gated_mlp=False, use_bias=True,
              tie_embeddings=_get(hf, "tie_word_embeddings", True),
              dropout_rate=_get(hf, "resid_pdrop", 0.0))


def _gpt2_to_hf(cfg: TransformerConfig) -> dict:
  _needs(cfg, "GPT2LMHeadModel", family="decoder", mlp="dense", position_type="learned",
         norm_type="layernorm", norm_position="pre", gated_mlp=False, use_bias=True,
         type_vocab_size=0, scale_attention=True, num_kv_heads=None, head_dim=None)
  return dict(vocab_size=cfg.vocab_size, n_embd=cfg.d_model, n_head=cfg.num_heads,
              n_inner=cfg.d_ff, n_layer=cfg.num_layers, n_positions=cfg.max_length,
              layer_norm_epsilon=cfg.norm_eps,
              activation_function=OUR_ACTIVATIONS[cfg.activation],
              tie_word_embeddings=cfg.tie_embeddings, scale_attn_weights=True,
              scale_attn_by_inverse_layer_idx=False, resid_pdrop=cfg.dropout_rate,
              embd_pdrop=cfg.dropout_rate, attn_pdrop=cfg.dropout_rate)


def _gpt2_tensors(cfg: TransformerConfig) -> list[Tensor]:
  h, s = "transformer.h.{i}.", "decoder"
  layer = "decoder/{layers}/"
  qkv = [f"{layer}self_attention/{n}" for n in ("query", "key", "value")]
  out = [Tensor("transformer.wte.weight", ("token_embed/embedding",)),
         Tensor("transformer.wpe.weight", ("embedder/position_embedding/embedding",)),
         # c_attn is q|k|v fused along its output axis.
         Tensor(h + "attn.c_attn.weight", tuple(q + "/kernel" for q in qkv), stack=s),
         Tensor(h + "attn.c_attn.bias", tuple(q + "/bias" for q in qkv), "vector", stack=s)]
  out += _dense(h + "attn.c_proj", layer + "self_attention/out", "in_out", n_in=2, stack=s)
  out += _ln(h + "ln_1", layer + "self_attention_norm", bias=True, stack=s)
  out += _ln(h + "ln_2", layer + "mlp_norm", bias=True, stack=s)
  out += _dense(h + "mlp.c_fc", layer + "mlp/wi", "in_out", stack=s)
  out += _dense(h + "mlp.c_proj", layer + "mlp/wo", "in_out", stack=s)
  out += _ln("transformer.ln_f", "decoder/final_norm", bias=True)
  if not cfg.tie_embeddings:
    out += _dense("lm_head", "lm_head", "linear", bias=False)
  return out


GPT2 = Family(
    "GPT2LMHeadModel", "gpt2", _gpt2_from_hf, _gpt2_to_hf, _gpt2_tensors,
    tied_copies=lambda cfg: {"lm_head.weight": "transformer.wte.weight"} if cfg.tie_embeddings
    else {},
    ignored=(r"transformer\.h\.\d+\.attn\.(masked_)?bias",), prefix="transformer.")


# ----------------------------------------------------------------------------------------------
# BERT (BertForMaskedLM): post-LayerNorm, learned positions + token types, MLM head, tied output.
# ----------------------------------------------------------------------------------------------
def _bert_from_hf(hf: dict) -> dict:
  arch = "BertForMaskedLM"
  _refuse(arch, {
      "position_embedding_type other than 'absolute'":
          _get(hf, "position_embedding_type", "absolute") != "absolute",
      "is_decoder=true": _get(hf, "is_decoder", False),
      "add_cross_attention=true": _get(hf, "add_cross_attention", False),
      "tie_word_embeddings=false (an untied MLM decoder with a bias; our encoder's untied head "
      "has no bias)": not _get(hf, "tie_word_embeddings", True),
      "type_vocab_size=0": _get(hf, "type_vocab_size", 2) == 0})
  return dict(family="encoder", vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
              num_heads=hf["num_attention_heads"], d_ff=hf["intermediate_size"],
              num_layers=hf["num_hidden_layers"], max_length=hf["max_position_embeddings"],
              type_vocab_size=_get(hf, "type_vocab_size", 2), position_type="learned",
              norm_type="layernorm", norm_position="post",
              norm_eps=_get(hf, "layer_norm_eps", 1e-12),
              activation=_activation(arch, "hidden_act", _get(hf, "hidden_act", "gelu")),
              gated_mlp=False, use_bias=True, tie_embeddings=True,
              dropout_rate=_get(hf, "hidden_dropout_prob", 0.0))


def _bert_to_hf(cfg: TransformerConfig) -> dict:
  _needs(cfg, "BertForMaskedLM", family="encoder", mlp="dense", position_type="learned",
         norm_type="layernorm", norm_position="post", gated_mlp=False, use_bias=True,
         tie_embeddings=True, scale_attention=True, num_kv_heads=None, head_dim=None)
  if cfg.type_vocab_size == 0:
    raise ValueError("BertForMaskedLM cannot hold this t5x_lite model: TransformerConfig "
                     "type_vocab_size=0 (BERT always has token-type embeddings; use >= 1).")
  return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
              num_attention_heads=cfg.num_heads, intermediate_size=cfg.d_ff,
              num_hidden_layers=cfg.num_layers, max_position_embeddings=cfg.max_length,
              type_vocab_size=cfg.type_vocab_size, layer_norm_eps=cfg.norm_eps,
              hidden_act=OUR_ACTIVATIONS[cfg.activation], position_embedding_type="absolute",
              tie_word_embeddings=True, hidden_dropout_prob=cfg.dropout_rate,
              attention_probs_dropout_prob=cfg.dropout_rate)


def _bert_tensors(cfg: TransformerConfig) -> list[Tensor]:
  p, s, e = "bert.encoder.layer.{i}.", "encoder", "bert.embeddings."
  out = [Tensor(e + "word_embeddings.weight", ("token_embed/embedding",)),
         Tensor(e + "position_embeddings.weight", ("embedder/position_embedding/embedding",)),
         Tensor(e + "token_type_embeddings.weight", ("embedder/token_type_embedding/embedding",))]
  out += _ln(e + "LayerNorm", "embedder/embedding_norm", bias=True)
  for hf_name, ours in [("query", "query"), ("key", "key"), ("value", "value")]:
    out += _dense(p + f"attention.self.{hf_name}", f"{s}/{{layers}}/self_attention/{ours}",
                  "linear", stack=s)
  out += _dense(p + "attention.output.dense", f"{s}/{{layers}}/self_attention/out", "linear",
                n_in=2, stack=s)
  out += _ln(p + "attention.output.LayerNorm", f"{s}/{{layers}}/self_attention_norm", True, s)
  out += _dense(p + "intermediate.dense", f"{s}/{{layers}}/mlp/wi", "linear", stack=s)
  out += _dense(p + "output.dense", f"{s}/{{layers}}/mlp/wo", "linear", stack=s)
  out += _ln(p + "output.LayerNorm", f"{s}/{{layers}}/mlp_norm", True, s)
  out += _dense("cls.predictions.transform.dense", "mlm_transform", "linear")
  out += _ln("cls.predictions.transform.LayerNorm", "mlm_norm", bias=True)
  out.append(Tensor("cls.predictions.bias", ("mlm_bias",), "vector"))
  return out


BERT = Family(
    "BertForMaskedLM", "bert", _bert_from_hf, _bert_to_hf, _bert_tensors,
    tied_copies=lambda cfg: {"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings"
                                                                ".weight",
                             "cls.predictions.decoder.bias": "cls.predictions.bias"},
    # bert-base-* files hold BertForPreTraining's pooler and next-sentence head as well.
    ignored=(r"bert\.embeddings\.position_ids", r"bert\.pooler\..*", r"cls\.seq_relationship\..*"),
    prefix="bert.")


# ----------------------------------------------------------------------------------------------
# T5 (T5ForConditionalGeneration), v1.0 (relu, tied and rescaled head) and v1.1 (gated-gelu,
# untied): RMSNorm, no biases, unscaled attention logits, one relative-position table per stack.
# ----------------------------------------------------------------------------------------------
def _t5_from_hf(hf: dict) -> dict:
  arch = "T5ForConditionalGeneration"
  proj = _get(hf, "feed_forward_proj", "relu")
  gated = proj.startswith("gated-")
  # HF maps "gated-gelu" (T5 v1.1) to the tanh approximation, any other name to itself.
  activation = "gelu_tanh" if proj == "gated-gelu" else _activation(
      arch, "feed_forward_proj", proj[len("gated-"):] if gated else proj)
  # Newer transformers always tie lm_head to `shared` unless the checkpoint holds a different one,
  # and record T5 v1.0's head rescaling as `scale_decoder_outputs`; older ones used
  # `tie_word_embeddings` for both. Ours: tie_embeddings means shared *and* rescaled.
  scaled = hf["scale_decoder_outputs"] if "scale_decoder_outputs" in hf else _get(
      hf, "tie_word_embeddings", True)
  d, h, e = hf["d_model"], hf["num_heads"], hf["d_kv"]
  return dict(family="encoder_decoder", vocab_size=hf["vocab_size"], d_model=d, num_heads=h,
              head_dim=e, d_ff=hf["d_ff"], num_layers=hf["num_layers"],
              num_decoder_layers=_get(hf, "num_decoder_layers", hf["num_layers"]),
              max_length=_get(hf, "n_positions", 2048), position_type="relative",
              relative_num_buckets=_get(hf, "relative_attention_num_buckets", 32),
              relative_max_distance=_get(hf, "relative_attention_max_distance", 128),
              norm_type="rmsnorm", norm_position="pre",
              norm_eps=_get(hf, "layer_norm_epsilon", 1e-6), activation=activation,
              gated_mlp=gated, use_bias=False, tie_embeddings=bool(scaled),
              scale_attention=False, dropout_rate=_get(hf, "dropout_rate", 0.0))


def _t5_to_hf(cfg: TransformerConfig) -> dict:
  _needs(cfg, "T5ForConditionalGeneration", family="encoder_decoder", mlp="dense",
         position_type="relative",
         norm_type="rmsnorm", norm_position="pre", use_bias=False, type_vocab_size=0,
         scale_attention=False, num_kv_heads=None)
  act = OUR_ACTIVATIONS[cfg.activation]
  if cfg.gated_mlp and cfg.activation == "gelu":
    raise ValueError("T5ForConditionalGeneration cannot hold this t5x_lite model: HF's "
                     "'gated-gelu' is the tanh approximation; use activation='gelu_tanh'.")
  proj = ("gated-gelu" if cfg.activation == "gelu_tanh" else f"gated-{act}") if cfg.gated_mlp \
      else act
  return dict(vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.resolved_head_dim,
              d_ff=cfg.d_ff, num_layers=cfg.num_layers,
              num_decoder_layers=cfg.resolved_num_decoder_layers, num_heads=cfg.num_heads,
              relative_attention_num_buckets=cfg.relative_num_buckets,
              relative_attention_max_distance=cfg.relative_max_distance,
              layer_norm_epsilon=cfg.norm_eps, feed_forward_proj=proj,
              tie_word_embeddings=cfg.tie_embeddings, scale_decoder_outputs=cfg.tie_embeddings,
              n_positions=cfg.max_length, dropout_rate=cfg.dropout_rate,
              is_encoder_decoder=True, decoder_start_token_id=0)


def _t5_tensors(cfg: TransformerConfig) -> list[Tensor]:
  out = [Tensor("shared.weight", ("token_embed/embedding",))]
  for stack in ("encoder", "decoder"):
    block, layer = f"{stack}.block.{{i}}.layer.", f"{stack}/{{layers}}/"
    sublayers = [("0.SelfAttention", "self_attention")]
    if stack == "decoder":
      sublayers.append(("1.EncDecAttention", "cross_attention"))
    for hf_module, ours in sublayers:
      for hf_name, our_name in (("q", "query"), ("k", "key"), ("v", "value")):
        out += _dense(f"{block}{hf_module}.{hf_name}", f"{layer}{ours}/{our_name}", "linear",
                      bias=False, stack=stack)
      out += _dense(f"{block}{hf_module}.o", f"{layer}{ours}/out", "linear", n_in=2,
                    bias=False, stack=stack)
      out += _ln(f"{block}{hf_module[0]}.layer_norm", f"{layer}{ours}_norm", False, stack)
    mlp = f"{block}{len(sublayers)}."
    for wi in ("wi_0", "wi_1") if cfg.gated_mlp else ("wi",):
      out += _dense(f"{mlp}DenseReluDense.{wi}", f"{layer}mlp/{wi}", "linear", bias=False,
                    stack=stack)
    out += _dense(f"{mlp}DenseReluDense.wo", f"{layer}mlp/wo", "linear", bias=False, stack=stack)
    out += _ln(f"{mlp}layer_norm", f"{layer}mlp_norm", False, stack)
    out += _ln(f"{stack}.final_layer_norm", f"{stack}/final_norm", bias=False)
    # HF keeps each stack's one relative-position table [n, h] in its first block.
    out.append(Tensor(f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                      (f"{stack}_relpos_bias/rel_embedding",)))
  if not cfg.tie_embeddings:
    out += _dense("lm_head", "lm_head", "linear", bias=False)
  return out


def _t5_tied(cfg: TransformerConfig) -> dict:
  tied = {"encoder.embed_tokens.weight": "shared.weight",
          "decoder.embed_tokens.weight": "shared.weight"}
  if cfg.tie_embeddings:
    tied["lm_head.weight"] = "shared.weight"
  return tied


T5 = Family(
    "T5ForConditionalGeneration", "t5", _t5_from_hf, _t5_to_hf, _t5_tensors, _t5_tied,
    # A T5 v1.1 saved by newer transformers has its lm_head tied to `shared` (and not saved).
    fallbacks=lambda cfg: {} if cfg.tie_embeddings else {"lm_head.weight": "shared.weight"},
    ignored=(r"decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight",))


# ----------------------------------------------------------------------------------------------
# LLaMA (LlamaForCausalLM): RMSNorm, SwiGLU, RoPE in the "rotate half" layout, GQA.
# ----------------------------------------------------------------------------------------------
def _llama_from_hf(hf: dict) -> dict:
  arch = "LlamaForCausalLM"
  # transformers >= 5 writes `rope_parameters`; older versions `rope_theta` and `rope_scaling`.
  rope, scaling = _get(hf, "rope_parameters", {}), _get(hf, "rope_scaling", {})
  rope_type = rope.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
  _refuse(arch, {
      f"RoPE scaling of type {rope_type!r} (only 'default' RoPE)": rope_type != "default",
      "attention_bias=true": _get(hf, "attention_bias", False),
      "mlp_bias=true": _get(hf, "mlp_bias", False)})
  d, h = hf["hidden_size"], hf["num_attention_heads"]
  return dict(family="decoder", vocab_size=hf["vocab_size"], d_model=d,
              **_canonical_heads(d, h, _get(hf, "num_key_value_heads", h),
                                 _get(hf, "head_dim", d // h)),
              d_ff=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
              max_length=_get(hf, "max_position_embeddings", 2048), position_type="rope",
              rope_theta=float(rope.get("rope_theta", _get(hf, "rope_theta", 10_000.0))),
              norm_type="rmsnorm", norm_position="pre", norm_eps=_get(hf, "rms_norm_eps", 1e-6),
              activation=_activation(arch, "hidden_act", _get(hf, "hidden_act", "silu")),
              gated_mlp=True, use_bias=False,
              tie_embeddings=bool(_get(hf, "tie_word_embeddings", False)),
              dropout_rate=_get(hf, "attention_dropout", 0.0))


def _llama_to_hf(cfg: TransformerConfig) -> dict:
  _needs(cfg, "LlamaForCausalLM", family="decoder", mlp="dense", position_type="rope",
         norm_type="rmsnorm",
         norm_position="pre", gated_mlp=True, use_bias=False, type_vocab_size=0,
         scale_attention=True)
  return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
              intermediate_size=cfg.d_ff, num_hidden_layers=cfg.num_layers,
              num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.resolved_num_kv_heads,
              head_dim=cfg.resolved_head_dim, max_position_embeddings=cfg.max_length,
              rope_theta=cfg.rope_theta,
              rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
              rms_norm_eps=cfg.norm_eps, hidden_act=OUR_ACTIVATIONS[cfg.activation],
              attention_bias=False, mlp_bias=False, tie_word_embeddings=cfg.tie_embeddings,
              attention_dropout=cfg.dropout_rate)


def _llama_tensors(cfg: TransformerConfig) -> list[Tensor]:
  block, s, layer = "model.layers.{i}.", "decoder", "decoder/{layers}/"
  out = [Tensor("model.embed_tokens.weight", ("token_embed/embedding",))]
  for hf_name, ours in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
    out += _dense(f"{block}self_attn.{hf_name}", f"{layer}self_attention/{ours}", "linear",
                  bias=False, stack=s)
  out += _dense(f"{block}self_attn.o_proj", f"{layer}self_attention/out", "linear", n_in=2,
                bias=False, stack=s)
  for hf_name, ours in (("gate_proj", "wi_0"), ("up_proj", "wi_1"), ("down_proj", "wo")):
    out += _dense(f"{block}mlp.{hf_name}", f"{layer}mlp/{ours}", "linear", bias=False, stack=s)
  out += _ln(f"{block}input_layernorm", f"{layer}self_attention_norm", False, s)
  out += _ln(f"{block}post_attention_layernorm", f"{layer}mlp_norm", False, s)
  out += _ln("model.norm", "decoder/final_norm", bias=False)
  if not cfg.tie_embeddings:
    out += _dense("lm_head", "lm_head", "linear", bias=False)
  return out


LLAMA = Family(
    "LlamaForCausalLM", "llama", _llama_from_hf, _llama_to_hf, _llama_tensors,
    tied_copies=lambda cfg: {"lm_head.weight": "model.embed_tokens.weight"}
    if cfg.tie_embeddings else {},
    ignored=(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",), prefix="model.")


# ----------------------------------------------------------------------------------------------
# Mixtral (MixtralForCausalLM): LLaMA with a top-k mixture of SwiGLU experts in every layer.
# save_pretrained writes one tensor per expert (block_sparse_moe.experts.{j}.w1/w2/w3 = gate,
# down, up); transformers 5 holds them fused in memory (mlp.experts.gate_up_proj [e, 2f, d] =
# gate|up, down_proj [e, d, f]; mlp.gate), which `views` reads as the per-expert names.
# ----------------------------------------------------------------------------------------------
MOE_CONFIG_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def _mixtral_from_hf(hf: dict) -> dict:
  arch = "MixtralForCausalLM"
  k, layers = _get(hf, "num_experts_per_tok", 2), hf["num_hidden_layers"]
  _refuse(arch, {
      "sliding_window attention": _get(hf, "sliding_window", None) is not None,
      "num_experts_per_tok=1 (HF renormalises a single expert's weight to 1; t5x_lite keeps "
      "Switch's router probability)": k == 1})
  fields = _llama_from_hf(dict(hf, attention_bias=False, mlp_bias=False))
  # HF's balance loss is k at uniform routing and averages over layers; ours is 1 and sums.
  coef = _get(hf, "router_aux_loss_coef", 0.0) if _get(hf, "output_router_logits", False) else 0.0
  return dict(fields, mlp="moe", num_experts=hf["num_local_experts"], num_experts_per_token=k,
              expert_capacity_factor=None, load_balance_loss_weight=coef * k / layers,
              router_z_loss_weight=0.0)


def _mixtral_to_hf(cfg: TransformerConfig) -> dict:
  _needs(cfg, "MixtralForCausalLM", mlp="moe", moe_layer_interval=1, num_shared_experts=0,
         expert_capacity_factor=None)
  if cfg.num_experts_per_token == 1:
    raise ValueError("MixtralForCausalLM cannot hold this t5x_lite model: TransformerConfig "
                     "num_experts_per_token=1 (HF renormalises a single expert's weight to 1).")
  fields = _llama_to_hf(cfg.replace(mlp="dense", num_experts=0))
  for key in ("attention_bias", "mlp_bias"):
    del fields[key]
  return dict(fields, num_local_experts=cfg.num_experts,
              num_experts_per_tok=cfg.num_experts_per_token, sliding_window=None,
              output_router_logits=cfg.load_balance_loss_weight > 0,
              router_aux_loss_coef=cfg.load_balance_loss_weight * cfg.num_layers
              / cfg.num_experts_per_token)


def _mixtral_tensors(cfg: TransformerConfig) -> list[Tensor]:
  dense = cfg.replace(mlp="dense", num_experts=0)
  out = [t for t in _llama_tensors(dense) if "/mlp/" not in t.ours[0]]
  block, s, mlp = "model.layers.{i}.block_sparse_moe.", "decoder", "decoder/{layers}/mlp/"
  out.append(Tensor(block + "gate.weight", (mlp + "router",), "linear", stack=s))
  for hf_name, ours in (("w1", "wi_0"), ("w3", "wi_1"), ("w2", "wo")):
    out.append(Tensor(block + f"experts.{{j}}.{hf_name}.weight", (f"{mlp}{ours}_kernel",),
                      "linear", stack=s, experts=True))
  return out


def _mixtral_views(shapes: dict) -> dict:
  """The fused in-memory layout of transformers 5 as the per-expert tensors of the table."""
  views = {}
  for name, shape in shapes.items():
    match = re.fullmatch(r"model\.layers\.(\d+)\.mlp\.(experts\.gate_up_proj|experts\.down_proj|"
                         r"gate\.weight)", name)
    if not match:
      continue
    block = f"model.layers.{match.group(1)}.block_sparse_moe."
    if match.group(2) == "gate.weight":
      views[block + "gate.weight"] = (name, ())
    elif match.group(2) == "experts.down_proj":
      views.update({f"{block}experts.{j}.w2.weight": (name, (j,)) for j in range(shape[0])})
    else:
      f = shape[1] // 2
      for j in range(shape[0]):
        views[f"{block}experts.{j}.w1.weight"] = (name, (j, slice(0, f)))
        views[f"{block}experts.{j}.w3.weight"] = (name, (j, slice(f, 2 * f)))
  return views


MIXTRAL = Family(
    "MixtralForCausalLM", "mixtral", _mixtral_from_hf, _mixtral_to_hf, _mixtral_tensors,
    tied_copies=lambda cfg: {"lm_head.weight": "model.embed_tokens.weight"}
    if cfg.tie_embeddings else {},
    ignored=(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",), prefix="model.",
    views=_mixtral_views)


# mT5: T5 v1.1's structure and tensor names under its own class (read; written back as T5).
# Its head is never rescaled; config.json says tie_word_embeddings=true whatever the weights
# (transformers 5 forces it), so an lm_head in the file is its own, and a missing one is shared.
MT5 = dataclasses.replace(
    T5, architecture="MT5ForConditionalGeneration", model_type="mt5",
    config_from_hf=lambda hf: {**_t5_from_hf(hf), "tie_embeddings": False})

FAMILIES = {f.architecture: f for f in (GPT2, BERT, T5, MT5, LLAMA, MIXTRAL)}


def family_of_hf_config(hf: dict) -> Family:
  """The family a config.json describes, from its "architectures" list."""
  names = hf.get("architectures") or []
  for name in names:
    if name in FAMILIES:
      return FAMILIES[name]
  if any(key in hf for key in MOE_CONFIG_KEYS):
    raise ValueError(
        f"{names or hf.get('model_type')!r} is a mixture-of-experts architecture t5x_lite does "
        "not convert: its router and experts differ from Mixtral's. Of the MoE models only "
        "MixtralForCausalLM is converted.")
  raise ValueError(
      f"Unsupported Hugging Face architecture {names or '(none listed)'} (model_type="
      f"{hf.get('model_type')!r}); t5x_lite converts {sorted(FAMILIES)}. Save the checkpoint "
      "from one of these classes (e.g. a LlamaForCausalLM, not a LlamaModel).")


def family_of_config(cfg: TransformerConfig) -> Family:
  """The HF architecture that holds a t5x_lite model of this config: the first of its model
  class's `HF_ARCHITECTURES` that can express the config."""
  from t5x_lite import models  # pylint: disable=g-import-not-at-top
  reasons = []
  for architecture in models.MODEL_CLASSES[cfg.family].HF_ARCHITECTURES:
    try:
      FAMILIES[architecture].config_to_hf(cfg)
      return FAMILIES[architecture]
    except ValueError as error:
      reasons.append(str(error))
  raise ValueError("No Hugging Face architecture holds this config: " + " / ".join(reasons))
