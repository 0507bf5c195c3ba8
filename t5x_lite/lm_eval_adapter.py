"""Any t5x_lite params checkpoint as an lm-evaluation-harness (`lm-eval`) model: `t5x_lite`.

    pip install -e ".[eval]"
    python -m t5x_lite.lm_eval_adapter --model t5x_lite --model_args checkpoint=/tmp/run \
        --tasks arc_easy --num_fewshot 5 --batch_size 16

lm_eval 0.4 finds models in its own registry only (it has no entry-point group for them), so
this module registers `t5x_lite` there at import and its `main` is lm_eval's command line with
the same arguments. From Python: `lm_eval.simple_evaluate(model=T5xLiteLM("/tmp/run"), ...)`,
or `--model t5x_lite` in any process that imported this module.

Model arguments (`--model_args key=value,...`): `checkpoint` (required: a finished MODEL_DIR,
`checkpoints.save_params` or a converted HF model), `vocabulary` (a SentencePiece model path;
default: the checkpoint's, as `t5x_lite.load`), `data`, `fsdp`, `tensor` (the mesh over this
host's devices, as the infer job's `make_mesh.*`; data x fsdp must divide the batch size) and
`seed` (sampling). `--batch_size` is the number of rows per compiled call.

What is scored, for both families (the same batches as `model.score_batch`):
- loglikelihood: log p(continuation | context). A decoder-only model reads BOS + context +
  continuation (a converted Hugging Face decoder reads them as lm_eval's HF model does: no BOS,
  the context's first token in its place, and the tokenizer's BOS, else EOS, as the context of
  an empty one); an encoder-decoder model reads the context (+ EOS) and scores the continuation
  as the start of its output (no EOS, as lm_eval's Hugging Face seq2seq models do). Contexts
  too long for max_length lose their oldest tokens.
- loglikelihood_rolling: the sum over lm_eval's disjoint rolling windows: max_length - 1
  predicted tokens each after BOS, the last one conditioned on as many earlier tokens as fit.
- generate_until: greedy or sampled (`do_sample`, `temperature`, `top_k`, `top_p`) up to
  `max_gen_toks` (at most half of max_length for a decoder, so the context keeps the rest), cut
  at the first stop string.
"""
from __future__ import annotations

import sys

if __name__ == "__main__":
  # Run the importable module instead, so that `t5x_lite` is registered once, by the class that
  # `t5x_lite.lm_eval_adapter` names.
  from t5x_lite import lm_eval_adapter as _module  # pylint: disable=import-self
  sys.exit(_module.main())

# pylint: disable=g-import-not-at-top,wrong-import-position
import logging
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs

import t5x_lite
from t5x_lite import loaded_model, partitioning

log = logging.getLogger(__name__)
BOS = 0  # the decoder's first input (and padding), as in the CLM tasks


