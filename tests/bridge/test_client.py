"""BonkLink client against scripted fake games on loopback (no JAX): drain-to-newest,
EOF, truncated data, garbage and oversized length prefixes are counted and recovered by a
reconnect; every wait is bounded."""
import socket
import threading
import time

import pytest

from mbjax.bridge import client as client_lib
from mbjax.bridge import codec

KEEP_OPEN = object()


def packet(game_time: float, frame: bytes = b"") -> bytes:
  state = codec.GameState((1.0, 0.0, 2.0), (0.0, 0.0, 0.0), 5.0, 10.0, game_time, True, False,
                          (), "Gameplay", ())
  return codec.encode_packet(codec.encode_state(state), frame)


class FakeGame:
  """Accepts one connection per script; sends its chunks, then closes it (or keeps it open
  until the next script's connection arrives when the script ends with KEEP_OPEN)."""

  def __init__(self, scripts, port: int = 0):
    self.listener = socket.socket()
    self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    self.listener.bind(("127.0.0.1", port))
    self.listener.listen(4)
    self.listener.settimeout(10.0)
    self.port = self.listener.getsockname()[1]
    self.received = bytearray()
    self.scripts = scripts
    self.thread = threading.Thread(target=self._serve, daemon=True)
    self.thread.start()

  def _serve(self):
    open_conns = []
    try:
      for script in self.scripts:
        conn, _ = self.listener.accept()
        conn.settimeout(0.05)
        for chunk in script:
          if chunk is KEEP_OPEN:
            open_conns.append(conn)
            break
          conn.sendall(chunk)
          time.sleep(0.01)
        else:
          time.sleep(0.05)
          try:
            self.received += conn.recv(4096)
          except OSError:
            pass
          conn.close()
    except OSError:
      pass
    finally:
      time.sleep(0.5)
      for conn in open_conns:
        try:
          self.received += conn.recv(4096)
        except OSError:
          pass
        conn.close()
      self.listener.close()

  def join(self):
    self.thread.join(5.0)


def make_client(port):
  return client_lib.BonkLinkClient(port=port, connect_timeout=1.0, backoff_initial=0.02,
                                   backoff_max=0.1)


def test_drains_to_newest_state():
  game = FakeGame([[b"".join(packet(float(t)) for t in range(5)), KEEP_OPEN]])
  c = make_client(game.port)
  time.sleep(0.1)
  obs = c.read(2.0)
  assert obs.state.game_time == 4.0
  assert c.counters.packets == 5 and c.counters.stale_states == 4
  assert c.read(0.05) is None  # nothing newer: bounded wait, no repeat
  c.close()
  game.join()


def test_newest_frame_only_is_decoded():
  frame = codec.encode_mbrf(__import__("numpy").full((2, 2, 3), 7, "uint8"))
  game = FakeGame([[packet(0.0, frame) + packet(1.0, frame) + packet(2.0), KEEP_OPEN]])
  c = make_client(game.port)
  time.sleep(0.1)
  obs = c.read(2.0)
  assert obs.state.game_time == 2.0 and obs.frame.shape == (2, 2, 3) and obs.frame_seq == 0
  assert c.counters.frames == 1 and c.counters.stale_frames == 1
  c.close()
  game.join()


@pytest.mark.parametrize("bad", [
    b"\xff\xff\xff\x7f" + b"\x00" * 8,  # oversized state_size
    b"\x00\x00\x00\x00",  # zero state_size
    packet(9.0)[:-4] + b"\x00\x00\x80\x7f",  # frame_size far beyond 4 MiB
])
def test_bad_length_prefix_forces_reconnect_and_recovers(bad):
  game = FakeGame([[packet(0.0) + bad, KEEP_OPEN], [packet(7.0), KEEP_OPEN]])
  c = make_client(game.port)
  first = c.read(2.0)
  second = c.read(3.0)
  assert first.state.game_time == 0.0 and second.state.game_time == 7.0
  assert c.counters.bad_lengths == 1 and c.counters.connects == 2
  c.close()
  game.join()


