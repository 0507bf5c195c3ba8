"""Models: a Flax module plus what training and inference need around it, for each family.

A model owns everything that differs by family or objective: its feature converter, batch
validation, parameter initialisation with logical axes, `loss_fn` (with the auxiliary losses its
layers sow), the stacks a step runs (so FLOPs and memory are counted by `t5x_lite.costs`), how
prompts become batches, and `score_batch` / `predict_batch` / `fill_mask`. Jobs and tools call
these methods and never ask which family a model is. A new objective (a reward model, DPO) is a
model class whose `loss_fn` says what to minimise.

The batch features are those of seqio's feature converters (T5X names), so a task only needs to
provide `inputs`/`targets`.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
from typing import Callable, Mapping, Optional, Sequence

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np

from t5x_lite import costs, decoding, layers, losses, transformer
from t5x_lite.config import TransformerConfig

Array = jax.Array
Batch = Mapping[str, Array]


MODEL_CLASSES: dict[str, type["BaseModel"]] = {}  # TransformerConfig.family -> model class


def _model_of_family(family: str):
  """Class decorator: the model class for configs of `family`."""
  def register(cls):
    MODEL_CLASSES[family] = cls
    return cls
  return register


class BaseModel:
  """What every family shares; subclasses set the module, the features and their stacks.

  Everything that differs by family or objective is a method here, so jobs and tools never ask
  which family a model is: the feature converter, the stacks a step runs (for FLOPs and memory),
  the loss, and how prompts become a batch for decoding or scoring.
  """
  REQUIRED_FEATURES: tuple[str, ...] = ()
  GENERATES = False  # predict_batch / generation_batch / scoring_batch exist
  CONTINUES_PROMPT = False  # its generated ids follow the prompt's (a decoder-only model)
  HF_ARCHITECTURES: tuple[str, ...] = ()  # Hugging Face classes that can hold it, by preference

  def __init__(self, config: TransformerConfig, z_loss: float = 1e-4,
               label_smoothing: float = 0.0,
               loss_chunk_size: Optional[int] = losses.DEFAULT_CHUNK_SIZE):
    expected = MODEL_CLASSES.get(config.family)
    if expected is None or not isinstance(self, expected):
      mine = [f for f, cls in MODEL_CLASSES.items() if isinstance(self, cls)]
      raise ValueError(f"{type(self).__name__} needs TransformerConfig.family={mine[0]!r}, got "
                       f"{config.family!r}; use {getattr(expected, '__name__', None)} for that "
                       "family.")
    self.config = config
    self.z_loss = z_loss
    self.label_smoothing = label_smoothing
    # Tokens per chunk of the output projection + loss (None: all logits at once; see losses).
    self.loss_chunk_size = losses.check_chunk_size(loss_chunk_size)
    # Defaults of `predict_batch`; each call may override any field.
    self.decode_params = decoding.DecodeParams()
    self._compiled_fns = {}

  # -- subclass hooks ---------------------------------------------------------------------------
  @property
  def module(self) -> nn.Module:
    raise NotImplementedError

  def _module_args(self, batch: Batch) -> tuple:
    """The module's positional arguments, taken from the batch."""
    raise NotImplementedError

  def _targets(self, batch: Batch) -> tuple[Array, Optional[Array]]:
    raise NotImplementedError

  def stacks(self, batch_shapes: Mapping[str, Sequence[float]]) -> list[costs.StackShape]:
    """The layer stacks a step on batches of these shapes runs (for FLOPs and memory)."""
    raise NotImplementedError

  def _head_tokens(self, batch_shapes) -> float:
    """How many tokens the output head projects onto the vocabulary."""
    raise NotImplementedError

  def _head_flops_per_token(self) -> float:
    return 2 * self.config.d_model * self.config.vocab_size

  # -- shared API -------------------------------------------------------------------------------
  def feature_converter(self, pack: bool = True):
    """The seqio FeatureConverter that turns task examples into this model's batches."""
    from t5x_lite.data import feature_converters  # pylint: disable=g-import-not-at-top  # TF
    return feature_converters.make_feature_converter(self.config.family, pack=pack)

  def check_batch(self, batch: Batch) -> None:
    missing = [name for name in self.REQUIRED_FEATURES if name not in batch]
    if missing:
      raise ValueError(
          f"{type(self).__name__} batch lacks features {missing} (has {sorted(batch)}); batches "
          f"must come from the model's feature converter (t5x_lite.data.get_dataset(..., "
          f"feature_converter={self.config.family!r})), which produces them.")

  def dummy_batch(self, batch_size: int, lengths: Mapping[str, int]) -> dict[str, Array]:
    """Zeros shaped like a real batch; `lengths` maps "inputs"/"targets" to feature lengths."""
    batch = {}
    for name in self.REQUIRED_FEATURES:
      length = lengths["inputs" if name.startswith("encoder") else "targets"]
      batch[name] = jnp.zeros((batch_size, length), jnp.int32)
    return batch

  def init(self, rng: Array, batch: Batch):
    """Initial parameters (a plain pytree of arrays) for batches shaped like `batch`."""
    # Compiled: run eagerly, flax dispatches every initialiser op by op, which is slower. A new
    # jit per call, so the trace sees the interceptors active now (LoRA's adapters).
    return jax.jit(self._unboxed_init)(rng, batch)

  def _unboxed_init(self, rng, batch):
    return nn.meta.unbox(self._init_boxed(rng, batch))

  def _init_boxed(self, rng, batch):
    """Parameters wrapped in flax's LogicallyPartitioned boxes (they carry the axis names)."""
    self.check_batch(batch)
    return self.module.init(rng, *self._module_args(batch), deterministic=True)["params"]

  def abstract_params(self, batch: Optional[Batch] = None):
    """(parameter shapes/dtypes, logical PartitionSpecs) without allocating anything."""
    batch = batch or self.dummy_batch(1, {"inputs": 8, "targets": 8})
    boxed = jax.eval_shape(self._init_boxed, jax.random.PRNGKey(0), batch)
    return nn.meta.unbox(boxed), nn.get_partition_spec(boxed)

  def num_params(self, batch: Optional[Batch] = None, active: bool = False) -> int:
    """Parameters of the model; with `active`, those one token uses (an MoE model's router and
    chosen experts, not all of them)."""
    shapes, _ = self.abstract_params(batch)
    unused = 0 if not active else self.analytic_param_counts()[0] - self.analytic_param_counts(
        active=True)[0]
    return sum(x.size for x in jax.tree.leaves(shapes)) - unused

  def analytic_param_counts(self, active: bool = False) -> tuple[int, int]:
    """(total, embedding-table) parameters counted from the config by `t5x_lite.costs`: what
    `num_params` finds, without tracing the model (for searching many shapes). With `active`,
    an MoE layer counts only the experts one token uses."""
    cfg = self.config
    embedding = cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)
    other = self._head_params()
    for stack in self.stacks({name: (1, 1) for name in self.REQUIRED_FEATURES}):
      tables, norm = costs.embedder_params(cfg)
      embedding, other = embedding + tables, other + norm + costs.stack_params(cfg, stack, active)
    return embedding + other + self._head_embedding_params(), embedding + (
        self._head_embedding_params())

  def _head_params(self) -> int:
    return 0

  def _head_embedding_params(self) -> int:
    return 0

  def flops_per_step(self, batch_shapes: Mapping[str, Sequence[int]]) -> float:
    """Model FLOPs of one training step on batches of these shapes: forward + backward = 3x
    forward (see `t5x_lite.costs`; recomputation by remat is not counted, as MFU demands)."""
    forward = sum(costs.stack_flops(self.config, s) for s in self.stacks(batch_shapes))
    forward += self._head_tokens(batch_shapes) * self._head_flops_per_token()
    return 3.0 * forward

  def activation_bytes(self, batch_shapes: Mapping[str, Sequence[float]],
                       tensor_shards: int = 1) -> float:
    """Activation bytes a train step keeps for its backward pass on batches of these shapes
    (per device when the shapes are a device's share); see `costs.stack_activation_bytes`."""
    cfg = self.config
    kept = sum(costs.stack_activation_bytes(cfg, s, tensor_shards)
               for s in self.stacks(batch_shapes))
    head_tokens = self._head_tokens(batch_shapes)
    return kept + costs.logits_bytes(cfg, min(head_tokens, self.loss_chunk_size or head_tokens),
                                     tensor_shards)

  def apply(self, params, batch: Batch, dropout_rng: Optional[Array] = None,
            output_head: bool = False):
    """(teacher-forced logits [b, l, v], the auxiliary losses and intermediates layers sowed).

    Dropout is on iff a `dropout_rng` is given. With `output_head`, the module's
    `losses.OutputHead` (or logits, for a head that cannot be chunked) instead of the logits."""
    rngs = None if dropout_rng is None else {"dropout": dropout_rng}
    kwargs = {"output_head": True} if output_head else {}
    logits, sown = self.module.apply({"params": params}, *self._module_args(batch), rngs=rngs,
                                     deterministic=dropout_rng is None,
                                     mutable=layers.SOWN_COLLECTIONS, **kwargs)
    return logits, sown

  def logits(self, params, batch: Batch, dropout_rng: Optional[Array] = None) -> Array:
    """Teacher-forced logits [b, l, v]; dropout is on iff a `dropout_rng` is given."""
    return self.apply(params, batch, dropout_rng)[0]

  def loss_fn(self, params, batch: Batch,
              dropout_rng: Optional[Array] = None) -> tuple[Array, dict]:
    """Mean cross entropy (+ z-loss) over target tokens plus every auxiliary loss the layers
    sowed; T5X's metrics (mergeable, see `t5x_lite.metrics`) and one per auxiliary loss."""
    self.check_batch(batch)
    outputs, sown = self.apply(params, batch, dropout_rng, self.loss_chunk_size is not None)
    targets, weights = self._targets(batch)
    loss, metrics = losses.cross_entropy(
        outputs, targets, weights, chunk_size=self.loss_chunk_size,
        label_smoothing=self.label_smoothing, z_loss=self.z_loss)
    return layers.add_sown(loss, metrics, sown)

  # -- inference --------------------------------------------------------------------------------
  def score_batch(self, params, batch: Batch) -> Array:
    """Log-likelihood of each row's targets [b]: sum of log p(target) over weighted tokens.

    For BERT this is the (pseudo-)log-likelihood of the tokens chosen for the MLM loss.
    """
    self.check_batch(batch)
    return self._compiled("_score")(params, dict(batch))

  def _score(self, params, batch):
    log_probs = jax.nn.log_softmax(self.logits(params, batch))
    targets, weights = self._targets(batch)
    token_scores = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(token_scores * weights, axis=-1)

  def predict_batch(self, params, batch: Batch, rng: Optional[Array] = None,
                    **decode_overrides) -> tuple[Array, Array]:
    """Decodes from the batch's prompts: tokens [b, n, N] and scores [b, n], best first.

    n is `num_decodes` (sampling) or `beam_size` (beam search); N is `max_new_tokens`; rows
    end at EOS and hold 0 after it. Any `decoding.DecodeParams` field may be given as a keyword
    to override `self.decode_params` for this call. Sampling uses `rng` (default PRNGKey(0)).
    Scores are log-likelihoods for samples and length-penalised ones for beams.
    """
    raise ValueError(f"{type(self).__name__} does not generate text; "
                     "use a decoder-only or encoder-decoder model.")

  def causal_lm_mismatch(self) -> Optional[str]:
    """Why a Hugging Face causal LM over this model's tokens (what PEFT's prompt tuning wraps)
    would not compute what this model does; None if it would."""
    return f"this one is family {self.config.family!r}, not a decoder-only model"

  def _decode_options(self, overrides) -> decoding.DecodeParams:
    return self.decode_params.replace(**overrides).validate(self.config.vocab_size)

  def _compiled(self, method: str, *static):
    """`jax.jit` of a method, with leading static arguments, compiled once per distinct value."""
    key = (method,) + static
    if key not in self._compiled_fns:
      self._compiled_fns[key] = jax.jit(functools.partial(getattr(self, method), *static))
    return self._compiled_fns[key]

  @functools.cached_property
  def _decoding_module(self) -> nn.Module:
    """The module with layers unrolled, so that XLA updates each layer's cache in place."""
    return type(self.module)(self.config.replace(scan_layers=False))

  def _decoder(self, params):
    """(decoding module, its apply on `params` laid out by `transformer.decoding_params`, once
    per call, outside the decoding loop)."""
    params = transformer.decoding_params(params, self.config)
    module = self._decoding_module
    return module, functools.partial(module.apply, {"params": params})


