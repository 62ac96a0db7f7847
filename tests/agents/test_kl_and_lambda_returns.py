"""Closed forms shared by the latent learners against hand-computed values: Gaussian,
categorical and hybrid-action KL divergences, and λ-returns against a loop."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mbjax.agents.kl import categorical_kl, gaussian_kl
from mbjax.agents.returns import lambda_returns
from mbjax.envs.spaces import HybridActionSpec
from mbjax.nets.hybrid import HybridDistribution


@pytest.mark.parametrize("jit", [False, True])
def test_gaussian_kl_hand_computed(jit):
  fn = jax.jit(gaussian_kl) if jit else gaussian_kl
  # KL(N(0,1) ‖ N(1,2²)) = log 2 + (1 + 1)/8 − ½ ; KL(N(1,1) ‖ N(1,1)) = 0.
  value = fn(jnp.array([0.0, 1.0]), jnp.array([1.0, 1.0]), jnp.array([1.0, 1.0]),
             jnp.array([2.0, 1.0]))
  np.testing.assert_allclose(value, math.log(2) + 0.25 - 0.5, rtol=1e-6)


@pytest.mark.parametrize("jit", [False, True])
def test_categorical_kl_hand_computed(jit):
  fn = jax.jit(categorical_kl) if jit else categorical_kl
  q = jnp.log(jnp.array([[[0.5, 0.5], [0.9, 0.1]]]))
  p = jnp.log(jnp.array([[[0.25, 0.75], [0.9, 0.1]]]))
  expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)  # second latent: 0
  np.testing.assert_allclose(fn(q, p), [expected], rtol=1e-6)


def test_hybrid_kl_divergence_hand_computed():
  spec = HybridActionSpec(1, (2,))
  mask = jnp.array([[True, True]])
  a = HybridDistribution.create(spec, jnp.array([[0.0]]), jnp.array([0.0]),
                                (jnp.log(jnp.array([[0.5, 0.5]])),), mask)
  b = HybridDistribution.create(spec, jnp.array([[1.0]]), jnp.array([math.log(2.0)]),
                                (jnp.log(jnp.array([[0.25, 0.75]])),), mask)
  expected = (math.log(2) + 0.25 - 0.5) + (0.5 * math.log(2) + 0.5 * math.log(0.5 / 0.75))
  np.testing.assert_allclose(a.kl_divergence(b), [expected], rtol=1e-5)


@pytest.mark.parametrize("jit", [False, True])
def test_lambda_returns_match_loop(jit):
  rng = np.random.default_rng(0)
  rewards = rng.normal(size=(6, 3)).astype(np.float32)
  continues = rng.uniform(size=(6, 3)).astype(np.float32)
  continues[2, 1] = 0.0
  next_values = rng.normal(size=(6, 3)).astype(np.float32)
  gamma, lam = 0.9, 0.8
  expected = np.zeros_like(rewards)
  following = next_values[-1]
  for t in reversed(range(6)):
    expected[t] = rewards[t] + gamma * continues[t] * (
        (1 - lam) * next_values[t] + lam * following)
    following = expected[t]
  fn = jax.jit(lambda_returns, static_argnums=(3, 4)) if jit else lambda_returns
  np.testing.assert_allclose(fn(rewards, continues, next_values, gamma, lam), expected,
                             rtol=1e-5, atol=1e-6)
