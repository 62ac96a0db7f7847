"""Draws a BonkArena state as an RGB image, in JAX (used for pixel observations and videos).

Cheap by construction: the frame is a palette-index canvas; every sprite pixel is one element
of a single scatter-max (a few hundred per frame instead of a per-pixel test against every
entity), and the palette index doubles as the draw priority, so overlapping sprites layer
deterministically (player over boss over enemies over gems over walls over floor). HUD bars
and the menu overlay are static-region selects; a final palette gather makes the RGB frame.

Screen layout (S = pixel_size, u = max(1, S // 64)): the arena fills the frame (1 px =
arena_size / S world units) with a wall border; the top 2u rows hold the health bar and the
next 2u rows the XP bar; while the level-up menu is open three card boxes (coloured by card,
see `CARD_COLOURS`) cover the middle quarter of the frame.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mbjax.envs.bonk_arena import game

FLOOR, WALL, BAR_EMPTY, GEM, GRUNT, FAST, TOUGH, BOSS, PLAYER, HEALTH, XP, BORDER = range(12)
CARD_BASE = 12
PALETTE = np.array([
    (28, 32, 36),  # floor
    (110, 110, 120),  # wall
    (10, 10, 10),  # empty bar
    (60, 230, 230),  # gem
    (220, 50, 50),  # grunt
    (250, 150, 30),  # fast
    (150, 70, 200),  # tough
    (240, 40, 200),  # boss
    (250, 250, 250),  # player
    (60, 210, 60),  # health bar
    (70, 110, 250),  # xp bar
    (255, 255, 255),  # menu border
] + [
    (200, 40, 40),  # card: damage
    (240, 200, 40),  # card: attack speed
    (40, 160, 240),  # card: range
    (60, 220, 120),  # card: move speed
    (240, 110, 160),  # card: max health
    (170, 240, 240),  # card: pickup radius
    (120, 240, 60),  # card: regeneration
], dtype=np.uint8)
CARD_COLOURS = PALETTE[CARD_BASE:]


def _square(half_lo: int, half_hi: int) -> np.ndarray:
  """Pixel offsets (dy, dx) of a square sprite covering [-half_lo, half_hi] on both axes."""
  r = np.arange(-half_lo, half_hi + 1)
  return np.stack(np.meshgrid(r, r, indexing="ij"), -1).reshape(-1, 2)


class Renderer:
  """Static drawing data for one frame size; `__call__(state, params)` draws a frame."""

  def __init__(self, pixel_size: int):
    if pixel_size < 16:
      raise ValueError(f"pixel_size must be >= 16, got {pixel_size}")
    s = self.size = int(pixel_size)
    u = max(1, s // 64)
    self.bar = 2 * u
    self.gem_sprite = _square(0, 2 * u - 1) - u // 2
    self.enemy_sprite = _square(u, u)
    self.player_sprite = _square(u, u)
    self.boss_sprite = _square(2 * u, 2 * u)

    background = np.full((s, s), FLOOR, np.int32)
    background[:u, :] = background[-u:, :] = WALL
    background[:, :u] = background[:, -u:] = WALL
    self.background = background.reshape(-1)

    # Menu boxes: -1 outside, 3 on the border, else the box index 0..2.
    boxes = np.full((s, s), -1, np.int32)
    top, bottom = 3 * s // 8, 5 * s // 8
    width = s // 4
    gap = (s - 3 * width) // 4
    for b in range(game.CARDS_PER_MENU):
      left = gap + b * (width + gap)
      boxes[top:bottom, left:left + width] = 3
      boxes[top + u:bottom - u, left + u:left + width - u] = b
    self.menu_boxes = boxes.reshape(-1)

  def _scatter_index(self, pos_px: jax.Array, sprite: np.ndarray, visible: jax.Array):
    """Flat canvas indices of `sprite` drawn at integer pixel positions (N, 2) as (x, y)."""
    s = self.size
    y = pos_px[:, None, 1] + sprite[None, :, 0]
    x = pos_px[:, None, 0] + sprite[None, :, 1]
    ok = visible[:, None] & (x >= 0) & (x < s) & (y >= 0) & (y < s)
    return jnp.where(ok, y * s + x, s * s).reshape(-1)  # s*s is out of bounds: dropped

  def palette_frame(self, state: game.EnvState, params: game.EnvParams) -> jax.Array:
    """i32[S, S] palette indices of the frame."""
    s = self.size
    scale = s / jnp.asarray(params.arena_size, jnp.float32)

    def to_px(p):
      return jnp.floor(p * scale).astype(jnp.int32)

    kind_colour = jnp.asarray([GRUNT, FAST, TOUGH, BOSS], jnp.int32)[state.enemy_kind]
    is_boss = state.enemy_alive & (state.enemy_kind == game.BOSS)
    boss = jnp.argmax(is_boss)  # the first alive boss gets the big sprite
    player_px = to_px(state.player_pos)[None]
    parts = [
        (self._scatter_index(to_px(state.gem_pos), self.gem_sprite, state.gem_alive), GEM),
        (self._scatter_index(to_px(state.enemy_pos), self.enemy_sprite, state.enemy_alive),
         jnp.repeat(kind_colour, self.enemy_sprite.shape[0])),
        (self._scatter_index(to_px(state.enemy_pos[boss][None]), self.boss_sprite,
                             is_boss[boss][None]), BOSS),
        (self._scatter_index(player_px, self.player_sprite, jnp.ones((1,), bool)), PLAYER),
    ]
    index = jnp.concatenate([idx for idx, _ in parts])
    colour = jnp.concatenate([
        jnp.broadcast_to(jnp.asarray(c, jnp.int32), idx.shape) for idx, c in parts])
    canvas = jnp.asarray(self.background).at[index].max(colour, mode="drop")

    boxes = jnp.asarray(self.menu_boxes)
    card_colour = CARD_BASE + state.menu_cards[jnp.clip(boxes, 0, game.CARDS_PER_MENU - 1)]
    box_colour = jnp.where(boxes == 3, BORDER, card_colour)
    canvas = jnp.where(state.menu_open & (boxes >= 0), box_colour, canvas).reshape(s, s)

    # HUD: health and XP bars across the top rows.
    cols = jnp.arange(s, dtype=jnp.float32) + 0.5
    health_frac = state.health / game.stat(params, state.upgrades, game.MAX_HEALTH)
    xp_frac = state.xp / game.xp_to_next_level(params, state.level)
    health_row = jnp.where(cols < health_frac * s, HEALTH, BAR_EMPTY)
    xp_row = jnp.where(cols < xp_frac * s, XP, BAR_EMPTY)
    hud = jnp.concatenate([jnp.broadcast_to(health_row, (self.bar, s)),
                           jnp.broadcast_to(xp_row, (self.bar, s))])
    return jnp.concatenate([hud, canvas[2 * self.bar:]])

  def __call__(self, state: game.EnvState, params: game.EnvParams) -> jax.Array:
    """uint8[S, S, 3] RGB frame."""
    return jnp.asarray(PALETTE)[self.palette_frame(state, params)]
