"""The experiment config schema: every field `experiments/train.py` understands, with defaults.

Config files in `configs/` start from `base_config()` and override what they change, so a
field exists in one place and a typo in a file or on the command line fails loudly (the
config is locked; ml_collections names the unknown key). `validate` checks values that a
type alone cannot (choices, divisibility) and names the offending key.
"""
from __future__ import annotations

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
  cfg.world_model = ml_collections.ConfigDict()
  cfg.world_model.enabled = True  # RSSM trained on every rollout
  cfg.world_model.seq_len = 32  # training window length; divides ppo.num_steps
  cfg.world_model.deter = 512  # GRU state size
  cfg.world_model.stoch = 32  # stochastic latents
  cfg.world_model.classes = 32  # classes per latent; 0: diagonal Gaussian latents (upstream)
  cfg.world_model.hidden = 512
  # Hidden MLP layers around the GRU (before its input, the prior and the posterior):
  # 1 as DreamerV3; 0 as upstream MetaBonk (linear maps).
  cfg.world_model.rssm_layers = 1
  cfg.world_model.head_layers = 2  # hidden layers of the decoder, reward and continue heads
  cfg.world_model.min_std = 0.1  # Gaussian latents only
  cfg.world_model.unimix = 0.01  # uniform mixture in categorical latents
  cfg.world_model.lr = 3e-4
  cfg.world_model.lr_decay_updates = 0  # > 0: cosine decay of lr to 0 over that many updates
  cfg.world_model.max_grad_norm = 1000.0
  cfg.world_model.free_nats = 1.0
  # Vectors: a head trained on symlog(o_{t+1}) − symlog(o_t) from o_t and a_t (the one-step
  # prediction adds it to o_t); off, the one-step prediction decodes the prior after a_t.
  cfg.world_model.predict_delta = False
  # ((start, slots, features per slot, sort feature), ...): slot lists (presence first,
  # sorted by the sort feature) whose delta comes entity by entity, re-sorted
  # (mbjax.agents.world_model.EntityDeltaHead); BonkArena's (`BonkArena.world_model_slots()`,
  # set by configs/arena_apex.py): ((16, 5, 8, 3), (59, 3, 4, 3)).
  cfg.world_model.entity_slots = ()
  # (start, scale) of the agent's position in the observation (a change of `scale` in it is
  # 1 in the slots' relative units): entities move in polar coordinates around the agent's
  # predicted next position. () off; BonkArena's: (0, 2.0) (`BonkArena.world_model_slots()`
  # says why).
  cfg.world_model.agent_position = ()
  # Width of the entity head's MLPs. They run once per slot and step, so their width is
  # most of the head's cost; on BonkArena 128 learns as well as 256 in less time
  # (BENCHMARKS.md "World model").
  cfg.world_model.entity_width = 128
  cfg.world_model.dyn_scale = 0.5  # KL(sg(posterior) ‖ prior) weight
  cfg.world_model.rep_scale = 0.1  # KL(posterior ‖ sg(prior)) weight
  # Dream training: a latent actor-critic on imagined rollouts (METABONK_USE_DREAM_TRAINING).
  cfg.dream = _latent_actor_critic(enabled=True)
  # Active Inference: a latent policy minimising expected free energy
  # (METABONK_USE_ACTIVE_INFERENCE); see mbjax.agents.efe.
  cfg.efe = _latent_actor_critic(enabled=True)
  cfg.efe.risk_weight = 1.0
  cfg.efe.ambiguity_weight = 0.1
  cfg.efe.preference_quantile = 0.9  # observations of rewards at or above it are preferred
  cfg.efe.preference_rate = 0.05  # EMA rate of the preference mean/variance
  # How the latent policies shape the served (PPO) policy: "none", or KL distillation of
  # the "dream" or "efe" actor into PPO with distill_coef.
  cfg.served = ml_collections.ConfigDict()
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
  cfg.offline.batch_size = 16  # windows of world_model.seq_len steps per update

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
  section = ml_collections.ConfigDict()
  section.enabled = enabled
  section.horizon = 15  # imagined steps
  section.num_starts = 256  # posterior start states per update (sampled per device)
  section.gamma = 0.99
  section.lambda_ = 0.95
  section.ent_coef = 3e-4
  section.actor_lr = 3e-5
  section.critic_lr = 3e-5
  section.hidden_sizes = (256, 256)
  section.max_grad_norm = 100.0
  section.target_update_rate = 0.02  # slow critic: target ← (1−rate)·target + rate·critic
  section.return_scale_decay = 0.99  # EMA of the 5th–95th percentile return range
  return section


