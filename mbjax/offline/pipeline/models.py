"""The models the pipeline trains on chunks: four that then label them, two phases each —
the inverse dynamics model (`idm_train`, `idm_label`: per-frame `actions`), the end-of-life
classifier (`death_train`, `death_label`: `death_probs` and `terminals`), the reward model
(`reward_train` on the labelled chunks' `game_rewards` or on every chunk's lives,
`reward_label`: `progress_scores` and `rewards`) and the skills VQ-VAE
(`skills_train`, `skills_label`: `skill_tokens`) — and the behaviour-cloned policy
(`bc_train`), which `eval` plays in BonkArena.

What they share — resume, the batch sharding, saving, loading and the labelling loop
that stamps the model's id into every chunk it writes — is `ChunkModel`; each phase below
says only what it trains on and what it writes.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from mbjax.envs.spaces import HybridActionSpec
from mbjax.offline import bc as bc_lib
from mbjax.offline import chunks as chunks_lib
from mbjax.offline import deaths as deaths_lib
from mbjax.offline import idm_labelling, idm_training
from mbjax.offline import locator as locator_lib
from mbjax.offline import reward_model as reward_lib
from mbjax.offline import skills as skills_lib
from mbjax.offline.pipeline import config as config_lib
from mbjax.offline.pipeline.config import action_spec, frame_shape
from mbjax.offline.pipeline.workspace import (LABELLED, Skipped, Workspace, episodes_of,
                                              format_metrics, load_model, model_exists,
                                              pack_actions, readable_chunks, save_model,
                                              saved_model_config, source_look, truth_meta,
                                              unpack_actions, update_meta)
from mbjax.train import sharding

# Initialisers run once: one jitted program each, compiled for compile speed.
_idm_init = jax.jit(idm_training.init, static_argnums=(1, 2, 3),
                    compiler_options=config_lib.FAST_COMPILE)
_bc_init = jax.jit(bc_lib.init, static_argnums=(1, 2, 3),
                   compiler_options=config_lib.FAST_COMPILE)
_death_init = jax.jit(deaths_lib.init, static_argnums=(1, 2),
                      compiler_options=config_lib.FAST_COMPILE)
_reward_init = jax.jit(reward_lib.init, static_argnums=(1, 2),
                       compiler_options=config_lib.FAST_COMPILE)
_skills_init = jax.jit(skills_lib.init, static_argnums=(1, 2),
                       compiler_options=config_lib.FAST_COMPILE)


class ChunkModel(NamedTuple):
  """A model trained on the chunks that then labels them. `name` is its directory
  (`models/<name>/`), its config section (`cfg.<name>`: `steps`, the global `batch`), its
  phases (`<name>_train`, `<name>_label`) and the meta key (`<name>_model`) that records
  which model labelled a chunk, so that a rerun skips what the current model labelled."""

  name: str
  # cfg → the saved pytree of a fresh model (only its shape is used: traced, never run).
  fresh: Callable[[ml_collections.ConfigDict], Any]
  # cfg → the model's hyperparameters (a dataclass, saved as `config.json`'s `<name>`).
  hyperparameters: Callable[[ml_collections.ConfigDict], Any]

  def changed_settings(self, ws: Workspace, cfg) -> dict:
    """{field: (saved value, configured value)} where the saved model's hyperparameters
    differ from the config's."""
    saved = saved_model_config(ws.model_dir(self.name)).get(self.name, {})
    current = json.loads(json.dumps(dataclasses.asdict(self.hyperparameters(cfg)),
                                    default=str))
    return {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v}

  def train(self, ws: Workspace, cfg,
            fit: Callable[[jax.sharding.Sharding], tuple[Any, dict, dict]]) -> dict:
    """The training phase: nothing to do when the model is saved (a warning names the
    settings it was trained with that the config now changes); otherwise
    `fit(data_sharding)` → (pytree to save, its config, info), saved under its id."""
    directory = ws.model_dir(self.name)
    if model_exists(directory):
      changed = self.changed_settings(ws, cfg)
      if changed:
        logging.warning("%s was trained with other settings %s (saved, configured); it is "
                        "kept: remove it to retrain", directory, changed)
      return {"model": directory, "resumed": "already trained",
              **({"changed_settings": changed} if changed else {})}
    # Before any data is read: a batch that does not split over the devices fails at once.
    data_sharding = sharding.batch_sharding(config_lib.mesh(cfg), cfg[self.name].batch,
                                            f"{self.name}.batch")
    started = time.time()
    saved, saved_config, info = fit(data_sharding)
    seconds = round(time.time() - started, 1)
    model_id = save_model(directory, saved, saved_config)
    return {"model": directory, "model_id": model_id, "seconds": seconds, **info}

  def log_progress(self, cfg) -> Callable[[int, dict], None]:
    """The `log_fn` of the model's `fit`: one line per logged step."""
    steps = cfg[self.name].steps
    return lambda step, metrics: logging.info("%s_train %d/%d: %s", self.name, step, steps,
                                              format_metrics(metrics))

  def load(self, ws: Workspace, cfg) -> tuple[Any, str]:
    """(saved pytree, model id) of the trained model."""
    directory = ws.model_dir(self.name)
    try:
      saved, saved_config = load_model(directory, jax.eval_shape(lambda: self.fresh(cfg)))
    except ValueError as e:  # orbax: the saved arrays do not have the configured shapes
      raise ValueError(f"{directory} does not fit the configured {self.name} model (saved, "
                       f"configured: {self.changed_settings(ws, cfg)}); remove it to retrain "
                       f"with these settings, or configure the saved ones") from e
    return saved, saved_config["model_id"]

  def label(self, ws: Workspace, cfg, units: dict[str, list[str]], model_id: str,
            new_arrays: Callable[[list[str], list[dict]], list[dict]],
            keep: Callable[[dict], bool] = lambda meta: False,
            skipped: Skipped | None = None, **meta) -> dict:
    """The labelling phase over `units` (name → chunk paths: one chunk, or an episode's
    chunks in order). A unit whose chunks were all labelled by `model_id` (or are kept by
    `keep(chunk meta)`) is left alone; otherwise `new_arrays(paths, chunk arrays)` gives
    the arrays to add to each chunk, written with `meta` and the model's id in its meta.
    A unit with a chunk that cannot be read or labelled is skipped and recorded in
    `skipped` (a new record unless the caller's, which may hold chunks already set aside)."""
    model_key = f"{self.name}_model"
    if skipped is None:
      skipped = Skipped(f"{self.name}_label")
    labelled = kept = 0
    for number, (unit, paths) in enumerate(units.items(), 1):
      try:
        if all(m.get(model_key) == model_id or keep(m)
               for m in map(chunks_lib.read_meta, paths)):
          kept += 1
          continue
        parts = [chunks_lib.read_chunk(p) for p in paths]
        for path, arrays, added in zip(paths, parts, new_arrays(paths, parts)):
          stamp = update_meta(arrays, path, **meta, **{model_key: model_id})
          chunks_lib.update_chunk(path, {**added, "meta": stamp}, cfg.convert.compression)
      except chunks_lib.ChunkError as e:
        skipped.add(unit, e)
        continue
      labelled += 1
      logging.info("%s_label [%d/%d] %s: %d frames", self.name, number, len(units), unit,
                   sum(len(a["observations"]) for a in parts))
    return {"labelled": labelled, "already_labelled": kept, "skipped": skipped.entries}


