"""The actor side of the Sebulba loop (`mbjax.train.sebulba`): threads that step external
games through the BonkLink bridge with the learner's newest policy and hand it rollouts, and
evaluation episodes with a fixed policy on launched reference servers. Everything that talks
to a game's socket lives here.

Actors. Each actor thread owns a slice of the games (one `BonkLinkClient` each) and a
device-resident replay (`mbjax.data.replay`) whose items are whole steps of its games (a
`ppo.Rollout` with leaves [G, ...]). Per step it runs one jitted policy call for all its
games, sends the *sampled* actions (the executed ones: nothing overrides them, unlike
upstream, where menu heuristics replaced the policy's action and broke the PPO ratio), and
reads each game's newest state (drain-to-newest, bounded by `bridge.step_timeout`).
A transition is written to the replay one step later, when the bootstrap value V(s') of the
observation that followed it is known; every `ppo.num_steps` transitions the actor hands
`replay.latest(T)` — a time-major rollout with the behaviour log-probs — to the learner.

Elapsed time. With a core that takes it (CfC, `mbjax.nets.cores.takes_dt`) the actor feeds
each step's Δt — the game time (`gameTime`) since the previous observation of the same game,
in nominal steps (`nominal_step_seconds`: one game tick in real time, `ticks_per_action`
ticks in lock-step, so lock-step games always give 1) — to the policy and stores it in the
rollout (`Rollout.dt`), so the learner's unroll sees the Δt the actor acted on. Δt is 1 on
an episode's first step and clipped to [0, `MAX_DT`]; see `elapsed_steps`. `gameTime` is the
game's clock rather than the receive time, so network and drain delays do not enter Δt; it is
f32 seconds, whose resolution is under 1 ms (6 % of a 60 Hz tick) for the first 4.5 hours
of the game's clock and 8 ms from 18 hours on.

Episodes end on death (`terminated`), on the game's own end of run or the actor's
`bridge.max_episode_steps` (`truncated`: bootstrapped), and on a bridge fault (a timeout or a
reconnect to a restarted game: `truncated`, and the next observation starts a new episode).
After a run ends the actor clicks through the game-over screen.

Devices. Actors run their jitted policy on `run.actor_device` (`actor_device`); how that
sits beside the learner's devices: `mbjax.train.sebulba`, "Devices".

Metrics (`ActorStats`, merged over actors by the learner): the observation age at the actor
(time from the game stamping a state to the policy using it; `gameTime` is wall-clock seconds
since `bridge.clock_epoch` for servers launched by `sebulba.run`), the age since its bytes
arrived, episodes, bridge faults and malformed Δt.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import queue
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from mbjax.agents import ppo
from mbjax.bridge import client as client_lib
from mbjax.bridge import launch, shim
from mbjax.data import replay
from mbjax.envs.spaces import HybridAction, HybridActionSpec
from mbjax.nets import cores

ACTION_SPEC = HybridActionSpec(continuous_dim=2, branches=(shim.MENU_BRANCH,))
# Longest Δt in nominal steps: a longer gap (a stall, a long pause) is fed as this, not as a
# time the network never saw in training.
MAX_DT = 10.0


class BridgeError(RuntimeError):
  """A game stayed unreachable past `bridge.reconnect_timeout`."""



class PublishedParams:
  """The learner's newest parameters; a single reference swap, read without locks."""

  def __init__(self, agent: ppo.PPOState, device):
    self.device = device
    self.value = (0, jax.device_put((agent.params, agent.obs_stats), device))

  def publish(self, version: int, agent: ppo.PPOState) -> None:
    self.value = (version, jax.device_put((agent.params, agent.obs_stats), self.device))


