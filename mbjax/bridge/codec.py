"""BonkLink wire format: the state packet, frames (JPEG / MBRF raw RGB) and the action packet.

Bit-exact with upstream MetaBonk (`plugins/BonkLink/BonkLink.cs` ⇄ `src/bridge/bonklink_client.py`,
spec in `reference/upstream_runtime.md` §1.3–1.4). All numbers are little-endian (.NET
`BinaryWriter`); strings are .NET `Write(string)`: a 7-bit varint byte length (low group
first) and UTF-8 bytes; bools are one byte.

Plugin → worker packet: `i32 state_size, state_bytes, i32 frame_size, frame_bytes`. State
layout: player position f32×3, velocity f32×3, health, max health, game time (f32 each),
isPlaying, isPaused (bool), i32 N + N × (x, y, z, health f32), currentMenu (string), i32 M +
M × option (string), then optionally the 36-byte `HINP` human-input trailer.

Worker → plugin: `i32 action_size` + `<4f4?` (move x/y, look x/y, fire, ability, interact,
ui_click) + `<2i` click (x, y) only when ui_click is set: 20 or 28 bytes.

What differs from upstream's parser, on purpose:
* Strict. Upstream reads missing bytes as zeros and clamps counts; here a truncated field, a
  count over its limit, a bad varint, invalid UTF-8 or unexplained trailing bytes raise
  `MalformedPacket` naming the field and what was expected, so the client can count and skip
  the packet instead of acting on a half-zeroed state.
* MBRF frames arrive bottom row first (Unity `GetPixels32` order); `decode_frame` flips them
  to top-left order, which upstream forgot (its frames were upside down).
* The empty menu string is kept as sent (upstream rewrote it to "None"); `menu_name` does the
  upstream mapping for callers that want it.
* Non-finite floats (NaN, ±Inf) in a state or an action are malformed: one NaN move would
  otherwise poison a game's positions for good. The encoders refuse them (ValueError).
* A JPEG frame's size is read from its header and checked before it is decoded: it may
  decode to no more pixels than a raw frame can carry (`MAX_FRAME_PIXELS`).
No pickle, no eval: every byte is parsed by `struct`.
"""
from __future__ import annotations

import dataclasses
import io
import math
import struct

import numpy as np

# Size limits (upstream's, plus caps on counts so one bad count cannot allocate much).
MAX_STATE_BYTES = 256 * 1024
MAX_FRAME_BYTES = 4 * 1024 * 1024
MAX_ACTION_BYTES = 1023  # the plugin reads an action only if 0 < size < 1024
MAX_ENEMIES = 1024
MAX_OPTIONS = 64
MAX_STRING_BYTES = 4096
MAX_FRAME_SIDE = 8192
MAX_FRAME_PIXELS = MAX_FRAME_BYTES // 3  # what an MBRF frame within MAX_FRAME_BYTES can hold

HINP_MAGIC = 0x504E4948  # b"HINP" read as a little-endian uint32
HINP_VERSION = 1
MBRF_MAGIC = b"MBRF"
MBRF_HEADER = struct.Struct("<4siii")  # magic, width, height, channels (=3)
JPEG_MAGIC = b"\xff\xd8"

_I32 = struct.Struct("<i")
_U32 = struct.Struct("<I")
_F32 = struct.Struct("<f")
_VEC3 = struct.Struct("<3f")
_PLAYER = struct.Struct("<3f3f3f??")  # pos, vel, health, max health, game time, playing, paused
_ENEMY = struct.Struct("<4f")
_HINP = struct.Struct("<Ii4f4?2f")  # 36 bytes
_ACTION = struct.Struct("<4f4?")
_CLICK = struct.Struct("<2i")


class MalformedPacket(ValueError):
  """Bytes that do not follow the BonkLink layout; the message names the field."""


def _non_finite(values) -> bool:
  return not all(math.isfinite(v) for v in values)


