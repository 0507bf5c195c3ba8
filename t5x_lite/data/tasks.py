"""Registered seqio tasks and mixtures (importing this module registers them).

Corpus tasks, one per objective (features in parentheses, default model family after the arrow):
  <corpus>_clm              (targets)                    -> decoder
  <corpus>_prefix_lm        (inputs, targets)            -> decoder (PrefixLM) or encoder_decoder
  <corpus>_span_corruption  (inputs, targets)            -> encoder_decoder
  <corpus>_mlm              (inputs, targets, mlm_weights) -> encoder
for three corpora:
  stdlib  Python's standard library sources, present everywhere (`stdlib_corpus` gin knobs).
  local   your files: `local_corpus.pattern = %LOCAL_CORPUS_PATTERN` in gin.
  tfds    a TFDS dataset prepared in a local data_dir: `tfds_corpus.name/.data_dir/.text_key`.
Text-to-text tasks (inputs, targets -> encoder_decoder or decoder PrefixLM), with metrics:
  code_to_docstring  (ROUGE-1/2/L, exact match), addition (exact match).
Mixtures:
  stdlib_span_corruption_prefix_lm, local_span_corruption_prefix_lm  80% / 20%
  code_to_docstring_and_addition                                   50% / 50%
Mixtures by size: `register_mixture(name, tasks, by="examples"|"tokens", temperature, maximum)`.

All tasks use `vocabularies.DEFAULT_VOCABULARY`, i.e. whatever `get_vocabulary` is bound to in gin.
Call `register_corpus_tasks` to add the four objectives over any other source.
"""
from __future__ import annotations

import functools
from typing import Mapping, Optional, Sequence

import seqio

from t5x_lite.data import finetune_tasks
from t5x_lite.data import mixing
from t5x_lite.data import preprocessors
from t5x_lite.data import sources
from t5x_lite.data import vocabularies

VOCAB = vocabularies.DEFAULT_VOCABULARY

LM_FEATURES = {"targets": seqio.Feature(VOCAB, add_eos=False)}
SEQ2SEQ_FEATURES = {
    "inputs": seqio.Feature(VOCAB, add_eos=True),
    "targets": seqio.Feature(VOCAB, add_eos=True),
}
MLM_FEATURES = {
    **SEQ2SEQ_FEATURES,
    # 1 + "token chosen for the MLM loss"; read by MLMFeatureConverter, not a token sequence.
    "mlm_weights": seqio.Feature(seqio.PassThroughVocabulary(3), add_eos=False, required=False),
}

OBJECTIVE_FEATURES = {
    "clm": LM_FEATURES,
    "prefix_lm": SEQ2SEQ_FEATURES,
    "span_corruption": SEQ2SEQ_FEATURES,
    "mlm": MLM_FEATURES,
}

# Model families each task/mixture fits, default first (see feature_converters.CONVERTERS).
OBJECTIVE_FAMILIES = {
    "clm": ("decoder",),
    "prefix_lm": ("decoder", "encoder_decoder"),
    "span_corruption": ("encoder_decoder",),
    "mlm": ("encoder",),
}
MODEL_FAMILIES: dict[str, tuple[str, ...]] = {}


def _add_task(name, families, **kwargs) -> str:
  if name in seqio.TaskRegistry.names():  # re-registering replaces: handy in notebooks and tests
    seqio.TaskRegistry.remove(name)
  seqio.TaskRegistry.add(name, **kwargs)
  MODEL_FAMILIES[name] = families
  return name


def _add_mixture(name, tasks_and_rates, families) -> str:
  if name in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.remove(name)
  # Sampling as seqio's default, with each example tagged by its task (the realised mix).
  seqio.MixtureRegistry.add(name, tasks_and_rates, sample_fn=mixing.tagged_sample_fn)
  MODEL_FAMILIES[name] = families
  return name