@dataclasses.dataclass
class ActorStats:
  steps: int = 0
  episodes: list = dataclasses.field(default_factory=list)  # (return, length, terminated)
  ages_ms: list = dataclasses.field(default_factory=list)  # state stamped → used by policy
  receive_ages_ms: list = dataclasses.field(default_factory=list)  # bytes read → used
  faults: int = 0
  bad_dt: int = 0  # steps whose elapsed game time was non-finite or negative (fed as 1)

  def drain(self) -> "ActorStats":
    out = ActorStats(self.steps, self.episodes, self.ages_ms, self.receive_ages_ms,
                     self.faults, self.bad_dt)
    self.steps, self.episodes, self.ages_ms, self.receive_ages_ms = 0, [], [], []
    self.faults = self.bad_dt = 0
    return out



def actor_device(index: int):
  """The device actors run their policy on: -1 the host CPU, k `jax.devices()[k]`."""
  if index == -1:
    return jax.devices("cpu")[0]
  devices = jax.devices()
  if not 0 <= index < len(devices):
    raise ValueError(f"config.run.actor_device={index}: expected -1 (host CPU) or an index "
                     f"into the {len(devices)} devices {devices}")
  return devices[index]


def nominal_step_seconds(bridge) -> float:
  """Game seconds one actor step lasts at the nominal rate: `ticks_per_action` ticks in
  lock-step, one tick (`1 / update_hz`) in real time."""
  ticks = bridge.ticks_per_action if bridge.server_mode == "lockstep" else 1
  return ticks / bridge.update_hz


def elapsed_steps(previous_time, time_now, is_first, step_seconds: float,
                  max_steps: float = MAX_DT) -> tuple[np.ndarray, np.ndarray]:
  """Each game's Δt in nominal steps, `(time_now − previous_time) / step_seconds` (times in
  seconds, [G]), 1 where `is_first`, clipped to [0, `max_steps`]. Returns (dt f32[G],
  malformed bool[G]): a non-finite or negative elapsed time (a clock that jumped back, a
  bad timestamp) is malformed and fed as 1, never as NaN."""
  is_first = np.asarray(is_first, bool)
  with np.errstate(invalid="ignore", over="ignore"):
    steps = (np.asarray(time_now, np.float64) - np.asarray(previous_time, np.float64)
             ) / step_seconds
  malformed = ~is_first & ~(np.isfinite(steps) & (steps >= 0))
  dt = np.where(is_first | malformed, 1.0, np.minimum(np.nan_to_num(steps), max_steps))
  return dt.astype(np.float32), malformed


def make_act_fn(network, normalize: bool):
  """The jitted actor policy: sample, log-prob, value, and V of the previous step's s'.
  `dt` and `final_dt` (f32[G], the elapsed time before `obs` and `final_obs`) are None for
  cores that take no elapsed time."""

  @jax.jit
  def act(params, obs_stats, carry, obs, is_first, mask, dt, final_obs, final_dt, key):
    final_value = network.apply(params, carry, ppo.prepare_obs(final_obs, obs_stats, normalize),
                                jnp.zeros_like(is_first), final_dt, method=network.value)
    new_carry, dist, value = network.apply(
        params, carry, ppo.prepare_obs(obs, obs_stats, normalize), is_first, mask, dt)
    action = dist.sample(key)
    return new_carry, action, dist.log_prob(action), value, final_value

  return act


