"""The `.npz` chunk layout: validation with errors naming the file, atomic writes that keep
existing keys, deterministic listing, the manifest, and the upstream chunk importer."""
import json
import os

import numpy as np
import pytest

from mbjax.offline import chunks


def make_chunk(length=6, seed=0):
  rng = np.random.default_rng(seed)
  dones = np.zeros(length, bool)
  dones[-1] = True
  return {
      "observations": rng.integers(0, 256, (length, 8, 10, 3), dtype=np.uint8),
      "dones": dones,
      "meta": chunks.encode_meta({"episode_id": "x_01234567", "chunk_index": 0}),
      "video_source": np.asarray("/videos/x.mp4"),
  }


@pytest.mark.parametrize("compression", sorted(chunks.COMPRESSION_LEVELS))
def test_write_read_round_trip_in_every_compression(tmp_path, compression):
  arrays = make_chunk()
  path = str(tmp_path / "c.npz")
  chunks.write_chunk(path, arrays, compression)
  with np.load(path, allow_pickle=False) as npz:  # a plain .npz
    assert sorted(npz.files) == sorted(arrays)
  back = chunks.read_chunk(path)
  for key, value in arrays.items():
    np.testing.assert_array_equal(back[key], value)
    assert back[key].dtype == value.dtype
  assert chunks.read_meta(path) == {"episode_id": "x_01234567", "chunk_index": 0}
  assert os.listdir(tmp_path) == ["c.npz"]  # the temporary file was moved, not left


def test_update_chunk_adds_labels_and_keeps_every_other_key(tmp_path):
  path = str(tmp_path / "c.npz")
  arrays = make_chunk()
  chunks.write_chunk(path, arrays)
  labels = {"actions": np.ones((6, 6), np.float32), "rewards": np.arange(6, dtype=np.float32),
            "progress_scores": np.zeros(6, np.float32)}
  chunks.update_chunk(path, labels)
  chunks.update_chunk(path, {"skill_tokens": np.full(6, -1, np.int32)})
  back = chunks.read_chunk(path)
  assert sorted(back) == sorted([*arrays, *labels, "skill_tokens"])
  np.testing.assert_array_equal(back["observations"], arrays["observations"])
  np.testing.assert_array_equal(back["rewards"], labels["rewards"])
  with pytest.raises(chunks.ChunkError, match="c.npz.*'rewards'.*5 rows"):
    chunks.update_chunk(path, {"rewards": np.zeros(5, np.float32)})
  np.testing.assert_array_equal(chunks.read_chunk(path)["rewards"], labels["rewards"])


@pytest.mark.parametrize("change, message", [
    ({"observations": np.zeros((6, 8, 10, 3), np.float32)}, "'observations': expected uint8"),
    ({"dones": np.zeros(6, np.int64)}, "'dones': expected bool"),
    ({"actions": np.zeros((5, 6), np.float32)}, "'actions': 5 rows but observations has 6"),
    ({"meta": np.asarray("{not json")}, "meta: not valid JSON"),
    ({"meta": np.asarray(["{}"])}, "'meta': expected a 0-d unicode"),
    ({"observations": np.zeros((6, 8, 10, 4), np.uint8)}, "RGB"),
])
def test_validation_errors_name_the_file_and_the_key(change, message):
  with pytest.raises(chunks.ChunkError, match=message) as info:
    chunks.validate_chunk({**make_chunk(), **change}, "videos/bad.npz")
  assert "videos/bad.npz" in str(info.value)
  with pytest.raises(chunks.ChunkError, match="missing key"):
    chunks.validate_chunk({"observations": make_chunk()["observations"]}, "x")


def test_unreadable_and_pickled_files_are_refused_by_name(tmp_path):
  junk = tmp_path / "junk.npz"
  junk.write_bytes(b"\x00not a zip" * 10)
  with pytest.raises(chunks.ChunkError, match="junk.npz.*not a readable"):
    chunks.read_chunk(str(junk))
  pickled = tmp_path / "pickled.npz"
  np.savez(pickled, **{**make_chunk(), "meta": np.asarray({"a": 1}, dtype=object)})
  with pytest.raises(chunks.ChunkError, match="pickled.npz"):
    chunks.read_chunk(str(pickled))
  with pytest.raises(chunks.ChunkError, match="pickled.npz"):
    chunks.import_upstream_chunk(str(pickled), str(tmp_path / "out.npz"))