def test_malformed_body_is_counted_and_skipped():
  garbage_body = codec.encode_packet(b"\x01\x02\x03")
  game = FakeGame([[garbage_body + packet(3.0), KEEP_OPEN]])
  c = make_client(game.port)
  obs = c.read(2.0)
  assert obs.state.game_time == 3.0
  assert c.counters.malformed_states == 1 and c.counters.connects == 1
  c.close()
  game.join()


def test_truncated_stream_then_eof_reconnects():
  game = FakeGame([[packet(1.0) + packet(2.0)[:10]], [packet(5.0), KEEP_OPEN]])
  c = make_client(game.port)
  assert c.read(2.0).state.game_time == 1.0
  obs = c.read(3.0)
  assert obs.state.game_time == 5.0
  assert c.counters.disconnects == 1 and c.counters.connects == 2
  c.close()
  game.join()


def test_garbage_stream_counted_no_hang():
  import random
  rng = random.Random(1)
  noise = bytes(rng.getrandbits(8) for _ in range(5000))
  game = FakeGame([[noise], [packet(8.0), KEEP_OPEN]])
  c = make_client(game.port)
  start = time.monotonic()
  obs = c.read(3.0)
  assert obs is not None and obs.state.game_time == 8.0
  assert time.monotonic() - start < 3.0
  assert c.counters.bad_lengths + c.counters.malformed_states >= 1
  c.close()
  game.join()


def test_no_game_bounded_wait_then_late_start_connects():
  probe = socket.socket()
  probe.bind(("127.0.0.1", 0))
  port = probe.getsockname()[1]
  probe.close()
  c = make_client(port)
  start = time.monotonic()
  assert c.read(0.3) is None
  assert time.monotonic() - start < 1.5
  assert c.counters.connect_failures >= 1
  assert not c.send(codec.Action()) and c.counters.actions_dropped == 1
  game = FakeGame([[packet(4.0), KEEP_OPEN]], port=port)
  assert c.read(3.0).state.game_time == 4.0
  assert c.send(codec.Action(move_x=1.0, ui_click=True, click_x=3, click_y=4))
  c.close()
  game.join()
  assert bytes(game.received) == codec.encode_action(
      codec.Action(move_x=1.0, ui_click=True, click_x=3, click_y=4))


def test_read_and_poll_return_under_a_flood_of_valid_packets():
  """A game that sends faster than the client parses keeps the socket readable forever; the
  drain stops at its budget or the read's deadline instead of following the flood."""
  listener = socket.socket()
  listener.bind(("127.0.0.1", 0))
  listener.listen(1)
  stop = threading.Event()
  blob = b"".join(packet(float(t)) for t in range(2000))

  def flood():
    conn, _ = listener.accept()
    try:
      while not stop.is_set():
        conn.sendall(blob)
    except OSError:
      pass
    finally:
      conn.close()

  sender = threading.Thread(target=flood, daemon=True)
  sender.start()
  c = make_client(listener.getsockname()[1])
  results = {}

  def reader():
    start = time.monotonic()
    results["read"] = c.read(0.5)
    results["read_s"] = time.monotonic() - start
    start = time.monotonic()
    results["poll"] = c.poll()
    results["poll_s"] = time.monotonic() - start

  worker = threading.Thread(target=reader, daemon=True)
  worker.start()
  worker.join(10.0)
  returned = not worker.is_alive()
  stop.set()  # ends the flood (and so an unbounded drain) either way
  worker.join(10.0)
  c.close()  # a sender blocked on the full socket fails now
  sender.join(5.0)
  listener.close()
  assert returned, "read() did not return under the flood"
  assert results["read"] is not None and results["read_s"] < 3.0
  assert results["poll"] is not None and results["poll_s"] < 3.0
  assert results["poll"].seq > results["read"].seq and c.counters.stale_states > 0
