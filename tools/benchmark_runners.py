"""The per-process runners of tools/benchmark.py: each implementation (t5x_lite's train step or
greedy decoding, HF transformers' on PyTorch) is built, warmed up and timed in its own child
process (`Worker`), so it has its own memory peak and thread pool and none inherits the parent's
JAX. Children are spawned and import this module by name (`benchmark_runners`) to run `_serve`.

  batches     make_batch (random tokens shaped as the feature converter's), hf_batch (the same
              examples as HF arguments), token_counts
  threads     _limit_threads: the CPU threads a child may use (before it imports JAX)
  runners     Runner (timing, wall and CPU), JaxTrain, TorchTrain, JaxDecode, TorchDecode;
              xla_train_flops (XLA's FLOP count, to check the analytic one), _hf_config
  processes   _serve (the child's loop) and Worker (the parent's handle on it)

Only the process being timed runs: a Worker stops its child (SIGSTOP) between calls and
continues it (SIGCONT) for each call, so a waiting child cannot spin its threads (PyTorch's
OpenMP threads keep spinning after a parallel region, and XLA's pool can too) and steal cycles
from the one being timed, while the timed one keeps its libraries' default wait policies.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import glob
import gzip
import importlib
import json
import multiprocessing
import os
import resource
import signal
import sys
import time
import traceback
from typing import Optional, Sequence

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # t5x_lite


@dataclasses.dataclass(frozen=True)
class Shape:
  """A model preset with gin bindings, and the batch it is benchmarked on."""
  preset: str
  bindings: tuple[str, ...]
  batch_size: int
  lengths: dict  # {"inputs": encoder length, "targets": decoder length}


MLM_RATE = 0.15  # BERT: share of tokens that carry the loss
MATMUL_OP_NAMES = ("dot", "ynn_fusion", "xnn_fusion", "onednn", "gemm", "cublas")


def make_batch(model, batch_size: int, lengths: dict, seed: int = 0) -> dict[str, np.ndarray]:
  """Random tokens shaped as the feature converter's batches: every row one full-length
  example (segment ids 1, positions 0..l-1); loss on every target, or on 15% for BERT's MLM."""
  rng = np.random.default_rng(seed)
  batch = {}
  for name, value in model.dummy_batch(batch_size, lengths).items():
    prefix = name.split("_")[0]
    b, l = value.shape
    if name.endswith("_loss_weights"):
      rate = MLM_RATE if name == "encoder_loss_weights" else 1.0  # BERT's masked tokens
      batch[name] = (rng.random((b, l)) < rate).astype(np.int32)
    else:
      batch[name] = rng.integers(2, model.config.vocab_size, (b, l)).astype(np.int32)
    batch.setdefault(f"{prefix}_segment_ids", np.ones((b, l), np.int32))
    batch.setdefault(f"{prefix}_positions", np.broadcast_to(np.arange(l, dtype=np.int32), (b, l)))
  return batch


def hf_batch(batch: dict) -> dict[str, np.ndarray]:
  """The same examples as HF model arguments (HF shifts `labels` itself; -100 = no loss), by
  the features the batch has: BERT's MLM, T5's text-to-text, or a decoder's CLM."""
  if "encoder_loss_weights" in batch:
    return {"input_ids": batch["encoder_input_tokens"],
            "labels": np.where(batch["encoder_loss_weights"] > 0, batch["encoder_target_tokens"],
                               -100)}
  if "encoder_input_tokens" in batch:
    return {"input_ids": batch["encoder_input_tokens"], "labels": batch["decoder_target_tokens"]}
  return {"input_ids": batch["decoder_target_tokens"], "labels": batch["decoder_target_tokens"]}


def token_counts(batch: dict) -> tuple[int, int]:
  """(tokens that carry the loss, all input tokens) of one batch."""
  targets = sum(int(v.sum()) for k, v in batch.items() if k.endswith("_loss_weights"))
  tokens = sum(v.size for k, v in batch.items() if k.endswith("_input_tokens"))
  return targets, tokens


def _peak_rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


def _timed(fn, n: int, cpu: Optional[list] = None) -> list[float]:
  """Wall seconds of n calls; with `cpu`, also appends the CPU seconds this process (all its
  threads) spent in each: unlike wall time, that barely grows when other jobs share the cores."""
  times = []
  for _ in range(n):
    start, start_cpu = time.perf_counter(), time.process_time()
    fn()
    times.append(time.perf_counter() - start)
    if cpu is not None:
      cpu.append(time.process_time() - start_cpu)
  return times


