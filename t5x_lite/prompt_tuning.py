"""Prompt tuning (soft prompts): `length` learned vectors in front of every input, base frozen.

    model = prompt_tuning.PromptTuningModel(models.from_gin("t5_tiny"), length=20)
    trainer = Trainer(model, optimizer, mesh, shapes, trainable=prompt_tuning.TRAINABLE)

How, without touching masks or positions:
  * data side: the model's feature converter puts `length` placeholder ids -1, -2, ..., -length
    in front of every example's inputs (its "inputs" feature; a decoder's "targets" when the
    task has no inputs; an encoder's inputs, targets and MLM weights alike), before packing, so
    every packed example carries its own prompt and the feature lengths grow by `length`.
    Placeholders are ordinary non-zero tokens to segment ids, positions, masks and packing; as
    targets they get loss weight 0 (the loss excludes the prompt positions). A decoder reads
    BOS, the prompt, then the text; an encoder-decoder's encoder reads the prompt, then the text.
  * model side: flax's `nn.intercept_methods` around `transformer.Embedder` (the stacks' token
    embedding + positions) adds the parameter `prompt` [length, d] (logical axes None, "embed")
    to the Embedder whose path matches `embedders` (a decoder's or BERT's `embedder`, a T5's
    `encoder_embedder`) and, inside it, replaces the token embedding of placeholder -1 - k by
    prompt[k]. Everything after the embedding (position embeddings, norms, dropout, attention)
    sees the prompt as it sees tokens. No model file changes; decoding and scoring work alike
    (generation_batch / scoring_batch put the placeholders in front of each prompt).
The prompt starts as the embeddings of `length` token ids drawn from the first 5000 of the
vocabulary (Lester et al. 2021's "sampled vocabulary" initialisation), of the base it tunes.

Export (`save_params`, what the train job writes at the end): prompt/ (Orbax, the prompt alone),
prompt_tuning.json (length, the base checkpoint, the embedding width and vocabulary size it was
trained for, an id) and the base's model.gin. `for_checkpoint` is how the infer and eval jobs
and `t5x_lite.load` take any checkpoint directory: a prompt export runs as its base with the
prompt in front (`load(directory)` is `t5x_lite.load` of it). `export_peft` writes it for
Hugging Face PEFT (tools/prompt_tuning.py to-peft).
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import re
from typing import Any, Callable, NamedTuple, Optional

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np

from t5x_lite import checkpoints, interception, layers, transformer
from t5x_lite.trainer import param_path

EMBEDDERS = r"embedder|encoder_embedder"  # the Embedders that read a stack's inputs
TRAINABLE = r"(.*/)?(encoder_)?embedder/prompt"  # `train.trainable` of a prompt-tuning run
PROMPT = "prompt"
PROMPT_DIR = "prompt"  # a prompt export: prompt/ (Orbax), prompt_tuning.json, model.gin
PROMPT_JSON = "prompt_tuning.json"
SAMPLED_VOCABULARY = 5000  # the prompt starts as embeddings of ids drawn from the first 5000
_TARGETS = (("decoder_target_tokens", "decoder_loss_weights"),
            ("encoder_target_tokens", "encoder_loss_weights"))


def placeholder_ids(length: int) -> list[int]:
  """The ids standing for the prompt's positions: -1 (prompt[0]) ... -length."""
  return list(range(-1, -length - 1, -1))


def sample_prompt(key, table, length: int):
  """[length, d] rows of the embedding table [v, d] at ids drawn from [2, min(v, 5000))."""
  high = max(3, min(table.shape[0], SAMPLED_VOCABULARY))
  ids = jax.random.randint(key, (length,), 2, high)
  return jnp.take(table, ids, axis=0)


def _soft_tokens(token_embed: nn.Module, prompt):
  """Interceptor: the token embedding `token_embed` with placeholder -1 - k read as prompt[k]."""
  def intercept(next_fun, args, kwargs, context):
    if context.module.path != token_embed.path or context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    ids = args[0]
    is_prompt = ids < 0
    x = next_fun(jnp.where(is_prompt, 0, ids), *args[1:], **kwargs)
    slots = jnp.clip(-ids - 1, 0, prompt.shape[0] - 1)
    soft = jnp.take(prompt, slots, axis=0).astype(x.dtype)
    return jnp.where(is_prompt[..., None], soft, x)
  return intercept


