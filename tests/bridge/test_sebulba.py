"""The Sebulba loop end to end on loopback: rollouts carry behaviour log-probs that match the
policy, the loop survives the game server being killed and restarted (learner on 2 devices),
and PPO through the bridge improves over the random policy (CI-sized, learner on all 4
simulated devices). The learner's data-parallel update equals the one-device update on the
same rollout.
"""
import functools
import json
import logging
import re
import time

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import bridge_ppo
from mbjax.agents import ppo
from mbjax.bridge import launch, shim
from mbjax.envs.spaces import HybridAction
from mbjax.train import run as run_lib
from mbjax.train import sebulba, sebulba_actor, sharding


def debug_config(**overrides):
  cfg = bridge_ppo.get_config("debug")
  for key, value in overrides.items():
    section, _, field = key.rpartition(".")
    (cfg[section] if section else cfg)[field] = value
  return cfg


@pytest.mark.slow
def test_server_killed_and_restarted_mid_run():
  cfg = debug_config(num_envs=2, **{"ppo.num_steps": 16, "ppo.num_minibatches": 2,
                                    "bridge.step_timeout": 0.5,
                                    "bridge.reconnect_timeout": 60.0, "run.num_devices": 2})
  server = launch.ServerProcess(2, base_port=0, **sebulba_actor.server_options(cfg))
  ports = server.start()
  learner = sebulba.Sebulba(cfg, ports)
  assert learner.mesh.size == 2
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
    # Connected throughout before the kill. (A game starved for more than the 0.5 s step
    # timeout on a loaded machine counts as a fault without a disconnect: seen once at load
    # average 13, so faults are not required to be 0 here.)
    assert before["bridge/disconnects"] == 0
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


@pytest.mark.slow
def test_ppo_through_the_bridge_beats_random(tmp_path, caplog):
  """The debug config's 4 lock-step games, trained for 150 updates by the binary's driver
  (`sebulba.run`: a run workdir with config.json, read back by `restore_trained` as the
  evaluation and recording tools do), against the uniform
  random policy, both evaluated from fresh runs on the same reward (mbjax.bridge.shim), by
  the return per game over up to 200 steps (the per-step mean reward, used before, favours
  a policy that dies early: in one run the trained policy survived 732 of 800 steps and
  random 454–497 at nearly the same per-step mean).

  Each policy is scored over three rounds of fresh runs (12 games): one round of 4 is too
  noisy. Three rounds each of one trained policy, measured 2026-11-27, gave 24.2, 24.1,
  20.8 / 20.1, 22.3, 16.4 / 18.6, 19.4, 25.8 against random rounds of 9.3–11.4; beside a
  busy process on the other core (as in CI), three training seeds gave means of 18.2,
  19.4 and 15.1 against random rounds of 5.5–11.4. One CI run's single round gave 14.2
  against random 11.0, below the 1.3× that this test asks of the means."""
  caplog.set_level(logging.INFO)
  cfg = debug_config(total_env_steps=4 * 32 * 150)
  sebulba.run(cfg, str(tmp_path))
  # Lock-step servers have no wall clock: the line gives the age since the bytes arrived.
  assert re.search(r"update 150/150 .* obs age p99 [0-9.]+ ms since received", caplog.text)
  policy, state = run_lib.restore_trained(str(tmp_path))
  assert policy.cfg.to_dict() == json.loads((tmp_path / "config.json").read_text())
  assert policy.cfg.bridge.enabled and int(state.update_step) == 150
  agent = jax.device_get(state.agent)
  with sebulba_actor.launched_servers(cfg, 4) as ports:
    random_before = sebulba_actor.evaluate(cfg, ports, None, 200, seed=0)
    trained = [sebulba_actor.evaluate(cfg, ports, agent, 200) for _ in range(3)]
    random_after = [sebulba_actor.evaluate(cfg, ports, None, 200, seed=s) for s in (1, 2)]
  # What experiments/record_arena.py records of it: a frame, reward and action per step.
  with sebulba_actor.launched_servers(cfg, 1, frame_hz=cfg.bridge.update_hz,
                                      frame_format="raw", pixel_size=32) as ports:
    episode = sebulba_actor.evaluate(cfg, ports, agent, 20, record=True)
  steps = len(episode["rewards"])
  assert 0 < steps <= 20 and episode["frames"].shape == (steps, 32, 32, 3)
  assert episode["actions_discrete"].shape == (steps, 1)
  random = np.mean([r["mean_return"] for r in [random_before, *random_after]])
  trained_return = np.mean([t["mean_return"] for t in trained])
  print(f"trained {trained} random {random_before} {random_after}")
  assert trained_return > 1.3 * random, (trained, random_before, random_after)


