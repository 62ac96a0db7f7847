"""Video → chunks: exact frame-rate resampling by timestamps, start/end, resize, audio
alignment, directory mode, resumability, and corrupt/truncated sources skipped without
losing other outputs. Every video is a tiny synthetic one written here with PyAV whose
frame i is a flat grey of level 8·i, so a decoded frame tells which source frame it is.
"""
import json
import os
from fractions import Fraction

import av
import numpy as np
import pytest

from mbjax.offline import chunks, video

H, W = 32, 48


def write_video(path, num_frames=30, fps=30, faststart=False, audio_steps=None):
  """Grey level 8·i mod 256 in frame i (lossless H.264). With `audio_steps`, a mono 16 kHz PCM
  track (needs .mkv) whose value is 1000·floor(4·t): a step every 0.25 s."""
  options = {"movflags": "faststart"} if faststart else {}
  with av.open(str(path), mode="w", options=options) as container:
    stream = container.add_stream("libx264", rate=fps)
    stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
    stream.options = {"qp": "0", "preset": "ultrafast"}
    if audio_steps:
      audio = container.add_stream("pcm_s16le", rate=16000, layout="mono")
      t = np.arange(int(16000 * num_frames / fps)) / 16000
      samples = (1000 * np.floor(4 * t)).astype(np.int16)[None]
      frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
      frame.sample_rate, frame.pts = 16000, 0
      container.mux(audio.encode(frame))
      container.mux(audio.encode())
    for i in range(num_frames):
      img = np.full((H, W, 3), (8 * i) % 256, np.uint8)
      container.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
    container.mux(stream.encode())
  return str(path)


def frame_index(frame):
  return int(round(float(frame.mean()) / 8))


def test_select_frames_is_the_containing_interval():
  starts = [Fraction(i, 30) for i in range(30)]
  times = [Fraction(k, 12) for k in range(12)]
  # Frame i covers [i/30, (i+1)/30): t = k/12 lies in frame floor(2.5 k).
  assert video.select_frames(starts, Fraction(1), times) == [
      0, 2, 5, 7, 10, 12, 15, 17, 20, 22, 25, 27]
  # 60 -> 45 fps drops every fourth frame (upstream's integer skip kept them all).
  starts60 = [Fraction(i, 60) for i in range(12)]
  assert video.select_frames(starts60, Fraction(12, 60), [Fraction(k, 45) for k in range(9)]) \
      == [0, 1, 2, 4, 5, 6, 8, 9, 10]
  # Variable frame rate: intervals of unequal length.
  vfr = [Fraction(0), Fraction(1, 10), Fraction(15, 100), Fraction(4, 10)]
  assert video.select_frames(vfr, Fraction(1, 2), [Fraction(k, 10) for k in range(5)]) == [
      0, 1, 2, 2, 3]
  with pytest.raises(ValueError, match="after the end"):
    video.select_frames(vfr, Fraction(1, 2), [Fraction(1, 2)])


