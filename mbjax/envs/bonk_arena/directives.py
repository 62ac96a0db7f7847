"""Directive-conditioned BonkArena: the task that trains System 1 of the dual-system runtime.

System 2 (`mbjax/runtime/planner.py`) issues *directives* from a fixed vocabulary; System 1
is a motor policy that reads the game's vector observation plus the current directive and is
rewarded for carrying it out. This module owns the vocabulary, the directive features the
motor sees (shared by training and the runtime, so both build the same input), the reward
for following a directive and the environment that resamples directives, all pure JAX.

Vocabulary (index = position in `DIRECTIVES`; the one-hot index is the directive embedding
the motor sees, reproducible in every process):

| directive     | target                          | success (the directive then ends)      |
|---------------|---------------------------------|----------------------------------------|
| `hunt`        | —                               | the player kills an enemy              |
| `flee`        | —                               | `horizon` steps pass without damage    |
| `collect_gem` | a gem's position (a random one) | the player is within pickup radius     |
| `goto`        | a point of the arena            | the player is within `goto_radius`     |
| `pick_card`   | a menu slot 0..2                | that card is taken from the menu       |

A directive also ends, failed, after `horizon` steps (`flee`: that is its success test) or,
for `pick_card`, when another card is taken. When the level-up menu opens, any other
directive is *interrupted* (counted as neither success nor failure) and `pick_card` with a
random slot replaces it; `pick_card` is only issued while the menu is open. After a directive
ends a new one is drawn (weights `sample_weights` over hunt/flee/collect_gem/goto among the
available ones: hunt and flee need a live enemy, collect_gem a gem), so every `horizon`
steps at the latest the motor is given a new one, as a 0.5 Hz planner would at 60 Hz.

Reward per step (d = distances in world units, s = the base move speed):
  progress_scale · progress / s + success_bonus · success − damage_weight · damage,
where progress is the decrease in distance to the target (`goto`, `collect_gem`), the
decrease of the nearest enemy's distance beyond the attack range (`hunt`), or the increase
of the nearest enemy's distance up to `flee_cap` (`flee`); 0 for `pick_card`.

Observation: BonkArena's vector observation (see the package docstring) followed by the
directive block of `DIRECTIVE_FEATURES` = 13 floats:
  one-hot(5) directive | target present, dx, dy, dist (relative to the player, / arena
  size) | one-hot(3) card slot | fraction of the horizon left.
With `conditioned=False` the block is all zeros: the same task and network input size
without the directive, the non-conditioned baseline of `configs/arena_directives.py`.

`info` adds `directive` (the directive active during the step), `directive_ended` and
`directive_success` (it ended this step, and whether it succeeded). `following_rates`
rolls out a policy and counts successes per directive.
"""
from __future__ import annotations

from typing import Any, Callable

import chex
import flax.struct
import jax
import jax.numpy as jnp

from mbjax.envs import base
from mbjax.envs.bonk_arena import game
from mbjax.envs.bonk_arena.env import BonkArena
from mbjax.envs.spaces import HybridAction, HybridActionSpec

DIRECTIVES: tuple[str, ...] = ("hunt", "flee", "collect_gem", "goto", "pick_card")
HUNT, FLEE, COLLECT_GEM, GOTO, PICK_CARD = range(len(DIRECTIVES))
NUM_DIRECTIVES = len(DIRECTIVES)
# Directives System 2 may draw while the menu is closed (pick_card is forced by the menu).
FREE_DIRECTIVES = (HUNT, FLEE, COLLECT_GEM, GOTO)
DIRECTIVE_FEATURES = NUM_DIRECTIVES + 4 + game.CARDS_PER_MENU + 1
_DAMAGE_TERM = 5  # index of `damage` in rewards.REWARD_TERMS


@flax.struct.dataclass
class DirectiveParams:
  """Tunables of the directive task; `game` holds BonkArena's own params."""

  game: game.EnvParams = game.EnvParams()
  horizon: int = 120  # steps before a directive times out (2 s at 60 Hz)
  goto_radius: float = 1.0  # world units
  goto_margin: float = 2.0  # goto targets keep this far from the walls
  progress_scale: float = 0.1  # reward per step of full-speed progress
  success_bonus: float = 1.0
  damage_weight: float = 1.0  # upstream's damage weight
  flee_cap: float = 8.0  # fleeing further than this earns nothing more
  sample_weights: tuple[float, ...] = (1.0, 1.0, 2.0, 2.0)  # hunt, flee, collect_gem, goto


