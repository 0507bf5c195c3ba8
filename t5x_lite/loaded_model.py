"""The notebook API: from a params checkpoint to text in three lines, no gin knowledge needed.

    import t5x_lite
    m = t5x_lite.load("/tmp/t5x_lite_quickstart")         # any params checkpoint directory
    m.generate(["def fib(n):"], max_new_tokens=40, temperature=0.7)
    m.score(["def fib(n):"], ["\n    return n"])            # log-likelihoods
    t5x_lite.load(bert_dir).fill_mask("import [MASK]s")      # encoder-only (BERT) models

The vocabulary that turns text into ids comes from, in order: `load(..., vocabulary=)`, a
Hugging Face `tokenizer.json` in the checkpoint directory (tools/convert_checkpoint.py copies it
there), a SentencePiece `vocab.model` file there, the `get_vocabulary` bindings of the
`config.gin` a training run writes there, and otherwise the byte vocabulary (with a warning for
a converted Hugging Face checkpoint, whose ids are not bytes). None of this imports TensorFlow
(`t5x_lite.vocabulary` gives the same ids as the input pipeline's seqio ones).

What the text means follows the seqio tasks the models train on: a decoder-only model continues
the prompt ([BOS] + prompt, as `*_clm` tasks), an encoder-decoder model reads it as its inputs
with EOS appended (as text-to-text and span-corruption tasks); both stop at EOS. A converted
Hugging Face decoder reads its prompts as transformers feeds them instead (the tokenizer's own
special tokens, such as LLaMA's BOS, and no t5x_lite BOS 0), and decoding stops at the
checkpoint's EOS id (model.gin's EOS_ID).
"""
from __future__ import annotations

import ast
import os
import re
import warnings
from typing import Optional, Sequence

import jax
import numpy as np

from t5x_lite import checkpoints, hf_tokenizer, models
from t5x_lite import vocabulary as vocab_lib

SPM_FILE = "vocab.model"
SPM_COPY = "sentencepiece.model"  # = run_dir.SPM_COPY: the copy a training run keeps
TRAIN_CONFIG = "config.gin"
HF_CONFIG_COPY = "hf_config.json"  # = interop.hf.HF_CONFIG_COPY: what a conversion leaves
MASK = "[MASK]"