def _require_finite(values, what: str) -> None:
  """MalformedPacket when a decoded float is NaN or infinite."""
  if _non_finite(values):
    raise MalformedPacket(f"{what}={tuple(values)}: expected finite floats (no NaN or Inf)")


@dataclasses.dataclass(frozen=True)
class Enemy:
  position: tuple[float, float, float]
  health: float


@dataclasses.dataclass(frozen=True)
class HumanInput:
  """The HINP trailer: what a human did on the game's keyboard/mouse this tick."""

  move: tuple[float, float]
  look: tuple[float, float]
  fire: bool
  ability: bool
  interact: bool
  ui_click: bool
  click_norm: tuple[float, float]  # [0, 1]², top-left origin
  version: int = HINP_VERSION


@dataclasses.dataclass(frozen=True)
class GameState:
  """One decoded state packet (field names follow upstream's `BonkLinkState.to_dict`)."""

  player_position: tuple[float, float, float]
  player_velocity: tuple[float, float, float]
  player_health: float
  player_max_health: float
  game_time: float
  is_playing: bool
  is_paused: bool
  enemies: tuple[Enemy, ...]
  current_menu: str
  level_up_options: tuple[str, ...]
  human_input: HumanInput | None = None


@dataclasses.dataclass(frozen=True)
class Action:
  """One action packet. Click coordinates are capture pixels, bottom-left origin."""

  move_x: float = 0.0
  move_y: float = 0.0
  look_x: float = 0.0
  look_y: float = 0.0
  fire: bool = False
  ability: bool = False
  interact: bool = False
  ui_click: bool = False
  click_x: int = 0
  click_y: int = 0


def menu_name(state: GameState) -> str:
  """Upstream's view of the menu string: empty means "None"."""
  return state.current_menu or "None"


# -- strings ------------------------------------------------------------------------------

def encode_string(text: str) -> bytes:
  """.NET BinaryWriter.Write(string): 7-bit varint byte length, then UTF-8."""
  data = text.encode("utf-8")
  if len(data) > MAX_STRING_BYTES:
    raise ValueError(f"string of {len(data)} UTF-8 bytes exceeds MAX_STRING_BYTES={MAX_STRING_BYTES}")
  n, prefix = len(data), bytearray()
  while True:
    byte = n & 0x7F
    n >>= 7
    prefix.append(byte | (0x80 if n else 0))
    if not n:
      return bytes(prefix) + data


class _Reader:
  """A strict cursor over one state body."""

  def __init__(self, data: bytes):
    self.data = memoryview(data)
    self.pos = 0

  def remaining(self) -> int:
    return len(self.data) - self.pos

  def take(self, n: int, what: str) -> memoryview:
    if self.remaining() < n:
      raise MalformedPacket(f"truncated state: {what} needs {n} bytes at offset {self.pos}, "
                            f"{self.remaining()} left")
    out = self.data[self.pos:self.pos + n]
    self.pos += n
    return out

  def unpack(self, fmt: struct.Struct, what: str):
    return fmt.unpack(self.take(fmt.size, what))

  def count(self, what: str, limit: int) -> int:
    (n,) = self.unpack(_I32, what)
    if not 0 <= n <= limit:
      raise MalformedPacket(f"{what}={n}: expected 0..{limit}")
    return n

  def string(self, what: str) -> str:
    length, shift = 0, 0
    for i in range(5):  # a 32-bit length needs at most 5 groups
      (byte,) = self.take(1, f"{what} length prefix")
      length |= (byte & 0x7F) << shift
      shift += 7
      if not byte & 0x80:
        break
    else:
      raise MalformedPacket(f"{what}: 7-bit length prefix longer than 5 bytes")
    if length > MAX_STRING_BYTES:
      raise MalformedPacket(f"{what}: length {length} exceeds MAX_STRING_BYTES={MAX_STRING_BYTES}")
    raw = self.take(length, f"{what} ({length} UTF-8 bytes)")
    try:
      return bytes(raw).decode("utf-8")
    except UnicodeDecodeError as e:
      raise MalformedPacket(f"{what}: invalid UTF-8 ({e.reason})") from None


