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
the menu branch) cover the middle quarter of the frame. A dead player's state (health 0, the
state a killing hit leaves: the episode's terminal state) is drawn as a death screen, as a
game shows one, the same in every palette: the arena in shades of red only, crossed by a
white full-width band (`DEATH_BAND`), the health bar empty.

Options (all off by default; the default frame is unchanged by them):
- `camera="follow"`: the view is centred on the player and shows `view_fraction` of the
  arena side, so the whole scene scrolls as the player moves (fast camera motion, as in
  the real game). The floor gets a world-anchored grid every `GRID` world units (otherwise
  a flat floor would hide the motion) and the area outside the arena is drawn dark;
  sprites scale with the zoom.
- `palette`: "default" or "desert" (every colour differs, cards included), for testing
  whether models trained on one look transfer to another.
- `upgrade_hud=True`: the bottom 2u rows show, for each card kind (`game.CARDS` order, one
  slot of S // 7 pixels each), a marker in the card's colour, a gap, and the number of
  cards taken as 6 binary digits (most significant first; lit = card colour), like the
  item icons with counts real games show. Without it the card chosen in a level-up menu
  is invisible once the menu closes; binary digits show every increment up to 63 where a
  bar would saturate.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mbjax.envs.bonk_arena import game

# Draw priority (higher wins) and colour of everything on screen.
FLOOR, WALL, GEM, GRUNT, FAST, TOUGH, BOSS, PLAYER, HUD, MENU = range(10)
COLOURS = {  # the default palette
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
    "grid": (40, 46, 52),  # follow camera only
    "outside": (8, 8, 10),  # follow camera only
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
PALETTES = {
    "default": (COLOURS, CARD_COLOURS),
    "desert": ({
        "floor": (196, 172, 124),
        "wall": (112, 76, 44),
        "gem": (24, 80, 200),
        "grunt": (96, 36, 20),
        "fast": (170, 60, 0),
        "tough": (40, 70, 40),
        "boss": (20, 20, 90),
        "player": (16, 16, 16),
        "bar_empty": (84, 64, 44),
        "health": (190, 30, 30),
        "xp": (250, 220, 60),
        "menu_border": (30, 20, 10),
        "grid": (180, 156, 110),
        "outside": (60, 44, 30),
    }, np.array([
        (90, 20, 120),  # damage
        (20, 120, 120),  # attack speed
        (230, 120, 20),  # range
        (150, 40, 60),  # move speed
        (30, 60, 160),  # max health
        (250, 250, 250),  # pickup radius
        (110, 90, 10),  # regeneration
    ], dtype=np.int32)),
}
CAMERAS = ("fixed", "follow")
GRID = 2.0  # world units between floor grid lines (follow camera)
HUD_BITS = 6  # binary digits per card kind in the upgrade HUD (counts up to 63)
DEATH_BAND = (7 / 16, 9 / 16)  # rows of the death screen's band, as fractions of the side


def _packed(priority: int, rgb) -> int:
  r, g, b = (int(c) for c in rgb)
  return (priority << 24) | (r << 16) | (g << 8) | b


def _death_tint(packed: jax.Array) -> jax.Array:
  """Packed colours → the same priority, red only at the colour's mean brightness."""
  grey = (((packed >> 16) & 0xFF) + ((packed >> 8) & 0xFF) + (packed & 0xFF)) // 3
  return ((packed >> 24) << 24) | (jnp.maximum(grey, 40) << 16)


def _square(half_lo: int, half_hi: int) -> np.ndarray:
  """Pixel offsets (dy, dx) of a square sprite covering [-half_lo, half_hi] on both axes."""
  r = np.arange(-half_lo, half_hi + 1)
  return np.stack(np.meshgrid(r, r, indexing="ij"), -1).reshape(-1, 2)


class Renderer:
  """Static drawing data for one frame size and look; `__call__(state, params)` draws a frame.

  Args:
    pixel_size: S, the frame side.
    camera: "fixed" (the whole arena) or "follow" (centred on the player, see module doc).
    palette: a key of `PALETTES`.
    upgrade_hud: draw the per-card upgrade counts in the bottom rows.
    view_fraction: with the follow camera, the visible part of the arena side.
  """

  def __init__(self, pixel_size: int, camera: str = "fixed", palette: str = "default",
               upgrade_hud: bool = False, view_fraction: float = 0.5):
    if pixel_size < 16:
      raise ValueError(f"pixel_size must be >= 16, got {pixel_size}")
    if camera not in CAMERAS:
      raise ValueError(f"camera must be one of {CAMERAS}, got {camera!r}")
    if palette not in PALETTES:
      raise ValueError(f"palette must be one of {sorted(PALETTES)}, got {palette!r}")
    if not 0.0 < view_fraction <= 1.0:
      raise ValueError(f"view_fraction must be in (0, 1], got {view_fraction}")
    s = self.size = int(pixel_size)
    self.camera, self.palette, self.upgrade_hud = camera, palette, bool(upgrade_hud)
    self.view_fraction = float(view_fraction) if camera == "follow" else 1.0
    colours, card_colours = PALETTES[palette]
    self.colours = colours
    u = self.unit = max(1, s // 64)
    self.bar = 2 * u
    h = max(1, round(u / self.view_fraction))  # sprite half-size grows with the zoom
    self.gem_sprite = _square(0, 2 * h - 1) - h // 2
    self.enemy_sprite = _square(h, h)
    self.player_sprite = _square(h, h)
    self.boss_sprite = _square(2 * h, 2 * h)
    self.kind_colours = np.array([
        _packed(p, colours[n]) for p, n in
        ((GRUNT, "grunt"), (FAST, "fast"), (TOUGH, "tough"), (BOSS, "boss"))], np.int32)
    self.card_colours = np.array([_packed(MENU, c) for c in card_colours], np.int32)

    background = np.full((s, s), _packed(FLOOR, colours["floor"]), np.int32)
    wall = _packed(WALL, colours["wall"])
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
    rows = np.arange(s)
    self.death_band = (rows >= int(DEATH_BAND[0] * s)) & (rows < int(DEATH_BAND[1] * s))

    # Upgrade HUD columns: card kind per column (-1: none), and what the column shows:
    # -1 the marker, -2 blank, else the binary digit's weight.
    slot = s // game.NUM_CARDS
    cell = max(1, slot // (HUD_BITS + 2))
    kind = np.full(s, -1, np.int32)
    weight = np.full(s, -2, np.int32)
    for card in range(game.NUM_CARDS):
      left = card * slot
      kind[left:left + cell * (HUD_BITS + 2)] = card
      weight[left:left + cell] = -1
      for bit in range(HUD_BITS):
        lo = left + cell * (2 + bit)
        weight[lo:lo + cell] = 2 ** (HUD_BITS - 1 - bit)
    self.hud_kind, self.hud_weight = kind, weight

  def _scatter_index(self, pos_px: jax.Array, sprite: np.ndarray, visible: jax.Array):
    """Flat canvas indices of `sprite` drawn at integer pixel positions i32[2, N] (x, y)."""
    s = self.size
    y = pos_px[1][:, None] + sprite[None, :, 0]
    x = pos_px[0][:, None] + sprite[None, :, 1]
    ok = visible[:, None] & (x >= 0) & (x < s) & (y >= 0) & (y < s)
    return jnp.where(ok, y * s + x, s * s).reshape(-1)  # s*s is out of bounds: dropped

  def _follow_background(self, origin: jax.Array, scale: jax.Array, arena: jax.Array):
    """i32[S*S]: floor with a world-anchored grid, walls and the outside, seen from a
    camera whose top-left corner is at world `origin` (x, y)."""
    c = self.colours
    centres = (jnp.arange(self.size, dtype=jnp.float32) + 0.5) / scale
    wx, wy = origin[0] + centres[None, :], origin[1] + centres[:, None]
    wall_width = self.unit / scale * (1.0 / self.view_fraction)
    pixel = 1.0 / scale
    grid = (((wx - jnp.floor(wx / GRID) * GRID) < pixel)
            | ((wy - jnp.floor(wy / GRID) * GRID) < pixel))
    inside = (wx >= 0) & (wx < arena) & (wy >= 0) & (wy < arena)
    near_edge = ((wx < wall_width) | (wx >= arena - wall_width) | (wy < wall_width)
                 | (wy >= arena - wall_width))
    out = jnp.where(grid, _packed(FLOOR, c["grid"]), _packed(FLOOR, c["floor"]))
    out = jnp.where(inside & near_edge, _packed(WALL, c["wall"]), out)
    return jnp.where(inside, out, _packed(FLOOR, c["outside"])).reshape(-1)

  def camera_origin(self, state: game.EnvState, params: game.EnvParams) -> jax.Array:
    """f32[2]: world (x, y) of the frame's top-left corner."""
    if self.camera == "fixed":
      return jnp.zeros((2,), jnp.float32)
    view = jnp.asarray(params.arena_size, jnp.float32) * self.view_fraction
    return state.player_pos - 0.5 * view

  def packed_frame(self, state: game.EnvState, params: game.EnvParams) -> jax.Array:
    """i32[S, S] of `priority << 24 | r << 16 | g << 8 | b`."""
    s = self.size
    c = self.colours
    arena = jnp.asarray(params.arena_size, jnp.float32)
    scale = s / (arena * self.view_fraction)
    origin = self.camera_origin(state, params)

    def to_px(p):  # p: f32[2, N] world positions (x row, y row)
      if self.camera == "fixed":
        return jnp.floor(p * scale).astype(jnp.int32)
      return jnp.floor((p - origin[:, None]) * scale).astype(jnp.int32)

    kind = state.enemy_kind
    kind_colour = jnp.where(kind == game.GRUNT, self.kind_colours[0], jnp.where(
        kind == game.FAST, self.kind_colours[1], jnp.where(
            kind == game.TOUGH, self.kind_colours[2], self.kind_colours[3])))
    is_boss = state.enemy_alive & (kind == game.BOSS)
    boss = jnp.argmax(is_boss)  # the first alive boss gets the big sprite
    parts = [
        (self._scatter_index(to_px(state.gem_pos), self.gem_sprite, state.gem_alive),
         _packed(GEM, c["gem"])),
        (self._scatter_index(to_px(state.enemy_pos), self.enemy_sprite, state.enemy_alive),
         jnp.repeat(kind_colour, self.enemy_sprite.shape[0])),
        (self._scatter_index(to_px(state.enemy_pos[:, boss][:, None]), self.boss_sprite,
                             is_boss[boss][None]), int(self.kind_colours[3])),
        (self._scatter_index(to_px(state.player_pos[:, None]), self.player_sprite,
                             jnp.ones((1,), bool)), _packed(PLAYER, c["player"])),
    ]
    index = jnp.concatenate([idx for idx, _ in parts])
    colour = jnp.concatenate([
        jnp.broadcast_to(jnp.asarray(col, jnp.int32), idx.shape) for idx, col in parts])
    background = (jnp.asarray(self.background) if self.camera == "fixed"
                  else self._follow_background(origin, scale, arena))
    canvas = background.at[index].max(colour, mode="drop")

    boxes = jnp.asarray(self.menu_boxes)
    offered = jnp.asarray(self.card_colours)[state.menu_cards]  # 3 packed colours
    box_colour = jnp.where(boxes == 0, offered[0], jnp.where(
        boxes == 1, offered[1], jnp.where(
            boxes == 2, offered[2], _packed(MENU, c["menu_border"]))))
    canvas = jnp.where(state.menu_open & (boxes >= 0), box_colour, canvas).reshape(s, s)
    death_screen = jnp.where(jnp.asarray(self.death_band)[:, None],
                             _packed(MENU, (255, 255, 255)),
                             _death_tint(canvas))
    canvas = jnp.where(state.health <= 0.0, death_screen, canvas)

    # HUD: health and XP bars across the top rows.
    cols = jnp.arange(s, dtype=jnp.float32) + 0.5
    health_frac = state.health / game.stat(params, state.upgrades, game.MAX_HEALTH)
    xp_frac = state.xp / game.xp_to_next_level(params, state.level)
    empty = _packed(HUD, c["bar_empty"])
    health_row = jnp.where(cols < health_frac * s, _packed(HUD, c["health"]), empty)
    xp_row = jnp.where(cols < xp_frac * s, _packed(HUD, c["xp"]), empty)
    hud = jnp.concatenate([jnp.broadcast_to(health_row, (self.bar, s)),
                           jnp.broadcast_to(xp_row, (self.bar, s))])
    if not self.upgrade_hud:
      return jnp.concatenate([hud, canvas[2 * self.bar:]])
    return jnp.concatenate([hud, canvas[2 * self.bar:s - self.bar],
                            self._upgrade_row(state)[None].repeat(self.bar, axis=0)])

  def _upgrade_row(self, state: game.EnvState) -> jax.Array:
    """i32[S]: one row of the upgrade HUD (see the module docstring)."""
    kind = jnp.asarray(self.hud_kind)
    weight = jnp.asarray(self.hud_weight)
    count = jnp.minimum(state.upgrades, 2**HUD_BITS - 1)[jnp.maximum(kind, 0)]
    lit = (weight == -1) | ((weight > 0) & ((count // jnp.maximum(weight, 1)) % 2 == 1))
    colour = (jnp.asarray(self.card_colours)[jnp.maximum(kind, 0)] & 0xFFFFFF) | (HUD << 24)
    return jnp.where((kind >= 0) & lit, colour, _packed(HUD, self.colours["bar_empty"]))

  def __call__(self, state: game.EnvState, params: game.EnvParams) -> jax.Array:
    """uint8[S, S, 3] RGB frame."""
    packed = self.packed_frame(state, params)
    return jnp.stack([(packed >> 16) & 0xFF, (packed >> 8) & 0xFF, packed & 0xFF],
                     axis=-1).astype(jnp.uint8)
