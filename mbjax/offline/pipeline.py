"""The offline video pipeline's phases: gameplay video → chunks → IDM actions → video
rewards → episodes → skill tokens → offline world model and dream policy → evaluation.
The library side of `experiments/video_pretrain.py` (one function per phase).

Phases, in the order `all` runs them (upstream names accepted as aliases, `ALIASES`):

  ground_truth   record BonkArena episodes to MP4 + true per-frame `.npz` (only when
                 `config.ground_truth.enabled`: the validation set-up)
  convert        videos → `.npz` chunks (`mbjax.offline.video`)
  attach_labels  copy the true actions into `ground_truth.label_fraction` of the chunks (the
                 stand-in for a hand-labelled subset; ground-truth set-up only)
  idm_train      inverse dynamics model on the chunks that carry labels
  idm_label      `actions` for every unlabelled chunk
  reward_train   temporal-ranking progress model on the training episodes
  reward_label   `progress_scores` and `rewards` for every chunk
  export         episodes (`mbjax.offline.episodes`), frames or reward-model embeddings
  skills_train   VQ-VAE over action windows
  skills_label   `skill_tokens` for every chunk
  world_model    RSSM on the exported episodes (`mbjax.train.offline`)
  dream          latent actor-critic against the finished world model, then played
  eval           accuracy / R² / rank correlation / perplexity → `report.json` and a table

Layout under the work directory: `videos/` (ground-truth recordings, or point
`config.source.video_dir` elsewhere), `chunks/` (every label is added to the chunk in
place, atomically), `models/<name>/` (orbax parameters + `config.json`), `episodes/`,
`phases.json` (finished phases and what they produced) and `report.json`.

Every phase is resumable: a trained model whose directory is complete is not retrained,
and a labelling phase skips chunks already labelled by the current model (the model's id
is written into the chunk's `meta`). A chunk that cannot be read is logged with its name,
recorded under `skipped` in `phases.json`, and the phase goes on with the others.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import os
import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mbjax import files
from mbjax.envs.spaces import HybridActionSpec
from mbjax.offline import chunks as chunks_lib
from mbjax.offline import episodes as episodes_lib
from mbjax.offline import ground_truth as ground_truth_lib
from mbjax.offline import idm as idm_lib
from mbjax.offline import reward_model as reward_lib
from mbjax.offline import skills as skills_lib
from mbjax.offline import video as video_lib
from mbjax.train import config as learner_config
from mbjax.train import offline as offline_lib
from mbjax.train import sharding

PHASES = ("ground_truth", "convert", "attach_labels", "idm_train", "idm_label", "reward_train",
          "reward_label", "export", "skills_train", "skills_label", "world_model", "dream",
          "eval")
GROUND_TRUTH_ONLY = ("ground_truth", "attach_labels")
ALIASES = {"train_idm": "idm_train", "label_actions": "idm_label",
           "train_reward": "reward_train", "label_rewards": "reward_label",
           "export_rollouts": "export", "export_pt": "export", "train_skills": "skills_train",
           "skills": "skills_train"}
# `meta["action_labeling"]` of chunks whose actions are labels (not IDM predictions).
LABELLED = ("ground_truth", "human")
# XLA options that trade run speed for compile speed (backend optimisation level 0: about
# half the compile time of the learner's update, a third or less of an initialiser's,
# measured 2026-11-26). Initialisers run once, so they always compile this way, as one
# jitted program each rather than one eager compilation per parameter shape.
_FAST_COMPILE = {"xla_backend_optimization_level": 0}
_idm_init = jax.jit(idm_lib.init, static_argnums=(1, 2, 3), compiler_options=_FAST_COMPILE)
_reward_init = jax.jit(reward_lib.init, static_argnums=(1, 2), compiler_options=_FAST_COMPILE)
_skills_init = jax.jit(skills_lib.init, static_argnums=(1, 2), compiler_options=_FAST_COMPILE)


def base_config() -> ml_collections.ConfigDict:
  """Every field the pipeline reads, with defaults (configs/video_pretrain.py overrides)."""
  cfg = ml_collections.ConfigDict()
  cfg.seed = 0
  # Every training phase (idm_train, reward_train, skills_train, world_model, dream) runs
  # data-parallel over a mesh of this many devices (0: all); each phase's batch size is the
  # global batch and must divide by it. (`learner.run` is not read by the pipeline.)
  cfg.run = ml_collections.ConfigDict({"num_devices": 0})
  # The action space the videos were played with: continuous dims, then discrete branches.
  cfg.action = ml_collections.ConfigDict({"continuous_dim": 2, "branches": (4,)})

  cfg.source = ml_collections.ConfigDict()
  cfg.source.video_dir = ""  # "": <workdir>/videos (where ground_truth records)

  # The validation set-up: BonkArena gameplay recorded with its true actions.
  cfg.ground_truth = ml_collections.ConfigDict()
  cfg.ground_truth.enabled = False
  cfg.ground_truth.episodes = 24
  cfg.ground_truth.policies = ("scripted", "random")  # scripted | random | checkpoint
  cfg.ground_truth.checkpoint = ""  # train workdir for the "checkpoint" policy
  cfg.ground_truth.variants = ("fixed:default", "follow:default")  # camera:palette looks
  cfg.ground_truth.pixel_size = 128
  cfg.ground_truth.upgrade_hud = True
  cfg.ground_truth.time_limit = 0  # 0: the game's own
  cfg.ground_truth.fps = 30
  cfg.ground_truth.view_fraction = 0.5  # follow camera: visible part of the arena side
  cfg.ground_truth.menu_pick_prob = 0.1  # geometric menu dwell, see ground_truth.py
  cfg.ground_truth.atari_games = ()  # ale-py ROM ids: out-of-domain clips for the reward model
  cfg.ground_truth.atari_clips = 1
  cfg.ground_truth.atari_steps = 900
  cfg.ground_truth.label_fraction = 0.1  # chunks given their true actions (idm_train data)

  cfg.convert = ml_collections.ConfigDict()
  cfg.convert.fps = 30.0
  cfg.convert.size = 96  # square frames
  cfg.convert.chunk_frames = 250
  cfg.convert.compression = chunks_lib.DEFAULT_COMPRESSION

  # Model sections start from the model's own hyperparameter dataclass, plus training fields.
  cfg.idm = _section(idm_lib.IDMConfig)
  cfg.idm.steps = 2000
  cfg.idm.batch = 8
  cfg.idm.clip_length = 16
  cfg.idm.focus_fraction = 0.25  # clips centred on rare discrete labels (menu choices)
  cfg.idm.class_weight_power = 0.5

  cfg.reward = _section(reward_lib.RewardConfig)
  cfg.reward.steps = 2000
  cfg.reward.batch = 64
  cfg.reward.scale = 1.0  # rewards = Δprogress × scale
  cfg.reward.holdout_fraction = 0.2  # of each look's episodes, kept out of reward_train
  # Glob patterns over episode ids (video file stem + "_" + hash): matching episodes are
  # always held out — a source the model never trains on, for an out-of-domain number.
  cfg.reward.holdout_sources = ("atari_*",)

  cfg.export = ml_collections.ConfigDict()
  # embeddings (the reward model's features, as upstream) | frames. A pixel world model is
  # ~250× slower per step on CPU than one over embeddings (measured 2026-11-26).
  cfg.export.observation = "embeddings"
  cfg.export.frame_size = 64  # frames: resized to this square size for the world model
  cfg.export.min_length = 32  # shorter episodes are skipped

  cfg.skills = _section(skills_lib.SkillConfig)  # window 16, stride 8, 256 codes
  cfg.skills.steps = 2000
  cfg.skills.batch = 128

  # The apex learners' sections (world_model, dream, efe, offline, network.squash) as in
  # a training config; the offline phases read only those.
  cfg.learner = learner_config.base_config()
  cfg.learner.efe.enabled = False
  cfg.learner.world_model.update(deter=256, stoch=16, classes=16, hidden=256, seq_len=32)
  cfg.world_model_steps = 2000
  cfg.dream_steps = 1000
  cfg.log_every = 100  # updates per jitted chunk / progress line
  # Compile the learner and the dream evaluation for compile speed (`_FAST_COMPILE`), at
  # the cost of slower steps: for tiny models (`:debug`), where compiling is most of a phase.
  cfg.fast_compile = False

  cfg.eval = ml_collections.ConfigDict()
  cfg.eval.episodes = 16  # dream-policy episodes played in BonkArena
  cfg.eval.max_steps = 1500
  cfg.eval.speed_bins = (0.05, 0.25)  # player speed (world units / frame) bin edges
  return cfg


def _section(hyperparameters) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({f.name: f.default
                                    for f in dataclasses.fields(hyperparameters)})


def _model_config(hyperparameters, section: ml_collections.ConfigDict):
  """The dataclass built from the config section's fields of the same names."""
  names = {f.name for f in dataclasses.fields(hyperparameters)}
  return hyperparameters(**{k: (tuple(v) if isinstance(v, (list, tuple)) else v)
                            for k, v in section.items() if k in names})