_CHOICES = {
    "network.core": ("none", "gru", "lstm", "cfc", "mamba"),
    "network.scan_path": ("sequential", "associative", "chunked"),
    "network.squash": ("clip", "tanh"),
    "network.cfc_mode": ("default", "no_gate", "pure"),
    "network.activation": ("tanh", "relu", "silu", "elu"),
    "served.distill_from": ("none", "dream", "efe"),
    "served.distill_schedule": ("constant", "linear"),
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
              "run.checkpoint_every_updates", "env.frame_stack", "network.mamba_layers",
              "network.ssm_state_size", "network.conv_size", "network.mamba_expand",
              "network.scan_chunk", "cpqe.horizon", "cpqe.batch_size",
              "world_model.head_layers", "run.max_nonfinite_updates")
  for key in positive:
    value = _get(cfg, key)
    if value < 1:
      raise ValueError(f"config.{key}={value}: expected a positive integer")
  if cfg.world_model.rssm_layers < 0:
    raise ValueError(f"config.world_model.rssm_layers={cfg.world_model.rssm_layers}: "
                     "expected 0 (linear maps, as upstream) or more hidden layers")
  if cfg.run.checkpoint_every_updates % cfg.run.log_every_updates:
    raise ValueError(
        f"config.run.checkpoint_every_updates={cfg.run.checkpoint_every_updates} must be a "
        f"multiple of config.run.log_every_updates={cfg.run.log_every_updates}")
  check_env_version(cfg)
  if not 0.0 < cfg.env.reset_fraction <= 1.0:
    raise ValueError(f"config.env.reset_fraction={cfg.env.reset_fraction}: expected (0, 1]")
  if cfg.ppo.squashed_entropy and cfg.network.squash != "tanh":
    raise ValueError("config.ppo.squashed_entropy=True: expected config.network.squash='tanh'"
                     f", got {cfg.network.squash!r}")
  steps = cfg.ppo.num_steps
  seq_len = cfg.ppo.seq_len if cfg.network.core != "none" else 1
  if steps % seq_len or (steps // seq_len) % cfg.ppo.num_minibatches:
    raise ValueError(
        f"config.ppo.num_minibatches={cfg.ppo.num_minibatches}: the rollout's "
        f"{steps // seq_len} chunks of length {seq_len} (ppo.num_steps / ppo.seq_len) must "
        "split evenly into minibatches")
  _validate_apex(cfg)
  _validate_bridge(cfg)


def check_env_version(cfg: ml_collections.ConfigDict | dict, source: str = "config") -> None:
  """Raises ValueError unless `cfg` (a config, or one read back from a run's config.json)
  names the rules version of its env that this code implements. A config written before
  versions were recorded counts as version "1" for a versioned env."""
  env = cfg["env"]
  implemented = registry.version(env["name"])
  recorded = env.get("version", "1" if implemented else "")
  if recorded != implemented:
    raise ValueError(
        f"{source}: env.version={recorded!r}, but {env['name']!r} here implements rules "
        f"version {implemented!r}; returns under other rules are not comparable (retrain, "
        "or evaluate with the code of that version)")


def _validate_apex(cfg: ml_collections.ConfigDict) -> None:
  if not cfg.world_model.enabled:
    for name in ("dream", "efe"):
      if cfg[name].enabled:
        raise ValueError(f"config.{name}.enabled=True needs config.world_model.enabled=True")
  if cfg.world_model.enabled and cfg.ppo.num_steps % cfg.world_model.seq_len:
    raise ValueError(f"config.world_model.seq_len={cfg.world_model.seq_len} must divide "
                     f"config.ppo.num_steps={cfg.ppo.num_steps}")
  if not 0.0 < cfg.served.distill_end <= 1.0:
    raise ValueError(f"config.served.distill_end={cfg.served.distill_end}: expected a "
                     "fraction of the run in (0, 1]")
  source = cfg.served.distill_from
  if source != "none" and not cfg[source].enabled:
    raise ValueError(f"config.served.distill_from={source!r} needs config.{source}.enabled")


def _validate_bridge(cfg: ml_collections.ConfigDict) -> None:
  b = cfg.bridge
  for key, choices in (("server_mode", ("realtime", "lockstep")),
                       ("frame_format", ("jpeg", "raw"))):
    if b[key] not in choices:
      raise ValueError(f"config.bridge.{key}={b[key]!r}: expected one of {choices}")
  for key in ("num_actor_threads", "num_obs_enemies", "max_episode_steps", "pixel_size"):
    if b[key] < 1:
      raise ValueError(f"config.bridge.{key}={b[key]}: expected a positive integer")
  if b.enabled and cfg.num_envs % b.num_actor_threads:
    raise ValueError(f"config.bridge.num_actor_threads={b.num_actor_threads} must divide "
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
