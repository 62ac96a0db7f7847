"""`BonkArena`: the `Environment` interface over the game in `game.py`.

Owns the static configuration (observation mode, entity capacities), the public
reset/step/mask/render API with its shape checks, the reward and `info` assembly, and the
mapping between an upstream-style 33-way UI-click branch and the 4-way menu branch.
"""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from mbjax.envs import base
from mbjax.envs.bonk_arena import game, render
from mbjax.envs.bonk_arena import observation as vector_obs
from mbjax.envs.spaces import HybridAction, HybridActionSpec

MENU_NOOP = game.CARDS_PER_MENU  # index 3 of the menu branch
UI_CLICK_CHOICES = 33
UI_CLICK_NOOP = UI_CLICK_CHOICES - 1


def menu_choice_from_ui_click(click: jax.Array) -> jax.Array:
  """Upstream 33-way UI-click index → menu branch index.

  Upstream clicks are 32 UI targets (detected elements, left to right, top to bottom) plus
  "no click" at 32. On BonkArena's level-up screen the only targets are the three cards, so
  clicks 0, 1, 2 pick cards 0, 1, 2 and every other index (3..32) is the no-op (3).
  """
  click = jnp.asarray(click, jnp.int32)
  return jnp.where((click >= 0) & (click < game.CARDS_PER_MENU), click, MENU_NOOP)


def ui_click_from_menu_choice(choice: jax.Array) -> jax.Array:
  """Menu branch index → upstream 33-way UI-click index (no-op → 32)."""
  choice = jnp.asarray(choice, jnp.int32)
  return jnp.where(choice < game.CARDS_PER_MENU, choice, UI_CLICK_NOOP)


def ui_click_mask(menu_mask: jax.Array) -> jax.Array:
  """bool[..., 4] menu mask → bool[..., 33] UI-click mask (clicks on nothing are masked)."""
  batch = menu_mask.shape[:-1]
  idle = jnp.zeros(batch + (UI_CLICK_CHOICES - game.CARDS_PER_MENU - 1,), bool)
  return jnp.concatenate([menu_mask[..., :game.CARDS_PER_MENU], idle,
                          menu_mask[..., MENU_NOOP:]], axis=-1)