def resolve_phases(phase: str, cfg: ml_collections.ConfigDict) -> list[str]:
  """`all`, a phase, an upstream alias, or a comma-separated list → phases in run order."""
  if phase == "all":
    return [p for p in PHASES if cfg.ground_truth.enabled or p not in GROUND_TRUTH_ONLY]
  names = [ALIASES.get(p.strip(), p.strip()) for p in phase.split(",")]
  unknown = [n for n in names if n not in PHASES]
  if unknown:
    raise ValueError(f"unknown phase(s) {unknown}; expected 'all', one of {list(PHASES)} or "
                     f"an alias {sorted(ALIASES)}")
  return sorted(names, key=PHASES.index)


def action_spec(cfg) -> HybridActionSpec:
  return HybridActionSpec(continuous_dim=cfg.action.continuous_dim,
                          branches=tuple(cfg.action.branches))


# -- the work directory ---------------------------------------------------------------------


def _write_json(path: str, payload) -> None:
  files.write_json(path, payload, indent=1)


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
    _write_json(self._record_path, self.record)

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
  _write_json(os.path.join(staging, "config.json"), {"model_id": model_id, **config})
  os.replace(staging, directory)
  return model_id


def load_model(directory: str, abstract_params: Any) -> tuple[Any, dict]:
  """(params, config dict) saved by `save_model`; the params take `abstract_params`' tree."""
  if not os.path.exists(os.path.join(directory, "config.json")):
    raise FileNotFoundError(f"no trained model in {directory}: run its training phase first")
  config = json.load(open(os.path.join(directory, "config.json")))
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
  one entry per recorded frame), or None when the source has none."""
  source = str(arrays["video_source"]) if "video_source" in arrays else ""
  truth_path = os.path.splitext(source)[0] + ".npz"
  if not source or not os.path.exists(truth_path):
    return None
  meta = chunks_lib.decode_meta(arrays["meta"], name)
  with np.load(truth_path, allow_pickle=False) as npz:
    truth = {k: npz[k] for k in npz.files}
  ground_truth_lib.check_rules_version(
      {truth_path: json.loads(str(truth.get("meta", "{}")))}, truth_path)
  steps = len(truth["rewards"])
  index = video_lib.source_frame_indices(meta, arrays["observations"].shape[0],
                                         float(truth["fps"]))
  if index[-1] >= steps:
    raise chunks_lib.ChunkError(f"{name}: its frames map to recorded steps up to {index[-1]}, "
                                f"but {truth_path} has {steps}")
  return {k: v[index] for k, v in truth.items() if v.ndim and len(v) == steps}


def _one_hot(index: np.ndarray, size: int) -> np.ndarray:
  return np.eye(size, dtype=np.float32)[np.asarray(index)]


def _update_meta(arrays: dict, name: str, **fields) -> np.ndarray:
  meta = chunks_lib.decode_meta(arrays["meta"], name)
  meta.update(fields)
  return chunks_lib.encode_meta(meta)


# -- phases ---------------------------------------------------------------------------------


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
  return {"episodes": len(index), "frames": sum(e["length"] for e in index.values()),
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
  """Gives `ground_truth.label_fraction` of the BonkArena chunks (a seeded, deterministic
  choice) their true `actions` and `actions_valid` ([continuous, discrete] visible: the
  move is invisible while the paused level-up menu is shown, as a labeller would see)."""
  spec, skipped = action_spec(cfg), Skipped("attach_labels")
  candidates = []
  for path, arrays in readable_chunks(ws.chunk_paths(), skipped):
    truth = truth_for_chunk(arrays, path)
    if truth is not None and "actions_continuous" in truth and "menu_open" in truth:
      candidates.append(path)
  count = int(np.ceil(cfg.ground_truth.label_fraction * len(candidates)))
  chosen = sorted(np.random.default_rng(cfg.seed).permutation(len(candidates))[:count])
  for i in chosen:
    path = candidates[i]
    arrays = chunks_lib.read_chunk(path)
    truth = truth_for_chunk(arrays, path)
    discrete = truth["actions_discrete"].reshape(len(truth["rewards"]), -1)
    actions = pack_actions(idm_lib.norm_clipped(truth["actions_continuous"]),
                           [_one_hot(discrete[:, b], n) for b, n in enumerate(spec.branches)])
    valid = np.stack([~truth["menu_open"], np.ones_like(truth["menu_open"])], -1)
    chunks_lib.update_chunk(path, {
        "actions": actions, "actions_valid": valid.astype(bool),
        "meta": _update_meta(arrays, path, action_labeling="ground_truth")},
                            cfg.convert.compression)
  return {"labelled_chunks": [os.path.basename(candidates[i]) for i in chosen],
          "candidates": len(candidates), "skipped": skipped.entries}


def _idm_config(cfg) -> idm_lib.IDMConfig:
  return _model_config(idm_lib.IDMConfig, cfg.idm)


def _frame_shape(cfg) -> tuple[int, int, int]:
  return (cfg.convert.size, cfg.convert.size, 3)


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
    episodes.append(idm_lib.Episode(arrays["observations"], idm_lib.ActionLabels(
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


def _mesh(cfg) -> Mesh:
  try:
    return sharding.make_mesh(cfg.run.num_devices)
  except ValueError as e:
    raise ValueError(f"run.num_devices={cfg.run.num_devices}: {e}") from None


def idm_train(ws: Workspace, cfg) -> dict:
  directory = ws.model_dir("idm")
  if model_exists(directory):
    return {"model": directory, "resumed": "already trained"}
  data_sharding = sharding.batch_sharding(_mesh(cfg), cfg.idm.batch, "idm.batch")
  spec, skipped = action_spec(cfg), Skipped("idm_train")
  episodes, focus = _labelled_episodes(ws, spec, skipped)
  discrete = np.concatenate([e.labels.discrete for e in episodes])
  valid = np.concatenate([e.labels.discrete_valid for e in episodes])
  weights = idm_lib.class_weights_from_labels(discrete, spec, cfg.idm.class_weight_power, valid)
  idm_cfg = _idm_config(cfg)
  state = _idm_init(jax.random.PRNGKey(cfg.seed), idm_cfg, _frame_shape(cfg), spec, weights)
  started = time.time()
  state, metrics = idm_lib.fit(
      state, episodes, cfg.idm.steps, np.random.default_rng(cfg.seed), cfg.idm.batch,
      cfg.idm.clip_length, focus, cfg.idm.focus_fraction,
      log_fn=lambda step, m: logging.info("idm_train %d/%d: %s", step, cfg.idm.steps,
                                          _fmt(m)), log_every=cfg.log_every,
      data_sharding=data_sharding)
  model_id = save_model(directory, state.params, {
      "idm": dataclasses.asdict(idm_cfg), "frame_shape": list(_frame_shape(cfg)),
      "class_weights": [w.tolist() for w in weights]})
  return {"model": directory, "model_id": model_id, "chunks": len(episodes),
          "frames": int(len(discrete)), "seconds": round(time.time() - started, 1),
          "final": metrics, "skipped": skipped.entries}


def _fmt(metrics: dict) -> str:
  return ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))


def _load_idm(ws: Workspace, cfg):
  spec, idm_cfg = action_spec(cfg), _idm_config(cfg)
  abstract = jax.eval_shape(lambda: idm_lib.init(jax.random.PRNGKey(0), idm_cfg,
                                                 _frame_shape(cfg), spec).params)
  params, saved = load_model(ws.model_dir("idm"), abstract)
  return params, idm_cfg, spec, saved["model_id"]


def idm_label(ws: Workspace, cfg) -> dict:
  params, idm_cfg, spec, model_id = _load_idm(ws, cfg)
  skipped, labelled, kept = Skipped("idm_label"), 0, 0
  paths = ws.chunk_paths()
  for number, path in enumerate(paths, 1):
    try:
      meta = chunks_lib.read_meta(path)
      if meta.get("action_labeling") in LABELLED or meta.get("idm_model") == model_id:
        kept += 1
        continue
      arrays = chunks_lib.read_chunk(path)
      labels = idm_lib.label(params, idm_cfg, spec, arrays["observations"])
      chunks_lib.update_chunk(path, {
          "actions": pack_actions(labels.continuous, list(labels.probs)),
          "meta": _update_meta(arrays, path, action_labeling="idm", idm_model=model_id)},
                              cfg.convert.compression)
      labelled += 1
      logging.info("idm_label [%d/%d] %s: %d frames", number, len(paths),
                   os.path.basename(path), len(labels.continuous))
    except chunks_lib.ChunkError as e:
      skipped.add(path, e)
  return {"labelled": labelled, "already_labelled": kept, "skipped": skipped.entries}



def _split_episodes(looks: dict[str, str], fraction: float, sources: Sequence[str],
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
  """The source look of an episode (see `_source_look`) from its first chunk's recording."""
  try:
    arrays = chunks_lib.read_chunk(paths[0], keys=("video_source",), validate=False)
  except chunks_lib.ChunkError:
    arrays = {}  # no recording to go by (imported chunks, or unreadable: skipped later)
  return _source_look(_truth_meta(arrays))