# -- state --------------------------------------------------------------------------------

def encode_state(state: GameState) -> bytes:
  """The state body as the plugin writes it."""
  if len(state.enemies) > MAX_ENEMIES or len(state.level_up_options) > MAX_OPTIONS:
    raise ValueError(f"{len(state.enemies)} enemies / {len(state.level_up_options)} options "
                     f"exceed MAX_ENEMIES={MAX_ENEMIES} / MAX_OPTIONS={MAX_OPTIONS}")
  floats = (*state.player_position, *state.player_velocity, state.player_health,
            state.player_max_health, state.game_time,
            *(x for e in state.enemies for x in (*e.position, e.health)))
  if state.human_input is not None:
    floats += (*state.human_input.move, *state.human_input.look, *state.human_input.click_norm)
  if _non_finite(floats):
    raise ValueError("GameState holds a non-finite float (NaN or Inf); the wire format "
                     "carries finite values only")
  out = io.BytesIO()
  out.write(_PLAYER.pack(*state.player_position, *state.player_velocity, state.player_health,
                         state.player_max_health, state.game_time, state.is_playing,
                         state.is_paused))
  out.write(_I32.pack(len(state.enemies)))
  for enemy in state.enemies:
    out.write(_ENEMY.pack(*enemy.position, enemy.health))
  out.write(encode_string(state.current_menu))
  out.write(_I32.pack(len(state.level_up_options)))
  for option in state.level_up_options:
    out.write(encode_string(option))
  if state.human_input is not None:
    h = state.human_input
    out.write(_HINP.pack(HINP_MAGIC, h.version, *h.move, *h.look, h.fire, h.ability,
                         h.interact, h.ui_click, *h.click_norm))
  return out.getvalue()


def decode_state(data: bytes) -> GameState:
  """Parses one state body; raises `MalformedPacket` on anything off-layout."""
  if len(data) > MAX_STATE_BYTES:
    raise MalformedPacket(f"state body of {len(data)} bytes exceeds {MAX_STATE_BYTES}")
  r = _Reader(data)
  px, py, pz, vx, vy, vz, health, max_health, game_time, playing, paused = r.unpack(
      _PLAYER, "player block (position, velocity, health, max health, game time, flags)")
  _require_finite((px, py, pz), "player position")
  _require_finite((vx, vy, vz), "player velocity")
  _require_finite((health, max_health, game_time), "player health, max health, game time")
  num_enemies = r.count("enemiesCount", MAX_ENEMIES)
  enemies = []
  for i in range(num_enemies):
    x, y, z, h = r.unpack(_ENEMY, f"enemy {i} of {num_enemies}")
    _require_finite((x, y, z, h), f"enemy {i} position and health")
    enemies.append(Enemy((x, y, z), h))
  menu = r.string("currentMenu")
  num_options = r.count("levelUpOptionsCount", MAX_OPTIONS)
  options = tuple(r.string(f"levelUpOption {i}") for i in range(num_options))
  human = None
  if r.remaining():
    if r.remaining() < 4 or _U32.unpack(r.data[r.pos:r.pos + 4])[0] != HINP_MAGIC:
      raise MalformedPacket(f"{r.remaining()} unexpected trailing bytes after the options; "
                            "expected nothing or a HINP trailer (magic 0x504E4948)")
    (_, version, mx, my, lx, ly, fire, ability, interact, click, cx, cy) = r.unpack(
        _HINP, "HINP trailer (36 bytes)")
    if version < 1:
      raise MalformedPacket(f"HINP version {version}: expected >= 1")
    _require_finite((mx, my, lx, ly, cx, cy), "HINP move, look and click")
    # A later trailer version may append fields; version 1 readers ignore them.
    if version == HINP_VERSION and r.remaining():
      raise MalformedPacket(f"{r.remaining()} bytes after a version-1 HINP trailer")
    human = HumanInput((mx, my), (lx, ly), fire, ability, interact, click, (cx, cy), version)
  return GameState((px, py, pz), (vx, vy, vz), health, max_health, game_time, playing, paused,
                   tuple(enemies), menu, options, human)