class Runner:
  """What every runner shares: `run(n)` times n calls of `_call` (wall), `cpu_times()` hands
  over the CPU seconds of the calls timed since the last hand-over."""

  def run(self, n: int) -> list[float]:
    self._cpu = getattr(self, "_cpu", [])
    return _timed(self._call, n, self._cpu)

  def cpu_times(self) -> list[float]:
    times, self._cpu = getattr(self, "_cpu", []), []
    return times


# ---------------------------------------------------------------------------- threads

XLA_ONE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
_THREADS: Optional[int] = None  # this child's CPU threads (None: as many as cores)


def _limit_threads(threads: Optional[int]) -> None:
  """Give this child `threads` CPU threads, whichever framework it runs; call before JAX is
  imported (XLA's CPU client reads its flags, and sizes its thread pool, once). Below the core
  count the process keeps to N cores, which bounds XLA's pool; one thread also makes XLA
  single-threaded by flags; PyTorch gets torch.set_num_threads(N) in `_torch_model`."""
  global _THREADS
  if threads is None:
    return
  if "jax" in sys.modules:
    raise RuntimeError("_limit_threads must run before JAX is imported")
  _THREADS = threads
  if threads == 1:
    _add_xla_flags(XLA_ONE_THREAD)
  # The flags leave XLA's other threads (dispatch, host callbacks) free to use a second core
  # (measured: 1.7 CPU-seconds per wall second): the cores themselves are the fair bound.
  if threads < len(os.sched_getaffinity(0)):
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:threads])


def _add_xla_flags(flags: str) -> None:
  """Append XLA flags for this child (a variant's own compiler options); before JAX is imported,
  as XLA reads them once."""
  if not flags:
    return
  if "jax" in sys.modules:
    raise RuntimeError("XLA flags must be set before JAX is imported")
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flags).strip()


# ---------------------------------------------------------------------------- runners
# Each runner lives in a child process (`Worker`): __init__ builds and warms up, `info` says
# what it built, run(n) returns n timings, memory() its peaks.

