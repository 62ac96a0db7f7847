"""The offline pipeline's config schema (`base_config`) and what the phases derive from it:
each model's hyperparameter dataclass, the action spec, the frame shape, the device mesh and
the XLA compile options.
"""
from __future__ import annotations

import dataclasses
import os

import ml_collections
from jax.sharding import Mesh

from mbjax.envs.spaces import HybridActionSpec
from mbjax.offline import bc as bc_lib
from mbjax.offline import chunks as chunks_lib
from mbjax.offline import deaths as deaths_lib
from mbjax.offline import idm as idm_lib
from mbjax.offline import reward_model as reward_lib
from mbjax.offline import rlds as rlds_lib
from mbjax.offline import skills as skills_lib
from mbjax.train import config as learner_config
from mbjax.train import sharding

# XLA options that trade run speed for compile speed (backend optimisation level 0: about
# half the compile time of the learner's update, a third or less of an initialiser's,
# measured 2026-11-26). Initialisers run once, so they always compile this way, as one
# jitted program each rather than one eager compilation per parameter shape.
FAST_COMPILE = {"xla_backend_optimization_level": 0}
# The config's path fields. A relative path is relative to the directory the command runs
# from, as `--workdir` is (every documented command runs from the repository root, where
# `make train` writes runs/arena_ppo); `resolve_paths` makes them absolute and checks them.
PATH_FIELDS = ("source.video_dir", "source.rlds_dir", "ground_truth.checkpoint")


