"""The dual-system controller: System 1 (a goal-conditioned motor policy) on the main loop at
a fixed rate, System 2 (`mbjax.runtime.planner.System2`) on its own thread.

Pieces, top to bottom:
* `motor_step_fn` — the pure network step (normalise, apply, sample or mode, optional
  override of the discrete choice, log-prob of the *executed* action, value).
* `MotorPolicy` — System 1: a trained `configs/arena_directives.py` checkpoint (or a fresh
  network of that config) behind one jitted call per control step that also builds the
  directive block with `directives.directive_features`, the very function the training
  env uses, so the motor sees in play what it saw in training.
* Games: `ArenaGame` (BonkArena in this process, one tick per control step, auto-reset)
  and `BridgeGame` (a BonkLink client talking to a game — the reference server or the real
  plugin — whose newest state packet is mapped to the arena's vector observation by
  `arena_observation`). Both return a `GameView` and take `(move, menu choice)`.
* `RolloutRecorder` — with rollout pushing on, every executed step goes into a
  `mbjax.data.replay` ring with the log-prob of the executed action under the distribution
  that sampled it (upstream pushed log-prob 0 and value 0 for System-2-driven steps).
* `DualSystemController` — the loop: observe → publish the snapshot to System 2 → take the
  newest directive (or the rule planner's, until System 2 first answers) → level-up menu
  handling → motor step → act → record → sleep to the next period. It keeps per-step
  latencies (compute time of an iteration, sleep excluded) for the timing benchmark.
* `run(cfg)` — builds all of it from `configs/dual_system.py`.

The level-up menu: while it is open the directive is `pick_card`; the card comes from the
menu decider (a VLM menu navigator when configured; it must answer without blocking and
may answer "no decision yet"), else from a System 2 `pick_card` directive issued since the
menu opened, else from the rule planner. With `menu_override` the chosen card is also forced
as the executed discrete action; such steps are flagged `overridden` in the rollout (their
log-prob is still the policy's log-prob of what was executed, so a learner can weight or
drop them knowingly).

Inference only by default: nothing is recorded or learned unless `push.enabled`.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import os
import re
import time
from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from mbjax.agents import ppo
from mbjax.bridge import codec, shim
from mbjax.data import replay
from mbjax.envs.bonk_arena import BonkArena, directives, game
from mbjax.envs.bonk_arena import observation as vector_obs
from mbjax.envs.bonk_arena.env import MENU_NOOP
from mbjax.envs.spaces import HybridAction
from mbjax.nets.hybrid import to_env_action
from mbjax.runtime import planner as planner_lib

# -- System 1 -------------------------------------------------------------------------------


def motor_step_fn(network, normalize: bool, deterministic: bool) -> Callable:
  """Pure `step(params, obs_stats, carry, key, obs [N, D], mask [N, M], is_first [N],
  override i32[N] | None) -> (carry, raw action, env action, log_prob [N], value [N])`.

  `override` ≥ 0 replaces the first discrete branch of the sampled action (a menu decision
  taken outside the policy); the log-prob is always that of the returned raw action under
  the distribution the network produced.
  """

  def step(params, obs_stats, carry, key, obs, mask, is_first, override=None):
    net_obs = ppo.prepare_obs(obs, obs_stats, normalize)
    carry, dist, value = network.apply(params, carry, net_obs, is_first, mask)
    raw = dist.mode() if deterministic else dist.sample(key)
    if override is not None:
      first = jnp.where(override >= 0, override, raw.discrete[..., 0])
      raw = raw._replace(discrete=raw.discrete.at[..., 0].set(first))
    return carry, raw, to_env_action(raw, network.squash), dist.log_prob(raw), value

  return step


@dataclasses.dataclass(frozen=True)
class MotorOutput:
  obs: np.ndarray  # f32[D], what the network saw (before normalisation)
  raw_continuous: np.ndarray  # f32[C], the Gaussian sample (pre-squash)
  move: np.ndarray  # f32[2], what the game receives
  choice: int  # menu branch: 0..2 a card, 3 the no-op
  log_prob: float  # of (raw_continuous, choice) under the acting distribution
  value: float
  overridden: bool


class MotorPolicy:
  """System 1: one jitted network step per call, the recurrent carry kept here."""

  def __init__(self, network, params, obs_stats, *, normalize: bool, conditioned: bool,
               directive_params: directives.DirectiveParams, deterministic: bool = False,
               seed: int = 0):
    self.network = network
    self.params, self.obs_stats = params, obs_stats
    self.conditioned = conditioned
    self.deterministic = deterministic
    arena_size = float(directive_params.game.arena_size)
    horizon = int(directive_params.horizon)
    self.horizon = horizon
    step = motor_step_fn(network, normalize, deterministic)

    def act(params, obs_stats, carry, key, base_obs, mask, is_first, directive, has_target,
            target, card, age, player_pos, override):
      key, sample_key = jax.random.split(key)
      block = directives.directive_features(directive, has_target, target, card, age,
                                            player_pos, arena_size, horizon)
      if not conditioned:
        block = jnp.zeros_like(block)
      obs = jnp.concatenate([base_obs, block])
      carry, raw, env_action, log_prob, value = step(
          params, obs_stats, carry, sample_key, obs[None], mask[None], is_first[None],
          override[None])
      return key, carry, (obs, raw.continuous[0], env_action.continuous[0],
                          raw.discrete[0, 0], log_prob[0], value[0])

    self._act = jax.jit(act)
    self._key = jax.random.PRNGKey(seed)
    self.carry = network.initial_carry(1)
    # The game adapters build the default 96-float arena observation (5 enemies, 3 gems).
    self.obs_size = vector_obs.vector_size(5, 3) + directives.DIRECTIVE_FEATURES
    # Compile now, so that the first control step does not wait for XLA.
    warm = planner_lib.Directive(directives.GOTO, (0.0, 0.0))
    self.act(np.zeros(self.obs_size - directives.DIRECTIVE_FEATURES, np.float32),
             np.ones(4, bool), True, warm, 0, (0.0, 0.0))
    self._key = jax.random.PRNGKey(seed)
    self.reset()

  def reset(self) -> None:
    """Forgets the recurrent state (the next `act` with is_first does too)."""
    self.carry = self.network.initial_carry(1)

  @classmethod
  def from_checkpoint(cls, workdir: str, deterministic: bool = False,
                      seed: int = 0) -> "MotorPolicy":
    """The latest checkpoint of a `configs/arena_directives.py` training run."""
    from mbjax.train import run as run_lib  # orbax and the trainer only when loading

    trainer, runner = run_lib.restore_trained(workdir)
    cfg = trainer.cfg
    if cfg.env.name != "bonk_arena_directives":
      raise ValueError(f"motor checkpoint {workdir} trained on env {cfg.env.name!r}: expected "
                       "'bonk_arena_directives' (configs/arena_directives.py)")
    agent = jax.device_get(runner.agent)
    env = directives.DirectiveArena(**cfg.env.kwargs.to_dict())
    return cls(trainer.network, agent.params, agent.obs_stats,
               normalize=cfg.ppo.normalize_observations, conditioned=env.conditioned,
               directive_params=env.default_params(), deterministic=deterministic, seed=seed)

  @classmethod
  def initialise(cls, cfg: ml_collections.ConfigDict, deterministic: bool = False,
                 seed: int = 0) -> "MotorPolicy":
    """A freshly initialised (untrained) motor of a directive config — for tests and for
    timing the loop without a checkpoint."""
    env = directives.DirectiveArena(**cfg.env.kwargs.to_dict())
    network = ppo.make_network(cfg.network, env.action_spec())
    obs_shape = env.observation_shape()
    # One jitted init: eager flax init compiles every initialiser op on its own.
    params = jax.jit(network.init)(jax.random.PRNGKey(seed), network.initial_carry(1),
                                   jnp.zeros((1,) + obs_shape), jnp.ones((1,), bool),
                                   network.spec.all_valid_mask((1,)))
    return cls(network, params, ppo.ObservationStatistics.create(obs_shape),
               normalize=cfg.ppo.normalize_observations, conditioned=env.conditioned,
               directive_params=env.default_params(), deterministic=deterministic, seed=seed)

  def act(self, base_obs: np.ndarray, mask: np.ndarray, is_first: bool,
          directive: planner_lib.Directive, age: int, player_pos,
          override: int = -1) -> MotorOutput:
    """One control step. `override` ≥ 0 forces that menu choice (see the module doc)."""
    target = directive.target if directive.target is not None else (0.0, 0.0)
    self._key, self.carry, out = self._act(
        self.params, self.obs_stats, self.carry, self._key,
        np.asarray(base_obs, np.float32), np.asarray(mask, bool), np.bool_(is_first),
        np.int32(directive.index), np.bool_(directive.target is not None),
        np.asarray(target, np.float32), np.int32(directive.card),
        np.int32(min(age, self.horizon)), np.asarray(player_pos, np.float32),
        np.int32(override))
    obs, raw, move, choice, log_prob, value = jax.device_get(out)
    return MotorOutput(obs, raw, move, int(choice), float(log_prob), float(value),
                       override >= 0)


# -- games ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GameView:
  """The newest state of a game as the controller needs it."""

  base_obs: np.ndarray  # f32[96], BonkArena's vector observation (layout in its package)
  mask: np.ndarray  # bool[4], menu branch mask
  snapshot: planner_lib.GameSnapshot
  reward: float  # of the transition that led to this state
  terminated: bool  # that transition ended the run by death
  truncated: bool  # ... or by a time limit
  is_first: bool  # this state starts a run
  fresh: bool = True  # a state not returned before (bridge: False when no packet came)


class Game(Protocol):
  def observe(self) -> GameView:
    ...

  def act(self, move: np.ndarray, choice: int) -> None:
    ...


RUNTIME_MENU_DWELL = 600


class ArenaGame:
  """BonkArena in this process: `act` advances one tick; finished runs restart at once."""

  def __init__(self, env: BonkArena | None = None, params=None, seed: int = 0,
               frame_every: int = 0, render: bool = False):
    self.env = env or BonkArena(observation="vector")
    # A card waits for System 2 or the VLM navigator as a real game waits for its player
    # (no choice is forced within RUNTIME_MENU_DWELL steps, 10 s at 60 Hz); training keeps
    # the game's short dwell limit.
    self.params = (params if params is not None else
                   self.env.default_params().replace(menu_dwell_limit=RUNTIME_MENU_DWELL))
    self.frame_every = frame_every  # attach a rendered frame every N steps (0: never)
    env, params = self.env, self.params

    def view_arrays(state):
      max_health = game.stat(params, state.upgrades, game.MAX_HEALTH)
      return dict(obs=env.vector_observation(state, params), mask=env.action_mask(state),
                  pos=state.player_pos, health=state.health / max_health,
                  menu_open=state.menu_open, cards=state.menu_cards,
                  enemy_pos=state.enemy_pos, enemy_alive=state.enemy_alive,
                  gem_pos=state.gem_pos, gem_alive=state.gem_alive,
                  time=state.game_time)

    def tick(key, state, move, choice):
      key, step_key = jax.random.split(key)  # inside jit: no eager op in the loop
      action = HybridAction(move, choice[None])
      _, state, reward, terminated, truncated, _ = env.step(step_key, state, action, params)
      done = terminated | truncated
      _, fresh = env.reset(step_key, params)
      state = jax.tree.map(lambda a, b: jnp.where(done, a, b), fresh, state)
      return key, state, view_arrays(state), (reward, terminated, truncated)

    def reset(key):
      _, state = env.reset(key, params)
      return state, view_arrays(state)

    self._tick = jax.jit(tick)
    self._view_arrays = jax.jit(view_arrays)
    self._render = jax.jit(lambda state: env.render(state, params))
    self._key = jax.random.PRNGKey(seed)
    self._steps = 0
    self._frame = None
    self._state, arrays = jax.jit(reset)(self._key)
    self._view = self._make_view(jax.device_get(arrays), (0.0, False, False), True)
    # Compile the tick now (on a throwaway copy), so the control loop never waits for XLA;
    # the renderer too when frames will be wanted (`render_frame`, `frame_every`).
    jax.block_until_ready(self._tick(self._key, self._state, np.zeros(2, np.float32),
                                     np.int32(MENU_NOOP)))
    if render or frame_every:
      self.render_frame()

  def set_state(self, state: game.EnvState) -> None:
    """Replaces the game state (scripted scenarios, tests); the next view shows it."""
    self._state = state
    self._view = self._make_view(jax.device_get(self._view_arrays(state)), (0.0, False, False),
                                 False)

  @property
  def state(self) -> game.EnvState:
    return self._state

  def render_frame(self) -> np.ndarray:
    """uint8[S, S, 3], the current state as BonkArena draws it."""
    return np.asarray(self._render(self._state))

  def _make_view(self, a, transition, is_first) -> GameView:
    reward, terminated, truncated = transition
    if self.frame_every and self._steps % self.frame_every == 0:
      self._frame = self.render_frame()  # kept until the next render
    snapshot = planner_lib.GameSnapshot(
        player_pos=(float(a["pos"][0]), float(a["pos"][1])), health_frac=float(a["health"]),
        menu_open=bool(a["menu_open"]),
        menu_cards=tuple(game.CARDS[int(c)] for c in a["cards"]) if a["menu_open"] else (),
        enemies=a["enemy_pos"][:, a["enemy_alive"]].T, gems=a["gem_pos"][:, a["gem_alive"]].T,
        arena_size=float(self.params.arena_size), game_time_s=float(a["time"]) / 60.0,
        frame=self._frame)
    return GameView(a["obs"], a["mask"], snapshot, float(reward), bool(terminated),
                    bool(truncated), bool(is_first))

  def observe(self) -> GameView:
    return self._view

  def act(self, move: np.ndarray, choice: int) -> None:
    self._key, self._state, arrays, transition = self._tick(
        self._key, self._state, np.asarray(move, np.float32), np.int32(choice))
    arrays, transition = jax.device_get((arrays, transition))
    self._steps += 1
    done = bool(transition[1]) or bool(transition[2])
    self._view = self._make_view(arrays, transition, done)


def arena_observation(state: codec.GameState, *, run_time_s: float, arena_size: float = 24.0,
                      update_hz: float = 60.0, time_limit: int = 1500,
                      params: game.EnvParams = game.EnvParams()) -> np.ndarray:
  """BonkArena's 96-float vector observation rebuilt from one BonkLink state packet.

  The packet carries the player (position, velocity per second, health, max health),
  enemies (position, health), the menu and its card names, and the game clock. What it does
  not carry is filled with what a fresh run shows: XP 0, level 1, the attack ready, no
  upgrades, no gems, enemy kinds unknown (all flags 0; health fraction against a grunt's
  health). The world x–z plane maps onto the arena's x–y, as the reference server sends it.
  """
  layout = vector_obs.vector_layout(5, 3)
  out = np.zeros(vector_obs.vector_size(5, 3), np.float32)
  pos = np.array([state.player_position[0], state.player_position[2]], np.float32)
  out[layout["player_pos"]] = pos / arena_size * 2.0 - 1.0
  vel = np.array([state.player_velocity[0], state.player_velocity[2]], np.float32)
  out[layout["player_vel"]] = vel / update_hz / params.base_move_speed
  max_health = state.player_max_health if state.player_max_health > 0 else 1.0
  out[layout["health_frac"]] = state.player_health / max_health
  out[layout["max_health"]] = max_health / params.base_max_health
  out[layout["level"]] = 0.1
  if state.enemies:
    enemies = np.array([(e.position[0], e.position[2], e.health) for e in state.enemies],
                       np.float32)
    rel = enemies[:, :2] - pos
    dist = np.sqrt((rel ** 2).sum(-1) + 1e-12)
    nearest = np.argsort(dist, kind="stable")[:5]
    block = np.zeros((5, len(vector_obs.ENEMY_FEATURES)), np.float32)
    block[:len(nearest), 0] = 1.0
    block[:len(nearest), 1:3] = rel[nearest] / arena_size
    block[:len(nearest), 3] = dist[nearest] / arena_size
    block[:len(nearest), 4] = np.minimum(enemies[nearest, 2] / params.enemy_health[0], 1.0)
    out[layout["enemies"]] = block.reshape(-1)
    weight = 1.0 / (dist * (1.0 + dist))
    summary = np.tanh((rel * weight[:, None]).sum(0))
    out[layout["enemy_summary"]] = [min(len(state.enemies) / 32.0, 1.0), *summary]
  menu_open = state.current_menu == shim.LEVEL_UP_MENU
  out[layout["menu_open"]] = float(menu_open)
  if menu_open:
    cards = np.zeros((game.CARDS_PER_MENU, game.NUM_CARDS), np.float32)
    for slot, name in enumerate(state.level_up_options[:game.CARDS_PER_MENU]):
      if name in game.CARDS:
        cards[slot, game.CARDS.index(name)] = 1.0
    out[layout["menu_cards"]] = cards.reshape(-1)
  ticks = max(run_time_s, 0.0) * update_hz
  # The dwell entry is 0: a bridged game does not force a card after a dwell, so it does
  # not count one.
  out[layout["time"]] = [min(ticks / time_limit, 1.0), 0.0,
                         1.0 - (ticks % params.boss_interval) / params.boss_interval]
  return np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)


class BridgeGame:
  """A game behind a BonkLink client (`mbjax.bridge.client.BonkLinkClient`).

  `observe` never waits once the first state has arrived: it drains the socket and returns
  the newest state (`fresh=False` when nothing new came since the last call). A finished run
  (`isPlaying` false) is restarted by clicking, as the plugin's game-over screen expects.
  """

  def __init__(self, client, *, arena_size: float = 24.0, update_hz: float = 60.0,
               time_limit: int = 1500, capture_size: int = 64, first_timeout: float = 30.0):
    self.client = client
    self.arena_size, self.update_hz, self.time_limit = arena_size, update_hz, time_limit
    self.capture_size = (capture_size, capture_size)
    self.first_timeout = first_timeout
    self._last_seq = -1
    self._prev: codec.GameState | None = None
    self._view: GameView | None = None
    self._run_start = 0.0
    self._was_playing = False

  def observe(self) -> GameView:
    packet = self.client.poll()
    if packet is None:
      packet = self.client.read(self.first_timeout)
      if packet is None:
        raise TimeoutError(f"no BonkLink state from {self.client.address} within "
                           f"{self.first_timeout} s")
    if packet.seq == self._last_seq and self._view is not None:
      return dataclasses.replace(self._view, reward=0.0, terminated=False, truncated=False,
                                 is_first=False, fresh=False)
    self._last_seq = packet.seq
    state = packet.state
    is_first = state.is_playing and not self._was_playing
    if is_first:
      self._run_start = state.game_time
    ended, terminated = shim.episode_end(state)
    ended = ended and self._was_playing
    reward = shim.reward(self._prev, state) if self._prev is not None else 0.0
    self._prev, self._was_playing = state, state.is_playing
    self._state = state
    pos = (state.player_position[0], state.player_position[2])
    menu_open = state.current_menu == shim.LEVEL_UP_MENU
    snapshot = planner_lib.GameSnapshot(
        player_pos=pos, health_frac=state.player_health / max(state.player_max_health, 1e-6),
        menu_open=menu_open, menu_cards=state.level_up_options if menu_open else (),
        enemies=np.array([(e.position[0], e.position[2]) for e in state.enemies], np.float32),
        gems=np.zeros((0, 2), np.float32), arena_size=self.arena_size,
        game_time_s=state.game_time - self._run_start, frame=packet.frame)
    base_obs = arena_observation(state, run_time_s=state.game_time - self._run_start,
                                 arena_size=self.arena_size, update_hz=self.update_hz,
                                 time_limit=self.time_limit)
    self._view = GameView(base_obs, shim.menu_mask(state), snapshot, reward,
                          ended and terminated, ended and not terminated, is_first)
    return self._view

  def latest_frame(self) -> np.ndarray:
    """The newest frame the game sent (needs the server's frame_hz > 0)."""
    frame = self._view.snapshot.frame if self._view is not None else None
    if frame is None:
      raise ValueError(f"no frame received from {self.client.address} yet (frame_hz 0?)")
    return frame

  def act(self, move: np.ndarray, choice: int) -> None:
    if self._prev is not None and not self._prev.is_playing:
      self.client.send(shim.restart_action())
    else:
      self.client.send(shim.to_action(move, choice, self.capture_size))


# -- rollouts -------------------------------------------------------------------------------


class RolloutRecorder:
  """Executed steps → a replay ring (`mbjax.data.replay`), staged on the host and written
  `flush_every` at a time (one compiled `add` of a fixed batch size).

  A row is one step: the motor's input, the executed raw action, its log-prob under the
  acting distribution, the value, and the reward / episode end reported by the next fresh
  game state. Over the bridge a step whose action was replaced by the next one before any
  new state arrived is dropped (it has no outcome of its own)."""

  def __init__(self, obs_size: int, mask_size: int, capacity: int = 4096,
               flush_every: int = 64):
    if not 1 <= flush_every <= capacity:
      raise ValueError(f"push.flush_every={flush_every}: expected 1..capacity={capacity}")
    self.example = dict(
        obs=np.zeros(obs_size, np.float32), mask=np.zeros(mask_size, bool),
        action_continuous=np.zeros(2, np.float32), action_discrete=np.zeros(1, np.int32),
        log_prob=np.float32(0), value=np.float32(0), reward=np.float32(0),
        terminated=np.bool_(False), truncated=np.bool_(False), is_first=np.bool_(False),
        overridden=np.bool_(False), directive=np.int32(0))
    self.state = replay.init(self.example, capacity)
    self.flush_every = flush_every
    self._rows: list[dict] = []
    self._pending: dict | None = None
    batch = {k: np.stack([v] * flush_every) for k, v in self.example.items()}
    self._add = jax.jit(replay.add, donate_argnums=0).lower(self.state, batch).compile()
    self.pushed = 0

  def begin(self, view: GameView, out: MotorOutput, directive: planner_lib.Directive) -> None:
    """Stages the step just acted; its reward arrives with the next view (`complete`)."""
    self._pending = dict(
        obs=out.obs, mask=np.asarray(view.mask, bool), action_continuous=out.raw_continuous,
        action_discrete=np.array([out.choice], np.int32), log_prob=np.float32(out.log_prob),
        value=np.float32(out.value), is_first=np.bool_(view.is_first),
        overridden=np.bool_(out.overridden), directive=np.int32(directive.index))

  def complete(self, view: GameView) -> None:
    if self._pending is None or not view.fresh:
      return
    self._rows.append(dict(self._pending, reward=np.float32(view.reward),
                           terminated=np.bool_(view.terminated),
                           truncated=np.bool_(view.truncated)))
    self._pending = None
    if len(self._rows) >= self.flush_every:
      self._write(self._rows[:self.flush_every], self._add)
      self._rows = self._rows[self.flush_every:]

  def flush(self) -> None:
    """Writes the staged rows (a batch size of its own: call it outside timed loops)."""
    if self._rows:
      self._write(self._rows, replay.add)
      self._rows = []

  def _write(self, rows, add) -> None:
    batch = {k: np.stack([r[k] for r in rows]) for k in self.example}
    self.state = add(self.state, batch)
    self.pushed += len(rows)


# -- the loop -------------------------------------------------------------------------------


class MenuDecider(Protocol):
  def decide(self, view: GameView) -> tuple[int, str] | None:
    """(menu choice 0..3, source) for an open menu — 3 (the no-op) to wait for a pending
    decision — or None to leave the choice to System 2 / the rule; must return at once."""


class NavigatorMenu:
  """The VLM menu navigator (`mbjax.runtime.menu_navigator.MenuNavigator`) as the
  controller's menu decider. `frame_fn()` renders the current frame (called only when the
  navigator sends a request). While a reply is pending the decision is the no-op: the game
  is paused while the menu is open, so waiting costs menu steps, not game time; past the
  navigator's deadline (or on an error or invalid reply) it falls back to the rule card."""

  def __init__(self, navigator, frame_fn: Callable[[], np.ndarray]):
    self.navigator, self.frame_fn = navigator, frame_fn

  def decide(self, view: GameView) -> tuple[int, str] | None:
    snap = view.snapshot
    decision = self.navigator.step(snap.menu_open, self.frame_fn, view.mask,
                                   planner_lib.preferred_card(snap.menu_cards),
                                   card_names=snap.menu_cards)
    if decision is None:
      return None
    if decision.kind == "card":
      return decision.card, f"navigator:{decision.source}"
    return MENU_NOOP, f"navigator:{decision.kind}"


@dataclasses.dataclass
class LoopStats:
  steps: int
  wall_s: float
  latencies_s: np.ndarray  # compute time of every iteration
  period_s: float
  directive_sources: dict
  menu_sources: dict
  system2: planner_lib.System2Stats

  def summary(self) -> dict:
    lat = self.latencies_s * 1e3
    s2 = self.system2.latencies_s
    return {
        "steps": self.steps, "wall_s": round(self.wall_s, 3),
        "achieved_hz": round(self.steps / self.wall_s, 2) if self.wall_s else None,
        "step_ms_p50": round(float(np.percentile(lat, 50)), 3),
        "step_ms_p99": round(float(np.percentile(lat, 99)), 3),
        "step_ms_max": round(float(lat.max()), 3),
        "overruns": int((self.latencies_s > self.period_s).sum()),
        "directives": dict(self.directive_sources), "menu": dict(self.menu_sources),
        "system2_plans": self.system2.plans, "system2_fallbacks": self.system2.fallbacks,
        "system2_call_s_mean": round(float(np.mean(s2)), 3) if s2 else None,
        "system2_call_s_max": round(float(np.max(s2)), 3) if s2 else None,
    }


class DualSystemController:
  """System 1 at `hz` on the calling thread; System 2 already running on its own."""

  def __init__(self, game: Game, motor: MotorPolicy, system2: planner_lib.System2, *,
               hz: float = 60.0, recorder: RolloutRecorder | None = None,
               menu: MenuDecider | None = None, menu_override: bool = True,
               rule: planner_lib.RulePlanner | None = None,
               goto_radius: float = 1.0, clock: Callable[[], float] = time.perf_counter,
               sleep: Callable[[float], None] = time.sleep):
    if hz <= 0:
      raise ValueError(f"hz={hz}: expected > 0")
    self.game, self.motor, self.system2 = game, motor, system2
    self.period = 1.0 / hz
    self.recorder, self.menu, self.menu_override = recorder, menu, menu_override
    self.rule = rule or planner_lib.RulePlanner()
    self.goto_radius = goto_radius
    self.clock, self.sleep = clock, sleep
    self._directive: planner_lib.Directive | None = None
    self._age = 0
    self._menu_opened_at = None
    self._menu_card: tuple[int, str] | None = None
    self._requested: planner_lib.Directive | None = None

  def _choose_directive(self, view: GameView) -> tuple[planner_lib.Directive, int]:
    """(directive for this step, override choice or −1)."""
    snap = view.snapshot
    latest, _ = self.system2.latest()
    # Called on every step: the navigator also needs to see the menu close.
    decided = self.menu.decide(view) if self.menu is not None else None
    if snap.menu_open:
      if self._menu_opened_at is None:
        self._menu_opened_at = time.monotonic()
        self._menu_card = None
        self.system2.request_now()
      card, source = decided if decided is not None else (None, None)
      waiting = card == MENU_NOOP
      if card is None or waiting:
        card = None
        if latest is not None and latest.name == "pick_card" and (
            latest.issued_at >= self._menu_opened_at):
          card, source = latest.card, source or f"system2:{latest.source}"
      if card is None or not view.mask[card]:
        card, source = planner_lib.preferred_card(snap.menu_cards), source or "rule"
      if self._menu_card != (card, source):
        self._menu_card = (card, source)
        directive = planner_lib.make_directive("pick_card", snap, card=card, source=source)
      else:
        directive = self._directive
      if waiting:  # the navigator is still thinking: hold the menu open
        return directive, MENU_NOOP
      return directive, card if self.menu_override else -1
    if self._menu_opened_at is not None:  # the menu just closed: ask for a fresh plan
      self._menu_opened_at = None
      self.system2.request_now()
    if latest is None or latest.name == "pick_card":
      if self._directive is None or self._directive.name == "pick_card":
        return dataclasses.replace(self.rule.plan(snap), source="bootstrap"), -1
      return self._directive, -1
    return latest, -1

  def _target_reached(self, view: GameView, directive: planner_lib.Directive) -> bool:
    if directive.target is None:
      return False
    dist = np.linalg.norm(np.asarray(view.snapshot.player_pos) - np.asarray(directive.target))
    return bool(dist <= self.goto_radius)

  def run(self, num_steps: int) -> LoopStats:
    """Runs `num_steps` control steps at the controller's rate. Python's cyclic garbage
    collector is paused meanwhile (a collection can take tens of ms) and run after."""
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
      return self._run(num_steps)
    finally:
      if gc_was_enabled:
        gc.enable()
      gc.collect()

  def _run(self, num_steps: int) -> LoopStats:
    latencies = np.zeros(num_steps)
    sources: dict[str, int] = {}
    menu_sources: dict[str, int] = {}
    start = self.clock()
    next_tick = start
    for i in range(num_steps):
      t0 = self.clock()
      view = self.game.observe()
      if self.recorder is not None:
        self.recorder.complete(view)
      self.system2.publish(view.snapshot)
      directive, override = self._choose_directive(view)
      if directive is not self._directive:
        self._directive, self._age = directive, 0
        sources[directive.source] = sources.get(directive.source, 0) + 1
        if directive.name == "pick_card":
          menu_sources[directive.source] = menu_sources.get(directive.source, 0) + 1
      out = self.motor.act(view.base_obs, view.mask, view.is_first, directive, self._age,
                           view.snapshot.player_pos, override)
      self.game.act(out.move, out.choice)
      if self.recorder is not None:
        self.recorder.begin(view, out, directive)
      self._age += 1
      if self._requested is not directive and (
          self._target_reached(view, directive) or self._age >= self.motor.horizon):
        self._requested = directive  # once per directive: System 2 keeps its own pace
        self.system2.request_now()
      latencies[i] = self.clock() - t0
      next_tick += self.period
      wait = next_tick - self.clock()
      if wait > 0:
        self.sleep(wait)
      elif wait < -self.period:  # more than a period behind: drop the backlog, keep the rate
        next_tick = self.clock()
    wall = self.clock() - start
    return LoopStats(num_steps, wall, latencies, self.period, sources, menu_sources,
                     self.system2.stats)


# -- assembly from a config -----------------------------------------------------------------


def reference_responder(body: dict) -> tuple[int, str]:
  """A `ReferenceLLMServer` responder that answers as the rule planner would: System 2
  requests from the game state JSON in the prompt, menu-navigator requests (their schema has
  an "action") with a click on the preferred card listed in the prompt. An HTTP stand-in
  for a real model in demos, tests and benchmarks."""
  from mbjax.runtime.reference_llm_server import last_user_text, request_schema

  text = last_user_text(body)
  schema = request_schema(body) or {}
  if "action" in schema.get("properties", {}):
    cards = tuple(name for _, name in re.findall(r"(\d+): (\w+)", text))
    return 200, json.dumps({"action": "click", "card": planner_lib.preferred_card(cards),
                            "reason": "reference rule responder"})
  try:
    state = json.loads(text[text.index("{"):text.rindex("}") + 1])
  except ValueError:
    return 200, json.dumps({"directive": "hunt"})
  # The prompt's coordinates are normalised: plan on a unit arena, radii scaled to match.
  snapshot = planner_lib.GameSnapshot(
      player_pos=tuple(state["player"]), health_frac=state["health"],
      menu_open=state["menu_open"], menu_cards=tuple(state["cards"]),
      enemies=np.array([e[:2] for e in state["enemies_xy_dist"]], np.float32).reshape(-1, 2),
      gems=np.array([g[:2] for g in state["gems_xy_dist"]], np.float32).reshape(-1, 2),
      arena_size=1.0)
  default = planner_lib.RulePlanner()
  rule = planner_lib.RulePlanner(default.flee_health, default.danger_radius / 24.0,
                                 default.gem_radius / 24.0)
  directive = rule.plan(snapshot)
  reply = {"directive": directive.name, "reason": "reference rule responder"}
  if directive.target is not None:
    reply["target"] = [min(max(float(v), 0.0), 1.0) for v in directive.target]
  if directive.name == "pick_card":
    reply["card"] = directive.card
  return 200, json.dumps(reply)


def make_planner(cfg: ml_collections.ConfigDict):
  """(planner, cleanup) from `cfg.system2`; "llm" with base_url "reference" starts a loopback
  `ReferenceLLMServer` answering with `reference_responder` after `reference_delay_s`."""
  s2 = cfg.system2
  if s2.planner == "rule":
    return planner_lib.RulePlanner(), lambda: None
  if s2.planner != "llm":
    raise ValueError(f"config.system2.planner={s2.planner!r}: expected 'rule' or 'llm'")
  from mbjax.runtime import llm

  backend = cfg.llm.to_dict()
  server = None
  if backend["base_url"] == "reference":
    from mbjax.runtime.reference_llm_server import ReferenceLLMServer

    server = ReferenceLLMServer(reference_responder, delay_s=s2.reference_delay_s).start()
    backend["base_url"] = server.url
  client = llm.ChatClient(llm.BackendConfig.from_config(backend))
  planner = planner_lib.LLMPlanner(client, goal=s2.goal, send_frame=s2.send_frame)
  return planner, (server.stop if server is not None else (lambda: None))


def make_motor(cfg: ml_collections.ConfigDict) -> MotorPolicy:
  m = cfg.motor
  if m.checkpoint:
    return MotorPolicy.from_checkpoint(m.checkpoint, m.deterministic, cfg.seed)
  import importlib.util

  path = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__)))), "configs", "arena_directives.py")
  spec = importlib.util.spec_from_file_location("arena_directives", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  logging.warning("No motor checkpoint (config.motor.checkpoint): using an untrained "
                  "network of configs/arena_directives.py:%s", m.untrained_variant)
  return MotorPolicy.initialise(module.get_config(m.untrained_variant or None),
                                m.deterministic, cfg.seed)


def run(cfg: ml_collections.ConfigDict) -> dict:
  """Runs the controller for `cfg.steps` control steps; returns the loop summary."""
  motor = make_motor(cfg)
  planner, stop_backend = make_planner(cfg)
  cleanups = [stop_backend]
  try:
    navigator = cfg.menu.navigator
    if navigator not in ("none", "vlm"):
      raise ValueError(f"config.menu.navigator={navigator!r}: expected 'none' or 'vlm'")
    if cfg.game.kind == "arena":
      game_obj = ArenaGame(seed=cfg.seed, frame_every=cfg.game.frame_every,
                           render=navigator == "vlm")
    elif cfg.game.kind == "bridge":
      game_obj, close = _bridge_game(cfg)
      cleanups.append(close)
    else:
      raise ValueError(f"config.game.kind={cfg.game.kind!r}: expected 'arena' or 'bridge'")
    recorder = None
    if cfg.push.enabled:
      recorder = RolloutRecorder(motor.obs_size, 4, cfg.push.capacity,
                                 cfg.push.flush_every)
    game_obj.observe()  # connect and wait for the first state before the clock starts
    system2 = planner_lib.System2(planner, cfg.system2.rate_hz).start()
    cleanups.append(system2.close)
    menu = None
    if navigator == "vlm":
      menu, close_menu = _navigator_menu(cfg, game_obj)
      cleanups.append(close_menu)
    controller = DualSystemController(game_obj, motor, system2, hz=cfg.hz, recorder=recorder,
                                      menu=menu, menu_override=cfg.menu.override)
    stats = controller.run(cfg.steps)
    summary = stats.summary()
    if recorder is not None:
      recorder.flush()
      summary["pushed_steps"] = recorder.pushed
    if menu is not None:
      summary["navigator"] = dict(menu.navigator.counts)
    summary["load_average"] = os.getloadavg()
    return summary
  finally:
    for cleanup in reversed(cleanups):
      cleanup()


def _navigator_menu(cfg, game_obj):
  """(NavigatorMenu, close) over the `cfg.llm` backend (a VLM), for the arena or the bridge."""
  from mbjax.envs.bonk_arena import render
  from mbjax.runtime import llm, menu_navigator

  backend = cfg.llm.to_dict()
  server = None
  if backend["base_url"] == "reference":
    from mbjax.runtime.reference_llm_server import ReferenceLLMServer

    server = ReferenceLLMServer(reference_responder, delay_s=cfg.menu.reference_delay_s).start()
    backend["base_url"] = server.url
  chat = llm.AsyncChat(llm.ChatClient(llm.BackendConfig.from_config(backend)))
  if isinstance(game_obj, ArenaGame):
    layout = menu_navigator.CardLayout.from_renderer(game_obj.env.renderer)
    frame_fn = game_obj.render_frame
  else:
    if cfg.bridge.frame_hz <= 0:
      raise ValueError("config.menu.navigator='vlm' over the bridge needs frames: set "
                       "config.bridge.frame_hz > 0")
    layout = menu_navigator.CardLayout.from_renderer(render.Renderer(cfg.bridge.capture_size))
    frame_fn = game_obj.latest_frame
  navigator = menu_navigator.MenuNavigator(chat, layout, deadline_s=cfg.menu.deadline_s)

  def close():
    chat.close()
    if server is not None:
      server.stop()

  return NavigatorMenu(navigator, frame_fn), close


def _bridge_game(cfg):
  from mbjax.bridge.client import BonkLinkClient
  from mbjax.bridge.launch import ServerProcess

  b = cfg.bridge
  server = None
  port = b.port
  if b.launch_server:
    server = ServerProcess(1, 0, update_hz=b.update_hz, frame_hz=b.frame_hz,
                           pixel_size=b.capture_size, time_limit=b.time_limit)
    port = server.start()[0]
  client = BonkLinkClient(b.host, port)

  def close():
    client.close()
    if server is not None:
      server.stop()

  return BridgeGame(client, update_hz=b.update_hz, time_limit=b.time_limit,
                    capture_size=b.capture_size), close