class JaxTrain(Runner):
  """`trainer.Trainer.train_step` (what t5x_lite.train runs) on one fixed batch."""

  def __init__(self, shape: Shape, bindings: Sequence[str], trainer_kwargs: dict,
               warmup: int, xla_flops: bool):
    trainer_kwargs = dict(trainer_kwargs)
    _add_xla_flags(trainer_kwargs.pop("xla_flags", ""))  # an XLA-flags variant, before JAX loads
    import jax  # pylint: disable=g-import-not-at-top
    from t5x_lite import models, optimizers, partitioning, trainer  # pylint: disable=g-import-not-at-top
    self.jax, self.trainer_lib = jax, trainer
    bindings = tuple(shape.bindings) + tuple(bindings)
    adapters = trainer_kwargs.pop("lora", None)  # the `lora` variant: LoraModel(**adapters)
    model = with_lora(models.from_gin(shape.preset, bindings), adapters)
    if adapters:
      from t5x_lite import lora  # pylint: disable=g-import-not-at-top
      trainer_kwargs["trainable"] = lora.TRAINABLE  # what runs/lora_finetune.gin trains
    batch = make_batch(model, shape.batch_size, shape.lengths)
    mesh = partitioning.make_mesh()
    optimizer = optimizers.create_optimizer(
        "adamw", optimizers.create_schedule("constant", 1e-4, 0), weight_decay=0.01)
    shapes = {k: v.shape for k, v in batch.items()}
    self.trainer = trainer.Trainer(model, optimizer, mesh, shapes, **trainer_kwargs)
    self.batch = partitioning.host_to_global(batch, mesh)
    self.state = self.trainer.init_state(0)
    self.dtype = model.config.dtype
    self.info = {"first_step_s": _timed(self._call, 1)[0], "flops": self.trainer.flops_per_step(),
                 "params": model.num_params(), "hf_config": _hf_config(model.config),
                 "hf_batch": hf_batch(batch),
                 "platform": jax.devices()[0].platform, "device_kind": jax.devices()[0].device_kind}
    self.info["target_tokens"], self.info["tokens"] = token_counts(batch)
    shapes_of = self.trainer.abstract_state.params
    self.info["trainable_params"] = sum(
        x.size for x, m in zip(jax.tree.leaves(shapes_of), jax.tree.leaves(self.trainer.mask))
        if m)
    if xla_flops or adapters:  # LoRA's own count says whether frozen kernels get gradients
      self.info["xla_flops"] = xla_train_flops(shape.preset, bindings, shapes, adapters)
    _timed(self._call, warmup)

  def _call(self):
    self.state, metrics = self.trainer.train_step(self.state, self.batch)
    self.jax.block_until_ready(metrics)

  def profile(self, directory: str) -> dict:
    """One step under `jax.profiler` (trace in `directory`, for TensorBoard or Perfetto), and
    the time per XLA op it recorded; matmuls are the dot / YNNPACK / oneDNN / GEMM kernels."""
    with self.jax.profiler.trace(directory, create_perfetto_trace=True):
      self._call()
    path = max(glob.glob(os.path.join(directory, "**", "*.trace.json.gz"), recursive=True),
               key=os.path.getmtime)
    with gzip.open(path) as f:
      events = json.load(f)["traceEvents"]
    ops = collections.Counter()
    for event in events:
      op = event.get("args", {}).get("hlo_op")
      if event.get("ph") == "X" and op and event.get("dur"):
        ops[op] += event["dur"] / 1e6
    total = sum(ops.values())
    matmul = sum(t for op, t in ops.items() if any(k in op for k in MATMUL_OP_NAMES))
    return {"trace": path, "op_seconds": total, "matmul_share": matmul / max(total, 1e-9),
            "top_ops": ops.most_common(12)}

  def compiled_memory(self) -> dict:
    """XLA's memory analysis of the compiled train step on one device (from its buffer
    assignment, not the allocator): all its buffers, and the temporaries (activations, logits,
    gradients) among them. Compiles the step once more (a few seconds; not timed)."""
    trainer = self.trainer
    trainable, frozen = self.trainer_lib.partition(self.state.params, trainer.mask)
    # pylint: disable-next=protected-access  # the step Trainer.train_step runs, to lower it
    lowered = trainer._train_step.lower(self.state.replace(params=trainable), frozen,
                                        self.batch, trainer.frozen_trees)
    stats = lowered.compile().memory_analysis()
    if stats is None:  # a backend without the analysis
      return {"xla_peak_gib": None, "xla_temp_gib": None}
    # Arguments (state, batch) + outputs not aliased to them (donated state) + temporaries: the
    # whole step's buffers. (The CPU client's peak_memory_in_bytes is below temp_size alone.)
    peak = (stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
            + stats.temp_size_in_bytes)
    return {"xla_peak_gib": peak / 2 ** 30, "xla_temp_gib": stats.temp_size_in_bytes / 2 ** 30}

  def peak_flops(self) -> dict:
    """Measured matmul FLOP/s in the compute dtype; on accelerators also the data-sheet peak."""
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    measured = self.trainer_lib.measure_matmul_flops(n=2048 if self.info["platform"] == "cpu"
                                                     else 8192, dtype=jnp.dtype(self.dtype),
                                                     repeats=3)
    sheet = None
    if self.info["platform"] != "cpu":
      sheet = self.trainer_lib.peak_flops_per_second()
    return {"measured": measured * self.jax.device_count()
                        if self.info["platform"] != "cpu" else measured, "sheet": sheet}

  def memory(self) -> dict:
    stats = self.jax.local_devices()[0].memory_stats() or {}
    return {"rss_gib": _peak_rss_gib(),
            "device_gib": stats["peak_bytes_in_use"] / 2 ** 30
                          if "peak_bytes_in_use" in stats else None}


def with_lora(model, adapters: Optional[dict]):
  """`model`, with LoRA adapters (`LoraModel(model, **adapters)`) when `adapters` is given."""
  if not adapters:
    return model
  from t5x_lite import lora  # pylint: disable=g-import-not-at-top
  return lora.LoraModel(model, **adapters)