def _interceptor(pattern: re.Pattern, length: int, seen: list):
  """Interceptor: matching Embedders gain `prompt` and read placeholders as its rows."""
  def intercept(next_fun, args, kwargs, context):
    module = context.module
    if not isinstance(module, transformer.Embedder) or context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    path = "/".join(module.path)
    seen.append(path)
    if not pattern.fullmatch(path):
      return next_fun(*args, **kwargs)
    token_embed = args[0]
    table = token_embed.embedding
    init = lambda key, shape, dtype: sample_prompt(key, table, shape[0]).astype(dtype)
    prompt = layers.param(module, PROMPT, init, (length, table.shape[1]), (None, "embed"),
                          module.config.param_dtype)
    with nn.intercept_methods(_soft_tokens(token_embed, prompt)):
      return next_fun(*args, **kwargs)
  return intercept


@gin.configurable(module="t5x_lite.prompt_tuning")
class PromptTuningModel(interception.InterceptedModel):
  """`model` reading `length` learned prompt vectors before every input (module docstring).

  Every method of the base model runs with the prompt; the feature converter and the batches
  built from text put the placeholders in; attributes that are not methods are the base's.
  """
  RESERVED = ("base",)
  # What `train` says to a run with `train.data_cache` (the cache's rows lack the prompt).
  DATA_CACHE_REFUSAL = (
      "a packed cache (tools/cache_task.py) holds rows packed by the base's feature converter, "
      "without the soft prompt's placeholder positions, so the prompt would be neither read nor "
      "trained. Prompt tuning reads its task through the on-the-fly pipeline: drop the cache "
      "(--gin.train.data_cache=None).")

  def __init__(self, model: Any = gin.REQUIRED, length: int = 20,
               embedders: str = EMBEDDERS, base_checkpoint: Optional[str] = None):
    if isinstance(model, PromptTuningModel):
      raise ValueError("This model already has a soft prompt; wrap the base model once.")
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
      raise ValueError(f"PromptTuningModel.length={length!r}: the number of prompt vectors must "
                       "be a whole number >= 1 (Lester et al. use 20 to 100).")
    if not hasattr(model, "config") or not hasattr(model, "module"):
      raise ValueError(f"PromptTuningModel wraps a t5x_lite model (models.from_gin(...), or "
                       f"%MODEL in gin); got {model!r}.")
    # A copy with its own compiled functions: the base's own, traced without the prompt, and
    # these, traced with it, must not share a cache.
    model = copy.copy(model)
    model._compiled_fns = {}  # pylint: disable=protected-access
    self.base, self.length, self.embedders = model, length, embedders
    self.base_checkpoint = base_checkpoint
    self._pattern = re.compile(embedders)
    self._seen: list[str] = []  # the Embedder paths the last trace went through

  @property
  def uses_dropout(self) -> bool:
    return self.base.config.dropout_rate > 0.0

  @contextlib.contextmanager
  def prompted(self):
    """While active, the matching Embedders hold the prompt and read placeholders as it."""
    with nn.intercept_methods(_interceptor(self._pattern, self.length, self._seen)):
      yield

  def _runner(self):
    return self.base

  def _context(self):
    return self.prompted()

  # -- data: placeholders in front of every input ------------------------------------------
  def feature_converter(self, pack: bool = True):
    """The base's converter, putting the placeholders in front of each example first."""
    base = self.base.feature_converter(pack=pack)
    cls = type(f"Prompted{type(base).__name__}", (_PromptedConverter, type(base)), {})
    converter = cls.__new__(cls)  # the base converter's state, under the prompted class
    converter.__dict__.update(vars(base), prompt_length=self.length)
    return converter

  def generation_batch(self, prompts, eos_id: int, max_new_tokens: int, rows=None,
                       round_width=int):
    ids = placeholder_ids(self.length)
    return self.base.generation_batch([ids + list(p) for p in prompts], eos_id, max_new_tokens,
                                      rows, round_width)

  def scoring_batch(self, sources, targets, eos_id: int, rows=None, round_width=int):
    ids = placeholder_ids(self.length)
    batch = self.base.scoring_batch([ids + list(s) for s in sources], targets, eos_id, rows,
                                    round_width)
    return without_prompt_targets(batch, np.where)

  # -- parameters ---------------------------------------------------------------------------
  def abstract_params(self, batch=None):
    """The base's (shapes, logical specs) plus the prompt's; refuses a base without a matching
    embedder, naming the ones it has."""
    self._seen.clear()
    with self.prompted():
      shapes, specs = self.base.abstract_params(batch)
    if not any(p.endswith("/" + PROMPT) for p in _paths(shapes)):
      raise ValueError(
          f"PromptTuningModel.embedders={self.embedders!r} matches no token embedder of this "
          f"{type(self.base).__name__}; its embedders are {sorted(set(self._seen))}. Set "
          "embedders to the path of the one reading the inputs (a transformer.Embedder).")
    return shapes, specs

  def init(self, rng, batch):
    self.abstract_params(batch)  # the checks, before any work
    with self.prompted():
      return self.base.init(rng, batch)

  def num_params(self, batch=None) -> int:
    return sum(x.size for x in jax.tree.leaves(self.abstract_params(batch)[0]))

  def initial_params(self, directory: str, abstract_params, seed: int = 0):
    """The base parameters of a params checkpoint plus a fresh prompt (sampled from the base's
    own embedding table), laid out like `abstract_params` (with shardings)."""
    base_abstract, prompt_abstract = split(abstract_params)
    base = checkpoints.load_params(directory, base_abstract)
    self.base_checkpoint = os.path.abspath(directory)
    flat_base = flat(base)
    prompts = {}
    for index, (name, leaf) in enumerate(sorted(flat(prompt_abstract).items())):
      table = flat_base[_table_path(name, flat_base)]
      make = lambda key, table=table, leaf=leaf: sample_prompt(key, table, leaf.shape[0]).astype(
          leaf.dtype)
      prompts[name] = jax.jit(make, out_shardings=leaf.sharding)(
          jax.random.fold_in(jax.random.PRNGKey(seed), index))
    return join(base, prompts)

  def save_params(self, directory: str, params) -> str:
    """A prompt export (kilobytes): prompt/, prompt_tuning.json naming the base, model.gin."""
    return save_prompt(directory, self, params)