def _reward_config(cfg) -> reward_lib.RewardConfig:
  return _model_config(reward_lib.RewardConfig, cfg.reward)


def reward_train(ws: Workspace, cfg) -> dict:
  """Bradley–Terry progress model on frame pairs within chunks of the training episodes
  (the episodes matching `reward.holdout_sources`, and `reward.holdout_fraction` of each
  look's others, are kept out, for eval; `_split_episodes`)."""
  directory = ws.model_dir("reward")
  if model_exists(directory):
    return {"model": directory, "resumed": "already trained"}
  data_sharding = sharding.batch_sharding(_mesh(cfg), cfg.reward.batch, "reward.batch")
  skipped = Skipped("reward_train")
  grouped = episodes_of(ws.chunk_paths(), skipped)
  looks = {episode_id: _episode_look(paths) for episode_id, paths in grouped.items()}
  held_out = _split_episodes(looks, cfg.reward.holdout_fraction,
                             tuple(cfg.reward.holdout_sources), cfg.seed)
  frames = []
  for episode_id, paths in grouped.items():
    if episode_id in held_out:
      continue
    for _, arrays in readable_chunks(paths, skipped, keys=("observations",)):
      frames.append(arrays["observations"])
  if not frames:
    raise ValueError(f"reward_train: no readable training chunk in {ws.chunks}")
  reward_cfg = _reward_config(cfg)
  state = _reward_init(jax.random.PRNGKey(cfg.seed), reward_cfg, _frame_shape(cfg))
  started = time.time()
  state, metrics = reward_lib.fit(
      state, frames, cfg.reward.steps, np.random.default_rng(cfg.seed), cfg.reward.batch,
      log_fn=lambda step, m: logging.info("reward_train %d/%d: %s", step, cfg.reward.steps,
                                          _fmt(m)), log_every=cfg.log_every,
      data_sharding=data_sharding)
  model_id = save_model(directory, state.params, {
      "reward": dataclasses.asdict(reward_cfg), "frame_shape": list(_frame_shape(cfg)),
      "held_out_episodes": sorted(held_out)})
  return {"model": directory, "model_id": model_id, "chunks": len(frames),
          "held_out_episodes": sorted(held_out), "seconds": round(time.time() - started, 1),
          "final": metrics, "skipped": skipped.entries}