def register_mixture(name: str, task_names: Sequence[str], by: str = "examples",
                     temperature: float = 1.0, maximum: Optional[float] = None,
                     families: Optional[Sequence[str]] = None,
                     sizes: Optional[Mapping[str, float]] = None) -> str:
  """Registers a mixture of `task_names` whose rates follow their sizes: rate_i ∝
  min(n_i, maximum) ** (1 / temperature), n_i the task's number of `by` ("examples" or
  "tokens") in its train split, counted once when the mixture is first read (or given as
  `sizes`). T=1 mixes in proportion to size; larger T flattens towards uniform (mT5: 3.33).

      register_mixture("my_mix", ["local_clm", "stdlib_clm"], by="tokens", temperature=2.0,
                       maximum=2 ** 30)
  """
  unknown = [t for t in task_names if t not in seqio.TaskRegistry.names()]
  if unknown:
    raise ValueError(f"register_mixture({name!r}): no task named {unknown}; register them first.")
  if by not in mixing.SIZE_KINDS or not temperature > 0:
    raise ValueError(f"register_mixture({name!r}): by={by!r} must be one of "
                     f"{mixing.SIZE_KINDS} and temperature={temperature!r} > 0.")
  rates = functools.lru_cache(maxsize=1)(lambda: mixing.size_rates(
      task_names, by, temperature, maximum, sizes=sizes))
  families = families or MODEL_FAMILIES.get(task_names[0], ())
  # A rate is a function of the task, evaluated when the mixture is read: no counting at import.
  return _add_mixture(name, [(t, lambda task: rates()[task.name]) for t in task_names],
                      tuple(families))


def register_corpus_tasks(prefix: str, source: seqio.DataSource,
                          objectives=tuple(OBJECTIVE_FEATURES), **objective_kwargs) -> list[str]:
  """Registers `<prefix>_<objective>` for each objective over `source` ({"text"} examples).

  `objective_kwargs` maps an objective to its hyper-parameters, e.g.
  span_corruption={"noise_density": 0.3}.
  """
  names = []
  for obj in objectives:
    names.append(_add_task(
        f"{prefix}_{obj}", OBJECTIVE_FAMILIES[obj], source=source,
        output_features=OBJECTIVE_FEATURES[obj],
        preprocessors=[preprocessors.objective(obj, **objective_kwargs.get(obj, {}))]))
  return names


# ------------------------------------------------------------------------------ corpora

STDLIB_TASKS = register_corpus_tasks("stdlib", sources.TextFileSource(sources.stdlib_corpus))
LOCAL_TASKS = register_corpus_tasks("local", sources.TextFileSource(sources.local_corpus))
TFDS_TASKS = register_corpus_tasks("tfds", sources.TfdsTextSource(sources.tfds_corpus))

# ------------------------------------------------------------------------------ text-to-text

_TEXT_TO_TEXT = dict(output_features=SEQ2SEQ_FEATURES,
                     postprocess_fn=finetune_tasks.postprocess_text)

_add_task(
    "code_to_docstring", ("encoder_decoder", "decoder"),
    source=finetune_tasks.CodeToDocstringSource(),
    preprocessors=[
        lambda ds: preprocessors.text_to_text(ds, "docstring: ", "code", "docstring"),
        preprocessors.tokenize_and_append_eos,
    ],
    metric_fns=[finetune_tasks.rouge, finetune_tasks.exact_match], **_TEXT_TO_TEXT)

_add_task(
    "addition", ("encoder_decoder", "decoder"),
    source=finetune_tasks.AdditionSource(),
    preprocessors=[
        lambda ds: preprocessors.text_to_text(ds, "add: ", "question", "answer"),
        preprocessors.tokenize_and_append_eos,
    ],
    metric_fns=[finetune_tasks.exact_match], **_TEXT_TO_TEXT)

# ------------------------------------------------------------------------------ mixtures

_add_mixture("stdlib_span_corruption_prefix_lm",
             [("stdlib_span_corruption", 0.8), ("stdlib_prefix_lm", 0.2)], ("encoder_decoder",))
_add_mixture("local_span_corruption_prefix_lm",
             [("local_span_corruption", 0.8), ("local_prefix_lm", 0.2)], ("encoder_decoder",))
_add_mixture("code_to_docstring_and_addition",
             [("code_to_docstring", 0.5), ("addition", 0.5)], ("encoder_decoder", "decoder"))

