"""Elapsed time through the Sebulba loop: the actor's Δt from game timestamps (hand-checked,
clipping and malformed times included), fed to a CfC policy and stored in the rollout, and
the learner's update unrolling the rollout with that Δt. The games are in-process stand-ins
for the bridge client with a scripted clock: no sockets, no servers.
"""
import queue
import threading

import jax
import numpy as np

from configs import bridge_ppo
from mbjax.agents import ppo
from mbjax.bridge import client as client_lib
from mbjax.bridge import codec, shim
from mbjax.train import sebulba, sebulba_actor, sharding


def test_elapsed_steps_by_hand():
  """Nominal step 0.25 s. Per game: a first step (1 whatever the times), 0.5 s (2), no time
  (0), 3 s (12, clipped to 10), a clock that went back, NaN and Inf times, an Inf previous
  time (each malformed: 1), and a first step after a clock reset (1, not malformed)."""
  previous = [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, np.inf, 5.0]
  now = [0.5, 1.5, 1.0, 4.0, 0.5, np.nan, np.inf, 1.0, 3.0]
  is_first = [True, False, False, False, False, False, False, False, True]
  dt, malformed = sebulba_actor.elapsed_steps(previous, now, is_first, 0.25)
  assert dt.dtype == np.float32
  np.testing.assert_array_equal(dt, [1, 2, 0, 10, 1, 1, 1, 1, 1])
  np.testing.assert_array_equal(malformed, [0, 0, 0, 0, 1, 1, 1, 1, 0])
  dt, _ = sebulba_actor.elapsed_steps(previous, now, is_first, 0.25, max_steps=4.0)
  np.testing.assert_array_equal(dt, [1, 2, 0, 4, 1, 1, 1, 1, 1])


class _ScriptedGame:
  """Stands in for a `BonkLinkClient`: every read answers with the next state, stamped with
  the next of `times` (then one 0.25 s step each), the player moving along x."""

  def __init__(self, times):
    self.times, self.index = list(times), 0
    self.counters = client_lib.Counters(connects=1)
    self.connected = True

  def read(self, timeout):
    if timeout == 0.0:  # the actor's drain for a newer state: there is none
      return None
    extra = self.index - len(self.times) + 1
    t = self.times[-1] + 0.25 * extra if extra > 0 else self.times[self.index]
    x = 0.5 * self.index
    self.index += 1
    state = codec.GameState((x, 0.0, 1.0), (1.0, 0.0, 0.0), 100.0, 100.0, t, True, False,
                            (codec.Enemy((x + 3.0, 0.0, 2.0), 10.0),), "Gameplay", ())
    return client_lib.Observation(state, self.index, 0.0, None, -1, None)

  def send(self, action):
    del action
    return True

  def close(self):
    pass


def test_cfc_actor_feeds_game_time_and_learner_unrolls_with_it():
  """A real-time game at 4 Hz (nominal step 0.25 s) whose states are stamped 10, 10.25,
  10.75, 10.75, 10.5, 14, 14.125, 14.375 s: the actor's first rollout carries Δt = 1 (first
  step), 1, 2, 0, 1 (clock went back: counted), 10 (14 clipped), 0.5, 1, and its values and
  log-probs are those of the CfC stepped by hand with these Δt. The learner's update on
  that rollout at the behaviour parameters sees ratio 1 (approx. KL 0); the same rollout
  with Δt = 1 does not."""
  cfg = bridge_ppo.get_config("debug")
  cfg.num_envs = 1
  cfg.network.core, cfg.network.core_size, cfg.network.hidden_sizes = "cfc", 16, (16,)
  cfg.ppo.num_steps, cfg.ppo.seq_len = 8, 8
  cfg.ppo.num_minibatches, cfg.ppo.update_epochs = 1, 1
  cfg.bridge.server_mode, cfg.bridge.update_hz = "realtime", 4.0
  network = ppo.make_network(cfg.network, sebulba_actor.ACTION_SPEC)
  optimizer = ppo.make_optimizer(cfg.ppo, 1)
  obs_size = shim.observation_size(cfg.bridge.num_obs_enemies)
  agent = ppo.init(jax.random.PRNGKey(3), network, optimizer, (obs_size,), np.float32)
  # Policy heads at 100× their 0.01-scaled init, so that Δt moves log-probs visibly.
  scaled = ("mean_head", "logit_heads")
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: x * 100.0 if any(s in jax.tree_util.keystr(path) for s in scaled) else x,
      agent.params)
  agent = ppo.PPOState(params, optimizer.init(params), agent.obs_stats)

  cpu = jax.devices("cpu")[0]
  stop = threading.Event()
  actor = sebulba_actor.Actor(0, [0], cfg, network,
                              sebulba_actor.make_act_fn(network, cfg.ppo.normalize_observations),
                              sebulba_actor.PublishedParams(agent, cpu), queue.Queue(maxsize=1),
                              stop, None)
  actor.clients = [_ScriptedGame([10.0, 10.25, 10.75, 10.75, 10.5, 14.0, 14.125, 14.375])]
  actor.start()
  try:
    rollout, version = actor.rollouts.get(timeout=120)
  finally:
    stop.set()
    actor.join(timeout=30)
  assert actor.error is None and version == 0
  expected_dt = np.array([1, 1, 2, 0, 1, 10, 0.5, 1], np.float32)
  rollout = jax.device_get(rollout)
  np.testing.assert_array_equal(rollout.dt[:, 0], expected_dt)
  assert actor.stats.bad_dt == 1
  assert rollout.is_first[:, 0].tolist() == [True] + [False] * 7

  # The CfC stepped by hand over the rollout, with its Δt and with Δt = 1.
  values, log_probs = {}, {}
  for name, dts in (("timed", expected_dt), ("unit", np.ones(8, np.float32))):
    carry = network.initial_carry(1)
    values[name], log_probs[name] = [], []
    for t in range(8):
      obs = ppo.prepare_obs(rollout.obs[t], agent.obs_stats, True)
      carry, dist, value = network.apply(agent.params, carry, obs, rollout.is_first[t],
                                         rollout.mask[t], dts[t:t + 1])
      action = jax.tree.map(lambda x, t=t: x[t], rollout.action)
      values[name].append(float(value[0]))
      log_probs[name].append(float(dist.log_prob(action)[0]))
  np.testing.assert_allclose(rollout.value[:, 0], values["timed"], atol=1e-5)
  np.testing.assert_allclose(rollout.log_prob[:, 0], log_probs["timed"], rtol=1e-5, atol=1e-4)
  assert np.abs(np.subtract(values["timed"], values["unit"])).max() > 1e-2
  # V(s') of each step is V of the next observation, with the next step's Δt.
  np.testing.assert_allclose(rollout.next_value[:-1, 0], rollout.value[1:, 0], atol=1e-5)

  update = sebulba.make_learner_update(cfg, network, optimizer, sharding.make_mesh(1))
  kl = {}
  for name, dt in (("timed", rollout.dt), ("unit", np.ones_like(rollout.dt))):
    _, metrics = jax.device_get(update(agent, rollout._replace(dt=dt), jax.random.PRNGKey(4)))
    kl[name] = float(metrics["policy/approx_kl"])
  assert kl["timed"] < 1e-8 and kl["unit"] > 1e-4, kl
