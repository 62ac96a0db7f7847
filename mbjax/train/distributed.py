"""Multi-process (multi-host) setup through JAX's own distributed runtime.

`initialize` connects the processes of one run (`jax.distributed.initialize`): explicitly
from a coordinator address, process count and id, or — when none is given — from the
cluster environment JAX detects itself (SLURM, TPU VM pods). After it, `jax.devices()`
lists every process's devices, the training mesh spans all of them, and each process steps
the envs of its own devices. `host_value` reads a replicated global array on any process;
`is_primary` says which process writes logs, metrics and videos.
"""
from __future__ import annotations

import os

import jax
import numpy as np


def initialize(coordinator_address: str = "", num_processes: int = 0,
               process_id: int = -1) -> None:
  """Starts the distributed runtime when the run spans several processes; a no-op for a
  single process. On CPU, collectives between processes use gloo."""
  if num_processes > 1 or coordinator_address:
    if not (coordinator_address and num_processes > 1 and 0 <= process_id < num_processes):
      raise ValueError(
          "multi-process runs need --coordinator_address=HOST:PORT, --num_processes=N > 1 and "
          f"--process_id in [0, N); got {coordinator_address!r}, {num_processes}, {process_id}")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 or "TPU_WORKER_HOSTNAMES" in os.environ:
    jax.distributed.initialize()  # JAX reads the cluster's environment


def is_primary() -> bool:
  return jax.process_index() == 0


def host_value(x):
  """A replicated (possibly multi-process) array as numpy, read from a local shard."""
  return jax.tree.map(lambda a: np.asarray(a.addressable_data(0))
                      if isinstance(a, jax.Array) else np.asarray(a), x)
