"""Tests for `mbjax.nets.hybrid`: the masked hybrid action distribution.

Covers log-prob and entropy against hand-written numpy references (Gaussian density, tanh
change of variables, log-softmax and entropy over the *allowed* choices only) for
2 continuous dims × one masked 33-way branch in both squash modes, 0 continuous dims × three
masked binary branches, and continuous-only; the tanh-squashed entropy estimate and its
gradients against Monte Carlo and a fine-grid integral in numpy; sampling from pre-drawn
noise by hand; `mode()`; `to_env_action` ranges; a hypothesis
property that masked choices are never sampled; finite gradients through masked logits; and
jitted == un-jitted.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mbjax.envs.spaces import HybridAction, HybridActionSpec
from mbjax.nets.hybrid import (MASKED_LOGIT, ActionNoise, HybridDistribution, action_noise,
                               mask_logits, to_env_action)

ATOL = 1e-6
LOG_2PI = math.log(2.0 * math.pi)


def _gaussian_log_prob(u, mean, log_std):
  """Σ_d log N(u_d; μ_d, σ_d) written out term by term (float64)."""
  total = 0.0
  for u_d, mu_d, log_std_d in zip(u, mean, log_std):
    sigma = math.exp(log_std_d)
    total += -0.5 * ((u_d - mu_d) / sigma) ** 2 - math.log(sigma) - 0.5 * LOG_2PI
  return total


def _gaussian_entropy(log_std):
  return sum(0.5 + 0.5 * LOG_2PI + s for s in log_std)


def _masked_log_softmax(logits, mask):
  """log p over the allowed entries only; masked entries get None."""
  allowed = [l for l, m in zip(logits, mask) if m]
  log_norm = math.log(sum(math.exp(l) for l in allowed))
  return [l - log_norm if m else None for l, m in zip(logits, mask)]


def _masked_entropy(logits, mask):
  return -sum(math.exp(lp) * lp for lp in _masked_log_softmax(logits, mask) if lp is not None)


def _log_prob_and_entropy(spec, mean, log_std, logits, mask, action, squash):
  dist = HybridDistribution.create(spec, mean, log_std, logits, mask, squash=squash)
  return dist.log_prob(action), dist.entropy()


_jit_log_prob_and_entropy = jax.jit(_log_prob_and_entropy, static_argnums=(0, 6))


# --- 2 continuous dims × one 33-way branch, with a mask --------------------------------------

SPEC_33 = HybridActionSpec(continuous_dim=2, branches=(33,))
MEAN_33 = np.array([0.3, -0.8])
LOG_STD_33 = np.array([-0.5, 0.2])
U_33 = np.array([0.1, -1.7])
LOGITS_33 = np.linspace(-2.0, 2.0, 33)
ALLOWED_33 = (0, 3, 7, 8, 20, 32)
MASK_33 = np.isin(np.arange(33), ALLOWED_33)
LOGITS_33[~MASK_33] = 30.0  # Masked entries get large logits: they must be replaced, not kept.
CHOICE_33 = 20


def _inputs_33():
  action = HybridAction(jnp.asarray(U_33, jnp.float32), jnp.asarray([CHOICE_33], jnp.int32))
  return (jnp.asarray(MEAN_33, jnp.float32), jnp.asarray(LOG_STD_33, jnp.float32),
          (jnp.asarray(LOGITS_33, jnp.float32),), jnp.asarray(MASK_33), action)


@pytest.mark.parametrize("jit", [False, True])
def test_log_prob_and_entropy_clip_continuous_and_masked_33_branch(jit):
  mean, log_std, logits, mask, action = _inputs_33()
  fn = _jit_log_prob_and_entropy if jit else _log_prob_and_entropy
  log_prob, entropy = fn(SPEC_33, mean, log_std, logits, mask, action, "clip")

  expected_log_prob = (_gaussian_log_prob(U_33, MEAN_33, LOG_STD_33)
                       + _masked_log_softmax(LOGITS_33, MASK_33)[CHOICE_33])
  expected_entropy = _gaussian_entropy(LOG_STD_33) + _masked_entropy(LOGITS_33, MASK_33)
  np.testing.assert_allclose(log_prob, expected_log_prob, rtol=0, atol=ATOL)
  np.testing.assert_allclose(entropy, expected_entropy, rtol=0, atol=ATOL)


@pytest.mark.parametrize("jit", [False, True])
def test_log_prob_and_entropy_tanh_continuous_and_masked_33_branch(jit):
  mean, log_std, logits, mask, action = _inputs_33()
  fn = _jit_log_prob_and_entropy if jit else _log_prob_and_entropy
  log_prob, entropy = fn(SPEC_33, mean, log_std, logits, mask, action, "tanh")

  log_det = sum(math.log(1.0 - math.tanh(u) ** 2) for u in U_33)
  expected_log_prob = (_gaussian_log_prob(U_33, MEAN_33, LOG_STD_33) - log_det
                       + _masked_log_softmax(LOGITS_33, MASK_33)[CHOICE_33])
  # The squashed entropy has no closed form: the Gaussian's is reported.
  expected_entropy = _gaussian_entropy(LOG_STD_33) + _masked_entropy(LOGITS_33, MASK_33)
  np.testing.assert_allclose(log_prob, expected_log_prob, rtol=0, atol=ATOL)
  np.testing.assert_allclose(entropy, expected_entropy, rtol=0, atol=ATOL)


def test_masked_choice_has_zero_probability():
  mean, log_std, logits, mask, _ = _inputs_33()
  dist = HybridDistribution.create(SPEC_33, mean, log_std, logits, mask)
  probs = jax.nn.softmax(dist.logits[0])
  np.testing.assert_array_equal(np.asarray(probs)[~MASK_33], 0.0)
  np.testing.assert_allclose(np.asarray(probs).sum(), 1.0, atol=1e-6)


# --- 0 continuous dims × branches (2, 2, 2), one mask slice per branch -------------------------

SPEC_222 = HybridActionSpec(continuous_dim=0, branches=(2, 2, 2))
LOGITS_222 = ([0.4, -1.1], [2.0, 0.5], [-0.3, 0.9])
# Branch 0: both allowed; branch 1: only choice 1 (choice 0 has the larger logit);
# branch 2: only choice 0.
MASK_222 = [[True, True], [False, True], [True, False]]


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("choice", [(0, 1, 0), (1, 1, 0)])
def test_log_prob_and_entropy_discrete_only_with_branch_masks(jit, choice):
  mean = jnp.zeros((0,), jnp.float32)
  log_std = jnp.zeros((0,), jnp.float32)
  logits = tuple(jnp.asarray(l, jnp.float32) for l in LOGITS_222)
  mask = jnp.asarray(sum(MASK_222, []))
  action = HybridAction(jnp.zeros((0,), jnp.float32), jnp.asarray(choice, jnp.int32))
  fn = _jit_log_prob_and_entropy if jit else _log_prob_and_entropy
  log_prob, entropy = fn(SPEC_222, mean, log_std, logits, mask, action, "clip")

  expected_log_prob = sum(_masked_log_softmax(l, m)[c]
                          for l, m, c in zip(LOGITS_222, MASK_222, choice))
  # Branches 1 and 2 have one allowed choice each: they contribute no entropy.
  expected_entropy = _masked_entropy(LOGITS_222[0], MASK_222[0])
  np.testing.assert_allclose(log_prob, expected_log_prob, rtol=0, atol=ATOL)
  np.testing.assert_allclose(entropy, expected_entropy, rtol=0, atol=ATOL)


def test_discrete_only_sample_and_mode_respect_branch_masks():
  batch = 256
  logits = tuple(jnp.broadcast_to(jnp.asarray(l, jnp.float32), (batch, 2)) for l in LOGITS_222)
  mask = jnp.broadcast_to(jnp.asarray(sum(MASK_222, [])), (batch, 6))
  dist = HybridDistribution.create(
      SPEC_222, jnp.zeros((batch, 0)), jnp.zeros((batch, 0)), logits, mask)
  action = dist.sample(jax.random.key(0))
  assert action.continuous.shape == (batch, 0)
  assert action.discrete.shape == (batch, 3) and action.discrete.dtype == jnp.int32
  np.testing.assert_array_equal(action.discrete[:, 1], 1)
  np.testing.assert_array_equal(action.discrete[:, 2], 0)
  assert set(np.unique(action.discrete[:, 0])) == {0, 1}  # p(1) ≈ 0.18: both appear in 256.
  np.testing.assert_array_equal(dist.mode().discrete, np.broadcast_to([0, 1, 0], (batch, 3)))


# --- continuous only ----------------------------------------------------------------------------

@pytest.mark.parametrize("squash", ["clip", "tanh"])
def test_continuous_only(squash):
  spec = HybridActionSpec(continuous_dim=3, branches=())
  mean = np.array([[0.0, 0.5, -0.5], [1.0, -2.0, 0.25]])
  log_std = np.array([-1.0, 0.0, 0.3])  # Shared across the batch: broadcast by `create`.
  u = np.array([[0.2, 0.4, -1.0], [0.9, -0.1, 0.0]])
  dist = HybridDistribution.create(
      spec, jnp.asarray(mean, jnp.float32), jnp.asarray(log_std, jnp.float32), (),
      jnp.zeros((2, 0), bool), squash=squash)
  action = HybridAction(jnp.asarray(u, jnp.float32), jnp.zeros((2, 0), jnp.int32))

  for b in range(2):
    expected = _gaussian_log_prob(u[b], mean[b], log_std)
    if squash == "tanh":
      expected -= sum(math.log(1.0 - math.tanh(x) ** 2) for x in u[b])
    np.testing.assert_allclose(dist.log_prob(action)[b], expected, rtol=0, atol=ATOL)
  np.testing.assert_allclose(dist.entropy(), [_gaussian_entropy(log_std)] * 2, rtol=0, atol=ATOL)
  assert dist.log_std.shape == (2, 3)

  sample = dist.sample(jax.random.key(1))
  assert sample.continuous.shape == (2, 3) and sample.discrete.shape == (2, 0)
  mode = dist.mode()
  np.testing.assert_array_equal(mode.continuous, mean.astype(np.float32))
  assert mode.discrete.shape == (2, 0)


def test_continuous_sample_statistics():
  spec = HybridActionSpec(continuous_dim=2, branches=())
  n = 20_000
  mean = jnp.broadcast_to(jnp.asarray([0.5, -1.0]), (n, 2))
  log_std = jnp.log(jnp.asarray([0.1, 2.0]))
  dist = HybridDistribution.create(spec, mean, log_std, (), jnp.zeros((n, 0), bool))
  u = np.asarray(dist.sample(jax.random.key(2)).continuous)
  # Standard errors: 0.1/√n ≈ 7e-4 and 2/√n ≈ 0.014.
  np.testing.assert_allclose(u.mean(0)[0], 0.5, atol=5e-3)
  np.testing.assert_allclose(u.mean(0)[1], -1.0, atol=0.07)
  np.testing.assert_allclose(u.std(0), [0.1, 2.0], rtol=0.03)


# --- the squashed (tanh) entropy against Monte Carlo in numpy ---------------------------------

# Rows span narrow and wide Gaussians (σ from 0.05 to 10, both sides of the quadrature's
# switch at σ = 0.7) and means in the saturated region of tanh.
SQUASH_MEAN = np.array([[0.0, 0.0, 0.0], [0.5, -1.0, 2.0], [3.0, -0.2, 0.0], [-4.0, 1.0, 0.1]])
SQUASH_LOG_STD = np.array([[0.0, 0.0, 0.0], [-3.0, -0.5, 0.3], [1.6, 1.0, -2.0],
                           [0.5, 2.3, math.log(0.7)]])
MC_SAMPLES = 200_000


def _squashed_entropy_monte_carlo(mean, log_std, seed=0):
  """Per row: −E[log p(tanh u)] with u ~ N(μ, σ) and log p(tanh u) = log N(u) + 2 Σ_d log
  cosh u_d; and d/dμ, d/dlog σ of it by the reparameterisation u = μ + σε. Returns the mean
  and standard error of each."""
  rng = np.random.default_rng(seed)
  eps = rng.standard_normal((MC_SAMPLES,) + mean.shape)
  sigma = np.exp(log_std)
  u = mean + sigma * eps
  log_density = (-0.5 * eps ** 2 - log_std - 0.5 * LOG_2PI + 2.0 * np.log(np.cosh(u))).sum(-1)
  tanh_u = np.tanh(u)
  grad_mean = -2.0 * tanh_u  # d/dμ of −log p = −d/du of 2 log cosh u
  grad_log_std = 1.0 - 2.0 * tanh_u * eps * sigma
  stats = lambda x: (x.mean(0), x.std(0) / math.sqrt(MC_SAMPLES))  # noqa: E731
  return stats(-log_density), stats(grad_mean), stats(grad_log_std)


def _squashed_entropy(mean, log_std):
  spec = HybridActionSpec(continuous_dim=3, branches=())
  dist = HybridDistribution.create(spec, mean, log_std, (), jnp.zeros(mean.shape[:1] + (0,),
                                                                      bool), squash="tanh")
  return dist.entropy(squashed=True)


def test_squashed_entropy_matches_monte_carlo_in_value_and_gradient():
  mean, log_std = (jnp.asarray(x, jnp.float32) for x in (SQUASH_MEAN, SQUASH_LOG_STD))
  # Jitted only: un-jitted, its hundred small ops cost ~10 s of one-off compiles.
  fn = jax.jit(lambda m, s: (_squashed_entropy(m, s), jax.grad(
      lambda m, s: _squashed_entropy(m, s).sum(), argnums=(0, 1))(m, s)))
  entropy, (grad_mean, grad_log_std) = jax.tree.map(np.asarray, fn(mean, log_std))
  (h, h_se), (gm, gm_se), (gs, gs_se) = _squashed_entropy_monte_carlo(SQUASH_MEAN,
                                                                       SQUASH_LOG_STD)
  for actual, (expected, standard_error) in ((entropy, (h, h_se)), (grad_mean, (gm, gm_se)),
                                             (grad_log_std, (gs, gs_se))):
    assert np.all(np.abs(actual - expected) <= 4 * standard_error + 1e-5), (actual, expected)
  # Tighter than sampling: each dim's E[−2 log cosh u] by the trapezoid rule on a fine grid.
  gaussian = np.asarray([_gaussian_entropy(row) for row in SQUASH_LOG_STD])
  integral = np.zeros_like(SQUASH_MEAN)
  for index, mu in np.ndenumerate(SQUASH_MEAN):
    sigma = math.exp(SQUASH_LOG_STD[index])
    u = np.linspace(mu - 12 * sigma, mu + 12 * sigma, 200_001)
    density = np.exp(-0.5 * ((u - mu) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
    integral[index] = np.trapezoid(-2.0 * np.log(np.cosh(u)) * density, u)
  np.testing.assert_allclose(entropy, gaussian + integral.sum(-1), rtol=0, atol=3e-5)
  # The Gaussian's entropy overstates it on every row (by 4 nats and more on the wide ones).
  assert np.all(gaussian - entropy > 0.1) and (gaussian - entropy).max() > 4.0


def test_squashed_entropy_needs_tanh():
  mean = jnp.zeros((1, 3))
  dist = HybridDistribution.create(HybridActionSpec(continuous_dim=3, branches=()), mean,
                                   mean, (), jnp.zeros((1, 0), bool), squash="clip")
  with pytest.raises(ValueError, match="squash='tanh'"):
    dist.entropy(squashed=True)


# --- sampling from pre-drawn noise ------------------------------------------------------------

TWO_BRANCHES = HybridActionSpec(1, (2, 3))


@pytest.mark.parametrize("jit", [False, True])
def test_sample_with_noise_by_hand(jit):
  """μ + σ·ε for the continuous dim; per branch the arg-max of logit + Gumbel, over the
  allowed choices only."""
  dist = HybridDistribution.create(
      TWO_BRANCHES, jnp.asarray([[0.5]]), jnp.log(jnp.asarray([2.0])),
      (jnp.log(jnp.asarray([[0.1, 0.9]])), jnp.asarray([[0.0, 5.0, 1.0]])),
      jnp.asarray([[True, True, True, False, True]]))
  noise = ActionNoise(jnp.asarray([[1.5]]), (jnp.asarray([[3.0, 0.0]]),
                                             jnp.asarray([[2.0, 50.0, 0.5]])))
  sample = jax.jit(HybridDistribution.sample_with) if jit else HybridDistribution.sample_with
  action = sample(dist, noise)
  np.testing.assert_allclose(action.continuous, [[0.5 + 2.0 * 1.5]], rtol=1e-6)
  # Branch 0: log 0.1 + 3 = 0.70 beats log 0.9 = −0.11. Branch 1: choice 1 (logit 5, noise
  # 50) is masked, so its −1e9 loses; 0 + 2 beats 1 + 0.5.
  np.testing.assert_array_equal(action.discrete, [[0, 0]])


def test_sample_is_sample_with_the_noise_its_key_draws():
  batch = (4, 3)
  rng = np.random.default_rng(0)
  dist = HybridDistribution.create(
      TWO_BRANCHES, jnp.asarray(rng.normal(size=batch + (1,)), jnp.float32),
      jnp.zeros((1,)), (jnp.asarray(rng.normal(size=batch + (2,)), jnp.float32),
                        jnp.asarray(rng.normal(size=batch + (3,)), jnp.float32)),
      jnp.ones(batch + (5,), bool))
  key = jax.random.key(7)
  noise = action_noise(key, TWO_BRANCHES, batch)
  assert noise.normal.shape == batch + (1,)
  assert [g.shape for g in noise.gumbel] == [batch + (2,), batch + (3,)]
  jax.tree.map(np.testing.assert_array_equal, dist.sample(key), dist.sample_with(noise))
  assert dist.spec == TWO_BRANCHES


# --- mode, mask_logits, to_env_action, validation ----------------------------------------------

def test_mode_is_mean_and_argmax_over_allowed_choices():
  mean, log_std, logits, mask, _ = _inputs_33()
  mode = HybridDistribution.create(SPEC_33, mean, log_std, logits, mask).mode()
  np.testing.assert_array_equal(mode.continuous, MEAN_33.astype(np.float32))
  # The largest raw logit (30) is on masked entries; among allowed, logits rise with index.
  np.testing.assert_array_equal(mode.discrete, [32])
  assert mode.discrete.dtype == jnp.int32


def test_mask_logits():
  out = mask_logits(jnp.asarray([1.0, 2.0, 3.0]), jnp.asarray([True, False, True]))
  np.testing.assert_array_equal(out, [1.0, MASKED_LOGIT, 3.0])


def test_to_env_action_clip_and_tanh():
  u = np.array([-50.0, -3.0, -0.5, 0.0, 0.7, 2.5, 50.0], np.float32)
  raw = HybridAction(jnp.asarray(u), jnp.asarray([4, 0], jnp.int32))

  clipped = to_env_action(raw, "clip")
  np.testing.assert_array_equal(
      clipped.continuous, np.float32([-1.0, -1.0, -0.5, 0.0, 0.7, 1.0, 1.0]))
  np.testing.assert_array_equal(clipped.discrete, [4, 0])

  squashed = to_env_action(raw, "tanh")
  np.testing.assert_allclose(squashed.continuous, [math.tanh(x) for x in u], rtol=0, atol=1e-6)
  assert np.all(np.abs(np.asarray(squashed.continuous)) <= 1.0)
  np.testing.assert_array_equal(squashed.discrete, [4, 0])


def test_create_validates_arguments():
  mean, log_std, logits, mask, _ = _inputs_33()
  with pytest.raises(ValueError, match="squash"):
    HybridDistribution.create(SPEC_33, mean, log_std, logits, mask, squash="softsign")
  with pytest.raises(AssertionError):
    HybridDistribution.create(SPEC_33, mean, log_std, logits + logits, mask)
  with pytest.raises(AssertionError):
    HybridDistribution.create(SPEC_33, mean, log_std, logits, mask[:-1])


def test_gradients_through_masked_logits_are_finite_and_zero_on_masked():
  mean, log_std, logits, mask, action = _inputs_33()

  def objective(branch_logits):
    dist = HybridDistribution.create(SPEC_33, mean, log_std, (branch_logits,), mask)
    return dist.log_prob(action) + 0.01 * dist.entropy()

  grad = np.asarray(jax.grad(objective)(logits[0]))
  assert np.all(np.isfinite(grad))
  np.testing.assert_array_equal(grad[~MASK_33], 0.0)


# --- property: masked choices are never sampled ------------------------------------------------

PROP_SPEC = HybridActionSpec(continuous_dim=2, branches=(3, 2, 33))
PROP_BATCH = 32
PROP_KEYS = 16


@jax.jit
def _sample_many(key, logits, mask):
  dist = HybridDistribution.create(
      PROP_SPEC, jnp.zeros((PROP_BATCH, 2)), jnp.zeros((2,)), logits, mask)
  return jax.vmap(dist.sample)(jax.random.split(key, PROP_KEYS)).discrete


@settings(deadline=None, max_examples=30)
@given(seed=st.integers(0, 2**32 - 1), allow_prob=st.floats(0.0, 1.0))
def test_masked_choices_are_never_sampled(seed, allow_prob):
  rng = np.random.default_rng(seed)
  mask = rng.random((PROP_BATCH, PROP_SPEC.mask_size)) < allow_prob
  logits = []
  for offset, n in zip(PROP_SPEC.branch_offsets, PROP_SPEC.branches):
    # At least one allowed choice per branch and row.
    mask[np.arange(PROP_BATCH), offset + rng.integers(0, n, PROP_BATCH)] = True
    branch_logits = rng.normal(0.0, 3.0, (PROP_BATCH, n))
    # Masked choices get the largest logits, the most tempting to sample by mistake.
    branch_logits[~mask[:, offset:offset + n]] += 20.0
    logits.append(jnp.asarray(branch_logits, jnp.float32))

  discrete = np.asarray(_sample_many(jax.random.key(seed), tuple(logits), jnp.asarray(mask)))
  assert discrete.shape == (PROP_KEYS, PROP_BATCH, PROP_SPEC.num_branches)
  for i, (offset, n) in enumerate(zip(PROP_SPEC.branch_offsets, PROP_SPEC.branches)):
    choice = discrete[..., i]
    assert np.all((0 <= choice) & (choice < n))
    rows = np.broadcast_to(np.arange(PROP_BATCH), choice.shape)
    assert np.all(mask[rows, offset + choice]), f"branch {i} sampled a masked choice"
