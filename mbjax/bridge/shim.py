"""The thin shim between BonkLink states and a learner: observation vector, action mask,
reward, episode ends, and policy actions → action packets. Pure NumPy, no I/O.

BonkLink carries no reward and no observation vector (upstream computed both from YOLO
detections of the frame). For the reference server the state packet has everything needed:

Observation (f32, `observation_size(K)`; K = `num_enemies`, default 8 → 69 floats):
  0:2   player x, z scaled to [-1, 1] by `arena_size`
  2:4   player velocity x, z / `speed_scale`
  4     health / max health;  5  max health / 10
  6     menu open (LevelUp);  7  number of alive enemies / 32
  8:8+5K  the K nearest enemies, nearest first: present, dx, dz, distance (/ arena_size),
          health / 10 (absent slots zero)
  then 3 × one-hot over `card_names` of the offered level-up options (zeros when closed).

Reward (upstream curriculum weights, the terms a state packet can show): survival +0.001 per
playing, unpaused step; damage −1.0 per health lost; level-up +1.0 when the level-up menu
opens. XP, boss kills, velocity and wall terms need data the packet does not carry.
Optionally (`distance_weight` > 0) a dense term rewarding distance to the nearest enemy (a
kiting incentive, like a role re-weighting): it changes the objective, on purpose, so that
short runs get a learning signal (potential-based shaping would not, since it leaves every
policy's discounted return unchanged up to a constant).

Episode ends: `isPlaying` turning false is the end of a run: terminated if health ≤ 0
(death), truncated otherwise (the game's time limit). The actor adds its own time limit.

Menu actions: choice c < 3 becomes a `ui_click` on the centre of card c in BonkArena's
layout (`render.py`: three boxes of width S/4 in the middle quarter of the frame), mapped
from top-left frame pixels to the plugin's bottom-left capture pixels; c = 3 is no click.
"""
from __future__ import annotations

import numpy as np

from mbjax.bridge import codec, coords

DEFAULT_CARD_NAMES = ("damage", "attack_speed", "range", "move_speed", "max_health",
                      "pickup_radius", "regeneration")
NUM_CARDS_PER_MENU = 3
MENU_BRANCH = NUM_CARDS_PER_MENU + 1  # three cards + no-op
ENEMY_FEATURES = 5
LEVEL_UP_MENU = "LevelUp"
WEIGHT_SURVIVAL, WEIGHT_DAMAGE, WEIGHT_LEVEL_UP = 0.001, -1.0, 1.0


def observation_size(num_enemies: int = 8, num_card_kinds: int = len(DEFAULT_CARD_NAMES)) -> int:
  return 8 + ENEMY_FEATURES * num_enemies + NUM_CARDS_PER_MENU * num_card_kinds


def observation(state: codec.GameState, *, arena_size: float = 24.0, num_enemies: int = 8,
                speed_scale: float = 20.0,
                card_names: tuple[str, ...] = DEFAULT_CARD_NAMES) -> np.ndarray:
  """f32[observation_size(num_enemies)] from one state packet (layout in the module doc)."""
  out = np.zeros(observation_size(num_enemies, len(card_names)), np.float32)
  px, _, pz = state.player_position
  out[0:2] = (px / arena_size * 2.0 - 1.0, pz / arena_size * 2.0 - 1.0)
  out[2:4] = (state.player_velocity[0] / speed_scale, state.player_velocity[2] / speed_scale)
  max_health = state.player_max_health if state.player_max_health > 0 else 1.0
  out[4] = state.player_health / max_health
  out[5] = state.player_max_health / 10.0
  menu_open = state.current_menu == LEVEL_UP_MENU
  out[6] = float(menu_open)
  out[7] = len(state.enemies) / 32.0
  if state.enemies:
    enemies = np.array([(e.position[0], e.position[2], e.health) for e in state.enemies],
                       np.float32)
    rel = (enemies[:, :2] - np.array([px, pz], np.float32)) / arena_size
    dist = np.sqrt((rel ** 2).sum(-1))
    nearest = np.argsort(dist, kind="stable")[:num_enemies]
    block = np.stack([np.ones(len(nearest), np.float32), rel[nearest, 0], rel[nearest, 1],
                      dist[nearest], enemies[nearest, 2] / 10.0], axis=-1)
    out[8:8 + block.size] = block.reshape(-1)
  if menu_open:
    base = 8 + ENEMY_FEATURES * num_enemies
    for slot, name in enumerate(state.level_up_options[:NUM_CARDS_PER_MENU]):
      if name in card_names:
        out[base + slot * len(card_names) + card_names.index(name)] = 1.0
  return np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)