@flax.struct.dataclass
class DirectiveState:
  game: game.EnvState
  directive: jax.Array  # i32[]
  target: jax.Array  # f32[2], world position (meaningful when has_target)
  has_target: jax.Array  # bool[]
  card: jax.Array  # i32[], menu slot for pick_card
  age: jax.Array  # i32[], steps since the directive was issued
  window_damage: jax.Array  # f32[], damage taken since the directive was issued


def directive_features(directive: jax.Array, has_target: jax.Array, target: jax.Array,
                       card: jax.Array, age: jax.Array, player_pos: jax.Array,
                       arena_size: float, horizon: int) -> jax.Array:
  """The directive block f32[DIRECTIVE_FEATURES] (layout in the module docstring).

  Shared by the environment and the runtime controller, so the motor sees the same
  features in training and in play. `target` and `player_pos` are world positions.
  """
  chex.assert_shape(target, (2,))
  chex.assert_shape(player_pos, (2,))
  f32 = jnp.float32
  rel = (target - player_pos) / arena_size
  present = jnp.asarray(has_target, f32)
  target_block = jnp.concatenate([present[None], rel * present,
                                  (jnp.linalg.norm(rel) * present)[None]])
  is_card = jnp.asarray(directive == PICK_CARD, f32)
  left = 1.0 - jnp.minimum(jnp.asarray(age, f32) / horizon, 1.0)
  return jnp.concatenate([
      jax.nn.one_hot(directive, NUM_DIRECTIVES, dtype=f32), target_block,
      jax.nn.one_hot(card, game.CARDS_PER_MENU, dtype=f32) * is_card, left[None]])


def nearest_enemy_distance(player_pos: jax.Array, enemy_pos: jax.Array, alive: jax.Array,
                           cap: float = jnp.inf) -> jax.Array:
  """Distance from `player_pos` f32[2] to the nearest `alive` enemy of `enemy_pos` f32[2, E],
  at most `cap` (cap when none is alive)."""
  rel = enemy_pos - player_pos[:, None]
  dist = jnp.sqrt(jnp.sum(rel * rel, axis=0) + 1e-12)
  return jnp.minimum(jnp.min(jnp.where(alive, dist, jnp.inf)), cap)


def sample_directive(key: jax.Array, state: game.EnvState, params: DirectiveParams):
  """(directive, target, has_target, card) drawn for `state`: pick_card while the menu is
  open, otherwise one of the available free directives by `sample_weights`."""
  k_kind, k_gem, k_point, k_card = jax.random.split(key, 4)
  any_enemy = jnp.any(state.enemy_alive)
  any_gem = jnp.any(state.gem_alive)
  available = jnp.stack([any_enemy, any_enemy, any_gem, jnp.bool_(True)])
  weights = jnp.asarray(params.sample_weights, jnp.float32)
  logits = jnp.where(available & (weights > 0), jnp.log(jnp.maximum(weights, 1e-30)),
                     -jnp.inf)
  free = jnp.asarray(FREE_DIRECTIVES, jnp.int32)[jax.random.categorical(k_kind, logits)]
  directive = jnp.where(state.menu_open, PICK_CARD, free)

  gem = jax.random.categorical(k_gem, jnp.where(state.gem_alive, 0.0, -jnp.inf))
  margin, arena = params.goto_margin, params.game.arena_size
  point = jax.random.uniform(k_point, (2,), minval=margin, maxval=arena - margin)
  target = jnp.where(directive == COLLECT_GEM, state.gem_pos[:, gem], point)
  has_target = (directive == COLLECT_GEM) | (directive == GOTO)
  card = jax.random.randint(k_card, (), 0, game.CARDS_PER_MENU)
  return directive.astype(jnp.int32), target.astype(jnp.float32), has_target, card


