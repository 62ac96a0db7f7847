"""Test-wide setup: 4 simulated CPU devices and the XLA flag that avoids a jaxlib deadlock.

Both flags must be in the environment before jax is imported, so they are set here, at
conftest import time. Tests that want one device say so (`cfg.run.num_devices = 1`).
"""
import os

NUM_CPU_DEVICES = 4
XLA_FLAGS = (f"--xla_force_host_platform_device_count={NUM_CPU_DEVICES} "
             "--xla_cpu_enable_concurrency_optimized_scheduler=false")
os.environ["XLA_FLAGS"] = XLA_FLAGS + " " + os.environ.get("XLA_FLAGS", "")

import jax  # noqa: E402

jax.config.update("jax_platforms", "cpu")
