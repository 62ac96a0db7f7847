"""The phases that bring gameplay in: `ground_truth` records BonkArena (and Atari) videos with
their true per-frame data, `convert` cuts videos into chunks, `attach_labels` gives a
fraction of the videos their true actions and rewards (the stand-in for a labelled subset).
"""
from __future__ import annotations

import os

import numpy as np
from absl import logging

from mbjax.offline import chunks as chunks_lib
from mbjax.offline import ground_truth as ground_truth_lib
from mbjax.offline import recorded_actions
from mbjax.offline import video as video_lib
from mbjax.offline.pipeline.config import action_spec
from mbjax.offline.pipeline.workspace import (Skipped, Workspace, readable_chunks,
                                              truth_for_chunk, update_meta)

LABEL_UNITS = ("episode", "chunk")


def ground_truth(ws: Workspace, cfg) -> dict:
  """Records the BonkArena (and optional Atari) ground-truth videos into the video
  directory (`mbjax.offline.ground_truth`); finished episodes are kept."""
  gt = cfg.ground_truth
  settings = ground_truth_lib.Settings(
      episodes=gt.episodes, policies=tuple(gt.policies), checkpoint=gt.checkpoint or None,
      variants=tuple(gt.variants), pixel_size=gt.pixel_size, view_fraction=gt.view_fraction,
      upgrade_hud=gt.upgrade_hud, time_limit=gt.time_limit or None, fps=gt.fps,
      seed=cfg.seed, menu_pick_prob=gt.menu_pick_prob, atari_games=tuple(gt.atari_games),
      atari_clips=gt.atari_clips, atari_steps=gt.atari_steps)
  index = ground_truth_lib.record_dataset(ws.videos, settings, progress=logging.info)
  return {"episodes": len(index), "frames": sum(e["frames"] for e in index.values()),
          "video_dir": ws.videos}


def convert(ws: Workspace, cfg) -> dict:
  size = cfg.convert.size
  settings = video_lib.ConvertConfig(
      fps=cfg.convert.fps, size=(size, size), chunk_frames=cfg.convert.chunk_frames,
      audio=False, compression=cfg.convert.compression)
  manifest = video_lib.convert_many(video_lib.sources_for(video_dir=ws.videos), ws.chunks,
                                    settings, progress=logging.info)
  entries = manifest["sources"].values()
  return {"sources": len(manifest["sources"]),
          "frames": sum(e["frames"] for e in entries),
          "skipped": {k: e["reason"] for k, e in manifest["sources"].items()
                      if e["status"] == "skipped"}}


def attach_labels(ws: Workspace, cfg) -> dict:
  """Gives `ground_truth.label_fraction` of the BonkArena videos (`label_unit` "episode":
  whole videos, as recordings made while playing are) or of their chunks ("chunk") — a
  seeded, deterministic choice — their true `actions` and `actions_valid` ([continuous,
  discrete] visible: the move is invisible while the paused level-up menu is shown, as a
  labeller would see) and the game's reward, `game_rewards`, as such a recording carries."""
  unit = cfg.ground_truth.label_unit
  if unit not in LABEL_UNITS:
    raise ValueError(f"ground_truth.label_unit: expected one of {LABEL_UNITS}, got {unit!r}")
  spec, skipped = action_spec(cfg), Skipped("attach_labels")
  candidates: dict[str, list[str]] = {}  # unit → its chunk paths
  for path, arrays in readable_chunks(ws.chunk_paths(), skipped):
    truth = truth_for_chunk(arrays, path)
    if truth is not None and "actions_continuous" in truth and "menu_open" in truth:
      key = (chunks_lib.decode_meta(arrays["meta"], path)["episode_id"] if unit == "episode"
             else path)
      candidates.setdefault(key, []).append(path)
  units = sorted(candidates)
  count = int(np.ceil(cfg.ground_truth.label_fraction * len(units)))
  picked = np.random.default_rng(cfg.seed).permutation(len(units))[:count]
  chosen = sorted(p for i in picked for p in candidates[units[i]])
  for path in chosen:
    arrays = chunks_lib.read_chunk(path)
    labels = recorded_actions.chunk_labels(truth_for_chunk(arrays, path), spec)
    chunks_lib.update_chunk(path, {
        **labels, "meta": update_meta(arrays, path, action_labeling="ground_truth")},
                            cfg.convert.compression)
  return {"labelled_chunks": [os.path.basename(p) for p in chosen],
          "candidates": sum(map(len, candidates.values())), "skipped": skipped.entries}
