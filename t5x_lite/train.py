"""The training job: `python -m t5x_lite.train --gin_file=runs/quickstart.gin`.

    config (gin) -> mesh -> data -> trainer (init, or resume from MODEL_DIR, or start from
    INITIAL_CHECKPOINT_PATH) -> loop with hooks: metrics, validation, checkpoints, preemption,
    non-finite steps -> export

Flags are those of `t5x_lite.launch` (`--gin_file`, `--gin.NAME=VALUE`, ...).

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
import functools
import itertools
import os
from typing import Any, Callable, Mapping, Optional, Sequence

import gin
import jax
import numpy as np

from t5x_lite import checkpoints, costs, launch, loop, optimizers, partitioning, pipeline_stages
from t5x_lite import run_dir
from t5x_lite import metrics as metrics_lib
from t5x_lite import trainer as trainer_lib
from t5x_lite import vocabulary as vocab_lib


def _data():
  import t5x_lite.data  # TensorFlow: imported only when a job runs
  return t5x_lite.data


@gin.configurable(module="t5x_lite.train")
def train(model: Any = gin.REQUIRED, model_dir: str = gin.REQUIRED,
          mixture_or_task_name: str = gin.REQUIRED,
          task_feature_lengths: Mapping[str, int] = gin.REQUIRED, train_steps: int = gin.REQUIRED,
          batch_size: int = gin.REQUIRED, optimizer: Optional[optimizers.Optimizer] = None,
          mesh_fn: Callable = partitioning.make_mesh, initial_checkpoint_path: Optional[str] = None,
          seed: int = 0, num_microbatches: int = 1, trainable: trainer_lib.Trainable = None,
          log_every: int = 50, eval_every: int = 500, eval_batches: int = 10,
          checkpoint_every: int = 1000, keep_checkpoints: int = 3, on_nonfinite: str = "skip",
          max_nonfinite_fraction: float = 0.05, nonfinite_window: int = 100,
          allow_changes: Sequence[str] = (), sample_prompts: Sequence[str] = (),
          sample_length: int = 64, sample_temperature: float = 0.0,
          forgetting_eval_task: Optional[str] = None,
          forgetting_feature_lengths: Optional[Mapping[str, int]] = None,
          data_cache: Optional[str] = None) -> dict[str, float]:
  """Trains `model` for `train_steps` optimizer steps on global batches of `batch_size`.

  Resumes from the newest checkpoint in `model_dir` if there is one; otherwise starts from
  `initial_checkpoint_path` (a params checkpoint: its parameters, a fresh optimizer) if given,
  else from a random initialisation. `trainable` (a regex over parameter paths) trains only the
  parameters it matches. Returns the last validation metrics. The steps below document the
  other settings: `allow_changes` (_record_run), `data_cache` (_open_stream), checkpoints,
  preemption, `on_nonfinite` and `sample_prompts` (_train_loop), forgetting (_evaluations)."""
  _check_counts(TRAIN_STEPS=(train_steps, 0), BATCH_SIZE=(batch_size, 1),
                **{"train.log_every": (log_every, 1), "train.checkpoint_every":
                   (checkpoint_every, 1), "train.eval_every": (eval_every, 1)})
  forgetting = (forgetting_eval_task, _forgetting_lengths(
      forgetting_eval_task, forgetting_feature_lengths, task_feature_lengths, eval_batches))
  _refuse_data_cache(model, data_cache)
  model_dir = os.path.abspath(os.path.expanduser(model_dir))
  os.makedirs(model_dir, exist_ok=True)
  task = (mixture_or_task_name, task_feature_lengths)
  with run_dir.locked(model_dir, take=jax.process_index() == 0, command=" ".join(sys.argv)):
    optimizer, mesh, data = optimizer or optimizers.create_optimizer(), mesh_fn(), _job_data(model)
    guard = loop.NonFiniteGuard(on_nonfinite, f"{mixture_or_task_name!r} split 'train' (seed "
                                f"{seed})", log_every, max_nonfinite_fraction, nonfinite_window)
    shard, per_host_batch = _data_shard(model, mesh, batch_size, num_microbatches)
    manager = checkpoints.CheckpointManager(model_dir, checkpoint_every, keep_checkpoints)
    with manager:  # on an error too: Orbax's threads stop before the job reports it
      vocabulary = run_dir.vocabulary_record(data.get_vocabulary())
      record = functools.partial(_record_run, model_dir, manager, allow_changes, _run_manifest(
          model, task, batch_size, seed, shard, vocabulary, data_cache))
      record(write=False)  # a resume that changes the data is refused before any work
      stream, fresh_batches, batch_shapes = _open_stream(
          data, manager, model, task, shard, per_host_batch, batch_size, seed,
          vocabulary["sha256"], data_cache, allow_changes)
      trainer = _make_trainer(model, optimizer, mesh, batch_shapes, num_microbatches, trainable)
      state, consumed, batches = _start(trainer, manager, initial_checkpoint_path, seed, stream,
                                        fresh_batches, batch_size)
      record(write=jax.process_index() == 0)  # the start is accepted: record it
      evaluations = _evaluations(trainer, state, functools.partial(
          _validation_batches, data, model, per_host_batch, seed, shard, eval_batches), task,
          eval_every, model_dir, forgetting)
      _train_loop(trainer, state, batches, consumed, train_steps, manager, guard, evaluations,
                  stream, model_dir, log_every, batch_size,
                  (sample_prompts, sample_length, sample_temperature))
  return evaluations[0].last


def _check_counts(**counts: tuple[Any, int]) -> None:
  """Refuses a count that is not a whole number >= its minimum, naming its flag."""
  for name, (value, least) in counts.items():
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
      raise ValueError(f"{name}={value!r}: it must be a whole number >= {least}, e.g. "
                       f"--gin.{name}={max(least, 1) * 100 if name == 'TRAIN_STEPS' else 8}.")


def _forgetting_lengths(task: Optional[str], lengths: Optional[Mapping[str, int]],
                        run_lengths: Mapping[str, int], eval_batches: int):
  """FORGETTING_EVAL_TASK's feature lengths (None: no forgetting report), checked before any
  work: given, or the run's lengths of the features that task has."""
  if not task:
    return None
  data = _data()
  if task not in data.registered_names():
    raise ValueError(f"FORGETTING_EVAL_TASK={task!r} is not a registered task or mixture; "
                     f"registered: {data.registered_names()}. Set it to the task the base was "
                     "trained on (e.g. 'stdlib_clm'), or to None for no forgetting report.")
  if eval_batches < 1:
    raise ValueError(f"FORGETTING_EVAL_TASK={task!r} is evaluated on train.eval_batches "
                     "validation batches, which is 0: set train.eval_batches >= 1.")
  if lengths:
    return dict(lengths)
  features = sorted(k for k, f in data.get_provider(task).output_features.items() if f.required)
  missing = [k for k in features if k not in run_lengths]
  if missing:
    raise ValueError(f"FORGETTING_EVAL_TASK={task!r} has features {features}, and "
                     f"TASK_FEATURE_LENGTHS={dict(run_lengths)} has no length for {missing}: set "
                     f"FORGETTING_FEATURE_LENGTHS, e.g. {dict.fromkeys(features, 128)}.")
  return {k: run_lengths[k] for k in features}