@gin.configurable(module="t5x_lite.models")
@_model_of_family("encoder")
class EncoderOnlyModel(BaseModel):
  """BERT-style masked LM: loss only where `encoder_loss_weights` is nonzero (masked tokens)."""
  REQUIRED_FEATURES = ("encoder_input_tokens", "encoder_target_tokens", "encoder_loss_weights")
  HF_ARCHITECTURES = ("BertForMaskedLM",)

  @property
  def module(self):
    return transformer.EncoderOnly(self.config)

  def _module_args(self, batch):
    return (batch["encoder_input_tokens"], batch.get("encoder_segment_ids"),
            batch.get("encoder_positions"))

  def _targets(self, batch):
    return batch["encoder_target_tokens"], batch["encoder_loss_weights"]

  def stacks(self, batch_shapes):
    b, s = batch_shapes["encoder_input_tokens"]
    return [costs.StackShape(b, s, self.config.num_layers)]

  def _head_tokens(self, batch_shapes):
    return math.prod(batch_shapes["encoder_input_tokens"])

  def _head_flops_per_token(self):
    d = self.config.d_model  # the MLM transform (d x d), then the vocabulary projection
    return 2 * d * d + super()._head_flops_per_token()

  def _head_params(self):
    d = self.config.d_model  # the MLM transform (always biased) and its norm
    return d * d + d + costs.norm_params(self.config)

  def _head_embedding_params(self):
    return self.config.vocab_size if self.config.tie_embeddings else 0  # the tied head's bias

  def fill_mask(self, params, tokens: Array, mask_id: int,
                top_k: int = 5) -> tuple[Array, Array, Array]:
    """The top_k predictions at each [MASK] of `tokens` [b, l] (0 is padding).

    Returns ids [b, l, k] and probabilities [b, l, k], best first, at every position, and the
    boolean [b, l] positions holding `mask_id`, where the predictions are the answer.
    """
    if not 1 <= top_k <= self.config.vocab_size:
      raise ValueError(f"top_k must be in [1, vocab_size={self.config.vocab_size}], got {top_k}.")
    tokens = jnp.asarray(tokens, jnp.int32)
    probs, ids = self._compiled("_fill_mask", top_k)(params, tokens)
    return ids, probs, tokens == mask_id

  def _fill_mask(self, top_k, params, tokens):
    probs = jax.nn.softmax(self.module.apply({"params": params}, tokens), axis=-1)
    return jax.lax.top_k(probs, top_k)


