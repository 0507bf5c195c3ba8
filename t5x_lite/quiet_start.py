"""TensorFlow is only our input pipeline (tf.data under seqio): import it quietly, off the GPUs.

    from t5x_lite.quiet_tf import import_tensorflow
    tf = import_tensorflow()

Importing TensorFlow prints start-up lines from its C++ libraries that look like failures on a
machine without CUDA ("Could not find cuda drivers", "failed call to cuInit", absl's
"All log messages before absl::InitializeLog()"), plus notices such as oneDNN's and TF-TRT's.
Several of them come from absl logging, which TF_CPP_MIN_LOG_LEVEL does not reach, and they are
written straight to file descriptor 2 while the libraries load. So the import runs with fd 2
captured: the known start-up lines are dropped and anything else is written back to stderr, so a
real problem still shows. TF_CPP_MIN_LOG_LEVEL defaults to 2 (TF's C++ errors only) for what it
logs later; set it to 0 to see everything. oneDNN stays as TensorFlow configures it
(TF_ENABLE_ONEDNN_OPTS is not touched): only its notice is dropped.

JAX owns the accelerators: TensorFlow is told to see no GPU, as T5X does, or it would reserve
GPU memory as soon as it builds a dataset.

libtpu (the `tpu` and `test` extras install it, for ahead-of-time TPU compiles on any machine)
is started by JAX with its other backends. On a host that is not a TPU VM it cannot find the
TPU metadata and says so in error-looking lines ("could not determine TPU accelerator type",
"unexpected worker hostname"), then JAX goes on with the CPU (or GPU). `start_jax` starts the
backends with those lines filtered, the same way; on a TPU VM they are not written at all.
"""
from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile

# Start-up lines of TensorFlow 2.16-2.21 on CPU-only and GPU machines (none says anything about
# our job).
NOISE = re.compile(
    r"All log messages before absl::InitializeLog\(\) is called"
    r"|cudart_stub\.cc.*Could not find cuda drivers"
    r"|failed call to cuInit"
    r"|oneDNN custom operations are on"
    r"|TF_ENABLE_ONEDNN_OPTS=0"
    r"|TF-TRT Warning"
    r"|Unable to register cu(DNN|FFT|BLAS) factory"
    r"|computation_placer\.cc.*already registered"
    r"|This TensorFlow binary is optimized to use available CPU instructions"
    r"|To enable the following instructions.*rebuild TensorFlow"
    r"|oneDNN supports DT_INT32 only on platforms with AVX-512")


@contextlib.contextmanager
def _stderr_filtered(noise: re.Pattern):
  """Captures file descriptor 2 (C++ and Python writes alike); on exit writes back the lines
  that do not match `noise`."""
  try:
    saved = os.dup(2)
  except OSError:  # no usable fd 2 (e.g. closed): nothing to filter
    yield
    return
  with tempfile.TemporaryFile() as capture:
    sys.stderr.flush()
    os.dup2(capture.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      capture.seek(0)
      kept = [line for line in capture.read().decode("utf-8", "replace").splitlines(True)
              if not noise.search(line)]
      if kept:
        sys.stderr.write("".join(kept))
        sys.stderr.flush()


# libtpu 0.0.4x's lines when JAX starts it on a host without TPU metadata.
LIBTPU_NOISE = re.compile(
    r"Failed to find host bounds for accelerator type"
    r"|could not determine TPU (accelerator type|worker hostnames)"
    r"|Logging before InitGoogle\(\) is written to STDERR"
    r"|unexpected worker hostname"
    r"|=== Source Location Trace: ==="
    r"|libtpu_init_utils\.cc"
    r"|Unable to initialize backend 'tpu'")


def start_jax() -> None:
  """Starts JAX's backends (what the first `jax.devices()` would do) with libtpu's
  host-discovery lines dropped; anything else written meanwhile stays."""
  import jax  # pylint: disable=g-import-not-at-top
  with _stderr_filtered(LIBTPU_NOISE):
    jax.devices()


def import_tensorflow():
  """TensorFlow, imported without its start-up lines and with every GPU hidden from it."""
  first = "tensorflow" not in sys.modules
  if first:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  with _stderr_filtered(NOISE) if first else contextlib.nullcontext():
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    try:
      # Listing the GPUs initialises CUDA (the cuInit line on a machine without a driver).
      tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TF devices were already initialised by someone else: leave them
      pass
    if first:
      _say_the_int32_notice_now(tf)
  return tf


def _say_the_int32_notice_now(tf) -> None:
  """On CPUs without AVX-512, the first int32 transpose a graph runs (packing does) logs, at
  error level and once per process, that oneDNN falls back to Eigen for it: harmless, and it
  would be the only TF line in a job's output. Running one here says it inside the filter."""
  tf.function(tf.transpose)(tf.constant([[0, 1]], tf.int32))
