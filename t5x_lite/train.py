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
import contextlib
import itertools
import json
import logging
import os
import signal
import threading
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import gin
import jax
import jax.numpy as jnp
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


# ---------------------------------------------------------------------------- reliability

class Preempted(SystemExit):
  """Raised once SIGTERM's final checkpoint is written. Exit status 143 (as if killed by SIGTERM)
  tells a scheduler the run was interrupted, not finished: rerunning resumes it."""

  def __init__(self, message: str):
    super().__init__(143)
    self.message = message


@contextlib.contextmanager
def sigterm_received():
  """Yields a list that becomes non-empty when SIGTERM arrives: the preemption notice that TPU
  VMs, spot instances and Kubernetes send before killing. Off the main thread (where Python
  cannot install handlers) it never fills."""
  received = []
  if threading.current_thread() is not threading.main_thread():
    yield received
    return
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
  try:
    yield received
  finally:
    signal.signal(signal.SIGTERM, previous)


class NonFiniteGuard:
  """Acts on the steps whose loss or gradient norm was NaN/Inf (the trainer skipped their
  update). The per-step flags stay on the device and are fetched with the logged metrics or
  before a checkpoint, so the guard adds no host sync of its own.

  policy: "skip" counts and reports such steps and goes on; "stop" raises FloatingPointError
  before any further checkpoint is written.
  """
  POLICIES = ("skip", "stop")

  def __init__(self, policy: str, where: str):
    if policy not in self.POLICIES:
      raise ValueError(f"train.on_nonfinite={policy!r}: choose one of {self.POLICIES}.")
    self.policy, self.where, self.skipped = policy, where, 0
    self._pending = []  # (step, index of its batch in the training stream, device flag)

  def add(self, step: int, batch_index: int, flag: jax.Array) -> None:
    self._pending.append((step, batch_index, flag))

  def check(self) -> None:
    pending, self._pending = jax.device_get(self._pending), []
    for step, batch_index, flag in pending:
      if not flag:
        continue
      self.skipped += 1
      message = (f"Step {step}: the loss or gradient norm is not finite; its update was skipped. "
                 f"It trained on batch {batch_index} of {self.where} (read it with "
                 f"train.train_batches(..., skip={batch_index}) and next()).")
      if self.policy == "stop":
        raise FloatingPointError(
            message + " No checkpoint was written after it. Inspect that batch, lower the "
            "learning rate (or clip gradients), or set train.on_nonfinite = 'skip' to skip "
            "such steps and go on.")
      _log(f"{message} ({self.skipped} skipped so far)")


@jax.jit
def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def check_finite_before_saving(state, step: int) -> None:
  """The last line of defence: a checkpoint holding NaN/Inf is never written."""
  if not bool(_all_finite((state.params, state.opt_state))):
    raise FloatingPointError(
        f"Step {step}: the parameters or optimizer state hold NaN/Inf, so no checkpoint was "
        "written (the last one is still good). Was INITIAL_CHECKPOINT_PATH already non-finite? "
        "Otherwise lower the learning rate or enable gradient clipping.")


def estimate_memory_per_device(trainer) -> dict[str, float]:
  """Bytes per device a train step needs, estimated before compiling: the train state's shard
  and the gradients (exact, from the shardings), activations kept for the backward pass (an
  estimate: ~16 [b, l, d]-sized and 3 [b, l, f]-sized tensors per layer, 2 [b, h, l, l]
  attention maps, 3 [b, l, vocab] logits; only the layer inputs with remat). It errs low (XLA
  needed 1.4-1.5x it for gpt2_tiny-sized models on CPU), so it refuses only runs that cannot
  fit."""
  def shard_bytes(leaf):
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    return float(np.prod(shape)) * np.dtype(leaf.dtype).itemsize
  state = sum(shard_bytes(x) for x in jax.tree.leaves(trainer.abstract_state))
  grads = sum(shard_bytes(x) for x in jax.tree.leaves(trainer.abstract_state.params))
  cfg = trainer.model.config
  data_shards = trainer.mesh.shape["data"] * trainer.mesh.shape["fsdp"]
  tensor = trainer.mesh.shape["tensor"]
  itemsize = np.dtype(cfg.dtype).itemsize
  activations = 0.0
  for name, shape in trainer.batch_shapes.items():
    if name not in ("encoder_input_tokens", "decoder_input_tokens"):
      continue
    b = shape[0] / data_shards / trainer.num_microbatches
    l = shape[1]
    layers = cfg.num_layers if name == "encoder_input_tokens" or cfg.family == "decoder" else (
        cfg.resolved_num_decoder_layers)
    if cfg.remat_policy == "none":
      maps = 0 if cfg.attention_implementation == "cudnn" else 2  # flash attention keeps none
      per_layer = b * l * (16 * cfg.d_model + 3 * cfg.d_ff / tensor) + (
          maps * b * cfg.num_heads / tensor * l * l)
    else:
      per_layer = 2 * b * l * cfg.d_model
    activations += layers * per_layer * itemsize + 3 * b * l * cfg.vocab_size / tensor * 4
  return {"state": state, "gradients": grads, "activations": activations,
          "total": state + grads + activations}


