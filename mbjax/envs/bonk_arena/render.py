"""Draws a BonkArena state as an RGB image, in JAX (used for pixel observations and videos).

Cheap by construction: the frame is an int32 canvas of packed `priority << 24 | rgb` values.
Every sprite pixel is one element of a single scatter-max (a few hundred per frame instead of
a per-pixel test against every entity), and because the priority sits in the high bits,
overlapping sprites layer deterministically (player over boss over enemies over gems over
walls over floor). HUD bars and the menu overlay are selects over static regions, and the RGB
channels come out with shifts and masks (a palette gather per pixel was 4x slower than
everything else together on CPU).

Screen layout (S = pixel_size, u = max(1, S // 64)): the arena fills the frame (1 px =
arena_size / S world units) with a u-pixel wall border; the top 2u rows hold the health bar
(green) and the next 2u rows the XP bar (blue); while the level-up menu is open three card
boxes (white border, filled with the card's colour from `CARD_COLOURS`, left to right as in
the menu branch) cover the middle quarter of the frame.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mbjax.envs.bonk_arena import game

# Draw priority (higher wins) and colour of everything on screen.
FLOOR, WALL, GEM, GRUNT, FAST, TOUGH, BOSS, PLAYER, HUD, MENU = range(10)
COLOURS = {
    "floor": (28, 32, 36),
    "wall": (110, 110, 120),
    "gem": (60, 230, 230),
    "grunt": (220, 50, 50),
    "fast": (250, 150, 30),
    "tough": (150, 70, 200),
    "boss": (240, 40, 200),
    "player": (250, 250, 250),
    "bar_empty": (10, 10, 10),
    "health": (60, 210, 60),
    "xp": (70, 110, 250),
    "menu_border": (255, 255, 255),
}
CARD_COLOURS = np.array([
    (200, 40, 40),  # damage
    (240, 200, 40),  # attack speed
    (40, 160, 240),  # range
    (60, 220, 120),  # move speed
    (240, 110, 160),  # max health
    (170, 240, 240),  # pickup radius
    (120, 240, 60),  # regeneration
], dtype=np.int32)


def _packed(priority: int, rgb) -> int:
  r, g, b = (int(c) for c in rgb)
  return (priority << 24) | (r << 16) | (g << 8) | b


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
    self.kind_colours = np.array([
        _packed(p, COLOURS[n]) for p, n in
        ((GRUNT, "grunt"), (FAST, "fast"), (TOUGH, "tough"), (BOSS, "boss"))], np.int32)
    self.card_colours = np.array([_packed(MENU, c) for c in CARD_COLOURS], np.int32)

    background = np.full((s, s), _packed(FLOOR, COLOURS["floor"]), np.int32)
    wall = _packed(WALL, COLOURS["wall"])
    background[:u, :] = background[-u:, :] = wall
    background[:, :u] = background[:, -u:] = wall
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
    """Flat canvas indices of `sprite` drawn at integer pixel positions i32[2, N] (x, y)."""
    s = self.size
    y = pos_px[1][:, None] + sprite[None, :, 0]
    x = pos_px[0][:, None] + sprite[None, :, 1]
    ok = visible[:, None] & (x >= 0) & (x < s) & (y >= 0) & (y < s)
    return jnp.where(ok, y * s + x, s * s).reshape(-1)  # s*s is out of bounds: dropped

  def packed_frame(self, state: game.EnvState, params: game.EnvParams) -> jax.Array:
    """i32[S, S] of `priority << 24 | r << 16 | g << 8 | b`."""
    s = self.size
    scale = s / jnp.asarray(params.arena_size, jnp.float32)

    def to_px(p):
      return jnp.floor(p * scale).astype(jnp.int32)

    kind = state.enemy_kind
    kind_colour = jnp.where(kind == game.GRUNT, self.kind_colours[0], jnp.where(
        kind == game.FAST, self.kind_colours[1], jnp.where(
            kind == game.TOUGH, self.kind_colours[2], self.kind_colours[3])))
    is_boss = state.enemy_alive & (kind == game.BOSS)
    boss = jnp.argmax(is_boss)  # the first alive boss gets the big sprite
    parts = [
        (self._scatter_index(to_px(state.gem_pos), self.gem_sprite, state.gem_alive),
         _packed(GEM, COLOURS["gem"])),
        (self._scatter_index(to_px(state.enemy_pos), self.enemy_sprite, state.enemy_alive),
         jnp.repeat(kind_colour, self.enemy_sprite.shape[0])),
        (self._scatter_index(to_px(state.enemy_pos[:, boss][:, None]), self.boss_sprite,
                             is_boss[boss][None]), int(self.kind_colours[3])),
        (self._scatter_index(to_px(state.player_pos)[:, None], self.player_sprite,
                             jnp.ones((1,), bool)), _packed(PLAYER, COLOURS["player"])),
    ]
    index = jnp.concatenate([idx for idx, _ in parts])
    colour = jnp.concatenate([
        jnp.broadcast_to(jnp.asarray(c, jnp.int32), idx.shape) for idx, c in parts])
    canvas = jnp.asarray(self.background).at[index].max(colour, mode="drop")

    boxes = jnp.asarray(self.menu_boxes)
    offered = jnp.asarray(self.card_colours)[state.menu_cards]  # 3 packed colours
    box_colour = jnp.where(boxes == 0, offered[0], jnp.where(
        boxes == 1, offered[1], jnp.where(
            boxes == 2, offered[2], _packed(MENU, COLOURS["menu_border"]))))
    canvas = jnp.where(state.menu_open & (boxes >= 0), box_colour, canvas).reshape(s, s)

    # HUD: health and XP bars across the top rows.
    cols = jnp.arange(s, dtype=jnp.float32) + 0.5
    health_frac = state.health / game.stat(params, state.upgrades, game.MAX_HEALTH)
    xp_frac = state.xp / game.xp_to_next_level(params, state.level)
    empty = _packed(HUD, COLOURS["bar_empty"])
    health_row = jnp.where(cols < health_frac * s, _packed(HUD, COLOURS["health"]), empty)
    xp_row = jnp.where(cols < xp_frac * s, _packed(HUD, COLOURS["xp"]), empty)
    hud = jnp.concatenate([jnp.broadcast_to(health_row, (self.bar, s)),
                           jnp.broadcast_to(xp_row, (self.bar, s))])
    return jnp.concatenate([hud, canvas[2 * self.bar:]])

  def __call__(self, state: game.EnvState, params: game.EnvParams) -> jax.Array:
    """uint8[S, S, 3] RGB frame."""
    packed = self.packed_frame(state, params)
    return jnp.stack([(packed >> 16) & 0xFF, (packed >> 8) & 0xFF, packed & 0xFF],
                     axis=-1).astype(jnp.uint8)
