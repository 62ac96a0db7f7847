"""Test-wide setup: 4 simulated CPU devices, the XLA flag that avoids a jaxlib deadlock, and
XLA's CPU backend at optimisation level 0.

Level 0 because compiling, not running, is most of the suite's time: it cut the apex step's
compile from 23 s to 13 s at the same run time (0.14 s), and `make test` from 1,222 s to
948 s on the 2-core CPU (2026-11-27). Benchmarks and the binaries' own runs keep XLA's
default; the tests that launch binaries pass level 0 to them too.

The flags must be in the environment before jax is imported, so they are set here, at
conftest import time. Tests that want one device say so (`cfg.run.num_devices = 1`).
"""
import os

NUM_CPU_DEVICES = 4
XLA_FLAGS = (f"--xla_force_host_platform_device_count={NUM_CPU_DEVICES} "
             "--xla_cpu_enable_concurrency_optimized_scheduler=false "
             "--xla_backend_optimization_level=0")
os.environ["XLA_FLAGS"] = XLA_FLAGS + " " + os.environ.get("XLA_FLAGS", "")

import jax  # noqa: E402

jax.config.update("jax_platforms", "cpu")


def pytest_collection_modifyitems(config, items):
  """Files holding `slow` tests run first. `make test` hands whole files to two xdist
  workers in collection order, so a slow file collected last (alphabetically,
  test_train_binary.py is) runs alone at the end while the other worker idles. Within a
  file the order is kept (stable sort)."""
  del config
  slow_files = {item.path for item in items if item.get_closest_marker("slow")}
  items.sort(key=lambda item: item.path not in slow_files)
