"""Test harness: 8 simulated CPU devices, so every sharding path runs for real.

The flag must be set before jax is imported anywhere, which is why it lives here.
"""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# TensorFlow (used by seqio) must not grab the host's threads or any accelerator.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import jax  # noqa: E402

assert jax.device_count() == 8, "tests need 8 simulated devices; XLA_FLAGS was set too late"