def _load_reward(ws: Workspace, cfg):
  reward_cfg = _reward_config(cfg)
  abstract = jax.eval_shape(lambda: reward_lib.init(jax.random.PRNGKey(0), reward_cfg,
                                                    _frame_shape(cfg)).params)
  params, saved = load_model(ws.model_dir("reward"), abstract)
  return params, reward_cfg, saved


def reward_label(ws: Workspace, cfg) -> dict:
  """`progress_scores` and `rewards` = Δprogress × scale, scored over each whole episode
  (so a chunk's last reward looks at the next chunk's first frame; 0 at the episode's end)."""
  params, reward_cfg, saved = _load_reward(ws, cfg)
  model_id, skipped, labelled = saved["model_id"], Skipped("reward_label"), 0
  grouped = episodes_of(ws.chunk_paths(), skipped)
  for number, (episode_id, paths) in enumerate(grouped.items(), 1):
    try:
      if all(chunks_lib.read_meta(p).get("reward_model") == model_id for p in paths):
        continue
      parts = [chunks_lib.read_chunk(p) for p in paths]
    except chunks_lib.ChunkError as e:
      skipped.add(episode_id, e)  # one bad chunk leaves its episode unlabelled
      continue
    progress = reward_lib.score(params, reward_cfg,
                                np.concatenate([a["observations"] for a in parts]))
    rewards = reward_lib.rewards_from_progress(progress, cfg.reward.scale)
    bounds = np.cumsum([0] + [len(a["observations"]) for a in parts])
    for path, arrays, lo, hi in zip(paths, parts, bounds[:-1], bounds[1:]):
      chunks_lib.update_chunk(path, {
          "progress_scores": progress[lo:hi], "rewards": rewards[lo:hi],
          "meta": _update_meta(arrays, path, reward_labeling="video_reward",
                               reward_model=model_id)}, cfg.convert.compression)
    labelled += 1
    logging.info("reward_label [%d/%d] %s: %d frames", number, len(grouped), episode_id,
                 bounds[-1])
  return {"labelled_episodes": labelled, "skipped": skipped.entries}


