"""BonkArena game state, tunables and the pure per-step game mechanics.

This module owns *what happens* in the arena; observations (`observation.py`), drawing
(`render.py`) and the `Environment` wrapper (`env.py`) only read the state built here.

World: a square arena `[0, arena_size]^2` (y grows downwards, like the screen). One step is
one game tick. Entities live in fixed-size arrays with alive masks so every shape is static
and the whole step is a handful of vectorised ops over at most `max_enemies` / `max_gems`
slots.

A step, while the level-up menu is closed:
  1. the player moves by `move * move_speed` (|move| clipped to 1), clamped by the walls;
  2. enemies step straight towards the player at their kind's speed;
  3. every enemy touching the player deals its kind's contact damage; regeneration heals;
  4. auto-attack: when the cooldown has elapsed, the nearest enemy within range takes an
     instant hit; a kill drops an XP gem at the enemy's position (gem slots are a ring: when
     all are taken the oldest gem disappears);
  5. gems within the pickup radius are collected (XP);
  6. XP over the threshold levels up: the menu opens with 3 distinct random cards;
  7. spawning: every `spawn_interval` ticks a wave of `wave_base + game_time // wave_growth`
     enemies is queued (with more fast and tough ones as the run goes on); queued enemies
     enter at random points of the edge, at most `SPAWNS_PER_TICK` per tick, into the next
     slots of a ring (an occupied slot is skipped: the arena is full). Every `boss_interval`
     ticks a boss enters (taking its ring slot even if occupied).
While the menu is open the game is paused (nothing moves, the run clock stops) until a card
is chosen with the discrete action; choosing closes the menu and applies that card only.

The clock and the menu (rules version `RULES_VERSION` = 2). The episode's time limit counts
game ticks, not env steps: a paused menu step does not bring the end of the run closer.
The menu cannot be held open for long either: after `menu_dwell_limit` consecutive menu
steps without a choice the first offered card is taken (the deal is random, so that is a
random card), and every menu step pays the `menu` reward term. Why: under version 1 the
limit counted env steps including paused ones, so a policy that never chose a card sat out
the clock in a game where nothing could hurt it and beat every policy that played. Now
holding the menu open only delays the game and costs reward, so it is never better than
choosing. Env steps stay bounded: an episode also truncates after
`time_limit + floor(menu_step_allowance * time_limit)` env steps (`max_episode_steps`),
which a policy choosing within the dwell limit reaches only after more than
`allowance * time_limit / menu_dwell_limit` level-ups (46 at the defaults).
Version 1 (time limit in env steps, no forced choice, no menu term) is not available;
`RULES_VERSION` is recorded in every training config and recording so that results from
it are refused instead of compared.

Cost: under `vmap` every env runs every branch, so the per-step work is kept to a few
elementwise passes over the entity slots: spawns touch only `SPAWNS_PER_TICK` ring slots
(no cumsum/sort over free slots), per-kind tables are select chains rather than gathers,
and one 64-bit threefry draw per step supplies all the randomness.
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from mbjax.envs.bonk_arena import rewards

# Enemy kinds (indices into the per-kind tables of `EnvParams`).
GRUNT, FAST, TOUGH, BOSS = 0, 1, 2, 3
NUM_KINDS = 4

# Upgrade cards (indices into `EnvState.upgrades` and `EnvParams.card_increments`).
CARDS: tuple[str, ...] = (
    "damage", "attack_speed", "range", "move_speed", "max_health", "pickup_radius",
    "regeneration")
DAMAGE, ATTACK_SPEED, RANGE, MOVE_SPEED, MAX_HEALTH, PICKUP_RADIUS, REGENERATION = range(7)
NUM_CARDS = len(CARDS)  # 7 is prime: any stride 1..6 walks 3 distinct cards (see `_deal_cards`).
CARDS_PER_MENU = 3

SPAWNS_PER_TICK = 2

# Bumped whenever a rule change makes returns incomparable with earlier ones (module
# docstring); training configs and recordings carry it.
RULES_VERSION = 2


# `menu_dwell_limit` where a player, not a learner, picks the cards (the dual-system runtime,
# the reference BonkLink server): a menu waits 10 s at 60 Hz for a planner or a VLM, as a
# real game waits; training keeps the short default, which leaves no gain in idling.
RUNTIME_MENU_DWELL = 600


@flax.struct.dataclass
class EnvParams:
  """Game tunables. Units: world units and game ticks (steps)."""

  arena_size: float = 24.0
  time_limit: int = 1500  # game ticks (paused menu steps excluded) before truncation.
  # Consecutive menu steps without a choice after which the first offered card is taken.
  menu_dwell_limit: int = 8
  # Env-step cap: an episode also truncates after time_limit + floor(this * time_limit)
  # env steps (game ticks plus menu steps), so its length is bounded (`max_episode_steps`).
  menu_step_allowance: float = 0.25
  # Player base stats; cards add `card_increments` per level on top of these.
  player_radius: float = 0.5
  base_max_health: float = 10.0
  base_move_speed: float = 0.3
  base_damage: float = 1.0
  base_cooldown: float = 10.0  # ticks between auto-attacks.
  base_range: float = 5.0
  base_pickup_radius: float = 1.5
  base_regeneration: float = 0.0  # health per tick.
  # Per-card increment, `CARDS` order; attack speed divides the cooldown by (1 + n * inc).
  card_increments: tuple[float, ...] = (0.5, 0.25, 0.75, 0.04, 2.0, 0.75, 0.004)
  # Per-kind tables, (grunt, fast, tough, boss).
  enemy_speed: tuple[float, ...] = (0.11, 0.2, 0.07, 0.14)
  enemy_health: tuple[float, ...] = (2.0, 1.0, 6.0, 30.0)
  enemy_damage: tuple[float, ...] = (0.05, 0.04, 0.1, 0.3)  # health per tick of contact.
  enemy_radius: tuple[float, ...] = (0.5, 0.4, 0.7, 1.2)
  enemy_xp: tuple[float, ...] = (1.0, 1.0, 3.0, 10.0)  # value of the dropped gem.
  # Waves: every `spawn_interval` ticks, `wave_base + game_time // wave_growth` enemies are
  # queued; they enter at most `SPAWNS_PER_TICK` per tick.
  spawn_interval: int = 40
  wave_base: int = 2
  wave_growth: int = 250
  difficulty_ramp: int = 1000  # ticks until the fast/tough shares reach their maximum.
  max_fast_share: float = 0.35
  max_tough_share: float = 0.2
  boss_interval: int = 500  # a boss at game ticks 500, 1000, ...
  # Level-up: reaching level L+1 from L costs `xp_base + xp_growth * (L - 1)` XP.
  xp_base: float = 3.0
  xp_growth: float = 2.0
  reward_weights: tuple[float, ...] = rewards.UPSTREAM_WEIGHTS

  def for_role(self, role: str) -> "EnvParams":
    """These params with the reward weights of a named role (see `rewards.py`)."""
    return self.replace(reward_weights=rewards.role_weights(role))


@flax.struct.dataclass
class EnvState:
  """Everything that changes during an episode. E = max_enemies, G = max_gems."""

  player_pos: jax.Array  # f32[2]
  player_vel: jax.Array  # f32[2], displacement of the last tick.
  health: jax.Array  # f32[]
  upgrades: jax.Array  # i32[NUM_CARDS], how many of each card was taken.
  attack_timer: jax.Array  # f32[], ticks until the next auto-attack may fire.
  xp: jax.Array  # f32[], XP towards the next level.
  level: jax.Array  # i32[], starts at 1.
  menu_open: jax.Array  # bool[]
  menu_cards: jax.Array  # i32[3], card indices on offer (meaningful while the menu is open).
  menu_dwell: jax.Array  # i32[], consecutive menu steps taken without a choice.
  menu_steps: jax.Array  # i32[], menu steps taken this episode (for `menu_fraction`).
  # Entity positions are stored as (x row, y row) so the slot axis is innermost: under vmap
  # that keeps the per-slot math on contiguous memory (about 1.6x faster than [E, 2]).
  enemy_pos: jax.Array  # f32[2, E]
  enemy_health: jax.Array  # f32[E]
  enemy_kind: jax.Array  # i32[E]
  enemy_alive: jax.Array  # bool[E]
  gem_pos: jax.Array  # f32[2, G]
  gem_value: jax.Array  # f32[G]
  gem_alive: jax.Array  # bool[G]
  spawn_queue: jax.Array  # i32[], enemies waiting to enter.
  spawn_slot: jax.Array  # i32[], next enemy slot of the spawn ring.
  gem_slot: jax.Array  # i32[], next gem slot of the drop ring.
  game_time: jax.Array  # i32[], unpaused ticks played (drives spawns and difficulty).
  steps: jax.Array  # i32[], env steps taken (game ticks plus menu steps).
  kills: jax.Array  # i32[]
  boss_kills: jax.Array  # i32[]


def per_kind(values, index):
  """values[index] for a short per-kind table, as a chain of selects: an elementwise op
  that fuses, where a gather from a tiny table costs more than the rest of the step."""
  out = jnp.full(jnp.shape(index), values[-1], jnp.float32)
  for i in range(len(values) - 2, -1, -1):
    out = jnp.where(index == i, jnp.asarray(values[i], jnp.float32), out)
  return out


def stat(params: EnvParams, upgrades: jax.Array, card: int) -> jax.Array:
  """The player's current value of the stat a card improves."""
  inc = jnp.asarray(params.card_increments, jnp.float32)[card]
  n = upgrades[card].astype(jnp.float32)
  if card == ATTACK_SPEED:  # reported as the cooldown in ticks
    return params.base_cooldown / (1.0 + inc * n)
  base = (params.base_damage, None, params.base_range, params.base_move_speed,
          params.base_max_health, params.base_pickup_radius, params.base_regeneration)[card]
  return base + inc * n


