"""Adapter that exposes a gymnax environment through the mbjax `Environment` interface.

gymnax's own `step` auto-resets and folds the time limit into its output; the adapter calls
`step_env` (the raw transition) instead and reports the time limit as `truncated`, so
auto-reset and bootstrapping are decided by mbjax wrappers and losses.
"""
from __future__ import annotations

from typing import Any

import math

import gymnax
import jax
import jax.numpy as jnp
from gymnax.environments import spaces as gymnax_spaces

from mbjax.envs.base import Environment, StepResult
from mbjax.envs.spaces import HybridAction, HybridActionSpec


class GymnaxEnv(Environment):
  """A gymnax env with a `Discrete` or 1-D `Box` action space. `flatten` turns image-shaped
  observations (MinAtar's 10 × 10 × channels) into vectors."""

  def __init__(self, gymnax_env: gymnax.environments.environment.Environment, params: Any,
               flatten: bool = False):
    self._env = gymnax_env
    self._default_params = params
    self._flatten = flatten
    space = gymnax_env.action_space(params)
    if isinstance(space, gymnax_spaces.Discrete):
      self._spec = HybridActionSpec(continuous_dim=0, branches=(int(space.n),))
      self._box = None
    elif isinstance(space, gymnax_spaces.Box) and len(space.shape) <= 1:
      self._spec = HybridActionSpec(continuous_dim=max(1, int(sum(space.shape))), branches=())
      self._box = (jnp.asarray(space.low, jnp.float32), jnp.asarray(space.high, jnp.float32),
                   space.shape)
    else:
      raise ValueError(
          f"gymnax env {gymnax_env.name!r}: unsupported action space {space!r}; "
          "expected Discrete or a 1-D Box")

  @classmethod
  def from_name(cls, name: str, flatten: bool = False, **kwargs) -> "GymnaxEnv":
    env, params = gymnax.make(name, **kwargs)
    return cls(env, params, flatten)

  @property
  def name(self) -> str:
    return self._env.name

  def default_params(self):
    return self._default_params

  def _obs(self, obs):
    obs = obs.astype(jnp.float32)
    return obs.reshape(-1) if self._flatten else obs

  def reset(self, key, params):
    obs, state = self._env.reset_env(key, params)
    return self._obs(obs), state

  def step(self, key, state, action: HybridAction, params) -> StepResult:
    obs, state, reward, terminated, _ = self._env.step_env(
        key, state, self._to_gymnax(action), params)
    terminated = jnp.asarray(terminated, bool)
    truncated = jnp.logical_and(self._env.is_truncated(state, params), ~terminated)
    return (self._obs(obs), state, jnp.asarray(reward, jnp.float32), terminated,
            truncated, {})

  def _to_gymnax(self, action: HybridAction) -> jax.Array:
    if self._box is None:
      return action.discrete[0]
    low, high, shape = self._box
    # The policy emits [-1, 1]; rescale affinely onto the Box bounds.
    scaled = low + (action.continuous + 1.0) * 0.5 * (high - low)
    return scaled.reshape(shape)

  def observation_shape(self, params):
    shape = tuple(self._env.observation_space(params).shape)
    return (math.prod(shape),) if self._flatten else shape

  def action_spec(self, params):
    del params
    return self._spec
