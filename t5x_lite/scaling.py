"""Scaling laws: what a model config costs and what a compute budget should buy.

Costs of one config: parameters (total, embedding, non-embedding), training FLOPs per step and
per token (the model's own `flops_per_step`, the same count as the trainer's MFU) and the
per-device memory of a train step (the trainer's own estimate).

Planning (Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models"): for a budget
of C training FLOPs, the compute-optimal parameters N and tokens D under
  - approaches 1 and 2: about 20 tokens per parameter, N = sqrt(C / (6 * 20));
  - approach 3's fitted law L(N, D) = E + A / N^alpha + B / D^beta, minimised under C = 6 N D
    in closed form (their equation 4);
  - the same law refitted by Besiroglu et al. 2024 ("Chinchilla Scaling: A replication attempt").
A planned N becomes a concrete shape of a preset's architecture and the gin flags that train it.

Fitting: `fit_law` fits L(N, D) to measured (N, D, loss) points with Hoffmann et al.'s objective
(Huber loss on log L through a log-sum-exp, L-BFGS from a grid of starts), so a sweep of small
runs yields our own exponents and compute-optimal tokens per parameter.

N counts every parameter, as Hoffmann et al. do (their appendix F). The published laws predict
the loss of their MassiveText runs and tokenizer: use them for the shape of the trade-off, not for
the loss value of another corpus or vocabulary.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np

from t5x_lite import costs
from t5x_lite.config import TransformerConfig

# Parameter tables that look tokens or positions up, and the output projection onto the
# vocabulary: what "non-embedding" parameters leave out (Kaplan et al. 2020).
EMBEDDING_PARAM_NAMES = ("token_embed", "position_embedding", "token_type_embedding",
                         "rel_embedding", "lm_head", "mlm_bias")


# ---------------------------------------------------------------------------- parameters

@dataclasses.dataclass(frozen=True)
class ParamCounts:
  total: int
  embedding: int
  # An MoE model's parameters one token uses (None: all); not read from a parameter tree.
  active_params: Optional[int] = dataclasses.field(default=None, compare=False)

  @property
  def non_embedding(self) -> int:
    return self.total - self.embedding

  @property
  def active(self) -> int:
    """Parameters each token passes through: all of them in a dense model, the router and
    chosen experts (not all experts) in an MoE model."""
    return self.total if self.active_params is None else self.active_params

  def as_dict(self) -> dict:
    return {"total": self.total, "embedding": self.embedding,
            "non_embedding": self.non_embedding, "active": self.active}


def count_params(cfg: TransformerConfig) -> ParamCounts:
  """Parameters of a model of this config, counted from its shape without building it (the
  model's `analytic_param_counts`; tests check it against the real parameter trees)."""
  from t5x_lite import models  # pylint: disable=g-import-not-at-top
  model = models.MODEL_CLASSES[cfg.family](cfg)
  total, embedding = model.analytic_param_counts()
  return ParamCounts(total, embedding, model.analytic_param_counts(active=True)[0])


def tree_param_counts(model) -> ParamCounts:
  """The same split, read from the model's real (abstract) parameter tree by name."""
  import jax  # pylint: disable=g-import-not-at-top
  shapes, _ = model.abstract_params(model.dummy_batch(1, {"inputs": 8, "targets": 8}))
  total = embedding = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
    names = [str(getattr(key, "key", key)) for key in path]
    total += leaf.size
    if any(name in EMBEDDING_PARAM_NAMES for name in names):
      embedding += leaf.size
  return ParamCounts(total=total, embedding=embedding)


# ---------------------------------------------------------------------------- FLOPs and memory

def batch_shapes(model, batch_size: int, lengths: Mapping[str, int]) -> dict[str, tuple]:
  """Global shape of every feature of a train batch (what `Trainer` is built with)."""
  return {name: (batch_size,) + tuple(x.shape[1:])
          for name, x in model.dummy_batch(1, lengths).items()}


tokens_per_step = costs.tokens_per_step


def flops_per_step(model, shapes: Mapping[str, Sequence[int]]) -> float:
  """Model FLOPs of one training step (forward + backward), as the trainer counts them for MFU."""
  return float(model.flops_per_step(shapes))


def estimate_memory(trainer) -> dict[str, float]:
  """Bytes per device of a train step: the estimate the train job checks against the device's
  memory before compiling (state, gradients, activations, total), with the state split into its
  parameters and optimizer state."""
  import jax  # pylint: disable=g-import-not-at-top
  def shard_bytes(tree):
    return sum(float(np.prod(x.sharding.shard_shape(x.shape))) * np.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(tree))
  state = trainer.abstract_state
  return {"params": shard_bytes(state.params), "optimizer_state": shard_bytes(state.opt_state),
          **trainer.estimate_memory()}


def compile_train_step(trainer):
  """The trainer's train step compiled for its batch shapes and shardings (allocates nothing)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from t5x_lite import trainer as trainer_lib  # pylint: disable=g-import-not-at-top
  abstract = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
  batch = {k: jax.ShapeDtypeStruct(v, jnp.int32, sharding=trainer.batch_shardings[k])
           for k, v in trainer.batch_shapes.items()}
  # The step takes the state with its trainable parameters, the frozen ones, the batch and the
  # frozen trees, as `Trainer.train_step` passes them.
  trainable, frozen = trainer_lib.partition(trainer.abstract_state.params, trainer.mask)
  state = trainer.abstract_state.replace(params=trainable)
  trees = jax.tree.map(abstract, trainer.frozen_trees)
  return trainer._train_step.lower(state, frozen, batch, trees).compile()  # pylint: disable=protected-access


def xla_memory(compiled) -> dict[str, float]:
  """XLA's own accounting of a compiled step, per device: its arguments, outputs (less those
  aliasing donated arguments), and temporaries; `total` is their sum, the peak it plans for."""
  stats = compiled.memory_analysis()
  stats = stats[0] if isinstance(stats, (list, tuple)) else stats
  out = {"arguments": float(stats.argument_size_in_bytes),
         "outputs": float(stats.output_size_in_bytes - stats.alias_size_in_bytes),
         "temporaries": float(stats.temp_size_in_bytes)}
  out["total"] = sum(out.values())
  return out


# ---------------------------------------------------------------------------- laws

@dataclasses.dataclass(frozen=True)
class Law:
  """L(N, D) = E + A / N^alpha + B / D^beta, with N parameters and D training tokens."""
  name: str
  E: float
  A: float
  B: float
  alpha: float
  beta: float

  def loss(self, params, tokens):
    return self.E + self.A / np.power(params, self.alpha) + self.B / np.power(tokens, self.beta)

  def optimum(self, flops: float) -> tuple[float, float]:
    """(N, D) minimising the loss under C = 6 N D (Hoffmann et al. 2022, equation 4)."""
    _check_positive("flops", flops)
    g = (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / (self.alpha + self.beta))
    params = g * (flops / 6.0) ** (self.beta / (self.alpha + self.beta))
    return params, flops / 6.0 / params

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


# Approach 3 as printed in the paper's body (section 3.3 / equation 10).
HOFFMANN = Law("hoffmann2022", E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)
# Besiroglu, Erdil, Barnett and You 2024 (arXiv:2404.10102), refit of approach 3 on data
# reconstructed from Hoffmann et al.'s figure 4. These digits were checked against several
# independent restatements of that paper's table (with its standard errors), not against the
# paper's own PDF, which was not at hand.
BESIROGLU = Law("besiroglu2024", E=1.8172, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658)
LAWS = {law.name: law for law in (HOFFMANN, BESIROGLU)}
TOKENS_PER_PARAM = 20.0  # Hoffmann et al.'s approaches 1 and 2 (their table 3)


@dataclasses.dataclass(frozen=True)
class FlopsPerToken:
  """Training FLOPs per token as a power of the parameter count, k N^p. Kaplan et al. and
  Hoffmann et al. use 6 N; small models also pay for attention and their output head, so a
  sweep fits k and p to its own sizes."""
  k: float
  p: float

  def __call__(self, params):
    return self.k * np.power(params, self.p)

  @classmethod
  def fit(cls, params: Sequence[float], flops_per_token: Sequence[float]) -> "FlopsPerToken":
    p, log_k = np.polyfit(np.log(params), np.log(flops_per_token), 1)
    return cls(k=float(np.exp(log_k)), p=float(p))


SIX_N = FlopsPerToken(k=6.0, p=1.0)


def constrained_optimum(law: Law, flops: float, cost: FlopsPerToken = SIX_N
                        ) -> tuple[float, float]:
  """(N, D) minimising `law` under flops = cost(N) * D, found numerically (equals
  `law.optimum` for the 6 N cost)."""
  from scipy import optimize  # pylint: disable=g-import-not-at-top
  _check_positive("flops", flops)
  loss = lambda log_n: float(law.loss(np.exp(log_n), flops / cost(np.exp(log_n))))
  result = optimize.minimize_scalar(loss, bounds=(0.0, math.log(flops)), method="bounded",
                                    options={"xatol": 1e-10})
  params = math.exp(result.x)
  return params, flops / float(cost(params))


def _check_positive(name: str, value: float) -> None:
  if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
    raise ValueError(f"{name} must be a positive finite number, got {value!r}.")


def fixed_ratio_optimum(flops: float, tokens_per_param: float = TOKENS_PER_PARAM
                        ) -> tuple[float, float]:
  """(N, D) with D = r N and C = 6 N D."""
  _check_positive("flops", flops)
  params = math.sqrt(flops / (6.0 * tokens_per_param))
  return params, tokens_per_param * params


def chip_flops(chip: str) -> float:
  """Dense bf16 peak FLOP/s of one chip, by a unique part of its name (e.g. v5p, h100)."""
  from t5x_lite import trainer  # pylint: disable=g-import-not-at-top
  known = trainer.KNOWN_PEAK_FLOPS
  matches = [name for name in known if chip.lower() in name.lower()]
  if len(matches) != 1:
    raise ValueError(f"--chip {chip!r} matches {matches or 'none'} of the known chips "
                     f"{sorted(known)}; give a unique part of one name, or --flops directly.")
  return known[matches[0]]


def budget_flops(chip_hours: float, chip: str, mfu: float) -> float:
  """Training FLOPs that `chip_hours` of `chip` deliver at model FLOPs utilisation `mfu`."""
  _check_positive("chip_hours", chip_hours)
  if not 0 < mfu <= 1:
    raise ValueError(f"--mfu is a fraction of the chip's peak in (0, 1], got {mfu}.")
  return chip_hours * 3600.0 * chip_flops(chip) * mfu


def plan(flops: float, laws: Iterable[Law] = (HOFFMANN, BESIROGLU)) -> list[dict]:
  """One compute-optimal (N, D) per method, with the loss its law predicts. The 20 tokens/param
  row has no law of its own; its loss is the refit's, the law consistent with that ratio."""
  rows = []
  params, tokens = fixed_ratio_optimum(flops)
  rows.append({"method": f"{TOKENS_PER_PARAM:g} tokens/param", "params": params,
               "tokens": tokens, "loss": float(BESIROGLU.loss(params, tokens))})
  for law in laws:
    params, tokens = law.optimum(flops)
    rows.append({"method": law.name, "params": params, "tokens": tokens,
                 "loss": float(law.loss(params, tokens))})
  for row in rows:
    row["tokens_per_param"] = row["tokens"] / row["params"]
  return rows