def _by_chunk(parts: list[dict], **episode_arrays: np.ndarray) -> list[dict]:
  """Per-frame arrays of a whole episode (its chunks `parts` in order) → one dict per chunk."""
  bounds = np.cumsum([0] + [len(a["observations"]) for a in parts])
  return [{k: v[lo:hi] for k, v in episode_arrays.items()}
          for lo, hi in zip(bounds[:-1], bounds[1:])]


def _each_chunk(ws: Workspace) -> dict[str, list[str]]:
  """Labelling units of one chunk each, named by file."""
  return {os.path.basename(path): [path] for path in ws.chunk_paths()}


# -- inverse dynamics model -----------------------------------------------------------------

IDM = ChunkModel("idm", lambda cfg: idm_training.init(
    jax.random.PRNGKey(0), config_lib.idm_config(cfg), frame_shape(cfg), action_spec(cfg)
).params, config_lib.idm_config)


def _labelled_episodes(ws: Workspace, spec: HybridActionSpec, skipped: Skipped):
  episodes, focus = [], []
  for path in ws.chunk_paths():
    try:
      if chunks_lib.read_meta(path).get("action_labeling") not in LABELLED:
        continue
      arrays = chunks_lib.read_chunk(path)
      continuous, discrete = unpack_actions(arrays["actions"], spec)
    except chunks_lib.ChunkError as e:
      skipped.add(path, e)
      continue
    valid = arrays.get("actions_valid", np.ones((len(continuous), 2), bool))
    episodes.append(idm_training.Episode(arrays["observations"], idm_training.ActionLabels(
        continuous, discrete, valid[:, 0], valid[:, 1])))
  if not episodes:
    raise ValueError(f"idm_train: no chunk in {ws.chunks} carries labelled actions "
                     f"(meta action_labeling in {LABELLED}); label some first")
  discrete = np.concatenate([e.labels.discrete for e in episodes])
  common = [np.bincount(discrete[:, b], minlength=n).argmax()
            for b, n in enumerate(spec.branches)]
  # Rare choices (the menu picks) are where the discrete heads learn: oversample them.
  for e in episodes:
    rare = np.zeros(len(e.labels.discrete), bool)
    for b, c in enumerate(common):
      rare |= e.labels.discrete[:, b] != c
    focus.append(np.flatnonzero(rare & np.asarray(e.labels.discrete_valid)))
  return episodes, focus