def load(checkpoint_dir: str, vocabulary=None, mesh=None, quantize: Optional[str] = None,
         group_size: int = 128, kv_cache: Optional[str] = None,
         base: Optional[str] = None) -> "LoadedModel":
  """A model and its parameters from a params checkpoint (params/ + model.gin), ready to use.

  Args:
    checkpoint_dir: written by `checkpoints.save_params`, a training run's MODEL_DIR, or
      tools/convert_checkpoint.py.
    vocabulary: a Vocabulary (ours or seqio's), a SentencePiece model path or a Hugging Face
      tokenizer.json path; default: see module docstring.
    mesh: a `partitioning.make_mesh(...)` mesh to restore the parameters onto, laid out by the
      logical-axis rules as the infer job does; default: this process's first device.
    quantize: "int8", "int4" / "nf4" (in groups of `group_size`) or "w8a8" quantizes a float
      checkpoint as it is read (see t5x_lite.quantization); a checkpoint written quantized
      (tools/convert_checkpoint.py --quantize) loads quantized without it.
    kv_cache: "int8" decodes over an int8 KV cache.
    base: for a soft-prompt export (a prompt-tuning run's MODEL_DIR, which loads as its base
      with the prompt in front of every text), the base checkpoint to read instead of the one
      its prompt_tuning.json names.
  """
  from t5x_lite import prompt_tuning, quantized_checkpoints  # pylint: disable=g-import-not-at-top
  gin_path = os.path.join(checkpoint_dir, checkpoints.MODEL_GIN)
  if not os.path.exists(gin_path):
    raise FileNotFoundError(_not_a_params_checkpoint(checkpoint_dir))
  source = prompt_tuning.for_checkpoint(models.from_gin(gin_path), checkpoint_dir, quantize,
                                        kv_cache, base)
  params_dir = source.params_dir  # a prompt export's base, else checkpoint_dir
  model = quantized_checkpoints.for_checkpoint(source.model, params_dir,
                                               quantize, group_size, kv_cache=kv_cache)
  vocab = _vocabulary(source.vocabulary_dir, vocabulary)
  ids = hf_tokenizer.checkpoint_ids(params_dir)
  # Converted by tools/convert_checkpoint.py: the model.gin ids, or (converted before they were
  # recorded) the copy of config.json it keeps.
  converted = bool(ids) or os.path.exists(os.path.join(params_dir, HF_CONFIG_COPY))
  if converted and vocabulary is None and vocab_lib.kind_of(vocab) == "byte":
    warnings.warn(
        f"{checkpoint_dir!r} is a converted Hugging Face checkpoint without its tokenizer, so "
        "t5x_lite.load falls back to bytes, which are not the ids the model was trained on. "
        f"Put the tokenizer's files there (AutoTokenizer.from_pretrained(hf_dir)"
        f".save_pretrained({checkpoint_dir!r})) or pass load(..., vocabulary=).", stacklevel=2)
  if vocab.vocab_size > model.config.vocab_size:
    raise ValueError(
        f"The vocabulary ({vocab}, {vocab.vocab_size} ids) does not fit the checkpoint's model "
        f"(vocab_size={model.config.vocab_size}): it is not the vocabulary the model was trained "
        f"with. Pass load(..., vocabulary=) the right one, or put its SentencePiece model in "
        f"{os.path.join(checkpoint_dir, SPM_FILE)} (or its Hugging Face tokenizer.json next to "
        "params/).")
  # A soft prompt was trained behind the feature converter's BOS 0, as the training tasks put
  # it, not behind the tokenizer's first token: its texts are read as in training.
  options = dict(eos_id=ids.get("EOS_ID"), hf_prompts=converted and source.prompt is None)
  load_params = quantized_checkpoints.loader(model, source.load, params_dir)
  if mesh is None:
    return LoadedModel(model, load_params(_abstract_on_first_device(model)), vocab, **options)
  from t5x_lite import predict  # pylint: disable=g-import-not-at-top  # predict imports this module
  return LoadedModel(model, predict.restore_params(model, mesh, load_params), vocab, **options)


def _abstract_on_first_device(model):
  """The model's parameter shapes on this process's first device (None for a float model:
  the checkpoint's own shapes are read)."""
  if not hasattr(model, "quantized"):
    return None
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
                      model.abstract_params()[0])


def _not_a_params_checkpoint(directory: str) -> str:
  """Why `directory` cannot be loaded, and what to load or do instead."""
  steps_dir = os.path.join(directory, checkpoints.CheckpointManager.SUBDIR)
  if os.path.isdir(os.path.join(directory, "state")):  # MODEL_DIR/checkpoints/<step>
    step = os.path.basename(os.path.normpath(directory))
    return (f"{directory!r} is a train-state checkpoint (state/ + data/, for resuming), not a "
            "params checkpoint. Load the run's MODEL_DIR once the run has finished, or export "
            f"this step by rerunning its training command with --gin.TRAIN_STEPS={step}.")
  steps = _steps(directory) or _steps(steps_dir)
  if steps:
    return (f"{directory!r} holds the train-state checkpoints of a run that has not exported its "
            f"parameters yet (it exports params/ + model.gin when it finishes). Rerun its "
            f"training command with --gin.TRAIN_STEPS={max(steps)} to export the newest one, "
            "then load the run's MODEL_DIR.")
  return (f"{directory!r} has no {checkpoints.MODEL_GIN}: t5x_lite.load needs a params "
          "checkpoint (params/ + model.gin), as written by checkpoints.save_params, a finished "
          "training run's MODEL_DIR or tools/convert_checkpoint.py.")


