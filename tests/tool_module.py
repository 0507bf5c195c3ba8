"""Loads a script of tools/ as a module for its tests, as `python tools/<file>` would run it:
registered in sys.modules under `name` (dataclasses and pickling look a module up there), and
loaded once per test process."""
import importlib.util
import os
import sys

TOOLS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")


def load(filename: str, name: str | None = None):
  """The module of tools/`filename`, named `name` (default: the file's stem)."""
  name = name or os.path.splitext(filename)[0]
  if name not in sys.modules:
    spec = importlib.util.spec_from_file_location(name, os.path.join(TOOLS, filename))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
      spec.loader.exec_module(module)
    except BaseException:
      del sys.modules[name]
      raise
  return sys.modules[name]
