"""ResearchPlugin shared-memory bridge: the file-backed mapping, a client and a reference
producer serving BonkArena (`reference/upstream_runtime.md` §2).

Layout of `megabonk_env_{instance_id}` (bit-exact, little-endian):

| offset       | type            | field                                  | writer   |
|--------------|-----------------|----------------------------------------|----------|
| 0x00         | i32             | flag (WAIT 0, ACTION_READY 1, OBS_READY 2, RESET 3, TERMINATED 4) | both |
| 0x04         | –               | unused                                 |          |
| 0x08         | f32             | reward                                 | producer |
| 0x0C         | i32             | done                                   | producer |
| 0x10         | i32             | step counter                           | producer |
| 0x14         | i32             | game_time_ms                           | producer |
| 0x18 / 0x1C  | i32             | obs width / height                     | producer |
| 0x20         | u8[W·H·3]       | RGB pixels, bottom row first (Unity)   | producer |
| 0x20+W·H·3   | f32[6]          | action: [0:2] movement, [2:6] buttons  | client   |

Only the file-backed mode exists here (`MEGABONK_RESEARCH_SHM_DIR`, default /dev/shm): it
is the one mode that works across the Proton boundary. The client never creates the file
(as upstream); the producer does.

Differs from upstream, on purpose:
* Torn-read protection. The reference producer sets flag=WAIT before it writes pixels and
  OBS_READY (with the step counter advanced) after; the client copies the pixels and then
  re-reads flag and step, retrying if either changed (a seqlock on the existing fields).
  Against the upstream plugin in deterministic mode the game is paused while the flag is
  OBS_READY, so the check never fires there.
* Lock-step `step()` waits for an observation with a *new* step counter, so a stale
  OBS_READY can never be taken for the answer to the action just written.
* The producer writes reward and done (upstream never did), applies the action (upstream's
  ApplyAction was a stub) and actually resets on RESET.
* Pixels are returned top row first (upstream left them upside down).
Every wait is bounded by a timeout; a mapping with an impossible size is refused by name.
"""
from __future__ import annotations

import mmap
import os
import struct
import threading
import time

import numpy as np

WAIT, ACTION_READY, OBS_READY, RESET, TERMINATED = 0, 1, 2, 3, 4
HEADER_SIZE = 0x20
ACTION_FLOATS = 6
MAX_SIDE = 8192
_HEADER = struct.Struct("<i4xfiiiii")  # flag, reward, done, step, game_time_ms, w, h
_FLAG = struct.Struct("<i")
_ACTION = struct.Struct("<6f")


def mapping_name(instance_id: str | int) -> str:
  return f"megabonk_env_{instance_id}"


def mapping_path(instance_id: str | int, shm_dir: str | None = None) -> str:
  shm_dir = shm_dir or os.environ.get("MEGABONK_RESEARCH_SHM_DIR") or "/dev/shm"
  return os.path.join(shm_dir, mapping_name(instance_id))


def total_size(width: int, height: int) -> int:
  """0x20 + W·H·3 + 24 bytes (84×84 → 21,224)."""
  return HEADER_SIZE + width * height * 3 + 4 * ACTION_FLOATS


class ShmTimeout(TimeoutError):
  """No observation arrived in time."""


class _Mapping:
  def __init__(self, path: str, width: int, height: int, create: bool):
    if not (1 <= width <= MAX_SIDE and 1 <= height <= MAX_SIDE):
      raise ValueError(f"observation size {width}x{height}: expected 1..{MAX_SIDE} per side")
    self.path, self.width, self.height = path, width, height
    self.size = total_size(width, height)
    self.pixel_bytes = width * height * 3
    self.action_offset = HEADER_SIZE + self.pixel_bytes
    flags = os.O_RDWR | (os.O_CREAT if create else 0)
    fd = os.open(path, flags, 0o600)
    try:
      if create:
        os.ftruncate(fd, self.size)
      actual = os.fstat(fd).st_size
      if actual < self.size:
        raise ValueError(f"{path}: {actual} bytes, but a {width}x{height} observation needs "
                         f"{self.size} (0x20 header + W*H*3 + 24)")
      self.mm = mmap.mmap(fd, self.size)
    finally:
      os.close(fd)

  def flag(self) -> int:
    return _FLAG.unpack_from(self.mm, 0)[0]

  def set_flag(self, value: int) -> None:
    _FLAG.pack_into(self.mm, 0, value)

  def header(self) -> dict:
    flag, reward, done, step, game_time_ms, w, h = _HEADER.unpack_from(self.mm, 0)
    return dict(flag=flag, reward=reward, done=done, step=step, game_time_ms=game_time_ms,
                width=w if 1 <= w <= MAX_SIDE else 0, height=h if 1 <= h <= MAX_SIDE else 0)

  def close(self) -> None:
    self.mm.close()


