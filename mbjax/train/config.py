"""The experiment config schema: every field `experiments/train.py` understands, with defaults.

Config files in `configs/` start from `base_config()` and override what they change, so a
field exists in one place and a typo in a file or on the command line fails loudly: the
command line's config is locked, and `validate` refuses a key that `base_config()` does not
have in one of its sections (naming the closest one). `validate` also checks what a type
alone cannot — every numeric field's range (`RANGES`), choices, divisibility — and raises
`ConfigError` naming the offending key and what it expects.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Iterable

import ml_collections

from mbjax.agents import cpqe
from mbjax.envs import registry

# Fields that may differ between a checkpoint's config and the resuming run's: they steer
# logging and saving only, never the numbers a run computes.
RUN_CONTROL_PREFIX = "run."
# Fields that may grow on resume: a finished run is extended by a larger total_env_steps.
EXTENDABLE_FIELDS = ("total_env_steps",)


def core_for_role(role: str) -> str:
  """The default `network.core` of a role: "cfc" for pilot roles, "none" otherwise."""
  return "cfc" if "pilot" in role.lower() else "none"


def base_config() -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict()
  cfg.seed = 0
  # The policy's role name (upstream's policy names). A role containing "pilot" makes CfC
  # the default core, as upstream serves a liquid network to any policy named *pilot*.
  cfg.role = ""
  cfg.num_envs = 4  # global: split evenly over the devices
  # May be raised on resume to extend a run; schedules over the run (ppo.anneal_lr,
  # served.distill_schedule) then stretch to the new length from where the run is.
  cfg.total_env_steps = 500_000

  cfg.env = ml_collections.ConfigDict()
  cfg.env.name = "CartPole-v1"  # see mbjax.envs.registry.names()
  cfg.env.kwargs = ml_collections.ConfigDict()  # constructor arguments of that env
  cfg.env.frame_stack = 1
  cfg.env.reset_fraction = 1.0  # < 1: optimistic resets, see VecEnv
  # The env's rules version (`mbjax.envs.registry.version`), filled in from env.name and
  # recorded with every checkpoint, so one trained under other rules is refused on resume.
  cfg.env.version = cfg.env.get_ref("name")._apply_op(registry.version)

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
  # Entropy bonus on the tanh-squashed action's entropy instead of the pre-squash Gaussian's
  # (network.squash="tanh" only; mbjax.nets.hybrid).
  cfg.ppo.squashed_entropy = False

  cfg.network = ml_collections.ConfigDict()
  cfg.network.hidden_sizes = (64, 64)
  cfg.network.activation = "tanh"
  # none | gru | lstm | cfc | mamba (mbjax.nets.cores). Unless set, it follows `role`:
  # "cfc" for pilot roles, else "none" (a lazily computed ml_collections reference).
  cfg.network.core = cfg.get_ref("role")._apply_op(core_for_role)
  cfg.network.core_size = 128  # core width; Mamba's d_model
  cfg.network.mamba_layers = 2  # Mamba blocks in the core
  cfg.network.ssm_state_size = 16  # Mamba SSM state N per channel
  cfg.network.conv_size = 4  # Mamba causal depthwise conv width
  cfg.network.mamba_expand = 2  # Mamba d_inner = mamba_expand × core_size
  cfg.network.scan_path = "sequential"  # sequential | associative | chunked (same numbers)
  cfg.network.scan_chunk = 16  # time steps per chunk of the chunked scan
  cfg.network.squash = "clip"  # clip | tanh, see mbjax.nets.hybrid
  cfg.network.cfc_mode = "default"  # default | no_gate | pure (ncps's modes, mbjax.nets.cfc)

  # The auxiliary learners run after every PPO update, in this order (mbjax.agents.apex).
  # The model-based learners (mbjax.agents.apex): trained on replayed windows after every
  # rollout, served through `served.policy`.
  cfg.world_model = ml_collections.ConfigDict()
  cfg.world_model.enabled = True  # RSSM trained on replayed windows
  cfg.world_model.deter = 512  # GRU state size
  cfg.world_model.blocks = 8  # block-diagonal GRU groups (DreamerV3); divides deter
  cfg.world_model.stoch = 32  # stochastic latents
  cfg.world_model.classes = 16  # classes per latent; 0: diagonal Gaussian latents (upstream)
  cfg.world_model.hidden = 256  # MLP width of the RSSM, encoder and heads
  # Hidden MLP layers around the GRU (before its input, the prior and the posterior):
  # 1 as DreamerV3; 0 as upstream MetaBonk (linear maps).
  cfg.world_model.rssm_layers = 1
  cfg.world_model.head_layers = 2  # hidden layers of the encoder, decoder and heads
  cfg.world_model.cnn_depth = 16  # pixel observations: channels of the first convolution
  cfg.world_model.min_std = 0.1  # Gaussian latents only
  cfg.world_model.unimix = 0.01  # uniform mixture in categorical latents
  # 1e-3: at 3e-4 the reward head of a small model had not learned a state-and-action
  # dependent reward after 2,000 updates; at 1e-3 it had after 600.
  cfg.world_model.lr = 1e-3
  cfg.world_model.max_grad_norm = 1000.0
  cfg.world_model.free_nats = 1.0  # KL free bits: each KL term is clipped below at this
  cfg.world_model.dyn_scale = 0.5  # KL(sg(posterior) ‖ prior) weight
  cfg.world_model.rep_scale = 0.1  # KL(posterior ‖ sg(prior)) weight
  # Uniform replay of every env step (device-resident, one stream per env; mbjax.data.replay).
  cfg.replay = ml_collections.ConfigDict()
  cfg.replay.capacity = 1_000_000  # env steps over all envs (split evenly between them)
  cfg.replay.batch_size = 16  # windows per model update (global: split over the devices)
  cfg.replay.seq_len = 64  # trained steps per window
  cfg.replay.burn_in = 8  # steps before them that only warm up the latent state
  cfg.replay.train_ratio = 32.0  # replayed (trained) steps per env step
  cfg.replay.prefill = 5_000  # env steps stored (all envs) before the first model update
  # Dream training: a latent actor-critic on imagined rollouts (METABONK_USE_DREAM_TRAINING).
  cfg.dream = _latent_actor_critic(enabled=True)
  # Active Inference: a latent policy minimising expected free energy
  # (METABONK_USE_ACTIVE_INFERENCE); see mbjax.agents.efe. No replayed returns: its reward
  # is not the env's.
  cfg.efe = _latent_actor_critic(enabled=True)
  cfg.efe.replay_scale = 0.0
  cfg.efe.risk_weight = 1.0
  cfg.efe.ambiguity_weight = 0.1
  cfg.efe.preference_quantile = 0.9  # observations of rewards at or above it are preferred
  cfg.efe.preference_rate = 0.05  # EMA rate of the preference mean/variance
  cfg.served = ml_collections.ConfigDict()
  # Who acts: "ppo" (PPO, trained on its own rollouts), "dreamer" (the dream actor through
  # the world model's filter) or "efe" (the Active-Inference actor). PPO learns only when
  # it acts: it is on-policy.
  cfg.served.policy = "ppo"
  # PPO only: KL distillation of the "dream" or "efe" actor into PPO with distill_coef.
  cfg.served.distill_from = "none"
  cfg.served.distill_coef = 0.0
  # "constant", or "linear": the coefficient decays to 0 (as ppo.anneal_lr) at distill_end,
  # the fraction of the run after which distillation is off under either schedule.
  cfg.served.distill_schedule = "constant"
  cfg.served.distill_end = 1.0
  # CPQE (mbjax.agents.cpqe: diffusion teacher, consistency student, Q-ensemble) trained
  # inside the learner on every rollout (upstream METABONK_TRAIN_CPQE); needs continuous
  # action dims. Its other fields are cpqe.default_config()'s.
  cfg.cpqe = cpqe.default_config()
  cfg.cpqe.enabled = False

  # Offline entry (mbjax.train.offline): the learners above trained from recorded episodes.
  cfg.offline = ml_collections.ConfigDict()
  cfg.offline.batch_size = 16  # windows of replay.burn_in + replay.seq_len steps per update
  cfg.offline.rare_fraction = 0.0  # share of the windows placed on a rare choice (a menu pick)

  cfg.run = ml_collections.ConfigDict()
  cfg.run.num_devices = 0  # 0: every local device (Sebulba: its learner's devices)
  cfg.run.actor_device = -1  # Sebulba actors' policy device: -1 host CPU, k: jax.devices()[k]
  cfg.run.log_every_updates = 10  # updates per jitted chunk and per console/metrics line
  cfg.run.checkpoint_every_updates = 50  # a multiple of log_every_updates
  cfg.run.keep_checkpoints = 2
  cfg.run.video_max_frames = 500  # 0 disables the end-of-run video
  cfg.run.video_fps = 30
  # Consecutive updates skipped for non-finite values (mbjax.train.finite) that stop a run
  # with an error; the newest checkpoint then holds the last finite parameters.
  cfg.run.max_nonfinite_updates = 10

  # Sebulba training through the BonkLink bridge (mbjax.train.sebulba); num_envs = games.
  cfg.bridge = ml_collections.ConfigDict()
  cfg.bridge.enabled = False  # True: experiments/train.py runs the Sebulba loop
  cfg.bridge.launch_server = True  # start reference BonkArena servers as a child process
  cfg.bridge.host = "127.0.0.1"
  cfg.bridge.base_port = 5560  # game i on base_port + i (0 with launch_server: any free)
  cfg.bridge.server_mode = "realtime"  # realtime (60 Hz clock) | lockstep (tick per action)
  cfg.bridge.ticks_per_action = 1  # lockstep: game ticks per action (action repeat)
  cfg.bridge.update_hz = 60.0  # METABONK Performance.UpdateHz
  cfg.bridge.frame_hz = 0.0  # frames attached per second (Capture.JpegHz); 0: none
  cfg.bridge.frame_format = "jpeg"  # jpeg | raw (MBRF; Capture.FrameFormat)
  cfg.bridge.pixel_size = 64  # capture size of the reference server's frames
  cfg.bridge.game_time_limit = 1500  # ticks per run on the reference server
  cfg.bridge.max_episode_steps = 1000  # actor-side time limit (truncation)
  cfg.bridge.num_actor_threads = 1  # must divide num_envs
  cfg.bridge.num_obs_enemies = 8  # nearest enemies in the shim's observation
  cfg.bridge.arena_size = 24.0  # world units that map positions to [-1, 1]
  cfg.bridge.distance_reward = 0.0  # weight of the nearest-enemy distance term (bridge.shim)
  cfg.bridge.replay_capacity = 0  # actor replay steps; 0: ppo.num_steps
  cfg.bridge.step_timeout = 2.0  # seconds to wait for a game's next state
  cfg.bridge.reconnect_timeout = 30.0  # seconds a game may stay unreachable
  cfg.bridge.rollout_timeout = 120.0  # seconds the learner waits for an actor's rollout
  cfg.bridge.eval_steps = 0  # after training: trained vs random, steps per game (launched servers)
  return cfg


def _latent_actor_critic(enabled: bool) -> ml_collections.ConfigDict:
  """The settings of a latent actor-critic (mbjax.agents.dream), DreamerV3's where it has
  them."""
  section = ml_collections.ConfigDict()
  section.enabled = enabled
  section.horizon = 15  # imagined steps from every replayed posterior
  section.gamma = 0.99
  section.lambda_ = 0.95
  section.ent_coef = 3e-4
  section.actor_lr = 1e-4
  section.critic_lr = 1e-4
  section.hidden_sizes = (256, 256)
  section.max_grad_norm = 100.0
  section.unimix = 0.01  # uniform mixture in the actor's categorical choices
  section.outscale = 0.01  # the actor's output layer at 1% of the usual init scale
  section.slow_critic_rate = 0.02  # slow critic ← (1 − rate) · slow critic + rate · critic
  section.slow_reg = 1.0  # weight of the critic's pull towards the slow critic
  section.replay_scale = 0.3  # weight of the critic's loss on replayed real returns
  section.return_scale_rate = 0.01  # EMA rate of the 5th–95th percentile return range
  # Weight of −log π(recorded action | replayed state) in the actor's loss: 0 online; the
  # offline pipeline sets it, where the model is only right near the recorded play.
  section.bc_scale = 0.0
  # 0: every recorded step imitated alike. > 0: each weighted by exp(A / temperature),
  # A the replayed λ-return's advantage over the critic (scaled like the actor's), capped
  # at bc_max_weight — advantage-weighted regression, for recordings of mixed quality.
  section.bc_temperature = 0.0
  section.bc_max_weight = 20.0
  return section


class ConfigError(ValueError):
  """A config key or value the schema does not allow; the message names the key."""


@dataclasses.dataclass(frozen=True)
class _Range:
  """The values a numeric field admits: finite, within the bounds, integral if `integer`."""

  low: float | None = None
  high: float | None = None
  low_open: bool = False  # excludes `low`
  high_open: bool = False  # excludes `high`
  integer: bool = False

  def admits(self, value) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      return False
    if self.integer and not isinstance(value, int):
      return False
    if not math.isfinite(value):
      return False
    if self.low is not None and (value <= self.low if self.low_open else value < self.low):
      return False
    return self.high is None or (value < self.high if self.high_open else value <= self.high)

  def describe(self) -> str:
    kind = "an integer" if self.integer else "a finite number"
    if self.low is not None and self.high is not None:
      return (f"{kind} in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}"
              f"{')' if self.high_open else ']'}")
    if self.low is not None:
      return f"{kind} {'>' if self.low_open else '>='} {self.low:g}"
    return kind


_COUNT = _Range(1, integer=True)
_NON_NEGATIVE_INT = _Range(0, integer=True)
_POSITIVE = _Range(0, low_open=True)
_NON_NEGATIVE = _Range(0)
_FRACTION = _Range(0, 1)
_DISCOUNT = _Range(0, 1, low_open=True)
_RATE = _Range(0, 1, low_open=True)  # an update rate: 0 would never move
_FINITE = _Range()


def _latent_actor_critic_ranges(name: str) -> dict:
  return {f"{name}.horizon": _COUNT, f"{name}.gamma": _DISCOUNT,
          f"{name}.lambda_": _FRACTION, f"{name}.ent_coef": _NON_NEGATIVE,
          f"{name}.actor_lr": _POSITIVE, f"{name}.critic_lr": _POSITIVE,
          f"{name}.hidden_sizes": _COUNT, f"{name}.max_grad_norm": _POSITIVE,
          f"{name}.unimix": _Range(0, 1, high_open=True), f"{name}.outscale": _POSITIVE,
          f"{name}.slow_critic_rate": _RATE, f"{name}.slow_reg": _NON_NEGATIVE,
          f"{name}.replay_scale": _NON_NEGATIVE, f"{name}.return_scale_rate": _RATE,
          f"{name}.bc_scale": _NON_NEGATIVE, f"{name}.bc_temperature": _NON_NEGATIVE,
          f"{name}.bc_max_weight": _POSITIVE}


# Every numeric field of `base_config()` and what it admits (a tuple: each element).
RANGES = {
    "seed": _Range(integer=True), "num_envs": _COUNT, "total_env_steps": _COUNT,
    "env.frame_stack": _COUNT, "env.reset_fraction": _Range(0, 1, low_open=True),
    "ppo.num_steps": _COUNT, "ppo.lr": _POSITIVE, "ppo.gamma": _DISCOUNT,
    "ppo.gae_lambda": _FRACTION, "ppo.clip_eps": _POSITIVE, "ppo.ent_coef": _NON_NEGATIVE,
    "ppo.vf_coef": _NON_NEGATIVE, "ppo.max_grad_norm": _POSITIVE, "ppo.update_epochs": _COUNT,
    "ppo.num_minibatches": _COUNT, "ppo.seq_len": _COUNT,
    "network.hidden_sizes": _COUNT, "network.core_size": _COUNT,
    "network.mamba_layers": _COUNT, "network.ssm_state_size": _COUNT,
    "network.conv_size": _COUNT, "network.mamba_expand": _COUNT, "network.scan_chunk": _COUNT,
    "world_model.deter": _COUNT, "world_model.blocks": _COUNT, "world_model.stoch": _COUNT,
    "world_model.classes": _NON_NEGATIVE_INT, "world_model.hidden": _COUNT,
    "world_model.rssm_layers": _NON_NEGATIVE_INT, "world_model.head_layers": _COUNT,
    "world_model.cnn_depth": _COUNT, "world_model.min_std": _POSITIVE,
    "world_model.unimix": _FRACTION, "world_model.lr": _POSITIVE,
    "world_model.max_grad_norm": _POSITIVE, "world_model.free_nats": _NON_NEGATIVE,
    "world_model.dyn_scale": _NON_NEGATIVE, "world_model.rep_scale": _NON_NEGATIVE,
    "replay.capacity": _COUNT, "replay.batch_size": _COUNT, "replay.seq_len": _COUNT,
    "replay.burn_in": _NON_NEGATIVE_INT, "replay.train_ratio": _POSITIVE,
    "replay.prefill": _NON_NEGATIVE_INT,
    **_latent_actor_critic_ranges("dream"), **_latent_actor_critic_ranges("efe"),
    "efe.risk_weight": _NON_NEGATIVE, "efe.ambiguity_weight": _NON_NEGATIVE,
    "efe.preference_quantile": _FRACTION, "efe.preference_rate": _RATE,
    "served.distill_coef": _NON_NEGATIVE, "served.distill_end": _Range(0, 1, low_open=True),
    "cpqe.horizon": _COUNT, "cpqe.sigma_min": _POSITIVE, "cpqe.sigma_max": _POSITIVE,
    "cpqe.sigma_data": _POSITIVE, "cpqe.rho": _POSITIVE, "cpqe.p_mean": _FINITE,
    "cpqe.p_std": _POSITIVE, "cpqe.teacher_steps": _COUNT,
    "cpqe.distill_levels": _Range(2, integer=True), "cpqe.student_steps": _COUNT,
    "cpqe.ema_decay": _FRACTION, "cpqe.hidden": _COUNT, "cpqe.layers": _COUNT,
    "cpqe.lr": _POSITIVE, "cpqe.max_grad_norm": _POSITIVE, "cpqe.num_q": _COUNT,
    "cpqe.q_hidden": _COUNT, "cpqe.q_lr": _POSITIVE, "cpqe.gamma": _DISCOUNT,
    "cpqe.q_target_rate": _RATE, "cpqe.num_samples": _COUNT, "cpqe.beta": _FINITE,
    "cpqe.batch_size": _COUNT,
    "offline.batch_size": _COUNT, "offline.rare_fraction": _FRACTION,
    "run.num_devices": _NON_NEGATIVE_INT, "run.actor_device": _Range(-1, integer=True),
    "run.log_every_updates": _COUNT, "run.checkpoint_every_updates": _COUNT,
    "run.keep_checkpoints": _COUNT, "run.video_max_frames": _NON_NEGATIVE_INT,
    "run.video_fps": _COUNT, "run.max_nonfinite_updates": _COUNT,
    "bridge.base_port": _Range(0, 65535, integer=True), "bridge.ticks_per_action": _COUNT,
    "bridge.update_hz": _POSITIVE, "bridge.frame_hz": _NON_NEGATIVE,
    "bridge.pixel_size": _COUNT, "bridge.game_time_limit": _COUNT,
    "bridge.max_episode_steps": _COUNT, "bridge.num_actor_threads": _COUNT,
    "bridge.num_obs_enemies": _COUNT, "bridge.arena_size": _POSITIVE,
    "bridge.distance_reward": _FINITE, "bridge.replay_capacity": _NON_NEGATIVE_INT,
    "bridge.step_timeout": _POSITIVE, "bridge.reconnect_timeout": _POSITIVE,
    "bridge.rollout_timeout": _POSITIVE, "bridge.eval_steps": _NON_NEGATIVE_INT,
}
# Keys under these prefixes are free-form (an environment's constructor arguments).
_FREE_FORM = ("env.kwargs.",)


def closest_key(key: str, known: Iterable[str]) -> str | None:
  """The known dotted key closest to a misspelt `key`, if any is close: among the keys of its
  own section when that section exists (a shared long prefix would make anything look
  close), else among all."""
  known = list(known)
  section, _, name = key.rpartition(".")
  siblings = [k.rpartition(".")[2] for k in known if k.rpartition(".")[0] == section]
  if siblings:
    matches = difflib.get_close_matches(name, siblings, n=1, cutoff=0.6)
    return f"{section}.{matches[0]}".lstrip(".") if matches else None
  matches = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
  return matches[0] if matches else None


def _check_keys(cfg: ml_collections.ConfigDict) -> None:
  """Refuses keys that base_config() lacks inside its own sections (and top-level values
  it lacks); sections it does not have belong to extensions (e.g. `population`)."""
  base = base_config()
  known = flatten(base)
  for name, value in cfg.items():
    if name not in base and isinstance(value, ml_collections.ConfigDict):
      continue
    for key in flatten({name: value.to_dict()} if isinstance(value, ml_collections.ConfigDict)
                       else {name: value}):
      if key not in known and not key.startswith(_FREE_FORM):
        suggestion = closest_key(key, known)
        raise ConfigError(f"config.{key}: unknown key" + (
            f"; did you mean config.{suggestion}?" if suggestion else
            f"; expected one of the keys of mbjax.train.config.base_config()"))


def _check_ranges(cfg: ml_collections.ConfigDict) -> None:
  for key, rule in RANGES.items():
    value = _get(cfg, key)
    values = value if isinstance(value, (tuple, list)) else (value,)
    if not all(rule.admits(v) for v in values):
      each = " (each element)" if isinstance(value, (tuple, list)) else ""
      raise ConfigError(f"config.{key}={value!r}: expected {rule.describe()}{each}")


_CHOICES = {
    "network.core": ("none", "gru", "lstm", "cfc", "mamba"),
    "network.scan_path": ("sequential", "associative", "chunked"),
    "network.squash": ("clip", "tanh"),
    "network.cfc_mode": ("default", "no_gate", "pure"),
    "network.activation": ("tanh", "relu", "silu", "elu"),
    "served.policy": ("ppo", "dreamer", "efe"),
    "served.distill_from": ("none", "dream", "efe"),
    "served.distill_schedule": ("constant", "linear"),
}


def validate(cfg: ml_collections.ConfigDict) -> None:
  """Raises ConfigError (a ValueError) naming the first invalid key or value."""
  _check_keys(cfg)
  _check_ranges(cfg)
  for key, choices in _CHOICES.items():
    section, field = key.split(".")
    value = cfg[section][field]
    if value not in choices:
      raise ConfigError(f"config.{key}={value!r}: expected one of {choices}")
  if cfg.run.checkpoint_every_updates % cfg.run.log_every_updates:
    raise ConfigError(
        f"config.run.checkpoint_every_updates={cfg.run.checkpoint_every_updates} must be a "
        f"multiple of config.run.log_every_updates={cfg.run.log_every_updates}")
  if cfg.cpqe.sigma_min >= cfg.cpqe.sigma_max:
    raise ConfigError(f"config.cpqe.sigma_min={cfg.cpqe.sigma_min} must be below "
                      f"config.cpqe.sigma_max={cfg.cpqe.sigma_max}")
  check_env_version(cfg)
  if cfg.ppo.squashed_entropy and cfg.network.squash != "tanh":
    raise ConfigError("config.ppo.squashed_entropy=True: expected config.network.squash='tanh'"
                      f", got {cfg.network.squash!r}")
  steps = cfg.ppo.num_steps
  seq_len = cfg.ppo.seq_len if cfg.network.core != "none" else 1
  if steps % seq_len or (steps // seq_len) % cfg.ppo.num_minibatches:
    raise ConfigError(
        f"config.ppo.num_minibatches={cfg.ppo.num_minibatches}: the rollout's "
        f"{steps // seq_len} chunks of length {seq_len} (ppo.num_steps / ppo.seq_len) must "
        "split evenly into minibatches")
  _validate_apex(cfg)
  _validate_bridge(cfg)


def check_env_version(cfg: ml_collections.ConfigDict | dict, source: str = "config") -> None:
  """Raises ConfigError unless `cfg` (a config, or one read back from a run's config.json)
  names the rules version of its env that this code implements. A config written before
  versions were recorded counts as version "1" for a versioned env."""
  env = cfg["env"]
  implemented = registry.version(env["name"])
  recorded = env.get("version", "1" if implemented else "")
  if recorded != implemented:
    raise ConfigError(
        f"{source}: env.version={recorded!r}, but {env['name']!r} here implements rules "
        f"version {implemented!r}; returns under other rules are not comparable (retrain, "
        "or evaluate with the code of that version)")


def _validate_apex(cfg: ml_collections.ConfigDict) -> None:
  if not cfg.world_model.enabled:
    for name in ("dream", "efe"):
      if cfg[name].enabled:
        raise ConfigError(f"config.{name}.enabled=True needs config.world_model.enabled=True")
  served = cfg.served.policy
  needs = {"dreamer": "dream", "efe": "efe"}.get(served)
  if needs and not cfg[needs].enabled:
    raise ConfigError(f"config.served.policy={served!r} needs config.{needs}.enabled=True")
  if cfg.world_model.enabled:
    r = cfg.replay
    per_env = r.capacity // cfg.num_envs
    if per_env < r.burn_in + r.seq_len:
      raise ConfigError(
          f"config.replay.capacity={r.capacity}: {per_env} steps per env (over num_envs="
          f"{cfg.num_envs}) cannot hold one window of replay.burn_in + replay.seq_len = "
          f"{r.burn_in + r.seq_len} steps")
    if cfg.world_model.deter % cfg.world_model.blocks:
      raise ConfigError(f"config.world_model.blocks={cfg.world_model.blocks} must divide "
                       f"config.world_model.deter={cfg.world_model.deter}")
  source = cfg.served.distill_from
  if source != "none":
    if not cfg[source].enabled:
      raise ConfigError(f"config.served.distill_from={source!r} needs config.{source}.enabled")
    if served != "ppo":
      raise ConfigError(f"config.served.distill_from={source!r} distils into PPO, which "
                       f"learns only when it acts; config.served.policy={served!r}")


def _validate_bridge(cfg: ml_collections.ConfigDict) -> None:
  b = cfg.bridge
  for key, choices in (("server_mode", ("realtime", "lockstep")),
                       ("frame_format", ("jpeg", "raw"))):
    if b[key] not in choices:
      raise ConfigError(f"config.bridge.{key}={b[key]!r}: expected one of {choices}")
  if b.enabled and cfg.num_envs % b.num_actor_threads:
    raise ConfigError(f"config.bridge.num_actor_threads={b.num_actor_threads} must divide "
                     f"config.num_envs={cfg.num_envs}")


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
  """Fields (outside `run.*`) whose values differ between a checkpoint and this run, but for
  `EXTENDABLE_FIELDS` grown by this run.

  A field missing from either config counts as its `base_config()` default: fields are
  added with defaults that keep the earlier behaviour, so an older checkpoint still resumes
  unless the run changes a new field."""
  defaults = flatten(base_config())
  old, new = {**defaults, **flatten(saved)}, {**defaults, **flatten(current)}
  keys = sorted(set(old) | set(new))
  differences = []
  for k in keys:
    if k.startswith(RUN_CONTROL_PREFIX) or old.get(k) == new.get(k):
      continue
    line = f"{k}: checkpoint {old.get(k, '<absent>')!r} vs now {new.get(k, '<absent>')!r}"
    if k in EXTENDABLE_FIELDS:
      if new[k] > old[k]:
        continue
      line += " (a run can be extended, not shortened)"
    differences.append(line)
  return differences
