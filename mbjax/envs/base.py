"""The functional environment interface every mbjax environment implements.

Gymnax-style and pure: an environment object holds only static structure; everything that
changes lives in the `state` pytree and everything tunable in the `params` pytree, so `reset`
and `step` can be jitted, vmapped over envs and sharded over devices.

`step` never resets by itself: it returns the raw transition with `terminated` (the episode
ended inside the MDP: no bootstrap) and `truncated` (stopped from outside, e.g. a time limit:
bootstrap from the final observation) kept apart. Auto-reset and batching live in
`mbjax.envs.wrappers.VecEnv`.
"""
from __future__ import annotations

import abc
from typing import Any, Generic, TypeVar

import jax
import jax.numpy as jnp

from mbjax.envs.spaces import HybridAction, HybridActionSpec

EnvState = TypeVar("EnvState")
EnvParams = TypeVar("EnvParams")
Info = dict[str, jax.Array]
StepResult = tuple[jax.Array, Any, jax.Array, jax.Array, jax.Array, Info]


class Environment(abc.ABC, Generic[EnvState, EnvParams]):
  """Single-environment functional API. Batch with `jax.vmap` or `VecEnv`.

  Environments that can draw themselves also define
  `render(state, params) -> uint8[H, W, 3]`; `mbjax.envs.wrappers.can_render(env)` tells whether one does.
  """

  @property
  def name(self) -> str:
    return type(self).__name__

  @abc.abstractmethod
  def default_params(self) -> EnvParams:
    """Default `EnvParams` pytree."""

  @abc.abstractmethod
  def reset(self, key: jax.Array, params: EnvParams) -> tuple[jax.Array, EnvState]:
    """Returns `(obs, state)` of a fresh episode."""

  @abc.abstractmethod
  def step(
      self, key: jax.Array, state: EnvState, action: HybridAction, params: EnvParams
  ) -> StepResult:
    """Returns `(obs, state, reward, terminated, truncated, info)`; never auto-resets.

    `reward` is f32[], `terminated` and `truncated` are bool[]. `info` holds arrays with a
    fixed structure (the same keys on every step) so it can be stacked by `lax.scan`.
    """

  @abc.abstractmethod
  def observation_shape(self, params: EnvParams) -> tuple[int, ...]:
    """Shape of one observation."""

  def observation_dtype(self, params: EnvParams) -> jnp.dtype:
    del params
    return jnp.dtype(jnp.float32)

  @abc.abstractmethod
  def action_spec(self, params: EnvParams) -> HybridActionSpec:
    """The hybrid action layout this environment accepts."""

  def action_mask(self, state: EnvState, params: EnvParams) -> jax.Array:
    """bool[sum(branches)]: which discrete choices are allowed in `state` (default: all)."""
    del state
    return self.action_spec(params).all_valid_mask()