def export(ws: Workspace, cfg) -> dict:
  embed_fn = None
  if cfg.export.observation == "embeddings":
    params, reward_cfg, _ = _load_reward(ws, cfg)
    embed_fn = lambda frames: reward_lib.embed(params, reward_cfg, frames)[0]
  manifest = episodes_lib.export_chunks(ws.chunks, ws.episodes, cfg.export.observation,
                                        embed_fn, cfg.convert.compression,
                                        progress=logging.info)
  sources = manifest["sources"]
  return {"episodes": sum(e["status"] == "done" for e in sources.values()),
          "steps": sum(e["steps"] for e in sources.values()),
          "skipped": {k: e["reason"] for k, e in sources.items() if e["status"] == "skipped"}}


def _skill_config(cfg) -> skills_lib.SkillConfig:
  return _model_config(skills_lib.SkillConfig, cfg.skills)


def _chunk_actions(ws: Workspace, spec, skipped: Skipped):
  for path, arrays in readable_chunks(ws.chunk_paths(), skipped):
    if "actions" not in arrays:
      skipped.add(path, chunks_lib.ChunkError(f"{path}: no 'actions'; run idm_label first"))
      continue
    try:
      yield path, arrays, unpack_actions(arrays["actions"], spec)
    except chunks_lib.ChunkError as e:
      skipped.add(path, e)


def skills_train(ws: Workspace, cfg) -> dict:
  directory = ws.model_dir("skills")
  if model_exists(directory):
    return {"model": directory, "resumed": "already trained"}
  data_sharding = sharding.batch_sharding(_mesh(cfg), cfg.skills.batch, "skills.batch")
  spec, skill_cfg, skipped = action_spec(cfg), _skill_config(cfg), Skipped("skills_train")
  windows = [skills_lib.training_windows(skills_lib.action_vectors(c, d, spec),
                                         skill_cfg.window, skill_cfg.stride)
             for _, _, (c, d) in _chunk_actions(ws, spec, skipped)]
  windows = np.concatenate(windows) if windows else np.zeros((0,))
  if not len(windows):
    raise ValueError(f"skills_train: no chunk in {ws.chunks} has {skill_cfg.window} labelled "
                     "actions; run idm_label first")
  key = jax.random.PRNGKey(cfg.seed)
  state = _skills_init(key, skill_cfg, spec)
  state, metrics = skills_lib.fit(
      state, windows, cfg.skills.steps, np.random.default_rng(cfg.seed),
      jax.random.fold_in(key, 1), cfg.skills.batch,
      log_fn=lambda step, m: logging.info("skills_train %d/%d: %s", step, cfg.skills.steps,
                                          _fmt(m)), log_every=cfg.log_every,
      data_sharding=data_sharding)
  model_id = save_model(directory, {"params": state.params, "codebook": state.codebook},
                        {"skills": dataclasses.asdict(skill_cfg)})
  return {"model": directory, "model_id": model_id, "windows": int(len(windows)),
          "final": metrics, "skipped": skipped.entries}


def _load_skills(ws: Workspace, cfg):
  spec, skill_cfg = action_spec(cfg), _skill_config(cfg)
  abstract = jax.eval_shape(lambda: (lambda s: {"params": s.params, "codebook": s.codebook})(
      skills_lib.init(jax.random.PRNGKey(0), skill_cfg, spec)))
  saved, meta = load_model(ws.model_dir("skills"), abstract)
  return saved["params"], saved["codebook"], skill_cfg, spec, meta["model_id"]


def skills_label(ws: Workspace, cfg) -> dict:
  params, codebook, skill_cfg, spec, model_id = _load_skills(ws, cfg)
  skipped, labelled = Skipped("skills_label"), 0
  for path, arrays, (continuous, discrete) in _chunk_actions(ws, spec, skipped):
    if chunks_lib.decode_meta(arrays["meta"], path).get("skills_model") == model_id:
      continue
    tokens, starts = skills_lib.encode(params, codebook, skill_cfg, spec, continuous, discrete)
    per_frame = skills_lib.tokens_per_frame(tokens, starts, len(continuous), skill_cfg.window)
    chunks_lib.update_chunk(path, {
        "skill_tokens": per_frame,
        "meta": _update_meta(arrays, path, skills_model=model_id)}, cfg.convert.compression)
    labelled += 1
  return {"labelled": labelled, "skipped": skipped.entries}


def _learner_data(ws: Workspace, cfg):
  """Exported episodes → (`offline.EpisodeData`, observation shape, dtype)."""
  spec, size, dicts = action_spec(cfg), cfg.export.frame_size, []
  for path in episodes_lib.list_episodes(ws.episodes):
    try:
      episode = episodes_lib.read_episode(path)
    except episodes_lib.EpisodeError as e:
      logging.warning("skipping %s: %s", path, e)
      continue
    if len(episode["reward"]) < cfg.export.min_length:
      continue
    continuous, discrete = unpack_actions(episode["action"], spec)
    obs = episode["observation"]
    if obs.ndim == 4 and obs.shape[1:3] != (size, size):  # frames: the world model's size
      obs = np.asarray(jax.image.resize(obs, (len(obs), size, size, 3), "linear")
                       .round().clip(0, 255).astype(np.uint8))
    dicts.append({"obs": obs, "action_continuous": continuous, "action_discrete": discrete,
                  "reward": episode["reward"], "terminated": episode["is_terminal"],
                  "name": path})
  if not dicts:
    raise ValueError(f"no exported episode of at least {cfg.export.min_length} steps in "
                     f"{ws.episodes}; run export first")
  data = offline_lib.EpisodeData.concatenate(dicts, spec)
  return data, data.obs.shape[1:], data.obs.dtype


