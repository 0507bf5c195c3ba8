"""Test harness: 8 simulated CPU devices, so every sharding path runs for real.

The flag must be set before jax is imported anywhere, which is why it lives here.
"""
import os

# Test models are tiny, so compiling dominates: LLVM's optimisations of the generated CPU code
# (XLA's own graph passes and fusions still run) cost more than they save here.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# TensorFlow (used by seqio) must not grab the host's threads or any accelerator.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import jax  # noqa: E402

assert jax.device_count() == 8, "tests need 8 simulated devices; XLA_FLAGS was set too late"

import gin  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _no_gin_bindings():
  """Models, tasks and jobs are gin-configurable: bindings one test leaves behind (e.g. through
  `models.from_gin`) must not reach the next test run by the same xdist worker."""
  gin.clear_config()
  yield
  gin.clear_config()