class Actor(threading.Thread):
  """Steps `ports`' games with the published policy; puts rollouts on `rollouts`."""

  def __init__(self, index: int, ports: list[int], cfg, network, act_fn,
               published: PublishedParams, rollouts: queue.Queue, stop: threading.Event,
               clock_epoch: float | None):
    super().__init__(name=f"sebulba-actor-{index}", daemon=True)
    self.index, self.ports, self.cfg = index, list(ports), cfg
    self.network, self.act_fn, self.published = network, act_fn, published
    self.rollouts, self.stop_event, self.clock_epoch = rollouts, stop, clock_epoch
    self.stats = ActorStats()
    self.error: BaseException | None = None
    b = cfg.bridge
    self.clients = [client_lib.BonkLinkClient(b.host, p, connect_timeout=b.step_timeout,
                                              decode_frames=False) for p in ports]
    self.observe = functools.partial(shim.observation, arena_size=b.arena_size,
                                     num_enemies=b.num_obs_enemies)
    self.capture = (b.pixel_size, b.pixel_size)
    self.timed = cores.takes_dt(network.core)
    self.step_seconds = nominal_step_seconds(b)

  def run(self) -> None:
    try:
      self._loop()
    except BaseException as e:  # surfaced by the learner, which stops everything
      self.error = e
      self.stop_event.set()
    finally:
      for c in self.clients:
        c.close()

  # -- game control -----------------------------------------------------------------------

  def _wait_playing(self, g: int):
    """Blocks (bounded) until game g is connected and in a run; returns (state, received)."""
    b, c = self.cfg.bridge, self.clients[g]
    deadline = time.monotonic() + b.reconnect_timeout
    while not self.stop_event.is_set():
      if time.monotonic() > deadline:
        raise BridgeError(f"game at {b.host}:{self.ports[g]} unreachable or not playing for "
                          f"{b.reconnect_timeout} s (counters: {c.counters})")
      o = c.read(0.2)
      if o is not None and o.state.is_playing:
        return o
      if c.connected:  # game-over screen: click; lock-step game: any action yields a state
        c.send(shim.restart_action() if o is not None else shim.to_action(np.zeros(2), 3,
                                                                            self.capture))
    raise BridgeError("stopped")

  def _loop(self) -> None:
    cfg, b = self.cfg, self.cfg.bridge
    num_games, num_steps = len(self.ports), cfg.ppo.num_steps
    capacity = max(b.replay_capacity, num_steps)
    observations = [self._wait_playing(g) for g in range(num_games)]
    states = [o.state for o in observations]
    obs = np.stack([self.observe(s) for s in states])
    mask = np.stack([shim.menu_mask(s) for s in states])
    final_obs = obs.copy()
    is_first = np.ones(num_games, bool)
    # Game time of each game's current observation; Δt before it and before final_obs.
    times = np.array([s.game_time for s in states], np.float64)
    dt, final_dt = np.ones(num_games, np.float32), np.ones(num_games, np.float32)
    carry = self.network.initial_carry(num_games)
    key = jax.random.PRNGKey(cfg.seed * 7919 + self.index)
    ep_return, ep_length = np.zeros(num_games), np.zeros(num_games, np.int64)
    buffer, pending, written, rollout_version, pending_version = None, None, 0, 0, 0
    while not self.stop_event.is_set():
      version, (params, obs_stats) = self.published.value
      key, act_key = jax.random.split(key)
      now = time.monotonic()
      for o in observations:
        self.stats.receive_ages_ms.append((now - o.received_at) * 1e3)
        if self.clock_epoch is not None:
          self.stats.ages_ms.append((now - self.clock_epoch - o.state.game_time) * 1e3)
      new_carry, action, log_prob, value, final_value = jax.device_get(self.act_fn(
          params, obs_stats, carry, obs, is_first, mask, dt if self.timed else None,
          final_obs, final_dt if self.timed else None, act_key))

      if pending is not None:
        pending = pending._replace(next_value=final_value)
        if buffer is None:
          buffer = replay.init(jax.tree.map(jnp.asarray, pending), capacity)
        # numpy adds the time axis: eager jnp indexing here cost more than the policy.
        buffer = replay.add_jit(buffer, jax.tree.map(lambda x: np.asarray(x)[None], pending))
        written += 1
        if written % num_steps == 1 or num_steps == 1:
          rollout_version = pending_version  # the oldest policy version in this rollout
        if written % num_steps == 0:
          self._put((replay.latest(buffer, num_steps), rollout_version))

      move = np.tanh(action.continuous) if self.network.squash == "tanh" else np.clip(
          action.continuous, -1.0, 1.0)
      for g, c in enumerate(self.clients):
        c.send(shim.to_action(move[g], int(action.discrete[g, 0]), self.capture))

      reward = np.zeros(num_games, np.float32)
      terminated, truncated = np.zeros(num_games, bool), np.zeros(num_games, bool)
      next_first = np.zeros(num_games, bool)
      faulted, arrived_at = np.zeros(num_games, bool), np.full(num_games, np.nan)
      # Wait until every game has answered, then take each game's newest state: games read
      # early would otherwise hand the policy states aged by the wait for the later ones.
      connects = [c.counters.connects for c in self.clients]
      fresh = [c.read(b.step_timeout) for c in self.clients]
      for g, c in enumerate(self.clients):
        o = fresh[g]
        newer = c.read(0.0) if o is not None else None
        o = newer if newer is not None else o
        if o is None or c.counters.connects != connects[g]:
          # Bridge fault (stall, or the game restarted): cut the episode, bootstrap from
          # the last observation, and start afresh once the game plays again.
          self.stats.faults += 1
          truncated[g], next_first[g], faulted[g] = True, True, True
          final_obs[g] = obs[g]
          observations[g] = self._wait_playing(g)
        else:
          arrived_at[g] = o.state.game_time
          reward[g] = shim.reward(states[g], o.state, distance_weight=b.distance_reward,
                                  arena_size=b.arena_size)
          ended, dead = shim.episode_end(o.state)
          final_obs[g] = self.observe(o.state)
          ep_length[g] += 1
          if ended or ep_length[g] >= b.max_episode_steps:
            terminated[g], truncated[g], next_first[g] = dead, not dead, True
            observations[g] = self._wait_playing(g) if ended else o
          else:
            observations[g] = o
        ep_return[g] += reward[g]
        if next_first[g]:
          self.stats.episodes.append((float(ep_return[g]), int(ep_length[g]),
                                      bool(terminated[g])))
          ep_return[g], ep_length[g] = 0.0, 0
      self.stats.steps += num_games
      # Δt to the state that followed the action (1 after a fault: there is none); it is
      # also the next step's Δt unless that step starts an episode.
      step_dt, malformed = elapsed_steps(times, arrived_at, faulted, self.step_seconds)
      self.stats.bad_dt += int(malformed.sum())

      pending_version = version
      pending = ppo.Rollout(
          obs=obs, is_first=is_first, carry=carry, mask=mask,
          action=HybridAction(action.continuous, action.discrete), log_prob=log_prob,
          value=value, reward=reward, terminated=terminated, truncated=truncated,
          next_value=np.zeros(num_games, np.float32), dt=dt if self.timed else None)
      states = [o.state for o in observations]
      times = np.array([s.game_time for s in states], np.float64)
      obs = np.stack([self.observe(s) for s in states])
      mask = np.stack([shim.menu_mask(s) for s in states])
      final_obs = np.where(next_first[:, None], final_obs, obs)
      final_dt, dt = step_dt, np.where(next_first, np.float32(1.0), step_dt)
      is_first, carry = next_first, new_carry

  def _put(self, rollout) -> None:
    while not self.stop_event.is_set():
      try:
        self.rollouts.put(rollout, timeout=0.1)
        return
      except queue.Full:
        continue



