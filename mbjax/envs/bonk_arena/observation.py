"""BonkArena's vector observation: layout and feature extraction.

The layout (K_e = `num_obs_enemies`, K_g = `num_obs_gems`; defaults 5 and 3 give 96 floats)
is described once, in `vector_layout`, and documented in the package docstring. Positions are
relative to the player and divided by the arena size, so they lie in [-1, 1].
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mbjax.envs.bonk_arena import game

ENEMY_FEATURES = ("present", "dx", "dy", "dist", "health_frac", "is_fast", "is_tough",
                  "is_boss")
GEM_FEATURES = ("present", "dx", "dy", "dist")


def vector_layout(num_obs_enemies: int, num_obs_gems: int) -> dict[str, slice]:
  """Name → slice of each block of the vector observation, in order."""
  sizes = (
      ("player_pos", 2), ("player_vel", 2), ("health_frac", 1), ("max_health", 1),
      ("xp_frac", 1), ("level", 1), ("attack_timer", 1), ("upgrades", game.NUM_CARDS),
      ("enemies", len(ENEMY_FEATURES) * num_obs_enemies), ("enemy_summary", 3),
      ("gems", len(GEM_FEATURES) * num_obs_gems), ("menu_open", 1),
      ("menu_cards", game.CARDS_PER_MENU * game.NUM_CARDS), ("time", 3),
  )
  layout, start = {}, 0
  for name, size in sizes:
    layout[name] = slice(start, start + size)
    start += size
  return layout


def vector_size(num_obs_enemies: int, num_obs_gems: int) -> int:
  return list(vector_layout(num_obs_enemies, num_obs_gems).values())[-1].stop


def world_model_slots(num_obs_enemies: int, num_obs_gems: int):
  """The vector observation's structure as the world model's entity head takes it
  (`world_model.entity_slots`, `world_model.agent_position`; see
  `mbjax.agents.world_model.EntityDeltaHead`): the enemy and gem slot lists as (start,
  slots, features per slot, the distance feature they are sorted by), and the player's
  position as (start, scale). The scale is 2: positions are 2·p/arena − 1, the slots'
  offsets p/arena, so a move of 2 in `player_pos` is a move of 1 in the slots' units."""
  layout = vector_layout(num_obs_enemies, num_obs_gems)
  entity_slots = tuple(
      (layout[name].start, count, len(features), features.index("dist"))
      for name, count, features in (("enemies", num_obs_enemies, ENEMY_FEATURES),
                                    ("gems", num_obs_gems, GEM_FEATURES)))
  return entity_slots, (layout["player_pos"].start, 2.0)


def _nearest_indices(dist: jax.Array, alive: jax.Array, k: int) -> jax.Array:
  """i32[k]: indices of the k nearest alive entities, nearest first; −1 past the number
  alive."""
  key, idx = jax.lax.top_k(-jnp.where(alive, dist, jnp.inf), k)
  return jnp.where(jnp.isfinite(key), idx, -1)


def _nearest(features: jax.Array, dist: jax.Array, alive: jax.Array, k: int) -> jax.Array:
  """f32[k, F]: `features` (f32[F, N]) of the k nearest alive entities, nearest first; rows
  past the number alive are zeros."""
  idx = _nearest_indices(dist, alive, k)
  return jnp.where(idx[:, None] >= 0, features[:, idx].T, 0.0)


def visible_enemies(state: game.EnvState, num_obs_enemies: int) -> jax.Array:
  """i32[num_obs_enemies]: which enemies the vector observation's slots show, in slot
  order (−1: empty slot). For analyses of what changes between observations."""
  rel = state.enemy_pos - state.player_pos[:, None]
  dist = jnp.sqrt(jnp.sum(rel * rel, axis=0) + 1e-12)
  return _nearest_indices(dist, state.enemy_alive, num_obs_enemies)


def vector_observation(state: game.EnvState, params: game.EnvParams, num_obs_enemies: int,
                       num_obs_gems: int) -> jax.Array:
  f32 = jnp.float32
  arena = jnp.asarray(params.arena_size, f32)
  pos = state.player_pos
  speed = game.stat(params, state.upgrades, game.MOVE_SPEED)
  max_health = game.stat(params, state.upgrades, game.MAX_HEALTH)
  cooldown = game.stat(params, state.upgrades, game.ATTACK_SPEED)

  player = [
      pos / arena * 2.0 - 1.0,
      state.player_vel / speed,
      (state.health / max_health)[None],
      (max_health / params.base_max_health)[None],
      (state.xp / game.xp_to_next_level(params, state.level))[None],
      (state.level.astype(f32) / 10.0)[None],
      (state.attack_timer / cooldown)[None],
      state.upgrades.astype(f32) / 5.0,
  ]

  # Nearest enemies, sorted by distance; absent slots are all zeros.
  rel = state.enemy_pos - pos[:, None]
  dist = jnp.sqrt(jnp.sum(rel * rel, axis=0) + 1e-12)
  kind = state.enemy_kind
  health_frac = state.enemy_health / game.per_kind(params.enemy_health, kind)
  enemy_features = jnp.stack([
      jnp.ones_like(dist), rel[0] / arena, rel[1] / arena, dist / arena, health_frac,
      (kind == game.FAST).astype(f32), (kind == game.TOUGH).astype(f32),
      (kind == game.BOSS).astype(f32)])
  enemies = _nearest(enemy_features, dist, state.enemy_alive, num_obs_enemies)

  # Summary of all enemies: how full the arena is and a distance-weighted pull towards them.
  alive = state.enemy_alive.astype(f32)
  weight = alive / (dist * (1.0 + dist))
  threat = jnp.tanh(jnp.sum(rel * weight[None, :], axis=1))
  summary = [jnp.mean(alive)[None], threat]

  gem_rel = state.gem_pos - pos[:, None]
  gem_dist = jnp.sqrt(jnp.sum(gem_rel * gem_rel, axis=0) + 1e-12)
  gem_features = jnp.stack([jnp.ones_like(gem_dist), gem_rel[0] / arena, gem_rel[1] / arena,
                            gem_dist / arena])
  gems = _nearest(gem_features, gem_dist, state.gem_alive, num_obs_gems)

  menu_open = state.menu_open.astype(f32)
  cards = jax.nn.one_hot(state.menu_cards, game.NUM_CARDS, dtype=f32) * menu_open
  since_boss = state.game_time % params.boss_interval
  time = jnp.stack([
      state.game_time.astype(f32) / params.time_limit,
      state.menu_dwell.astype(f32) / params.menu_dwell_limit,
      1.0 - since_boss.astype(f32) / params.boss_interval,
  ])
  return jnp.concatenate(
      player + [enemies.reshape(-1)] + summary + [gems.reshape(-1), menu_open[None],
                                                  cards.reshape(-1), time])
