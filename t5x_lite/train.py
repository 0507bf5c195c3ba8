"""The training job: `python -m t5x_lite.train --gin_file=runs/quickstart.gin`.

    config (gin) -> mesh -> data -> trainer (init, or resume from MODEL_DIR, or start from
    INITIAL_CHECKPOINT_PATH) -> loop: train step, metrics, validation, checkpoints -> export

Flags, as T5X's: `--gin_file` (repeatable; relative paths are looked up in `--gin_search_paths`
and in gin_configs/), `--gin.NAME=VALUE` (a binding or macro, e.g. `--gin.TRAIN_STEPS=100`;
strings need no quotes), `--gin_search_paths`, and for multi-host runs `--coordinator_address`,
`--num_processes`, `--process_id`.

MODEL_DIR receives: config.gin (the resolved config), train/ and validation/ TensorBoard events,
checkpoints/<step>/ (full train state + data position, for resuming), and at the end the exported
params checkpoint (params/ + model.gin) that inference and fine-tuning read.
"""
from __future__ import annotations

import sys

if __name__ == "__main__":
  # `python -m t5x_lite.train` runs this file as __main__; run the importable module instead so
  # that gin registers its configurables once, under t5x_lite.train.
  from t5x_lite import train as _module  # pylint: disable=import-self
  sys.exit(_module.main())

# pylint: disable=g-import-not-at-top,wrong-import-position
import argparse
import ast
import itertools
import json
import logging
import os
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import gin
import jax
import numpy as np

from t5x_lite import checkpoints, optimizers, partitioning, trainer as trainer_lib

GIN_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "gin_configs")


# ---------------------------------------------------------------------------- data

def _data():
  import t5x_lite.data  # pylint: disable=g-import-not-at-top  # TensorFlow: import only when used
  return t5x_lite.data


def train_batches(name: str, lengths: Mapping[str, int], per_host_batch: int, family: str,
                  seed: int, shard: tuple[int, int], skip: int):
  """Numpy training batches of this process's shard, after skipping `skip` batches.

  The pipeline is seeded, so the batch order is a pure function of (seed, shard) and skipping
  the batches a checkpoint says were consumed puts a resumed run exactly where it stopped."""
  data = _data()
  ds = data.get_tf_dataset(name, lengths, split="train", batch_size=per_host_batch,
                           feature_converter=family, shuffle=True, seed=seed, shard_info=shard)
  return data.BatchIterator(ds.skip(skip), f"{name!r} split 'train'")


def validation_batches(name: str, lengths: Mapping[str, int], per_host_batch: int,
                       family: str, seed: int, shard: tuple[int, int], count: int) -> list:
  """The first `count` validation batches (no shuffling): the same ones at every evaluation."""
  data = _data()
  ds = data.get_tf_dataset(name, lengths, split="validation", batch_size=per_host_batch,
                           feature_converter=family, shuffle=False, seed=seed, shard_info=shard)
  return list(data.BatchIterator(ds.repeat().take(count), f"{name!r} split 'validation'"))


def _check_vocabulary(model) -> None:
  vocab_size = _data().get_vocabulary().vocab_size
  if vocab_size > model.config.vocab_size:
    raise ValueError(
        f"The vocabulary has {vocab_size} ids but the model's TransformerConfig.vocab_size is "
        f"{model.config.vocab_size}; set --gin.TransformerConfig.vocab_size={vocab_size} (or "
        "larger), or choose a smaller vocabulary (get_vocabulary.kind).")


# ---------------------------------------------------------------------------- metrics

