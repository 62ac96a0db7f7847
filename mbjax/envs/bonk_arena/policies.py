"""Reference policies for BonkArena as pure `policy_fn(key, obs, mask) -> HybridAction`.

`random_policy` and `idle_menu_policy` work on any observation; the scripted baseline reads
the vector observation (build it for an env with `make_scripted_policy(env)`, which binds
the env's layout). All are single-env functions: `jax.vmap` them for a batch.
"""
from __future__ import annotations

from typing import Callable

import chex
import jax
import jax.numpy as jnp

from mbjax.envs.bonk_arena import game
from mbjax.envs.bonk_arena import observation as vector_obs
from mbjax.envs.spaces import HybridAction

PolicyFn = Callable[[jax.Array, jax.Array, jax.Array], HybridAction]

# Scripted card preference (higher is better), `game.CARDS` order: damage first.
CARD_PREFERENCE = (7.0, 6.0, 4.0, 5.0, 2.0, 3.0, 1.0)


def random_policy(key: jax.Array, obs: jax.Array, mask: jax.Array) -> HybridAction:
  """Uniform move in [-1, 1]^2 and a uniformly random allowed menu choice."""
  del obs
  chex.assert_shape(mask, (game.CARDS_PER_MENU + 1,))
  k_move, k_menu = jax.random.split(key)
  move = jax.random.uniform(k_move, (2,), minval=-1.0, maxval=1.0)
  choice = jax.random.categorical(k_menu, jnp.where(mask, 0.0, -jnp.inf))
  return HybridAction(move, choice.astype(jnp.int32)[None])


def idle_menu_policy(key: jax.Array, obs: jax.Array, mask: jax.Array) -> HybridAction:
  """`random_policy`'s moves (the same for the same key), and never a card: the no-op in the
  level-up menu. The probe for the menu-idle exploit (`game.py`: under the current rules it
  plays worse than random)."""
  move = random_policy(key, obs, mask).continuous
  return HybridAction(move, jnp.full((1,), game.CARDS_PER_MENU, jnp.int32))


def scripted_policy(key: jax.Array, obs: jax.Array, mask: jax.Array, *,
                    num_obs_enemies: int = 5, num_obs_gems: int = 3) -> HybridAction:
  """Kite away from the nearest enemies, drift back from the walls, collect gems when it is
  safe, and pick the most preferred card (damage first) when the menu is open."""
  del key  # deterministic
  layout = vector_obs.vector_layout(num_obs_enemies, num_obs_gems)
  chex.assert_shape(obs, (vector_obs.vector_size(num_obs_enemies, num_obs_gems),))
  chex.assert_shape(mask, (game.CARDS_PER_MENU + 1,))
  pos = obs[layout["player_pos"]]
  enemies = obs[layout["enemies"]].reshape(num_obs_enemies, len(vector_obs.ENEMY_FEATURES))
  gems = obs[layout["gems"]].reshape(num_obs_gems, len(vector_obs.GEM_FEATURES))

  # Repulsion from the nearest enemies, stronger the closer they are (distances are in
  # arena-size units, so 0.1 is ~2.4 world units on the default arena).
  present, rel, dist = enemies[:, 0], enemies[:, 1:3], enemies[:, 3]
  push = -jnp.sum(present[:, None] * rel / (dist[:, None] ** 3 + 1e-4), axis=0)
  push = push - 4.0 * obs[layout["enemy_summary"]][1:]
  danger = jnp.sum(present * jnp.exp(-dist / 0.08))
  # Sideways component so the player circles around the pack instead of running into a wall.
  sideways = jnp.stack([-push[1], push[0]]) * 0.5
  # Walls: push back towards the middle when within the outer fifth of the arena.
  wall = -jnp.sign(pos) * jnp.maximum(jnp.abs(pos) - 0.6, 0.0) * 60.0
  flee = push + sideways + wall
  flee = flee / (jnp.linalg.norm(flee) + 1e-6)

  gem_present, gem_rel = gems[0, 0], gems[0, 1:3]
  to_gem = gem_rel / (jnp.linalg.norm(gem_rel) + 1e-6) * gem_present
  seek = to_gem - 0.3 * pos  # otherwise drift to the centre, where there is room to kite
  seek = seek / (jnp.linalg.norm(seek) + 1e-6)
  safe = jnp.clip(1.0 - danger, 0.0, 1.0)
  move = safe * seek + (1.0 - safe) * flee
  # Against a wall, drop the component pushing into it (it only costs the wall penalty).
  into_wall = (jnp.abs(pos) > 0.94) & (jnp.sign(move) == jnp.sign(pos))
  move = jnp.where(into_wall, 0.0, move)
  move = move / (jnp.linalg.norm(move) + 1e-6)

  cards = obs[layout["menu_cards"]].reshape(game.CARDS_PER_MENU, game.NUM_CARDS)
  score = cards @ jnp.asarray(CARD_PREFERENCE, jnp.float32)
  best = jnp.argmax(score)
  choice = jnp.where(mask[best], best, game.CARDS_PER_MENU)
  return HybridAction(move, choice.astype(jnp.int32)[None])


def make_scripted_policy(env) -> PolicyFn:
  """The scripted baseline bound to `env`'s vector layout (env must use vector obs)."""
  if env.observation != "vector":
    raise ValueError("the scripted policy reads vector observations; build the env with "
                     f"observation='vector' (got {env.observation!r})")

  def policy(key, obs, mask):
    return scripted_policy(key, obs, mask, num_obs_enemies=env.num_obs_enemies,
                           num_obs_gems=env.num_obs_gems)

  return policy
