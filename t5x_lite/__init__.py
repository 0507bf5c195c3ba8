"""t5x_lite: encoder-only, decoder-only and encoder-decoder transformers in JAX/Flax.

`t5x_lite.load(checkpoint_dir)` opens a params checkpoint for generation, scoring and
fill-in-the-mask (see t5x_lite/loaded_model.py). It is imported on first use, so that a plain
`import t5x_lite` stays cheap (no JAX, no TensorFlow).
"""

__version__ = "0.1.0"


def __getattr__(name):
  if name == "load":
    from t5x_lite.loaded_model import load  # pylint: disable=g-import-not-at-top
    return load
  raise AttributeError(f"module 't5x_lite' has no attribute {name!r}")
