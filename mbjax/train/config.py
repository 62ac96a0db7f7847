"""The experiment config schema: every field `experiments/train.py` understands, with defaults.

Config files in `configs/` start from `base_config()` and override what they change, so a
field exists in one place and a typo in a file or on the command line fails loudly (the
config is locked; ml_collections names the unknown key). `validate` checks values that a
type alone cannot (choices, divisibility) and names the offending key.
"""
from __future__ import annotations

import ml_collections

# Fields that may differ between a checkpoint's config and the resuming run's: they steer
# logging and saving only, never the numbers a run computes.
RUN_CONTROL_PREFIX = "run."


def base_config() -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict()
  cfg.seed = 0
  cfg.num_envs = 4  # global: split evenly over the devices
  cfg.total_env_steps = 500_000

  cfg.env = ml_collections.ConfigDict()
  cfg.env.name = "CartPole-v1"  # see mbjax.envs.registry.names()
  cfg.env.kwargs = ml_collections.ConfigDict()  # constructor arguments of that env
  cfg.env.frame_stack = 1
  cfg.env.reset_fraction = 1.0  # < 1: optimistic resets, see VecEnv

  cfg.ppo = ml_collections.ConfigDict()
  cfg.ppo.num_steps = 128  # rollout length per env per update
  cfg.ppo.lr = 2.5e-4
  cfg.ppo.anneal_lr = True  # linear decay to 0 over the run
  cfg.ppo.gamma = 0.99
  cfg.ppo.gae_lambda = 0.95
  cfg.ppo.clip_eps = 0.2
  cfg.ppo.ent_coef = 0.01
  cfg.ppo.vf_coef = 0.5
  cfg.ppo.clip_value_loss = True
  cfg.ppo.max_grad_norm = 0.5
  cfg.ppo.update_epochs = 4
  cfg.ppo.num_minibatches = 4
  cfg.ppo.normalize_advantages = True
  cfg.ppo.normalize_observations = False  # running mean/std of vector observations
  cfg.ppo.seq_len = 16  # BPTT chunk length for recurrent cores

  cfg.network = ml_collections.ConfigDict()
  cfg.network.hidden_sizes = (64, 64)
  cfg.network.activation = "tanh"
  cfg.network.core = "none"  # none | gru | lstm
  cfg.network.core_size = 128
  cfg.network.squash = "clip"  # clip | tanh, see mbjax.nets.hybrid

  cfg.run = ml_collections.ConfigDict()
  cfg.run.num_devices = 0  # 0: every local device
  cfg.run.log_every_updates = 10  # updates per jitted chunk and per console/metrics line
  cfg.run.checkpoint_every_updates = 50  # a multiple of log_every_updates
  cfg.run.keep_checkpoints = 2
  cfg.run.video_max_frames = 500  # 0 disables the end-of-run video
  cfg.run.video_fps = 30
  return cfg


_CHOICES = {
    "network.core": ("none", "gru", "lstm"),
    "network.squash": ("clip", "tanh"),
    "network.activation": ("tanh", "relu", "silu", "elu"),
}


def validate(cfg: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first invalid field."""
  for key, choices in _CHOICES.items():
    section, field = key.split(".")
    value = cfg[section][field]
    if value not in choices:
      raise ValueError(f"config.{key}={value!r}: expected one of {choices}")
  positive = ("num_envs", "total_env_steps", "ppo.num_steps", "ppo.update_epochs",
              "ppo.num_minibatches", "ppo.seq_len", "run.log_every_updates",
              "run.checkpoint_every_updates", "env.frame_stack")
  for key in positive:
    value = _get(cfg, key)
    if value < 1:
      raise ValueError(f"config.{key}={value}: expected a positive integer")
  if cfg.run.checkpoint_every_updates % cfg.run.log_every_updates:
    raise ValueError(
        f"config.run.checkpoint_every_updates={cfg.run.checkpoint_every_updates} must be a "
        f"multiple of config.run.log_every_updates={cfg.run.log_every_updates}")
  if not 0.0 < cfg.env.reset_fraction <= 1.0:
    raise ValueError(f"config.env.reset_fraction={cfg.env.reset_fraction}: expected (0, 1]")
  steps = cfg.ppo.num_steps
  seq_len = cfg.ppo.seq_len if cfg.network.core != "none" else 1
  if steps % seq_len or (steps // seq_len) % cfg.ppo.num_minibatches:
    raise ValueError(
        f"config.ppo.num_minibatches={cfg.ppo.num_minibatches}: the rollout's "
        f"{steps // seq_len} chunks of length {seq_len} (ppo.num_steps / ppo.seq_len) must "
        "split evenly into minibatches")


def _get(cfg, dotted: str):
  for part in dotted.split("."):
    cfg = cfg[part]
  return cfg


def flatten(cfg: ml_collections.ConfigDict | dict, prefix: str = "") -> dict:
  """{"a.b": value} view of a (nested) config, for comparisons and hyperparameter logs."""
  items = cfg.items() if isinstance(cfg, dict) else cfg.to_dict().items()
  flat = {}
  for key, value in items:
    if isinstance(value, dict):
      flat.update(flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
  return flat


def incompatible_fields(saved: dict, current: ml_collections.ConfigDict) -> list[str]:
  """Fields (outside `run.*`) whose values differ between a checkpoint and this run."""
  old, new = flatten(saved), flatten(current)
  keys = sorted(set(old) | set(new))
  return [f"{k}: checkpoint {old.get(k, '<absent>')!r} vs now {new.get(k, '<absent>')!r}"
          for k in keys if not k.startswith(RUN_CONTROL_PREFIX) and old.get(k) != new.get(k)]
