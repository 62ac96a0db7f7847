"""The trained agent as a policy, and evaluation episodes: returns, and rendered frames.

`trained_policy` turns a training run's state into the policy that acts — PPO's network or,
with `served.policy` "dreamer"/"efe", the latent actor through the world model's filter —
as a `Policy` of pure functions with an explicit carry, for one env or a batch.
`make_episode_fn` plays one episode of it in a single env and returns per-step rewards,
episode-end flags and, when the env can render, the frames. Observations go through the
training wrappers, so they match what the policy saw during training.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from mbjax.agents import apex, ppo
from mbjax.envs.spaces import HybridAction
from mbjax.envs.wrappers import can_render
from mbjax.nets.hybrid import to_env_action


class Policy(NamedTuple):
  """`initial_carry(batch)`; `step(carry, obs [B, ...], is_first bool[B], mask [B, M], key)
  -> (carry, env action [B, ...])`."""

  initial_carry: Callable[[int], Any]
  step: Callable[..., tuple[Any, HybridAction]]


def trained_policy(trainer, agent: ppo.PPOState, aux: apex.AuxState,
                   deterministic: bool = False) -> Policy:
  """The served policy of a run's learners (`runner.agent`, `runner.aux`, on one device)."""
  learners = trainer.learners
  if learners.serving is not None:

    def latent_step(carry, obs, is_first, mask, key):
      carry, raw = apex.act(aux, carry, obs, is_first, mask, key, learners=learners,
                            deterministic=deterministic)
      return carry, to_env_action(raw, learners.squash)

    return Policy(lambda batch: apex.initial_latent_carry(learners, batch), latent_step)
  return _ppo_policy(trainer, agent, deterministic)


def _ppo_policy(trainer, agent: ppo.PPOState, deterministic: bool) -> Policy:
  network, normalize = trainer.network, trainer.cfg.ppo.normalize_observations

  def ppo_step(carry, obs, is_first, mask, key):
    net_obs = ppo.prepare_obs(obs, agent.obs_stats, normalize)
    carry, dist, _ = network.apply(agent.params, carry, net_obs, is_first, mask)
    raw = dist.mode() if deterministic else dist.sample(key)
    return carry, to_env_action(raw, network.squash)

  return Policy(network.initial_carry, ppo_step)


def make_episode_fn(trainer, max_steps: int, deterministic: bool = True,
                    render: bool = True) -> Callable:
  """Returns `episode(agent, aux, key) -> dict` (jit it; `runner.agent`, `runner.aux`);
  arrays are [max_steps, ...].

  The dict holds `reward`, `done` (the episode ended at this step), `alive` (the step
  belongs to the episode: before or at its end) and, with `render`, `frames`.
  """
  env, env_params = trainer.env, trainer.env_params
  render = render and can_render(env)

  def episode(agent, aux, key: jax.Array) -> dict:
    policy = trained_policy(trainer, agent, aux, deterministic)
    reset_key, key = jax.random.split(key)
    obs, state = env.reset(reset_key, env_params)

    def step(carry, step_key):
      obs, state, policy_carry, is_first, alive = carry
      act_key, env_key = jax.random.split(step_key)
      mask = env.action_mask(state, env_params)[None]
      policy_carry, action = policy.step(policy_carry, obs[None], is_first, mask, act_key)
      action = jax.tree.map(lambda x: x[0], action)
      frame = env.render(state, env_params) if render else jnp.zeros((), jnp.uint8)
      obs, state, reward, terminated, truncated, _ = env.step(env_key, state, action,
                                                              env_params)
      done = (terminated | truncated) & alive
      out = {"reward": jnp.where(alive, reward, 0.0), "done": done, "alive": alive,
             "frames": frame}
      return (obs, state, policy_carry, jnp.zeros((1,), bool), alive & ~done), out

    init = (obs, state, policy.initial_carry(1), jnp.ones((1,), bool), jnp.bool_(True))
    _, out = jax.lax.scan(step, init, jax.random.split(key, max_steps))
    if not render:
      del out["frames"]
    return out

  return episode


def stateless_policy(trainer, agent: ppo.PPOState, deterministic: bool = False) -> Callable:
  """`policy_fn(key, obs, mask) -> env action` for one raw env observation, for tools that
  drive an env themselves and keep no state (recorders, servers, population evaluation):
  only a served feed-forward PPO agent without frame stacking is stateless; others raise
  ValueError (use `trained_policy`)."""
  network, cfg = trainer.network, trainer.cfg
  if (trainer.learners.serving is not None or network.core != "none"
      or cfg.env.frame_stack > 1):
    raise ValueError(
        "a stateless policy needs served.policy='ppo', network.core='none' and "
        f"env.frame_stack=1; this agent has served.policy={cfg.served.policy!r}, "
        f"core={network.core!r}, frame_stack={cfg.env.frame_stack}")
  policy = _ppo_policy(trainer, agent, deterministic)

  def policy_fn(key, obs, mask):
    _, action = policy.step(policy.initial_carry(1), obs[None], jnp.ones((1,), bool),
                            mask[None], key)
    return jax.tree.map(lambda x: x[0], action)

  return policy_fn