def available_memory_per_device() -> float:
  """Free bytes per local device: the accelerator's limit, or on CPU the host's available
  memory shared by the (possibly simulated) local devices."""
  device = jax.local_devices()[0]
  stats = device.memory_stats() if device.platform != "cpu" else None
  if stats and "bytes_limit" in stats:
    return float(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
  with open("/proc/meminfo") as f:
    meminfo = dict(line.split(":", 1) for line in f)
  return float(meminfo["MemAvailable"].split()[0]) * 1024 / jax.local_device_count()


def check_memory(trainer) -> None:
  """Refuses, with the estimate, a run that cannot fit before spending minutes compiling it."""
  need, have = estimate_memory_per_device(trainer), available_memory_per_device()
  if need["total"] > have:
    gib = {k: f"{v / 2**30:.2f}" for k, v in need.items()}
    raise MemoryError(
        f"This run needs about {gib['total']} GiB per device (train state {gib['state']}, "
        f"gradients {gib['gradients']}, activations {gib['activations']}) but "
        f"{have / 2**30:.2f} GiB are available per device. Lower BATCH_SIZE or the "
        "TASK_FEATURE_LENGTHS, raise train.num_microbatches, set TransformerConfig.remat_policy, "
        "shard more (make_mesh.fsdp / .tensor), or use a smaller model.")


# ---------------------------------------------------------------------------- the job

@gin.configurable(module="t5x_lite.train")
def train(model: Any = gin.REQUIRED, model_dir: str = gin.REQUIRED,
          mixture_or_task_name: str = gin.REQUIRED,
          task_feature_lengths: Mapping[str, int] = gin.REQUIRED, train_steps: int = gin.REQUIRED,
          batch_size: int = gin.REQUIRED, optimizer: Optional[optimizers.Optimizer] = None,
          mesh_fn: Callable = partitioning.make_mesh, initial_checkpoint_path: Optional[str] = None,
          seed: int = 0, num_microbatches: int = 1, log_every: int = 50, eval_every: int = 500,
          eval_batches: int = 10, checkpoint_every: int = 1000, keep_checkpoints: int = 3,
          on_nonfinite: str = "skip", sample_prompts: Sequence[str] = (),
          sample_length: int = 64, sample_temperature: float = 0.0) -> dict[str, float]:
  """Trains `model` for `train_steps` optimizer steps on global batches of `batch_size`.

  Resumes from the newest checkpoint in `model_dir` if there is one; otherwise starts from
  `initial_checkpoint_path` (a params checkpoint: its parameters, a fresh optimizer) if given,
  else from a random initialisation. Returns the last validation metrics.

  Crash safety: checkpoints are written asynchronously every `checkpoint_every` steps, a
  damaged one is skipped on resume, and SIGTERM (a preemption notice) writes a final checkpoint
  and exits with status 143. A step whose loss or gradient is NaN/Inf is not applied;
  `on_nonfinite` ("skip" or "stop") says whether the run goes on (see NonFiniteGuard).

  After training, `sample_prompts` are continued for `sample_length` tokens with the model's
  `predict_batch` (greedy, or sampled at `sample_temperature`) and printed.
  """
  model_dir = os.path.abspath(os.path.expanduser(model_dir))
  guard = NonFiniteGuard(on_nonfinite, f"{mixture_or_task_name!r} split 'train' (seed {seed})")
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
  check_memory(trainer)
  if resume_step is not None:
    state, consumed = ckpt.restore(trainer.abstract_state)  # the newest undamaged step
    _log(f"Resumed from {ckpt.directory}/{ckpt.restored_step} ({consumed} batches consumed).")
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
    return partitioning.host_to_global(next(batches), mesh)

  def save(force=False):
    if force or step % checkpoint_every == 0:
      guard.check()  # "stop" raises here, before a step it refuses is checkpointed
      if step not in ckpt.all_steps():
        check_finite_before_saving(state, step)
    ckpt.save(step, state, consumed, force=force)

  # `consumed` counts the batches trained on: what a checkpoint records and a resume skips.
  with sigterm_received() as sigterm:
    batch = next_batch() if step < train_steps else None
    while step < train_steps:
      state, metrics = trainer.train_step(state, batch)
      guard.add(step + 1, consumed, metrics["nonfinite"])
      step, consumed = step + 1, consumed + 1
      history.append(metrics)
      interval_steps += 1
      if step < train_steps and not sigterm:
        batch = next_batch()  # overlaps with the step running on the device
      if interval_start is None:  # The first step includes compilation: time from its end.
        jax.block_until_ready(metrics)
        _log(f"First step (with compilation) took {time.perf_counter() - _START:.1f}s since "
             "start-up.")
        interval_start, interval_steps, history = time.perf_counter(), 0, []
      elif step % log_every == 0 or step == train_steps:
        guard.check()
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
      if sigterm and step < train_steps:
        if progress is not None:
          progress.close()
        save(force=True)
        ckpt.wait_until_finished()
        ckpt.close()
        message = (f"SIGTERM received: saved checkpoint {ckpt.directory}/{step}; rerun the same "
                   "command to resume.")
        _log(message)
        raise Preempted(message)
      save()  # when step is a multiple of checkpoint_every
      if step % eval_every == 0 or step == train_steps:
        last_eval = evaluate_now(step)
  if progress is not None:
    progress.close()

  save(force=True)
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


def start_job(argv: Optional[Sequence[str]] = None) -> None:
  """What every job (train, infer, eval) does first: flags, multi-host start-up, gin."""
  args = parse_flags(sys.argv[1:] if argv is None else argv)
  partitioning.initialize_distributed(args.coordinator_address, args.num_processes,
                                      args.process_id)
  configure(args.gin_file, args.gin_bindings, args.gin_search_paths)
  gin.finalize()


def main(argv: Optional[Sequence[str]] = None) -> None:
  logging.basicConfig(level=logging.WARNING)
  start_job(argv)
  run()


