"""The reference BonkLink server (in-process, lock-step) speaks the wire format, applies
actions, serves frames that match BonkArena's renderer, and maps card clicks."""
import struct

import jax
import numpy as np
import pytest

from mbjax.bridge import client as client_lib
from mbjax.bridge import codec, server, shim


@pytest.fixture(scope="module")
def raw_server():
  cfg = server.ServerConfig(mode="lockstep", frame_hz=60.0, frame_format="raw", pixel_size=64)
  with server.ReferenceServer(1, base_port=0, cfg=cfg) as srv:
    yield srv


def test_lockstep_states_actions_and_frames(raw_server):
  inst = raw_server.instances[0]
  c = client_lib.BonkLinkClient(port=raw_server.ports[0], connect_timeout=2.0)
  first = c.read(10.0)
  assert first.state.is_playing and first.state.current_menu == "Gameplay"
  assert first.state.player_position == (12.0, 0.0, 12.0)  # arena centre, x–z plane
  assert first.state.player_health == first.state.player_max_health == 10.0
  assert c.send(codec.Action(move_x=1.0))
  second = c.read(10.0)
  assert second.seq == first.seq + 1
  assert second.state.player_position[0] == pytest.approx(12.3, abs=1e-5)  # move speed 0.3
  assert second.state.player_velocity[0] == pytest.approx(0.3 * 60.0, abs=1e-3)
  assert second.state.game_time == pytest.approx(inst._tick_count / 60.0)
  # MBRF arrives bottom-up and is flipped back: it equals the renderer's frame exactly.
  expected = np.asarray(inst.game.render(inst._state))
  np.testing.assert_array_equal(second.frame, expected)
  c.close()


def test_lockstep_action_repeat_runs_its_ticks_and_frames_on_their_period():
  """ticks_per_action=3: one action moves the player 3 ticks (0.3 a tick) and the game clock
  3/60 s; with a frame every 5 ticks (12 Hz of 60) frames come with the packets whose three
  ticks include a multiple of 5 (ticks 4–6 and 10–12), not the others."""
  cfg = server.ServerConfig(mode="lockstep", ticks_per_action=3, frame_hz=12.0,
                            frame_format="raw", pixel_size=64)
  with server.ReferenceServer(1, base_port=0, cfg=cfg) as srv:
    c = client_lib.BonkLinkClient(port=srv.ports[0], connect_timeout=2.0)
    greeting = c.read(10.0)
    assert greeting.state.player_position == (12.0, 0.0, 12.0)
    framed, frames_seen = [], greeting.frame_seq
    for step in range(1, 5):
      assert c.send(codec.Action(move_x=1.0))
      obs = c.read(10.0)
      assert obs.state.player_position[0] == pytest.approx(12.0 + 0.9 * step, abs=1e-4)
      assert obs.state.game_time == pytest.approx(3 * step / 60.0)
      framed.append(obs.frame_seq > frames_seen)
      frames_seen = obs.frame_seq
    assert framed == [False, True, False, True]
    assert srv.instances[0].counters.ticks == 12
    c.close()


def test_card_click_is_mapped_to_the_card_under_it(raw_server):
  inst = raw_server.instances[0]
  state = inst._state.replace(menu_open=jax.numpy.asarray(True),
                              menu_cards=jax.numpy.asarray([4, 5, 6], jax.numpy.int32))
  inst._state = state  # the lock-step thread only ticks on actions; none are in flight
  c = client_lib.BonkLinkClient(port=raw_server.ports[0], connect_timeout=2.0)
  assert c.read(10.0) is not None
  c.send(codec.Action())  # a tick with no click: the menu stays open
  menu = c.read(10.0).state
  assert menu.current_menu == "LevelUp" and menu.is_paused
  assert menu.level_up_options == ("max_health", "pickup_radius", "regeneration")
  np.testing.assert_array_equal(shim.menu_mask(menu), [True, True, True, True])
  upgrades_before = np.asarray(inst._state.upgrades).copy()
  c.send(shim.to_action(np.zeros(2), 1, (64, 64)))  # the middle card: pickup_radius
  after = c.read(10.0).state
  assert after.current_menu == "Gameplay"
  gained = np.asarray(inst._state.upgrades) - upgrades_before
  np.testing.assert_array_equal(gained, [0, 0, 0, 0, 0, 1, 0])
  c.close()


def test_jpeg_frames_and_garbage_from_client_counted():
  cfg = server.ServerConfig(mode="lockstep", frame_hz=60.0, frame_format="jpeg", pixel_size=64,
                            input_snapshot=True)
  with server.ReferenceServer(1, base_port=0, cfg=cfg) as srv:
    c = client_lib.BonkLinkClient(port=srv.ports[0], connect_timeout=2.0)
    obs = c.read(10.0)
    assert obs.frame.shape == (64, 64, 3) and obs.state.human_input is not None
    c._sock.sendall(b"\x00\x04\x00\x00")  # action_size=1024: the server drops us
    obs = c.read(5.0)  # EOF, reconnect; the lock-step server greets with a state
    assert obs is not None and c.counters.connects == 2
    assert srv.instances[0].counters.bad_lengths == 1
    c.close()


def test_a_nan_action_is_rejected_and_the_game_stays_finite(raw_server):
  inst = raw_server.instances[0]
  malformed_before = inst.counters.malformed_actions
  c = client_lib.BonkLinkClient(port=raw_server.ports[0], connect_timeout=2.0)
  assert c.read(10.0) is not None
  nan_move = struct.pack("<4f4?", float("nan"), 1.0, 0.0, 0.0, False, False, False, False)
  c._sock.sendall(struct.pack("<i", len(nan_move)) + nan_move)  # what a broken client sends
  assert c.send(codec.Action(move_x=1.0))
  after = c.read(10.0).state
  c.close()
  assert np.isfinite(after.player_position).all() and np.isfinite(after.player_velocity).all()
  assert inst.counters.malformed_actions == malformed_before + 1
  later = client_lib.BonkLinkClient(port=raw_server.ports[0], connect_timeout=2.0)
  assert np.isfinite(later.read(10.0).state.player_position).all()
  assert later.send(codec.Action(move_y=1.0))
  state = later.read(10.0).state
  later.close()
  assert np.isfinite(state.player_position).all()
  assert all(np.isfinite(e.position).all() for e in state.enemies)