class _LearnerSetup(NamedTuple):
  """The exported episodes (read once per phase) and the offline trainer built for them."""

  data: offline_lib.EpisodeData
  trainer: offline_lib.OfflineTrainer
  mesh: Mesh


def _learner_setup(ws: Workspace, cfg) -> _LearnerSetup:
  mesh = _mesh(cfg)
  data, obs_shape, obs_dtype = _learner_data(ws, cfg)
  trainer = offline_lib.make_offline_trainer(cfg.learner, obs_shape, obs_dtype,
                                             action_spec(cfg), mesh, config_prefix="learner.")
  return _LearnerSetup(data, trainer, mesh)


def _train_learners(setup: _LearnerSetup, cfg, name: str, steps: int, train_world_model: bool,
                    start: Any = None) -> tuple[Any, dict]:
  trainer = setup.trainer
  init = jax.jit(trainer.init, compiler_options=_FAST_COMPILE)
  state = init(jax.random.PRNGKey(cfg.seed)) if start is None else start
  # The episodes and the state replicated; the trainer splits each sampled batch.
  state, data = jax.device_put((state, setup.data), NamedSharding(setup.mesh, P()))
  update = jax.jit(trainer.update, static_argnums=(2, 3),
                   compiler_options=_compiler_options(cfg))
  chunk = max(1, min(cfg.log_every, steps))
  metrics, started = {}, time.time()
  for done in range(0, steps, chunk):
    state, metrics = update(state, data, train_world_model, min(chunk, steps - done))
    logging.info("%s %d/%d: %s", name, min(done + chunk, steps), steps,
                 _fmt(jax.tree.map(float, metrics)))
  info = {"steps": steps, "data_steps": data.num_steps, "obs_shape": list(data.obs.shape[1:]),
          "seconds": round(time.time() - started, 1),
          "final": {k: float(v) for k, v in metrics.items()}}
  return state, info


def _compiler_options(cfg) -> dict | None:
  return _FAST_COMPILE if cfg.fast_compile else None


def world_model(ws: Workspace, cfg) -> dict:
  directory = ws.model_dir("world_model")
  if model_exists(directory):
    return {"model": directory, "resumed": "already trained"}
  state, info = _train_learners(_learner_setup(ws, cfg), cfg, "world_model",
                                cfg.world_model_steps, True)
  info["model_id"] = save_model(directory, state, {"learner": cfg.learner.to_dict()})
  return {"model": directory, **info}


def dream(ws: Workspace, cfg) -> dict:
  """The dream actor-critic against the finished world model (which stays fixed), saved,
  then played in BonkArena against the uniform random policy."""
  directory = ws.model_dir("dream")
  setup = _learner_setup(ws, cfg)  # the episodes are read once, for both uses below
  abstract = jax.eval_shape(setup.trainer.init, jax.random.PRNGKey(0))
  if model_exists(directory):
    state, _ = load_model(directory, abstract)
    info = {"model": directory, "resumed": "already trained"}
  else:
    start, _ = load_model(ws.model_dir("world_model"), abstract)
    state, info = _train_learners(setup, cfg, "dream", cfg.dream_steps, False, start)
    info["model_id"] = save_model(directory, state, {"learner": cfg.learner.to_dict()})
  info["evaluation"] = evaluate_dream_policy(ws, setup.trainer, state, cfg)
  return {"model": directory, **info}


def evaluate_dream_policy(ws: Workspace, trainer: offline_lib.OfflineTrainer, state,
                          cfg) -> dict:
  """Mean return of the saved dream policy in BonkArena vs the uniform random policy (same
  keys). The game is drawn like the videos (the first ground-truth look, at the chunks'
  frame size) and each frame is turned into what the world model saw: resized to
  `export.frame_size`, or embedded by the reward model. The random policy ignores its
  observations, so it plays the same game with vector observations (no drawing to compile)."""
  if trainer.learners.dream is None or not cfg.ground_truth.enabled:
    return {"skipped": "needs the dream learner and the BonkArena ground-truth set-up"}
  from mbjax.envs.bonk_arena import BonkArena, random_policy, rollout  # the validation env
  camera, _, palette = cfg.ground_truth.variants[0].partition(":")
  env = BonkArena(observation="pixels", pixel_size=cfg.convert.size, camera=camera,
                  palette=palette, upgrade_hud=cfg.ground_truth.upgrade_hud)
  params = env.default_params()
  if cfg.export.observation == "embeddings":
    reward_params, reward_cfg, _ = _load_reward(ws, cfg)
    obs_fn = lambda frames: reward_lib.ProgressNet(reward_cfg).apply(reward_params, frames)[0]
  else:
    size = cfg.export.frame_size
    obs_fn = lambda frames: jax.image.resize(
        frames, (frames.shape[0], size, size, 3), "linear").round().clip(0, 255).astype(
            np.uint8)
  keys = jax.random.split(jax.random.PRNGKey(cfg.seed + 7), cfg.eval.episodes)
  options = _compiler_options(cfg)
  play = jax.jit(jax.vmap(lambda key: offline_lib.play_latent_policy(
      env, params, trainer.learners, state.aux, key, cfg.eval.max_steps, obs_fn=obs_fn)),
                 compiler_options=options)
  dream_returns = np.asarray(play(keys))
  vector_env = BonkArena(observation="vector")
  play_random = jax.jit(lambda key: rollout.evaluate(
      vector_env, params, random_policy, key, cfg.eval.episodes, cfg.eval.max_steps)["return"],
                        compiler_options=options)
  random_returns = np.asarray(play_random(keys[0]))
  return {"episodes": cfg.eval.episodes,
          "dream_return_mean": float(dream_returns.mean()),
          "dream_return_std": float(dream_returns.std()),
          "random_return_mean": float(random_returns.mean()),
          "random_return_std": float(random_returns.std())}