class MetricsWriter:
  """TensorBoard scalars in MODEL_DIR/<name>/ (only process 0 writes)."""

  def __init__(self, model_dir: str, name: str):
    self._writer = None
    if jax.process_index() == 0:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      from tensorflow.core.framework import summary_pb2  # pylint: disable=g-import-not-at-top
      self._tf = tf
      self._writer = tf.summary.create_file_writer(os.path.join(model_dir, name))
      # Written with the raw summary op and the "scalars" plugin tag: TensorBoard reads them as
      # scalars, and writing needs no tensorboard package.
      self._metadata = summary_pb2.SummaryMetadata(
          plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if self._writer is None:
      return
    with self._writer.as_default():
      for name, value in scalars.items():
        self._tf.summary.write(name, self._tf.constant(float(value), self._tf.float32), step=step,
                               metadata=self._metadata)
    self._writer.flush()


def _progress(total: int, initial: int):
  if jax.process_index() != 0:
    return None
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)


def _log(message: str) -> None:
  if jax.process_index() == 0:
    print(message, flush=True)


# ---------------------------------------------------------------------------- the job

@gin.configurable(module="t5x_lite.train")
def train(model: Any = gin.REQUIRED, model_dir: str = gin.REQUIRED,
          mixture_or_task_name: str = gin.REQUIRED,
          task_feature_lengths: Mapping[str, int] = gin.REQUIRED, train_steps: int = gin.REQUIRED,
          batch_size: int = gin.REQUIRED, optimizer: Optional[optimizers.Optimizer] = None,
          mesh_fn: Callable = partitioning.make_mesh, initial_checkpoint_path: Optional[str] = None,
          seed: int = 0, num_microbatches: int = 1, log_every: int = 50, eval_every: int = 500,
          eval_batches: int = 10, checkpoint_every: int = 1000, keep_checkpoints: int = 3,
          sample_prompts: Sequence[str] = (), sample_length: int = 64,
          sample_temperature: float = 0.0) -> dict[str, float]:
  """Trains `model` for `train_steps` optimizer steps on global batches of `batch_size`.

  Resumes from the newest checkpoint in `model_dir` if there is one; otherwise starts from
  `initial_checkpoint_path` (a params checkpoint: its parameters, a fresh optimizer) if given,
  else from a random initialisation. Returns the last validation metrics.

  After training, `sample_prompts` are continued for `sample_length` tokens with the model's
  `predict_batch` (greedy, or sampled at `sample_temperature`) and printed.
  """
  model_dir = os.path.abspath(os.path.expanduser(model_dir))
  optimizer = optimizer or optimizers.create_optimizer()
  mesh = mesh_fn()
  family = model.config.family
  _check_vocabulary(model)
  shard_index, num_shards = partitioning.data_shard_info(mesh, batch_size)
  per_host_batch = batch_size // num_shards
  if jax.process_index() == 0:
    os.makedirs(model_dir, exist_ok=True)
    with open(os.path.join(model_dir, "config.gin"), "w") as f:
      f.write(gin.config_str())
  _log(f"Mesh {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} devices; "
       f"this process reads data shard {shard_index} of {num_shards} ({per_host_batch} rows).")

  ckpt = checkpoints.CheckpointManager(model_dir, checkpoint_every, keep_checkpoints)
  resume_step = ckpt.latest_step()
  if resume_step is None and initial_checkpoint_path and not os.path.isdir(
      os.path.join(initial_checkpoint_path, checkpoints.PARAMS_DIR)):
    raise FileNotFoundError(
        f"INITIAL_CHECKPOINT_PATH={initial_checkpoint_path!r} is not a params checkpoint (no "
        f"{checkpoints.PARAMS_DIR}/ inside). Point it to the MODEL_DIR of a finished run or to a "
        "directory written by checkpoints.save_params / tools/convert_checkpoint.py.")

  # The data position lives in the checkpoint, so read it before building the pipeline.
  state, consumed = None, 0
  first_batches = train_batches(mixture_or_task_name, task_feature_lengths, per_host_batch,
                                family, seed, (shard_index, num_shards), skip=0)
  first = next(first_batches)
  batch_shapes = {k: (batch_size,) + v.shape[1:] for k, v in first.items()}
  trainer = trainer_lib.Trainer(model, optimizer, mesh, batch_shapes, num_microbatches)
  if resume_step is not None:
    state, consumed = ckpt.restore(trainer.abstract_state)
    _log(f"Resumed from {ckpt.directory}/{resume_step} ({consumed} batches consumed).")
    batches = train_batches(mixture_or_task_name, task_feature_lengths, per_host_batch, family,
                            seed, (shard_index, num_shards), skip=consumed)
  else:
    batches = itertools.chain([first], first_batches)  # the peeked batch is trained on first
    if initial_checkpoint_path:
      params = checkpoints.load_params(initial_checkpoint_path, trainer.abstract_state.params)
      state = trainer.state_from_params(params, seed)
      _log(f"Starting from the parameters in {initial_checkpoint_path}.")
    else:
      state = trainer.init_state(seed)

  validation = [partitioning.host_to_global(b, mesh) for b in validation_batches(
      mixture_or_task_name, task_feature_lengths, per_host_batch, family, seed,
      (shard_index, num_shards), eval_batches)] if eval_batches else []
  train_writer = MetricsWriter(model_dir, "train")
  validation_writer = MetricsWriter(model_dir, "validation")

  def evaluate_now(step):
    if not validation:
      return {}
    metrics = trainer_lib.mean_metrics([trainer.eval_step(state.params, b) for b in validation])
    validation_writer.write(step, metrics)
    _log(f"step {step}: validation loss {metrics['loss']:.4f}, "
         f"accuracy {metrics['accuracy']:.4f}")
    return metrics

  step = int(jax.device_get(state.step))
  tokens_per_step = sum(np.prod(s) for k, s in batch_shapes.items()
                        if k in ("encoder_input_tokens", "decoder_input_tokens"))
  flops_per_step = trainer.flops_per_step()
  peak = trainer_lib.peak_flops_per_second()
  _log(f"{model.num_params():,} parameters; {flops_per_step / 1e9:.2f} GFLOP per step; "
       f"peak {peak / 1e9:.1f} GFLOP/s.")
  last_eval = evaluate_now(step) if step == 0 else {}
  progress = _progress(train_steps, step)
  history, interval_start, interval_steps = [], None, 0

  def next_batch():
    nonlocal consumed
    consumed += 1
    return partitioning.host_to_global(next(batches), mesh)

  batch = next_batch() if step < train_steps else None
  while step < train_steps:
    state, metrics = trainer.train_step(state, batch)
    step += 1
    history.append(metrics)
    interval_steps += 1
    if step < train_steps:
      batch = next_batch()  # overlaps with the step running on the device
    if interval_start is None:  # The first step includes compilation: time from its end.
      jax.block_until_ready(metrics)
      _log(f"First step (with compilation) took {time.perf_counter() - _START:.1f}s since "
           "start-up.")
      interval_start, interval_steps, history = time.perf_counter(), 0, []
    elif step % log_every == 0 or step == train_steps:
      scalars = trainer_lib.mean_metrics(history)  # the only host sync between logs
      elapsed = time.perf_counter() - interval_start
      scalars["steps_per_second"] = interval_steps / elapsed
      scalars["tokens_per_second"] = interval_steps * tokens_per_step / elapsed
      scalars["mfu"] = interval_steps * flops_per_step / elapsed / peak
      train_writer.write(step, scalars)
      if progress is not None:
        progress.set_postfix(loss=f"{scalars['loss']:.3f}",
                             tok_s=f"{scalars['tokens_per_second']:,.0f}",
                             mfu=f"{scalars['mfu']:.1%}")
      interval_start, interval_steps, history = time.perf_counter(), 0, []
    if progress is not None:
      progress.update(1)
    ckpt.save(step, state, consumed)  # when step is a multiple of checkpoint_every
    if step % eval_every == 0 or step == train_steps:
      last_eval = evaluate_now(step)
  if progress is not None:
    progress.close()

  ckpt.save(step, state, consumed, force=True)
  ckpt.wait_until_finished()
  ckpt.close()
  checkpoints.save_params(model_dir, state.params, checkpoints.model_gin(model))
  _log(f"Done: step {step}; params exported to {model_dir} (load with "
       "checkpoints.load_params, or fine-tune with INITIAL_CHECKPOINT_PATH).")
  if sample_prompts:
    print_samples(model, state.params, sample_prompts, sample_length, sample_temperature)
  return last_eval