def xla_train_flops(preset: str, bindings: Sequence[str], shapes: dict,
                    adapters: Optional[dict] = None) -> float:
  """XLA's count of the train step's FLOPs (`cost_analysis()` of the lowered step), for the same
  model unrolled and without remat: XLA counts a while loop's body once, so a scanned stack would
  be undercounted by its depth. Lowering only (no compilation) takes seconds. With `adapters`,
  the LoRA step (adapters trained, the base frozen): no weight gradients of frozen kernels, so
  about 2/3 of the full step's matmul FLOPs."""
  import jax  # pylint: disable=g-import-not-at-top
  from t5x_lite import models, optimizers, partitioning, trainer  # pylint: disable=g-import-not-at-top
  model = with_lora(models.from_gin(preset, tuple(bindings) + (
      "TransformerConfig.scan_layers = False", "TransformerConfig.remat_policy = 'none'")),
                    adapters)
  optimizer = optimizers.create_optimizer("adamw")
  mesh = partitioning.make_mesh()
  from t5x_lite import lora  # pylint: disable=g-import-not-at-top
  built = trainer.Trainer(model, optimizer, mesh, shapes,
                          trainable=lora.TRAINABLE if adapters else None)
  abstract = built.abstract_state
  trainable, frozen = trainer.partition(abstract.params, built.mask)
  step = jax.jit(functools.partial(trainer.train_step, model, optimizer, 1))
  with partitioning.activation_sharding(mesh):
    lowered = step.lower(abstract.replace(params=trainable), frozen,
                         {k: jax.ShapeDtypeStruct(v, np.int32) for k, v in shapes.items()}, {})
  analysis = lowered.cost_analysis()
  return float((analysis[0] if isinstance(analysis, list) else analysis)["flops"])


def _hf_config(cfg) -> Optional[dict]:
  """The HF architecture and config holding a model of this config (None if none can)."""
  from t5x_lite.interop import hf_families  # pylint: disable=g-import-not-at-top
  try:
    family = hf_families.family_of_config(cfg)
    return {"architecture": family.architecture, "model_type": family.model_type,
            "config": family.config_to_hf(cfg), "dtype": cfg.dtype}
  except ValueError:
    return None


def _torch_model(hf_config: dict, compiled: bool):
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(_THREADS or os.cpu_count())  # default: as many as cores, like XLA's pool
  torch.manual_seed(0)
  config = transformers.AutoConfig.for_model(hf_config["model_type"], **hf_config["config"])
  model = getattr(transformers, hf_config["architecture"])(config)
  if not hf_config["config"].get("tie_word_embeddings", True):
    _untie_head(torch, model)
  if hf_config["dtype"] != "float32":
    model = model.to(getattr(torch, hf_config["dtype"]))
  return torch, (torch.compile(model) if compiled else model)


def _untie_head(torch, model) -> None:
  """The peer of an untied model (T5 v1.1, LLaMA) gets its own head, as ours has:
  transformers 5 ties the output projection to the input embedding of a model built without a
  checkpoint whatever its config says (T5Config even rewrites tie_word_embeddings to true),
  which would leave the peer one [vocab, d] matrix, and its optimizer state, short."""
  head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
  if head is not None and head.weight is embedding.weight:
    head.weight = torch.nn.Parameter(embedding.weight.detach().clone())


# HF PEFT's LoRA targets: the attention projections t5x_lite's lora.ATTENTION adapts (query,
# key, value, out; GPT-2's fused c_attn and its attention c_proj, not the MLP's), per model type.
PEFT_ATTENTION = {
    "gpt2": r".*\.attn\.(c_attn|c_proj)",
    "llama": r".*\.self_attn\.(q_proj|k_proj|v_proj|o_proj)",
    "mixtral": r".*\.self_attn\.(q_proj|k_proj|v_proj|o_proj)",
    "t5": r".*\.(SelfAttention|EncDecAttention)\.(q|k|v|o)",
    "bert": r".*\.attention\.(self\.(query|key|value)|output\.dense)",
}


def peft_lora(model, model_type: str, adapters: dict):
  """`model` wrapped by HF PEFT: LoRA of rank r, alpha, dropout 0 on the attention projections,
  the base frozen (requires_grad False)."""
  import peft  # pylint: disable=g-import-not-at-top
  if model_type not in PEFT_ATTENTION:
    raise ValueError(f"--compare hf-peft: no attention targets known for HF {model_type!r}; "
                     f"known: {sorted(PEFT_ATTENTION)}.")
  config = peft.LoraConfig(r=adapters["rank"], lora_alpha=adapters["alpha"], lora_dropout=0.0,
                           target_modules=PEFT_ATTENTION[model_type],
                           fan_in_fan_out=model_type == "gpt2")  # GPT-2's Conv1D is [in, out]
  return peft.get_peft_model(model, config)


