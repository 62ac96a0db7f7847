"""Tests for `mbjax.agents.returns.generalized_advantage_estimation`.

Covers a 3-step case worked out by hand (truncation bootstraps from `next_values`,
termination does not, nothing flows across an episode boundary), agreement with a plain-Python
backward loop on a [T=7, E=3] rollout with terminations and truncations inside the rollout and
at its last step, the λ=0 (one-step TD) and λ=1 (discounted Monte-Carlo) limits, and
jitted == un-jitted.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mbjax.agents.returns import generalized_advantage_estimation

_jit_gae = jax.jit(generalized_advantage_estimation)


def _gae(jit, *args):
  return (_jit_gae if jit else generalized_advantage_estimation)(*args)


def _gae_reference(rewards, values, next_values, terminated, truncated, gamma, gae_lambda):
  """One env at a time, one step at a time, backwards from the end of the rollout."""
  num_steps, num_envs = rewards.shape
  advantages = np.zeros((num_steps, num_envs))
  for e in range(num_envs):
    advantage_after = 0.0  # A_{t+1} of the same episode; 0 past the rollout's end.
    for t in reversed(range(num_steps)):
      if terminated[t, e]:
        delta = rewards[t, e] - values[t, e]
      else:
        delta = rewards[t, e] + gamma * next_values[t, e] - values[t, e]
      if terminated[t, e] or truncated[t, e]:
        advantage_after = 0.0  # Step t ends an episode: A_{t+1} belongs to the next one.
      advantages[t, e] = delta + gamma * gae_lambda * advantage_after
      advantage_after = advantages[t, e]
  return advantages, advantages + values


def _as_jax(rewards, values, next_values, terminated, truncated):
  return (jnp.asarray(rewards, jnp.float32), jnp.asarray(values, jnp.float32),
          jnp.asarray(next_values, jnp.float32), jnp.asarray(terminated),
          jnp.asarray(truncated))


@pytest.mark.parametrize("jit", [False, True])
def test_three_steps_by_hand(jit):
  # Column 0: truncated at t=0; column 1: terminated at t=0. Both continue as a new episode.
  rewards = [[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]
  values = [[0.5, 0.5], [1.0, 1.0], [1.5, 1.5]]
  # t=0: V(final obs) = 10; t=1: V(s_2) = 1.5; t=2: the bootstrap value 4.
  next_values = [[10.0, 10.0], [1.5, 1.5], [4.0, 4.0]]
  terminated = [[False, True], [False, False], [False, False]]
  truncated = [[True, False], [False, False], [False, False]]
  advantages, returns = _gae(
      jit, *_as_jax(rewards, values, next_values, terminated, truncated), 0.9, 0.8)

  # δ2 = 3 + 0.9·4 − 1.5 = 5.1;  δ1 = 2 + 0.9·1.5 − 1 = 2.35;  A1 = 2.35 + 0.72·5.1 = 6.022.
  # Truncated: δ0 = 1 + 0.9·10 − 0.5 = 9.5 and A0 = δ0 (no A1 across the boundary).
  # Terminated: δ0 = 1 − 0.5 = 0.5 (V(final obs) = 10 ignored) and A0 = δ0.
  np.testing.assert_allclose(
      advantages, [[9.5, 0.5], [6.022, 6.022], [5.1, 5.1]], rtol=1e-6)
  np.testing.assert_allclose(returns, [[10.0, 1.0], [7.022, 7.022], [6.6, 6.6]], rtol=1e-6)


# A [T=7, E=3] rollout. env 0: truncated at t=2, terminated at t=5; env 1: terminated at
# t=3 and at the last step t=6; env 2: terminated at t=1, truncated at the last step t=6.
T, E = 7, 3
TERMINATED = np.zeros((T, E), bool)
TRUNCATED = np.zeros((T, E), bool)
TRUNCATED[2, 0] = TERMINATED[5, 0] = True
TERMINATED[3, 1] = TERMINATED[6, 1] = True
TERMINATED[1, 2] = TRUNCATED[6, 2] = True


def _rollout(seed=0):
  rng = np.random.default_rng(seed)
  rewards = rng.normal(size=(T, E))
  values = rng.normal(size=(T, E))
  done = TERMINATED | TRUNCATED
  # V(s_{t+1}) inside an episode; the value of the episode's final obs where it ended.
  next_values = np.concatenate([values[1:], rng.normal(size=(1, E))])
  next_values = np.where(done, rng.normal(size=(T, E)), next_values)
  return rewards, values, next_values


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("gamma,gae_lambda", [(0.99, 0.95), (0.9, 0.5)])
def test_matches_python_loop_with_episode_ends_inside_and_at_the_end(jit, gamma, gae_lambda):
  rewards, values, next_values = _rollout()
  advantages, returns = _gae(
      jit, *_as_jax(rewards, values, next_values, TERMINATED, TRUNCATED), gamma, gae_lambda)
  expected_advantages, expected_returns = _gae_reference(
      rewards, values, next_values, TERMINATED, TRUNCATED, gamma, gae_lambda)
  assert advantages.shape == returns.shape == (T, E)
  assert advantages.dtype == jnp.float32
  np.testing.assert_allclose(advantages, expected_advantages, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(returns, expected_returns, rtol=1e-5, atol=1e-5)


def test_jitted_equals_unjitted():
  args = _as_jax(*_rollout(seed=1), TERMINATED, TRUNCATED)
  eager = generalized_advantage_estimation(*args, 0.97, 0.9)
  jitted = _jit_gae(*args, 0.97, 0.9)
  np.testing.assert_allclose(jitted[0], eager[0], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(jitted[1], eager[1], rtol=1e-6, atol=1e-6)


def test_nothing_flows_across_episode_boundaries():
  rewards, values, next_values = _rollout(seed=2)
  args = _as_jax(rewards, values, next_values, TERMINATED, TRUNCATED)
  before = _jit_gae(*args, 0.99, 0.95)[0]
  # Change everything that belongs to later episodes: env 0 after t=2, env 1 after t=3,
  # env 2 after t=1.
  later = np.zeros((T, E), bool)
  later[3:, 0] = later[4:, 1] = later[2:, 2] = True
  perturbed = _as_jax(
      np.where(later, rewards + 5.0, rewards), np.where(later, values - 3.0, values),
      np.where(later, next_values + 7.0, next_values), TERMINATED, TRUNCATED)
  after = _jit_gae(*perturbed, 0.99, 0.95)[0]
  np.testing.assert_array_equal(np.asarray(after)[~later], np.asarray(before)[~later])
  assert np.all(np.asarray(after)[later] != np.asarray(before)[later])


def test_lambda_zero_is_one_step_td_error():
  rewards, values, next_values = _rollout(seed=3)
  advantages, _ = _jit_gae(*_as_jax(rewards, values, next_values, TERMINATED, TRUNCATED),
                           0.9, 0.0)
  expected = rewards + 0.9 * np.where(TERMINATED, 0.0, next_values) - values
  np.testing.assert_allclose(advantages, expected, rtol=1e-5, atol=1e-6)


def test_lambda_one_without_episode_ends_is_discounted_return_with_bootstrap():
  rewards, values, next_values = _rollout(seed=4)
  no_end = np.zeros((T, E), bool)
  next_values = np.concatenate([values[1:], next_values[-1:]])  # Consistent with V(s_{t+1}).
  _, returns = _jit_gae(*_as_jax(rewards, values, next_values, no_end, no_end), 0.9, 1.0)
  for t in range(T):
    expected = sum(0.9 ** (k - t) * rewards[k] for k in range(t, T))
    expected = expected + 0.9 ** (T - t) * next_values[-1]
    np.testing.assert_allclose(returns[t], expected, rtol=1e-5, atol=1e-5)


def test_rejects_mismatched_shapes():
  rewards, values, next_values = _as_jax(*_rollout(), TERMINATED, TRUNCATED)[:3]
  with pytest.raises(AssertionError):
    generalized_advantage_estimation(
        rewards, values, next_values[:-1], jnp.asarray(TERMINATED), jnp.asarray(TRUNCATED),
        0.99, 0.95)