def idm_train(ws: Workspace, cfg) -> dict:
  """The IDM on the chunks whose actions are labels (`LABELLED`), class-weighted."""

  def fit(data_sharding):
    spec, skipped = action_spec(cfg), Skipped("idm_train")
    episodes, focus = _labelled_episodes(ws, spec, skipped)
    discrete = np.concatenate([e.labels.discrete for e in episodes])
    valid = np.concatenate([e.labels.discrete_valid for e in episodes])
    weights = idm_training.class_weights_from_labels(discrete, spec,
                                                     cfg.idm.class_weight_power, valid)
    idm_cfg = config_lib.idm_config(cfg)
    state = _idm_init(jax.random.PRNGKey(cfg.seed), idm_cfg, frame_shape(cfg), spec, weights)
    state, metrics = idm_training.fit(
        state, episodes, cfg.idm.steps, np.random.default_rng(cfg.seed), cfg.idm.batch,
        cfg.idm.clip_length, focus, cfg.idm.focus_fraction, log_fn=IDM.log_progress(cfg),
        log_every=cfg.log_every, data_sharding=data_sharding)
    saved_config = {"idm": dataclasses.asdict(idm_cfg), "frame_shape": list(frame_shape(cfg)),
                    "class_weights": [w.tolist() for w in weights]}
    return state.params, saved_config, {"chunks": len(episodes), "frames": int(len(discrete)),
                                        "final": metrics, "skipped": skipped.entries}

  return IDM.train(ws, cfg, fit)


def idm_label(ws: Workspace, cfg) -> dict:
  """`actions` for every chunk whose actions are not labels."""
  params, model_id = IDM.load(ws, cfg)
  idm_cfg, spec = config_lib.idm_config(cfg), action_spec(cfg)

  def new_arrays(paths, parts):
    del paths
    labels = [idm_labelling.label(params, idm_cfg, spec, a["observations"]) for a in parts]
    return [{"actions": pack_actions(x.continuous, list(x.probs))} for x in labels]

  return IDM.label(ws, cfg, _each_chunk(ws), model_id, new_arrays,
                   keep=lambda meta: meta.get("action_labeling") in LABELLED,
                   action_labeling="idm")


# -- held-out episodes ----------------------------------------------------------------------