def print_samples(model, params, prompts: Sequence[str], length: int,
                  temperature: float = 0.0) -> None:
  """Continuations of `prompts` by the model's `predict_batch` (greedy at temperature 0)."""
  if model.config.family == "encoder" or not hasattr(model, "predict_batch"):
    _log("(No samples: this model does not generate text.)")
    return
  vocab = _data().get_vocabulary()
  encoded = [vocab.encode(p) for p in prompts]
  width = max(len(ids) for ids in encoded) + 1
  if model.config.family == "decoder":
    # BOS (0) then the prompt, right-padded; decoder_causal_attention marks the prompt.
    tokens = np.zeros((len(prompts), width), np.int32)
    prompt_mask = np.zeros_like(tokens)
    for row, ids in enumerate(encoded):
      tokens[row, 1:len(ids) + 1] = ids
      prompt_mask[row, :len(ids) + 1] = 1
    batch = {"decoder_input_tokens": tokens, "decoder_causal_attention": prompt_mask}
  else:
    tokens = np.zeros((len(prompts), width), np.int32)
    for row, ids in enumerate(encoded):
      tokens[row, :len(ids) + 1] = ids + [vocab.eos_id]
    batch = {"encoder_input_tokens": tokens}
  outputs, _ = model.predict_batch(params, batch, rng=jax.random.PRNGKey(0),
                                   max_new_tokens=length, temperature=temperature)
  for prompt, output in zip(prompts, np.asarray(outputs)[:, 0]):
    text = vocab.decode([int(t) for t in output if t > 1])  # drop padding and EOS
    _log(f"--- {prompt!r}\n{prompt}{text}" if model.config.family == "decoder" else
         f"--- {prompt!r}\n{text}")


