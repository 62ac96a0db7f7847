"""The phases that train the apex learners offline: `export` writes the labelled chunks as
episodes (frames, or trained models' features of them: `models.frame_features`),
`world_model` trains the RSSM on them (`mbjax.train.offline`) and `dream` the latent
actor-critic against the finished world model, then plays it in BonkArena
(`evaluation.evaluate_dream_policy`).
"""
from __future__ import annotations

import hashlib
import json
import time
from typing import Any, NamedTuple

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mbjax.offline import chunks as chunks_lib
from mbjax.offline import episodes as episodes_lib
from mbjax.offline import idm as idm_lib
from mbjax.offline import rlds as rlds_lib
from mbjax.offline.pipeline import config as config_lib
from mbjax.offline.pipeline.config import action_spec
from mbjax.offline.pipeline.evaluation import evaluate_dream_policy
from mbjax.offline.pipeline.models import dream_teacher, frame_features
from mbjax.offline.pipeline.workspace import (Workspace, format_metrics, load_model,
                                              model_exists, save_model, saved_model_config,
                                              unpack_actions)
from mbjax.train import offline as offline_lib


def export(ws: Workspace, cfg) -> dict:
  embed_fn, encoder = None, ""
  if cfg.export.observation == "embeddings":
    features, encoder = frame_features(ws, cfg)
    encode = jax.jit(features, compiler_options=config_lib.compiler_options(cfg))
    embed_fn = lambda frames: idm_lib.in_pieces(encode, frames, cfg.reward.score_batch)
  manifest = episodes_lib.export_chunks(ws.chunks, ws.episodes, cfg.export.observation,
                                        embed_fn, cfg.convert.compression,
                                        progress=logging.info, encoder=encoder)
  sources = manifest["sources"]
  return {"episodes": sum(len(e.get("episodes", [k])) for k, e in sources.items()
                          if e["status"] == "done"),
          "steps": sum(e["steps"] for e in sources.values()),
          "skipped": {k: e["reason"] for k, e in sources.items() if e["status"] == "skipped"}}


def _training_episodes(ws: Workspace, cfg):
  """(name, episode) of what world_model and dream train on: the RLDS dataset
  `source.rlds_dir` when set, else the exported `.npz` episodes; unreadable ones skipped."""
  skip = lambda name, e: logging.warning("skipping %s: %s", name, e)
  if cfg.source.rlds_dir:
    yield from rlds_lib.read_episodes(cfg.source.rlds_dir, cfg.source.rlds_split,
                                      cfg.source.rlds_fields.to_dict(), on_error=skip)
    return
  for path in episodes_lib.list_episodes(ws.episodes):
    try:
      yield path, episodes_lib.read_episode(path)
    except episodes_lib.EpisodeError as e:
      skip(path, e)


def _episode_actions(episode: dict, spec, name: str):
  """(continuous, discrete): an episode whose `action` holds only the continuous dims has
  its branches in `action_discrete` (an imported RLDS dataset); ours pack both."""
  if "action_discrete" in episode and episode["action"].shape[1] == spec.continuous_dim:
    return episode["action"], episode["action_discrete"]
  try:
    return unpack_actions(episode["action"], spec)
  except chunks_lib.ChunkError as e:
    raise ValueError(f"{name}: {e}; config.action must describe the episodes' actions") from None


def _learner_data(ws: Workspace, cfg):
  """Training episodes → (`offline.EpisodeData`, observation shape, dtype)."""
  spec, size, dicts = action_spec(cfg), cfg.export.frame_size, []
  for path, episode in _training_episodes(ws, cfg):
    if len(episode["reward"]) < cfg.export.min_length:
      continue
    continuous, discrete = _episode_actions(episode, spec, path)
    obs = episode["observation"]
    if obs.ndim == 4 and obs.shape[1:3] != (size, size):  # frames: the world model's size
      obs = np.asarray(jax.image.resize(obs, (len(obs), size, size, 3), "linear")
                       .round().clip(0, 255).astype(np.uint8))
    dicts.append({"obs": obs, "action_continuous": continuous, "action_discrete": discrete,
                  "reward": episode["reward"], "terminated": episode["is_terminal"],
                  "name": path})
  if not dicts:
    raise ValueError(f"no episode of at least {cfg.export.min_length} steps in "
                     f"{cfg.source.rlds_dir or ws.episodes}; run export first")
  data = offline_lib.EpisodeData.concatenate(dicts, spec)
  return data, data.obs.shape[1:], data.obs.dtype


class _LearnerSetup(NamedTuple):
  """The exported episodes (read once per phase) and the offline trainer built for them."""

  data: offline_lib.EpisodeData
  trainer: offline_lib.OfflineTrainer
  mesh: Mesh


