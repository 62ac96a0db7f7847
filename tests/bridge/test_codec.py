"""BonkLink codec conformance: hand-built byte strings laid out per the spec
(reference/upstream_runtime.md §1.3–1.4) decode to the expected fields; encoders produce
those exact bytes; malformed input raises MalformedPacket naming the field; fuzzing."""
import dataclasses
import io
import random
import struct

import numpy as np
import pytest
from PIL import Image

from mbjax.bridge import codec, coords


def net_string(text: str) -> bytes:
  """.NET BinaryWriter.Write(string), written out by hand for the test."""
  data = text.encode("utf-8")
  n, out = len(data), b""
  while n >= 0x80:
    out += bytes([(n & 0x7F) | 0x80])
    n >>= 7
  return out + bytes([n]) + data


def hand_built_state(with_hinp: bool) -> bytes:
  body = struct.pack("<3f", 1.5, 0.0, -2.25)  # position
  body += struct.pack("<3f", 0.5, 0.0, 0.25)  # velocity
  body += struct.pack("<fff", 80.0, 100.0, 12.5)  # health, max, gameTime
  body += b"\x01\x00"  # isPlaying, isPaused
  body += struct.pack("<i", 2)
  body += struct.pack("<4f", 3.0, 0.0, 4.0, 7.0) + struct.pack("<4f", -1.0, 0.5, 2.0, 1.0)
  body += net_string("LevelUp")
  body += struct.pack("<i", 3) + net_string("Damage +10%") + net_string("Épée ⚔") + net_string(
      "x" * 200)  # 200 bytes → a two-byte length prefix (0xC8 0x01)
  if with_hinp:
    body += b"HINP" + struct.pack("<i", 1) + struct.pack("<4f", 0.5, -1.0, 0.25, 0.0)
    body += b"\x01\x00\x01\x01" + struct.pack("<2f", 0.25, 0.75)
  return body


@pytest.mark.parametrize("with_hinp", [False, True])
def test_hand_built_state_decodes(with_hinp):
  state = codec.decode_state(hand_built_state(with_hinp))
  assert state.player_position == (1.5, 0.0, -2.25)
  assert state.player_velocity == (0.5, 0.0, 0.25)
  assert (state.player_health, state.player_max_health, state.game_time) == (80.0, 100.0, 12.5)
  assert state.is_playing and not state.is_paused
  assert state.enemies == (codec.Enemy((3.0, 0.0, 4.0), 7.0), codec.Enemy((-1.0, 0.5, 2.0), 1.0))
  assert state.current_menu == "LevelUp"
  assert state.level_up_options == ("Damage +10%", "Épée ⚔", "x" * 200)
  if with_hinp:
    h = state.human_input
    assert (h.move, h.look) == ((0.5, -1.0), (0.25, 0.0))
    assert (h.fire, h.ability, h.interact, h.ui_click) == (True, False, True, True)
    assert h.click_norm == (0.25, 0.75) and h.version == 1
  else:
    assert state.human_input is None


@pytest.mark.parametrize("with_hinp", [False, True])
def test_encode_state_reproduces_hand_built_bytes(with_hinp):
  body = hand_built_state(with_hinp)
  assert codec.encode_state(codec.decode_state(body)) == body


def test_string_prefix_is_dotnet_7bit():
  assert codec.encode_string("") == b"\x00"
  assert codec.encode_string("a" * 127)[:1] == b"\x7f"
  assert codec.encode_string("a" * 128)[:2] == b"\x80\x01"
  assert codec.encode_string("a" * 300)[:2] == b"\xac\x02"


def test_empty_menu_kept_and_mapped_like_upstream():
  state = codec.GameState((0, 0, 0), (0, 0, 0), 1, 1, 0, True, False, (), "", ())
  decoded = codec.decode_state(codec.encode_state(state))
  assert decoded.current_menu == "" and codec.menu_name(decoded) == "None"


def test_action_bytes_exact():
  assert codec.encode_action(codec.Action(0.5, -1.0)) == (
      struct.pack("<i", 20) + struct.pack("<4f", 0.5, -1.0, 0.0, 0.0) + b"\x00\x00\x00\x00")
  click = codec.Action(1.0, 0.0, 0.25, -0.5, True, False, True, True, 160, 17)
  assert codec.encode_action(click) == (
      b"\x1c\x00\x00\x00" + struct.pack("<4f", 1.0, 0.0, 0.25, -0.5) + b"\x01\x00\x01\x01"
      + b"\xa0\x00\x00\x00\x11\x00\x00\x00")
  assert codec.decode_action(codec.encode_action(click)[4:]) == click
  # Coordinates are sent only with a click: they are zeroed otherwise.
  assert len(codec.encode_action(codec.Action(click_x=5, click_y=6))) == 24