def base_config() -> ml_collections.ConfigDict:
  """Every field the pipeline reads, with defaults (configs/video_pretrain.py overrides)."""
  cfg = ml_collections.ConfigDict()
  cfg.seed = 0
  # Every training phase (idm_train, death_train, reward_train, skills_train, world_model,
  # dream) runs data-parallel over a mesh of this many devices (0: all); each phase's batch
  # size is the global batch and must divide by it. (`learner.run` is not read by the
  # pipeline.)
  cfg.run = ml_collections.ConfigDict({"num_devices": 0})
  # The action space the videos were played with: continuous dims, then discrete branches.
  cfg.action = ml_collections.ConfigDict({"continuous_dim": 2, "branches": (4,)})

  cfg.source = ml_collections.ConfigDict()
  cfg.source.video_dir = ""  # "": <workdir>/videos (where ground_truth records)
  # An RLDS dataset (the directory holding its dataset_info.json) that world_model and dream
  # train on instead of <workdir>/episodes (`mbjax.offline.rlds.read_episodes`); "": none.
  cfg.source.rlds_dir = ""
  cfg.source.rlds_split = "train"
  # Our step field → its path in the dataset's steps (e.g. observation=observation/image).
  cfg.source.rlds_fields = ml_collections.ConfigDict(
      {f: f for f in rlds_lib.REQUIRED_FIELDS + rlds_lib.OPTIONAL_FIELDS})

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
  # Videos ("episode": whole, as a recording made while playing) or chunks ("chunk") given
  # their true actions and rewards (idm_train's and the reward model's labelled subset).
  cfg.ground_truth.label_fraction = 0.1
  cfg.ground_truth.label_unit = "episode"

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

  # Behaviour cloning (the VPT recipe): a policy on the frames and actions (IDM or true
  # labels) of the training episodes whose id matches the glob `episodes` (which videos to
  # imitate, e.g. one player's), played in BonkArena by `eval`.
  cfg.bc = _section(bc_lib.BCConfig)
  cfg.bc.steps = 3000
  cfg.bc.batch = 64
  cfg.bc.episodes = "*"
  # With bc.crop_fraction > 0: the locator trains first, for locator_steps on the imitated
  # episodes whose id matches locator_episodes (videos whose camera does not follow the
  # player), on frame pairs locator_gap apart.
  cfg.bc.locator_episodes = "*"
  cfg.bc.locator_steps = 1000
  cfg.bc.locator_gap = 8
  cfg.bc.locator_batch = 32

  # End-of-life classifier: trained on where the videos end, it marks deaths (`terminals`).
  cfg.death = _section(deaths_lib.DeathConfig)
  cfg.death.steps = 2000
  cfg.death.batch = 64
  cfg.death.tolerance = 5  # eval: a death counts as found within this many frames

  # objective "returns" learns from the chunks that carry the game's reward (`game_rewards`);
  # "progress" needs no labels (`mbjax.offline.reward_model`).
  cfg.reward = _section(reward_lib.RewardConfig)
  # returns: the HUD read where it is drawn (flatten, a 4-px stem; an 8-px stem and three
  # layers: held-out BonkArena Spearman 0.32 / 0.56 against 0.41 / 0.62, 15-step windows /
  # episodes), pairs up to 64 frames apart (16: the potential drifted more over an episode),
  # scored 16 frames a piece (the fastest here; docs/experiments/2026-12-06-deaths-and-
  # video-reward.md).
  cfg.reward.update(pool="flatten", stem=4, channels=(32, 64, 64, 64), return_gap=64, lr=1e-3,
                    lr_decay_steps=2000, score_batch=16)
  # progress: deaths (the chunks' `terminals`, from death_label) rank below the life they end.
  cfg.reward.death_window = 30
  cfg.reward.steps = 2000
  cfg.reward.batch = 64
  cfg.reward.scale = 1.0  # rewards = Δprogress × scale (returns: already the game's units)
  cfg.reward.holdout_fraction = 0.2  # of each look's episodes, kept out of reward_train
  # Glob patterns over episode ids (video file stem + "_" + hash): matching episodes are
  # always held out — a source the model never trains on, for an out-of-domain number.
  cfg.reward.holdout_sources = ("atari_*",)

  cfg.export = ml_collections.ConfigDict()
  # embeddings (trained models' features, as upstream's reward-model embedding) | frames.
  # A pixel world model is ~250× slower per step on CPU than one over embeddings (measured
  # 2026-11-26).
  cfg.export.observation = "embeddings"
  # Whose features, side by side (`models.frame_features`): "reward" (the reward model's
  # embedding), "bc" (the behaviour-cloned policy's hidden layer).
  cfg.export.features = ("reward",)
  cfg.export.frame_size = 64  # frames: resized to this square size for the world model
  cfg.export.min_length = 32  # shorter episodes are skipped

  cfg.skills = _section(skills_lib.SkillConfig)  # window 16, stride 8, 256 codes
  cfg.skills.steps = 2000
  cfg.skills.batch = 128

  # The apex learners' sections (world_model, dream, efe, offline, network.squash) as in
  # a training config; the offline phases read only those.
  cfg.learner = learner_config.base_config()
  cfg.learner.efe.enabled = False
  cfg.learner.world_model.update(deter=256, stoch=16, classes=16, hidden=256)
  cfg.learner.replay.update(seq_len=24, burn_in=8)  # windows of 32 ≤ export.min_length
  # The videos' play is all the model knows: the actor also imitates the recorded (IDM-
  # labelled) actions, so it does not leave for states the videos never show, where the
  # predicted reward is wrong (`mbjax.agents.dream`, the behaviour term).
  cfg.learner.dream.bc_scale = 1.0
  # Videos mix good and bad play; `learner.dream.bc_temperature` > 0 imitates each recorded
  # step by how much better its replayed return did than the critic expected (AWR). Off:
  # on BonkArena's 72 mixed videos, temperature 0.01 (cap 100) moved seeds 0 / 1 / 2 from
  # −10.0 / −10.8 / −17.9 to −7.3 / −14.0 / −13.2 (BENCHMARKS.md): no clear gain.
  # Whom the dream actor's behaviour term imitates: "recorded" (the videos' labelled
  # actions) or "bc" (the cloned policy, acting on each replayed step's exported "bc"
  # features: needs "bc" in export.features).
  cfg.dream_teacher = "recorded"
  cfg.world_model_steps = 2000
  cfg.dream_steps = 1000
  cfg.log_every = 100  # updates per jitted chunk / progress line
  # Compile the learner and the dream evaluation for compile speed (`FAST_COMPILE`), at
  # the cost of slower steps: for tiny models (`:debug`), where compiling is most of a phase.
  cfg.fast_compile = False

  cfg.eval = ml_collections.ConfigDict()
  cfg.eval.episodes = 16  # dream-policy episodes played in BonkArena
  # Behaviour-cloned policy, demonstrator and random episodes (the same games for all three),
  # spread over the ground-truth looks.
  cfg.eval.bc_episodes = 128
  cfg.eval.max_steps = 1500
  cfg.eval.speed_bins = (0.05, 0.25)  # player speed (world units / frame) bin edges
  cfg.eval.reward_window = 15  # steps per window when video and true returns are compared
  # Reward probes: games a look of random play and of a constant move into a wall, scored
  # by the reward model (0: none), and their step cap.
  cfg.eval.probe_episodes = 3
  cfg.eval.probe_steps = 600
  return cfg


# What the offline world model sees of a frame (`models.frame_features`), and whom the
# dream actor imitates (`models.dream_teacher`).
EXPORT_FEATURES = ("reward", "bc")
DREAM_TEACHERS = ("recorded", "bc")