@register_model("t5x_lite")
class T5xLiteLM(LM):
  """lm_eval's three request types on a `t5x_lite.load`ed checkpoint, batched and sharded."""

  def __init__(self, checkpoint: str = "", batch_size=8, vocabulary: Optional[str] = None,
               data: int = -1, fsdp: int = 1, tensor: int = 1, seed: int = 0,
               max_batch_size=None, device=None):
    super().__init__()
    del max_batch_size, device  # lm_eval's PyTorch options: JAX places the work on the mesh
    if not checkpoint:
      raise ValueError("The t5x_lite model needs a checkpoint: --model_args checkpoint=DIR "
                       "(a finished MODEL_DIR or any params checkpoint).")
    if isinstance(batch_size, str) and not batch_size.isdigit():
      raise ValueError(f"--batch_size {batch_size!r}: the t5x_lite model takes a whole number "
                       "of rows per call, e.g. --batch_size 16.")
    self.batch_size = int(batch_size)
    self.mesh = partitioning.make_mesh(data=int(data), fsdp=int(fsdp), tensor=int(tensor),
                                       devices=jax.local_devices())
    split = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
    if self.batch_size % split:
      raise ValueError(f"--batch_size {self.batch_size} is not divisible by data x fsdp = "
                       f"{split}; choose a multiple of it, or change --model_args data=/fsdp=.")
    self.lm = t5x_lite.load(checkpoint, vocabulary, mesh=self.mesh)
    self.model, self.vocab = self.lm.model, self.lm.vocabulary
    self.max_length = self.model.config.max_length
    if not self.model.GENERATES:
      raise ValueError(f"{checkpoint!r} is an encoder-only (BERT) model: lm_eval's requests "
                       "score and generate text left to right, which it does not do.")
    # What differs for lm_eval (truncation, EOS, the generation budget) is the decoder's case.
    self.decoder_only = self.model.CONTINUES_PROMPT  # prompt and continuation in one row
    self.hf_layout = self.lm._hf_decoder()  # pylint: disable=protected-access
    self.prefix_id = self.vocab.eos_id if self.hf_layout and self.vocab.bos_id is None else (
        self.vocab.bos_id if self.hf_layout else BOS)
    self.seed = int(seed)
    self._calls = 0
    self._score_fn = jax.jit(self._token_scores)

  # -- lm_eval's requests -----------------------------------------------------------------------
  def loglikelihood(self, requests) -> list[tuple[float, bool]]:
    return self.score_tokens([self._encode_pair(*r.args) for r in requests])

  def loglikelihood_rolling(self, requests) -> list[float]:
    windows, owners = [], []
    for i, request in enumerate(requests):
      for window in rolling_windows(self._encode(request.args[0]), self.max_length - 1):
        windows.append(window)
        owners.append(i)
    totals = [0.0] * len(requests)
    for owner, (logprob, _) in zip(owners, self.score_tokens(windows)):
      totals[owner] += logprob
    return totals

  def generate_until(self, requests) -> list[str]:
    results = [""] * len(requests)
    groups: dict[str, list[int]] = {}  # one decoding configuration per group
    for i, request in enumerate(requests):
      groups.setdefault(repr(sorted(request.args[1].items())), []).append(i)
    for indices in groups.values():
      kwargs = normalize_gen_kwargs(requests[indices[0]].args[1])
      until = handle_stop_sequences(kwargs.pop("until", None), eos=None)
      texts = self._generate([requests[i].args[0] for i in indices], kwargs)
      for i, text in zip(indices, texts):
        results[i] = cut_at_stop(text, until)
    return results

  # -- scoring ----------------------------------------------------------------------------------
  def score_tokens(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
    """(log p(continuation | context), whether greedy decoding gives the continuation) for
    (context ids, continuation ids) pairs, longest first so similar shapes share a compile."""
    pairs = [self._fit(context, continuation) for context, continuation in pairs]
    order = sorted(range(len(pairs)), key=lambda i: -sum(map(len, pairs[i])))
    results: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
    for start in range(0, len(order), self.batch_size):
      chunk = order[start:start + self.batch_size]
      contexts = [pairs[i][0][self.hf_layout:] for i in chunk]  # HF: the first is BOS's stand-in
      batch = self.model.scoring_batch(
          contexts, [pairs[i][1] for i in chunk], self.vocab.eos_id,
          rows=self.batch_size, round_width=loaded_model._bucket)  # pylint: disable=protected-access
      if self.hf_layout:
        batch["decoder_input_tokens"][:len(chunk), 0] = [pairs[i][0][0] for i in chunk]
      if not self.decoder_only:  # the continuation alone: EOS is not part of it
        batch["decoder_loss_weights"] = _without_last_target(batch["decoder_loss_weights"])
      logprobs, greedy = self._run(self._score_fn, batch)
      for row, i in enumerate(chunk):
        results[i] = (float(logprobs[row]), bool(greedy[row]))
    return results

  def _token_scores(self, params, batch):
    """Per row: the weighted tokens' summed log-probability (as `model.score_batch`) and
    whether each of them is the argmax."""
    logits = self.model.logits(params, batch)
    log_probs = jax.nn.log_softmax(logits)
    targets, weights = batch["decoder_target_tokens"], batch["decoder_loss_weights"]
    token = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    hits = (jnp.argmax(logits, axis=-1) == targets) | (weights == 0)
    return jnp.sum(token * weights, axis=-1), jnp.all(hits, axis=-1)

  def _fit(self, context: list[int], continuation: list[int]):
    """The pair cut to what the model holds: the oldest context tokens go first. In the HF
    layout the context keeps at least its first token, which stands in BOS's place."""
    if self.hf_layout and not context:
      context = [self.prefix_id]
    limit = self.max_length - 1  # a decoder's BOS; an encoder-decoder's EOS on each side
    continuation = continuation[-limit:] if self.decoder_only else continuation[:limit]
    room = limit - len(continuation) + self.hf_layout if self.decoder_only else limit
    return context[len(context) - room:] if len(context) > room else context, continuation

  # -- generation -------------------------------------------------------------------------------
  def _generate(self, contexts: Sequence[str], kwargs: dict) -> list[str]:
    new_tokens = kwargs.pop("max_gen_toks")
    cap = self.max_length // 2 if self.decoder_only else self.max_length
    if new_tokens > cap:
      log.warning("max_gen_toks=%d: this model holds max_length=%d tokens; generating %d so "
                  "the context keeps the rest.", new_tokens, self.max_length, cap)
      new_tokens = cap
    sampling = kwargs.get("do_sample", False)
    options = dict(max_new_tokens=new_tokens,
                   temperature=float(kwargs.get("temperature", 1.0)) if sampling else 0.0,
                   top_k=int(kwargs.get("top_k") or 0), top_p=float(kwargs.get("top_p") or 1.0))
    room = self.max_length - new_tokens - 1 if self.decoder_only else self.max_length - 1
    room += self.hf_layout  # the prompt's first token stands in BOS's place
    prompts = [self._encode(text)[-room:] or [self.prefix_id] * self.hf_layout
               for text in contexts]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    texts = [""] * len(prompts)
    for start in range(0, len(order), self.batch_size):
      chunk = order[start:start + self.batch_size]
      batch = self.model.generation_batch(
          [prompts[i][self.hf_layout:] for i in chunk], self.vocab.eos_id, new_tokens,
          rows=self.batch_size, round_width=loaded_model._bucket)  # pylint: disable=protected-access
      if self.hf_layout:
        batch["decoder_input_tokens"][:len(chunk), 0] = [prompts[i][0] for i in chunk]
      self._calls += 1
      rng = jax.random.fold_in(jax.random.PRNGKey(self.seed), self._calls)
      tokens, _ = self._run(lambda params, b: self.model.predict_batch(params, b, rng=rng,
                                                                       **options), batch)
      for row, i in enumerate(chunk):
        texts[i] = self.lm._decode(np.asarray(tokens)[row, 0])  # pylint: disable=protected-access
    return texts

  # -- helpers ----------------------------------------------------------------------------------
  def _run(self, fn, batch):
    """fn(params, batch) with the batch split over the mesh, as the infer job runs it."""
    with partitioning.activation_sharding(self.mesh):
      batch = jax.device_put(batch, partitioning.batch_sharding(self.mesh))
      return jax.tree.map(np.asarray, fn(self.lm.params, batch))

  def _encode(self, text: str) -> list[int]:
    return list(self.vocab.encode(text)) if text else []

  def _encode_pair(self, context: str, continuation: str):
    """Token ids of the pair. For a decoder the continuation's ids are those the joined text
    ends with (trailing spaces of the context move to the continuation), as lm_eval's HF model
    does, so a SentencePiece word is scored as the model reads it in running text."""
    if not self.decoder_only:
      return self._encode(context), self._encode(continuation)
    spaces = len(context) - len(context.rstrip())
    if spaces:
      context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, head = self._encode(context + continuation), self._encode(context)
    return head, whole[len(head):]


def rolling_windows(ids: Sequence[int], size: int) -> list[tuple[list[int], list[int]]]:
  """(context, predicted) windows that predict every id once, `size` ids per window; a window's
  context is the ids before it that fit in `size` with its own (only the last has room)."""
  windows = []
  for start in range(0, len(ids), size):
    end = min(start + size, len(ids))
    windows.append((list(ids[max(0, end - size):start]), list(ids[start:end])))
  return windows


def cut_at_stop(text: str, until: Sequence[str]) -> str:
  """`text` up to the first occurrence of any stop string."""
  for stop in until:
    if stop and stop in text:
      text = text[:text.index(stop)]
  return text


def _without_last_target(weights: np.ndarray) -> np.ndarray:
  """The weights with each row's last weighted position (the EOS the batch appends) cleared."""
  weights = np.array(weights)
  last = weights.shape[1] - 1 - np.argmax(weights[:, ::-1] > 0, axis=1)
  weights[np.arange(len(weights)), last] = 0
  return weights


def main(argv: Optional[Sequence[str]] = None) -> None:
  """lm_eval's command line, with the `t5x_lite` model registered."""
  from lm_eval.__main__ import cli_evaluate
  sys.argv = ["python -m t5x_lite.lm_eval_adapter"] + list(sys.argv[1:] if argv is None else argv)
  cli_evaluate()
