"""Click coordinates between the learner's frames (top-left origin) and the plugin's capture
pixels (bottom-left origin, `ClickAtPosition` in BonkLink.cs).

Same contract as upstream `src/bridge/bonklink_coords.py::map_click_top_left_to_bonklink`:
clamp into the vision frame, scale to the capture size when it is known, flip y as
`cap_h - 1 - y`, clamp again; with no capture size the flip happens within the frame.
`bonklink_to_top_left` is its inverse (what the reference server uses for hit tests).
"""
from __future__ import annotations


def _clamp(v: float, hi: int) -> float:
  return min(max(v, 0.0), float(hi - 1))


def top_left_to_bonklink(x: float, y: float, frame_size: tuple[int, int],
                         capture_size: tuple[int, int] | None = None) -> tuple[int, int]:
  """(x, y) in a top-left frame of `frame_size=(w, h)` → integer plugin pixels."""
  fw, fh = frame_size
  if fw < 1 or fh < 1:
    raise ValueError(f"frame_size={frame_size}: expected positive (width, height)")
  x, y = _clamp(x, fw), _clamp(y, fh)
  cw, ch = capture_size if capture_size else (fw, fh)
  if capture_size:
    x = x * cw / fw
    y = y * ch / fh
  x, y = round(x), round(ch - 1 - y)
  return int(_clamp(x, cw)), int(_clamp(y, ch))


def bonklink_to_top_left(x: int, y: int, capture_size: tuple[int, int]) -> tuple[int, int]:
  """Plugin pixels (bottom-left origin) → top-left pixels of the same capture."""
  cw, ch = capture_size
  return int(_clamp(x, cw)), int(_clamp(ch - 1 - y, ch))
