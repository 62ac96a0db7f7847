"""Policy evaluation episodes: returns, and rendered frames for videos.

`make_episode_fn` builds a pure function that plays one episode (up to `max_steps`) of a
trained agent in a single env and returns per-step rewards, episode-end flags and, when the
env can render, the frames. It reuses the training wrappers, so observations match what the
policy saw during training.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from mbjax.agents import ppo
from mbjax.envs.wrappers import can_render
from mbjax.nets.hybrid import to_env_action


def make_episode_fn(trainer, max_steps: int, deterministic: bool = True,
                    render: bool = True) -> Callable:
  """Returns `episode(agent: PPOState, key) -> dict` (jit it); arrays are [max_steps, ...].

  The dict holds `reward`, `done` (the episode ended at this step), `alive` (the step
  belongs to the episode: before or at its end) and, with `render`, `frames`.
  """
  env, env_params, network = trainer.env, trainer.env_params, trainer.network
  render = render and can_render(env)
  normalize = trainer.cfg.ppo.normalize_observations

  def episode(agent: ppo.PPOState, key: jax.Array) -> dict:
    reset_key, key = jax.random.split(key)
    obs, state = env.reset(reset_key, env_params)

    def step(carry, step_key):
      obs, state, net_carry, is_first, alive = carry
      act_key, env_key = jax.random.split(step_key)
      mask = env.action_mask(state, env_params)[None]
      net_obs = ppo.prepare_obs(obs[None], agent.obs_stats, normalize)
      net_carry, dist, _ = network.apply(agent.params, net_carry, net_obs, is_first, mask)
      raw = dist.mode() if deterministic else dist.sample(act_key)
      action = jax.tree.map(lambda x: x[0], to_env_action(raw, network.squash))
      frame = env.render(state, env_params) if render else jnp.zeros((), jnp.uint8)
      obs, state, reward, terminated, truncated, _ = env.step(env_key, state, action,
                                                              env_params)
      done = (terminated | truncated) & alive
      out = {"reward": jnp.where(alive, reward, 0.0), "done": done, "alive": alive,
             "frames": frame}
      return (obs, state, net_carry, jnp.zeros((1,), bool), alive & ~done), out

    init = (obs, state, network.initial_carry(1), jnp.ones((1,), bool), jnp.bool_(True))
    _, out = jax.lax.scan(step, init, jax.random.split(key, max_steps))
    if not render:
      del out["frames"]
    return out

  return episode



def stateless_policy(trainer, agent: ppo.PPOState, deterministic: bool = False) -> Callable:
  """`policy_fn(key, obs, mask) -> env action` for one raw env observation, for tools that
  drive an env themselves (recorders, servers). Only feed-forward agents without frame
  stacking are stateless; others raise ValueError."""
  network, cfg = trainer.network, trainer.cfg
  if network.core != "none" or cfg.env.frame_stack > 1:
    raise ValueError(
        f"a stateless policy needs network.core='none' and env.frame_stack=1; this agent has "
        f"core={network.core!r}, frame_stack={cfg.env.frame_stack}")

  def policy_fn(key, obs, mask):
    net_obs = ppo.prepare_obs(obs[None], agent.obs_stats, cfg.ppo.normalize_observations)
    _, dist, _ = network.apply(agent.params, network.initial_carry(1), net_obs,
                               jnp.ones((1,), bool), mask[None])
    raw = dist.mode() if deterministic else dist.sample(key)
    return jax.tree.map(lambda x: x[0], to_env_action(raw, network.squash))

  return policy_fn