def check_choices(cfg: ml_collections.ConfigDict) -> None:
  """`export.features` and `dream_teacher` name things that exist and fit together; raises
  `ConfigError` (the pipeline checks before its first phase)."""
  names = tuple(cfg.export.features)
  unknown = [n for n in names if n not in EXPORT_FEATURES]
  if not names or unknown or len(set(names)) < len(names):
    raise learner_config.ConfigError(f"export.features: {names}: expected distinct names "
                                     f"from {EXPORT_FEATURES}")
  if cfg.dream_teacher not in DREAM_TEACHERS:
    raise learner_config.ConfigError(f"dream_teacher: {cfg.dream_teacher!r}: expected one "
                                     f"of {DREAM_TEACHERS}")
  if cfg.dream_teacher == "bc" and ("bc" not in names or cfg.source.rlds_dir):
    source = (f"an RLDS source ({cfg.source.rlds_dir}) has its own observations"
              if cfg.source.rlds_dir else f"export.features={names} has none (add 'bc')")
    raise learner_config.ConfigError(f"dream_teacher='bc' acts on the cloned policy's "
                                     f"exported features; {source}")


def resolve_paths(cfg: ml_collections.ConfigDict, phases: list[str],
                  base: str | None = None) -> ml_collections.ConfigDict:
  """A copy of `cfg` with its `PATH_FIELDS` made absolute against `base` (default: the
  current directory), after checking that each path the `phases` will read exists, so a
  wrong path fails here, in one line naming the field, not after hours of earlier phases.
  Raises `ConfigError`."""
  base = os.path.abspath(base or os.getcwd())
  resolved = cfg.copy_and_resolve_references()
  for field in PATH_FIELDS:
    section, key = field.split(".")
    if resolved[section][key]:
      resolved[section][key] = os.path.join(base, os.path.expanduser(resolved[section][key]))

  def require(field: str, path: str, what: str, remedy: str) -> None:
    if not path or not os.path.exists(path):
      shown = f"{path} (relative paths are resolved against {base})" if path else "empty"
      raise learner_config.ConfigError(f"{field}: {shown}: expected {what}; {remedy}")

  gt, source = resolved.ground_truth, resolved.source
  # eval plays the checkpoint as the demonstrator when it is what the cloned videos show.
  reads_checkpoint = ("ground_truth" in phases or ("eval" in phases and gt.enabled
                                                   and gt.checkpoint))
  if reads_checkpoint and "checkpoint" in gt.policies:
    require("ground_truth.checkpoint", gt.checkpoint and os.path.join(gt.checkpoint,
                                                                      "config.json"),
            "the workdir of a training run (its config.json) for the 'checkpoint' policy",
            "train one there (make train) or pass --config.ground_truth.checkpoint=<workdir>")
  if source.video_dir and "convert" in phases and "ground_truth" not in phases:
    require("source.video_dir", source.video_dir, "a directory of videos",
            "pass --config.source.video_dir=<your videos>")
  if source.rlds_dir and {"world_model", "dream"} & set(phases):
    require("source.rlds_dir", os.path.join(source.rlds_dir, "dataset_info.json"),
            "an RLDS dataset (its dataset_info.json)", "export one with experiments.export_rlds")
  return resolved


def _section(hyperparameters) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({f.name: f.default
                                    for f in dataclasses.fields(hyperparameters)})


def _model_config(hyperparameters, section: ml_collections.ConfigDict):
  """The dataclass built from the config section's fields of the same names."""
  names = {f.name for f in dataclasses.fields(hyperparameters)}
  return hyperparameters(**{k: (tuple(v) if isinstance(v, (list, tuple)) else v)
                            for k, v in section.items() if k in names})


def idm_config(cfg) -> idm_lib.IDMConfig:
  return _model_config(idm_lib.IDMConfig, cfg.idm)


def bc_config(cfg) -> bc_lib.BCConfig:
  return _model_config(bc_lib.BCConfig, cfg.bc)


def death_config(cfg) -> deaths_lib.DeathConfig:
  return _model_config(deaths_lib.DeathConfig, cfg.death)


def reward_config(cfg) -> reward_lib.RewardConfig:
  return _model_config(reward_lib.RewardConfig, cfg.reward)


def skill_config(cfg) -> skills_lib.SkillConfig:
  return _model_config(skills_lib.SkillConfig, cfg.skills)


def action_spec(cfg) -> HybridActionSpec:
  return HybridActionSpec(continuous_dim=cfg.action.continuous_dim,
                          branches=tuple(cfg.action.branches))


def frame_shape(cfg) -> tuple[int, int, int]:
  return (cfg.convert.size, cfg.convert.size, 3)


def mesh(cfg) -> Mesh:
  try:
    return sharding.make_mesh(cfg.run.num_devices)
  except ValueError as e:
    raise ValueError(f"run.num_devices={cfg.run.num_devices}: {e}") from None


def compiler_options(cfg) -> dict | None:
  return FAST_COMPILE if cfg.fast_compile else None