@gin.configurable(module="t5x_lite.models")
@_model_of_family("decoder")
class DecoderOnlyModel(BaseModel):
  """GPT / LLaMA causal LM. With `inputs_bidirectional_attention`, batches from prefix-LM tasks
  (which carry `decoder_causal_attention`) see their inputs part bidirectionally."""
  REQUIRED_FEATURES = ("decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights")
  HF_ARCHITECTURES = ("GPT2LMHeadModel", "LlamaForCausalLM", "MixtralForCausalLM")
  GENERATES = True
  CONTINUES_PROMPT = True

  def __init__(self, config: TransformerConfig, z_loss: float = 1e-4,
               label_smoothing: float = 0.0, inputs_bidirectional_attention: bool = False,
               loss_chunk_size: Optional[int] = losses.DEFAULT_CHUNK_SIZE):
    super().__init__(config, z_loss, label_smoothing, loss_chunk_size)
    self.inputs_bidirectional_attention = inputs_bidirectional_attention

  @property
  def module(self):
    return transformer.DecoderOnly(self.config)

  def causal_lm_mismatch(self) -> Optional[str]:
    if self.inputs_bidirectional_attention:
      return ("this base reads its inputs bidirectionally (DecoderOnlyModel."
              "inputs_bidirectional_attention) and Hugging Face's causal decoder does not")
    return None

  def _module_args(self, batch):
    prefix = None
    if self.inputs_bidirectional_attention:
      prefix = batch.get("decoder_causal_attention")
    return (batch["decoder_input_tokens"], batch.get("decoder_segment_ids"),
            batch.get("decoder_positions"), prefix)

  def _targets(self, batch):
    return batch["decoder_target_tokens"], batch["decoder_loss_weights"]

  def stacks(self, batch_shapes):
    b, l = batch_shapes["decoder_input_tokens"]
    return [costs.StackShape(b, l, self.config.num_layers)]

  def _head_tokens(self, batch_shapes):
    return math.prod(batch_shapes["decoder_input_tokens"])

  # -- text in, batches out ---------------------------------------------------------------------
  def generation_batch(self, prompts: Sequence[Sequence[int]], eos_id: int, max_new_tokens: int,
                       rows: Optional[int] = None, round_width: Callable[[int], int] = int):
    """The batch `predict_batch` continues: BOS (0) then each prompt's ids, right-padded, with
    `decoder_causal_attention` marking the prompt. Rows past the prompts (up to `rows`) hold BOS
    alone; `round_width` rounds the width up (so similar calls share one compiled decoder)."""
    del eos_id  # a decoder's prompt is continued, not terminated
    limit = self.config.max_length - max_new_tokens
    check_lengths(prompts, limit - 1, f"with max_new_tokens={max_new_tokens} ",
                  self.config.max_length)
    rows = rows or len(prompts)
    width = min(round_width(1 + max(map(len, prompts))), limit)
    tokens = np.zeros((rows, width), np.int32)
    prompt = np.zeros((rows, width), np.int32)
    prompt[len(prompts):, 0] = 1
    for row, ids in enumerate(prompts):
      tokens[row, 1:1 + len(ids)] = ids
      prompt[row, :1 + len(ids)] = 1
    return {"decoder_input_tokens": tokens, "decoder_causal_attention": prompt}

  def scoring_batch(self, sources: Sequence[Sequence[int]], targets: Sequence[Sequence[int]],
                    eos_id: int, rows: Optional[int] = None,
                    round_width: Callable[[int], int] = int):
    """The batch whose `score_batch` is log p(target | source): the target continues the
    source (BOS, source, target), and only the target's tokens are weighted."""
    del eos_id
    if any(not ids for ids in targets):
      raise ValueError("Every target needs at least one token; an empty target has nothing to "
                       "score.")
    joined = [list(s) + list(t) for s, t in zip(sources, targets)]
    max_length = self.config.max_length
    check_lengths(joined, max_length - 1, "(input + target) ", max_length)
    rows = rows or len(joined)
    targets_array = pad_rows(joined, rows, min(round_width(1 + max(map(len, joined))),
                                                max_length))
    weights = np.zeros_like(targets_array)
    prompt = np.zeros_like(targets_array)  # BOS and the input, as seqio's PrefixLM marks them.
    for row, (source, target) in enumerate(zip(sources, targets)):
      weights[row, len(source):len(source) + len(target)] = 1
      prompt[row, :1 + len(source)] = 1
    return {"decoder_target_tokens": targets_array,
            "decoder_input_tokens": np.pad(targets_array[:, :-1], ((0, 0), (1, 0))),
            "decoder_loss_weights": weights, "decoder_causal_attention": prompt}

  @staticmethod
  def sample_text(prompt: str, continuation: str) -> str:
    return prompt + continuation

  def predict_batch(self, params, batch: Batch, rng: Optional[Array] = None,
                    **decode_overrides) -> tuple[Array, Array]:
    """Continues each row's prompt (see `BaseModel.predict_batch` for the outputs).

    The prompt of a row is its first sum(decoder_causal_attention) tokens of
    `decoder_input_tokens` (what seqio's PrefixLM converter marks: BOS and the inputs), or BOS
    alone without that feature. Prompts are right-padded; the whole batch is prefilled in one
    pass and every row continues from its own length.
    """
    options = self._decode_options(decode_overrides)
    if "decoder_input_tokens" not in batch:
      raise ValueError("DecoderOnlyModel.predict_batch needs decoder_input_tokens (BOS = 0, then "
                       "the prompt), and decoder_causal_attention marking it; got "
                       f"{sorted(batch)}.")
    tokens = jnp.asarray(batch["decoder_input_tokens"], jnp.int32)
    if "decoder_causal_attention" in batch:
      lengths = jnp.sum(jnp.asarray(batch["decoder_causal_attention"], jnp.int32), axis=1)
    else:
      lengths = jnp.ones(tokens.shape[:1], jnp.int32)
    static, traced = options.split()
    rng = jax.random.PRNGKey(0) if rng is None else rng
    return self._compiled("_predict", static)(params, tokens, lengths, rng, traced)

  def _predict(self, options, params, tokens, lengths, rng, traced):
    b, prompt_length = tokens.shape
    _, apply = self._decoder(params)
    cache = transformer.init_cache(self.config, b, prompt_length + options.max_new_tokens)
    segment_ids = (jnp.arange(prompt_length)[None, :] < lengths[:, None]).astype(jnp.int32)
    prefix = segment_ids if self.inputs_bidirectional_attention else None
    # Prefill: the whole prompt in one pass; each row continues after its last prompt token.
    logits, cache = apply(tokens * segment_ids, segment_ids, None, prefix, cache=cache,
                          logits_at=lengths - 1)

    def step(token, positions, cache):
      logits, cache = apply(token[:, None], None, positions[:, None], cache=cache)
      return logits[:, 0], cache

    return decoding.decode(step, logits[:, 0], cache, lengths, rng, options.join(traced),
                           transformer.cache_logical_axes(cache))