def test_mbrf_frame_is_bottom_up_and_flipped_on_decode():
  frame = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)  # top row 0..8, bottom 9..17
  raw = b"MBRF" + struct.pack("<iii", 3, 2, 3) + bytes(range(9, 18)) + bytes(range(0, 9))
  assert codec.encode_mbrf(frame) == raw
  np.testing.assert_array_equal(codec.decode_frame(raw), frame)
  assert len(codec.encode_mbrf(np.zeros((180, 320, 3), np.uint8))) == 172_816  # spec figure


def test_jpeg_frame_decodes():
  frame = np.zeros((32, 48, 3), np.uint8)
  frame[:, :24] = (200, 30, 30)
  buffer = io.BytesIO()
  Image.fromarray(frame).save(buffer, format="JPEG", quality=90)
  decoded = codec.decode_frame(buffer.getvalue())
  assert decoded.shape == (32, 48, 3)
  assert np.abs(decoded.astype(int) - frame).mean() < 4
  assert codec.decode_frame(codec.encode_jpeg(frame)).shape == (32, 48, 3)


def test_packet_framing_round_trip():
  body = hand_built_state(True)
  frame = codec.encode_mbrf(np.ones((4, 4, 3), np.uint8))
  packet = codec.encode_packet(body, frame) + codec.encode_packet(body)
  first = codec.split_packet(packet)
  assert first[:2] == (body, frame)
  second = codec.split_packet(packet, first[2])
  assert second == (body, b"", len(packet))
  assert codec.split_packet(packet[:-1], first[2]) is None  # incomplete: wait for more


@pytest.mark.parametrize("data, expected", [
    (hand_built_state(False)[:20], "player block"),
    (hand_built_state(False)[:42] + b"\x00" * 4, "enemy 0 of 2"),
    (struct.pack("<9f??i", *[0.0] * 9, True, False, 5000), "enemiesCount=5000"),
    (struct.pack("<9f??i", *[0.0] * 9, True, False, -1), "enemiesCount=-1"),
    (struct.pack("<9f??i", *[0.0] * 9, True, False, 0) + b"\x05ab", "currentMenu (5 UTF-8"),
    (struct.pack("<9f??i", *[0.0] * 9, True, False, 0) + b"\x02\xff\xfe", "invalid UTF-8"),
    (struct.pack("<9f??i", *[0.0] * 9, True, False, 0) + b"\xff" * 6, "longer than 5 bytes"),
    (struct.pack("<9f??i", *[0.0] * 9, True, False, 0) + b"\x00" + struct.pack("<i", 65),
     "levelUpOptionsCount=65"),
    (hand_built_state(False) + b"junk", "trailing bytes"),
    (hand_built_state(False) + b"HINP" + struct.pack("<i", 0) + b"\x00" * 28, "HINP version 0"),
    (hand_built_state(False) + b"HINP" + struct.pack("<i", 1) + b"\x00" * 10, "HINP trailer"),
])
def test_malformed_state_names_the_field(data, expected):
  with pytest.raises(codec.MalformedPacket, match=expected.replace("(", r"\(")):
    codec.decode_state(data)


@pytest.mark.parametrize("prefix, expected", [
    (struct.pack("<i", 0), "state_size=0"),
    (struct.pack("<i", -7), "state_size=-7"),
    (struct.pack("<i", 256 * 1024 + 1), "state_size=262145"),
    (struct.pack("<i", 1) + b"\x00" + struct.pack("<i", 4 * 1024 * 1024 + 1), "frame_size"),
])
def test_oversized_length_prefixes_raise_bad_length(prefix, expected):
  with pytest.raises(codec.BadLength, match=expected):
    codec.split_packet(prefix + b"\x00" * 16)


@pytest.mark.parametrize("data, expected", [
    (b"MBRF" + struct.pack("<iii", 4, 4, 3) + b"\x00" * 10, "needs 64 bytes"),
    (b"MBRF" + struct.pack("<iii", 0, 4, 3), "expected 1..8192"),
    (b"MBRF" + struct.pack("<iii", 2, 2, 4) + b"\x00" * 16, "c=4"),
    (b"\xff\xd8\xff\xe0garbage", "corrupt JPEG"),
    (b"GIF89a", "expected JPEG"),
])
def test_malformed_frames(data, expected):
  with pytest.raises(codec.MalformedPacket, match=expected):
    codec.decode_frame(data)


def _with_sof_size(jpeg: bytes, width: int, height: int) -> bytes:
  """The JPEG with its baseline SOF0 header claiming `width` × `height` pixels."""
  at = jpeg.index(b"\xff\xc0")
  return jpeg[:at + 5] + struct.pack(">HH", height, width) + jpeg[at + 9:]