def evaluate(cfg, ports: list[int], agent: ppo.PPOState | None, num_steps: int,
             seed: int = 0, record: bool = False) -> dict:
  """Plays every game for `num_steps` steps (or until its run ends) from a fresh run with the
  policy's mode action (`agent`) or, with `agent=None`, uniform random actions and a random
  allowed menu choice; returns the mean per-step reward, the mean return per game (a run
  that ends early stops adding to it) and how many runs ended in death. With `record`, also
  the first game's "frames" (uint8[T, H, W, 3]; the servers must attach one to every state,
  as lock-step servers with `frame_hz > 0` do), "rewards" (f32[T]) and "actions".

  Needs servers started with `restart_on_connect=True` (the connection starts the run), and
  no actor connected to them."""
  b = cfg.bridge
  network = ppo.make_network(cfg.network, ACTION_SPEC)
  observe = functools.partial(shim.observation, arena_size=b.arena_size,
                              num_enemies=b.num_obs_enemies)
  rng = np.random.default_rng(seed)
  clients = [client_lib.BonkLinkClient(b.host, p, decode_frames=record and g == 0)
             for g, p in enumerate(ports)]
  episode = {"frames": [], "rewards": [], "move": [], "choice": []}
  if agent is not None:
    @jax.jit
    def mode(params, obs_stats, obs, mask):
      _, dist, _ = network.apply(params, network.initial_carry(obs.shape[0]),
                                 ppo.prepare_obs(obs, obs_stats, cfg.ppo.normalize_observations),
                                 jnp.ones(obs.shape[:1], bool), mask)
      return dist.mode()
  try:
    states = []
    for c in clients:
      o = c.read(b.reconnect_timeout)
      if o is None:
        raise BridgeError(f"no state from {c.address} within {b.reconnect_timeout} s")
      states.append(o.state)
    alive = np.ones(len(clients), bool)
    total, steps, deaths = 0.0, 0, 0
    for _ in range(num_steps):
      obs = np.stack([observe(s) for s in states])
      mask = np.stack([shim.menu_mask(s) for s in states])
      if agent is None:
        move = rng.uniform(-1, 1, (len(clients), 2))
        choice = [int(rng.choice(np.nonzero(m)[0])) for m in mask]
      else:
        action = jax.device_get(mode(agent.params, agent.obs_stats, obs, mask))
        move = np.clip(np.tanh(action.continuous) if network.squash == "tanh"
                       else action.continuous, -1, 1)
        choice = action.discrete[:, 0]
      for g in np.nonzero(alive)[0]:
        clients[g].send(shim.to_action(move[g], int(choice[g]), (b.pixel_size, b.pixel_size)))
      for g in np.nonzero(alive)[0]:
        o = clients[g].read(b.step_timeout)
        if o is None:
          raise BridgeError(f"evaluation: {clients[g].address} stopped answering")
        reward = shim.reward(states[g], o.state, distance_weight=b.distance_reward,
                             arena_size=b.arena_size)
        total += reward
        steps += 1
        if record and g == 0 and o.frame is not None:
          episode["frames"].append(o.frame)
          episode["rewards"].append(reward)
          episode["move"].append(move[0])
          episode["choice"].append(choice[0])
        states[g] = o.state
        ended, dead = shim.episode_end(o.state)
        if ended:
          alive[g] = False
          deaths += int(dead)
      if not alive.any():
        break
    result = {"mean_reward": total / max(steps, 1), "mean_return": total / len(clients),
              "steps": steps, "deaths": deaths}
    if record:
      result.update(frames=np.asarray(episode["frames"], np.uint8),
                    rewards=np.asarray(episode["rewards"], np.float32),
                    actions_continuous=np.asarray(episode["move"], np.float32),
                    actions_discrete=np.asarray(episode["choice"], np.int32)[:, None])
    return result
  finally:
    for c in clients:
      c.close()


def server_options(cfg) -> dict:
  """ServerProcess options from `cfg.bridge`."""
  b = cfg.bridge
  return dict(mode=b.server_mode, ticks_per_action=b.ticks_per_action, update_hz=b.update_hz, frame_hz=b.frame_hz,
              frame_format=b.frame_format, pixel_size=b.pixel_size,
              time_limit=b.game_time_limit, seed=cfg.seed)


@contextlib.contextmanager
def launched_servers(cfg, num_games: int, **overrides):
  """Reference servers for `num_games` fresh games (`server_options(cfg)` with `overrides`;
  each connection starts a new run); yields their ports and stops them afterwards."""
  server = launch.ServerProcess(num_games, base_port=0, restart_on_connect=True,
                                **{**server_options(cfg), **overrides})
  try:
    yield server.start()
  finally:
    server.stop()
