"""Videos → `.npz` chunks (+ `manifest.json`) for the offline pipeline:

  python -m experiments.video_to_trajectory --video_dir=gameplay_videos \
      --out_dir=rollouts/video_demos
  python -m experiments.video_to_trajectory --video=run.mp4 --fps=12 --start_s=30 --end_s=90

Frames are picked at exactly `--fps` by timestamp and resized to `--size` (layout, frame
choice and resume rules in `mbjax/offline/chunks.py` and `mbjax/offline/video.py`).
Rerunning the same command skips the videos already converted; a corrupt or truncated
video is logged, recorded as skipped in the manifest, and the others are still converted.
The exit status is 1 if any source was skipped.
"""
from absl import app, flags, logging

from experiments import cli
from mbjax.offline import chunks, video

_VIDEO = flags.DEFINE_string("video", None, "One video file.")
_VIDEO_DIR = flags.DEFINE_string("video_dir", None, "A directory of videos (searched recursively).")
_OUT_DIR = flags.DEFINE_string("out_dir", "rollouts/video_demos", "Where chunks go.")
_FPS = flags.DEFINE_float("fps", 45.0, "Output frames per second.")
_SIZE = flags.DEFINE_string("size", "224", "Output size: N (N x N), HxW, or 'source'.")
_START_S = flags.DEFINE_float("start_s", 0.0, "First output time (s).")
_END_S = flags.DEFINE_float("end_s", -1.0, "Stop before this time (s); -1: the end.")
_CHUNK_FRAMES = flags.DEFINE_integer("chunk_frames", 1000, "Frames per chunk.")
_AUDIO = flags.DEFINE_bool("audio", True, "Write `audio` for sources that have sound.")
_COMPRESSION = flags.DEFINE_enum("compression", chunks.DEFAULT_COMPRESSION,
                                 sorted(chunks.COMPRESSION_LEVELS), "Chunk compression.")


def parse_size(text: str) -> tuple[int, int] | None:
  if text == "source":
    return None
  parts = text.lower().split("x")
  try:
    sides = [int(p) for p in parts]
  except ValueError:
    raise app.UsageError(f"--size must be N, HxW or 'source', got {text!r}") from None
  if len(sides) not in (1, 2):
    raise app.UsageError(f"--size must be N, HxW or 'source', got {text!r}")
  return (sides[0], sides[-1])


def main(argv):
  del argv
  cfg = video.ConvertConfig(
      fps=_FPS.value, size=parse_size(_SIZE.value), start_s=_START_S.value,
      end_s=None if _END_S.value < 0 else _END_S.value, chunk_frames=_CHUNK_FRAMES.value,
      audio=_AUDIO.value, compression=_COMPRESSION.value)
  try:
    sources = video.sources_for(_VIDEO.value, _VIDEO_DIR.value)
  except (ValueError, FileNotFoundError) as e:
    raise app.UsageError(str(e)) from None
  logging.info("%d video(s) -> %s at %g fps, size %s", len(sources), _OUT_DIR.value, cfg.fps,
               cfg.size or "source")
  manifest = video.convert_many(sources, _OUT_DIR.value, cfg, progress=logging.info)
  entries = [manifest["sources"][key] for _, key in sources]
  skipped = [e for e in entries if e["status"] == "skipped"]
  print(f"{len(entries) - len(skipped)} converted, {len(skipped)} skipped, "
        f"{sum(e['frames'] for e in entries)} frames -> {_OUT_DIR.value}")
  for entry in skipped:
    print(f"skipped: {entry['reason']}")
  return 1 if skipped else 0


if __name__ == "__main__":
  cli.run(main)