def xp_to_next_level(params: EnvParams, level: jax.Array) -> jax.Array:
  return params.xp_base + params.xp_growth * (level - 1).astype(jnp.float32)


def max_episode_steps(params: EnvParams):
  """The env-step cap of an episode: a Python int for concrete params (rollouts use it as a
  static length), an i32 array when the params are traced."""
  extra = params.menu_step_allowance * params.time_limit
  if isinstance(extra, (int, float)):
    return int(params.time_limit) + int(extra)
  return params.time_limit + jnp.floor(extra).astype(jnp.int32)


def initial_state(params: EnvParams, max_enemies: int, max_gems: int) -> EnvState:
  """The start of every episode: player in the centre, empty arena (no randomness, so a
  reset costs a few constant arrays under vmap)."""
  centre = jnp.full((2,), 0.5, jnp.float32) * params.arena_size
  return EnvState(
      player_pos=centre,
      player_vel=jnp.zeros((2,), jnp.float32),
      health=jnp.asarray(params.base_max_health, jnp.float32),
      upgrades=jnp.zeros((NUM_CARDS,), jnp.int32),
      attack_timer=jnp.zeros((), jnp.float32),
      xp=jnp.zeros((), jnp.float32),
      level=jnp.ones((), jnp.int32),
      menu_open=jnp.zeros((), bool),
      menu_cards=jnp.arange(CARDS_PER_MENU, dtype=jnp.int32),
      menu_dwell=jnp.zeros((), jnp.int32),
      menu_steps=jnp.zeros((), jnp.int32),
      enemy_pos=jnp.zeros((2, max_enemies), jnp.float32),
      enemy_health=jnp.zeros((max_enemies,), jnp.float32),
      enemy_kind=jnp.zeros((max_enemies,), jnp.int32),
      enemy_alive=jnp.zeros((max_enemies,), bool),
      gem_pos=jnp.zeros((2, max_gems), jnp.float32),
      gem_value=jnp.zeros((max_gems,), jnp.float32),
      gem_alive=jnp.zeros((max_gems,), bool),
      spawn_queue=jnp.zeros((), jnp.int32),
      spawn_slot=jnp.zeros((), jnp.int32),
      gem_slot=jnp.zeros((), jnp.int32),
      game_time=jnp.zeros((), jnp.int32),
      steps=jnp.zeros((), jnp.int32),
      kills=jnp.zeros((), jnp.int32),
      boss_kills=jnp.zeros((), jnp.int32),
  )


