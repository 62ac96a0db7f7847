"""The Sebulba loop end to end on loopback: rollouts carry behaviour log-probs that match the
policy, the loop survives the game server being killed and restarted, and PPO through the
bridge improves over the random policy (CI-sized)."""
import os
import time

import jax
import numpy as np
import pytest

from mbjax.agents import ppo
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
    # The stored log-probs are those of the executed actions under the behaviour policy
    # (version 0 = the learner's current parameters, no update yet).
    rollout, version = learner._get_rollout(learner.actors[0])
    assert version == 0 and rollout.reward.shape == (16, 2)
    dist, value = ppo.unroll(learner.network, learner.agent.params, rollout.carry[0]
                             if rollout.carry else (), ppo.prepare_obs(
                                 rollout.obs, learner.agent.obs_stats, True),
                             rollout.is_first, rollout.mask)
    np.testing.assert_allclose(dist.log_prob(rollout.action), rollout.log_prob, atol=1e-4)
    np.testing.assert_allclose(value, rollout.value, atol=1e-4)
    # V(s') of step t is V(s_{t+1}) wherever the episode went on.
    went_on = ~(rollout.terminated | rollout.truncated)[:-1]
    np.testing.assert_allclose(rollout.next_value[:-1][went_on], rollout.value[1:][went_on],
                               atol=1e-4)
    assert np.isfinite(learner.step()["loss/total"])
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


def test_ppo_through_the_bridge_beats_random():
  """The debug config (4 lock-step games, 50 updates) against the uniform random policy,
  both evaluated from fresh runs on the same reward (mbjax.bridge.shim)."""
  cfg = debug_config()
  server = launch.ServerProcess(4, base_port=0, restart_on_connect=True,
                                **sebulba.server_options(cfg))
  ports = server.start()
  learner = sebulba.Sebulba(cfg, ports)
  try:
    random_before = sebulba.evaluate(cfg, ports, None, 150, seed=0)
    learner.start()
    while learner.update_step < learner.num_updates:
      learner.step()
    learner.stop()
    trained = sebulba.evaluate(cfg, ports, learner.agent, 150)
    random_after = sebulba.evaluate(cfg, ports, None, 150, seed=1)
  finally:
    learner.stop()
    server.stop()
  random = (random_before["mean_reward"] + random_after["mean_reward"]) / 2
  print(f"trained {trained} random {random_before} {random_after}")
  assert trained["mean_reward"] > random + 0.02, (trained, random_before, random_after)