class ResearchShmClient:
  """The learner's end: reads observations, writes actions, requests resets."""

  def __init__(self, path: str, width: int = 84, height: int = 84, poll_interval: float = 0.0005):
    self._map = _Mapping(path, width, height, create=False)
    self.poll_interval = poll_interval
    self.torn_reads = 0  # copies retried because the producer wrote meanwhile
    self.timeouts = 0
    self.last_step = None
    header = self._map.header()
    if header["width"] and (header["width"], header["height"]) != (width, height):
      raise ValueError(f"{path}: the producer writes {header['width']}x{header['height']} "
                       f"observations, the client expects {width}x{height}")

  def read_observation(self, timeout: float, newer_than: int | None = None):
    """Waits for OBS_READY (and a step counter other than `newer_than`); returns
    `(pixels uint8[H, W, 3] top row first, header dict)`."""
    m = self._map
    deadline = time.monotonic() + timeout
    while True:
      header = m.header()
      if header["flag"] == OBS_READY and (newer_than is None or header["step"] != newer_than):
        raw = np.frombuffer(m.mm, np.uint8, m.pixel_bytes, HEADER_SIZE).copy()
        after = m.header()
        if after["flag"] == OBS_READY and after["step"] == header["step"]:
          self.last_step = header["step"]
          return raw.reshape(m.height, m.width, 3)[::-1], after
        self.torn_reads += 1
        continue
      if time.monotonic() >= deadline:
        self.timeouts += 1
        raise ShmTimeout(f"{m.path}: no observation within {timeout} s "
                         f"(flag={header['flag']}, step={header['step']})")
      time.sleep(self.poll_interval)

  def write_action(self, action) -> None:
    """Writes the 6 floats, then ACTION_READY (the order the plugin relies on)."""
    values = np.asarray(action, np.float32).reshape(-1)
    if values.shape != (ACTION_FLOATS,):
      raise ValueError(f"action has {values.size} values: expected {ACTION_FLOATS} "
                       "([0:2] movement, [2:6] buttons)")
    _ACTION.pack_into(self._map.mm, self._map.action_offset, *values.tolist())
    self._map.set_flag(ACTION_READY)

  def request_reset(self) -> None:
    self._map.set_flag(RESET)

  def step(self, action, timeout: float = 1.0):
    """Lock-step: send `action`, wait for the observation it produced."""
    previous = self.last_step if self.last_step is not None else self._map.header()["step"]
    self.write_action(action)
    return self.read_observation(timeout, newer_than=previous)

  def reset(self, timeout: float = 1.0):
    previous = self.last_step if self.last_step is not None else self._map.header()["step"]
    self.request_reset()
    return self.read_observation(timeout, newer_than=previous)

  def close(self) -> None:
    self._map.close()


class ResearchShmProducer:
  """Reference producer: BonkArena pixels into the mapping, in lock-step (deterministic
  mode: the game waits for each action) or free-running at `hz`.

  Actions: [0:2] move (screen axes, y down), buttons [2:5] choose card 0..2 while the level-up
  menu is open, [5] unused. Reward is BonkArena's; done is 1 on the last frame of a run,
  after which any action (or RESET) starts the next run.
  """

  def __init__(self, path: str, width: int = 84, height: int = 84, *, deterministic: bool = True,
               hz: float = 60.0, seed: int = 0):
    import jax
    import jax.numpy as jnp

    from mbjax.envs.bonk_arena import BonkArena
    from mbjax.envs.spaces import HybridAction

    if width != height:
      raise ValueError(f"BonkArena renders square frames; got {width}x{height}")
    self._map = _Mapping(path, width, height, create=True)
    self.deterministic, self.hz = deterministic, hz
    self.env = BonkArena(observation="pixels", pixel_size=width)
    params = self.env.default_params()
    env = self.env

    def step(key, state, action6):
      buttons = action6[2:5] > 0.5
      choice = jnp.where(buttons.any(), jnp.argmax(buttons), 3).astype(jnp.int32)
      obs, state, reward, terminated, truncated, _ = env.step(
          key, state, HybridAction(jnp.clip(action6[:2], -1, 1), choice[None]), params)
      return obs, state, reward, terminated | truncated, state.game_time

    self._step = jax.jit(step)
    self._reset = jax.jit(lambda: env.reset(jax.random.PRNGKey(0), params))
    self._key = jax.random.PRNGKey(seed)
    self._jax = jax
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, name="research-producer", daemon=True)
    self.steps = 0
    self._game_ticks = 0

  def _write(self, pixels: np.ndarray, reward: float, done: bool) -> None:
    m = self._map
    m.set_flag(WAIT)  # seqlock: readers discard a copy that overlaps this write
    m.mm[HEADER_SIZE:HEADER_SIZE + m.pixel_bytes] = np.ascontiguousarray(pixels[::-1]).tobytes()
    struct.pack_into("<fiiiii", m.mm, 0x08, reward, int(done), self.steps,
                     int(self._game_ticks * 1000 / 60), m.width, m.height)
    m.set_flag(OBS_READY)

  def _wait_for_action(self):
    """Deterministic mode: spin (bounded by stop) until ACTION_READY or RESET."""
    while not self._stop.is_set():
      flag = self._map.flag()
      if flag in (ACTION_READY, RESET):
        return flag
      time.sleep(0.0002)
    return None

  def _run(self) -> None:
    jax = self._jax
    obs, state = self._reset()
    self._write(np.asarray(obs), 0.0, False)
    done = False
    next_time = time.monotonic()
    while not self._stop.is_set():
      if self.deterministic:
        flag = self._wait_for_action()
        if flag is None:
          break
      else:
        next_time += 1.0 / self.hz
        time.sleep(max(next_time - time.monotonic(), 0.0))
        flag = self._map.flag()
      action = np.frombuffer(self._map.mm, np.float32, ACTION_FLOATS, self._map.action_offset)
      action = np.nan_to_num(action.copy())
      self.steps += 1
      if flag == RESET or done:
        obs, state = self._reset()
        reward, done = 0.0, False
        self._game_ticks = 0
      else:
        self._key, key = jax.random.split(self._key)
        obs, state, reward, over, ticks = self._step(key, state, action)
        reward, done, self._game_ticks = float(reward), bool(over), int(ticks)
      self._write(np.asarray(obs), reward, done)
    self._map.close()

  def start(self) -> "ResearchShmProducer":
    self._thread.start()
    return self

  def stop(self, timeout: float = 2.0) -> None:
    self._stop.set()
    self._thread.join(timeout)

  def __enter__(self):
    return self.start()

  def __exit__(self, *exc):
    self.stop()