def _edge_points(u: jax.Array, arena_size, inset) -> jax.Array:
  """Maps u in [0, 1) to a point on the arena's perimeter, `inset` inside the walls."""
  t = 4.0 * u
  side = jnp.floor(t)
  along = inset + (t - side) * (arena_size - 2.0 * inset)
  across = jnp.where(side < 2, inset, arena_size - inset)  # sides 0, 1: top, left
  horizontal = (side == 0) | (side == 2)
  x = jnp.where(horizontal, along, across)
  y = jnp.where(horizontal, across, along)
  return jnp.stack([x, y])


def _uniforms(key: jax.Array) -> jax.Array:
  """f32[6] in [0, 1) from a single threefry block: 2 x 16-bit and 4 x 8-bit fields of two
  random u32 words (coarse, but plenty for spawn points, kinds and card deals)."""
  bits = jax.random.bits(key, (2,), jnp.uint32)
  fields = jnp.stack([
      bits[0] >> 16, bits[0] & 0xFFFF,  # 16-bit: two spawn positions
      bits[1] >> 24, (bits[1] >> 16) & 0xFF, (bits[1] >> 8) & 0xFF, bits[1] & 0xFF])
  scale = jnp.asarray([2.0**-16] * 2 + [2.0**-8] * 4, jnp.float32)
  return fields.astype(jnp.float32) * scale


