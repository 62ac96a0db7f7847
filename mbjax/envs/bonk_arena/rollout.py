"""Whole-episode rollouts of BonkArena under a `policy_fn(key, obs, mask) -> HybridAction`.

Shared by the tests, `experiments/record_arena.py` (one episode with frames and the true
actions) and `experiments/bench_arena.py` (a batch with auto-reset, for throughput). Each
episode is one `lax.scan` over `game.max_episode_steps(params)` steps (the env-step cap):
after the episode ends the env keeps stepping but those steps are flagged invalid, which
keeps shapes static.
"""
from __future__ import annotations

from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp

from mbjax.envs.bonk_arena import rewards
from mbjax.envs.bonk_arena.env import BonkArena
from mbjax.envs.bonk_arena.game import EnvParams, EnvState, max_episode_steps
from mbjax.envs.spaces import HybridAction

PolicyFn = Callable[[jax.Array, jax.Array, jax.Array], HybridAction]
RecordFn = Callable[[EnvState, EnvState], dict]


@flax.struct.dataclass
class Episode:
  """Per-step arrays of one episode, T = the rollout length; only `valid` steps happened.

  Step t shows `frames[t]` (the frame the action was chosen on), takes `actions_*[t]` and
  receives `rewards[t]`, `terminated[t]`, `truncated[t]`.
  """

  frames: jax.Array  # uint8[T, S, S, 3] (or [T, 0] when frames were not requested)
  actions_continuous: jax.Array  # f32[T, 2]
  actions_discrete: jax.Array  # i32[T, 1]
  rewards: jax.Array  # f32[T]
  reward_terms: jax.Array  # f32[T, NUM_REWARD_TERMS]
  terminated: jax.Array  # bool[T]
  truncated: jax.Array  # bool[T]
  valid: jax.Array  # bool[T], True up to and including the last step of the episode
  # Per-step outputs of `play_episode`'s `record_fn` (empty without one).
  extras: dict = flax.struct.field(default_factory=dict)
  # The state the episode ended in (the terminal state of a death, drawn as the death
  # screen): its frame (uint8[S, S, 3], or [0]) and `record_fn(end, end)` (empty without one).
  end_frame: jax.Array = flax.struct.field(default_factory=lambda: jnp.zeros((0,), jnp.uint8))
  end_extras: dict = flax.struct.field(default_factory=dict)


def _num_steps(params: EnvParams, num_steps: int | None) -> int:
  if num_steps is not None:
    return int(num_steps)
  try:
    return int(max_episode_steps(params))
  except jax.errors.ConcretizationTypeError:
    raise ValueError("params are traced here; pass num_steps (a Python int >= "
                     "game.max_episode_steps(params)) to size the rollout") from None


def play_episode(env: BonkArena, params: EnvParams, policy_fn, key: jax.Array,
                 with_frames: bool = False, num_steps: int | None = None,
                 record_fn: RecordFn | None = None) -> Episode:
  """Plays one episode from a reset for `num_steps` (default: the env-step cap) steps.

  `policy_fn` is a stateless `PolicyFn`, or a policy with a carry — an object with
  `initial_carry(batch)` and `step(carry, obs [1, ...], is_first [1], mask [1, M], key) ->
  (carry, action [1, ...])`, such as a trained agent's `mbjax.train.evaluate.Policy`.
  `record_fn(state, next_state)`, if given, returns a dict of arrays recorded per step into
  `Episode.extras` (`state` is what frame t shows, `next_state` the result of action t);
  with frames or a `record_fn`, the state the episode ended in is drawn and recorded too
  (`Episode.end_frame`, `end_extras`). Pure; under jit, `env`, `policy_fn`, `with_frames`,
  `num_steps` and `record_fn` are static.
  """
  reset_key, key = jax.random.split(key)
  obs, state = env.reset(reset_key, params)
  stateful = hasattr(policy_fn, "initial_carry")

  def act(policy_carry, obs, mask, is_first, key):
    if not stateful:
      return policy_carry, policy_fn(key, obs, mask)
    policy_carry, action = policy_fn.step(policy_carry, obs[None], is_first[None], mask[None],
                                          key)
    return policy_carry, jax.tree.map(lambda x: x[0], action)

  track_end = with_frames or record_fn is not None

  def body(carry, t):
    obs, state, policy_carry, key, done, end_state = carry
    key, act_key, step_key = jax.random.split(key, 3)
    frame = env.render(state, params) if with_frames else jnp.zeros((0,), jnp.uint8)
    policy_carry, action = act(policy_carry, obs, env.action_mask(state, params), t == 0,
                               act_key)
    obs, next_state, reward, terminated, truncated, info = env.step(step_key, state, action,
                                                                    params)
    extras = {} if record_fn is None else record_fn(state, next_state)
    out = Episode(frame, action.continuous, action.discrete, reward, info["reward_terms"],
                  terminated, truncated, ~done, extras)
    ends_now = ~done & (terminated | truncated)
    if track_end:
      end_state = jax.tree.map(lambda a, b: jnp.where(ends_now, a, b), next_state, end_state)
    return (obs, next_state, policy_carry, key, done | ends_now, end_state), out

  policy_carry = policy_fn.initial_carry(1) if stateful else ()
  end_state = state if track_end else ()
  carry, episode = jax.lax.scan(
      body, (obs, state, policy_carry, key, jnp.zeros((), bool), end_state),
      jnp.arange(_num_steps(params, num_steps)))
  end_state = carry[-1]
  if with_frames:
    episode = episode.replace(end_frame=env.render(end_state, params))
  if record_fn is not None:
    episode = episode.replace(end_extras=record_fn(end_state, end_state))
  return episode


