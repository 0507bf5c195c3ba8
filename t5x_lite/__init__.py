"""t5x_lite: encoder-only, decoder-only and encoder-decoder transformers in JAX/Flax."""

__version__ = "0.1.0"