def _deal_cards(u_offset, u_stride) -> jax.Array:
  """3 distinct cards: offset + stride * (0, 1, 2) mod 7 with stride in 1..6 (7 is prime)."""
  offset = jnp.floor(u_offset * NUM_CARDS).astype(jnp.int32)
  stride = 1 + jnp.floor(u_stride * (NUM_CARDS - 1)).astype(jnp.int32)
  return (offset + stride * jnp.arange(CARDS_PER_MENU, dtype=jnp.int32)) % NUM_CARDS


def choose_card(state: EnvState, choice: jax.Array, params: EnvParams) -> EnvState:
  """Menu step: `choice` in {0, 1, 2} takes that card and closes the menu; 3 (no-op) or a
  card choice while the menu is closed changes nothing, except that the `menu_dwell_limit`-th
  consecutive no-op takes card 0. A max-health card also heals by the health it adds."""
  chooses = (choice >= 0) & (choice < CARDS_PER_MENU)
  forced = ~chooses & (state.menu_dwell + 1 >= params.menu_dwell_limit)
  takes = state.menu_open & (chooses | forced)
  card = state.menu_cards[jnp.where(chooses, choice, 0)]
  gained = (jnp.arange(NUM_CARDS) == card) & takes
  heal = gained[MAX_HEALTH] * jnp.asarray(params.card_increments[MAX_HEALTH], jnp.float32)
  return state.replace(
      upgrades=state.upgrades + gained.astype(jnp.int32),
      menu_open=state.menu_open & ~takes,
      menu_dwell=jnp.where(takes, 0, state.menu_dwell + state.menu_open.astype(jnp.int32)),
      menu_steps=state.menu_steps + state.menu_open.astype(jnp.int32),
      health=state.health + heal,
      player_vel=jnp.zeros((2,), jnp.float32),
  )


