"""Writing rendered frames to MP4 (PyAV, H.264), atomically."""
from __future__ import annotations

import numpy as np

from mbjax import files


def write_mp4(path: str, frames: np.ndarray, fps: int = 30) -> str:
  """Writes uint8 frames [T, H, W, 3] to `path` (via a temporary file, then rename)."""
  import av  # the `video` extra; imported here so training works without it

  frames = np.asarray(frames)
  if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
    raise ValueError(f"write_mp4({path!r}): expected uint8 frames [T, H, W, 3], got "
                     f"{frames.dtype}{list(frames.shape)}")
  # H.264 with yuv420p needs even sides; pad by edge replication when odd.
  pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
  if pad_h or pad_w:
    frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
  with files.atomic_path(path) as tmp:
    with av.open(tmp, mode="w", format="mp4") as container:
      stream = container.add_stream("libx264", rate=fps)
      stream.height, stream.width = frames.shape[1:3]
      stream.pix_fmt = "yuv420p"
      stream.options = {"crf": "18"}
      for frame in frames:
        container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
      container.mux(stream.encode())
  return path
