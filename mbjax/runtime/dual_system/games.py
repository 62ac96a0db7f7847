"""The games System 1 plays, behind one interface (`Game`: `observe() -> GameView`,
`act(move, menu choice)`).

`ArenaGame` is BonkArena in this process (one tick per control step, auto-reset);
`BridgeGame` is a BonkLink client talking to a game (the reference server or the real
plugin) whose newest state packet `arena_observation` maps to the arena's vector observation.
"""
from __future__ import annotations

import dataclasses
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np

from mbjax.bridge import codec, shim
from mbjax.envs.bonk_arena import BonkArena, game
from mbjax.envs.bonk_arena import observation as vector_obs
from mbjax.envs.bonk_arena.env import MENU_NOOP
from mbjax.envs.spaces import HybridAction
from mbjax.runtime import planner as planner_lib


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


class ArenaGame:
  """BonkArena in this process: `act` advances one tick; finished runs restart at once."""

  def __init__(self, env: BonkArena | None = None, params=None, seed: int = 0,
               frame_every: int = 0, render: bool = False):
    self.env = env or BonkArena(observation="vector")
    # A card waits for System 2 or the VLM navigator (`game.RUNTIME_MENU_DWELL`).
    self.params = (params if params is not None else self.env.default_params().replace(
        menu_dwell_limit=game.RUNTIME_MENU_DWELL))
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
