"""Labelled actions for chunks from a recording of the same video: the checks that a
recording and a chunk belong together, which recording step each chunk frame shows, and the
chunk's `actions` / `actions_valid` in the layout `idm_train` reads.

A recording holds one step per video frame (step t is frame t, as
`mbjax/envs/bonk_arena/recording.py` and `experiments/record_arena.py` write it):
`actions_continuous` f32[T, C], `actions_discrete` int[T, K] (or int[T] for one branch), and
optionally `fps` (must be the video's frame rate), `menu_open` bool[T] (frames whose move
is not visible: the continuous label is marked invalid there) and `rewards` f32[T] (the
game's reward of each step: copied to the chunk's `game_rewards`, what the reward model's
"returns" objective learns from). Every check raises
`chunks.ChunkError` naming the file and what was expected. `label_chunks` (the library
side of `experiments/label_chunks.py`) reads and writes the files.
"""
from __future__ import annotations

import math
import os
import zipfile
from typing import Mapping

import numpy as np

from mbjax.envs.spaces import HybridActionSpec
from mbjax.offline import chunks as chunks_lib
from mbjax.offline import idm_training
from mbjax.offline import video as video_lib
from mbjax.offline.pipeline.workspace import one_hot, pack_actions, update_meta

REQUIRED_FIELDS = ("actions_continuous", "actions_discrete")


def check_recording(recording: Mapping[str, np.ndarray], spec: HybridActionSpec,
                    name: str) -> int:
  """Checks the action fields of a recording against `spec`; returns its step count T."""
  missing = [k for k in REQUIRED_FIELDS if k not in recording]
  if missing:
    raise chunks_lib.ChunkError(f"{name}: missing {missing}; a recording needs "
                                f"{list(REQUIRED_FIELDS)} (one row per video frame)")
  continuous = recording["actions_continuous"]
  steps = len(continuous) if continuous.ndim else 0
  if continuous.dtype.kind != "f" or continuous.shape != (steps, spec.continuous_dim):
    raise chunks_lib.ChunkError(
        f"{name}: actions_continuous: expected float [T, {spec.continuous_dim}], got "
        f"{continuous.dtype}{list(continuous.shape)}")
  discrete = _discrete(recording, name, spec, steps)
  for b, size in enumerate(spec.branches):
    if steps and (discrete[:, b].min() < 0 or discrete[:, b].max() >= size):
      raise chunks_lib.ChunkError(
          f"{name}: actions_discrete[:, {b}] holds {discrete[:, b].min()}..."
          f"{discrete[:, b].max()}; branch {b} has choices 0..{size - 1}")
  if "menu_open" in recording and recording["menu_open"].shape != (steps,):
    raise chunks_lib.ChunkError(f"{name}: menu_open: expected bool [{steps}], got "
                                f"{list(recording['menu_open'].shape)}")
  if "rewards" in recording:
    rewards = recording["rewards"]
    if rewards.dtype.kind != "f" or rewards.shape != (steps,):
      raise chunks_lib.ChunkError(f"{name}: rewards: expected float [{steps}], got "
                                  f"{rewards.dtype}{list(rewards.shape)}")
    if not np.all(np.isfinite(rewards)):
      raise chunks_lib.ChunkError(f"{name}: rewards: {int(np.sum(~np.isfinite(rewards)))} "
                                  "non-finite values; expected the game's finite reward")
  if steps == 0:
    raise chunks_lib.ChunkError(f"{name}: the recording has no step")
  return steps


def _discrete(recording, name: str, spec: HybridActionSpec, steps: int) -> np.ndarray:
  discrete = recording["actions_discrete"]
  if discrete.ndim == 1:
    discrete = discrete[:, None]
  if discrete.dtype.kind not in "iu" or discrete.shape != (steps, len(spec.branches)):
    raise chunks_lib.ChunkError(
        f"{name}: actions_discrete: expected int [{steps}, {len(spec.branches)}] (the "
        f"branches {spec.branches}), got {recording['actions_discrete'].dtype}"
        f"{list(recording['actions_discrete'].shape)}")
  return discrete


def steps_for_chunk(meta: Mapping, length: int, steps: int, recording_fps: float | None,
                    chunk: str, recording: str) -> np.ndarray:
  """int64[length]: the recording step each chunk frame shows. Refuses a recording at
  another frame rate than the video, one shorter than the video's frames in the chunk, and
  (for the video's last chunk) one that runs on past the video's last frame."""
  source_fps = float(meta["source_fps"])
  if recording_fps is not None and not math.isclose(recording_fps, source_fps, rel_tol=1e-3):
    raise chunks_lib.ChunkError(f"{recording}: recorded at {recording_fps:g} fps, but the "
                                f"video of {chunk} runs at {source_fps:g} fps")
  index = video_lib.source_frame_indices(dict(meta), length)
  if index[-1] >= steps:
    raise chunks_lib.ChunkError(
        f"{recording}: {steps} steps, but {chunk} shows video frames up to {index[-1]}; "
        "expected one recording step per video frame")
  # The last output frame covers source frames index[-1] .. index[-1] + ⌈source/output⌉ − 1.
  covered = index[-1] + max(1, math.ceil(source_fps / float(meta["fps"])))
  if meta.get("last_chunk") and steps > covered:
    raise chunks_lib.ChunkError(
        f"{recording}: {steps} steps, but the video of {chunk} ends after frame "
        f"{covered - 1}; expected one recording step per video frame")
  return index