def test_decoded_30fps_video_at_12fps_gives_exactly_the_expected_frames(tmp_path):
  path = write_video(tmp_path / "a.mp4")
  out = list(video.iter_frames(path, fps=12, size=None))
  assert [t for t, _ in out] == [Fraction(k, 12) for k in range(12)]
  assert [frame_index(f) for _, f in out] == [0, 2, 5, 7, 10, 12, 15, 17, 20, 22, 25, 27]
  assert out[0][1].shape == (H, W, 3) and out[0][1].dtype == np.uint8
  # Upsampling repeats frames: 30 -> 45 fps, t = k/45 in frame floor(2k/3).
  up = [frame_index(f) for _, f in video.iter_frames(path, fps=45, size=None)]
  assert up == [(2 * k) // 3 for k in range(45)]


def test_start_end_and_resize(tmp_path):
  path = write_video(tmp_path / "a.mp4")
  out = list(video.iter_frames(path, fps=12, size=(16, 24), start_s=0.25, end_s=0.75))
  # t = 0.25 + k/12 < 0.75 -> k = 0..5, frame floor(30 t) = floor(7.5 + 2.5 k).
  assert [frame_index(f) for _, f in out] == [7, 10, 12, 15, 17, 20]
  meta = {"source_fps": 30.0, "fps": 12.0, "timeline_start_s": 0.25, "start_frame": 0}
  assert video.source_frame_indices(meta, 6).tolist() == [7, 10, 12, 15, 17, 20]
  assert out[0][1].shape == (16, 24, 3)


def test_audio_is_cut_by_output_time(tmp_path):
  path = write_video(tmp_path / "a.mkv", audio_steps=True)
  samples, start = video.decode_audio(path, 16000)
  assert start == 0 and len(samples) == 16000
  times = [Fraction(k, 12) for k in range(12)]
  audio = video.audio_for_frames(samples, start, times, 16000, 1333)
  assert audio.shape == (12, 1333) and audio.dtype == np.int16
  # Frame k's slice starts at sample round(16000 k / 12), whose value is 1000 floor(4 k / 12).
  np.testing.assert_array_equal(audio[:, 0], [1000 * (4 * k // 12) for k in range(12)])
  # Frame 2 covers samples 2667..3999 and frame 3 starts at 4000 = 0.25 s, the first step.
  assert audio[2, 1332] == 0 and audio[3, 0] == 1000
  # t = 23/24 starts at sample 15333: 667 samples left, then zeros past the end.
  tail = video.audio_for_frames(samples, start, [Fraction(23, 24)], 16000, 1333)
  assert (tail[0, :667] == 3000).all() and (tail[0, 667:] == 0).all()


def _chunk_files(out_dir):
  return sorted(n for n in os.listdir(out_dir) if n.endswith(".npz"))


def test_directory_conversion_layout_manifest_and_resume(tmp_path):
  src = tmp_path / "videos"
  (src / "sub").mkdir(parents=True)
  write_video(src / "b.mp4", num_frames=30)
  write_video(src / "sub" / "b.mkv", num_frames=15, audio_steps=True)
  out = str(tmp_path / "chunks")
  cfg = video.ConvertConfig(fps=12, size=(16, 16), chunk_frames=5)
  messages = []
  manifest = video.convert_many(video.sources_for(video_dir=str(src)), out, cfg,
                                messages.append)
  a, b = manifest["sources"]["b.mp4"], manifest["sources"]["sub/b.mkv"]
  assert (a["status"], a["frames"], len(a["chunks"])) == ("done", 12, 3)  # 5 + 5 + 2
  assert (b["status"], b["frames"], len(b["chunks"])) == ("done", 6, 2)  # 15 frames = 1.25 s
  assert a["episode_id"] != b["episode_id"]  # same stem, different folders
  assert _chunk_files(out) == sorted(a["chunks"] + b["chunks"])
  assert json.load(open(os.path.join(out, "manifest.json")))["sources"]["b.mp4"]["fps"] == 12

  # The upstream key layout, readable without pickle.
  with np.load(os.path.join(out, a["chunks"][1]), allow_pickle=False) as npz:
    assert sorted(npz.files) == ["dones", "meta", "observations", "video_source"]
    obs, dones = npz["observations"], npz["dones"]
    assert obs.dtype == np.uint8 and obs.shape == (5, 16, 16, 3)
    assert dones.dtype == np.bool_ and dones.tolist() == [False] * 4 + [True]
    meta = json.loads(str(npz["meta"]))
    assert npz["meta"].shape == () and npz["meta"].dtype.kind == "U"
  assert [frame_index(f) for f in obs] == [12, 15, 17, 20, 22]  # output frames 5..9
  assert video.source_frame_indices(meta, 5).tolist() == [12, 15, 17, 20, 22]
  assert meta["chunk_index"] == 1 and meta["start_frame"] == 5 and not meta["last_chunk"]
  last = chunks.read_chunk(os.path.join(out, a["chunks"][2]))
  assert chunks.decode_meta(last["meta"])["last_chunk"] and len(last["dones"]) == 2
  with_audio = chunks.read_chunk(os.path.join(out, b["chunks"][0]))
  assert with_audio["audio"].shape == (5, 1333)

  # A second run skips both; the files are not rewritten.
  stamps = {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in _chunk_files(out)}
  messages.clear()
  again = video.convert_many(video.sources_for(video_dir=str(src)), out, cfg, messages.append)
  assert again["sources"] == manifest["sources"]
  assert sum("already converted" in m for m in messages) == 2
  assert stamps == {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in _chunk_files(out)}
  # New settings redo a source, replacing (not mixing with) its old chunks.
  single = video.convert_many(video.sources_for(video=str(src / "b.mp4")), out,
                              video.ConvertConfig(fps=12, size=(16, 16), chunk_frames=12))
  assert single["sources"]["b.mp4"]["chunks"] == [chunks.chunk_name(a["episode_id"], 0)]
  assert len(_chunk_files(out)) == 1 + 2


def test_corrupt_and_truncated_sources_are_skipped_and_nothing_else_is_lost(tmp_path):
  src = tmp_path / "videos"
  src.mkdir()
  good = write_video(src / "a_good.mp4")
  out = str(tmp_path / "chunks")
  cfg = video.ConvertConfig(fps=10, size=(8, 8), chunk_frames=4)
  first = video.convert_many(video.sources_for(video_dir=str(src)), out, cfg)
  kept = {n: open(os.path.join(out, n), "rb").read() for n in _chunk_files(out)}
  assert len(kept) == 3  # 10 frames: 4 + 4 + 2

  (src / "b_random.mp4").write_bytes(np.random.default_rng(0).bytes(5000))
  whole = open(write_video(tmp_path / "long.mp4", num_frames=120), "rb").read()
  (src / "c_cut.mp4").write_bytes(whole[:len(whole) // 2])  # index at the end: lost
  front = open(write_video(tmp_path / "front.mp4", num_frames=120, faststart=True), "rb").read()
  (src / "d_cut_faststart.mp4").write_bytes(front[:len(front) // 2])  # frames stop early
  write_video(src / "e_good.mp4", num_frames=6)
  manifest = video.convert_many(video.sources_for(video_dir=str(src)), out, cfg)

  sources = manifest["sources"]
  assert {k: v["status"] for k, v in sources.items()} == {
      "a_good.mp4": "done", "b_random.mp4": "skipped", "c_cut.mp4": "skipped",
      "d_cut_faststart.mp4": "skipped", "e_good.mp4": "done"}
  for name in ("b_random.mp4", "c_cut.mp4", "d_cut_faststart.mp4"):
    assert name in sources[name]["reason"] and sources[name]["chunks"] == []
  assert "truncated" in sources["d_cut_faststart.mp4"]["reason"]
  assert sources["a_good.mp4"] == first["sources"]["a_good.mp4"]
  assert {n: open(os.path.join(out, n), "rb").read() for n in kept} == kept
  assert len(_chunk_files(out)) == 3 + 1  # e_good: 6 frames at 30 fps -> 2 at 10 fps
  assert not any(n.startswith(".") for n in os.listdir(out))  # no temporaries left
  with pytest.raises(video.VideoError, match="b_random.mp4"):
    list(video.iter_frames(str(src / "b_random.mp4"), fps=10))


def test_bad_config_names_the_field():
  with pytest.raises(ValueError, match="fps"):
    video.ConvertConfig(fps=0)
  with pytest.raises(ValueError, match="end_s"):
    video.ConvertConfig(start_s=2.0, end_s=1.0)
  with pytest.raises(ValueError, match="exactly one"):
    video.sources_for()


def test_atari_clip_is_an_out_of_domain_source(tmp_path):
  pytest.importorskip("ale_py")
  from mbjax.offline import ground_truth

  path = str(tmp_path / "atari_pong_0.mp4")
  summary = ground_truth.record_atari_clip("pong", seed=0, steps=24, path=path, fps=30)
  truth = np.load(str(tmp_path / "atari_pong_0.npz"))
  assert summary["length"] == 24 and truth["actions_discrete"].shape == (24, 1)
  manifest = video.convert_many(video.sources_for(video=path), str(tmp_path / "chunks"),
                                video.ConvertConfig(fps=15, size=(32, 32), chunk_frames=100))
  assert manifest["sources"]["atari_pong_0.mp4"]["frames"] == 12  # 24 frames at 30 -> 15 fps