class TorchTrain(Runner):
  """HF transformers' model of the same config: forward with labels, backward, clipping to global
  norm 1 and AdamW (weight decay 0.01), as the JAX step does. With `lora` (rank, alpha), HF PEFT
  LoRA adapters on the attention projections, and AdamW and clipping on them alone. With
  `autocast`, the forward runs under `torch.autocast("cpu", torch.bfloat16)` (bf16 compute,
  fp32 weights and optimizer state: PyTorch's mixed precision)."""

  def __init__(self, hf_config: dict, batch: dict, compiled: bool, warmup: int,
               lora: Optional[dict] = None, autocast: bool = False):
    self.torch, self.model = _torch_model(hf_config, compiled and not lora)
    self.autocast = autocast
    if lora:
      self.model = peft_lora(self.model, hf_config["model_type"], lora)
      self.model = self.torch.compile(self.model) if compiled else self.model
    self.model.train()
    self.params = [p for p in self.model.parameters() if p.requires_grad]
    self.optimizer = self.torch.optim.AdamW(self.params, lr=1e-4, weight_decay=0.01)
    self.batch = {k: self.torch.from_numpy(np.ascontiguousarray(v)).long()
                  for k, v in batch.items()}
    self.info = {"first_step_s": _timed(self._call, 1)[0],
                 "trainable_params": sum(p.numel() for p in self.params)}
    _timed(self._call, warmup)

  def _call(self):
    self.optimizer.zero_grad(set_to_none=True)
    with self.torch.autocast("cpu", dtype=self.torch.bfloat16, enabled=self.autocast):
      loss = self.model(**self.batch).loss
    loss.backward()
    self.torch.nn.utils.clip_grad_norm_(self.params, 1.0)
    self.optimizer.step()

  def memory(self) -> dict:
    return {"rss_gib": _peak_rss_gib(), "device_gib": None}


def step_param_bytes(params) -> int:
  """Bytes of the parameters a decoding step reads: all but an encoder's (which runs once per
  call, on the prompt)."""
  import jax  # pylint: disable=g-import-not-at-top  # the child's, after its XLA flags
  return sum(x.size * x.dtype.itemsize for key, tree in params.items() if key != "encoder"
             for x in jax.tree.leaves(tree))


class JaxDecode(Runner):
  """`model.predict_batch`, greedy, `new_tokens` per row after a random prompt."""

  def __init__(self, shape: Shape, bindings: Sequence[str], batch_size: int, prompt: int,
               new_tokens: int, warmup: int):
    import jax  # pylint: disable=g-import-not-at-top
    from t5x_lite import models  # pylint: disable=g-import-not-at-top
    self.jax = jax
    self.model = models.from_gin(shape.preset, tuple(shape.bindings) + tuple(bindings))
    if not self.model.GENERATES:
      raise ValueError(f"{shape.preset} is an encoder: it does not generate; decode benchmarks "
                       "take decoder-only or encoder-decoder shapes.")
    rng = np.random.default_rng(0)
    tokens = rng.integers(2, self.model.config.vocab_size, (batch_size, prompt)).astype(np.int32)
    # `prompt` tokens per row as the model reads them: BOS + the rest, or the rest + EOS.
    self.batch = self.model.generation_batch(list(tokens[:, 1:]), 1, new_tokens)
    self.params = self.model.init(jax.random.PRNGKey(0), self.model.dummy_batch(
        batch_size, {"inputs": prompt, "targets": prompt}))
    self.new_tokens = new_tokens
    self.info = {"first_step_s": _timed(self._call, 1)[0], "hf_config": _hf_config(
        self.model.config), "hf_inputs": tokens,
                 "param_bytes": step_param_bytes(self.params)}
    _timed(self._call, warmup)
    # Rows stop at EOS (1) and the loop once all have: count the steps really taken.
    outputs = np.asarray(self.outputs)[:, 0]
    ended = (outputs == 1).any(axis=1)
    lengths = np.where(ended, (outputs == 1).argmax(axis=1) + 1, new_tokens)
    self.info["steps"] = int(lengths.max())

  def _call(self):
    self.outputs, _ = self.model.predict_batch(self.params, self.batch,
                                               max_new_tokens=self.new_tokens)
    self.jax.block_until_ready(self.outputs)

  def read_bandwidth(self, mib: int = 512, repeats: int = 5) -> float:
    """Bytes per second this process reads from memory: a jitted sum over `mib` MiB of float32
    (far beyond the caches), median of `repeats`. A decoding step reads every weight once, so
    parameter bytes / this is the step's memory-bound floor."""
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    x = jnp.ones((mib * 2 ** 18,), jnp.float32)
    total = self.jax.jit(jnp.sum)
    self.jax.block_until_ready(total(x))
    seconds = _timed(lambda: self.jax.block_until_ready(total(x)), repeats)
    return x.nbytes / float(np.median(seconds))

  def memory(self) -> dict:
    return JaxTrain.memory(self)