def _refuse_data_cache(model, data_cache: Optional[str]) -> None:
  """A model whose batches the base's converter does not make (a soft prompt's placeholders)
  cannot read a cache packed by it: the run would go on, silently wrong."""
  refusal = getattr(model, "DATA_CACHE_REFUSAL", None)
  if data_cache and refusal:
    raise ValueError(f"train.data_cache={data_cache!r} with {type(model).__name__}: {refusal}")


def _job_data(model):
  """The data package, checked against the model's vocabulary, its fault record cleared so that
  it holds this job's data faults only."""
  data = _data()
  data.check_vocabulary_fits(model.config.vocab_size)
  data.sources.FAULTS.clear()
  return data


def _data_shard(model, mesh, batch_size: int, num_microbatches: int) -> tuple[tuple, int]:
  """This process's data shard (index, count) and its rows of each batch, logged with the mesh;
  refuses a pipeline split that cannot work."""
  shard = partitioning.data_shard_info(mesh, batch_size)
  per_host_batch = batch_size // shard[1]
  metrics_lib.log(f"Mesh {dict(mesh.shape)} over {jax.device_count()} "
                  f"{jax.devices()[0].platform} devices; this process reads data shard "
                  f"{shard[0]} of {shard[1]} ({per_host_batch} rows).")
  pipeline = pipeline_stages.describe(model.config, dict(mesh.shape), batch_size,
                                      num_microbatches)  # refuses a split that cannot work
  if pipeline:
    metrics_lib.log(pipeline)
  return shard, per_host_batch