def _learner_setup(ws: Workspace, cfg, teacher: tuple | None = None) -> _LearnerSetup:
  """`teacher`: `models.dream_teacher`'s answer, where the caller has it already."""
  mesh = config_lib.mesh(cfg)
  data, obs_shape, obs_dtype = _learner_data(ws, cfg)
  teacher, _ = teacher or dream_teacher(ws, cfg)
  trainer = offline_lib.make_offline_trainer(cfg.learner, obs_shape, obs_dtype,
                                             action_spec(cfg), mesh, config_prefix="learner.",
                                             teacher=teacher)
  return _LearnerSetup(data, trainer, mesh)


def _train_learners(setup: _LearnerSetup, cfg, name: str, steps: int, train_world_model: bool,
                    start: Any = None) -> tuple[Any, dict]:
  trainer = setup.trainer
  init = jax.jit(trainer.init, compiler_options=config_lib.FAST_COMPILE)
  state = init(jax.random.PRNGKey(cfg.seed)) if start is None else start
  # The episodes and the state replicated; the trainer splits each sampled batch.
  state, data = jax.device_put((state, setup.data), NamedSharding(setup.mesh, P()))
  update = jax.jit(trainer.update, static_argnums=(2, 3),
                   compiler_options=config_lib.compiler_options(cfg))
  chunk = max(1, min(cfg.log_every, steps))
  metrics, started = {}, time.time()
  for done in range(0, steps, chunk):
    state, metrics = update(state, data, train_world_model, min(chunk, steps - done))
    logging.info("%s %d/%d: %s", name, min(done + chunk, steps), steps,
                 format_metrics(jax.tree.map(float, metrics)))
  info = {"steps": steps, "data_steps": data.num_steps, "obs_shape": list(data.obs.shape[1:]),
          "seconds": round(time.time() - started, 1),
          "final": {k: float(v) for k, v in metrics.items()}}
  return state, info


def _episodes_digest(ws: Workspace, cfg) -> str | None:
  """A digest of what world_model and dream train on: the export manifest, whose entries
  carry each exported chunk's size and modification time (None for an RLDS source)."""
  if cfg.source.rlds_dir:
    return None
  sources = chunks_lib.load_manifest(ws.episodes)["sources"]
  return hashlib.blake2b(json.dumps(sources, sort_keys=True).encode(),
                         digest_size=6).hexdigest()


def _check_resumed(directory: str, trained_on: dict) -> None:
  """A saved model is resumed only if what it was trained on (`trained_on`: saved config
  key → current value; None: not known) has not changed since."""
  saved = saved_model_config(directory)
  changed = [key for key, value in trained_on.items()
             if value is not None and saved.get(key) not in (None, value)]
  if changed:
    raise ValueError(f"{directory} was trained before its inputs changed ({', '.join(changed)}"
                     ": the episodes were exported again, e.g. after relabelling rewards, "
                     "actions or deaths, the world model was retrained or the dream actor's "
                     "teacher changed); remove it to retrain")


def world_model(ws: Workspace, cfg) -> dict:
  directory = ws.model_dir("world_model")
  digest = _episodes_digest(ws, cfg)
  if model_exists(directory):
    _check_resumed(directory, {"episodes_digest": digest})
    return {"model": directory, "resumed": "already trained"}
  state, info = _train_learners(_learner_setup(ws, cfg), cfg, "world_model",
                                cfg.world_model_steps, True)
  info["model_id"] = save_model(directory, state, {"learner": cfg.learner.to_dict(),
                                                   "episodes_digest": digest})
  return {"model": directory, **info}


def dream(ws: Workspace, cfg) -> dict:
  """The dream actor-critic against the finished world model (which stays fixed), imitating
  `cfg.dream_teacher` beside its imagined return, saved, then played in BonkArena against
  the uniform random policy."""
  directory = ws.model_dir("dream")
  teacher = dream_teacher(ws, cfg)
  trained_on = {"episodes_digest": _episodes_digest(ws, cfg),
                "world_model_id": saved_model_config(ws.model_dir("world_model"))["model_id"],
                "teacher": teacher[1]}
  resumed = model_exists(directory)
  if resumed:
    _check_resumed(directory, trained_on)
  setup = _learner_setup(ws, cfg, teacher)  # the episodes are read once, for both uses below
  abstract = jax.eval_shape(setup.trainer.init, jax.random.PRNGKey(0))
  if resumed:
    state, _ = load_model(directory, abstract)
    info = {"model": directory, "resumed": "already trained"}
  else:
    start, _ = load_model(ws.model_dir("world_model"), abstract)
    state, info = _train_learners(setup, cfg, "dream", cfg.dream_steps, False, start)
    info["model_id"] = save_model(directory, state, {"learner": cfg.learner.to_dict(),
                                                     **trained_on})
  info["evaluation"] = evaluate_dream_policy(ws, setup.trainer, state, cfg)
  return {"model": directory, **info}
