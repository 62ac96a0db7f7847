"""Synthetic H.264 source clips for the video benchmarks (`experiments/bench_video.py`, the
`video` rows of `experiments/bench_peers.py`): made once per run, never timed.

* textured: blocks of random colour scrolling diagonally, with fine grain — little for a
  decoder to skip or for deflate to find (the hard case);
* arena: BonkArena gameplay (scripted policy, follow camera), flat colours, letterboxed
  into the requested frame.
"""
from __future__ import annotations

import numpy as np


def encode(path: str, frames, width: int, height: int, fps: int = 30) -> None:
  """Writes uint8 [H, W, 3] RGB frames as an H.264 (yuv420p, CRF 20) file with PyAV."""
  import av

  with av.open(path, mode="w") as container:
    stream = container.add_stream("libx264", rate=fps)
    stream.width, stream.height = width, height
    stream.pix_fmt = "yuv420p"
    stream.options = {"crf": "20"}
    for frame in frames:
      container.mux(stream.encode(av.VideoFrame.from_ndarray(np.asarray(frame), format="rgb24")))
    container.mux(stream.encode())


def textured_frames(count: int, width: int, height: int):
  """Frames of 8-pixel blocks moving 8 px down and 4 px right per frame, plus grain."""
  rng = np.random.default_rng(0)
  base = rng.integers(0, 256, (height // 8 + count + 1, width // 8 + count + 2, 3), np.uint8)
  grain = rng.integers(0, 24, (4, height, width, 3), np.uint8)
  for i in range(count):
    column, shift = divmod(4 * i, 8)
    blocks = base[i:i + height // 8 + 1, column:column + width // 8 + 2]
    pixels = np.repeat(np.repeat(blocks, 8, axis=0), 8, axis=1)
    yield pixels[:height, shift:shift + width] + grain[i % 4]


def textured_clip(path: str, count: int, width: int, height: int) -> None:
  encode(path, textured_frames(count, width, height), width, height)


def arena_clip(path: str, count: int, width: int, height: int) -> None:
  """BonkArena rendered at min(width, height)² and centred on black."""
  import jax

  from mbjax.envs.bonk_arena import BonkArena, make_scripted_policy, recording

  side = min(width, height)
  env = BonkArena(pixel_size=side, camera="follow")
  params = env.default_params().replace(time_limit=count)
  episode_fn = recording.make_episode_fn(env, params, make_scripted_policy(env))
  episode = jax.device_get(episode_fn(jax.random.PRNGKey(0)))
  top, left = (height - side) // 2, (width - side) // 2

  def letterboxed():
    for frame in episode.frames[:int(episode.valid.sum())]:
      canvas = np.zeros((height, width, 3), np.uint8)
      canvas[top:top + side, left:left + side] = frame
      yield canvas

  encode(path, letterboxed(), width, height)


CLIPS = {"textured": textured_clip, "arena": arena_clip}