class TorchDecode(Runner):
  """HF `generate`, greedy, exactly `new_tokens` per row (EOS held back until then)."""

  def __init__(self, hf_config: dict, inputs: np.ndarray, new_tokens: int, compiled: bool,
               warmup: int):
    self.torch, self.model = _torch_model(hf_config, compiled)
    self.model.eval()
    self.inputs = self.torch.from_numpy(inputs).long()
    self.kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       eos_token_id=1, pad_token_id=0, attention_mask=self.torch.ones_like(
                           self.inputs))
    if hf_config["config"].get("is_encoder_decoder"):
      self.kwargs["decoder_start_token_id"] = 0
    self.info = {"first_step_s": _timed(self._call, 1)[0]}
    _timed(self._call, warmup)

  def _call(self):
    with self.torch.inference_mode():
      self.model.generate(self.inputs, **self.kwargs)

  def memory(self) -> dict:
    return TorchTrain.memory(self)


# ---------------------------------------------------------------------------- processes

RUNNERS = {"JaxTrain": JaxTrain, "TorchTrain": TorchTrain, "JaxDecode": JaxDecode,
           "TorchDecode": TorchDecode}


def _serve(conn, runner: str, args: tuple, threads: Optional[int] = None):
  """Child process: build the runner, then answer (method, args) calls until told to stop."""
  try:
    _limit_threads(threads)
    if ":" in runner:  # "module:Class", a runner defined in another tools/ module
      module, name = runner.split(":")
      obj = getattr(importlib.import_module(module), name)(*args)
    else:
      obj = RUNNERS[runner](*args)
    conn.send(("ok", obj.info))
    while True:
      method, call_args = conn.recv()
      if method is None:
        return
      conn.send(("ok", getattr(obj, method)(*call_args)))
  except Exception:  # pylint: disable=broad-except  # reported to the parent, which raises
    conn.send(("error", traceback.format_exc()))


def _exit_on_sigterm() -> None:
  """A parent ended by SIGTERM (e.g. `timeout`) exits through its `finally` blocks, whose
  Worker.close continues the stopped children: by default it would die at once and leave them
  stopped forever (a stopped process does not act on SIGTERM until continued)."""
  if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))


class Worker:
  """A runner in its own process (spawned: no state inherited from the parent's JAX), limited
  to `threads` CPU threads if given. Between calls the child is stopped (see the module
  docstring); it runs only while it builds and while it answers a call."""

  def __init__(self, runner: str, *args, threads: Optional[int] = None):
    context = multiprocessing.get_context("spawn")
    self._conn, child = context.Pipe()
    self._process = context.Process(target=_serve, args=(child, runner, args, threads),
                                    daemon=True)
    self._process.start()
    _exit_on_sigterm()
    self.info = self._receive(runner)
    self._signal(signal.SIGSTOP)

  def _signal(self, sig) -> None:
    if self._process.is_alive():
      os.kill(self._process.pid, sig)

  def _receive(self, what: str):
    status, value = self._conn.recv()
    if status == "error":
      self.close()
      raise RuntimeError(f"benchmark worker failed in {what}:\n{value}")
    return value

  def call(self, method: str, *args):
    self._signal(signal.SIGCONT)
    try:
      self._conn.send((method, args))
      return self._receive(method)
    finally:
      self._signal(signal.SIGSTOP)

  def close(self):
    self._signal(signal.SIGCONT)  # a stopped child would not read the request to stop
    if self._process.is_alive():
      try:
        self._conn.send((None, ()))
      except (BrokenPipeError, OSError):
        pass
      self._process.join(timeout=30)
    if self._process.is_alive():
      self._process.kill()
