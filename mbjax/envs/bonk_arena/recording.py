"""Recording BonkArena episodes as MP4 video plus the true per-frame actions and outcomes.

The `.npz` written beside each video is the ground truth the offline video pipeline (IDM,
reward-from-video) is validated against. Frame `t` of the video is the screen the policy
saw when it chose action `t`; `rewards[t]`, `terminated[t]`, `truncated[t]` are the outcome
of that action. Keys (arrays of length T = episode length; no pickled objects):
  actions_continuous f32[T, 2], actions_discrete i32[T, 1], rewards f32[T],
  reward_terms f32[T, 7], reward_term_names str[7], terminated bool[T], truncated bool[T],
  fps i32[].
Both files are written to a temporary name and moved into place with `os.replace`, so a
crash never leaves a half-written file under the final name.
"""
from __future__ import annotations

import os

import av
import jax
import numpy as np

from mbjax.envs.bonk_arena import rewards, rollout
from mbjax.envs.bonk_arena.env import BonkArena
from mbjax.envs.bonk_arena.game import EnvParams


def write_mp4(frames: np.ndarray, path: str, fps: int, crf: int = 18) -> None:
  """Encodes uint8[T, H, W, 3] RGB frames as H.264 MP4 (H and W must be even)."""
  frames = np.asarray(frames)
  if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
    raise ValueError(f"frames must be uint8[T, H, W, 3], got {frames.dtype}{frames.shape}")
  height, width = frames.shape[1:3]
  if height % 2 or width % 2:
    raise ValueError(f"frame size must be even for yuv420p, got {height}x{width}")
  tmp = path + ".tmp"
  with av.open(tmp, mode="w", format="mp4") as container:
    stream = container.add_stream("libx264", rate=fps)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    stream.options = {"crf": str(crf)}
    for frame in frames:
      container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
    container.mux(stream.encode())  # flush the encoder
  os.replace(tmp, path)


def write_ground_truth(episode: dict[str, np.ndarray], path: str, fps: int) -> None:
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    np.savez(f, fps=np.int32(fps), reward_term_names=np.asarray(rewards.REWARD_TERMS),
             **episode)
  os.replace(tmp, path)


def make_episode_fn(env: BonkArena, params: EnvParams, policy_fn: rollout.PolicyFn):
  """jit(key -> `rollout.Episode` with frames) for this env, params and policy."""
  return jax.jit(lambda key: rollout.play_episode(env, params, policy_fn, key,
                                                  with_frames=True))


def record_episode(episode_fn, key: jax.Array, video_path: str, fps: int) -> dict:
  """Plays one episode with `episode_fn` (from `make_episode_fn`) and writes
  `video_path` and the `.npz` beside it (same name, `.npz` suffix). Returns a summary."""
  ep = jax.device_get(episode_fn(key))
  length = int(np.sum(ep.valid))
  truth = {
      "actions_continuous": ep.actions_continuous[:length],
      "actions_discrete": ep.actions_discrete[:length],
      "rewards": ep.rewards[:length],
      "reward_terms": ep.reward_terms[:length],
      "terminated": ep.terminated[:length],
      "truncated": ep.truncated[:length],
  }
  write_mp4(ep.frames[:length], video_path, fps)
  write_ground_truth(truth, os.path.splitext(video_path)[0] + ".npz", fps)
  return {"length": length, "return": float(np.sum(truth["rewards"])),
          "terminated": bool(truth["terminated"].any())}