@gin.configurable(module="t5x_lite.train")
def evaluate(model: Any = gin.REQUIRED, checkpoint_path: str = gin.REQUIRED,
             mixture_or_task_name: str = gin.REQUIRED,
             task_feature_lengths: Mapping[str, int] = gin.REQUIRED,
             batch_size: int = gin.REQUIRED, eval_batches: int = 50, split: str = "validation",
             mesh_fn: Callable = partitioning.make_mesh, seed: int = 0) -> dict[str, float]:
  """Loss and accuracy of a params checkpoint on the first `eval_batches` batches of `split`;
  printed as JSON and written to `checkpoint_path`/eval_<task>_<split>.json."""
  mesh = mesh_fn()
  _check_vocabulary(model)
  shard = partitioning.data_shard_info(mesh, batch_size)
  data = _data()
  ds = data.get_tf_dataset(mixture_or_task_name, task_feature_lengths, split=split,
                           batch_size=batch_size // shard[1], feature_converter=model.config.family,
                           shuffle=False, seed=seed, shard_info=shard)
  batches = list(data.BatchIterator(ds.take(eval_batches), f"{mixture_or_task_name!r} {split}"))
  shapes = {k: (batch_size,) + v.shape[1:] for k, v in batches[0].items()}
  trainer = trainer_lib.Trainer(model, optimizers.create_optimizer(), mesh, shapes)
  params = checkpoints.load_params(checkpoint_path, trainer.abstract_state.params)
  metrics = trainer_lib.mean_metrics(
      [trainer.eval_step(params, partitioning.host_to_global(b, mesh)) for b in batches])
  metrics["batches"] = len(batches)
  _log(json.dumps(metrics, indent=1))
  if jax.process_index() == 0:
    with open(os.path.join(checkpoint_path, f"eval_{mixture_or_task_name}_{split}.json"),
              "w") as f:
      json.dump(metrics, f, indent=1)
  return metrics