# -- frames -------------------------------------------------------------------------------

def encode_mbrf(frame_top_down: np.ndarray) -> bytes:
  """uint8[H, W, 3] (top row first) → an MBRF frame with Unity's bottom-up row order."""
  frame = np.asarray(frame_top_down)
  if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
    raise ValueError(f"MBRF frames are uint8[H, W, 3], got {frame.dtype}{list(frame.shape)}")
  h, w, c = frame.shape
  return MBRF_HEADER.pack(MBRF_MAGIC, w, h, c) + np.ascontiguousarray(frame[::-1]).tobytes()


def encode_jpeg(frame: np.ndarray, quality: int = 75) -> bytes:
  """uint8[H, W, 3] → JPEG bytes (Pillow); quality clamped to 1..100 like the plugin."""
  from PIL import Image

  buffer = io.BytesIO()
  Image.fromarray(np.asarray(frame, np.uint8), "RGB").save(
      buffer, format="JPEG", quality=int(min(max(quality, 1), 100)))
  return buffer.getvalue()


def decode_frame(data: bytes) -> np.ndarray:
  """JPEG or MBRF bytes → uint8[H, W, 3], top row first."""
  if data[:4] == MBRF_MAGIC:
    if len(data) < MBRF_HEADER.size:
      raise MalformedPacket(f"MBRF frame of {len(data)} bytes: expected a 16-byte header")
    _, w, h, c = MBRF_HEADER.unpack_from(data)
    if c != 3:
      raise MalformedPacket(f"MBRF header c={c}: expected c=3")
    _check_frame_size("MBRF", w, h)
    if len(data) != MBRF_HEADER.size + w * h * 3:
      raise MalformedPacket(f"MBRF {w}x{h}x3 frame needs {MBRF_HEADER.size + w * h * 3} bytes, "
                            f"got {len(data)}")
    pixels = np.frombuffer(data, np.uint8, offset=MBRF_HEADER.size).reshape(h, w, 3)
    return pixels[::-1].copy()  # Unity rows are bottom-up
  if data[:2] == JPEG_MAGIC:
    from PIL import Image

    try:
      with Image.open(io.BytesIO(data)) as image:  # reads the header only
        _check_frame_size("JPEG", *image.size)
        return np.asarray(image.convert("RGB"))
    except MalformedPacket:
      raise
    except Exception as e:  # Pillow raises several types for corrupt JPEGs
      raise MalformedPacket(f"corrupt JPEG frame ({type(e).__name__}: {e})") from None
  raise MalformedPacket(f"frame starts with {bytes(data[:4])!r}: expected JPEG (ff d8) or MBRF")


def _check_frame_size(kind: str, w: int, h: int) -> None:
  if not (1 <= w <= MAX_FRAME_SIDE and 1 <= h <= MAX_FRAME_SIDE) or w * h > MAX_FRAME_PIXELS:
    raise MalformedPacket(f"{kind} frame of w={w} h={h}: expected 1..{MAX_FRAME_SIDE} pixels "
                          f"per side and at most MAX_FRAME_PIXELS={MAX_FRAME_PIXELS} in all")


# -- packet framing -----------------------------------------------------------------------

def encode_packet(state_body: bytes, frame: bytes = b"") -> bytes:
  """`i32 state_size, state, i32 frame_size, frame` (frame_size 0 = no frame)."""
  if not 0 < len(state_body) <= MAX_STATE_BYTES or len(frame) > MAX_FRAME_BYTES:
    raise ValueError(f"state of {len(state_body)} / frame of {len(frame)} bytes is outside "
                     f"the limits (1..{MAX_STATE_BYTES}, 0..{MAX_FRAME_BYTES})")
  return _I32.pack(len(state_body)) + state_body + _I32.pack(len(frame)) + frame