class BonkArena(base.Environment):
  """A survivors-like arena in pure JAX. See the package docstring for the observation layout.

  Args:
    observation: "vector" (f32[obs_dim]) or "pixels" (uint8[S, S, 3]).
    pixel_size: S, the side of pixel observations and of `render` frames.
    max_enemies, max_gems: entity slots (static shapes; more slots cost more per step).
      When every gem slot is taken, a new gem replaces the oldest.
    num_obs_enemies, num_obs_gems: how many of the nearest enemies/gems the vector shows.
    camera, palette, upgrade_hud, view_fraction: how frames look (`render.Renderer`; the
      defaults draw the fixed whole-arena view in the default palette without the upgrade
      HUD; `view_fraction` is the part of the arena side the follow camera shows).
  """

  def __init__(self, observation: str = "vector", pixel_size: int = 64, max_enemies: int = 32,
               max_gems: int = 16, num_obs_enemies: int = 5, num_obs_gems: int = 3,
               camera: str = "fixed", palette: str = "default", upgrade_hud: bool = False,
               view_fraction: float = 0.5):
    if observation not in ("vector", "pixels"):
      raise ValueError(f"observation must be 'vector' or 'pixels', got {observation!r}")
    if not 1 <= num_obs_enemies <= max_enemies:
      raise ValueError(f"num_obs_enemies must be in [1, max_enemies={max_enemies}], "
                       f"got {num_obs_enemies}")
    if not 1 <= num_obs_gems <= max_gems:
      raise ValueError(f"num_obs_gems must be in [1, max_gems={max_gems}], got {num_obs_gems}")
    self.observation = observation
    self.pixel_size = int(pixel_size)
    self.max_enemies = int(max_enemies)
    self.max_gems = int(max_gems)
    self.num_obs_enemies = int(num_obs_enemies)
    self.num_obs_gems = int(num_obs_gems)
    self.renderer = render.Renderer(self.pixel_size, camera, palette, upgrade_hud,
                                    view_fraction)
    # Name → slice of each block of the vector observation.
    self.vector_layout = vector_obs.vector_layout(self.num_obs_enemies, self.num_obs_gems)

  @property
  def name(self) -> str:
    return "bonk_arena"

  @property
  def version(self) -> str:
    """The game rules' version (`game.RULES_VERSION`): returns under other rules differ."""
    return str(game.RULES_VERSION)

  # `info` entries that describe the episode so far: a training loop reports their values
  # on the step an episode ends, as it does the episode's return.
  episode_metrics = ("menu_fraction",)

  def default_params(self) -> game.EnvParams:
    return game.EnvParams()

  # -- spaces -----------------------------------------------------------------------------

  def observation_shape(self, params=None) -> tuple[int, ...]:
    del params
    if self.observation == "pixels":
      return (self.pixel_size, self.pixel_size, 3)
    return (vector_obs.vector_size(self.num_obs_enemies, self.num_obs_gems),)

  def observation_dtype(self, params=None) -> jnp.dtype:
    del params
    return jnp.dtype(jnp.uint8 if self.observation == "pixels" else jnp.float32)

  def action_spec(self, params=None) -> HybridActionSpec:
    del params
    return HybridActionSpec(continuous_dim=2, branches=(game.CARDS_PER_MENU + 1,))

  def action_mask(self, state: game.EnvState, params=None) -> jax.Array:
    """bool[4]: the three cards only while the menu is open; the no-op always."""
    del params
    cards = jnp.broadcast_to(state.menu_open, (game.CARDS_PER_MENU,))
    return jnp.concatenate([cards, jnp.ones((1,), bool)])

  # -- dynamics ---------------------------------------------------------------------------

  def reset(self, key: jax.Array, params: game.EnvParams):
    del key  # every episode starts the same; the step keys drive all randomness
    state = game.initial_state(params, self.max_enemies, self.max_gems)
    return self.observe(state, params), state

  def step(self, key: jax.Array, state: game.EnvState, action: HybridAction,
           params: game.EnvParams):
    """One tick (or one menu step while the level-up menu is open); never resets.

    `terminated`: health reached 0. `truncated`: `params.time_limit` game ticks were played
    (menu steps do not count), or `game.max_episode_steps(params)` env steps were taken,
    without dying. `info` (same keys every step): `reward_terms` f32[8] (raw terms, order
    `rewards.REWARD_TERMS`; reward = dot(weights, terms)), `level`, `kills`, `boss_kills`,
    `health`, `game_time`, `menu_open`, `menu_fraction` (share of this episode's env steps so
    far that were menu steps).
    """
    chex.assert_shape(action.continuous, (2,))
    chex.assert_shape(action.discrete, (1,))
    new_state, terms = game.game_step(key, state, action.continuous.astype(jnp.float32),
                                      action.discrete[0].astype(jnp.int32), params)
    reward = jnp.dot(jnp.asarray(params.reward_weights, jnp.float32), terms)
    terminated = new_state.health <= 0.0
    out_of_time = ((new_state.game_time >= params.time_limit)
                   | (new_state.steps >= game.max_episode_steps(params)))
    truncated = out_of_time & ~terminated
    info = {
        "reward_terms": terms,
        "level": new_state.level,
        "kills": new_state.kills,
        "boss_kills": new_state.boss_kills,
        "health": new_state.health,
        "game_time": new_state.game_time,
        "menu_open": new_state.menu_open,
        "menu_fraction": new_state.menu_steps.astype(jnp.float32) / new_state.steps,
    }
    obs = self.observe(new_state, params)
    return obs, new_state, reward, terminated, truncated, info

  # -- observations -----------------------------------------------------------------------

  def observe(self, state: game.EnvState, params: game.EnvParams) -> jax.Array:
    if self.observation == "pixels":
      obs = self.render(state, params)
    else:
      obs = self.vector_observation(state, params)
    chex.assert_shape(obs, self.observation_shape())
    return obs

  def vector_observation(self, state: game.EnvState, params: game.EnvParams) -> jax.Array:
    """The vector observation, whatever the observation mode (e.g. for scripted policies)."""
    return vector_obs.vector_observation(state, params, self.num_obs_enemies,
                                         self.num_obs_gems)

  def render(self, state: game.EnvState, params: game.EnvParams) -> jax.Array:
    """uint8[pixel_size, pixel_size, 3]."""
    return self.renderer(state, params)