def _run_manifest(model, task: tuple, batch_size: int, seed: int, shard: tuple,
                  vocabulary: dict, data_cache: Optional[str]) -> dict:
  """What this start's data stream and token ids depend on, for run_dir's manifest."""
  return run_dir.manifest(
      task=task[0], feature_lengths=task[1], batch_size=batch_size, seed=seed,
      # A packed cache's rows do not depend on the readers: any process count resumes it.
      data_shards="any (packed cache)" if data_cache else shard[1], vocabulary=vocabulary,
      model_config=model.config, corpus=run_dir.corpus_bindings())


def _record_run(model_dir: str, manager, allow_changes, current, write: bool) -> None:
  """Checks the run's manifest (RunDirError if this start would change the data stream or the
  token ids); with `write`, once the start is accepted (checkpoint restored), records it: the
  manifest and, appended to config.gin, this start's resolved config.

  Run integrity (see t5x_lite.run_dir): the job holds MODEL_DIR's lock while it runs, and a
  resume whose task, feature lengths, batch size, seed, data shards, corpus or vocabulary differ
  from the run's manifest is refused, unless `allow_changes` names them (e.g. ["BATCH_SIZE"])."""
  step = manager.latest_step() if manager.restored_step is None else manager.restored_step
  run_dir.check_manifest(model_dir, current, resuming=step is not None,
                         allow_changes=allow_changes, step=step, log=metrics_lib.log,
                         write=write)
  if write:
    run_dir.append_config(model_dir, f"start at step {step or 0}", gin.config_str())


def _open_stream(data, manager, model, task: tuple, shard: tuple, per_host_batch: int,
                 batch_size: int, seed: int, vocabulary_sha: str, data_cache: Optional[str],
                 allow_changes):
  """(the training stream, its batches from the start, the global batch shapes the trainer
  compiles for).

  Data (see t5x_lite/data/resume.py): `data_cache` (a packed cache from tools/cache_task.py)
  is read instead of the on-the-fly pipeline: a resume starts at its row cursor in O(1), with
  any number of processes. Otherwise each checkpoint holds the input iterators' state, which a
  resume restores (replaying the consumed batches only where it cannot, saying why)."""
  stream = data.TrainStream(task[0], task[1], per_host_batch, batch_size,
                            model.feature_converter(), seed, shard, vocabulary_sha, data_cache,
                            allow_changes)
  manager.data_stream = stream  # checkpoints record its position and iterator state
  first_batches = stream.open()
  first = next(first_batches)  # its shapes are those the trainer compiles for
  batch_shapes = {k: (batch_size,) + v.shape[1:] for k, v in first.items()}
  return stream, itertools.chain([first], first_batches), batch_shapes


def _make_trainer(model, optimizer, mesh, batch_shapes: dict, num_microbatches: int,
                  trainable: trainer_lib.Trainable):
  """The trainer the model asks for, compiled for `batch_shapes`, its memory checked."""
  # A model that reads frozen trees (DPO's reference) says which, laid out on the mesh.
  frozen = getattr(model, "frozen_trees", lambda mesh: None)(mesh)
  # A model that trains on batches it makes from the task's (RL: samples of its policy for
  # the task's prompts, see t5x_lite.rl) names the trainer that makes them.
  trainer_class = getattr(model, "trainer_class", trainer_lib.Trainer)
  trainer = trainer_class(model, optimizer, mesh, batch_shapes, num_microbatches,
                          trainable=trainable, frozen_trees=frozen)
  trainer.check_memory()
  return trainer


def _start(trainer, manager, initial_checkpoint_path, seed, stream, fresh_batches, batch_size):
  """(state, batches consumed, batches to train on): resumed from the newest undamaged
  checkpoint of the run, else around INITIAL_CHECKPOINT_PATH's parameters, else initialised."""
  if manager.latest_step() is not None:
    state, consumed = manager.restore(trainer.abstract_state)
    consumed = _at_batch_size(consumed, manager.restored_position.get("batch_size"), batch_size)
    metrics_lib.log(f"Resumed from {manager.directory}/{manager.restored_step} ({consumed} "
                    "batches consumed).")
    return state, consumed, stream.resume(manager.restored_position, consumed,
                                          manager.step_directory(manager.restored_step),
                                          metrics_lib.log)
  if not initial_checkpoint_path:
    return trainer.init_state(seed), 0, fresh_batches
  if not os.path.isdir(os.path.join(initial_checkpoint_path, checkpoints.PARAMS_DIR)):
    raise FileNotFoundError(
        f"INITIAL_CHECKPOINT_PATH={initial_checkpoint_path!r} is not a params checkpoint (no "
        f"{checkpoints.PARAMS_DIR}/ inside). Point it to the MODEL_DIR of a finished run or to a "
        "directory written by checkpoints.save_params / tools/convert_checkpoint.py.")
  # A model that adds parameters to its base (LoRA adapters) says how to start from the base.
  load = getattr(trainer.model, "initial_params", None)
  abstract = trainer.abstract_state.params
  params = (load(initial_checkpoint_path, abstract, seed) if load else
            checkpoints.load_params(initial_checkpoint_path, abstract))
  metrics_lib.log(f"Starting from the parameters in {initial_checkpoint_path}.")
  return trainer.state_from_params(params, seed), 0, fresh_batches