def directive_reward(state: DirectiveState, new_game: game.EnvState, choice: jax.Array,
                     damage: jax.Array, params: DirectiveParams):
  """(reward, success, ended, interrupted, window_damage) of one step under the directive
  of `state` that led from `state.game` to `new_game` with menu choice `choice`."""
  d, prev = state.directive, state.game
  speed = params.game.base_move_speed
  # Targets: goto and collect_gem.
  dist_prev = jnp.linalg.norm(prev.player_pos - state.target)
  dist_new = jnp.linalg.norm(new_game.player_pos - state.target)
  pickup = game.stat(params.game, new_game.upgrades, game.PICKUP_RADIUS)
  radius = jnp.where(d == COLLECT_GEM, pickup, params.goto_radius)
  has_target = state.has_target & ((d == GOTO) | (d == COLLECT_GEM))
  reached = has_target & (dist_new <= radius)
  # Enemies: hunt closes in to attack range, flee opens the gap up to flee_cap.
  # Both distances over the enemies alive before and after the step, so a kill or a spawn
  # does not count as movement.
  both = prev.enemy_alive & new_game.enemy_alive
  far = 4.0 * params.flee_cap
  near_prev = nearest_enemy_distance(prev.player_pos, prev.enemy_pos, both, far)
  near_new = nearest_enemy_distance(new_game.player_pos, new_game.enemy_pos, both, far)
  attack_range = game.stat(params.game, new_game.upgrades, game.RANGE)
  hunt_progress = (jnp.maximum(near_prev - attack_range, 0.0)
                   - jnp.maximum(near_new - attack_range, 0.0))
  flee_progress = (jnp.minimum(near_new, params.flee_cap)
                   - jnp.minimum(near_prev, params.flee_cap))
  killed = new_game.kills > prev.kills
  # The menu: pick_card succeeds when the directed card is taken.
  picked = prev.menu_open & ~new_game.menu_open
  window_damage = state.window_damage + damage
  timeout = state.age + 1 >= params.horizon

  progress = jnp.select([has_target, d == HUNT, d == FLEE],
                        [dist_prev - dist_new, hunt_progress, flee_progress], 0.0)
  success = jnp.select(
      [d == GOTO, d == COLLECT_GEM, d == HUNT, d == FLEE, d == PICK_CARD],
      [reached, reached, killed, timeout & (window_damage <= 0.0), picked & (choice == state.card)],
      False)
  failed_pick = (d == PICK_CARD) & picked & (choice != state.card)
  interrupted = new_game.menu_open & ~prev.menu_open & (d != PICK_CARD) & ~success
  ended = (success | timeout | failed_pick) & ~interrupted
  reward = (params.progress_scale * progress / speed + params.success_bonus * success
            - params.damage_weight * damage)
  return reward.astype(jnp.float32), success, ended, interrupted, window_damage