def play_tick(key: jax.Array, state: EnvState, move: jax.Array,
              params: EnvParams) -> tuple[EnvState, jax.Array]:
  """One unpaused game tick. Returns the new state and the raw reward terms
  f32[NUM_REWARD_TERMS] (the `menu` term is 0: a tick is not a menu step)."""
  f32 = jnp.float32
  arena = jnp.asarray(params.arena_size, f32)
  num_enemies = state.enemy_alive.shape[0]
  num_gems = state.gem_alive.shape[0]
  u = _uniforms(key)

  # 1. Player movement, clamped by the walls.
  move = jnp.clip(move, -1.0, 1.0)
  move = move / jnp.maximum(1.0, jnp.linalg.norm(move))  # diagonals are not faster
  speed = stat(params, state.upgrades, MOVE_SPEED)
  r_p = params.player_radius
  wanted = state.player_pos + move * speed
  pos = jnp.clip(wanted, r_p, arena - r_p)
  hit_wall = jnp.any(jnp.abs(wanted - pos) > 1e-6)
  vel = pos - state.player_pos

  # 2. Enemies chase the player (stopping on it rather than overshooting).
  kind = state.enemy_kind
  rel = pos[:, None] - state.enemy_pos
  dist = jnp.sqrt(jnp.sum(rel * rel, axis=0) + 1e-12)
  step_len = jnp.minimum(per_kind(params.enemy_speed, kind), dist)
  enemy_pos = state.enemy_pos + rel * (step_len / dist)[None, :]
  rel = pos[:, None] - enemy_pos
  dist = jnp.sqrt(jnp.sum(rel * rel, axis=0) + 1e-12)

  # 3. Contact damage, then regeneration.
  alive = state.enemy_alive
  touching = alive & (dist < r_p + per_kind(params.enemy_radius, kind))
  damage_taken = jnp.sum(jnp.where(touching, per_kind(params.enemy_damage, kind), 0.0))
  max_health = stat(params, state.upgrades, MAX_HEALTH)
  regen = stat(params, state.upgrades, REGENERATION)
  health = jnp.minimum(state.health - damage_taken + regen, max_health)

  # 4. Auto-attack: an instant hit on the nearest enemy in range.
  masked = jnp.where(alive, dist, jnp.inf)
  target = jnp.argmin(masked)
  in_range = masked[target] <= stat(params, state.upgrades, RANGE)
  fire = (state.attack_timer <= 0.0) & in_range
  hit = (jnp.arange(num_enemies) == target) & fire
  enemy_health = state.enemy_health - jnp.where(hit, stat(params, state.upgrades, DAMAGE), 0.0)
  killed = hit & (enemy_health <= 0.0)
  any_kill = jnp.any(killed)
  boss_killed = jnp.any(killed & (kind == BOSS))
  enemy_alive = alive & ~killed
  cooldown = stat(params, state.upgrades, ATTACK_SPEED)
  attack_timer = jnp.where(fire, cooldown, jnp.maximum(state.attack_timer - 1.0, 0.0))

  # A kill drops a gem into the next slot of the gem ring (replacing the oldest gem).
  dropped = (jnp.arange(num_gems) == state.gem_slot) & any_kill
  gem_slot = (state.gem_slot + any_kill.astype(jnp.int32)) % num_gems
  gem_alive = state.gem_alive | dropped
  gem_pos = jnp.where(dropped[None, :], enemy_pos[:, target][:, None], state.gem_pos)
  gem_value = jnp.where(dropped, per_kind(params.enemy_xp, kind[target]), state.gem_value)

  # 5. Gem pickup.
  gem_rel = gem_pos - pos[:, None]
  gem_d2 = jnp.sum(gem_rel * gem_rel, axis=0)
  picked = gem_alive & (gem_d2 <= stat(params, state.upgrades, PICKUP_RADIUS) ** 2)
  xp_gained = jnp.sum(jnp.where(picked, gem_value, 0.0))
  gem_alive = gem_alive & ~picked

  # 6. Level-up opens the menu (one level per tick; leftover XP levels up on a later tick).
  xp = state.xp + xp_gained
  needed = xp_to_next_level(params, state.level)
  level_up = xp >= needed
  xp = jnp.where(level_up, xp - needed, xp)
  level = state.level + level_up.astype(jnp.int32)
  menu_cards = jnp.where(level_up, _deal_cards(u[4], u[5]), state.menu_cards)

  # 7. Spawns: queue a wave on schedule, then up to SPAWNS_PER_TICK enter at the ring slots.
  t = state.game_time
  slots = jnp.arange(num_enemies)
  wave_due = (t % params.spawn_interval) == 0
  queue = state.spawn_queue + jnp.where(wave_due, params.wave_base + t // params.wave_growth, 0)
  queue = jnp.minimum(queue, num_enemies)
  boss_due = (t > 0) & (t % params.boss_interval == 0)
  ramp = jnp.clip(t.astype(f32) / params.difficulty_ramp, 0.0, 1.0)
  spawned = jnp.zeros((), jnp.int32)
  for j in range(SPAWNS_PER_TICK):  # static and tiny: one pass over the slots per spawn
    slot = (state.spawn_slot + j) % num_enemies
    at_slot = slots == slot
    boss = boss_due if j == 0 else jnp.zeros((), bool)
    enters = boss | ((j < queue) & ~jnp.any(at_slot & enemy_alive))
    u_kind = u[2 + j]
    new_kind = jnp.where(u_kind < ramp * params.max_fast_share, FAST,
                         jnp.where(u_kind >= 1.0 - ramp * params.max_tough_share, TOUGH, GRUNT))
    new_kind = jnp.where(boss, BOSS, new_kind)
    spawn_pos = _edge_points(u[j], arena, per_kind(params.enemy_radius, new_kind))
    placed = at_slot & enters
    enemy_pos = jnp.where(placed[None, :], spawn_pos[:, None], enemy_pos)
    kind = jnp.where(placed, new_kind, kind)
    enemy_health = jnp.where(placed, per_kind(params.enemy_health, new_kind), enemy_health)
    enemy_alive = enemy_alive | placed
    spawned = spawned + (enters & ~boss).astype(jnp.int32)

  terms = jnp.stack([
      jnp.ones((), f32),
      xp_gained,
      level_up.astype(f32),
      boss_killed.astype(f32),
      jnp.linalg.norm(vel) / speed,
      damage_taken,
      hit_wall.astype(f32),
      jnp.zeros((), f32),
  ])
  new_state = state.replace(
      player_pos=pos, player_vel=vel, health=health, attack_timer=attack_timer, xp=xp,
      level=level, menu_open=level_up, menu_cards=menu_cards, enemy_pos=enemy_pos,
      enemy_health=enemy_health, enemy_kind=kind, enemy_alive=enemy_alive,
      gem_pos=gem_pos, gem_value=gem_value, gem_alive=gem_alive, spawn_queue=queue - spawned,
      spawn_slot=(state.spawn_slot + SPAWNS_PER_TICK) % num_enemies, gem_slot=gem_slot,
      game_time=t + 1,
      kills=state.kills + any_kill.astype(jnp.int32),
      boss_kills=state.boss_kills + boss_killed.astype(jnp.int32))
  return new_state, terms


def game_step(key: jax.Array, state: EnvState, move: jax.Array, choice: jax.Array,
              params: EnvParams) -> tuple[EnvState, jax.Array]:
  """One env step: a menu step while the menu is open, otherwise a game tick.

  Both branches are computed and selected (under vmap a `lax.cond` would do the same). A
  menu step's only reward term is `menu` = 1.
  """
  played, play_terms = play_tick(key, state, move, params)
  chosen = choose_card(state, choice, params)
  paused = state.menu_open
  new_state = jax.tree.map(lambda a, b: jnp.where(paused, a, b), chosen, played)
  menu_terms = jnp.zeros_like(play_terms).at[rewards.MENU].set(1.0)
  terms = jnp.where(paused, menu_terms, play_terms)
  return new_state.replace(steps=state.steps + 1), terms