def split_episodes(looks: dict[str, str], fraction: float, sources: Sequence[str],
                   seed: int) -> set[str]:
  """The held-out episode ids, given each episode's look (`_episode_look`).

  Every episode whose id matches one of the glob patterns `sources` is held out (a whole
  video source kept from training, e.g. "atari_*": the out-of-domain clips). Of the others,
  each look contributes a seeded choice of ceil(fraction · n) of its n episodes — at least
  one when it has two or more — so every look gets a held-out number and the split does not
  depend on the luck of one draw over all episodes.
  """
  held_out = {e for e in looks if any(fnmatch.fnmatchcase(e, p) for p in sources)}
  by_look: dict[str, list[str]] = {}
  for episode_id in sorted(looks):
    if episode_id not in held_out:
      by_look.setdefault(looks[episode_id], []).append(episode_id)
  rng = np.random.default_rng(seed + 1)
  for _, ids in sorted(by_look.items()):
    count = int(np.ceil(fraction * len(ids))) if len(ids) > 1 else 0
    held_out.update(ids[i] for i in rng.permutation(len(ids))[:count])
  return held_out


def _episode_look(paths: list[str]) -> str:
  """The source look of an episode (`source_look`) from its first chunk's recording."""
  try:
    arrays = chunks_lib.read_chunk(paths[0], keys=("video_source",), validate=False)
  except chunks_lib.ChunkError:
    arrays = {}  # no recording to go by (imported chunks, or unreadable: skipped later)
  return source_look(truth_meta(arrays))


def training_split(ws: Workspace, cfg, skipped: Skipped):
  """(training episodes: episode_id → chunk paths, held-out episode ids) — what death_train
  and reward_train train on and keep out for eval (`split_episodes` with the
  `reward.holdout_*` settings)."""
  grouped = episodes_of(ws.chunk_paths(), skipped)
  looks = {episode_id: _episode_look(paths) for episode_id, paths in grouped.items()}
  held_out = sorted(split_episodes(looks, cfg.reward.holdout_fraction,
                                   tuple(cfg.reward.holdout_sources), cfg.seed))
  return {e: paths for e, paths in grouped.items() if e not in held_out}, held_out


# -- behaviour cloning ----------------------------------------------------------------------

BC = ChunkModel("bc", lambda cfg: bc_lib.init(
    jax.random.PRNGKey(0), config_lib.bc_config(cfg), action_spec(cfg), frame_shape(cfg)
).params, config_lib.bc_config)


def bc_train(ws: Workspace, cfg) -> dict:
  """The behaviour-cloned policy on the frames and `actions` (IDM or true labels) of the
  training episodes whose id matches `bc.episodes`; the ids it imitated are saved with it."""

  def fit(data_sharding):
    skipped = Skipped("bc_train")
    training, held_out = training_split(ws, cfg, skipped)
    chosen = sorted(e for e in training if fnmatch.fnmatch(e, cfg.bc.episodes))
    frames, actions, imitated, chunk_episodes = [], [], [], []
    for episode_id in chosen:
      parts = list(readable_chunks(training[episode_id], skipped,
                                   keys=("observations", "actions")))
      frames += [a["observations"] for _, a in parts]
      chunk_episodes += [episode_id] * len(parts)
      actions += [a["actions"] for _, a in parts]
      imitated += [episode_id] if parts else []
    if not frames:
      raise ValueError(f"bc_train: no training chunk with `actions` among the episodes "
                       f"matching bc.episodes={cfg.bc.episodes!r} ({len(chosen)} of "
                       f"{len(training)}) in {ws.chunks}; run idm_label first")
    bc_cfg, spec = config_lib.bc_config(cfg), action_spec(cfg)
    state = _bc_init(jax.random.PRNGKey(cfg.seed), bc_cfg, spec, frame_shape(cfg))
    located = {}
    if bc_cfg.crop_fraction:
      state, located = _fit_locator(state, cfg, chunk_episodes, frames, actions, spec)
    state, metrics = bc_lib.fit(state, frames, actions, cfg.bc.steps,
                                np.random.default_rng(cfg.seed), cfg.bc.batch,
                                log_fn=BC.log_progress(cfg), log_every=cfg.log_every,
                                data_sharding=data_sharding)
    saved_config = {"bc": dataclasses.asdict(bc_cfg), "frame_shape": list(frame_shape(cfg)),
                    "imitated_episodes": imitated, "held_out_episodes": held_out}
    return state.params, saved_config, {"episodes": len(imitated),
                                        "frames": int(sum(map(len, frames))),
                                        "final": metrics, "skipped": skipped.entries,
                                        **located}

  return BC.train(ws, cfg, fit)