def _at_batch_size(consumed: int, saved_batch_size: Optional[int], batch_size: int) -> int:
  """Batches consumed at the checkpoint's batch size, counted at this run's (an allowed
  BATCH_SIZE change): the rows read so far are skipped, none twice and none left out unless
  they do not fill whole batches (then the remainder is read again)."""
  if not saved_batch_size or saved_batch_size == batch_size:
    return consumed
  rows = consumed * saved_batch_size
  converted = rows // batch_size
  metrics_lib.log(f"BATCH_SIZE {saved_batch_size} -> {batch_size}: the {consumed} batches "
                  f"consumed ({rows} rows) are {converted} batches now"
                  + (f"; {rows - converted * batch_size} rows are read again." if rows %
                     batch_size else "."))
  return converted


def _validation_batches(data, model, per_host_batch: int, seed: int, shard: tuple,
                        eval_batches: int, task: str, lengths: Mapping[str, int]) -> list:
  """This process's rows of `eval_batches` validation batches of `task` (none without any)."""
  return data.validation_batches(task, lengths, per_host_batch, model.feature_converter(), seed,
                                 shard, eval_batches) if eval_batches else []


def _evaluations(trainer, state, validation_of: Callable, run_task: tuple, eval_every: int,
                 model_dir: str, forgetting_task: tuple) -> list[loop.Hook]:
  """The validation hook on the run's task (evaluated now if the run is fresh) and, when
  FORGETTING_EVAL_TASK is set, the forgetting hook (its "before" measured now). Each task is
  a (name, feature lengths) pair; `validation_of` gives its validation batches (this host's).

  Forgetting report: with `forgetting_eval_task` (FORGETTING_EVAL_TASK, e.g. the pretraining
  task), that task's teacher-forced loss and accuracy on `eval_batches` validation batches of
  `forgetting_feature_lengths` (default: TASK_FEATURE_LENGTHS' lengths of its features) are
  measured before the first update and after the last, and written with their change to
  MODEL_DIR/forgetting.json and TensorBoard (see loop.Forgetting)."""
  mesh, (task, lengths) = trainer.mesh, forgetting_task
  validation = [partitioning.host_to_global(b, mesh) for b in validation_of(*run_task)]
  evaluate = loop.Evaluate(validation, metrics_lib.MetricsWriter(model_dir, "validation"),
                           eval_every)
  step = int(jax.device_get(state.step))
  if step == 0:
    evaluate.evaluate(trainer, state.params, 0)
  if not lengths:
    return [evaluate]
  forgetting = _forgetting(trainer, task, validation_of(task, lengths), evaluate.writer,
                           model_dir, lengths)
  forgetting.start(state.params, step)
  return [evaluate, forgetting]


def _forgetting(trainer, task: str, host_batches: Sequence[dict], writer, model_dir: str,
                lengths: Mapping[str, int]) -> loop.Forgetting:
  """The forgetting hook over `task`'s validation batches (this process's rows)."""
  mesh = trainer.mesh
  batches = [partitioning.host_to_global(b, mesh) for b in host_batches]
  shapes = {k: tuple(v.shape) for k, v in batches[0].items()}
  # Another task has other batch shapes (a CLM task has no prefix): its own compiled eval
  # step, on the same parameter layout (nothing is allocated until it runs).
  evaluator = trainer if shapes == trainer.batch_shapes else trainer_lib.Trainer(
      trainer.model, trainer.optimizer, mesh, shapes, frozen_trees=trainer.frozen_trees)
  record = {"task": task, "feature_lengths": dict(lengths), "batches": len(batches)}
  return loop.Forgetting(batches, evaluator, writer, os.path.join(model_dir, "forgetting.json"),
                         record)


