"""What LoRA (`t5x_lite.lora`) and quantization (`t5x_lite.quantization`) share: a model
wrapper whose every method runs the wrapped model inside a flax method interceptor, and the
test for the layer both intercept.

    class Adapted(InterceptedModel):
      RESERVED = ("base",)
      def __init__(self, model): self.base = model
      def _runner(self): return self.base
      def _context(self): return nn.intercept_methods(my_interceptor)

Flax runs the interceptors of nested `intercept_methods` outermost first, so a wrapper whose
context enters another's (LoRA over a quantized base) sees each call before it does.
"""
from __future__ import annotations

import functools
import inspect

from t5x_lite import layers


def is_dense_call(context) -> bool:
  """Whether an interceptor's `context` is a `layers.DenseGeneral` being called."""
  return isinstance(context.module, layers.DenseGeneral) and context.method_name == "__call__"


class InterceptedModel:
  """Every method of `self._runner()` runs inside `self._context()` (scoring, decoding, init,
  ...); attributes that are not methods are the runner's own. Subclasses name their own
  attributes in RESERVED (looked up before they are set, they must not reach the runner)."""

  RESERVED: tuple[str, ...] = ()

  def _runner(self):
    raise NotImplementedError

  def _context(self):
    raise NotImplementedError

  def __getattr__(self, name):
    if name.startswith("__") or name in self.RESERVED:
      raise AttributeError(name)
    value = getattr(self._runner(), name)
    if not inspect.ismethod(value):
      return value

    @functools.wraps(value)
    def intercepted(*args, **kwargs):
      with self._context():
        return value(*args, **kwargs)
    return intercepted