def _steps(directory: str) -> list[int]:
  names = os.listdir(directory) if os.path.isdir(directory) else []
  return [int(name) for name in names if name.isdigit()]


def _vocabulary(checkpoint_dir: str, vocabulary):
  if isinstance(vocabulary, str):
    if vocabulary.endswith(".json"):
      return vocab_lib.build("hf_tokenizer", tokenizer_path=vocabulary)
    return vocab_lib.build("sentencepiece", vocabulary)
  return vocabulary or checkpoint_vocabulary(checkpoint_dir) or vocab_lib.build("byte")


def checkpoint_vocabulary_bindings(checkpoint_dir: str) -> dict:
  """The `get_vocabulary` arguments of the vocabulary a checkpoint directory records ({} if
  none): its Hugging Face `tokenizer.json`, its SentencePiece `vocab.model`, else the
  `get_vocabulary.NAME = VALUE` lines of the config.gin a training run writes."""
  if os.path.exists(os.path.join(checkpoint_dir, hf_tokenizer.TOKENIZER_JSON)):
    return {"kind": "hf_tokenizer", "tokenizer_path": os.path.abspath(checkpoint_dir)}
  spm_path = os.path.join(checkpoint_dir, SPM_FILE)
  if os.path.exists(spm_path):
    return {"kind": "sentencepiece", "spm_path": os.path.abspath(spm_path)}
  path = os.path.join(checkpoint_dir, TRAIN_CONFIG)
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    found = re.findall(r"^get_vocabulary\.(\w+)\s*=\s*(.+?)\s*$", f.read(), re.MULTILINE)
  return {name: ast.literal_eval(value) for name, value in found}


def checkpoint_vocabulary(checkpoint_dir: str):
  """The vocabulary a checkpoint directory records (see `checkpoint_vocabulary_bindings`), or
  None."""
  bindings = checkpoint_vocabulary_bindings(checkpoint_dir)
  if not bindings:
    return None
  try:
    return vocab_lib.build(**bindings)
  except FileNotFoundError as e:
    copy = os.path.join(checkpoint_dir, SPM_COPY)
    if not os.path.exists(copy):
      raise
    raise FileNotFoundError(
        f"{e} The run kept a copy of the model it trained with: load it with "
        f"t5x_lite.load({checkpoint_dir!r}, vocabulary={copy!r}).") from None