class _PromptedConverter:
  """Mixin over a seqio feature converter: the placeholders go in front of each example's
  inputs (see the module docstring), the feature lengths grow by as much, and a target that is
  a placeholder gets loss weight 0."""
  prompt_length = 0

  def __call__(self, ds, task_feature_lengths):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    n = self.prompt_length
    ids = tf.constant(placeholder_ids(n), tf.int32)
    spec = ds.element_spec
    if "inputs" not in spec:
      features = {"targets": ids}
    elif isinstance(self, _encoder_converter()):  # BERT: inputs and targets stay aligned
      features = {"inputs": ids, "targets": ids, "mlm_weights": tf.ones([n], tf.int32)}
    else:
      features = {"inputs": ids}
    features = {k: v for k, v in features.items() if k in spec}

    def prepend(ex):
      return dict(ex, **{k: tf.concat([fill, tf.cast(ex[k], tf.int32)], 0)
                         for k, fill in features.items()})

    lengths = {k: v + (n if k in features else 0) for k, v in task_feature_lengths.items()}
    converted = super().__call__(ds.map(prepend), lengths)
    return converted.map(lambda ex: without_prompt_targets(dict(ex), tf.where))


def _encoder_converter():
  import seqio  # pylint: disable=g-import-not-at-top
  return seqio.EncoderFeatureConverter


def without_prompt_targets(batch: dict, where=jnp.where) -> dict:
  """The batch with every placeholder target set to 0 and weighted 0 (no loss on the prompt);
  `where` is the batch's array library's (np.where, jnp.where, tf.where)."""
  for targets, weights in _TARGETS:
    if targets in batch:
      is_prompt = batch[targets] < 0
      batch[targets] = where(is_prompt, 0, batch[targets])
      if weights in batch:
        batch[weights] = where(is_prompt, 0, batch[weights])
  return batch


# ---------------------------------------------------------------------------- params trees

