"""ResearchPlugin shared memory: bit-exact layout, lock-step stepping with the reference
producer, torn-read protection, and refusal of impossible mappings."""
import struct

import numpy as np
import pytest

from mbjax.bridge import research_shm as shm


def test_layout_sizes():
  assert shm.total_size(84, 84) == 21_224
  assert shm.mapping_name("omega-0") == "megabonk_env_omega-0"


def make_mapping(tmp_path, w=4, h=2):
  path = str(tmp_path / shm.mapping_name(0))
  with open(path, "wb") as f:
    f.write(b"\x00" * shm.total_size(w, h))
  return path


def test_client_reads_hand_written_mapping(tmp_path):
  path = make_mapping(tmp_path)
  pixels_bottom_up = bytes(range(24))
  with open(path, "r+b") as f:
    f.write(struct.pack("<i4xfiiiii", shm.OBS_READY, 0.5, 1, 7, 1234, 4, 2))
    f.write(pixels_bottom_up)
  c = shm.ResearchShmClient(path, 4, 2)
  pixels, header = c.read_observation(1.0)
  assert header == dict(flag=2, reward=0.5, done=1, step=7, game_time_ms=1234, width=4, height=2)
  np.testing.assert_array_equal(pixels[1].reshape(-1), np.arange(12))  # bottom row last
  np.testing.assert_array_equal(pixels[0].reshape(-1), np.arange(12, 24))
  c.write_action([0.5, -0.5, 1, 0, 0, 0])
  c.close()
  with open(path, "rb") as f:
    raw = f.read()
  assert struct.unpack_from("<i", raw, 0)[0] == shm.ACTION_READY
  assert struct.unpack_from("<6f", raw, 0x20 + 24) == (0.5, -0.5, 1.0, 0.0, 0.0, 0.0)


def test_torn_read_is_detected_and_retried(tmp_path, monkeypatch):
  path = make_mapping(tmp_path)
  with open(path, "r+b") as f:
    f.write(struct.pack("<i4xfiiiii", shm.OBS_READY, 0.0, 0, 1, 0, 4, 2))
  c = shm.ResearchShmClient(path, 4, 2)
  real = np.frombuffer
  calls = []

  def frombuffer_with_concurrent_write(buffer, *args, **kwargs):
    out = real(buffer, *args, **kwargs)
    if not calls:  # the producer publishes step 2 while the first copy is in progress
      struct.pack_into("<i", buffer, 0x10, 2)
    calls.append(1)
    return out

  monkeypatch.setattr(shm.np, "frombuffer", frombuffer_with_concurrent_write)
  _, header = c.read_observation(1.0)
  assert header["step"] == 2 and c.torn_reads == 1
  c.close()


def test_timeout_and_size_mismatch(tmp_path):
  path = make_mapping(tmp_path)
  c = shm.ResearchShmClient(path, 4, 2)
  with pytest.raises(shm.ShmTimeout, match="no observation within"):
    c.read_observation(0.05)
  c.close()
  with pytest.raises(ValueError, match="needs"):
    shm.ResearchShmClient(path, 84, 84)
  with pytest.raises(ValueError, match="expected 6"):
    shm.ResearchShmClient(path, 4, 2).write_action([0.0] * 5)


def test_lockstep_with_reference_producer(tmp_path):
  path = str(tmp_path / shm.mapping_name(3))
  with shm.ResearchShmProducer(path, 32, 32, deterministic=True):
    c = shm.ResearchShmClient(path, 32, 32)
    pixels, header = c.read_observation(30.0)
    assert pixels.shape == (32, 32, 3) and header["step"] == 0 and header["width"] == 32
    steps = []
    for _ in range(5):
      pixels, header = c.step([1.0, 0.0, 0, 0, 0, 0], timeout=10.0)
      steps.append(header["step"])
    assert steps == [1, 2, 3, 4, 5]  # exactly one game step per action
    assert header["game_time_ms"] == int(5 * 1000 / 60)
    _, header = c.reset(timeout=10.0)
    assert header["step"] == 6 and header["game_time_ms"] == 0 and header["done"] == 0
    c.close()