def chunk_labels(at_frames: Mapping[str, np.ndarray], spec: HybridActionSpec) -> dict:
  """A chunk's `actions` f32[T, C + Σn] (the applied move, then one-hot choices),
  `actions_valid` bool[T, 2] ([continuous, discrete] visible) and, when the recording has
  them, `game_rewards` f32[T], from the recording's fields taken at the chunk's frames."""
  length = len(at_frames["actions_continuous"])
  discrete = np.asarray(at_frames["actions_discrete"]).reshape(length, -1)
  actions = pack_actions(idm_training.norm_clipped(at_frames["actions_continuous"]),
                         [one_hot(discrete[:, b], n) for b, n in enumerate(spec.branches)])
  move_visible = ~np.asarray(at_frames.get("menu_open", np.zeros(length, bool)), bool)
  labels = {"actions": actions,
            "actions_valid": np.stack([move_visible, np.ones(length, bool)], -1)}
  if "rewards" in at_frames:
    labels["game_rewards"] = np.asarray(at_frames["rewards"], np.float32)
  return labels


def read_recording(path: str) -> dict:
  """The arrays of a recording `.npz` (never unpickled)."""
  try:
    with np.load(path, allow_pickle=False) as npz:
      return {k: npz[k] for k in npz.files}
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    raise chunks_lib.ChunkError(f"{path}: not a readable .npz recording "
                                f"({type(e).__name__}: {e})") from None


def video_source(path: str) -> str:
  """A chunk's `video_source`, or "" for a chunk without one."""
  try:
    with np.load(path, allow_pickle=False) as npz:
      return str(npz["video_source"]) if "video_source" in npz.files else ""
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    raise chunks_lib.ChunkError(f"{path}: not a readable .npz chunk "
                                f"({type(e).__name__}: {e})") from None


def chunks_of_video(arguments: list[str], video: str) -> list[tuple[str, str]]:
  """(path, video_source) of the chunks among `arguments` (chunk files, or directories of
  chunks) cut from `video` (compared less the extension: `foo.npz` stands for `foo.mp4`); a
  chunk file named on its own that was cut from another video is an error."""
  stem = os.path.splitext(os.path.realpath(video))[0]
  found = []
  for argument in arguments:
    named = not os.path.isdir(argument)
    for path in [argument] if named else chunks_lib.list_chunks(argument):
      source = video_source(path)
      if source and os.path.splitext(os.path.realpath(source))[0] == stem:
        found.append((path, source))
      elif named:
        raise chunks_lib.ChunkError(f"{path}: cut from {source or 'no video'!r}, not from "
                                    f"{stem}.*; expected a chunk of the recording's video")
  if not found:
    raise chunks_lib.ChunkError(f"no chunk in {arguments} was cut from {stem}.*: convert "
                                "that video first, or name it (--video)")
  return found


def video_frames(chunk_dir: str, video: str) -> int | None:
  """The frames `video` decoded to when `chunk_dir` was converted (its manifest's duration
  × frame rate), or None when the manifest does not list it."""
  target = os.path.realpath(video)
  for entry in chunks_lib.load_manifest(chunk_dir)["sources"].values():
    if entry.get("status") == "done" and os.path.realpath(entry.get("path", "")) == target:
      return round(entry["duration_s"] * entry["source_fps"])
  return None


def label_chunks(arguments: list[str], recording_path: str, spec: HybridActionSpec,
                 video: str | None = None, compression: str = chunks_lib.DEFAULT_COMPRESSION
                 ) -> list[str]:
  """Writes the recording's actions (and rewards) into the chunks of its video among
  `arguments` (`chunks_of_video`; `video` defaults to `recording_path`'s name) with meta
  action_labeling "human"; returns their paths. The recording must have a step per frame of
  the video (`video_frames`, or else what `steps_for_chunk` can check); every chunk is
  checked before any is written, and each is written atomically."""
  recording = read_recording(recording_path)
  steps = check_recording(recording, spec, recording_path)
  fps = float(recording["fps"]) if "fps" in recording else None
  updates, frames_of = {}, {}  # (chunk directory, video) -> frames: a manifest read once
  for path, source in chunks_of_video(arguments, video or recording_path):
    where = (os.path.dirname(path), source)
    if where not in frames_of:
      frames_of[where] = video_frames(*where)
    frames = frames_of[where]
    if frames is not None and frames != steps:
      raise chunks_lib.ChunkError(
          f"{recording_path}: {steps} steps, but {source} has {frames} frames (the manifest "
          "of its chunks); expected one recording step per video frame")
    arrays = chunks_lib.read_chunk(path)
    meta = chunks_lib.decode_meta(arrays["meta"], path)
    index = steps_for_chunk(meta, len(arrays["observations"]), steps, fps, path,
                            recording_path)
    at_frames = {k: v[index] for k, v in recording.items() if v.ndim and len(v) == steps}
    updates[path] = {**chunk_labels(at_frames, spec),
                     "meta": update_meta(arrays, path, action_labeling="human",
                                         action_source=os.path.abspath(recording_path))}
  for path, new_arrays in updates.items():
    chunks_lib.update_chunk(path, new_arrays, compression)
  return list(updates)