def _synthetic_rollout(rng, num_steps, num_envs, obs_size):
  """A rollout [T, E] of random observations, actions, behaviour log-probs, values and
  rewards with the shapes and dtypes the actors record."""
  shape = (num_steps, num_envs)
  f32 = lambda *extra: rng.normal(size=shape + extra).astype(np.float32)
  done = rng.random(shape) < 0.05
  return ppo.Rollout(
      obs=f32(obs_size), is_first=rng.random(shape) < 0.05, carry=(),
      mask=np.ones(shape + (shim.MENU_BRANCH,), bool),
      action=HybridAction(f32(2), rng.integers(0, shim.MENU_BRANCH, shape + (1,),
                                               dtype=np.int32)),
      log_prob=f32() * 0.3 - 3.0, value=f32(), reward=f32(), terminated=done,
      truncated=np.zeros(shape, bool), next_value=f32())


def test_learner_update_on_four_devices_equals_one_device():
  """The same rollout and key through the learner's update on 4 devices (one game each, the
  default mesh here) and on 1: the devices average loss, advantage and observation
  statistics, so the updates agree up to float reduction order — measured max |Δθ| = 6e-8
  after the 16 Adam steps of one update; the tolerance, 1e-5, is far below the update
  itself (> 1e-3)."""
  cfg = debug_config()  # 4 games, 32 steps, 4 epochs × 4 minibatches
  learner = sebulba.Sebulba(cfg, list(range(cfg.num_envs)))  # no actor started: no sockets
  assert learner.mesh.size == 4
  one_device = sharding.make_mesh(1)
  updates = {4: (learner._update, learner.mesh),
             1: (sebulba.make_learner_update(cfg, learner.network, learner.optimizer,
                                             one_device), one_device)}
  rollout = _synthetic_rollout(np.random.default_rng(5), cfg.ppo.num_steps, cfg.num_envs,
                               learner.obs_shape[0])
  start = jax.device_get(learner.agent)
  results = {}
  for n, (update, mesh) in updates.items():
    placed = jax.device_put(rollout, NamedSharding(mesh, P(None, sharding.DATA_AXIS)))
    assert {s.data.shape[1] for s in placed.reward.addressable_shards} == {4 // n}
    agent = jax.device_put(start, NamedSharding(mesh, P()))
    results[n] = jax.device_get(update(agent, placed, jax.random.PRNGKey(6)))
  (one, one_metrics), (four, four_metrics) = results[1], results[4]
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=0, atol=1e-5),
               one.params, four.params)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6),
               one.obs_stats, four.obs_stats)
  for name in ("loss/total", "policy/approx_kl", "value/target_mean"):
    np.testing.assert_allclose(one_metrics[name], four_metrics[name], rtol=1e-4, atol=1e-6,
                               err_msg=name)
  moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), start.params, one.params)
  assert max(jax.tree.leaves(moved)) > 1e-3
  # Placements that cannot work are named.
  with pytest.raises(ValueError, match=r"num_envs=4 \(games\) must be divisible by the 3"):
    sebulba.Sebulba(cfg, list(range(4)), mesh=sharding.make_mesh(3))
  with pytest.raises(ValueError, match=r"config.run.actor_device=4: expected -1"):
    sebulba_actor.actor_device(4)


def test_learner_update_skips_non_finite_rollouts_and_names_the_input():
  """The learner's update keeps the agent when the rollout holds an Inf observation or a
  NaN reward (one game's, one step's) and flags which; a sound rollout updates it."""
  cfg = debug_config(num_envs=2)
  network = ppo.make_network(cfg.network, sebulba_actor.ACTION_SPEC)
  optimizer = ppo.make_optimizer(cfg.ppo, 10)
  mesh = sharding.make_mesh(1)
  update = sebulba.make_learner_update(cfg, network, optimizer, mesh)
  obs_size = shim.observation_size(cfg.bridge.num_obs_enemies)
  start = ppo.init(jax.random.PRNGKey(0), network, optimizer, (obs_size,), np.float32)
  sound = _synthetic_rollout(np.random.default_rng(1), cfg.ppo.num_steps, 2, obs_size)
  faults = {"obs": sound._replace(obs=sound.obs.copy()),
            "reward": sound._replace(reward=sound.reward.copy())}
  faults["obs"].obs[3, 1, 0] = np.inf
  faults["reward"].reward[5, 0] = np.nan
  for name, rollout in {"sound": sound, **faults}.items():
    agent, metrics = jax.device_get(update(start, rollout, jax.random.PRNGKey(2)))
    flags = {c: metrics[f"nonfinite/{c}"] for c in ("obs", "reward", "loss", "grads")}
    if name == "sound":
      assert metrics["nonfinite/skipped"] == 0 and not any(flags.values())
      assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(agent.params),
                                                          jax.tree.leaves(start.params)))
    else:
      assert metrics["nonfinite/skipped"] == 1 and flags[name] == 1, (name, flags)
      assert flags["obs" if name == "reward" else "reward"] == 0
      jax.tree.map(np.testing.assert_array_equal, agent, jax.device_get(start))