class BadLength(MalformedPacket):
  """A length prefix out of range: the stream's framing is lost (reconnect to resync)."""


def split_packet(buffer: bytes | bytearray | memoryview, offset: int = 0):
  """Finds the packet starting at `offset`.

  Returns `(state_bytes, frame_bytes, next_offset)`, or None if the buffer does not yet hold
  the whole packet. Raises `BadLength` for a length prefix outside its limits.
  """
  with memoryview(buffer) as view:  # released on return or raise, so the caller may resize
    return _split_packet(view, offset)


def _split_packet(view: memoryview, offset: int):
  if len(view) - offset < 4:
    return None
  (state_size,) = _I32.unpack_from(view, offset)
  if not 0 < state_size <= MAX_STATE_BYTES:
    raise BadLength(f"state_size={state_size}: expected 1..{MAX_STATE_BYTES}")
  frame_at = offset + 4 + state_size
  if len(view) - frame_at < 4:
    return None
  (frame_size,) = _I32.unpack_from(view, frame_at)
  if not 0 <= frame_size <= MAX_FRAME_BYTES:
    raise BadLength(f"frame_size={frame_size}: expected 0..{MAX_FRAME_BYTES}")
  end = frame_at + 4 + frame_size
  if len(view) < end:
    return None
  return bytes(view[offset + 4:frame_at]), bytes(view[frame_at + 4:end]), end


# -- actions ------------------------------------------------------------------------------

def encode_action(action: Action) -> bytes:
  """The framed action packet: i32 size + `<4f4?` (+ `<2i` click when ui_click)."""
  axes = (action.move_x, action.move_y, action.look_x, action.look_y)
  if _non_finite(axes):
    raise ValueError(f"Action move/look={axes}: expected finite floats (no NaN or Inf)")
  body = _ACTION.pack(*axes, action.fire, action.ability, action.interact, action.ui_click)
  if action.ui_click:
    body += _CLICK.pack(int(action.click_x), int(action.click_y))
  return _I32.pack(len(body)) + body


def decode_action(body: bytes) -> Action:
  """An action payload (without its size prefix), as the plugin reads it."""
  if len(body) not in (_ACTION.size, _ACTION.size + _CLICK.size):
    raise MalformedPacket(f"action payload of {len(body)} bytes: expected {_ACTION.size} or "
                          f"{_ACTION.size + _CLICK.size}")
  mx, my, lx, ly, fire, ability, interact, click = _ACTION.unpack_from(body)
  _require_finite((mx, my, lx, ly), "action move x/y, look x/y")
  if click != (len(body) == _ACTION.size + _CLICK.size):
    raise MalformedPacket(f"ui_click={click} but the payload has {len(body)} bytes: a click "
                          "carries exactly 8 bytes of coordinates")
  cx, cy = _CLICK.unpack_from(body, _ACTION.size) if click else (0, 0)
  return Action(mx, my, lx, ly, fire, ability, interact, click, cx, cy)


def split_action(buffer, offset: int = 0):
  """Returns `(payload, next_offset)` or None; raises `BadLength` for a size outside 1..1023."""
  with memoryview(buffer) as view:
    return _split_action(view, offset)


def _split_action(view: memoryview, offset: int):
  if len(view) - offset < 4:
    return None
  (size,) = _I32.unpack_from(view, offset)
  if not 0 < size <= MAX_ACTION_BYTES:
    raise BadLength(f"action_size={size}: expected 1..{MAX_ACTION_BYTES}")
  if len(view) - offset - 4 < size:
    return None
  return bytes(view[offset + 4:offset + 4 + size]), offset + 4 + size