@gin.configurable(module="t5x_lite.train")
def run(job: Callable = train):
  """What `python -m t5x_lite.train` runs: `train` unless a gin file says `run.job = @evaluate`."""
  return job()


# ---------------------------------------------------------------------------- command line

def _binding(flag: str) -> str:
  """`--gin.NAME=VALUE` -> "NAME = VALUE"; a VALUE that is not a Python literal or a gin
  reference (@x, %X) is taken as a string, so paths need no quoting."""
  name, sep, value = flag[len("--gin."):].partition("=")
  if not sep or not name:
    raise ValueError(f"{flag!r}: write gin flags as --gin.NAME=VALUE, e.g. --gin.TRAIN_STEPS=100.")
  if not value.startswith(("@", "%")):
    try:
      ast.literal_eval(value)
    except (ValueError, SyntaxError):
      value = repr(value)
  return f"{name} = {value}"


def parse_flags(argv: Sequence[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m t5x_lite.train", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--gin_file", action="append", default=[],
                      help="gin file to parse (repeatable, in order)")
  parser.add_argument("--gin_search_paths", action="append", default=[],
                      help="comma-separated directories to look up gin files and includes in")
  parser.add_argument("--coordinator_address", help="multi-host: HOST:PORT of process 0")
  parser.add_argument("--num_processes", type=int, help="multi-host: number of processes")
  parser.add_argument("--process_id", type=int, help="multi-host: this process's id")
  args, rest = parser.parse_known_args(argv)
  unknown = [a for a in rest if not a.startswith("--gin.")]
  if unknown:
    parser.error(f"unrecognized arguments: {unknown} (bindings are --gin.NAME=VALUE)")
  args.gin_bindings = [_binding(a) for a in rest]
  if not args.gin_file:
    parser.error("give at least one --gin_file, e.g. --gin_file=runs/quickstart.gin")
  return args


def configure(gin_files: Sequence[str], bindings: Sequence[str],
              search_paths: Sequence[str] = ()) -> None:
  """Parses gin files then bindings; a binding of a macro no file defines is refused (gin
  would silently accept the typo `TRAIN_STEP = 5`)."""
  gin.clear_config()
  for path in [p for entry in search_paths for p in entry.split(",") if p] + [GIN_CONFIGS]:
    gin.add_config_file_search_path(path)
  import t5x_lite.data  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  logging.disable(logging.ERROR)  # gin logs every search-path miss before the hit as an error
  try:
    gin.parse_config_files_and_bindings(list(gin_files), None, finalize_config=False)
  except IOError as e:
    raise FileNotFoundError(f"{e} (searched the working directory, {GIN_CONFIGS} and "
                            "--gin_search_paths)") from e
  finally:
    logging.disable(logging.NOTSET)
  for binding in bindings:
    name = binding.split("=", 1)[0].strip()
    if "." not in name and "/" not in name:
      try:
        gin.query_parameter(f"%{name}")
      except ValueError:
        raise ValueError(f"--gin.{name}: no gin file defines the macro {name}; check the "
                         "spelling (e.g. TRAIN_STEPS, BATCH_SIZE, MODEL_DIR).") from None
    try:
      gin.parse_config(binding)
    except ValueError as e:
      raise ValueError(f"--gin.{binding}: {e}") from None


_START = time.perf_counter()


def main(argv: Optional[Sequence[str]] = None) -> None:
  logging.basicConfig(level=logging.WARNING)
  args = parse_flags(sys.argv[1:] if argv is None else argv)
  partitioning.initialize_distributed(args.coordinator_address, args.num_processes,
                                      args.process_id)
  configure(args.gin_file, args.gin_bindings, args.gin_search_paths)
  gin.finalize()
  run()


