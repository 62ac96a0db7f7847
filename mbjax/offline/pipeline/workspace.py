"""The pipeline's work directory and what every phase reads and writes there: paths and the
phase record (`Workspace`), trained models (`save_model`, `load_model`), and chunks — read
with unreadable ones set aside (`Skipped`), grouped into episodes, their `actions` packed and
unpacked, their ground truth and source look, their meta updated.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from mbjax import files
from mbjax.envs.spaces import HybridActionSpec
from mbjax.offline import chunks as chunks_lib
from mbjax.offline import ground_truth as ground_truth_lib
from mbjax.offline import video as video_lib

# `meta["action_labeling"]` of chunks whose actions are labels (not IDM predictions).
LABELLED = ("ground_truth", "human")


class Workspace:
  """Paths under the work directory and the phase record (`phases.json`)."""

  def __init__(self, workdir: str, cfg: ml_collections.ConfigDict):
    self.root = os.path.abspath(workdir)
    self.cfg = cfg
    self.videos = cfg.source.video_dir or os.path.join(self.root, "videos")
    self.chunks = os.path.join(self.root, "chunks")
    self.models = os.path.join(self.root, "models")
    self.episodes = os.path.join(self.root, "episodes")
    self.report = os.path.join(self.root, "report.json")
    self._record_path = os.path.join(self.root, "phases.json")
    os.makedirs(self.root, exist_ok=True)
    self.record = (json.load(open(self._record_path)) if os.path.exists(self._record_path)
                   else {})

  def model_dir(self, name: str) -> str:
    return os.path.join(self.models, name)

  def finish(self, phase: str, info: dict) -> None:
    self.record[phase] = {**info, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    files.write_json(self._record_path, self.record, indent=1)

  def chunk_paths(self) -> list[str]:
    return chunks_lib.list_chunks(self.chunks)


def save_model(directory: str, params: Any, config: dict) -> str:
  """Parameters (orbax, written to a temporary directory and renamed) plus `config.json`;
  returns the model id (a digest of both) that labelling phases stamp into chunks."""
  if os.path.exists(directory):
    raise FileExistsError(f"{directory} exists; remove it to retrain")
  os.makedirs(os.path.dirname(directory), exist_ok=True)
  staging = files.staging_directory(directory)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(staging, "params"), params)
  checkpointer.wait_until_finished()
  flat = np.concatenate([np.ravel(np.asarray(x, np.float32))
                         for x in jax.tree.leaves(params)])
  digest = hashlib.blake2b(flat.tobytes(), digest_size=6)
  digest.update(json.dumps(config, sort_keys=True, default=str).encode())
  model_id = digest.hexdigest()
  files.write_json(os.path.join(staging, "config.json"), {"model_id": model_id, **config},
                   indent=1)
  os.replace(staging, directory)
  return model_id


def saved_model_config(directory: str) -> dict:
  """The config dict `save_model` wrote beside a model's parameters."""
  path = os.path.join(directory, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"no trained model in {directory}: run its training phase first")
  with open(path) as f:
    return json.load(f)


def load_model(directory: str, abstract_params: Any) -> tuple[Any, dict]:
  """(params, config dict) saved by `save_model`; the params take `abstract_params`' tree."""
  config = saved_model_config(directory)
  # Onto this process's first device, whatever mesh the training phase ran over: orbax
  # would otherwise look for the devices the arrays were saved from.
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                        abstract_params)
  params = ocp.StandardCheckpointer().restore(os.path.join(directory, "params"), target)
  return params, config


def model_exists(directory: str) -> bool:
  return os.path.exists(os.path.join(directory, "config.json"))


# -- chunks, episodes and action arrays -----------------------------------------------------


class Skipped:
  """Collects chunks a phase could not use; each is logged with its reason."""

  def __init__(self, phase: str):
    self.phase, self.entries = phase, {}

  def add(self, path: str, error: Exception) -> None:
    logging.warning("%s: skipping %s: %s", self.phase, path, error)
    self.entries[os.path.basename(path)] = str(error)


def readable_chunks(paths: list[str], skipped: Skipped, keys=None):
  """(path, arrays) for each chunk that reads and validates; the others go to `skipped`."""
  for path in paths:
    try:
      yield path, chunks_lib.read_chunk(path, keys)
    except chunks_lib.ChunkError as e:
      skipped.add(path, e)