# -- evaluation -----------------------------------------------------------------------------


def _truth_meta(arrays: dict) -> dict:
  """The recording's `meta` (camera, palette, policy) of a chunk's source, or {}."""
  truth_path = os.path.splitext(str(arrays.get("video_source", "")))[0] + ".npz"
  if not os.path.exists(truth_path):
    return {}
  with np.load(truth_path, allow_pickle=False) as npz:
    return json.loads(str(npz["meta"])) if "meta" in npz.files else {}


def evaluate_idm(ws: Workspace, cfg) -> dict:
  """IDM labels of the chunks it labelled (the 90% without labels) against the truth, per
  group of frames: all, menu overlay vs gameplay, player-speed bins, and camera."""
  spec, skipped = action_spec(cfg), Skipped("eval")
  pred_c, pred_d, true_c, true_d, groups = [], [], [], [], {}
  for path, arrays in readable_chunks(ws.chunk_paths(), skipped):
    meta = chunks_lib.decode_meta(arrays["meta"], path)
    truth = truth_for_chunk(arrays, path)
    if meta.get("action_labeling") != "idm" or truth is None or "menu_open" not in truth:
      continue
    continuous, discrete = unpack_actions(arrays["actions"], spec)
    pred_c.append(continuous)
    pred_d.append(discrete)
    true_c.append(idm_lib.norm_clipped(truth["actions_continuous"]))
    true_d.append(truth["actions_discrete"].reshape(len(continuous), -1))
    menu, speed = truth["menu_open"].astype(bool), truth["player_speed"]
    camera = _truth_meta(arrays).get("camera", "unknown")
    edges = (0.0,) + tuple(cfg.eval.speed_bins) + (np.inf,)
    frame_groups = {"all": np.ones_like(menu), "menu": menu, "gameplay": ~menu,
                    f"camera_{camera}": ~menu}
    for lo, hi in zip(edges[:-1], edges[1:]):
      frame_groups[f"speed_{lo:g}-{hi:g}"] = ~menu & (speed >= lo) & (speed < hi)
    for name, mask in frame_groups.items():
      groups.setdefault(name, []).append((len(pred_c) - 1, mask))
  if not pred_c:
    return {"idm": "no IDM-labelled chunk with ground truth"}
  lengths = np.cumsum([0] + [len(c) for c in pred_c])
  total = lengths[-1]
  masks = {}
  for name, entries in groups.items():
    mask = np.zeros(total, bool)
    for index, m in entries:
      mask[lengths[index]:lengths[index + 1]] = m
    masks[name] = mask
  pred = idm_lib.IDMLabels(np.concatenate(pred_c), np.concatenate(pred_d), ())
  # Movement is scored where the video shows it: the game is paused under the menu.
  result = idm_lib.evaluate_labels(pred, np.concatenate(true_c), np.concatenate(true_d),
                                   masks, move_visible=~masks["menu"])
  return {"idm": result, "skipped": skipped.entries}


def _source_look(truth_meta: dict) -> str:
  """camera:palette@size of a BonkArena recording, atari_<game>, or "video" (no truth)."""
  if not truth_meta:
    return "video"
  if truth_meta.get("source") == "atari":
    return f"atari_{truth_meta.get('game', '?')}"
  return (f"{truth_meta.get('camera', '?')}:{truth_meta.get('palette', '?')}"
          f"@{truth_meta.get('pixel_size', '?')}")


def _mean_defined(values) -> float | None:
  """Mean of the finite values (a Spearman is undefined when a sequence is constant)."""
  values = [v for v in values if np.isfinite(v)]
  return float(np.mean(values)) if values else None


def evaluate_rewards(ws: Workspace, cfg) -> dict:
  """Spearman rank correlation of each held-out episode's progress scores with its true
  progress and with time; per source look (camera:palette@size, or atari_<game>), per
  source (BonkArena, Atari) and over all, the mean over episodes where it is defined.

  True progress: BonkArena, the XP collected so far (`xp_total`); Atari, the game score so
  far (`score`: ale-py's rewards summed before the frame — points scored, or in Pong the
  net points). A clip whose score never changes has no defined score correlation; it still
  counts for the correlation with time, the order the model was trained to recover.
  """
  if not model_exists(ws.model_dir("reward")):
    return {"reward": "no reward model"}
  held_out = set(json.load(open(os.path.join(ws.model_dir("reward"), "config.json")))
                 ["held_out_episodes"])
  skipped, per_look = Skipped("eval"), {}
  for episode_id, paths in episodes_of(ws.chunk_paths(), skipped).items():
    if episode_id not in held_out:
      continue
    parts = list(readable_chunks(paths, skipped))
    if len(parts) != len(paths) or any("progress_scores" not in a for _, a in parts):
      continue
    truths = [truth_for_chunk(a, p) for p, a in parts]
    if any(t is None for t in truths):
      continue
    progress = np.concatenate([a["progress_scores"] for _, a in parts])
    score_key = "xp_total" if "xp_total" in truths[0] else "score"
    if score_key not in truths[0]:
      continue
    true_score = np.concatenate([t[score_key] for t in truths])
    look = _source_look(_truth_meta(parts[0][1]))
    entry = per_look.setdefault(look, {"score": [], "time": []})
    entry["score"].append(reward_lib.spearman(progress, true_score))
    entry["time"].append(reward_lib.spearman(progress, np.arange(len(progress))))

  def summarise(entries) -> dict:
    score = [v for e in entries for v in e["score"]]
    time_ = [v for e in entries for v in e["time"]]
    return {"episodes": len(score), "episodes_score_defined": int(np.isfinite(score).sum()),
            "spearman_score": _mean_defined(score), "spearman_time": _mean_defined(time_)}

  summary = {look: summarise([e]) for look, e in sorted(per_look.items())}
  summary["all_bonk_arena"] = summarise([e for look, e in per_look.items()
                                         if not look.startswith("atari")])
  summary["all_atari"] = summarise([e for look, e in per_look.items()
                                    if look.startswith("atari")])
  summary["all"] = summarise(per_look.values())
  return {"reward": summary}


