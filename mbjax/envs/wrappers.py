"""Environment wrappers: episode statistics, observation stacking, batching with auto-reset.

Single-env wrappers (`EpisodeStatistics`, `FrameStack`) keep the `Environment` interface and
wrap their inner state in a small pytree. `VecEnv` batches an environment over a leading env
axis and resets finished episodes; it is the only place where auto-reset happens.
"""
from __future__ import annotations

import math
from typing import Any

import chex
import flax.struct
import jax
import jax.numpy as jnp

from mbjax.envs.base import Environment, StepResult
from mbjax.envs.spaces import HybridAction


class Wrapper(Environment):
  """Forwards everything to `env`; subclasses override what they change."""

  def __init__(self, env: Environment):
    self.env = env

  @property
  def name(self) -> str:
    return self.env.name

  def default_params(self):
    return self.env.default_params()

  def observation_shape(self, params):
    return self.env.observation_shape(params)

  def observation_dtype(self, params):
    return self.env.observation_dtype(params)

  def action_spec(self, params):
    return self.env.action_spec(params)

  def action_mask(self, state, params):
    return self.env.action_mask(state.env_state, params)

  def render(self, state, params):
    return self.env.render(state.env_state, params)


def unwrapped(env: Environment) -> Environment:
  while isinstance(env, Wrapper):
    env = env.env
  return env


def can_render(env: Environment) -> bool:
  return callable(getattr(unwrapped(env), "render", None))


@flax.struct.dataclass
class EpisodeStatisticsState:
  env_state: Any
  episode_return: jax.Array  # f32[], return so far in this episode
  episode_length: jax.Array  # i32[]


class EpisodeStatistics(Wrapper):
  """Adds `info["episode_return"]` and `info["episode_length"]`: the running totals after
  this step. On a step where the episode ends they are the episode's final totals."""

  def reset(self, key, params):
    obs, env_state = self.env.reset(key, params)
    return obs, EpisodeStatisticsState(env_state, jnp.float32(0.0), jnp.int32(0))

  def step(self, key, state, action, params) -> StepResult:
    obs, env_state, reward, terminated, truncated, info = self.env.step(
        key, state.env_state, action, params)
    episode_return = state.episode_return + reward
    episode_length = state.episode_length + 1
    info = dict(info, episode_return=episode_return, episode_length=episode_length)
    new_state = EpisodeStatisticsState(env_state, episode_return, episode_length)
    return obs, new_state, reward, terminated, truncated, info


@flax.struct.dataclass
class FrameStackState:
  env_state: Any
  frames: jax.Array  # [num_frames, *obs_shape], oldest first


class FrameStack(Wrapper):
  """Concatenates the last `num_frames` observations along the last axis (channels for
  pixels, features for vectors). A new episode starts with its first frame repeated."""

  def __init__(self, env: Environment, num_frames: int):
    super().__init__(env)
    if num_frames < 1:
      raise ValueError(f"FrameStack needs num_frames >= 1, got {num_frames}")
    self.num_frames = num_frames

  def observation_shape(self, params):
    shape = self.env.observation_shape(params)
    return shape[:-1] + (shape[-1] * self.num_frames,)

  def _stacked(self, frames):
    return jnp.concatenate(list(frames), axis=-1)

  def reset(self, key, params):
    obs, env_state = self.env.reset(key, params)
    frames = jnp.repeat(obs[None], self.num_frames, axis=0)
    return self._stacked(frames), FrameStackState(env_state, frames)

  def step(self, key, state, action, params) -> StepResult:
    obs, env_state, reward, terminated, truncated, info = self.env.step(
        key, state.env_state, action, params)
    frames = jnp.concatenate([state.frames[1:], obs[None]], axis=0)
    return (self._stacked(frames), FrameStackState(env_state, frames), reward, terminated,
            truncated, info)


class VecEnv:
  """A batch of `env` copies along a leading axis, with auto-reset.

  Every env gets its own key each call, so a batch's trajectory does not depend on how the
  batch is split across devices. After a step, finished envs (terminated or truncated) are
  replaced by fresh episodes: the returned `obs`/`state` are the reset ones and
  `info["final_obs"]` keeps the last observation of the finished episode, for bootstrapping
  on truncation.

  `reset_fraction` < 1 turns on optimistic resets (Craftax-style): only
  `ceil(reset_fraction * num_envs)` fresh episodes are generated per step and shared among
  the envs that finished, which keeps expensive resets from dominating a vmapped step. Two
  envs finishing on the same step may then start from the same initial state. With the
  default 1.0 every env gets its own fresh episode.
  """

  def __init__(self, env: Environment, reset_fraction: float = 1.0):
    if not 0.0 < reset_fraction <= 1.0:
      raise ValueError(f"reset_fraction must be in (0, 1], got {reset_fraction}")
    self.env = env
    self.reset_fraction = reset_fraction

  def reset(self, keys: jax.Array, params) -> tuple[jax.Array, Any]:
    return jax.vmap(self.env.reset, in_axes=(0, None))(keys, params)

  def action_mask(self, state, params) -> jax.Array:
    return jax.vmap(self.env.action_mask, in_axes=(0, None))(state, params)

  @staticmethod
  def split_keys(keys: jax.Array) -> jax.Array:
    """Each env's key (any leading shape [...]) → its (step, reset) key pair [..., 2], what
    `step` takes; split apart from it so a loop can split all of its steps' keys at once."""
    split = jax.random.split
    for _ in range(jax.random.key_data(keys).ndim - 1):
      split = jax.vmap(split)
    return split(keys)

  def step(self, keys: jax.Array, state, action: HybridAction, params) -> StepResult:
    """`keys` [E, 2]: each env's step key and the key of the reset that replaces it if it
    ends (`split_keys`)."""
    num_envs = keys.shape[0]
    chex.assert_tree_shape_prefix(action, (num_envs,))
    step_keys, reset_keys = keys[:, 0], keys[:, 1]
    obs, state, reward, terminated, truncated, info = jax.vmap(
        self.env.step, in_axes=(0, 0, 0, None))(step_keys, state, action, params)
    done = terminated | truncated

    num_resets = min(num_envs, max(1, math.ceil(round(self.reset_fraction * num_envs, 6))))
    if num_resets == num_envs:
      reset_obs, reset_state = self.reset(reset_keys, params)
    else:
      pool_obs, pool_state = self.reset(reset_keys[:num_resets], params)
      # The k-th finished env takes pool entry k (mod pool size).
      slot = (jnp.cumsum(done) - 1) % num_resets
      reset_obs, reset_state = jax.tree.map(lambda x: x[slot], (pool_obs, pool_state))

    def select(reset_leaf, step_leaf):
      mask = done.reshape(done.shape + (1,) * (step_leaf.ndim - 1))
      return jnp.where(mask, reset_leaf, step_leaf)

    info = dict(info, final_obs=obs)
    next_obs = select(reset_obs, obs)
    next_state = jax.tree.map(select, reset_state, state)
    return next_obs, next_state, reward, terminated, truncated, info