def _train_loop(trainer, state, batches, consumed: int, train_steps: int, manager, guard,
                evaluations: list, stream, model_dir: str, log_every: int, batch_size: int,
                sampling: tuple) -> None:
  """Trains from `consumed` batches to `train_steps` steps with the job's hooks, in order: log,
  guard, checkpoint, preemption, validation, data faults, at the end export and samples, then
  forgetting and a mixture's realised mix.

  Crash safety: checkpoints are written asynchronously every `checkpoint_every` steps, a
  damaged one is skipped on resume, and SIGTERM (a preemption notice) writes a final checkpoint
  and exits with status 143. A step whose loss or gradient is NaN/Inf is not applied;
  `on_nonfinite` ("skip" or "stop") says whether the run goes on, and "skip" stops once more
  than `max_nonfinite_fraction` of the last `nonfinite_window` steps were skipped (see
  loop.NonFiniteGuard). A non-finite validation loss stops the run too.

  After training, `sample_prompts` are continued for `sample_length` tokens with the model's
  `predict_batch` (greedy, or sampled at `sample_temperature`) and printed."""
  (evaluate, *forgetting), model, mesh = evaluations, trainer.model, trainer.mesh
  with loop.sigterm_received() as sigterm:
    flops, peak = trainer.flops_per_step(), trainer_lib.peak_flops_per_second()
    metrics_lib.log(f"{model.num_params():,} parameters; {flops / 1e9:.2f} GFLOP per step; "
                    f"peak {peak / 1e9:.1f} GFLOP/s.")
    log = loop.LogMetrics(metrics_lib.MetricsWriter(model_dir, "train"), log_every,
                          costs.tokens_per_step(trainer.batch_shapes), flops, peak, launch.START)
    checkpoint = loop.Checkpoint(manager, guard, batch_size)
    export = loop.AtEnd(lambda run: _export(model, run.state, model_dir, run.step))
    samples = loop.AtEnd(lambda run: print_samples(model, run.state.params, *sampling))
    hooks = [log, guard, checkpoint, loop.Preemption(sigterm, checkpoint, log), evaluate,
             loop.DataFaults(_data().sources.data_faults), export, samples]
    mix = [loop.MixProportions(lambda upto: stream.current.mix.take(upto), log.writer,
                               log_every)] if stream.mixture_tasks else []
    loop.TrainLoop(trainer, state, (partitioning.host_to_global(b, mesh) for b in batches),
                   train_steps, consumed).add(*hooks, *forgetting, *mix).run()


def _export(model, state, model_dir: str, step: int) -> None:
  loop.check_finite_before_saving(state, step, what="export")
  save = getattr(model, "save_params", None)  # a model may export less (LoRA: its adapters)
  if save:
    save(model_dir, state.params)
  else:
    checkpoints.save_params(model_dir, state.params, checkpoints.model_gin(model))
  metrics_lib.log(f"Done: step {step}; params exported to {model_dir} (load with "
                  "checkpoints.load_params, or fine-tune with INITIAL_CHECKPOINT_PATH).")


@gin.configurable(module="t5x_lite.train", allowlist=["top_k", "top_p", "check"])
def print_samples(model, params, prompts: Sequence[str], length: int, temperature: float = 0.0,
                  top_k: int = 0, top_p: float = 1.0, check: Optional[Callable] = None) -> None:
  """Continuations of `prompts` by the model's `predict_batch` (greedy at temperature 0;
  `top_k` / `top_p` filter the sampled tokens). `check(texts)` -> (a note per text, a summary),
  e.g. code_checks.python_report, is printed with them."""
  if not prompts:
    return
  if not model.GENERATES:
    metrics_lib.log("(No samples: this model does not generate text.)")
    return
  vocab = _data().get_vocabulary()
  encoded = [vocab.encode(p) for p in prompts]
  batch = model.generation_batch(encoded, vocab.eos_id, length)
  outputs, _ = model.predict_batch(params, batch, rng=jax.random.PRNGKey(0),
                                   max_new_tokens=length, temperature=temperature,
                                   top_k=top_k, top_p=top_p)
  texts = [model.sample_text(prompt, vocab_lib.decode_continuation(  # no padding, no EOS:
      vocab, ids if model.CONTINUES_PROMPT else [], [int(t) for t in output if t > 1]))
           for prompt, ids, output in zip(prompts, encoded, np.asarray(outputs)[:, 0])]
  notes, summary = check(texts) if check else ([""] * len(texts), "")
  for prompt, text, note in zip(prompts, texts, notes):
    metrics_lib.log(f"--- {prompt!r}" + (f"  ({note})" if note else "") + f"\n{text}")
  if summary:
    metrics_lib.log(summary)


def main(argv: Optional[Sequence[str]] = None) -> None:
  launch.main(train, argv, "python -m t5x_lite.train", __doc__)