class DirectiveArena(base.Environment):
  """BonkArena where the reward is for following directives (see the module docstring).

  Args:
    conditioned: False zeroes the directive block of the observation (the baseline).
    **arena_kwargs: `BonkArena` vector-observation options (num_obs_enemies, ...).
  """

  def __init__(self, conditioned: bool = True, **arena_kwargs):
    if arena_kwargs.get("observation", "vector") != "vector":
      raise ValueError("DirectiveArena uses vector observations; got observation="
                       f"{arena_kwargs['observation']!r}")
    self.arena = BonkArena(**{**arena_kwargs, "observation": "vector"})
    self.conditioned = bool(conditioned)
    self.base_size = self.arena.observation_shape()[0]

  @property
  def name(self) -> str:
    return "bonk_arena_directives"

  def default_params(self) -> DirectiveParams:
    return DirectiveParams(game=self.arena.default_params())

  def observation_shape(self, params=None) -> tuple[int, ...]:
    del params
    return (self.base_size + DIRECTIVE_FEATURES,)

  def action_spec(self, params=None) -> HybridActionSpec:
    return self.arena.action_spec()

  def action_mask(self, state: DirectiveState, params=None) -> jax.Array:
    return self.arena.action_mask(state.game)

  def render(self, state: DirectiveState, params: DirectiveParams) -> jax.Array:
    return self.arena.render(state.game, params.game)

  def _observe(self, base_obs: jax.Array, state: DirectiveState,
               params: DirectiveParams) -> jax.Array:
    block = directive_features(state.directive, state.has_target, state.target, state.card,
                               state.age, state.game.player_pos, params.game.arena_size,
                               params.horizon)
    if not self.conditioned:
      block = jnp.zeros_like(block)
    return jnp.concatenate([base_obs, block])

  def _issue(self, key, game_state, params) -> DirectiveState:
    directive, target, has_target, card = sample_directive(key, game_state, params)
    return DirectiveState(game_state, directive, target, has_target, card, jnp.int32(0),
                          jnp.float32(0.0))

  def reset(self, key: jax.Array, params: DirectiveParams):
    base_obs, game_state = self.arena.reset(key, params.game)
    state = self._issue(key, game_state, params)
    return self._observe(base_obs, state, params), state

  def step(self, key: jax.Array, state: DirectiveState, action: HybridAction,
           params: DirectiveParams):
    game_key, sample_key = jax.random.split(key)
    base_obs, new_game, _, terminated, truncated, info = self.arena.step(
        game_key, state.game, action, params.game)
    reward, success, ended, interrupted, window_damage = directive_reward(
        state, new_game, action.discrete[0], info["reward_terms"][_DAMAGE_TERM], params)
    kept = state.replace(game=new_game, age=state.age + 1, window_damage=window_damage)
    fresh = self._issue(sample_key, new_game, params)
    new_state = jax.tree.map(lambda a, b: jnp.where(ended | interrupted, a, b), fresh, kept)
    info = dict(info, directive=state.directive, directive_ended=ended,
                directive_success=success)
    obs = self._observe(base_obs, new_state, params)
    return obs, new_state, reward, terminated, truncated, info


PolicyStep = Callable[[Any, jax.Array, jax.Array, jax.Array, jax.Array], tuple[Any, HybridAction]]


def following_rates(env: DirectiveArena, params: DirectiveParams, policy_step: PolicyStep,
                    carry: Any, key: jax.Array, num_envs: int, num_steps: int) -> dict:
  """Runs `num_envs` envs for `num_steps` steps (auto-reset) under a policy and counts, per
  directive, how many directives ended (`ended` i32[NUM_DIRECTIVES]) and succeeded
  (`success`); interrupted ones and ones cut off by an episode end are not counted.

  `policy_step(carry, key, obs [N, D], mask [N, M], is_first bool[N]) -> (carry, env
  action [N, ...])` acts for the whole batch (a recurrent network's carry included).
  """
  step = jax.vmap(env.step, in_axes=(0, 0, 0, None))
  reset = jax.vmap(env.reset, in_axes=(0, None))
  mask_fn = jax.vmap(env.action_mask, in_axes=(0, None))
  key, reset_key = jax.random.split(key)
  obs, state = reset(jax.random.split(reset_key, num_envs), params)

  def body(loop, _):
    obs, state, carry, is_first, key, ended, success = loop
    key, act_key, step_key, reset_key = jax.random.split(key, 4)
    carry, action = policy_step(carry, act_key, obs, mask_fn(state, params), is_first)
    obs, state, _, terminated, truncated, info = step(
        jax.random.split(step_key, num_envs), state, action, params)
    one_hot = jax.nn.one_hot(info["directive"], NUM_DIRECTIVES, dtype=jnp.int32)
    ended = ended + jnp.sum(one_hot * info["directive_ended"][:, None], axis=0)
    success = success + jnp.sum(one_hot * info["directive_success"][:, None], axis=0)
    done = terminated | truncated
    fresh_obs, fresh_state = reset(jax.random.split(reset_key, num_envs), params)
    pick = lambda a, b: jnp.where(done.reshape(done.shape + (1,) * (a.ndim - 1)), a, b)
    obs, state = pick(fresh_obs, obs), jax.tree.map(pick, fresh_state, state)
    return (obs, state, carry, done, key, ended, success), None

  zeros = jnp.zeros((NUM_DIRECTIVES,), jnp.int32)
  init = (obs, state, carry, jnp.ones((num_envs,), bool), key, zeros, zeros)
  (_, _, _, _, _, ended, success), _ = jax.lax.scan(body, init, None, length=num_steps)
  return {"ended": ended, "success": success}
