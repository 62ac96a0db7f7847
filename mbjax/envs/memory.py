"""RememberCue: a minimal memory task that a feed-forward policy cannot solve.

At t = 0 the observation shows one of `num_cues` cues (one-hot); the next `delay` steps show
blank observations; the final step (t = delay + 1) raises a query flag, and the action taken
there earns +1 if it names the cue and −1 otherwise. Actions before the query earn nothing.
The episode then terminates. Observation: [one-hot cue (zeros after t = 0), query flag].

A policy without memory sees identical query observations whatever the cue, so its best
expected return is 2/num_cues − 1 (0 with two cues); a policy that remembers scores 1.
Every episode lasts exactly `delay + 2` steps, so with that length as the BPTT chunk
(`ppo.seq_len`) and the rollout length a multiple of it, recurrent PPO chunks line up with
episodes. Not an upstream MetaBonk environment: a test bed for the motor-policy cores.
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from mbjax.envs.base import Environment, StepResult
from mbjax.envs.spaces import HybridAction, HybridActionSpec


@flax.struct.dataclass
class RememberCueParams:
  delay: int = flax.struct.field(pytree_node=False, default=4)  # blank steps before the query
  num_cues: int = flax.struct.field(pytree_node=False, default=2)


@flax.struct.dataclass
class RememberCueState:
  cue: jax.Array  # i32[]
  t: jax.Array  # i32[], steps taken in this episode


class RememberCue(Environment):

  def __init__(self, delay: int = 4, num_cues: int = 2):
    if delay < 0 or num_cues < 2:
      raise ValueError(f"RememberCue needs delay >= 0 and num_cues >= 2, got delay={delay}, "
                       f"num_cues={num_cues}")
    self._params = RememberCueParams(delay=delay, num_cues=num_cues)

  @property
  def name(self) -> str:
    return "remember_cue"

  def default_params(self) -> RememberCueParams:
    return self._params

  def _obs(self, state: RememberCueState, params: RememberCueParams) -> jax.Array:
    cue = jax.nn.one_hot(state.cue, params.num_cues) * (state.t == 0)
    query = (state.t == params.delay + 1).astype(jnp.float32)[None]
    return jnp.concatenate([cue, query])

  def reset(self, key, params):
    state = RememberCueState(jax.random.randint(key, (), 0, params.num_cues), jnp.int32(0))
    return self._obs(state, params), state

  def step(self, key, state, action: HybridAction, params) -> StepResult:
    del key
    is_query = state.t == params.delay + 1
    correct = action.discrete[0] == state.cue
    reward = jnp.where(is_query, jnp.where(correct, 1.0, -1.0), 0.0).astype(jnp.float32)
    state = state.replace(t=state.t + 1)
    return self._obs(state, params), state, reward, is_query, jnp.bool_(False), {}

  def observation_shape(self, params):
    return (params.num_cues + 1,)

  def action_spec(self, params):
    return HybridActionSpec(continuous_dim=0, branches=(params.num_cues,))