def test_list_chunks_is_sorted_and_skips_temporaries(tmp_path):
  for name in ("demo_b_chunk0001.npz", "demo_a_chunk0000.npz", "demo_b_chunk0000.npz"):
    chunks.write_chunk(str(tmp_path / name), make_chunk())
  (tmp_path / ".tmp-123.npz").write_bytes(b"partial")
  (tmp_path / "manifest.json").write_text("{}")
  assert [os.path.basename(p) for p in chunks.list_chunks(str(tmp_path))] == [
      "demo_a_chunk0000.npz", "demo_b_chunk0000.npz", "demo_b_chunk0001.npz"]
  assert [os.path.basename(p) for p, _ in chunks.iter_chunks(str(tmp_path), ("dones",))] == [
      "demo_a_chunk0000.npz", "demo_b_chunk0000.npz", "demo_b_chunk0001.npz"]
  with pytest.raises(FileNotFoundError, match="nowhere"):
    chunks.list_chunks(str(tmp_path / "nowhere"))


def test_manifest_round_trip_and_corrupt_manifest(tmp_path):
  assert chunks.load_manifest(str(tmp_path))["sources"] == {}
  manifest = {"format": chunks.MANIFEST_FORMAT, "sources": {"a.mp4": {"status": "done"}}}
  chunks.save_manifest(str(tmp_path), manifest)
  assert chunks.load_manifest(str(tmp_path)) == manifest
  assert os.listdir(tmp_path) == ["manifest.json"]
  (tmp_path / "manifest.json").write_text("{truncated")
  with pytest.raises(chunks.ChunkError, match="manifest.json"):
    chunks.load_manifest(str(tmp_path))


def upstream_chunk(length=7):
  """A chunk as upstream `video_to_trajectory` + labelling phases saved it."""
  rng = np.random.default_rng(1)
  dones = np.zeros(length, bool)
  dones[-1] = True
  meta = {"episode_id": "run3_ab12cd34", "chunk_index": 2, "action_labeling": "idm",
          "reward_labeling": "video_reward_model", "audio_sample_rate": 16000,
          "audio_samples_per_frame": 356, "audio_channels": 1}
  return {
      "observations": rng.integers(0, 256, (length, 12, 12, 3), dtype=np.uint8),
      "dones": dones,
      "video_source": np.asarray("gameplay_videos/run3.mp4"),
      "meta": np.asarray(json.dumps(meta)),
      "proxy_actions": rng.normal(size=(length, 6)).astype(np.float32),
      "audio": rng.integers(-2000, 2000, (length, 356), dtype=np.int16),
      "actions": rng.uniform(-1, 1, (length, 6)).astype(np.float32),
      "rewards": rng.normal(size=length).astype(np.float32),
      "progress_scores": np.cumsum(rng.normal(size=length)).astype(np.float32),
      "skill_tokens": np.array([3] * 4 + [-1] * (length - 4), np.int32),
      "audio_tokens": np.arange(length, dtype=np.int32),
  }, meta


def test_upstream_chunk_import_round_trips(tmp_path):
  arrays, meta = upstream_chunk()
  src = str(tmp_path / "demo_run3_ab12cd34_chunk0002.npz")
  np.savez_compressed(src, **arrays)  # as upstream wrote them
  dst = str(tmp_path / "ours" / "c.npz")
  os.makedirs(os.path.dirname(dst))
  chunks.import_upstream_chunk(src, dst)
  ours = chunks.read_chunk(dst)
  assert sorted(ours) == sorted(arrays)
  for key in arrays:
    if key != "meta":
      np.testing.assert_array_equal(ours[key], arrays[key])
      assert ours[key].dtype == arrays[key].dtype
  assert chunks.decode_meta(ours["meta"]) == {**meta, "imported_from": os.path.basename(src)}
  # ... and back: our file is an upstream chunk (same keys and dtypes), so it imports again
  # to the same arrays.
  again = chunks.import_upstream_chunk(dst, str(tmp_path / "again.npz"))
  for key in arrays:
    if key != "meta":
      np.testing.assert_array_equal(again[key], arrays[key])