@gin.configurable(module="t5x_lite.models")
@_model_of_family("encoder_decoder")
class EncoderDecoderModel(BaseModel):
  """T5: encoder over `encoder_input_tokens`, decoder teacher-forced on `decoder_input_tokens`."""
  REQUIRED_FEATURES = ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens",
                       "decoder_loss_weights")
  HF_ARCHITECTURES = ("T5ForConditionalGeneration",)
  GENERATES = True

  @property
  def module(self):
    return transformer.EncoderDecoder(self.config)

  def _module_args(self, batch):
    return (batch["encoder_input_tokens"], batch["decoder_input_tokens"],
            batch.get("encoder_segment_ids"), batch.get("decoder_segment_ids"),
            batch.get("encoder_positions"), batch.get("decoder_positions"))

  def _targets(self, batch):
    return batch["decoder_target_tokens"], batch["decoder_loss_weights"]

  def stacks(self, batch_shapes):
    cfg = self.config
    b, s = batch_shapes["encoder_input_tokens"]
    l = batch_shapes["decoder_input_tokens"][1]
    return [costs.StackShape(b, s, cfg.num_layers),
            costs.StackShape(b, l, cfg.resolved_num_decoder_layers, cross_length=s)]

  def _head_tokens(self, batch_shapes):
    return math.prod(batch_shapes["decoder_input_tokens"])

  # -- text in, batches out ---------------------------------------------------------------------
  def generation_batch(self, prompts: Sequence[Sequence[int]], eos_id: int, max_new_tokens: int,
                       rows: Optional[int] = None, round_width: Callable[[int], int] = int):
    """The batch `predict_batch` decodes from: each prompt's ids and EOS as the encoder's input
    (as text-to-text tasks have it), right-padded; rows past the prompts are padding."""
    del max_new_tokens  # the decoder's length does not depend on the prompt's
    encoded = [list(ids) + [eos_id] for ids in prompts]
    max_length = self.config.max_length
    check_lengths(encoded, max_length, "", max_length)
    width = min(round_width(max(map(len, encoded))), max_length)
    return {"encoder_input_tokens": pad_rows(encoded, rows or len(encoded), width)}

  def scoring_batch(self, sources: Sequence[Sequence[int]], targets: Sequence[Sequence[int]],
                    eos_id: int, rows: Optional[int] = None,
                    round_width: Callable[[int], int] = int):
    """The batch whose `score_batch` is log p(target + EOS | source + EOS), teacher-forced."""
    sources = [list(ids) + [eos_id] for ids in sources]
    targets = [list(ids) + [eos_id] for ids in targets]
    max_length = self.config.max_length
    check_lengths(sources, max_length, "", max_length)
    check_lengths(targets, max_length, "", max_length)
    rows = rows or len(sources)
    width = lambda seqs: min(round_width(max(map(len, seqs))), max_length)
    targets_array = pad_rows(targets, rows, width(targets))
    return {"encoder_input_tokens": pad_rows(sources, rows, width(sources)),
            "decoder_target_tokens": targets_array,
            "decoder_input_tokens": np.pad(targets_array[:, :-1], ((0, 0), (1, 0))),
            "decoder_loss_weights": (targets_array > 0).astype(np.int32)}

  @staticmethod
  def sample_text(prompt: str, continuation: str) -> str:
    del prompt  # the output answers the prompt; it does not continue it
    return continuation

  def predict_batch(self, params, batch: Batch, rng: Optional[Array] = None,
                    **decode_overrides) -> tuple[Array, Array]:
    """Decodes targets for `encoder_input_tokens` (0 is padding), starting from BOS = 0 (see
    `BaseModel.predict_batch` for the outputs)."""
    options = self._decode_options(decode_overrides)
    if "encoder_input_tokens" not in batch:
      raise ValueError("EncoderDecoderModel.predict_batch needs encoder_input_tokens; got "
                       f"{sorted(batch)}.")
    static, traced = options.split()
    rng = jax.random.PRNGKey(0) if rng is None else rng
    return self._compiled("_predict", static)(
        params, jnp.asarray(batch["encoder_input_tokens"], jnp.int32),
        batch.get("encoder_segment_ids"), rng, traced)

  def _predict(self, options, params, encoder_tokens, encoder_segment_ids, rng, traced):
    b = encoder_tokens.shape[0]
    module, apply = self._decoder(params)
    encoded = apply(encoder_tokens, encoder_segment_ids, method=module.encode)
    # Slot 0 holds BOS; generated token t is fed back at position t + 1.
    cache = transformer.init_cache(self.config, b, 1 + options.max_new_tokens,
                                   encoder_tokens.shape[1])
    logits, cache = apply(encoded, encoder_tokens, jnp.zeros((b, 1), jnp.int32),
                          encoder_segment_ids, method=module.decode, cache=cache)

    def step(token, positions, cache):
      logits, cache = apply(None, None, token[:, None], decoder_positions=positions[:, None],
                            method=module.decode, cache=cache)
      return logits[:, 0], cache

    return decoding.decode(step, logits[:, 0], cache, jnp.ones((b,), jnp.int32), rng,
                           options.join(traced), transformer.cache_logical_axes(cache))