# ---------------------------------------------------------------------------- shapes

def scaled_config(base: TransformerConfig, d_model: int, num_layers: int) -> TransformerConfig:
  """`base`'s architecture at another width and depth: same head width, query/key-value head
  ratio and d_ff / d_model ratio (d_ff rounded to a multiple of 64)."""
  head_dim = base.resolved_head_dim
  if d_model % head_dim:
    raise ValueError(f"d_model={d_model} is not a multiple of the head width {head_dim}.")
  heads = d_model // head_dim
  group = base.num_heads // base.resolved_num_kv_heads
  kv_heads = None if base.num_kv_heads is None else max(1, heads // group)
  while kv_heads is not None and heads % kv_heads:
    kv_heads -= 1
  d_ff = max(64, int(round(base.d_ff / base.d_model * d_model / 64)) * 64)
  decoder_layers = None if base.num_decoder_layers is None else num_layers
  return base.replace(d_model=d_model, num_heads=heads, num_kv_heads=kv_heads, d_ff=d_ff,
                      num_layers=num_layers, num_decoder_layers=decoder_layers,
                      head_dim=base.head_dim)


def _widths_and_depths(base: TransformerConfig, max_d_model: int):
  """(d_model, depths, ideal depth) of `base`'s architecture: widths in whole key/value head
  groups; depths from half to twice the one that keeps `base`'s width / depth ratio."""
  group = base.num_heads // base.resolved_num_kv_heads
  step = base.resolved_head_dim * group
  aspect = base.d_model / base.num_layers  # an encoder-decoder keeps both stacks this deep
  for d_model in range(step, max_d_model + 1, step):
    depth = d_model / aspect
    yield d_model, range(max(1, math.floor(depth / 2)), max(1, math.ceil(depth * 2)) + 1), depth


def nearest_shape(base: TransformerConfig, params: float, max_d_model: int = 65536
                  ) -> TransformerConfig:
  """The shape of `base`'s architecture whose parameter count is nearest `params` (in ratio);
  among those within 1% of the nearest, the one closest to `base`'s width / depth ratio."""
  _check_positive("params", params)
  scored = []
  for d_model, depths, ideal in _widths_and_depths(base, max_d_model):
    counts = []
    for layers in depths:
      config = scaled_config(base, d_model, layers)
      counts.append(count_params(config).total)
      scored.append((abs(math.log(counts[-1] / params)), abs(math.log(layers / ideal)), config))
    if min(counts) > 2 * params:  # wider shapes only grow
      break
  nearest = min(error for error, _, _ in scored)
  return min((s for s in scored if s[0] <= nearest + 0.01), key=lambda s: s[1])[2]


def shape_dict(cfg: TransformerConfig) -> dict:
  out = {"num_layers": cfg.num_layers, "d_model": cfg.d_model, "num_heads": cfg.num_heads,
         "d_ff": cfg.d_ff}
  if cfg.num_kv_heads is not None:
    out["num_kv_heads"] = cfg.num_kv_heads
  if cfg.num_decoder_layers is not None:
    out["num_decoder_layers"] = cfg.num_decoder_layers
  return out


def gin_flags(cfg: TransformerConfig, tokens: float, batch_size: int, row_tokens: int
              ) -> list[str]:
  """Flags that train `cfg` on at least `tokens` tokens in batches of `batch_size` rows of
  `row_tokens` tokens each."""
  steps = max(1, math.ceil(tokens / (batch_size * row_tokens)))
  flags = [f"--gin.TransformerConfig.{k}={v}" for k, v in shape_dict(cfg).items()]
  return flags + [f"--gin.TRAIN_STEPS={steps}", f"--gin.BATCH_SIZE={batch_size}"]


# ---------------------------------------------------------------------------- fitting

# Hoffmann et al.'s grid of starting points (appendix D.2): exponents, log E, log A, log B.
HOFFMANN_GRID = {"alpha": np.arange(0.0, 2.01, 0.5), "beta": np.arange(0.0, 2.01, 0.5),
                 "e": np.arange(-1.0, 1.01, 0.5), "a": np.arange(0.0, 25.1, 5.0),
                 "b": np.arange(0.0, 25.1, 5.0)}


def _huber(r: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
  """Huber loss of residuals and its derivative."""
  small = np.abs(r) <= delta
  value = np.where(small, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta))
  return value, np.where(small, r, delta * np.sign(r))


def _objective(theta, log_n, log_d, log_loss, delta):
  """Sum (not mean: see Besiroglu et al.) of Huber(LSE(a - alpha log N, b - beta log D, e) -
  log L) over the runs, and its gradient in (a, b, e, alpha, beta)."""
  a, b, e, alpha, beta = theta
  terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
  top = terms.max(axis=0)
  weights = np.exp(terms - top)
  total = weights.sum(axis=0)
  value, slope = _huber(top + np.log(total) - log_loss, delta)
  w = weights / total * slope
  grad = np.array([w[0].sum(), w[1].sum(), w[2].sum(), -(w[0] * log_n).sum(),
                   -(w[1] * log_d).sum()])
  return value.sum(), grad


def fit_law(params: Sequence[float], tokens: Sequence[float], losses: Sequence[float],
            delta: float = 1e-3, grid: Optional[Mapping[str, Sequence[float]]] = None,
            starts: int = 32, name: str = "fit") -> Law:
  """L(N, D) fitted as Hoffmann et al. fit approach 3, Huber objective on log L (`delta` theirs)
  from their grid of starting points (`grid`). L-BFGS runs from the `starts` grid points with
  the lowest objective rather than from every grid point: on synthetic data both reach the same
  optimum, and the full grid takes far longer."""
  from scipy import optimize  # pylint: disable=g-import-not-at-top
  log_n, log_d, log_loss = (np.log(np.asarray(x, dtype=np.float64))
                            for x in (params, tokens, losses))
  if not len(log_n) == len(log_d) == len(log_loss) or len(log_n) < 5:
    raise ValueError(f"fit_law needs at least 5 (params, tokens, loss) points of equal count, got "
                     f"{len(log_n)}, {len(log_d)}, {len(log_loss)}; run a larger sweep.")
  grid = grid or HOFFMANN_GRID
  points = [np.array([a, b, e, alpha, beta]) for alpha, beta, e, a, b in itertools.product(
      grid["alpha"], grid["beta"], grid["e"], grid["a"], grid["b"])]
  data = (log_n, log_d, log_loss, delta)
  points.sort(key=lambda theta: _objective(theta, *data)[0])
  best = None
  for theta in points[:starts]:
    result = optimize.minimize(_objective, theta, jac=True, args=data, method="L-BFGS-B",
                               options={"gtol": 1e-12, "ftol": 1e-15, "maxiter": 2000})
    if best is None or result.fun < best.fun:
      best = result
  a, b, e, alpha, beta = best.x
  return Law(name, E=float(np.exp(e)), A=float(np.exp(a)), B=float(np.exp(b)),
             alpha=float(alpha), beta=float(beta))


def isoflop_minimum(params: Sequence[float], losses: Sequence[float]) -> float:
  """Approach 2: the parameter count at the vertex of a parabola in log N through one
  IsoFLOP curve's losses (needs 3 or more sizes)."""
  if len(params) < 3:
    raise ValueError(f"An IsoFLOP curve needs 3 or more model sizes to locate its minimum, got "
                     f"{len(params)}; give the sweep more --sizes.")
  c2, c1, _ = np.polyfit(np.log(params), losses, 2)
  if c2 <= 0:
    return float("nan")  # no valley: the budget's minimum lies outside the sizes tried
  return float(np.exp(-c1 / (2 * c2)))