def test_jpeg_size_is_checked_before_decoding(monkeypatch):
  small = codec.encode_jpeg(np.zeros((16, 16, 3), np.uint8))
  assert codec.decode_frame(_with_sof_size(small, 16, 16)).shape == (16, 16, 3)
  over = codec.encode_jpeg(np.zeros((1200, 1200, 3), np.uint8))  # 1.44 M pixels
  assert len(over) < codec.MAX_FRAME_BYTES
  monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("decoded an oversized JPEG"))
  for data, size in ((over, "w=1200 h=1200"), (_with_sof_size(small, 9000, 9000), "w=9000"),
                     (_with_sof_size(small, 8193, 16), "w=8193")):
    with pytest.raises(codec.MalformedPacket, match=f"JPEG frame of {size}.*MAX_FRAME_PIXELS"):
      codec.decode_frame(data)
  with pytest.raises(codec.MalformedPacket, match="MBRF frame of w=1200 h=1200"):
    codec.decode_frame(b"MBRF" + struct.pack("<iii", 1200, 1200, 3) + bytes(1200 * 1200 * 3))


def _state_with(offset: int, value: float, with_hinp: bool = False) -> bytes:
  """The hand-built state with the f32 at byte `offset` replaced by `value`."""
  body = bytearray(hand_built_state(with_hinp))
  body[offset:offset + 4] = struct.pack("<f", value)
  return bytes(body)


_HINP_AT = len(hand_built_state(False)) + 8  # after the magic and the version


@pytest.mark.parametrize("offset, value, with_hinp, expected", [
    (0, float("nan"), False, "player position"),
    (16, float("inf"), False, "player velocity"),
    (24, float("-inf"), False, "player health"),
    (32, float("nan"), False, "game time"),
    (42 + 16 + 12, float("nan"), False, "enemy 1 position and health"),
    (_HINP_AT, float("nan"), True, "HINP move"),
    (_HINP_AT + 20, float("inf"), True, "HINP move, look and click"),
])
def test_non_finite_state_floats_are_malformed(offset, value, with_hinp, expected):
  codec.decode_state(_state_with(offset, 1.0, with_hinp))  # the same layout, finite: fine
  with pytest.raises(codec.MalformedPacket, match=f"{expected}.*expected finite"):
    codec.decode_state(_state_with(offset, value, with_hinp))


@pytest.mark.parametrize("axis", range(4))
def test_non_finite_actions_are_malformed_and_not_encoded(axis):
  values = [0.5, -0.5, 0.25, 0.0]
  values[axis] = float("nan") if axis % 2 else float("inf")
  with pytest.raises(codec.MalformedPacket, match="action move x/y, look x/y"):
    codec.decode_action(struct.pack("<4f4?", *values, False, False, False, False))
  fields = dict(zip(("move_x", "move_y", "look_x", "look_y"), values))
  with pytest.raises(ValueError, match="expected finite floats"):
    codec.encode_action(codec.Action(**fields))
  state = codec.decode_state(hand_built_state(True))
  with pytest.raises(ValueError, match="non-finite"):
    codec.encode_state(dataclasses.replace(state, game_time=values[axis]))


def test_malformed_actions():
  with pytest.raises(codec.MalformedPacket, match="expected 20 or 28"):
    codec.decode_action(b"\x00" * 21)
  with pytest.raises(codec.MalformedPacket, match="ui_click=True"):
    codec.decode_action(struct.pack("<4f4?", 0, 0, 0, 0, False, False, False, True))
  with pytest.raises(codec.BadLength, match="action_size=1024"):
    codec.split_action(struct.pack("<i", 1024))


def test_fuzz_decoder_only_raises_malformed():
  """≥ 10,000 random inputs: pure noise, truncations and byte flips of valid packets."""
  rng = random.Random(0)
  valid = [hand_built_state(False), hand_built_state(True)]
  outcomes = {"ok": 0, "malformed": 0}
  for i in range(12_000):
    kind = i % 3
    if kind == 0:
      data = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 120)))
    else:
      data = bytearray(rng.choice(valid))
      if kind == 1:
        data = data[:rng.randrange(1, len(data))]
      for _ in range(rng.randrange(1, 4)):
        data[rng.randrange(len(data))] = rng.getrandbits(8)
      data = bytes(data)
    try:
      codec.decode_state(data)
      outcomes["ok"] += 1
    except codec.MalformedPacket:
      outcomes["malformed"] += 1
    try:
      codec.split_packet(data)
    except codec.BadLength:
      pass
  assert outcomes["ok"] > 100 and outcomes["malformed"] > 5000, outcomes


def test_click_mapping_top_left_to_bottom_left():
  # Same frame and capture: only y flips.
  assert coords.top_left_to_bonklink(0, 0, (320, 180)) == (0, 179)
  assert coords.top_left_to_bonklink(319, 179, (320, 180)) == (319, 0)
  # Scale a 160×90 vision frame up to a 320×180 capture: (79.5, 44.5) → (159.5, 89.5) → flip.
  assert coords.top_left_to_bonklink(80, 45, (160, 90), (320, 180)) == (160, 89)
  # Clamped into the frame first.
  assert coords.top_left_to_bonklink(-5, 500, (320, 180)) == (0, 0)
  assert coords.bonklink_to_top_left(10, 0, (320, 180)) == (10, 179)