def evaluate_skills(ws: Workspace, cfg) -> dict:
  """Perplexity exp(H) of the skill-token distribution over all labelled frames' windows
  and the fraction of the codebook in use."""
  tokens, skipped = [], Skipped("eval")
  for _, arrays in readable_chunks(ws.chunk_paths(), skipped):
    if "skill_tokens" in arrays:
      t = arrays["skill_tokens"]
      tokens.append(t[t >= 0][::cfg.skills.window])  # one entry per labelling window
  if not tokens:
    return {"skills": "no skill tokens"}
  tokens = np.concatenate(tokens)
  counts = np.bincount(tokens, minlength=cfg.skills.num_codes).astype(np.float64)
  p = counts / counts.sum()
  entropy = -np.sum(p[p > 0] * np.log(p[p > 0]))
  return {"skills": {"windows": int(len(tokens)), "perplexity": float(np.exp(entropy)),
                     "codes_used": int((counts > 0).sum()),
                     "usage_fraction": float((counts > 0).mean())}}


def evaluate(ws: Workspace, cfg) -> dict:
  report = {**evaluate_idm(ws, cfg), **evaluate_rewards(ws, cfg), **evaluate_skills(ws, cfg)}
  report["dream"] = ws.record.get("dream", {}).get("evaluation", "dream phase not run")
  report["throughput"] = {phase: ws.record[phase].get("seconds") for phase in PHASES
                          if phase in ws.record and "seconds" in ws.record[phase]}
  _write_json(ws.report, report)
  print(format_report(report))
  return {"report": ws.report}


def format_report(report: dict) -> str:
  """The report as a printed table: one line per measured quantity."""
  lines = ["quantity                                   value"]
  add = lambda name, value: lines.append(
      f"{name:<42} {value:.4f}" if isinstance(value, float) else f"{name:<42} {value}")
  idm = report.get("idm")
  if isinstance(idm, dict):
    groups = sorted({k.split("/")[0] for k in idm})
    for group in groups:
      frames = idm.get(f"{group}/frames", 0)
      accuracies = [v for k, v in idm.items() if k.startswith(f"{group}/accuracy_")]
      add(f"IDM {group}: frames", frames)
      for i, value in enumerate(accuracies):
        add(f"IDM {group}: discrete accuracy (branch {i})", value)
      if f"{group}/move_r2" in idm:
        add(f"IDM {group}: movement R²", idm[f"{group}/move_r2"])
  reward = report.get("reward")
  if isinstance(reward, dict):
    for look, entry in reward.items():
      if not entry.get("episodes"):
        continue
      defined = f"{entry['episodes_score_defined']}/{entry['episodes']} episodes"
      add(f"reward Spearman vs true progress [{look}] ({defined})",
          "undefined" if entry["spearman_score"] is None else entry["spearman_score"])
      add(f"reward Spearman vs time [{look}]", entry["spearman_time"])
  skills = report.get("skills")
  if isinstance(skills, dict):
    add("skills: perplexity", skills["perplexity"])
    add("skills: codes used", skills["codes_used"])
  dream_eval = report.get("dream")
  if isinstance(dream_eval, dict) and "dream_return_mean" in dream_eval:
    add("dream policy return (mean)", dream_eval["dream_return_mean"])
    add("random policy return (mean)", dream_eval["random_return_mean"])
  return "\n".join(lines)


PHASE_FUNCTIONS: dict[str, Callable] = {
    "ground_truth": ground_truth, "convert": convert, "attach_labels": attach_labels, "idm_train": idm_train,
    "idm_label": idm_label, "reward_train": reward_train, "reward_label": reward_label,
    "export": export, "skills_train": skills_train, "skills_label": skills_label,
    "world_model": world_model, "dream": dream, "eval": evaluate,
}


def run(workdir: str, cfg: ml_collections.ConfigDict, phase: str = "all") -> dict:
  """Runs `phase` (see `resolve_phases`) under `workdir`; returns {phase: info}."""
  ws = Workspace(workdir, cfg)
  results = {}
  for name in resolve_phases(phase, cfg):
    started = time.time()
    logging.info("phase %s: starting", name)
    info = PHASE_FUNCTIONS[name](ws, cfg)
    info.setdefault("seconds", round(time.time() - started, 1))
    ws.finish(name, info)
    results[name] = info
    logging.info("phase %s: done in %.1f s", name, time.time() - started)
  return results
