"""BonkLink TCP client: the worker end of the bridge (the game plugin is the server).

Owns the socket, the receive buffer, reconnects and counters; no JAX in here. Fixes the
upstream client's faults (`reference/upstream_runtime.md` §1.5):
* **Drain to newest.** Every read empties the socket without blocking and keeps only the
  newest state (older ones are counted in `stale_states`), so observation age is bounded
  by one send interval plus the actor's own step, not by how far behind it has fallen.
  Only the newest frame of a drained batch is decoded.
* **Reconnects.** EOF, a reset, a send failure or a lost framing (a length prefix out of
  range) closes the socket; later calls reconnect with exponential backoff
  (`backoff_initial` doubling to `backoff_max`). Upstream stayed dead after one drop.
* **Bounded waits.** Every call that can wait takes a timeout; nothing blocks forever. A
  drain stops at the caller's deadline (`read`'s timeout, `poll`'s `max_drain_s`) and after
  the socket's receive buffer size in bytes (no more than was queued when it began), so a
  game that sends faster than the client parses cannot hold it in the drain.
* **Counted faults.** A packet whose body is malformed is skipped and counted
  (`malformed_states`, `malformed_frames`); bad length prefixes count as `bad_lengths`.
"""
from __future__ import annotations

import dataclasses
import select
import socket
import time

import numpy as np

from mbjax.bridge import codec

_RECV_CHUNK = 1 << 20


@dataclasses.dataclass
class Counters:
  packets: int = 0  # complete packets received
  stale_states: int = 0  # states superseded by a newer one before being read
  frames: int = 0  # frames decoded
  stale_frames: int = 0  # frames superseded before being decoded
  malformed_states: int = 0
  malformed_frames: int = 0
  bad_lengths: int = 0  # length prefixes out of range (each forces a reconnect)
  disconnects: int = 0
  connects: int = 0
  connect_failures: int = 0
  actions_sent: int = 0
  actions_dropped: int = 0  # sends attempted while disconnected or that failed
  bytes_received: int = 0


@dataclasses.dataclass(frozen=True)
class Observation:
  """The newest state, and the newest frame seen so far (which may be older)."""

  state: codec.GameState
  seq: int  # index of this state among all states received by this client
  received_at: float  # time.monotonic() when its bytes were read from the socket
  frame: np.ndarray | None  # uint8[H, W, 3], top row first
  frame_seq: int  # how many frames were decoded before this one (-1: none yet)
  frame_received_at: float | None


