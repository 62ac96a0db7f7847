"""Offline entry to the apex learners: the world model, dream and EFE actor-critics trained
from recorded episodes instead of live rollouts, and the trained latent policy played in
an environment.

The same `apex.model_update` the online learner runs on replayed windows is applied to
windows of `replay.burn_in + replay.seq_len` steps sampled uniformly from the concatenated
episodes (a window may cross an episode boundary: `is_first` resets the latent state
there, exactly as in replayed windows). Steps with a rare choice (`spaces.rare_choices`: in
BonkArena a card picked in a menu, a few in a thousand) can be given `offline.rare_fraction`
of the windows, each placed to hold one such step after its burn-in: without them the model
hardly learns what a pick does and the actor never picks. Two phases, as in the offline video pipeline: `train_world_model=True` trains
the model (and, if enabled, the latent policies alongside it); `False` trains the latent
policies against a finished model, which then only supplies posterior start states.

The latent policy acts through the world model's filter: each step, o_t and a_{t−1} update
the posterior s_t and the dream (or EFE) actor picks a_t from s_t's features — so the
policy that is saved and evaluated is the one dream training optimised (upstream saved an
untrained actor).
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import chex
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from mbjax.agents import apex
from mbjax.agents import world_model as wm_lib
from mbjax.envs.spaces import HybridAction, HybridActionSpec, rare_choices
from mbjax.nets.hybrid import to_env_action
from mbjax.train import sharding


class EpisodeData(NamedTuple):
  """All steps of all episodes, concatenated in time: leading axis N.

  `action` is the action taken at observation t (env space: clipped continuous, integer
  branches), `reward[t]` and `terminated[t]` its outcome, `is_first[t]` marks the first
  step of an episode.
  """

  obs: Any  # [N, *obs_shape]: uint8 frames or float vectors
  action: HybridAction  # continuous f32[N, C], discrete i32[N, K]
  reward: Any  # f32[N]
  terminated: Any  # bool[N]
  is_first: Any  # bool[N]
  mask: Any  # bool[N, mask_size]: the allowed choices (all, where episodes do not say)
  rare_index: Any  # i32[R]: the steps whose choice is rare (`spaces.rare_choices`)

  @classmethod
  def concatenate(cls, episodes: list[dict], spec: HybridActionSpec) -> "EpisodeData":
    """Episodes as dicts with `obs`, `action_continuous`, `action_discrete`, `reward`,
    `terminated` and optionally `mask` ([T_i, ...] each) → one EpisodeData, validating
    shapes and values."""
    if not episodes:
      raise ValueError("no episodes to train on")
    parts = {key: [] for key in ("obs", "continuous", "discrete", "reward", "terminated",
                                 "is_first", "mask")}
    for index, episode in enumerate(episodes):
      length = len(episode["reward"])
      name = episode.get("name", f"episode {index}")
      continuous = np.asarray(episode["action_continuous"], np.float32).reshape(
          length, spec.continuous_dim)
      discrete = np.asarray(episode["action_discrete"]).reshape(length, spec.num_branches)
      reward = np.asarray(episode["reward"], np.float32)
      if len(episode["obs"]) != length:
        raise ValueError(f"{name}: {len(episode['obs'])} observations but {length} rewards")
      if not np.all(np.isfinite(reward)) or not np.all(np.isfinite(continuous)):
        raise ValueError(f"{name}: rewards and continuous actions must be finite")
      for branch, size in enumerate(spec.branches):
        if discrete.size and (discrete[:, branch].min() < 0 or discrete[:, branch].max() >= size):
          raise ValueError(f"{name}: discrete branch {branch} outside [0, {size})")
      first = np.zeros(length, bool)
      first[0] = True
      parts["obs"].append(np.asarray(episode["obs"]))
      parts["continuous"].append(continuous)
      parts["discrete"].append(discrete.astype(np.int32))
      parts["reward"].append(reward)
      parts["terminated"].append(np.asarray(episode["terminated"], bool).reshape(length))
      parts["is_first"].append(first)
      mask = episode.get("mask")
      mask = (np.ones((length, spec.mask_size), bool) if mask is None
              else np.asarray(mask, bool).reshape(length, spec.mask_size))
      parts["mask"].append(mask)
    cat = {key: np.concatenate(value) for key, value in parts.items()}
    rare_index = np.flatnonzero(rare_choices(cat["discrete"])).astype(np.int32)
    return cls(cat["obs"], HybridAction(cat["continuous"], cat["discrete"]), cat["reward"],
               cat["terminated"], cat["is_first"], cat["mask"], rare_index)

  @property
  def num_steps(self) -> int:
    return int(self.reward.shape[0])


def sample_windows(data: EpisodeData, key, batch_size: int, length: int,
                   spec: HybridActionSpec, rare_fraction: float = 0.0,
                   burn_in: int = 0) -> wm_lib.Sequence:
  """`batch_size` windows of `length` consecutive steps; returns a world-model Sequence
  [length, batch_size, ...] whose first step is a start. The first round(batch_size ·
  `rare_fraction`) windows (none when no step is rare) each hold a rare step, drawn
  uniformly from `data.rare_index`, at a uniform position in [burn_in, length) (as far as
  the data's ends allow); the rest start uniformly."""
  num_steps = data.reward.shape[0]
  chex.assert_rank(data.reward, 1)
  uniform_key, rare_key, offset_key = jax.random.split(key, 3)
  starts = jax.random.randint(uniform_key, (batch_size,), 0, num_steps - length + 1)
  num_rare = round(batch_size * rare_fraction) if data.rare_index.shape[0] else 0
  if num_rare:
    pick = jax.random.randint(rare_key, (num_rare,), 0, data.rare_index.shape[0])
    rare = jnp.asarray(data.rare_index)[pick]
    offset = jax.random.randint(offset_key, (num_rare,), min(burn_in, length - 1), length)
    starts = starts.at[:num_rare].set(jnp.clip(rare - offset, 0, num_steps - length))
  index = starts[None, :] + jnp.arange(length)[:, None]  # [L, B]
  take = lambda x: jnp.asarray(x)[index]
  action = wm_lib.action_vector(jax.tree.map(take, data.action), spec)
  is_first = take(data.is_first).at[0].set(True)
  return wm_lib.Sequence(take(data.obs), action, take(data.reward), take(data.terminated),
                         is_first, take(data.mask))


@flax.struct.dataclass
class OfflineState:
  aux: apex.AuxState
  key: jax.Array
  step: jax.Array  # learner updates done


class OfflineTrainer(NamedTuple):
  """Pure functions of one offline learner (jit them; `data` is a device-resident input)."""

  init: Callable[[jax.Array], OfflineState]
  update: Callable[..., tuple[OfflineState, dict]]  # (state, data, train_world_model, n)
  learners: apex.Learners
  cfg: ml_collections.ConfigDict


def make_offline_trainer(cfg: ml_collections.ConfigDict, obs_shape: tuple[int, ...], obs_dtype,
                         spec: HybridActionSpec, mesh: Mesh | None = None,
                         config_prefix: str = "",
                         teacher: Callable[[jax.Array, jax.Array, jax.Array], HybridAction]
                         | None = None) -> OfflineTrainer:
  """`cfg` is an experiment config (`mbjax.train.config.base_config`): its world_model,
  dream, efe, replay (window length) and network.squash sections, plus
  `offline.batch_size` windows per update.

  With a `mesh` the update is data-parallel: the `offline.batch_size` windows (the global
  batch) are sampled from the whole dataset with the one key, exactly as on one device, and
  only then split over the `data` axis, so every device count trains on the same windows;
  the caller places the state and the data replicated (`NamedSharding(mesh, P())`) and
  sharding propagation averages the gradients. `config_prefix` is where `cfg` sits in the
  caller's config, for the error when the batch does not divide the device count.

  `teacher(obs [N, ...], mask [N, M], key) -> HybridAction` (env space), where given, is
  what the latent actors' behaviour term imitates on each replayed step instead of the
  recorded action — e.g. a policy cloned from the best of the videos, where the recordings
  mix good play with bad (drawn afresh every update).
  """
  if not cfg.world_model.enabled:
    raise ValueError("offline training needs config.world_model.enabled=True")
  learners = apex.make_learners(cfg, spec, obs_shape)
  length = cfg.replay.burn_in + cfg.replay.seq_len
  batch_size = cfg.offline.batch_size
  # Windows are time-major [L, B, ...]: the batch is axis 1.
  window_sharding = None if mesh is None else sharding.batch_sharding(
      mesh, batch_size, f"{config_prefix}offline.batch_size", axis=1)

  def init(key) -> OfflineState:
    init_key, key = jax.random.split(key)
    return OfflineState(apex.init(init_key, learners, obs_shape, obs_dtype), key,
                        jnp.int32(0))

  def update(state: OfflineState, data: EpisodeData, train_world_model: bool = True,
             num_updates: int = 1):
    """`num_updates` learner steps in one scan; returns (state, metrics of the last)."""

    def one(state, _):
      key, window_key, update_key = jax.random.split(state.key, 3)
      windows = sample_windows(data, window_key, batch_size, length, spec,
                               cfg.offline.rare_fraction, cfg.replay.burn_in)
      if window_sharding is not None:
        windows = jax.lax.with_sharding_constraint(windows, window_sharding)
      behaviour_action = None
      if teacher is not None:
        teacher_key, update_key = jax.random.split(update_key)
        flat = lambda x: x.reshape((-1,) + x.shape[2:])
        action = teacher(flat(windows.obs), flat(windows.mask), teacher_key)
        behaviour_action = wm_lib.action_vector(action, spec).reshape(windows.action.shape)
      aux, metrics = apex.model_update(state.aux, windows, update_key, learners=learners,
                                       train_world_model=train_world_model,
                                       behaviour_action=behaviour_action)
      return OfflineState(aux, key, state.step + 1), metrics

    state, metrics = jax.lax.scan(one, state, None, length=num_updates)
    return state, jax.tree.map(lambda x: x[-1], metrics)

  return OfflineTrainer(init, update, learners, cfg)


def latent_policy(learners: apex.Learners, aux: apex.AuxState, source: str = "dream",
                  deterministic: bool = False, obs_fn: Callable | None = None):
  """(initial_carry(batch), step(carry, obs, is_first, mask, key) -> (carry, env_action))
  for a latent actor (`source`: "dream" or "efe") acting through the world model's filter
  (`apex.latent_act`). `obs_fn` maps the env's observations [B, ...] to what the world model
  was trained on (e.g. frames → the reward model's embeddings); identity by default."""
  if (learners.dream if source == "dream" else learners.efe) is None:
    raise ValueError(f"latent_policy: the {source!r} learner is disabled in this config")

  def initial_carry(batch: int):
    return apex.initial_latent_carry(learners, batch, always=True)

  def step(carry, obs, is_first, mask, key):
    obs = obs if obs_fn is None else obs_fn(obs)
    carry, raw = apex.latent_act(aux, carry, obs, is_first, mask, key, learners=learners,
                                 source=source, deterministic=deterministic)
    return carry, to_env_action(raw, learners.squash)

  return initial_carry, step


def play_latent_policy(env, env_params, learners: apex.Learners, aux: apex.AuxState, key,
                       max_steps: int, source: str = "dream", deterministic: bool = False,
                       obs_fn: Callable | None = None,
                       summed_info: tuple[str, ...] = ()) -> dict[str, jax.Array]:
  """Plays one episode (up to `max_steps`) in a single env → {"return", "length" (steps
  played), and each `summed_info` key of the env's `info` summed over those steps} (e.g.
  BonkArena's `reward_terms`, which shows how a return was made)."""
  initial_carry, policy_step = latent_policy(learners, aux, source, deterministic, obs_fn)
  reset_key, key = jax.random.split(key)
  obs, env_state = env.reset(reset_key, env_params)

  def step(carry, step_key):
    obs, env_state, policy_carry, is_first, alive, totals = carry
    act_key, env_key = jax.random.split(step_key)
    mask = env.action_mask(env_state, env_params)[None]
    policy_carry, action = policy_step(policy_carry, obs[None], is_first, mask, act_key)
    action = jax.tree.map(lambda x: x[0], action)
    obs, env_state, reward, terminated, truncated, info = env.step(env_key, env_state, action,
                                                                   env_params)
    played = {"return": reward, "length": jnp.float32(1.0),
              **{k: info[k].astype(jnp.float32) for k in summed_info}}
    totals = jax.tree.map(lambda total, x: total + jnp.where(alive, x, 0.0), totals, played)
    alive = alive & ~(terminated | truncated)
    return (obs, env_state, policy_carry, jnp.zeros((1,), bool), alive, totals), None

  def first_info():  # the shapes of `info`, traced, never run
    mask = env.action_mask(env_state, env_params)[None]
    _, action = policy_step(initial_carry(1), obs[None], jnp.ones((1,), bool), mask, key)
    return env.step(key, env_state, jax.tree.map(lambda x: x[0], action), env_params)[-1]

  info = jax.eval_shape(first_info)
  totals = {"return": jnp.float32(0.0), "length": jnp.float32(0.0),
            **{k: jnp.zeros(jnp.shape(info[k]), jnp.float32) for k in summed_info}}
  init = (obs, env_state, initial_carry(1), jnp.ones((1,), bool), jnp.bool_(True), totals)
  (_, _, _, _, _, totals), _ = jax.lax.scan(step, init, jax.random.split(key, max_steps))
  return totals