def check_lengths(sequences: Sequence[Sequence[int]], limit: int, what: str,
                  max_length: int) -> None:
  """Refuses a sequence longer than `limit` tokens, saying which and by how much."""
  for i, ids in enumerate(sequences):
    if len(ids) > limit:
      raise ValueError(
          f"Text {i} is {len(ids)} tokens long; {what}this model (max_length={max_length}) takes "
          f"at most {limit}. Shorten it" + (" or ask for fewer new tokens."
                                             if what.startswith("with") else "."))


def pad_rows(rows: Sequence[Sequence[int]], num_rows: int, width: int) -> np.ndarray:
  """Token rows right-padded with 0 into an int32 [num_rows, width] array."""
  out = np.zeros((num_rows, width), np.int32)
  for i, ids in enumerate(rows):
    out[i, :len(ids)] = ids
  return out


PRESET_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "gin_configs", "models")


def from_gin(preset: str, bindings: Sequence[str] = ()) -> BaseModel:
  """The `MODEL` defined by a gin file: a path, or a preset name in gin_configs/models/.

  The file is parsed in a gin config of its own: the caller's bindings are neither read nor
  changed (so loading a model in the middle of a job or notebook leaves its tasks as they were).
  """
  path = preset if os.path.exists(preset) else os.path.join(PRESET_DIR, preset + ".gin")
  if not os.path.exists(path):
    names = sorted(f[:-4] for f in os.listdir(PRESET_DIR) if f.endswith(".gin"))
    raise ValueError(f"No model preset {preset!r}: not a file, and not one of {names}.")
  with _separate_gin_config():
    gin.parse_config_files_and_bindings([path], list(bindings), finalize_config=False)
    return gin.query_parameter("%MODEL").scoped_configurable_fn()


@contextlib.contextmanager
def _separate_gin_config():
  """Runs the body on an empty gin config and puts the caller's back afterwards.

  gin keeps one global config and has no public way to stack them, so its state is saved and
  restored here, in the one place that needs it.
  """
  config = gin.config
  saved = ({k: dict(v) for k, v in config._CONFIG.items()}, dict(config._SINGLETONS),  # pylint: disable=protected-access
           set(config._IMPORTS), dict(config._OPERATIVE_CONFIG), config.config_is_locked())  # pylint: disable=protected-access
  gin.clear_config()
  try:
    yield
  finally:
    gin.clear_config()
    config._CONFIG.update(saved[0])  # pylint: disable=protected-access
    config._SINGLETONS.update(saved[1])  # pylint: disable=protected-access
    config._IMPORTS.update(saved[2])  # pylint: disable=protected-access
    config._OPERATIVE_CONFIG.update(saved[3])  # pylint: disable=protected-access
    config._set_config_is_locked(saved[4])  # pylint: disable=protected-access