class BonkLinkClient:
  """One connection to one game instance (plugin port 5560 + i)."""

  def __init__(self, host: str = "127.0.0.1", port: int = 5560, *,
               connect_timeout: float = 2.0, backoff_initial: float = 0.05,
               backoff_max: float = 2.0, decode_frames: bool = True,
               max_drain_s: float = 0.1):
    self.address = (host, int(port))
    self.connect_timeout = connect_timeout
    self.backoff_initial = backoff_initial
    self.backoff_max = backoff_max
    self.decode_frames = decode_frames
    self.max_drain_s = max_drain_s  # longest a `poll` drains a socket that keeps filling
    self.counters = Counters()
    self._sock: socket.socket | None = None
    self._buffer = bytearray()
    self._backoff = backoff_initial
    self._next_attempt = 0.0
    self._seq = -1
    self._latest: Observation | None = None
    self._returned_seq = -1
    self._frame: np.ndarray | None = None
    self._frame_seq = -1
    self._frame_time: float | None = None

  # -- connection -------------------------------------------------------------------------

  @property
  def connected(self) -> bool:
    return self._sock is not None

  def connect(self, timeout: float | None = None) -> bool:
    """One connection attempt (bounded by `timeout`, default `connect_timeout`)."""
    if self._sock is not None:
      return True
    try:
      sock = socket.create_connection(self.address, timeout=timeout or self.connect_timeout)
    except OSError:
      self.counters.connect_failures += 1
      self._next_attempt = time.monotonic() + self._backoff
      self._backoff = min(self._backoff * 2.0, self.backoff_max)
      return False
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as the plugin does
    sock.setblocking(False)
    self._sock = sock
    self._buffer.clear()
    self._backoff = self.backoff_initial
    self.counters.connects += 1
    return True

  def _maybe_reconnect(self, deadline: float) -> bool:
    if self._sock is not None:
      return True
    now = time.monotonic()
    if now < self._next_attempt:
      return False
    return self.connect(timeout=max(min(self.connect_timeout, deadline - now), 0.01))

  def _drop(self) -> None:
    if self._sock is not None:
      try:
        self._sock.close()
      except OSError:
        pass
      self._sock = None
      self.counters.disconnects += 1
      self._next_attempt = time.monotonic() + self._backoff
    self._buffer.clear()

  def close(self) -> None:
    if self._sock is not None:
      self._sock.close()
      self._sock = None

  # -- receiving --------------------------------------------------------------------------

  def _drain_socket(self, deadline: float) -> None:
    """Reads what the kernel holds, without blocking, until it is empty, the drain budget is
    spent or `deadline` passes; handles EOF and errors."""
    if self._sock is None:
      return
    budget = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    while self._sock is not None and budget > 0:
      try:
        chunk = self._sock.recv(_RECV_CHUNK)
      except (BlockingIOError, InterruptedError):
        return
      except OSError:
        self._drop()
        return
      if not chunk:  # EOF: the game closed the connection
        self._drop()
        return
      self.counters.bytes_received += len(chunk)
      budget -= len(chunk)
      self._buffer += chunk
      self._parse()
      if time.monotonic() >= deadline:
        return

  def _parse(self) -> None:
    now = time.monotonic()
    offset, newest_state, newest_frame = 0, None, None
    while True:
      try:
        packet = codec.split_packet(self._buffer, offset)
      except codec.BadLength:
        self.counters.bad_lengths += 1
        self._drop()  # framing lost: the only safe resync point is a new connection
        break
      if packet is None:
        break
      state_bytes, frame_bytes, offset = packet
      self.counters.packets += 1
      try:
        state = codec.decode_state(state_bytes)
      except codec.MalformedPacket:
        self.counters.malformed_states += 1
        continue
      if newest_state is not None:
        self.counters.stale_states += 1
      newest_state = state
      if frame_bytes:
        if newest_frame is not None:
          self.counters.stale_frames += 1
        newest_frame = frame_bytes
    if self._sock is not None:
      del self._buffer[:offset]
    if newest_frame is not None and self.decode_frames:
      try:
        self._frame = codec.decode_frame(newest_frame)
        self._frame_seq += 1
        self._frame_time = now
        self.counters.frames += 1
      except codec.MalformedPacket:
        self.counters.malformed_frames += 1
    if newest_state is not None:
      if self._latest is not None and self._latest.seq > self._returned_seq:
        self.counters.stale_states += 1  # the previous newest was never read
      self._seq += 1
      self._latest = Observation(newest_state, self._seq, now, self._frame, self._frame_seq,
                                 self._frame_time)

  def poll(self) -> Observation | None:
    """Drains the socket (reconnecting if due) and returns the newest observation, old or new."""
    now = time.monotonic()
    self._maybe_reconnect(now)
    self._drain_socket(now + self.max_drain_s)
    return self._latest

  def read(self, timeout: float) -> Observation | None:
    """Waits up to `timeout` seconds for a state newer than the last one returned; returns
    the newest one (None on timeout). Reconnects meanwhile if the game went away."""
    deadline = time.monotonic() + timeout
    while True:
      self._maybe_reconnect(deadline)
      self._drain_socket(deadline)
      latest = self._latest
      if latest is not None and latest.seq > self._returned_seq:
        self._returned_seq = latest.seq
        return latest
      remaining = deadline - time.monotonic()
      if remaining <= 0:
        return None
      if self._sock is None:
        time.sleep(min(remaining, max(self._next_attempt - time.monotonic(), 0.001)))
        continue
      try:
        select.select([self._sock], [], [], remaining)
      except (OSError, ValueError):
        self._drop()

  # -- sending ----------------------------------------------------------------------------

  def send(self, action: codec.Action) -> bool:
    """Sends one action; False (and counted) if there is no live connection."""
    if self._sock is None:
      self.counters.actions_dropped += 1
      return False
    data = codec.encode_action(action)
    try:
      # 20–32 bytes never fill a healthy socket buffer; a full one means the game stopped
      # reading, and the action is dropped rather than blocking the actor.
      sent = self._sock.send(data)
    except (BlockingIOError, InterruptedError):
      self.counters.actions_dropped += 1
      return False
    except OSError:
      self.counters.actions_dropped += 1
      self._drop()
      return False
    if sent != len(data):  # a partial action would desync the plugin's reader
      self.counters.actions_dropped += 1
      self._drop()
      return False
    self.counters.actions_sent += 1
    return True