class LoadedModel:
  """A model, its parameters and its vocabulary: text in, text (or scores) out.

  `eos_id` (default: the vocabulary's) ends generated text; `hf_prompts` makes a decoder-only
  model read prompts as transformers feeds them (a converted Hugging Face checkpoint).
  """

  def __init__(self, model: models.BaseModel, params, vocabulary, eos_id: Optional[int] = None,
               hf_prompts: bool = False):
    self.model = model
    self.params = params
    self.vocabulary = vocabulary
    self.eos_id = vocabulary.eos_id if eos_id is None else eos_id
    self.hf_prompts = hf_prompts and hasattr(vocabulary, "encode_prompt")

  def __repr__(self):
    return (f"LoadedModel({type(self.model).__name__}, {self.model.num_params():,} parameters, "
            f"max_length={self.model.config.max_length}, vocabulary={self.vocabulary})")

  # -- generation -------------------------------------------------------------------------------
  def generate(self, prompts: Sequence[str], max_new_tokens: int = 64,
               temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
               num_decodes: int = 1, beam_size: int = 0, alpha: float = 0.6,
               seed: int = 0, eos_id: Optional[int] = None) -> list:
    """The text generated for each prompt (without the prompt, up to EOS).

    temperature 0 is greedy; top_k / top_p restrict sampling; beam_size >= 1 runs beam search
    with T5X's length penalty `alpha`; `eos_id` ends a row (default: the checkpoint's EOS). With
    num_decodes > 1 or beam search, each prompt gets a list of all its samples or beams, best
    first; otherwise one string.
    """
    if isinstance(prompts, str):
      raise TypeError("generate takes a list of prompts, e.g. generate([\"Hello\"]).")
    if not prompts:
      raise ValueError("generate got no prompts; give a list of at least one, e.g. "
                       "generate([\"Hello\"]).")
    max_length = self.model.config.max_length
    if not 1 <= max_new_tokens <= max_length:
      raise ValueError(f"max_new_tokens={max_new_tokens}: this model holds at most "
                       f"max_length={max_length} tokens, so ask for 1 to {max_length} new "
                       "tokens (fewer the longer the prompt, for a decoder-only model).")
    self._check_generates()
    eos_id = self.eos_id if eos_id is None else eos_id
    if self._hf_decoder():
      firsts, encoded = self._hf_prompts(prompts)
      batch = self.model.generation_batch(encoded, eos_id, max_new_tokens,
                                          rows=_bucket(len(prompts)), round_width=_bucket)
      batch["decoder_input_tokens"][:len(prompts), 0] = firsts  # in BOS 0's place
    else:
      encoded = [self._encode(p) for p in prompts]
      batch = self.model.generation_batch(encoded, eos_id, max_new_tokens,
                                          rows=_bucket(len(prompts)), round_width=_bucket)
    outputs, _ = self.model.predict_batch(
        self.params, batch, rng=jax.random.PRNGKey(seed), max_new_tokens=max_new_tokens,
        temperature=temperature, top_k=top_k, top_p=top_p, num_decodes=num_decodes,
        beam_size=beam_size, alpha=alpha, eos_id=eos_id)
    continues = self.model.CONTINUES_PROMPT
    texts = [[self._decode(seq, eos_id, prompt_ids if continues else ()) for seq in row]
             for prompt_ids, row in zip(encoded, np.asarray(outputs)[:len(prompts)])]
    return [row[0] for row in texts] if num_decodes == 1 and not beam_size else texts

  def score(self, inputs: Sequence[str], targets: Sequence[str]) -> list[float]:
    """log p(target | input) for each pair (natural log, summed over the target's tokens).

    A decoder-only model scores the target as a continuation of the input; an encoder-decoder
    model scores it (with EOS) as the output for the input (with EOS).
    """
    if (isinstance(inputs, str) or isinstance(targets, str) or len(inputs) != len(targets)
        or not inputs):
      raise ValueError("score takes two lists of the same length, at least one item each: "
                       "inputs and their targets, e.g. score([\"1 + 1 =\"], [\" 2\"]).")
    self._check_generates()
    sources = [self._encode(text) for text in inputs]
    if self._hf_decoder():
      firsts, sources = self._hf_prompts(inputs)
    batch = self.model.scoring_batch(sources, [self._encode(text) for text in targets],
                                     self.eos_id, rows=_bucket(len(inputs)), round_width=_bucket)
    if self._hf_decoder():
      batch["decoder_input_tokens"][:len(inputs), 0] = firsts  # in BOS 0's place
    return [float(s) for s in np.asarray(self.model.score_batch(self.params, batch))[:len(inputs)]]

  def reward(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
    """The scalar reward of each (prompt, response) for a reward model (runs/reward_model.gin;
    see t5x_lite.alignment.RewardModel)."""
    if not hasattr(self.model, "reward_texts"):
      raise ValueError("reward needs a reward model (trained with runs/reward_model.gin); this "
                       f"checkpoint is a {type(self.model).__name__}: use generate or score.")
    return [float(r) for r in self.model.reward_texts(
        self.params, [self._encode(p) for p in prompts] if not isinstance(prompts, str) else
        prompts, [self._encode(r) for r in responses] if not isinstance(responses, str) else
        responses, self.vocabulary.eos_id)]

  # -- masked LM --------------------------------------------------------------------------------
  def fill_mask(self, text: str, top_k: int = 5) -> list[list[dict]]:
    """For each [MASK] in `text`, the top_k tokens an encoder-only model predicts there:
    [{"token": id, "text": str, "prob": p}, ...] best first, one list per [MASK]."""
    if not hasattr(self.model, "fill_mask"):
      raise ValueError(f"fill_mask needs an encoder-only (BERT) model; this checkpoint is "
                       f"family={self.model.config.family!r}: use generate or score.")
    if MASK not in text:
      raise ValueError(f"fill_mask: put {MASK} where a token should be predicted, e.g. "
                       f"'import [MASK]s'; got {text!r}.")
    mask_id = vocab_lib.mask_id(self.vocabulary)
    ids = []
    for i, piece in enumerate(text.split(MASK)):
      ids += ([mask_id] if i else []) + (self._encode(piece) if piece else [])
    ids.append(self.eos_id)  # MLM tasks append EOS to their inputs ([SEP] for a converted BERT).
    if self.hf_prompts and self.vocabulary.bos_id is not None:
      ids.insert(0, self.vocabulary.bos_id)  # and a converted BERT reads [CLS] first
    max_length = self.model.config.max_length
    models.check_lengths([ids], max_length, "", max_length)
    tokens = models.pad_rows([ids], 1, min(_bucket(len(ids)), max_length))
    top_ids, probs, is_mask = self.model.fill_mask(self.params, tokens, mask_id, top_k)
    top_ids, probs = np.asarray(top_ids)[0], np.asarray(probs)[0]
    return [[{"token": int(t), "text": self.vocabulary.decode([int(t)]), "prob": float(p)}
             for t, p in zip(top_ids[position], probs[position])]
            for position in np.flatnonzero(np.asarray(is_mask)[0])]

  # -- helpers ----------------------------------------------------------------------------------
  def _check_generates(self):
    if not self.model.GENERATES:
      raise ValueError("This checkpoint is an encoder-only (BERT) model: it does not generate or "
                       "score text left to right; use fill_mask.")

  def _encode(self, text: str) -> list[int]:
    return list(self.vocabulary.encode(text))

  def _hf_decoder(self) -> bool:
    return self.hf_prompts and self.model.CONTINUES_PROMPT

  def _hf_prompts(self, prompts: Sequence[str]) -> tuple[list[int], list[list[int]]]:
    """(first ids, the rest) of the prompts as transformers encodes them: the first id takes
    the place of t5x_lite's BOS 0. An empty prompt is the BOS alone, as transformers starts."""
    encoded = [self.vocabulary.encode_prompt(p) or [self.vocabulary.bos_id] for p in prompts]
    if any(ids[0] is None for ids in encoded):
      raise ValueError("An empty prompt needs a BOS token, and this tokenizer has none; give "
                       "every prompt some text.")
    return [ids[0] for ids in encoded], [ids[1:] for ids in encoded]

  def _decode(self, ids, eos_id: Optional[int] = None, prompt_ids: Sequence[int] = ()) -> str:
    """The text of generated `ids` (up to EOS), decoded after `prompt_ids` when they
    continue a prompt (see vocabulary.decode_continuation)."""
    ids = [int(t) for t in ids]
    eos_id = self.eos_id if eos_id is None else eos_id
    if eos_id in ids:
      ids = ids[:ids.index(eos_id)]
    if hasattr(self.vocabulary, "encode_prompt"):  # a Hugging Face tokenizer (hf_tokenizer.py)
      return self.vocabulary.decode(ids)  # id 0 is a token (GPT-2's "!"); specials are skipped
    return vocab_lib.decode_continuation(self.vocabulary, prompt_ids, [t for t in ids if t != 0])


def _bucket(n: int) -> int:
  """n rounded up to a power of two (at least 8): calls with similar sizes share one compiled
  decoder instead of compiling for every new prompt length or batch size."""
  return max(8, 1 << (n - 1).bit_length())