def _paths(tree) -> list[str]:
  return [param_path(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]


def is_prompt(path: str) -> bool:
  return path.rsplit("/", 1)[-1] == PROMPT


def flat(tree) -> dict[str, Any]:
  return {param_path(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def split(params):
  """(base, prompt): two nested dicts, the leaves of `params` that are not / are prompts."""
  base, prompts = {}, {}
  for name, leaf in flat(params).items():
    _set(prompts if is_prompt(name) else base, name, leaf)
  return base, prompts


def join(*trees):
  out = {}
  for tree in trees:
    for name, leaf in flat(tree).items():
      _set(out, name, leaf)
  return out


def _set(tree: dict, path: str, leaf) -> None:
  *parents, name = path.split("/")
  for key in parents:
    tree = tree.setdefault(key, {})
  tree[name] = leaf


def _table_path(prompt_path: str, base: dict) -> str:
  """The token embedding table the prompt at `prompt_path` lives beside (its stack's)."""
  tables = sorted(name for name in base if name.endswith("token_embed/embedding"))
  if not tables:
    raise ValueError(f"The base has no token embedding table (token_embed/embedding) to sample "
                     f"the prompt {prompt_path} from; its parameters: {sorted(base)[:6]} ...")
  return tables[0]


# ---------------------------------------------------------------------------- exports

def _prompt_id(prompts, config: dict) -> str:
  digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
  for name, leaf in sorted(flat(prompts).items()):
    digest.update(name.encode())
    digest.update(np.asarray(jax.device_get(leaf), np.float32).tobytes())
  return digest.hexdigest()[:16]


def save_prompt(directory: str, model: PromptTuningModel, params) -> str:
  """Writes the prompt of `params` (prompt/), prompt_tuning.json (length, embedders, the base
  checkpoint, the width and vocabulary it fits, the prompt's shapes, an id) and model.gin."""
  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  prompts = split(params)[1]
  checkpoints.save_tree(os.path.join(directory, PROMPT_DIR), prompts)
  cfg = model.base.config
  record = {"format": "t5x_lite.prompt_tuning/1", "length": model.length,
            "embedders": model.embedders, "base": model.base_checkpoint,
            "d_model": cfg.d_model, "vocab_size": cfg.vocab_size,
            "prompts": {name: list(leaf.shape) for name, leaf in flat(prompts).items()}}
  record["id"] = _prompt_id(prompts, record)
  if jax.process_index() == 0:
    with open(os.path.join(directory, PROMPT_JSON), "w") as f:
      json.dump(record, f, indent=1)
    with open(os.path.join(directory, checkpoints.MODEL_GIN), "w") as f:
      f.write(checkpoints.model_gin(model.base))
  return directory


def read_prompt_config(directory: str) -> dict:
  path = os.path.join(directory, PROMPT_JSON)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"{directory!r} is not a prompt-tuning export (no {PROMPT_JSON}); point at the MODEL_DIR "
        "of a finished prompt-tuning run (runs/prompt_tuning.gin).")
  with open(path) as f:
    return json.load(f)


def load_prompt(directory: str) -> tuple[dict, dict]:
  """(prompt tree on this process's first device, prompt_tuning.json) of a prompt export."""
  config = read_prompt_config(directory)
  target = os.path.join(os.path.abspath(directory), PROMPT_DIR)
  return checkpoints.restore_on_first_device(target), config


# ---------------------------------------------------------------------------- jobs

class Source(NamedTuple):
  """What a job runs for a checkpoint directory (`for_checkpoint`)."""
  model: Any  # the model to run
  params_dir: str  # the params checkpoint read: the directory itself, or a prompt export's base
  vocabulary_dir: str  # the directory recording the vocabulary
  load: Callable[[Any], Any]  # abstract params (None: onto this process's first device) -> params
  prompt: Optional[dict] = None  # a prompt export's prompt_tuning.json


def is_export(directory: Optional[str]) -> bool:
  """Whether `directory` is a prompt export (a finished prompt-tuning run's MODEL_DIR)."""
  return bool(directory) and os.path.isfile(os.path.join(directory, PROMPT_JSON))


def for_checkpoint(model, directory: Optional[str], quantize: Optional[str] = None,
                   kv_cache: Optional[str] = None, base: Optional[str] = None,
                   log: Optional[Callable[[str], None]] = None) -> Source:
  """What the infer and eval jobs and `t5x_lite.load` run for the checkpoint `directory`.

  A prompt export: `model` (its base, as the export's model.gin builds it) with the prompt in
  front of every input, reading the base checkpoint prompt_tuning.json names (or `base`) and
  the prompt; said in the log. Any other directory: `model` and its own params, unchanged.
  Quantized runs (`quantize`, `kv_cache`, a quantized base) with a prompt are refused.
  """
  if not is_export(directory):
    if base is not None:
      raise ValueError(f"base={base!r} is for a prompt export, and {directory!r} has no "
                       f"{PROMPT_JSON}; load the checkpoint without base=.")
    return Source(model, directory, directory,
                  lambda abstract: checkpoints.load_params(directory, abstract))
  if quantize or kv_cache:
    raise ValueError(
        f"{directory!r} is a soft-prompt export; quantized runs with a prompt are not built "
        f"(quantize={quantize!r}, kv_cache={kv_cache!r}). Run it unquantized (QUANTIZE = None, "
        "QUANTIZE_KV_CACHE = None).")
  source = open_export(directory, base, model)
  config = source.prompt
  (log or _log)(f"{directory} is a soft-prompt export ({config['length']} vectors, id "
                f"{config['id']}): running its base {source.params_dir} with the prompt in front "
                "of every input.")
  return source


def _log(message: str) -> None:
  from t5x_lite import metrics  # pylint: disable=g-import-not-at-top
  metrics.log(message)


def open_export(directory: str, base: Optional[str] = None, model: Any = None) -> Source:
  """A prompt export over its base (`base`, default the checkpoint prompt_tuning.json names):
  the prompted model (over `model`, default the base's model.gin) and how to read its params."""
  from t5x_lite import loaded_model, models, quantized_checkpoints  # pylint: disable=g-import-not-at-top
  config = read_prompt_config(directory)
  base = base or config.get("base")
  if not base or not os.path.isdir(os.path.join(base, checkpoints.PARAMS_DIR)):
    raise ValueError(f"{directory}/{PROMPT_JSON} names base {base!r}, which is not a params "
                     "checkpoint; give the base the prompt was trained on (load(..., base=DIR)).")
  if quantized_checkpoints.read_settings(base) is not None:
    raise ValueError(f"The base {base} of the prompt in {directory} is a quantized checkpoint; "
                     "quantized runs with a prompt are not built. Use the float base.")
  if model is None:
    model = models.from_gin(os.path.join(base, checkpoints.MODEL_GIN))
  if isinstance(model, PromptTuningModel):  # a gin file that wraps the base already
    model = model.base
  cfg = model.config
  if (cfg.d_model, cfg.vocab_size) != (config["d_model"], config["vocab_size"]):
    raise ValueError(
        f"The prompt in {directory} was trained on a base of d_model {config['d_model']} and "
        f"vocab_size {config['vocab_size']}; {base} has {cfg.d_model} and {cfg.vocab_size}. Use "
        f"the base it was trained on (prompt_tuning.json names it: {config.get('base')!r}).")
  prompted = PromptTuningModel(model, config["length"], config["embedders"], base)

  def load(abstract=None):
    base_abstract, prompt_abstract = split(abstract) if abstract is not None else (None, None)
    params = join(checkpoints.load_params(base, base_abstract),
                  _restore_prompt(directory, prompt_abstract))
    if abstract is None:
      checkpoints.check_shapes(params, prompted.abstract_params()[0], directory)
    return params

  records = loaded_model.checkpoint_vocabulary_bindings(directory)  # the run's own, else the base's
  return Source(prompted, base, directory if records else base, load, config)


def _restore_prompt(directory: str, abstract=None):
  """The prompt tree of an export, laid out as `abstract` asks (None: the first device)."""
  prompts, _ = load_prompt(directory)
  if abstract is None:
    return prompts
  checkpoints.check_shapes(prompts, abstract, f"The prompt in {directory}")
  return jax.tree.map(lambda x, a: jax.device_put(x.astype(a.dtype), a.sharding), prompts,
                      abstract)


def load(directory: str, base: Optional[str] = None, vocabulary=None):
  """A prompt export over its base (`base`, default the checkpoint prompt_tuning.json names) as
  a `LoadedModel`: generate(...) and score(...) read the learned prompt before every text. The
  same as `t5x_lite.load(directory)`."""
  from t5x_lite import loaded_model  # pylint: disable=g-import-not-at-top
  read_prompt_config(directory)  # refuses a directory that is not a prompt export
  return loaded_model.load(directory, vocabulary, base=base)


# ---------------------------------------------------------------------------- Hugging Face PEFT

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"


def export_peft(directory: str, out_dir: str, base: Optional[str] = None) -> str:
  """A PEFT prompt-tuning adapter (adapter_model.safetensors with `prompt_embeddings`,
  adapter_config.json: PROMPT_TUNING, CAUSAL_LM) of a prompt export, for its base exported to
  Hugging Face (tools/convert_checkpoint.py --to_hf); `peft.PeftModel.from_pretrained` loads it.

  PEFT puts its virtual tokens first, at positions 0 ... k-1, and the real tokens after them; a
  decoder here reads BOS (id 0) at position 0, then the prompt, then the text. So the virtual
  tokens written are BOS's token embedding followed by the prompt (k = length + 1): PEFT over
  the text's ids (without a BOS of its own) computes what the prompted model computes, positions
  included. Decoder-only bases only (see `_check_peft_base`)."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  from t5x_lite import models  # pylint: disable=g-import-not-at-top
  config = read_prompt_config(directory)
  model = models.from_gin(os.path.join(directory, checkpoints.MODEL_GIN))
  _check_peft_base(model)
  base = base or config.get("base")
  if not base or not os.path.isdir(os.path.join(base, checkpoints.PARAMS_DIR)):
    raise ValueError(f"{directory}/{PROMPT_JSON} names base {base!r}, which is not a params "
                     "checkpoint; give the base the prompt was trained on (--base DIR).")
  (path, prompt), = flat(load_prompt(directory)[0]).items()
  bos = _token_embedding_row(base, 0)
  if bos.shape != (prompt.shape[1],):
    raise ValueError(f"The prompt {path} in {directory} is {prompt.shape[1]} wide; the base {base} "
                     f"embeds tokens in {bos.shape[0]}. Give the base it was trained on (--base).")
  virtual = np.concatenate([bos[None], np.asarray(prompt, np.float32)])
  os.makedirs(out_dir, exist_ok=True)
  save_file({"prompt_embeddings": np.ascontiguousarray(virtual)},
            os.path.join(out_dir, PEFT_WEIGHTS), metadata={"format": "pt"})
  cfg = model.config
  peft_config = {
      "peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": len(virtual),
      "token_dim": cfg.d_model, "num_transformer_submodules": 1,
      "num_attention_heads": cfg.num_heads, "num_layers": cfg.num_layers,
      "prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None,
      "tokenizer_name_or_path": None, "tokenizer_kwargs": None, "inference_mode": True,
      "base_model_name_or_path": base, "revision": None, "modules_to_save": None,
      "auto_mapping": None}
  with open(os.path.join(out_dir, PEFT_CONFIG), "w") as f:
    json.dump(peft_config, f, indent=2, sort_keys=True)
  return out_dir


def _check_peft_base(model) -> None:
  """Refuses a base whose prompted computation PEFT would not reproduce, saying why."""
  from t5x_lite.interop.hf_families import family_of_config  # pylint: disable=g-import-not-at-top
  mismatch = model.causal_lm_mismatch()
  if mismatch:
    raise ValueError(
        f"PEFT export of a soft prompt is built for decoder-only bases (GPT-2, LLaMA) that "
        f"Hugging Face's causal decoder computes as we do; {mismatch}. Use the prompt with "
        "t5x_lite (t5x_lite.load, the infer and eval jobs), or export a prompt of a causal "
        "decoder base.")
  family_of_config(model.config)  # refuses a config no Hugging Face architecture holds


def _token_embedding_row(base: str, row: int) -> np.ndarray:
  """Row `row` of the base checkpoint's token embedding table, reading that table alone."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  metadata = flat(checkpoints.params_metadata(base))
  name = _table_path("", metadata)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  item = join({name: jax.ShapeDtypeStruct(metadata[name].shape, metadata[name].dtype,
                                          sharding=device)})
  restore = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding), item)
  with ocp.PyTreeCheckpointer() as checkpointer:
    tree = checkpointer.restore(
        os.path.join(os.path.abspath(base), checkpoints.PARAMS_DIR),
        args=ocp.args.PyTreeRestore(item=item, restore_args=restore, partial_restore=True))
  return np.asarray(flat(tree)[name][row], np.float32)
