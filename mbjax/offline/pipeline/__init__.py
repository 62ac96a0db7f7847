"""The offline video pipeline: gameplay video → chunks → IDM actions → deaths → video
rewards → episodes → skill tokens → offline world model and dream policy → evaluation. The
library side of `experiments/video_pretrain.py`: one function `(workspace, cfg) -> info` per
phase, listed in `REGISTRY`, and `run`, which runs them in order and records what each
produced.

Phases, in the order `all` runs them (upstream names accepted as aliases, `ALIASES`):

  ground_truth   record BonkArena episodes to MP4 + true per-frame `.npz` (only when
                 `config.ground_truth.enabled`: the validation set-up)
  convert        videos → `.npz` chunks (`mbjax.offline.video`)
  attach_labels  copy the true actions and rewards into `ground_truth.label_fraction` of the
                 videos (the stand-in for a labelled subset; ground-truth set-up only)
  idm_train      inverse dynamics model on the chunks that carry labels
  idm_label      `actions` for every unlabelled chunk
  bc_train       behaviour-cloned policy on the frames and actions of chosen videos
  death_train    end-of-life classifier on where the training videos end (no labels)
  death_label    `death_probs` and `terminals` (deaths) for every chunk
  reward_train   reward model: the game's reward of the labelled training chunks regressed
                 ("returns"), or a progress ranking of the lives, deaths last ("progress")
  reward_label   `progress_scores` and `rewards` for every chunk
  export         episodes (`mbjax.offline.episodes`), frames or the features of trained
                 models (`export.features`: the reward model's, the cloned policy's)
  skills_train   VQ-VAE over action windows
  skills_label   `skill_tokens` for every chunk
  world_model    RSSM on the exported episodes (`mbjax.train.offline`)
  dream          latent actor-critic against the finished world model, then played
  eval           accuracy / R² / deaths found / reward vs the game's / perplexity /
                 the behaviour-cloned policy against its demonstrator and random play →
                 `report.json` and a table

Layout under the work directory: `videos/` (ground-truth recordings, or point
`config.source.video_dir` elsewhere), `chunks/` (every label is added to the chunk in
place, atomically), `models/<name>/` (orbax parameters + `config.json`), `episodes/`,
`phases.json` (finished phases and what they produced) and `report.json`.

Every phase is resumable: a trained model whose directory is complete is not retrained,
and a labelling phase skips chunks already labelled by the current model (the model's id
is written into the chunk's `meta`). `export` redoes a chunk rewritten since (relabelled),
and a world model or dream policy trained before the episodes were exported again (or, for
dream, before the world model was retrained) stops the run, naming it, rather than being
resumed. A chunk that cannot be read is logged with its name, recorded under `skipped` in
`phases.json`, and the phase goes on with the others.

Modules: `config` (the schema, `base_config`), `workspace` (the work directory, model and
chunk I/O), `sources` (ground_truth, convert, attach_labels), `models` (the IDM, death,
reward and skills phases), `learners` (export, world_model, dream), `evaluation` (eval and
the report).
A new phase is a function `(workspace, cfg) -> info` in the module of its kind and one
`Phase` line in `REGISTRY`, at its place in the order; its config fields go in
`config.base_config`.
"""
from __future__ import annotations

import time
from typing import Callable, NamedTuple

import ml_collections
from absl import logging

from mbjax.offline.pipeline import config, evaluation, learners, models, sources
# The schema and the work directory's I/O, as configs/, experiments/ and the tests use them.
from mbjax.offline.pipeline.config import base_config
from mbjax.offline.pipeline.workspace import (Workspace, load_model, pack_actions, save_model,
                                              unpack_actions)


def _ground_truth_enabled(cfg) -> bool:
  return cfg.ground_truth.enabled


class Phase(NamedTuple):
  """A step of the pipeline, as `run` and `resolve_phases` know it."""

  name: str
  fn: Callable[[Workspace, ml_collections.ConfigDict], dict]  # → info, kept in phases.json
  aliases: tuple[str, ...] = ()  # upstream MetaBonk names accepted for it
  in_all: Callable[[ml_collections.ConfigDict], bool] = lambda cfg: True  # part of `all`?


# In run order.
REGISTRY = (
    Phase("ground_truth", sources.ground_truth, in_all=_ground_truth_enabled),
    Phase("convert", sources.convert),
    Phase("attach_labels", sources.attach_labels, in_all=_ground_truth_enabled),
    Phase("idm_train", models.idm_train, aliases=("train_idm",)),
    Phase("idm_label", models.idm_label, aliases=("label_actions",)),
    Phase("bc_train", models.bc_train),
    Phase("death_train", models.death_train),
    Phase("death_label", models.death_label),
    Phase("reward_train", models.reward_train, aliases=("train_reward",)),
    Phase("reward_label", models.reward_label, aliases=("label_rewards",)),
    Phase("export", learners.export, aliases=("export_rollouts", "export_pt")),
    Phase("skills_train", models.skills_train, aliases=("train_skills", "skills")),
    Phase("skills_label", models.skills_label),
    Phase("world_model", learners.world_model),
    Phase("dream", learners.dream),
    Phase("eval", evaluation.evaluate),
)
PHASES = tuple(phase.name for phase in REGISTRY)
ALIASES = {alias: phase.name for phase in REGISTRY for alias in phase.aliases}


def resolve_phases(phase: str, cfg: ml_collections.ConfigDict) -> list[str]:
  """`all`, a phase, an upstream alias, or a comma-separated list → phases in run order."""
  if phase == "all":
    return [p.name for p in REGISTRY if p.in_all(cfg)]
  names = [ALIASES.get(p.strip(), p.strip()) for p in phase.split(",")]
  unknown = [n for n in names if n not in PHASES]
  if unknown:
    raise ValueError(f"unknown phase(s) {unknown}; expected 'all', one of {list(PHASES)} or "
                     f"an alias {sorted(ALIASES)}")
  return sorted(names, key=PHASES.index)


def run(workdir: str, cfg: ml_collections.ConfigDict, phase: str = "all") -> dict:
  """Runs `phase` (see `resolve_phases`) under `workdir`; returns {phase: info}. The config's
  paths and choices are checked first (`config.resolve_paths`, `config.check_choices`): a
  wrong one fails before any phase."""
  names = resolve_phases(phase, cfg)
  config.check_choices(cfg)
  cfg = config.resolve_paths(cfg, names)
  ws = Workspace(workdir, cfg)
  functions = {p.name: p.fn for p in REGISTRY}
  results = {}
  for name in names:
    started = time.time()
    logging.info("phase %s: starting", name)
    info = functions[name](ws, cfg)
    info.setdefault("seconds", round(time.time() - started, 1))
    ws.finish(name, info)
    results[name] = info
    logging.info("phase %s: done in %.1f s", name, time.time() - started)
  return results