def menu_mask(state: codec.GameState) -> np.ndarray:
  """bool[4]: cards offered in an open level-up menu; the no-op always."""
  mask = np.zeros(MENU_BRANCH, bool)
  mask[-1] = True
  if state.current_menu == LEVEL_UP_MENU:
    mask[:min(len(state.level_up_options), NUM_CARDS_PER_MENU)] = True
  return mask


def reward(prev: codec.GameState, cur: codec.GameState, *, distance_weight: float = 0.0,
           arena_size: float = 24.0) -> float:
  """The reward of the step that led from `prev` to `cur` (terms in the module doc), plus
  `distance_weight × enemy_distance(cur)` while playing (0 by default)."""
  survival = float(cur.is_playing and not cur.is_paused and cur.player_health > 0)
  damage = max(prev.player_health - cur.player_health, 0.0) if cur.is_playing or (
      cur.player_health <= 0) else 0.0
  level_up = float(cur.current_menu == LEVEL_UP_MENU and prev.current_menu != LEVEL_UP_MENU)
  r = WEIGHT_SURVIVAL * survival + WEIGHT_DAMAGE * damage + WEIGHT_LEVEL_UP * level_up
  if distance_weight and cur.is_playing and not cur.is_paused:
    r += distance_weight * enemy_distance(cur, arena_size)
  return r


def enemy_distance(state: codec.GameState, arena_size: float = 24.0) -> float:
  """Distance to the nearest enemy / arena size, capped at 0.5 (0.5 with no enemies)."""
  if not state.enemies:
    return 0.5
  px, _, pz = state.player_position
  nearest = min((e.position[0] - px) ** 2 + (e.position[2] - pz) ** 2 for e in state.enemies)
  return min(float(np.sqrt(nearest)) / arena_size, 0.5)


def episode_end(state: codec.GameState) -> tuple[bool, bool]:
  """(ended, terminated): a run ended, and whether by death (no bootstrap)."""
  ended = not state.is_playing
  return ended, ended and state.player_health <= 0.0


def card_centre(card: int, size: int) -> tuple[float, float]:
  """Top-left pixel centre of card `card` in a size×size BonkArena frame (render.py layout)."""
  width = size // 4
  gap = (size - 3 * width) // 4
  return gap + card * (width + gap) + (width - 1) / 2.0, (3 * size // 8 + 5 * size // 8 - 1) / 2.0


def to_action(move: np.ndarray, choice: int, capture_size: tuple[int, int]) -> codec.Action:
  """A policy's env action (move ∈ [-1, 1]², menu choice) → a BonkLink action packet."""
  move = np.clip(np.nan_to_num(np.asarray(move, np.float32)), -1.0, 1.0)
  if 0 <= int(choice) < NUM_CARDS_PER_MENU:
    x, y = card_centre(int(choice), capture_size[0])
    cx, cy = coords.top_left_to_bonklink(x, y, capture_size, capture_size)
    return codec.Action(float(move[0]), float(move[1]), ui_click=True, click_x=cx, click_y=cy)
  return codec.Action(float(move[0]), float(move[1]))


def restart_action() -> codec.Action:
  """What starts the next run on the game-over screen (a click; Submit in the plugin)."""
  return codec.Action(ui_click=True, click_x=0, click_y=0)
