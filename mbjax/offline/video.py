"""Video decoding at an exact target frame rate, and the video → `.npz` chunks conversion.

Decoder: PyAV (FFmpeg in the wheel, no system ffmpeg; chosen over imageio-ffmpeg, which
pipes raw frames from an ffmpeg subprocess, because PyAV hands us each frame's timestamp
and lets us skip the colour conversion of frames we do not keep; the numbers are in
BENCHMARKS.md, "Video → chunks").

Frame rate by timestamps. The output timeline is t_k = start_s + k / fps (seconds from the
video's start), for every t_k before the end (`end_s`, or the end of the last frame). Each
source frame i covers its presentation interval [s_i, s_{i+1}) (the last frame: its own
duration), and output frame k is the source frame whose interval contains t_k — so 60 → 45
fps drops every fourth frame and 30 → 12 fps takes frames 0, 2, 5, 7, 10, … (upstream's
integer decimation `skip = int(src / target)` kept every frame at 60 → 45). Times are exact
fractions (`fractions.Fraction` of the stream's time base), so no frame is picked twice or
skipped through rounding. Times before the first frame take the first frame.

Resize: FFmpeg's swscale converts to RGB and scales in one call, only for frames that are
kept. The default filter is AREA (pixel averaging): when shrinking it does not alias the
way bilinear sampling (upstream's `cv2.resize` default) does, and here it was 3x faster
than swscale's BILINEAR for 448² → 224² (933 vs 312 frames/s, measured under load 11).

Audio (optional; the upstream chunk key): the first audio stream, resampled to mono int16
at `audio_rate`, cut per output frame into spf = round(audio_rate / fps) samples starting at
round(t_k · audio_rate) — aligned by time, so it does not drift when the source frame rate
is not a multiple of the target (upstream cut by extracted-frame index and drifted).

Errors: any failure to open or decode a source — random bytes, a file cut short (checked
against the container's declared duration), no video stream — raises `VideoError` naming
the file. `convert_many` records such a source as skipped in the manifest, removes the
chunks it had started for it and goes on with the others.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import math
import os
import re
from fractions import Fraction
from typing import Callable, Iterator, Sequence

import numpy as np

from mbjax.offline import chunks

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".avi", ".webm", ".mov")


class VideoError(RuntimeError):
  """A source video could not be decoded; the message names the file."""


@dataclasses.dataclass(frozen=True)
class ConvertConfig:
  """Settings of a video → chunks conversion (stored in the manifest per source)."""

  fps: float = 45.0  # output frames per second (upstream default)
  size: tuple[int, int] | None = (224, 224)  # output (H, W); None keeps the source size
  start_s: float = 0.0  # first output time, seconds from the start of the video
  end_s: float | None = None  # output times stop before this; None: the end of the video
  chunk_frames: int = 1000  # frames per chunk (the last chunk of a source may be shorter)
  audio: bool = True  # write `audio` when the source has an audio stream
  audio_rate: int = 16000
  interpolation: str = "AREA"  # swscale filter name (AREA, BILINEAR, BICUBIC, ...)
  compression: str = chunks.DEFAULT_COMPRESSION

  def __post_init__(self):
    if not self.fps > 0:
      raise ValueError(f"fps must be > 0, got {self.fps}")
    if self.chunk_frames < 1:
      raise ValueError(f"chunk_frames must be >= 1, got {self.chunk_frames}")
    if self.start_s < 0 or (self.end_s is not None and self.end_s <= self.start_s):
      raise ValueError(f"need 0 <= start_s < end_s, got start_s={self.start_s}, end_s={self.end_s}")
    if self.size is not None and (len(self.size) != 2 or min(self.size) < 1):
      raise ValueError(f"size must be (H, W) with positive sides, got {self.size}")
    if self.compression not in chunks.COMPRESSION_LEVELS:
      raise ValueError(f"compression must be one of {sorted(chunks.COMPRESSION_LEVELS)}")

  def settings(self) -> dict:
    """The fields as JSON-ready values (what decides whether a finished source is reusable)."""
    return {**dataclasses.asdict(self),
            "size": None if self.size is None else list(self.size)}


def _exact(value: float) -> Fraction:
  """A float given on the command line (29.97, 12, 0.5) as the fraction it was written as."""
  return Fraction(repr(float(value))).limit_denominator(1_000_000)


def output_times(fps: float, start_s: float, stop: Fraction) -> Iterator[Fraction]:
  """t_k = start_s + k / fps for k = 0, 1, … while t_k < stop."""
  start, step = _exact(start_s), 1 / _exact(fps)
  k = 0
  while start + k * step < stop:
    yield start + k * step
    k += 1


def select_frames(frame_starts: Sequence[Fraction], last_end: Fraction,
                  times: Sequence[Fraction]) -> list[int]:
  """For each time, the index of the frame whose interval [s_i, s_{i+1}) contains it.

  `frame_starts` are increasing; the last frame covers [s_last, last_end). Times before the
  first frame map to frame 0; times at or after `last_end` are an error. The streaming
  decoder in `iter_frames` makes the same choice one frame at a time; this is the reference.
  """
  out, i = [], 0
  for t in times:
    if t >= last_end:
      raise ValueError(f"time {t} is after the end of the video ({last_end})")
    while i + 1 < len(frame_starts) and frame_starts[i + 1] <= t:
      i += 1
    out.append(i)
  return out


def _open(path: str):
  import av  # the `video` extra; imported here so the chunk tools work without it

  try:
    container = av.open(path)
  except (av.error.FFmpegError, OSError, UnicodeDecodeError) as e:
    raise VideoError(f"{path}: cannot open as a video ({type(e).__name__}: {e})") from None
  if not container.streams.video:
    container.close()
    raise VideoError(f"{path}: has no video stream")
  return container


def _seconds(pts, time_base) -> Fraction:
  return Fraction(pts) * Fraction(time_base)


def _declared_end(container, stream) -> tuple[Fraction, Fraction] | None:
  """(end of the video as the file declares it, how far short of it decoding may stop
  before the file counts as truncated), or None if the file does not say.

  The video stream's own duration is precise to about a frame; the container's (MKV,
  WebM often have only that) covers every stream, so an audio track that runs on a little
  longer must not count as missing video: a wider margin there.
  """
  if stream.duration is not None and stream.time_base is not None:
    end = _seconds(stream.duration, stream.time_base)
    return end, max(Fraction(1, 4), end / 50)
  if container.duration is not None:  # in AV_TIME_BASE (microseconds)
    end = Fraction(container.duration, 1_000_000)
    return end, max(Fraction(1), end / 20)
  return None


@dataclasses.dataclass
class FrameInfo:
  """What `iter_frames` learnt about a source once it has been decoded."""

  source_fps: float = 0.0
  duration_s: float = 0.0  # end of the last decoded frame
  declared_duration_s: float | None = None


def iter_frames(path: str, fps: float, size: tuple[int, int] | None = None,
                start_s: float = 0.0, end_s: float | None = None,
                interpolation: str = "AREA", info: FrameInfo | None = None
                ) -> Iterator[tuple[Fraction, np.ndarray]]:
  """Yields (t_k, uint8 [H, W, 3] RGB frame) along the output timeline (module docstring).

  Streams: one decoded frame is held at a time. `info`, if given, is filled in as the
  decode goes. Raises `VideoError` for unreadable and truncated files.
  """
  import av

  container = _open(path)
  info = FrameInfo() if info is None else info
  try:
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"  # frame-parallel decoding on both cores
    time_base = stream.time_base
    origin = stream.start_time or 0
    rate = stream.average_rate or stream.guessed_rate or 30
    info.source_fps = float(rate)
    declared = _declared_end(container, stream)
    info.declared_duration_s = None if declared is None else float(declared[0])
    # Without end_s the timeline is bounded by the last frame; 1e12 s stands for "never".
    stop = Fraction(10**12) if end_s is None else _exact(end_s)
    times = output_times(fps, start_s, stop)
    t = next(times, None)
    if start_s > 0:  # jump to the keyframe before the start instead of decoding up to it
      container.seek(origin + int(_exact(start_s) / Fraction(time_base)), stream=stream,
                     backward=True)

    # One reformatter for the whole video keeps its swscale context: `frame.reformat`
    # builds a new one per frame, which cost 1.7x the CPU time here.
    reformatter = av.video.reformatter.VideoReformatter()

    def convert(frame):
      width, height = (frame.width, frame.height) if size is None else (size[1], size[0])
      return reformatter.reformat(frame, width, height, "rgb24",
                                  interpolation=interpolation).to_ndarray()

    prev, prev_start, count = None, None, 0
    for frame in container.decode(stream):
      if frame.pts is None:  # raw streams without timestamps: assume a constant rate
        start = Fraction(count) / Fraction(rate)
      else:
        start = _seconds(frame.pts - origin, time_base)
      count += 1
      if prev is not None and start > prev_start:
        rgb = None  # converted once however many output times the frame covers
        while t is not None and t < start:  # prev covers [prev_start, start)
          rgb = convert(prev) if rgb is None else rgb
          yield t, rgb
          t = next(times, None)
        if t is None:  # reached end_s: the rest of the file is not decoded
          return
      prev, prev_start = frame, start
    if prev is None:
      raise VideoError(f"{path}: no frame could be decoded")
    duration = (Fraction(prev.duration) * Fraction(time_base) if prev.duration
                else 1 / Fraction(rate))
    last_end = prev_start + duration
    info.duration_s = float(last_end)
    if declared is not None and last_end < min(declared[0], stop) - declared[1]:
      raise VideoError(f"{path}: truncated: frames stop at {float(last_end):.2f} s of the "
                       f"declared {float(declared[0]):.2f} s")
    rgb = None
    while t is not None and t < last_end:
      rgb = convert(prev) if rgb is None else rgb
      yield t, rgb
      t = next(times, None)
  except av.error.FFmpegError as e:
    raise VideoError(f"{path}: decoding failed ({type(e).__name__}: {e})") from None
  finally:
    container.close()


def decode_audio(path: str, sample_rate: int) -> tuple[np.ndarray, Fraction] | None:
  """(mono int16 samples, start time of sample 0 in video time), or None without audio."""
  import av

  container = _open(path)
  try:
    if not container.streams.audio:
      return None
    video = container.streams.video[0]
    origin = _seconds(video.start_time or 0, video.time_base)
    stream = container.streams.audio[0]
    resampler = av.AudioResampler(format="s16", layout="mono", rate=sample_rate)
    pieces, first = [], None
    for frame in container.decode(stream):
      if first is None and frame.pts is not None:
        first = _seconds(frame.pts, stream.time_base) - origin
      for out in resampler.resample(frame):
        pieces.append(out.to_ndarray().reshape(-1))
    for out in resampler.resample(None):  # flush
      pieces.append(out.to_ndarray().reshape(-1))
  except av.error.FFmpegError as e:
    raise VideoError(f"{path}: audio decoding failed ({type(e).__name__}: {e})") from None
  finally:
    container.close()
  samples = np.concatenate(pieces).astype(np.int16) if pieces else np.zeros(0, np.int16)
  return samples, first or Fraction(0)


def audio_for_frames(samples: np.ndarray, samples_start: Fraction, times: Sequence[Fraction],
                     sample_rate: int, samples_per_frame: int) -> np.ndarray:
  """int16 [len(times), spf]: for output time t, the samples from round(t · rate) on
  (zeros where the audio does not reach)."""
  offset = int(round(samples_start * sample_rate))
  out = np.zeros((len(times), samples_per_frame), np.int16)
  for row, t in enumerate(times):
    begin = int(round(t * sample_rate)) - offset
    lo, hi = max(begin, 0), min(begin + samples_per_frame, len(samples))
    if hi > lo:
      out[row, lo - begin:hi - begin] = samples[lo:hi]
  return out


def source_frame_indices(meta: dict, length: int, source_fps: float | None = None) -> np.ndarray:
  """int64 [length]: for frames 0..length-1 of a chunk, the index of the source video frame
  each one is, for a constant-rate source (e.g. a recording whose step t is frame t, so
  these index its ground truth). Exact: floor(t · source_fps) with t = timeline_start_s +
  (start_frame + j) / fps as fractions, the frame whose interval [i, i+1) / source_fps
  contains t."""
  rate = _exact(meta["source_fps"] if source_fps is None else source_fps)
  start, step = _exact(meta.get("timeline_start_s", 0.0)), 1 / _exact(meta["fps"])
  first = meta["start_frame"]
  return np.asarray([math.floor((start + (first + j) * step) * rate) for j in range(length)],
                    np.int64)


# -- video → chunks ---------------------------------------------------------------------------


def episode_id(source_key: str) -> str:
  """`{stem}_{md5(source_key)[:8]}`: readable, and distinct for equal stems in other folders."""
  stem = re.sub(r"[^A-Za-z0-9_-]+", "_", os.path.splitext(os.path.basename(source_key))[0])
  return f"{stem}_{hashlib.md5(source_key.encode()).hexdigest()[:8]}"


def find_videos(directory: str) -> list[str]:
  """Video files under `directory` (recursively), sorted by path."""
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"video directory {directory!r} does not exist")
  found = []
  for root, dirs, files in os.walk(directory):
    dirs.sort()
    found += [os.path.join(root, f) for f in files
              if f.lower().endswith(VIDEO_EXTENSIONS) and not f.startswith(".")]
  return sorted(found)


def convert_video(path: str, out_dir: str, cfg: ConvertConfig, source_key: str,
                  progress: Callable[[str], None] | None = None) -> dict:
  """Converts one video into chunks under `out_dir`; returns its manifest entry.

  Chunks are written as they fill, by one background thread, so compressing and writing
  chunk n overlaps decoding chunk n+1 (zlib and file writes release the GIL; at most two
  chunks of frames are in memory). On any error the chunks already written for this source
  are removed and the error (a `VideoError` for a bad source) is raised.
  """
  ep_id = episode_id(source_key)
  audio = decode_audio(path, cfg.audio_rate) if cfg.audio else None
  spf = int(round(cfg.audio_rate / cfg.fps))
  info = FrameInfo()
  names: list[str] = []  # chunks handed to the writer, in order
  base_meta = {
      "episode_id": ep_id, "fps": cfg.fps,
      "action_labeling": "none", "reward_labeling": "none",
      "audio_sample_rate": cfg.audio_rate if audio is not None else 0,
      "audio_samples_per_frame": spf if audio is not None else 0,
      "audio_channels": 1 if audio is not None else 0,
  }
  writer = concurrent.futures.ThreadPoolExecutor(max_workers=1)
  pending = None

  def flush(obs: np.ndarray, times: list, last: bool):
    nonlocal pending
    index = len(names)
    dones = np.zeros(len(obs), bool)
    dones[-1] = True
    meta = {**base_meta, "chunk_index": index, "last_chunk": last,
            "start_frame": index * cfg.chunk_frames, "start_time_s": float(times[0]),
            "timeline_start_s": cfg.start_s,
            "frame_size": list(obs.shape[1:3]), "source_fps": info.source_fps}
    arrays = {"observations": obs, "dones": dones, "meta": chunks.encode_meta(meta),
              "video_source": np.asarray(os.path.abspath(path))}
    if audio is not None:
      arrays["audio"] = audio_for_frames(audio[0], audio[1], times, cfg.audio_rate, spf)
    names.append(chunks.chunk_name(ep_id, index))
    if pending is not None:
      pending.result()  # one chunk in flight at a time; raises the writer's error here
    pending = writer.submit(chunks.write_chunk, os.path.join(out_dir, names[-1]), arrays,
                            cfg.compression)
    if progress:
      progress(f"{source_key}: chunk {index} ({len(obs)} frames, t={float(times[-1]):.1f} s)")

  buffer, times = None, []
  try:
    for t, frame in iter_frames(path, cfg.fps, cfg.size, cfg.start_s, cfg.end_s,
                                cfg.interpolation, info):
      if len(times) == cfg.chunk_frames:  # a further frame exists: this chunk is not last
        flush(buffer, times, last=False)
        buffer, times = None, []
      if buffer is None:  # filled in place: no stacking copy per chunk
        buffer = np.empty((cfg.chunk_frames,) + frame.shape, np.uint8)
      buffer[len(times)] = frame
      times.append(t)
    if not times:
      raise VideoError(f"{path}: no frame between start_s={cfg.start_s} and end_s={cfg.end_s}")
    flush(buffer[:len(times)], times, last=True)
    pending.result()
  except BaseException:
    writer.shutdown(wait=True)
    for name in names:
      if os.path.exists(os.path.join(out_dir, name)):
        os.unlink(os.path.join(out_dir, name))
    raise
  writer.shutdown()
  total = (len(names) - 1) * cfg.chunk_frames + len(times)
  return {"status": "done", "episode_id": ep_id, "chunks": names, "frames": total,
          "fps": cfg.fps, "source_fps": info.source_fps, "duration_s": info.duration_s}


def _fingerprint(path: str) -> dict:
  st = os.stat(path)
  return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _is_finished(entry: dict | None, fingerprint: dict, cfg: ConvertConfig, out_dir: str) -> bool:
  return bool(entry) and entry.get("status") == "done" and entry.get(
      "settings") == cfg.settings() and entry.get("source") == fingerprint and all(
          os.path.exists(os.path.join(out_dir, n)) for n in entry.get("chunks", ()))


def _remove_stale(out_dir: str, ep_id: str, entry: dict | None) -> None:
  """Chunks of an unfinished or outdated conversion of this source (they would mix)."""
  prefix = f"demo_{ep_id}_chunk"
  names = set((entry or {}).get("chunks", ())) | {
      n for n in os.listdir(out_dir) if n.startswith(prefix) and n.endswith(".npz")}
  for name in names:
    if os.path.exists(os.path.join(out_dir, name)):
      os.unlink(os.path.join(out_dir, name))


def convert_many(sources: Sequence[tuple[str, str]], out_dir: str, cfg: ConvertConfig,
                 progress: Callable[[str], None] | None = None) -> dict:
  """Converts (path, source_key) pairs into `out_dir`, resumably; returns the manifest.

  A source whose manifest entry is "done" with the same settings, the same file size and
  modification time and all its chunks present is skipped. A source that fails is recorded
  as {"status": "skipped", "reason": ...} and the others are still converted. The manifest
  is saved after every source, so an interrupted run loses at most the source in progress.
  """
  os.makedirs(out_dir, exist_ok=True)
  manifest = chunks.load_manifest(out_dir)
  manifest["format"] = chunks.MANIFEST_FORMAT
  for number, (path, key) in enumerate(sources, 1):
    entry = manifest["sources"].get(key)
    try:
      fingerprint = _fingerprint(path)
    except OSError as e:  # vanished or unreadable since it was listed
      fingerprint = None
      entry = {"status": "skipped", "reason": f"{path}: {e}", "chunks": [], "frames": 0}
    if fingerprint is not None and _is_finished(entry, fingerprint, cfg, out_dir):
      if progress:
        progress(f"[{number}/{len(sources)}] {key}: already converted, skipped")
      continue
    if fingerprint is not None:
      _remove_stale(out_dir, episode_id(key), entry)
      try:
        entry = convert_video(path, out_dir, cfg, key, progress)
      except (VideoError, ValueError, OSError) as e:
        # One source's failure (a bad file, frames changing size, a write error) is
        # recorded and the run goes on; VideoError messages already name the file.
        reason = str(e) if isinstance(e, VideoError) else f"{path}: {type(e).__name__}: {e}"
        entry = {"status": "skipped", "reason": reason, "chunks": [], "frames": 0}
    entry.update(path=os.path.abspath(path), source=fingerprint, settings=cfg.settings())
    manifest["sources"][key] = entry
    chunks.save_manifest(out_dir, manifest)
    if progress:
      progress(f"[{number}/{len(sources)}] {key}: {entry['status']}, {entry['frames']} frames"
               + (f" ({entry['reason']})" if entry["status"] == "skipped" else ""))
  chunks.save_manifest(out_dir, manifest)
  return manifest


def sources_for(video: str | None = None, video_dir: str | None = None) -> list[tuple[str, str]]:
  """(path, source_key) pairs: one file (key = its name) or a directory (key = the path
  relative to it)."""
  if (video is None) == (video_dir is None):
    raise ValueError("give exactly one of a video file or a video directory")
  if video is not None:
    if not os.path.isfile(video):
      raise FileNotFoundError(f"video {video!r} does not exist")
    return [(video, os.path.basename(video))]
  return [(p, os.path.relpath(p, video_dir)) for p in find_videos(video_dir)]