def episodes_of(paths: list[str], skipped: Skipped) -> dict[str, list[str]]:
  """episode_id → its chunk paths in chunk order (unreadable chunks go to `skipped`)."""
  grouped: dict[str, list[tuple[int, str]]] = {}
  for path in paths:
    try:
      meta = chunks_lib.read_meta(path)
    except chunks_lib.ChunkError as e:
      skipped.add(path, e)
      continue
    grouped.setdefault(meta["episode_id"], []).append((meta["chunk_index"], path))
  return {key: [p for _, p in sorted(items)] for key, items in sorted(grouped.items())}


def pack_actions(continuous: np.ndarray, discrete_probs: list[np.ndarray]) -> np.ndarray:
  """The chunk's `actions` f32[T, C + Σn]: continuous dims, then each branch's
  probabilities (one-hot for a known choice) — upstream's [move, button probs] layout."""
  return np.concatenate([np.asarray(continuous, np.float32)]
                        + [np.asarray(p, np.float32) for p in discrete_probs], -1)


def unpack_actions(actions: np.ndarray, spec: HybridActionSpec):
  """`actions` f32[T, C + Σn] → (continuous f32[T, C], discrete i32[T, K] by arg-max)."""
  expected = spec.continuous_dim + spec.mask_size
  if actions.ndim != 2 or actions.shape[1] != expected:
    raise chunks_lib.ChunkError(f"actions: expected f32[T, {expected}] for {spec}, got "
                                f"{list(actions.shape)}")
  continuous = actions[:, :spec.continuous_dim]
  offsets = np.cumsum((spec.continuous_dim,) + spec.branches)
  discrete = np.stack([actions[:, a:b].argmax(-1) for a, b in zip(offsets[:-1], offsets[1:])],
                      -1) if spec.branches else np.zeros((len(actions), 0), np.int64)
  return continuous, discrete.astype(np.int32)


def truth_for_chunk(arrays: dict, name: str) -> dict | None:
  """The ground-truth arrays of a chunk's frames (from the `.npz` beside its source video,
  one entry per recorded frame), or None when the source has none (a recording of actions
  alone, without per-step `rewards` and `fps`, is a labelling source, not ground truth)."""
  source = str(arrays["video_source"]) if "video_source" in arrays else ""
  truth_path = os.path.splitext(source)[0] + ".npz"
  if not source or not os.path.exists(truth_path):
    return None
  meta = chunks_lib.decode_meta(arrays["meta"], name)
  with np.load(truth_path, allow_pickle=False) as npz:
    truth = {k: npz[k] for k in npz.files}
  if "rewards" not in truth or "fps" not in truth:
    return None
  ground_truth_lib.check_rules_version(
      {truth_path: json.loads(str(truth.get("meta", "{}")))}, truth_path)
  steps = len(truth["rewards"])
  index = video_lib.source_frame_indices(meta, arrays["observations"].shape[0],
                                         float(truth["fps"]))
  if index[-1] >= steps:
    raise chunks_lib.ChunkError(f"{name}: its frames map to recorded steps up to {index[-1]}, "
                                f"but {truth_path} has {steps}")
  return {k: v[index] for k, v in truth.items() if v.ndim and len(v) == steps}


def one_hot(index: np.ndarray, size: int) -> np.ndarray:
  return np.eye(size, dtype=np.float32)[np.asarray(index)]


def update_meta(arrays: dict, name: str, **fields) -> np.ndarray:
  meta = chunks_lib.decode_meta(arrays["meta"], name)
  meta.update(fields)
  return chunks_lib.encode_meta(meta)


def truth_meta(arrays: dict) -> dict:
  """The recording's `meta` (camera, palette, policy) of a chunk's source, or {}."""
  truth_path = os.path.splitext(str(arrays.get("video_source", "")))[0] + ".npz"
  if not os.path.exists(truth_path):
    return {}
  with np.load(truth_path, allow_pickle=False) as npz:
    return json.loads(str(npz["meta"])) if "meta" in npz.files else {}


def source_look(meta: dict) -> str:
  """camera:palette@size of a BonkArena recording, atari_<game>, or "video" (no truth)."""
  if not meta:
    return "video"
  if meta.get("source") == "atari":
    return f"atari_{meta.get('game', '?')}"
  return (f"{meta.get('camera', '?')}:{meta.get('palette', '?')}"
          f"@{meta.get('pixel_size', '?')}")


def format_metrics(metrics: dict) -> str:
  return ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))
