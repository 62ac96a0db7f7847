"""Recording BonkArena episodes as MP4 video plus the true per-frame actions and outcomes.

The `.npz` written beside each video is the ground truth the offline video pipeline (IDM,
reward-from-video, deaths) is validated against. Frame `t` of the video is the screen the
policy saw when it chose action `t`; `rewards[t]`, `terminated[t]`, `truncated[t]` are the
outcome of that action. A video whose player died shows one frame more, as a game's video
shows its death screen: the terminal state, drawn as the death screen (`render`), with a
row of its own that has no action (a zero move, the menu no-op), no reward and no episode
end; `death_screen` marks it. Keys (arrays of length T = the frames of the video: the
episode's steps, plus one after a death; no pickled objects):
  actions_continuous f32[T, 2], actions_discrete i32[T, 1], rewards f32[T],
  reward_terms f32[T, 8], reward_term_names str[8], terminated bool[T], truncated bool[T],
  death_screen bool[T], fps i32[];
and the state shown in frame t, for evaluating models per kind of frame:
  menu_open bool[T]      the level-up menu overlay is on screen (actions are menu choices);
  player_pos f32[T, 2]   world (x, y);
  player_speed f32[T]    world units the player moves between frames t and t+1 (the
                         motion action t caused; 0 on menu frames), the "fast motion" axis;
  camera_origin f32[T, 2] world (x, y) of the frame's top-left corner (moves with the
                         follow camera; zeros for the fixed one);
  upgrades i32[T, 7]     cards taken per kind (`game.CARDS` order);
  game_time i32[T]       unpaused ticks survived (time alive);
  level i32[T], kills i32[T], health f32[T];
  xp_total f32[T]        all XP collected so far (the score: it only grows);
  cumulative_reward f32[T] sum of rewards[:t] (the return so far);
  meta str[]             JSON: `source` ("bonk_arena"), the game's `rules_version`, how the
                         video was drawn (pixel_size, camera, palette, upgrade_hud) plus
                         whatever the recorder adds (policy, seed, ...).
Both files are written to a temporary name and renamed into place (`mbjax.files`), so a
crash never leaves a half-written file under the final name.
"""
from __future__ import annotations

import json
import os

import av
import jax
import numpy as np

import jax.numpy as jnp

from mbjax import files
from mbjax.envs.bonk_arena import game, render, rewards, rollout
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
  with files.atomic_path(path) as tmp, av.open(tmp, mode="w", format="mp4") as container:
    stream = container.add_stream("libx264", rate=fps)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    stream.options = {"crf": str(crf)}
    for frame in frames:
      container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
    container.mux(stream.encode())  # flush the encoder


def write_ground_truth(episode: dict[str, np.ndarray], path: str, fps: int,
                       meta: dict | None = None) -> None:
  meta = {"source": "bonk_arena", "rules_version": game.RULES_VERSION, **(meta or {})}
  with files.atomic_open(path, "wb") as f:
    np.savez(f, fps=np.int32(fps), reward_term_names=np.asarray(rewards.REWARD_TERMS),
             meta=np.asarray(json.dumps(meta, sort_keys=True)), **episode)


def xp_total(params: EnvParams, state: game.EnvState) -> jax.Array:
  """All XP collected so far: the cost of the levels gained plus the XP towards the next."""
  gained = (state.level - 1).astype(jnp.float32)
  return (gained * params.xp_base + params.xp_growth * gained * (gained - 1.0) / 2.0
          + state.xp)


def ground_truth_fn(params: EnvParams, renderer: render.Renderer) -> rollout.RecordFn:
  """`record_fn` for `rollout.play_episode`: the frame drawn by `renderer` and the per-frame
  truth of the module docstring."""

  def record(state: game.EnvState, next_state: game.EnvState) -> dict:
    return {
        "frame": renderer(state, params),
        "menu_open": state.menu_open,
        "player_pos": state.player_pos,
        "player_speed": jnp.linalg.norm(next_state.player_pos - state.player_pos),
        "camera_origin": renderer.camera_origin(state, params),
        "upgrades": state.upgrades,
        "game_time": state.game_time,
        "level": state.level,
        "kills": state.kills,
        "health": state.health,
        "xp_total": xp_total(params, state),
    }

  return record


def make_episode_fn(env: BonkArena, params: EnvParams, policy_fn: rollout.PolicyFn,
                    renderer: render.Renderer | None = None):
  """jit(key -> `rollout.Episode` with frames and the per-frame truth in `extras`).

  Frames are drawn by `renderer` (default: the env's own), so a video can use another
  camera, palette or size than the observations the policy acts on.
  """
  record = ground_truth_fn(params, env.renderer if renderer is None else renderer)

  def episode(key):
    ep = rollout.play_episode(env, params, policy_fn, key, record_fn=record)
    extras, end_extras = dict(ep.extras), dict(ep.end_extras)
    return ep.replace(frames=extras.pop("frame"), extras=extras,
                      end_frame=end_extras.pop("frame"), end_extras=end_extras)

  return jax.jit(episode)


def record_episode(episode_fn, key: jax.Array, video_path: str, fps: int,
                   meta: dict | None = None) -> dict:
  """Plays one episode with `episode_fn` (from `make_episode_fn`) and writes
  `video_path` and the `.npz` beside it (same name, `.npz` suffix). Returns a summary."""
  ep = jax.device_get(episode_fn(key))
  length = int(np.sum(ep.valid))
  died = bool(ep.terminated[length - 1])
  steps = {
      "actions_continuous": ep.actions_continuous[:length],
      "actions_discrete": ep.actions_discrete[:length],
      "rewards": ep.rewards[:length],
      "reward_terms": ep.reward_terms[:length],
      "terminated": ep.terminated[:length],
      "truncated": ep.truncated[:length],
      "death_screen": np.zeros(length, bool),
      "frame": ep.frames[:length],
      **{name: np.asarray(value)[:length] for name, value in ep.extras.items()},
  }
  if died:  # the death screen's row: no action, no reward, no episode end
    screen = {name: np.zeros_like(value[:1]) for name, value in steps.items()}
    screen["actions_discrete"] = np.full_like(steps["actions_discrete"][:1],
                                              game.CARDS_PER_MENU)
    screen["death_screen"] = np.ones(1, bool)
    screen.update({name: np.asarray(value)[None] for name, value in ep.end_extras.items()})
    screen["frame"] = ep.end_frame[None]
    screen["menu_open"] = np.zeros(1, bool)  # the death screen covers the menu
    steps = {name: np.concatenate([value, screen[name]]) for name, value in steps.items()}
  frames = steps.pop("frame")
  steps["cumulative_reward"] = np.concatenate([[0.0], np.cumsum(steps["rewards"][:-1])]
                                              ).astype(np.float32)
  write_mp4(frames, video_path, fps)
  write_ground_truth(steps, os.path.splitext(video_path)[0] + ".npz", fps, meta)
  return {"length": length, "frames": len(frames), "return": float(np.sum(steps["rewards"])),
          "terminated": died, "menu_frames": int(steps["menu_open"].sum()),
          "frame_size": list(frames.shape[1:3])}