def _fit_locator(state, cfg, chunk_episodes, frames, actions, spec):
  """`state` with a locator fitted on the chunks (frames, actions; `chunk_episodes` names
  each one's episode) whose episode matches `bc.locator_episodes`, each chunk a video of its
  own (windows do not cross chunks) → (state, {"locator": its last metrics})."""
  chosen = [i for i, e in enumerate(chunk_episodes)
            if fnmatch.fnmatch(e, cfg.bc.locator_episodes)]
  if not chosen:
    raise ValueError(f"bc_train: no imitated episode matches bc.locator_episodes="
                     f"{cfg.bc.locator_episodes!r}")
  # The entropy term ramps in over the first half of the updates (as measured: 500 of 1,000).
  locator_cfg = dataclasses.replace(state.cfg.locator, gap=cfg.bc.locator_gap,
                                    entropy_warmup=cfg.bc.locator_steps // 2)
  fitted = locator_lib.init(jax.random.PRNGKey(cfg.seed + 1), locator_cfg, frame_shape(cfg))
  moves = [np.clip(actions[i][:, :spec.continuous_dim], -1.0, 1.0) for i in chosen]
  fitted, metrics = locator_lib.fit(
      fitted, [frames[i] for i in chosen], moves, None,
      cfg.bc.locator_steps, np.random.default_rng(cfg.seed + 1), cfg.bc.locator_batch,
      log_fn=lambda step, m: logging.info("bc_train locator %d/%d: %s", step,
                                          cfg.bc.locator_steps, m),
      log_every=cfg.log_every)
  return bc_lib.with_locator(state, fitted.params), {"locator": metrics}


# -- end-of-life classifier -----------------------------------------------------------------

DEATH = ChunkModel("death", lambda cfg: deaths_lib.init(
    jax.random.PRNGKey(0), config_lib.death_config(cfg), frame_shape(cfg)).params,
                   config_lib.death_config)


def death_train(ws: Workspace, cfg) -> dict:
  """The end-of-life classifier on the training episodes' videos, whole (its positives are
  each video's last frames; a video whose last chunk is not `last_chunk` has none)."""

  def fit(data_sharding):
    skipped = Skipped("death_train")
    training, held_out = training_split(ws, cfg, skipped)
    videos, ends = [], []
    for paths in training.values():
      parts = list(readable_chunks(paths, skipped, keys=("observations", "meta")))
      if len(parts) != len(paths):
        continue  # a video with a chunk missing would have a false end
      videos.append(np.concatenate([a["observations"] for _, a in parts]))
      path, last = parts[-1]
      ends.append(bool(chunks_lib.decode_meta(last["meta"], path).get("last_chunk", False)))
    if not any(ends):
      raise ValueError(f"death_train: no complete training video in {ws.chunks} (every chunk "
                       "readable, the last one marked last_chunk)")
    death_cfg = config_lib.death_config(cfg)
    state = _death_init(jax.random.PRNGKey(cfg.seed), death_cfg, frame_shape(cfg))
    state, metrics = deaths_lib.fit(
        state, videos, cfg.death.steps, np.random.default_rng(cfg.seed), cfg.death.batch,
        ends=ends, log_fn=DEATH.log_progress(cfg), log_every=cfg.log_every,
        data_sharding=data_sharding)
    saved_config = {"death": dataclasses.asdict(death_cfg),
                    "frame_shape": list(frame_shape(cfg)), "held_out_episodes": held_out}
    return state.params, saved_config, {"videos": len(videos), "ending_videos": sum(ends),
                                        "final": metrics, "skipped": skipped.entries}

  return DEATH.train(ws, cfg, fit)


def death_label(ws: Workspace, cfg) -> dict:
  """`death_probs` f32[T] and `terminals` bool[T] (`deaths.terminals_from_probs`) for every
  chunk, scored over each whole episode (a run of frames that crosses a chunk boundary ends
  once, in the chunk where it ends)."""
  params, model_id = DEATH.load(ws, cfg)
  death_cfg = config_lib.death_config(cfg)

  def new_arrays(paths, parts):
    del paths
    probs = deaths_lib.probabilities(params, death_cfg,
                                     np.concatenate([a["observations"] for a in parts]))
    return _by_chunk(parts, death_probs=probs,
                     terminals=deaths_lib.terminals_from_probs(probs, death_cfg.threshold))

  skipped = Skipped("death_label")
  return DEATH.label(ws, cfg, episodes_of(ws.chunk_paths(), skipped), model_id, new_arrays,
                     skipped=skipped)


def chunk_lives(arrays: dict) -> list[tuple[np.ndarray, bool]]:
  """A chunk's frames cut after every frame its `terminals` marks: (frames, whether that
  piece ended in a death). A chunk without `terminals` is one piece that did not."""
  frames = arrays["observations"]
  cuts = (np.flatnonzero(arrays["terminals"]) + 1).tolist() if "terminals" in arrays else []
  bounds = [0] + cuts + ([len(frames)] if not cuts or cuts[-1] != len(frames) else [])
  return [(frames[lo:hi], hi in cuts) for lo, hi in zip(bounds[:-1], bounds[1:])]


# -- reward model ---------------------------------------------------------------------------

REWARD = ChunkModel("reward", lambda cfg: reward_lib.init(
    jax.random.PRNGKey(0), config_lib.reward_config(cfg), frame_shape(cfg)).params,
                    config_lib.reward_config)


def _reward_training_data(ws: Workspace, cfg, training: dict[str, list[str]],
                          skipped: Skipped) -> tuple[dict, dict]:
  """(`reward_lib.fit` arguments, what was used) of the configured objective: "returns",
  the training chunks that carry the game's reward (`game_rewards`); "progress", the lives
  of every training chunk (cut at the `terminals` death_label marks)."""
  paths = [p for ps in training.values() for p in ps]
  if cfg.reward.objective == "returns":
    labelled = []
    for path in paths:
      try:
        if "game_rewards" in chunks_lib.chunk_keys(path):
          labelled.append(path)
      except chunks_lib.ChunkError as e:
        skipped.add(path, e)
    frames, rewards = [], []
    for _, arrays in readable_chunks(labelled, skipped, keys=("observations", "game_rewards")):
      frames.append(arrays["observations"])
      rewards.append(arrays["game_rewards"])
    if not frames:
      raise ValueError(
          f"reward_train: reward.objective='returns' learns from chunks that carry the game's "
          f"reward (`game_rewards`), and none of the {len(paths)} training chunks in "
          f"{ws.chunks} does; label some (experiments/label_chunks.py with a recording that "
          "has `rewards`, the ground truth's attach_labels, or bridge recordings) or set "
          "--config.reward.objective=progress")
    return {"episodes": frames, "rewards": rewards}, {
        "labelled_chunks": len(frames), "frames": int(sum(map(len, frames)))}
  lives, died = [], []
  for _, arrays in readable_chunks(paths, skipped):
    for life, death in chunk_lives(arrays):
      lives.append(life)
      died.append(death)
  if not lives:
    raise ValueError(f"reward_train: no readable training chunk in {ws.chunks}")
  return {"episodes": lives, "died": died}, {"lives": len(lives), "deaths": int(sum(died))}


def reward_train(ws: Workspace, cfg) -> dict:
  """The reward model (`reward.objective`: "returns" on the training chunks that carry the
  game's reward, "progress" on every training chunk's lives; `held_out_episodes` kept
  out)."""

  def fit(data_sharding):
    skipped = Skipped("reward_train")
    training, held_out = training_split(ws, cfg, skipped)
    data, used = _reward_training_data(ws, cfg, training, skipped)
    reward_cfg = config_lib.reward_config(cfg)
    state = _reward_init(jax.random.PRNGKey(cfg.seed), reward_cfg, frame_shape(cfg))
    state, metrics = reward_lib.fit(
        state, num_steps=cfg.reward.steps, rng=np.random.default_rng(cfg.seed),
        batch=cfg.reward.batch, log_fn=REWARD.log_progress(cfg), log_every=cfg.log_every,
        data_sharding=data_sharding, **data)
    saved_config = {"reward": dataclasses.asdict(reward_cfg),
                    "frame_shape": list(frame_shape(cfg)), "held_out_episodes": held_out}
    return state.params, saved_config, {**used, "held_out_episodes": held_out,
                                        "final": metrics, "skipped": skipped.entries}

  return REWARD.train(ws, cfg, fit)


def load_reward(ws: Workspace, cfg) -> tuple[Any, reward_lib.RewardConfig, str]:
  """(params, hyperparameters, model id) of the trained reward model."""
  params, model_id = REWARD.load(ws, cfg)
  return params, config_lib.reward_config(cfg), model_id


def _feature_parts(ws: Workspace, cfg) -> list[tuple[str, Callable[[jax.Array], jax.Array], Any,
                                                   str]]:
  """(name, frames → f32[N, D_i], params, model id) of each `cfg.export.features` model."""
  config_lib.check_choices(cfg)
  parts = []
  for name in cfg.export.features:
    if name == "reward":
      params, reward_cfg, model_id = load_reward(ws, cfg)
      fn = lambda f, p=params, c=reward_cfg: reward_lib.ProgressNet(c).apply(p, f)[0]
    else:
      params, model_id = BC.load(ws, cfg)
      bc_cfg, spec = config_lib.bc_config(cfg), action_spec(cfg)
      fn = lambda f, p=params: bc_lib.features(p, bc_cfg, spec, f)
    parts.append((name, fn, params, model_id))
  return parts


def frame_features(ws: Workspace, cfg) -> tuple[Callable[[jax.Array], jax.Array], str]:
  """(features, id): `features` maps video frames uint8[N, H, W, 3] to f32[N, D], the
  outputs of the trained models `cfg.export.features` names, side by side — "reward": the
  reward model's embedding (mean-pooled, so blind to where the player is), "bc": the
  behaviour-cloned policy's hidden layer (with its locator, the player's surroundings) —
  and `id` names those models, so episodes exported with others are exported again."""
  parts = _feature_parts(ws, cfg)
  features = lambda frames: jnp.concatenate([fn(frames) for _, fn, _, _ in parts], -1)
  return features, ",".join(f"{name}:{model_id}" for name, _, _, model_id in parts)


def dream_teacher(ws: Workspace, cfg) -> tuple[Callable | None, str]:
  """(teacher, id) for `cfg.dream_teacher`: "recorded" → (None, "recorded"), the recorded
  actions; "bc" → the cloned policy acting on the exported observations' "bc" features
  (`bc.act_on_features`), `teacher(obs f32[N, D], mask, key) -> HybridAction`, for
  `train.offline.make_offline_trainer`."""
  config_lib.check_choices(cfg)
  if cfg.dream_teacher == "recorded":
    return None, "recorded"
  parts = _feature_parts(ws, cfg)
  frame = jax.ShapeDtypeStruct((1,) + (cfg.convert.size,) * 2 + (3,), jnp.uint8)
  widths = [jax.eval_shape(fn, frame).shape[-1] for _, fn, _, _ in parts]
  index = [name for name, _, _, _ in parts].index("bc")
  offset = sum(widths[:index])
  _, _, params, model_id = parts[index]
  bc_cfg, spec = config_lib.bc_config(cfg), action_spec(cfg)

  def teacher(obs, mask, key):
    hidden = obs[:, offset:offset + widths[index]]
    return bc_lib.act_on_features(params, bc_cfg, spec, hidden, mask, key)

  return teacher, f"bc:{model_id}"


def reward_label(ws: Workspace, cfg) -> dict:
  """`progress_scores` and `rewards` = (Δprogress + rate) × scale, scored over each whole
  episode (so a chunk's last reward looks at the next chunk's first frame; 0 at the
  episode's end)."""
  params, reward_cfg, model_id = load_reward(ws, cfg)

  def new_arrays(paths, parts):
    del paths
    progress, rewards = reward_lib.video_rewards(
        params, reward_cfg, np.concatenate([a["observations"] for a in parts]),
        cfg.reward.scale)
    return _by_chunk(parts, progress_scores=progress, rewards=rewards)

  # One unreadable chunk leaves its whole episode unlabelled.
  skipped = Skipped("reward_label")
  return REWARD.label(ws, cfg, episodes_of(ws.chunk_paths(), skipped), model_id, new_arrays,
                      skipped=skipped, reward_labeling="video_reward")


# -- skills ---------------------------------------------------------------------------------


def _skills_saved(state) -> dict:
  """What a skills model saves: its network parameters and its codebook."""
  return {"params": state.params, "codebook": state.codebook}


SKILLS = ChunkModel("skills", lambda cfg: _skills_saved(skills_lib.init(
    jax.random.PRNGKey(0), config_lib.skill_config(cfg), action_spec(cfg))),
                    config_lib.skill_config)


def _chunk_actions(path: str, arrays: dict, spec: HybridActionSpec):
  """(continuous, discrete) of a chunk's `actions`; ChunkError when it has none."""
  if "actions" not in arrays:
    raise chunks_lib.ChunkError(f"{path}: no 'actions'; run idm_label first")
  return unpack_actions(arrays["actions"], spec)


def skills_train(ws: Workspace, cfg) -> dict:
  """The VQ-VAE over windows of every chunk's actions."""

  def fit(data_sharding):
    spec, skill_cfg = action_spec(cfg), config_lib.skill_config(cfg)
    skipped, windows = Skipped("skills_train"), []
    for path, arrays in readable_chunks(ws.chunk_paths(), skipped):
      try:
        continuous, discrete = _chunk_actions(path, arrays, spec)
      except chunks_lib.ChunkError as e:
        skipped.add(path, e)
        continue
      windows.append(skills_lib.training_windows(
          skills_lib.action_vectors(continuous, discrete, spec), skill_cfg.window,
          skill_cfg.stride))
    windows = np.concatenate(windows) if windows else np.zeros((0,))
    if not len(windows):
      raise ValueError(f"skills_train: no chunk in {ws.chunks} has {skill_cfg.window} "
                       "labelled actions; run idm_label first")
    key = jax.random.PRNGKey(cfg.seed)
    state = _skills_init(key, skill_cfg, spec)
    state, metrics = skills_lib.fit(
        state, windows, cfg.skills.steps, np.random.default_rng(cfg.seed),
        jax.random.fold_in(key, 1), cfg.skills.batch, log_fn=SKILLS.log_progress(cfg),
        log_every=cfg.log_every, data_sharding=data_sharding)
    return (_skills_saved(state), {"skills": dataclasses.asdict(skill_cfg)},
            {"windows": int(len(windows)), "final": metrics, "skipped": skipped.entries})

  return SKILLS.train(ws, cfg, fit)


def skills_label(ws: Workspace, cfg) -> dict:
  """`skill_tokens` for every chunk with actions (per frame: `skills_lib.tokens_per_frame`)."""
  saved, model_id = SKILLS.load(ws, cfg)
  spec, skill_cfg = action_spec(cfg), config_lib.skill_config(cfg)

  def new_arrays(paths, parts):
    added = []
    for path, arrays in zip(paths, parts):
      continuous, discrete = _chunk_actions(path, arrays, spec)
      tokens, starts = skills_lib.encode(saved["params"], saved["codebook"], skill_cfg, spec,
                                         continuous, discrete)
      added.append({"skill_tokens": skills_lib.tokens_per_frame(tokens, starts,
                                                                len(continuous),
                                                                skill_cfg.window)})
    return added

  return SKILLS.label(ws, cfg, _each_chunk(ws), model_id, new_arrays)
