"""Video → `.npz` chunk throughput at 224², end to end and decode alone:

  python -m experiments.bench_video [--frames=900] [--repeats=3]

Sources (made first, not timed; `experiments/video_clips.py`): a textured synthetic clip
(moving block noise, the hard case for compression) and a BonkArena gameplay clip (flat
colours, follow camera, the pipeline's ground-truth source), both 30 fps H.264. Each is
timed (best of --repeats) as:
  decode        PyAV decode of every frame, no conversion;
  decode+resize `video.iter_frames` at the source rate to 224² RGB (what conversion reads);
  end to end    `video.convert_many` to chunks (decode, resize, save) per compression.
Prints frames/s of wall time, frames per CPU-second (all threads of this process: less
sensitive to other jobs on a shared machine than wall time), bytes/frame and the load
average. Upstream's `process_video` on the same clip, in the same run:
`experiments/bench_peers.py --row=video`.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_enable_concurrency_optimized_scheduler=false")

import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import av  # noqa: E402
from absl import app, flags  # noqa: E402

from experiments import video_clips  # noqa: E402
from mbjax.offline import chunks, video  # noqa: E402

_FRAMES = flags.DEFINE_integer("frames", 1200, "Frames per source clip (30 fps).")
_CHUNK_FRAMES = flags.DEFINE_integer(
    "chunk_frames", 200, "Frames per chunk (several per clip, so saving chunk n overlaps "
    "decoding chunk n+1 as it does on long videos).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per case (best is reported).")
_SOURCE_SIZE = flags.DEFINE_integer("source_size", 448, "Side of the source clips.")
_OUT = flags.DEFINE_string("out", None, "Keep the source clips here (default: a temp dir).")


def best_of(repeats, fn):
  """(count, best wall seconds, CPU seconds of that run)."""
  runs = []
  for _ in range(repeats):
    start, cpu = time.perf_counter(), time.process_time()
    count = fn()
    runs.append((time.perf_counter() - start, time.process_time() - cpu))
  wall, cpu = min(runs)
  return count, wall, cpu


def decode_only(path):
  with av.open(path) as container:
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    return sum(1 for _ in container.decode(stream))


def main(argv):
  del argv
  work = _OUT.value or tempfile.mkdtemp(prefix="bench_video-")
  os.makedirs(work, exist_ok=True)
  clips = {"textured": os.path.join(work, "textured.mp4"),
           "arena": os.path.join(work, "arena.mp4")}
  for name, path in clips.items():
    if not os.path.exists(path):
      video_clips.CLIPS[name](path, _FRAMES.value, _SOURCE_SIZE.value, _SOURCE_SIZE.value)
  print(f"sources: {_SOURCE_SIZE.value}² 30 fps H.264, {_FRAMES.value} frames; output 224² "
        f"at 30 fps (every frame kept); best of {_REPEATS.value}")
  print(f"load average before: {os.getloadavg()}")
  print(f"{'clip':>9} | {'case':<22} | {'frames/s':>9} | {'frames/CPU-s':>12} | "
        f"{'bytes/frame':>11}")

  def row(name, case, n, wall, cpu, size=""):
    print(f"{name:>9} | {case:<22} | {n / wall:9.0f} | {n / cpu:12.0f} | {size:>11}")

  for name, path in clips.items():
    row(name, "decode", *best_of(_REPEATS.value, lambda: decode_only(path)))
    row(name, "decode+resize", *best_of(_REPEATS.value, lambda: sum(
        1 for _ in video.iter_frames(path, fps=30, size=(224, 224)))))
    for compression in chunks.COMPRESSION_LEVELS:
      out = os.path.join(work, f"chunks_{name}_{compression}")
      cfg = video.ConvertConfig(fps=30, size=(224, 224), compression=compression, audio=False,
                                chunk_frames=_CHUNK_FRAMES.value)

      def convert():
        shutil.rmtree(out, ignore_errors=True)
        manifest = video.convert_many([(path, name)], out, cfg)
        return manifest["sources"][name]["frames"]

      n, wall, cpu = best_of(_REPEATS.value, convert)
      size = sum(os.path.getsize(p) for p in chunks.list_chunks(out))
      row(name, "end to end, " + compression, n, wall, cpu, f"{size / n:.0f}")
  print(f"load average after: {os.getloadavg()}")
  if not _OUT.value:
    shutil.rmtree(work)


if __name__ == "__main__":
  app.run(main)
