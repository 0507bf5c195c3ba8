"""Predictions of a task split, shared by the inference and evaluation jobs.

    task split (seqio, unshuffled) -> the model's feature converter (unpacked) -> predict_batch
    (KV-cache decoding) + score_batch (teacher-forced log-likelihood of the targets) -> records

`predict_task` returns one record per example: {"inputs", "targets", "prediction",
"prediction_score", "target_log_likelihood", "target_tokens", "example"}. `prediction_score` is
the decoder's score of its prediction (log-likelihood, or length-penalised for beams); a model
that does not generate (BERT) predicts its input with every [MASK] filled by its top token.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import numpy as np

from t5x_lite import checkpoints, decoding, loaded_model, partitioning
from t5x_lite import vocabulary as vocab_lib


def _data():
  import t5x_lite.data  # TensorFlow: imported only when a job runs
  return t5x_lite.data


def tasks_of(mixture_or_task_name: str) -> list:
  """The seqio tasks of a task or mixture name (a mixture is decoded task by task)."""
  import seqio
  provider = _data().get_provider(mixture_or_task_name)
  return list(provider.tasks) if isinstance(provider, seqio.Mixture) else [provider]


def check_vocabulary(model, checkpoint_path: str, task) -> Any:
  """The task's vocabulary, after checking that the checkpoint was trained with it."""
  vocab = task.output_features["targets"].vocabulary
  vocab = getattr(vocab, "resolved", vocab)  # The gin-selected one behind DEFAULT_VOCABULARY.
  if vocab.vocab_size > model.config.vocab_size:
    raise ValueError(
        f"Task {task.name!r} uses a vocabulary of {vocab.vocab_size} ids but the checkpoint's "
        f"model has vocab_size={model.config.vocab_size}: it was trained with another vocabulary. "
        "Set get_vocabulary.* as in the training run.")
  trained = loaded_model.checkpoint_vocabulary(checkpoint_path)
  if trained is not None and not vocab_lib.same(trained, vocab):  # by content, not by path
    raise ValueError(
        f"The checkpoint {checkpoint_path!r} was trained with {trained} (its config.gin or "
        f"{loaded_model.SPM_FILE}) but task {task.name!r} now uses {vocab}; set get_vocabulary.* as "
        "in training.")
  return vocab


def restore_params(model, mesh, load: Callable[[Any], Any]):
  """Parameters laid out on `mesh` by the logical-axis rules; `load(abstract)` reads them."""
  shapes, specs = model.abstract_params(model.dummy_batch(1, {"inputs": 8, "targets": 8}))
  shardings = partitioning.tree_shardings(shapes, specs, mesh)
  return load(checkpoints.abstract_with_shardings(shapes, shardings))


def task_examples(task, lengths: Mapping[str, int], split: str,
                  max_examples: Optional[int]) -> list[dict]:
  """The split's examples in order, tokenized and trimmed as the task defines."""
  if split not in task.splits:
    raise ValueError(f"Task {task.name!r} has splits {list(task.splits)}, not {split!r}.")
  ds = task.get_dataset(dict(lengths), split=split, shuffle=False, num_epochs=1, seed=0)
  if max_examples:
    ds = ds.take(max_examples)
  examples = list(ds.as_numpy_iterator())
  if not examples:
    raise ValueError(f"Task {task.name!r} split {split!r} has no examples.")
  return examples


def model_batches(model, examples: Sequence[dict], lengths: Mapping[str, int],
                  batch_size: int) -> list[dict]:
  """The examples as model features (the model's seqio converter, unpacked), batch_size rows
  per batch; the last batch is filled up with copies of its last row."""
  import tensorflow as tf
  keys = [k for k in ("inputs", "targets", "mlm_weights") if k in examples[0]]
  ds = tf.data.Dataset.from_generator(
      lambda: ({k: ex[k] for k in keys} for ex in examples),
      output_signature={k: tf.TensorSpec([None], tf.int32) for k in keys})
  converter = model.feature_converter(pack=False)
  rows = [{k: np.asarray(v) for k, v in row.items()}
          for row in converter(ds, dict(lengths)).as_numpy_iterator()]
  rows += [rows[-1]] * (-len(rows) % batch_size)
  return [{k: np.stack([row[k] for row in rows[i:i + batch_size]]) for k in rows[0]}
          for i in range(0, len(rows), batch_size)]


def decode_options(model, lengths: Mapping[str, int],
                   decode_params: Optional[Mapping[str, Any]]) -> dict:
  """`decode_params` over the default of decoding up to the targets' feature length, checked."""
  options = {"max_new_tokens": lengths["targets"], **(decode_params or {})}
  decoding.DecodeParams().replace(**options).validate(model.config.vocab_size)
  return options


def predict_task(model, params, mesh, task, lengths: Mapping[str, int], split: str,
                 batch_size: int, vocab, max_examples: Optional[int] = None,
                 decode_params: Optional[Mapping[str, Any]] = None,
                 seed: int = 0) -> list[dict]:
  """One record per example of the split: texts, prediction and scores (see module docstring)."""
  # Decoding stops at the vocabulary's EOS (a converted model's own) unless told otherwise.
  overrides = {"eos_id": vocab.eos_id, **decode_options(model, lengths, decode_params)}
  examples = task_examples(task, lengths, split, max_examples)
  records = []
  with partitioning.activation_sharding(mesh):
    for index, batch in enumerate(model_batches(model, examples, lengths, batch_size)):
      batch = jax.device_put(batch, partitioning.batch_sharding(mesh))
      log_likelihood = np.asarray(model.score_batch(params, batch))
      target_tokens = np.asarray(_loss_weights(batch)).sum(axis=1)
      if not model.GENERATES:  # an encoder's prediction: its input with the masks filled
        predictions, scores = _filled_masks(model, params, batch, vocab), [None] * batch_size
      else:
        tokens, scores = model.predict_batch(
            params, batch, rng=jax.random.fold_in(jax.random.PRNGKey(seed), index), **overrides)
        predictions = [_text(vocab, row) for row in np.asarray(tokens)[:, 0]]
        scores = [float(s) for s in np.asarray(scores)[:, 0]]
      for row in range(batch_size):
        if len(records) == len(examples):
          break
        example = examples[len(records)]
        records.append({
            "inputs": _example_text(example, "inputs", vocab),
            "targets": _example_text(example, "targets", vocab),
            "prediction": predictions[row], "prediction_score": scores[row],
            "target_log_likelihood": float(log_likelihood[row]),
            "target_tokens": int(target_tokens[row]), "example": example})
  return records


def _loss_weights(batch):
  return batch["encoder_loss_weights" if "encoder_loss_weights" in batch
               else "decoder_loss_weights"]


def _filled_masks(model, params, batch, vocab) -> list[str]:
  tokens = np.asarray(batch["encoder_input_tokens"])
  ids, _, is_mask = model.fill_mask(params, tokens, _data().mask_id(vocab), top_k=1)
  filled = np.where(np.asarray(is_mask), np.asarray(ids)[..., 0], tokens)
  return [_text(vocab, row) for row in filled]


def _text(vocab, ids) -> str:
  """Decoded ids up to the first EOS, padding dropped."""
  ids = [int(t) for t in ids]
  if vocab.eos_id in ids:
    ids = ids[:ids.index(vocab.eos_id)]
  return vocab.decode([t for t in ids if t != 0])


def _example_text(example: dict, key: str, vocab) -> str:
  if f"{key}_pretokenized" in example:
    value = example[f"{key}_pretokenized"]
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
  return _text(vocab, example[key]) if key in example else ""
