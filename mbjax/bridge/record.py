"""Recording labelled experience from a BonkLink game into offline `.npz` chunks.

On-policy data without an inverse-dynamics model: every recorded frame is paired with the
input that was actually applied — the human's, from the plugin's `HINP` trailer
(`actions="hinp"`), or the actions this recorder itself sends (`actions="random"`: uniform
moves, a random card in level-up menus, a click to restart after a run).

Chunk format (the offline pipeline's, `upstream_learning.md` §6.1 plus the labelled keys):
`observations` uint8 [T, H, W, 3] (top row first), `actions` f32 [T, 6] = (move x, move y,
fire, ability, interact, ui_click), `click_norm` f32 [T, 2] (top-left origin, [0, 1]),
`rewards` f32 [T] (`shim.reward`) and the same in `game_rewards` (the game's own reward,
which the pipeline's reward labelling never overwrites), `dones` bool [T] (end of a run;
the last frame of every chunk is True, as upstream forces), `video_source` 0-d str, `meta` 0-d JSON str (episode_id,
chunk_index, action_labeling, reward_labeling, fps, frame_size). Files are
`bonklink_{port}_chunk{NNNN}.npz`, written atomically (tmp + rename), compressed.
"""
from __future__ import annotations

import json
import os
import time

import numpy as np

from mbjax import files
from mbjax.bridge import client as client_lib
from mbjax.bridge import codec, shim


def _write_chunk(path: str, arrays: dict) -> None:
  with files.atomic_open(path, "wb") as f:
    np.savez_compressed(f, **arrays)


class Recorder:
  """Samples (newest frame, input, reward) at `fps` and writes chunks of `frames_per_chunk`."""

  def __init__(self, client: client_lib.BonkLinkClient, out_dir: str, *, fps: float = 10.0,
               frames_per_chunk: int = 1000, actions: str = "hinp", seed: int = 0):
    if actions not in ("hinp", "random"):
      raise ValueError(f"actions={actions!r}: expected 'hinp' or 'random'")
    if fps <= 0 or frames_per_chunk < 1:
      raise ValueError(f"fps={fps} must be > 0 and frames_per_chunk={frames_per_chunk} >= 1")
    self.client, self.out_dir, self.fps = client, out_dir, fps
    self.frames_per_chunk, self.actions = frames_per_chunk, actions
    self.rng = np.random.default_rng(seed)
    self.paths: list[str] = []
    self.missing_inputs = 0  # frames dropped because no HINP trailer came with them
    self._rows: list[tuple] = []
    self._episode = 0
    self.client_frame_size: tuple[int, int] | None = None  # (w, h) of the game's frames
    os.makedirs(out_dir, exist_ok=True)

  def _act(self, state: codec.GameState) -> codec.Action:
    if not state.is_playing:
      return shim.restart_action()
    mask = shim.menu_mask(state)
    choice = int(self.rng.choice(np.nonzero(mask)[0]))
    size = self.client_frame_size or (64, 64)
    return shim.to_action(self.rng.uniform(-1, 1, 2), choice, size)

  def run(self, seconds: float, max_frames: int | None = None) -> list[str]:
    """Records for `seconds` (or `max_frames` frames); returns the chunk paths written."""
    deadline = time.monotonic() + seconds
    next_sample, last_frame_seq, prev_state = time.monotonic(), -1, None
    pending_reward, pending_done = 0.0, False
    recorded = 0
    while time.monotonic() < deadline and (max_frames is None or recorded < max_frames):
      obs = self.client.read(min(0.5, max(deadline - time.monotonic(), 0.001)))
      if obs is None:
        continue
      action = None
      if self.actions == "random":
        if obs.frame is not None:
          self.client_frame_size = (obs.frame.shape[1], obs.frame.shape[0])
        action = self._act(obs.state)
        self.client.send(action)
      # Rewards and run ends between two recorded frames belong to the later one.
      if prev_state is not None:
        pending_reward += shim.reward(prev_state, obs.state)
      pending_done |= not obs.state.is_playing
      prev_state = obs.state
      now = time.monotonic()
      if obs.frame is None or obs.frame_seq == last_frame_seq or now < next_sample:
        continue
      last_frame_seq = obs.frame_seq
      next_sample = max(next_sample + 1.0 / self.fps, now)
      if self.actions == "hinp":
        h = obs.state.human_input
        if h is None:
          self.missing_inputs += 1
          continue
        row = (h.move[0], h.move[1], h.fire, h.ability, h.interact, h.ui_click)
        click = h.click_norm
      else:
        row = (action.move_x, action.move_y, action.fire, action.ability, action.interact,
               action.ui_click)
        w, hgt = self.client_frame_size
        click = ((action.click_x + 0.5) / w, (hgt - 1 - action.click_y + 0.5) / hgt) \
            if action.ui_click and obs.state.is_playing else (0.0, 0.0)
      self._rows.append((obs.frame, np.asarray(row, np.float32), np.asarray(click, np.float32),
                         pending_reward, pending_done))
      pending_reward, pending_done = 0.0, False
      recorded += 1
      if len(self._rows) >= self.frames_per_chunk:
        self.flush()
    self.flush()
    return self.paths

  def flush(self) -> None:
    """Writes the buffered rows as one chunk (nothing if empty)."""
    if not self._rows:
      return
    frames, actions, clicks, rewards, dones = zip(*self._rows)
    dones = np.asarray(dones, bool)
    dones[-1] = True
    index = len(self.paths)
    meta = dict(episode_id=f"bonklink_{self.client.address[1]}_{self._episode}",
                chunk_index=index, action_labeling=self.actions,
                reward_labeling="bonklink_shim", fps=self.fps,
                frame_size=list(frames[0].shape[:2]))
    path = os.path.join(self.out_dir, f"bonklink_{self.client.address[1]}_chunk{index:04d}.npz")
    _write_chunk(path, dict(
        observations=np.stack(frames).astype(np.uint8), actions=np.stack(actions),
        click_norm=np.stack(clicks), rewards=np.asarray(rewards, np.float32),
        game_rewards=np.asarray(rewards, np.float32), dones=dones,
        video_source=np.asarray(f"bonklink://{self.client.address[0]}:{self.client.address[1]}"),
        meta=np.asarray(json.dumps(meta))))
    self.paths.append(path)
    self._episode += int(dones[:-1].sum())
    self._rows = []
