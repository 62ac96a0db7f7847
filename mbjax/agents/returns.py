"""Return and advantage estimators shared by every agent (time-major arrays, [T, ...]).

Terminology (Pardo et al. 2018, "Time Limits in Reinforcement Learning"): `terminated[t]`
means the state after action t is terminal, so nothing is bootstrapped; `truncated[t]`
means the episode was cut from outside, so the value of the final observation is
bootstrapped but nothing flows across into the next episode.
"""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp


def generalized_advantage_estimation(
    rewards: jax.Array,
    values: jax.Array,
    next_values: jax.Array,
    terminated: jax.Array,
    truncated: jax.Array,
    gamma: float,
    gae_lambda: float,
) -> tuple[jax.Array, jax.Array]:
  """GAE(γ, λ) (Schulman et al. 2016) with terminations and truncations kept apart.

  Args:
    rewards: r_t, f32[T, ...].
    values: V(s_t), f32[T, ...].
    next_values: V(s'_t), the value of the observation that followed action t — the final
      observation of the episode when it ended at t, otherwise V(s_{t+1}).
    terminated, truncated: bool[T, ...] episode-end flags of step t.

  Returns:
    (advantages, returns), each f32[T, ...], with
      δ_t = r_t + γ (1 − terminated_t) V(s'_t) − V(s_t)
      A_t = δ_t + γ λ (1 − done_t) A_{t+1},   done_t = terminated_t ∨ truncated_t,  A_T = 0
      returns_t = A_t + V(s_t).
  """
  chex.assert_equal_shape([rewards, values, next_values, terminated, truncated])
  not_terminated = 1.0 - terminated.astype(rewards.dtype)
  not_done = 1.0 - jnp.logical_or(terminated, truncated).astype(rewards.dtype)
  deltas = rewards + gamma * not_terminated * next_values - values

  def backward(advantage_next, xs):
    delta, continue_ = xs
    advantage = delta + gamma * gae_lambda * continue_ * advantage_next
    return advantage, advantage

  _, advantages = jax.lax.scan(
      backward, jnp.zeros_like(rewards[0]), (deltas, not_done), reverse=True)
  return advantages, advantages + values


def lambda_returns(
    rewards: jax.Array,
    continues: jax.Array,
    next_values: jax.Array,
    gamma: float,
    lambda_: float,
) -> jax.Array:
  """TD(λ) returns of an imagined trajectory (Sutton & Barto 12.1; Dreamer's V_λ).

  Args:
    rewards: r_t, the reward of the transition out of step t, f32[H, ...].
    continues: c_t ∈ [0, 1], the (predicted) probability that the episode goes on after
      that transition, f32[H, ...].
    next_values: v(s_{t+1}), f32[H, ...]; the last entry bootstraps the tail.

  Returns f32[H, ...] with
    G_t = r_t + γ c_t ((1 − λ) v(s_{t+1}) + λ G_{t+1}),   G_{H−1} bootstraps v(s_H).
  """
  chex.assert_equal_shape([rewards, continues, next_values])

  def backward(next_return, xs):
    reward, continue_, next_value = xs
    ret = reward + gamma * continue_ * ((1.0 - lambda_) * next_value + lambda_ * next_return)
    return ret, ret

  _, returns = jax.lax.scan(backward, next_values[-1], (rewards, continues, next_values),
                            reverse=True)
  return returns
