"""The inference job: decode a task split with a params checkpoint and write JSON Lines.

    python -m t5x_lite.infer --gin_file=CKPT/model.gin --gin_file=runs/infer.gin \\
        --gin.CHECKPOINT_PATH=CKPT --gin.MIXTURE_OR_TASK_NAME=addition

    task split -> `t5x_lite.predict.predict_task` (decoding + teacher-forced scores) -> JSON Lines

Writes OUTPUT_DIR/<task>_<split>.jsonl (OUTPUT_DIR defaults to CHECKPOINT_PATH), one line per
example: {"inputs", "targets", "prediction", "prediction_score", "target_log_likelihood",
"target_tokens"}. `prediction_score` is the decoder's score of its prediction (log-likelihood,
or length-penalised for beams); a BERT model's prediction is its input with every [MASK] filled
by its top token. `infer.decode_params` is a dict of `decoding.DecodeParams` fields, e.g.
{'beam_size': 4, 'alpha': 0.6}; max_new_tokens defaults to the targets' feature length. Flags are
those of `python -m t5x_lite.train`. CHECKPOINT_PATH may be a soft-prompt export (a finished
runs/prompt_tuning.gin run's MODEL_DIR, with its model.gin first): its base decodes with the
prompt in front of every input.
"""
from __future__ import annotations

import sys

if __name__ == "__main__":
  # Run the importable module, so gin registers its configurables once, under t5x_lite.infer.
  from t5x_lite import infer as _module  # pylint: disable=import-self
  sys.exit(_module.main())

# pylint: disable=g-import-not-at-top,wrong-import-position
import json
import os
from typing import Any, Callable, Mapping, Optional, Sequence

import gin
import jax

from t5x_lite import launch, partitioning, predict, prompt_tuning, quantized_checkpoints


def write_jsonl(path: str, records: Sequence[dict]) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    for record in records:
      f.write(json.dumps({k: v for k, v in record.items() if k != "example"}) + "\n")
  return path


@gin.configurable(module="t5x_lite.infer")
def infer(model: Any = gin.REQUIRED, checkpoint_path: str = gin.REQUIRED,
          mixture_or_task_name: str = gin.REQUIRED,
          task_feature_lengths: Mapping[str, int] = gin.REQUIRED,
          output_dir: Optional[str] = None, split: str = "validation", batch_size: int = 16,
          max_examples: Optional[int] = None,
          decode_params: Optional[Mapping[str, Any]] = None,
          mesh_fn: Callable = partitioning.make_mesh, seed: int = 0,
          quantize: Optional[str] = None, quantize_group_size: int = 128,
          kv_cache: Optional[str] = None) -> list[str]:
  """Decodes every example of `split` (or the first `max_examples`) of each task of
  `mixture_or_task_name` and returns the JSON Lines files written. `quantize` ('int8', 'int4',
  'nf4', 'w8a8'; QUANTIZE in runs/infer.gin) and `kv_cache` ('int8') run the model quantized (see
  t5x_lite.quantization); a checkpoint written quantized runs quantized without them. A
  soft-prompt export (a prompt-tuning run's MODEL_DIR) runs as its base with the prompt."""
  predict.decode_options(model, task_feature_lengths, decode_params)  # Bad input fails first.
  # A soft-prompt export runs as its base with the prompt in front (t5x_lite.prompt_tuning).
  source = prompt_tuning.for_checkpoint(model, checkpoint_path, quantize, kv_cache)
  model = quantized_checkpoints.for_checkpoint(source.model, source.params_dir, quantize,
                                               quantize_group_size, kv_cache=kv_cache)
  tasks = predict.tasks_of(mixture_or_task_name)
  vocabs = [predict.check_vocabulary(model, source.vocabulary_dir, task) for task in tasks]
  mesh = mesh_fn()
  params = predict.restore_params(model, mesh, quantized_checkpoints.loader(
      model, source.load, source.params_dir))
  paths = []
  for task, vocab in zip(tasks, vocabs):
    records = predict.predict_task(model, params, mesh, task, task_feature_lengths, split,
                                   batch_size, vocab, max_examples, decode_params, seed)
    path = os.path.join(output_dir or checkpoint_path, f"{task.name}_{split}.jsonl")
    if jax.process_index() == 0:
      paths.append(write_jsonl(path, records))
      print(f"{len(records)} predictions of {task.name!r} ({split}) -> {path}", flush=True)
  return paths


def main(argv: Optional[Sequence[str]] = None) -> None:
  launch.main(infer, argv, "python -m t5x_lite.infer", __doc__)
