"""TensorFlow's start-up lines are dropped at import, libtpu's when JAX starts its backends;
anything else written meanwhile stays."""
import os
import subprocess
import sys

from t5x_lite import quiet_start


def test_only_the_known_start_up_lines_are_dropped(capfd):
  with quiet_start._stderr_filtered(quiet_start.NOISE):
    os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are written "
                b"to STDERR\nI0000 00:00:1796.1 15130 cudart_stub.cc:31] Could not find cuda "
                b"drivers on your machine, GPU will not be used.\n")
    os.write(2, b"E0000 cuda_platform.cc:52] failed call to cuInit: UNKNOWN ERROR (303)\n")
    os.write(2, b"E0000 some_kernel.cc:1] a real error\n")
  assert capfd.readouterr().err == "E0000 some_kernel.cc:1] a real error\n"


def test_tensorflow_sees_no_gpu():
  tf = quiet_start.import_tensorflow()
  assert tf.config.get_visible_devices("GPU") == []


def test_the_first_int32_transpose_says_nothing():
  """Packing transposes int32 tensors; on CPUs without AVX-512 the first one logs oneDNN's
  fall-back to Eigen, once per process (a fresh one here: this one has TF imported already)."""
  code = ("from t5x_lite.quiet_start import import_tensorflow\n"
          "tf = import_tensorflow()\n"
          "print(tf.function(lambda x: tf.transpose(x))(tf.ones([2, 3], tf.int32)).shape)\n")
  env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                        timeout=300, check=True)
  assert done.stdout == "(3, 2)\n"
  assert "oneDNN" not in done.stderr, done.stderr


def test_jax_starts_without_libtpu_lines():
  """With libtpu installed (the test extra installs it) on a host that is no TPU VM, JAX's start
  writes libtpu's host-discovery errors; `start_jax` drops them (a fresh process, no
  JAX_PLATFORMS, as a user's shell has)."""
  code = ("from t5x_lite import quiet_start\n"
          "quiet_start.start_jax()\n"
          "import jax\n"
          "print(jax.devices()[0].platform)\n")
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                        timeout=300, check=True)
  assert done.stdout == "cpu\n"
  assert not quiet_start.LIBTPU_NOISE.search(done.stderr), done.stderr
  assert "TPU" not in done.stderr, done.stderr