def evaluate(env: BonkArena, params: EnvParams, policy_fn: PolicyFn, key: jax.Array,
             num_episodes: int, num_steps: int | None = None) -> dict[str, jax.Array]:
  """Returns per-episode `return`, `length`, `terminated`, `menu_fraction` (share of the
  episode's env steps with the menu open) and summed `reward_terms`."""

  def one(key):
    ep = play_episode(env, params, policy_fn, key, num_steps=num_steps)
    terms = jnp.sum(ep.reward_terms * ep.valid[:, None], axis=0)
    length = jnp.sum(ep.valid)
    return {
        "return": jnp.sum(ep.rewards * ep.valid),
        "length": length,
        "terminated": jnp.any(ep.terminated & ep.valid),
        "menu_fraction": terms[rewards.MENU] / jnp.maximum(length, 1),
        "reward_terms": terms,
    }

  return jax.vmap(one)(jax.random.split(key, num_episodes))


def batched_rollout(env: BonkArena, params: EnvParams, policy_fn: PolicyFn, num_envs: int,
                    num_steps: int, auto_reset: bool = True):
  """A jitted `run(key) -> (total reward, episodes finished, observation checksum)` stepping
  `num_envs` envs for `num_steps` steps under `jit(vmap)`; with `auto_reset` finished envs are
  reset in-line (every env computes its reset every step, as a `VecEnv` with
  `reset_fraction=1` does). The checksum sums every observation so that XLA cannot drop the
  observation work when the policy ignores it (the random policy does)."""
  step = jax.vmap(env.step, in_axes=(0, 0, 0, None))
  reset = jax.vmap(env.reset, in_axes=(0, None))
  mask = jax.vmap(env.action_mask, in_axes=(0, None))
  policy = jax.vmap(policy_fn)

  def run(key):
    key, reset_key = jax.random.split(key)
    obs, state = reset(jax.random.split(reset_key, num_envs), params)

    def body(carry, _):
      obs, state, key, total, finished, checksum = carry
      key, act_key, step_key, reset_key = jax.random.split(key, 4)
      action = policy(jax.random.split(act_key, num_envs), obs, mask(state, params))
      obs, state, reward, terminated, truncated, _ = step(
          jax.random.split(step_key, num_envs), state, action, params)
      done = terminated | truncated
      if auto_reset:
        fresh_obs, fresh_state = reset(jax.random.split(reset_key, num_envs), params)
        pick = lambda a, b: jnp.where(done.reshape(done.shape + (1,) * (a.ndim - 1)), a, b)
        obs = pick(fresh_obs, obs)
        state = jax.tree.map(pick, fresh_state, state)
      checksum = checksum + jnp.sum(obs, dtype=jnp.float32)
      return (obs, state, key, total + jnp.sum(reward), finished + jnp.sum(done), checksum), None

    zero = jnp.zeros((), jnp.float32)
    init = (obs, state, key, zero, jnp.zeros((), jnp.int32), zero)
    (_, _, _, total, finished, checksum), _ = jax.lax.scan(body, init, None, length=num_steps)
    return total, finished, checksum

  return jax.jit(run)
