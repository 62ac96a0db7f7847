"""Multi-process training through `jax.distributed`: 2 local processes × 2 CPU devices each
(gloo collectives) against 1 process × 4 devices, same global batch.

Each env's randomness is keyed by its global index and the mesh order is the same, so the
runs differ only in how cross-device sums are ordered: after 2 updates the parameters agree
to rtol 1e-5 / atol 1e-6.
"""
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import SingleDeviceSharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = ["--config=configs/cartpole_ppo.py:debug", "--config.total_env_steps=256",
         "--config.run.log_every_updates=1", "--config.run.checkpoint_every_updates=1"]


def _env(devices):
  return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=(
      "--xla_cpu_enable_concurrency_optimized_scheduler=false "
      "--xla_backend_optimization_level=0 "  # faster compiles, as in conftest.py
      f"--xla_force_host_platform_device_count={devices}"))


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _agent(workdir, like=None):
  """The agent's arrays at update 2, on this process's first device (`like` gives shapes:
  a checkpoint from other devices needs an explicit target)."""
  target = None if like is None else jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                     sharding=SingleDeviceSharding(jax.devices()[0])), like)
  with ocp.CheckpointManager(os.path.join(workdir, "checkpoints"),
                             item_names=("state",)) as manager:
    state = manager.restore(2, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
  return state["state"]


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_devices(tmp_path):
  single = tmp_path / "single"
  subprocess.run([sys.executable, "-m", "experiments.train", *FLAGS, f"--workdir={single}"],
                 cwd=ROOT, env=_env(4), check=True, capture_output=True, timeout=600)
  multi = tmp_path / "multi"
  address = f"127.0.0.1:{_free_port()}"
  processes = [subprocess.Popen(
      [sys.executable, "-m", "experiments.train", *FLAGS, f"--workdir={multi}",
       f"--coordinator_address={address}", "--num_processes=2", f"--process_id={i}"],
      cwd=ROOT, env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  outputs = [p.communicate(timeout=600)[0] for p in processes]
  assert [p.returncode for p in processes] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
  assert "checkpoints:" in outputs[0] and "checkpoints:" not in outputs[1]  # process 0 reports
  single_state = _agent(single)
  expected = ocp.tree.to_flat_dict(single_state["agent"])
  actual = ocp.tree.to_flat_dict(_agent(multi, like=single_state)["agent"])
  assert expected.keys() == actual.keys()
  for key in expected:
    np.testing.assert_allclose(actual[key], expected[key], rtol=1e-5, atol=1e-6,
                               err_msg=str(key))