def test_upstream_variants_channels_first_no_dones_no_meta_and_float64_rewards(tmp_path):
  arrays, _ = upstream_chunk(5)
  chw = {"observations": np.transpose(arrays["observations"], (0, 3, 1, 2)),
         "rewards": arrays["rewards"].astype(np.float64)}
  src = str(tmp_path / "clip_chunk0004.npz")
  np.savez(src, **chw)
  out = chunks.import_upstream_chunk(src, str(tmp_path / "c.npz"))
  np.testing.assert_array_equal(out["observations"], arrays["observations"])
  assert out["dones"].tolist() == [False] * 4 + [True]
  assert out["rewards"].dtype == np.float32
  assert chunks.decode_meta(out["meta"])["chunk_index"] == 4
  assert chunks.decode_meta(out["meta"])["episode_id"] == "clip"
  np.savez(src, observations=np.zeros((3, 4, 4, 3), np.float32))
  with pytest.raises(chunks.ChunkError, match="clip_chunk0004.npz: observations must be uint8"):
    chunks.import_upstream_chunk(src, str(tmp_path / "d.npz"))


def test_auto_compression_by_what_level_1_makes_of_a_sample(tmp_path):
  import zipfile

  rng = np.random.default_rng(0)
  # 32 frames of 32x32: the sample (4 frames) is 12 KiB, enough to judge.
  def chunk(observations):
    return {**make_chunk(32), "observations": observations.astype(np.uint8)}

  noise = chunk(rng.integers(0, 256, (32, 32, 32, 3)))  # deflate cannot shrink random bytes
  # 16 random levels: Huffman codes halve it, with nothing for a match search to find.
  levels = chunk(rng.integers(0, 16, (32, 32, 32, 3)))
  # A 4-pixel pattern repeated (flat, game-like): level 1 shrinks it far below half.
  pattern = np.array([0, 50, 100, 150], np.uint8).repeat(3).reshape(4, 3)
  stripes = np.tile(pattern, (32, 32, 8, 1))
  # 22 rows of noise over 10 of stripes: level 1 keeps about 70%; run lengths (matches at
  # distance 1) miss the stripes' 4-pixel period, so "rle" is about 10% larger.
  mixed = np.concatenate([noise["observations"][:, :22], stripes[:, 22:]], axis=1)
  assert chunks.compression_codec("auto", noise) is None
  assert chunks.compression_codec("auto", chunk(stripes)) == chunks.COMPRESSION_LEVELS["deflate"]
  assert chunks.compression_codec("auto", levels) == chunks.COMPRESSION_LEVELS["rle"]
  assert chunks.compression_codec("auto", chunk(mixed)) == chunks.COMPRESSION_LEVELS["fast"]
  for name, arrays, expected in (("noise", noise, zipfile.ZIP_STORED),
                                 ("stripes", chunk(stripes), zipfile.ZIP_DEFLATED)):
    path = str(tmp_path / f"{name}.npz")
    chunks.write_chunk(path, arrays, "auto")
    with zipfile.ZipFile(path) as zf:
      assert zf.getinfo("observations.npy").compress_type == expected, name
    np.testing.assert_array_equal(chunks.read_chunk(path)["observations"], arrays["observations"])


@pytest.mark.parametrize("compression", ["fast", "rle"])
def test_block_parallel_deflate_is_one_valid_stream(tmp_path, monkeypatch, compression):
  import zipfile
  import zlib

  monkeypatch.setattr(chunks, "DEFLATE_BLOCK", 1000)  # 36 blocks on the thread pool
  arrays = make_chunk(150)
  data = arrays["observations"].tobytes()  # 36,000 bytes
  pieces = chunks.deflate([data[:7], data[7:]], chunks.COMPRESSION_LEVELS[compression])
  assert len(pieces) == 1 + 36 and zlib.decompress(b"".join(pieces), -15) == data
  path = str(tmp_path / "c.npz")
  chunks.write_chunk(path, arrays, compression)
  with zipfile.ZipFile(path) as zf:
    assert zf.testzip() is None  # every member's CRC-32 checks
    assert zf.getinfo("observations.npy").compress_type == zipfile.ZIP_DEFLATED
  with np.load(path, allow_pickle=False) as npz:
    np.testing.assert_array_equal(npz["observations"], arrays["observations"])
    assert npz["meta"].shape == () and str(npz["meta"]) == str(arrays["meta"])
