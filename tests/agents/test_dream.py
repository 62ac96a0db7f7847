"""The latent actor-critic's pieces against hand-computed values: replayed λ-returns, the
percentile return scale, unimix choices, the near-fixed initial actor, the zero-initialised
two-hot critic and the slow critic's EMA."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mbjax.agents import apex, dream
from mbjax.agents import world_model as wm_lib
from mbjax.agents.symlog import twohot_mean


@pytest.mark.parametrize("jit", [False, True])
def test_replay_returns_hand_computed(jit):
  # One stream of 5 steps, γ = 0.5, λ = 0.5, bootstrap values b = 10, 20, 30, 40, 50.
  # Step 1 terminates (the episode ends there), a new episode starts at step 2; step 3 is
  # truncated (is_first at 4 without termination); step 4 is the window's last. Steps 3 and
  # 4 have no known return: weight 0.
  reward = jnp.array([[1.0], [2.0], [3.0], [4.0], [5.0]])
  terminated = jnp.array([[False], [True], [False], [False], [False]])
  is_first = jnp.array([[True], [False], [True], [False], [True]])
  boot = jnp.array([[10.0], [20.0], [30.0], [40.0], [50.0]])
  replayed = dream.ReplayedReturns(jnp.zeros((5, 1, 3)), reward, terminated, is_first)
  fn = jax.jit(dream.replay_returns, static_argnums=(2, 3)) if jit else dream.replay_returns
  returns, weights = fn(replayed, boot, 0.5, 0.5)
  r1 = 2.0  # terminal: no bootstrap
  r0 = 1.0 + 0.5 * (0.5 * 20.0 + 0.5 * r1)
  r2 = 3.0 + 0.5 * 40.0  # its successor's return is unknown (truncated): b_3 alone
  np.testing.assert_allclose(returns[:3, 0], [r0, r1, r2], rtol=1e-6)
  np.testing.assert_allclose(weights[:, 0], [1.0, 1.0, 1.0, 0.0, 0.0])


def test_return_scale_is_an_ema_of_the_percentile_spread():
  returns = jnp.arange(101, dtype=jnp.float32)  # P5 = 5, P95 = 95
  scale = dream.updated_return_scale(jnp.float32(1.0), returns, 0.01)
  np.testing.assert_allclose(scale, 0.99 * 1.0 + 0.01 * 90.0, rtol=1e-6)


def _actor(spec, **changes):
  fields = dict(hidden_sizes=(16,), squash="clip", unimix=0.01, outscale=0.01)
  fields.update(changes)
  return dream.LatentActor(spec, **fields)


def test_unimix_mixes_the_uniform_over_allowed_choices_only(spec):
  logits = jnp.array([[2.0, 0.0, -1.0]])
  mask = jnp.array([[True, True, False]])
  mixed = jnp.exp(dream._unimix_logits(logits, mask, 0.1))[0]
  softmax = np.exp([2.0, 0.0]) / np.exp([2.0, 0.0]).sum()
  np.testing.assert_allclose(mixed[:2], 0.9 * softmax + 0.1 * 0.5, rtol=1e-6)
  # The masked choice keeps probability 0 once the distribution masks it.
  features = jnp.zeros((1, 8))
  actor = _actor(spec)
  params = actor.init(jax.random.PRNGKey(0), features)
  dist = actor.apply(params, features, mask)
  probs = jax.nn.softmax(dist.logits[0], -1)[0]
  assert float(probs[2]) == 0.0 and float(probs[:2].min()) >= 0.01 * 0.5 - 1e-7


def test_the_initial_actor_is_near_a_fixed_distribution_but_not_constant(spec):
  """outscale 0.01: choices within a few 1e-3 of uniform and a mean near 0, yet they vary
  with the features (a zero-initialised layer would not, and would move only through its
  bias at first); the std sits halfway between its bounds."""
  actor = _actor(spec)
  features = jax.random.normal(jax.random.PRNGKey(1), (64, 8))
  params = actor.init(jax.random.PRNGKey(0), features)
  dist = actor.apply(params, features)
  probs = jax.nn.softmax(dist.logits[0], -1)
  assert float(jnp.abs(probs - 1 / 3).max()) < 5e-3
  assert float(jnp.abs(dist.mean).max()) < 0.05
  assert float(probs.std(0).max()) > 1e-5 and float(dist.mean.std(0).max()) > 1e-4
  np.testing.assert_allclose(jnp.exp(dist.log_std), 0.55, atol=0.01)
  # The usual scale (outscale 1) is far from uniform: the 0.01 is what keeps it close.
  wide = _actor(spec, outscale=1.0)
  wide_probs = jax.nn.softmax(wide.apply(wide.init(jax.random.PRNGKey(0), features),
                                         features).logits[0], -1)
  assert float(jnp.abs(wide_probs - 1 / 3).max()) > 0.1


def test_critic_starts_at_zero_and_the_slow_critic_follows_by_ema(small_config, spec):
  cfg = small_config()
  nets = dream.make_networks(cfg.dream, spec, "clip")
  state = dream.init(jax.random.PRNGKey(0), nets, 16)
  features = jax.random.normal(jax.random.PRNGKey(1), (4, 16))
  np.testing.assert_allclose(twohot_mean(nets.critic.apply(state.critic_params, features)),
                             0.0, atol=1e-6)
  # One update against a constant-reward imagination: slow = 0.98 slow + 0.02 critic.
  model = wm_lib.make_world_model(cfg.world_model, (5,), spec)
  wm_params = wm_lib.init(jax.random.PRNGKey(2), model, wm_lib.make_optimizer(cfg.world_model),
                          (5,), jnp.float32, wm_lib.action_vector_size(spec)).params
  feature_size = model.rssm.deter + model.rssm.stoch_size
  state = dream.init(jax.random.PRNGKey(0), nets, feature_size)
  start = jax.tree.map(lambda x: x[:, 0], jax.jit(lambda: wm_lib.observe(
      model, wm_params, jnp.ones((1, 6, 5)), jnp.zeros((1, 6, 5)), jnp.ones((1, 6), bool),
      jax.random.PRNGKey(3))[0])())
  reward_fn = lambda f: (jnp.ones(f.shape[:-1]), {})
  new, metrics = jax.jit(lambda s, p, x, k: dream.update(
      s, p, x, k, cfg.dream, nets=nets, world_model=model, reward_fn=reward_fn))(
          state, wm_params, start, jax.random.PRNGKey(4))
  rate = cfg.dream.slow_critic_rate
  jax.tree.map(lambda slow, old, critic: np.testing.assert_allclose(
      slow, (1 - rate) * old + rate * critic, rtol=1e-5, atol=1e-7),
      new.slow_critic_params, state.slow_critic_params, new.critic_params)
  assert float(metrics["dream/return"]) > 1.0  # a reward of 1 every step
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(new.actor_params),
                                                      jax.tree.leaves(state.actor_params)))


def test_latent_actor_acts_through_the_filter_and_honours_the_mask(small_config, spec):
  """The served latent policy: the posterior it carries equals one filter step, and a
  masked choice is never taken."""
  cfg = small_config()
  cfg.served.policy = "dreamer"
  learners = apex.make_learners(cfg, spec, (5,))
  aux = apex.init(jax.random.PRNGKey(0), learners, (5,), jnp.float32)
  carry = apex.initial_latent_carry(learners, 64)
  obs = jax.random.normal(jax.random.PRNGKey(1), (64, 5))
  mask = jnp.array([[False, True, False]] * 64)
  act = jax.jit(lambda c, o, m, k: apex.act(aux, c, o, jnp.ones((64,), bool), m, k,
                                            learners=learners))
  new_carry, raw = act(carry, obs, mask, jax.random.PRNGKey(2))
  assert np.all(np.asarray(raw.discrete[:, 0]) == 1)
  post = wm_lib.filter_step(learners.world_model, aux.world_model.params, carry.state,
                            jnp.zeros((64, 5)), obs, jnp.ones((64,), bool),
                            jax.random.split(jax.random.PRNGKey(2))[0])
  np.testing.assert_allclose(new_carry.state.deter, post.deter, rtol=1e-5, atol=1e-6)
  assert new_carry.prev_action.shape == (64, 5)
  assert math.isclose(float(new_carry.prev_action[0, 2 + 1]), 1.0)  # one-hot of choice 1


@pytest.mark.parametrize("jit", [False, True])
def test_behaviour_recovers_the_raw_recorded_actions_by_hand(spec, jit):
  # Action vectors: continuous (2), then the one-hot of the one branch (3 choices).
  vector = jnp.array([[0.5, -1.0, 0.0, 1.0, 0.0], [0.2, 0.3, 0.0, 0.0, 1.0]])
  mask = jnp.array([[True, True, True], [True, True, False]])  # row 1's choice 2 is masked
  features = jnp.zeros((2, 4))
  fn = (jax.jit(dream.recorded_behaviour, static_argnums=(3, 4)) if jit
        else dream.recorded_behaviour)
  clipped = fn(features, vector, mask, spec, "clip")
  np.testing.assert_allclose(clipped.action.continuous, vector[:, :2])
  np.testing.assert_array_equal(clipped.action.discrete, [[1], [2]])
  np.testing.assert_array_equal(clipped.weight, [1.0, 0.0])
  # tanh: atanh(0.5) = 0.549306, atanh(−0.999) = −3.800201 (−1 clipped inside), atanh(0.2)
  # = 0.202733, atanh(0.3) = 0.309520.
  tanh = fn(features, vector, mask, spec, "tanh")
  np.testing.assert_allclose(tanh.action.continuous,
                             [[0.549306, -3.800201], [0.202733, 0.309520]], rtol=1e-5)


def test_the_behaviour_term_pulls_the_actor_to_the_recorded_actions(small_config, spec):
  """With bc_scale > 0 and no reward, updates raise the log-likelihood of the recorded
  actions (a fixed continuous action and choice); its metric is the weighted mean of
  log π over the allowed steps, and a step whose choice is masked counts for nothing."""
  cfg = small_config()
  cfg.dream.update(bc_scale=1.0, actor_lr=3e-3)
  nets = dream.make_networks(cfg.dream, spec, "clip")
  model = wm_lib.make_world_model(cfg.world_model, (5,), spec)
  wm_params = wm_lib.init(jax.random.PRNGKey(2), model, wm_lib.make_optimizer(cfg.world_model),
                          (5,), jnp.float32, wm_lib.action_vector_size(spec)).params
  feature_size = model.rssm.deter + model.rssm.stoch_size
  state = dream.init(jax.random.PRNGKey(0), nets, feature_size)
  obs = jax.random.normal(jax.random.PRNGKey(5), (1, 8, 5))  # one step of 8 streams
  start = jax.tree.map(lambda x: x[0], jax.jit(lambda: wm_lib.observe(
      model, wm_params, obs, jnp.zeros((1, 8, 5)), jnp.ones((1, 8), bool),
      jax.random.PRNGKey(3))[0])())
  vector = jnp.tile(jnp.array([[0.6, -0.6, 0.0, 0.0, 1.0]]), (8, 1))
  mask = jnp.ones((8, 3), bool).at[0, 2].set(False)  # step 0's recorded choice is masked
  behaviour = dream.recorded_behaviour(start.features, vector, mask, spec, "clip")
  zero_reward = lambda f: (jnp.zeros(f.shape[:-1]), {})
  update = jax.jit(lambda s, k: dream.update(s, wm_params, start, k, cfg.dream, nets=nets,
                                             world_model=model, reward_fn=zero_reward,
                                             behaviour=behaviour))
  log_probs = nets.actor.apply(state.actor_params, start.features, mask).log_prob(
      behaviour.action)
  first = None
  for step in range(40):
    state, metrics = update(state, jax.random.PRNGKey(10 + step))
    if first is None:
      first = float(metrics["dream/behaviour_log_prob"])
      # The allowed steps 1…7 only (step 0's masked choice would be about −1e9).
      np.testing.assert_allclose(first, float(log_probs[1:].mean()), rtol=1e-5)
  last = float(metrics["dream/behaviour_log_prob"])
  # Measured: −2.92 → 1.17 (the std shrinks, the choice's probability rises from 1/3).
  assert last > first + 2.0, (first, last)
  dist = nets.actor.apply(state.actor_params, start.features[1:], mask[1:])
  assert float(jax.nn.softmax(dist.logits[0], -1)[:, 2].min()) > 0.8
  np.testing.assert_allclose(dist.mean, np.tile([0.6, -0.6], (7, 1)), atol=0.15)


@pytest.mark.parametrize("jit", [False, True])
def test_advantage_weights_by_hand(jit):
  fn = jax.jit(dream.advantage_weights, static_argnums=(2, 3)) if jit else dream.advantage_weights
  weights = fn(jnp.array([0.0, 1.0, -1.0, 2.0, 3.0]), jnp.array([1.0, 1.0, 1.0, 1.0, 0.0]),
               0.5, 20.0)
  # exp(0) = 1, exp(2) = 7.389056, exp(−2) = 0.135335, exp(4) = 54.6 capped at 20; the last
  # step's return is unknown.
  np.testing.assert_allclose(weights, [1.0, 7.389056, 0.135335, 20.0, 0.0], rtol=1e-5)


@pytest.mark.parametrize("temperature", [0.0, 0.1])
def test_advantage_weighting_imitates_the_recorded_play_that_paid(small_config, spec,
                                                                  temperature):
  """The same state recorded 8 times, half moving +0.6 and earning 1 before the episode
  ends, half moving −0.6 and earning 0. Imitated alike, the actor's mean stays between the
  two; weighted by advantage, it moves to +0.6."""
  cfg = small_config()
  cfg.dream.update(bc_scale=1.0, actor_lr=3e-3, bc_temperature=temperature)
  nets = dream.make_networks(cfg.dream, spec, "clip")
  model = wm_lib.make_world_model(cfg.world_model, (5,), spec)
  wm_params = wm_lib.init(jax.random.PRNGKey(2), model, wm_lib.make_optimizer(cfg.world_model),
                          (5,), jnp.float32, wm_lib.action_vector_size(spec)).params
  state = dream.init(jax.random.PRNGKey(0), nets, model.rssm.deter + model.rssm.stoch_size)
  obs = jax.random.normal(jax.random.PRNGKey(5), (1, 1, 5))
  one = jax.tree.map(lambda x: x[0], jax.jit(lambda: wm_lib.observe(
      model, wm_params, obs, jnp.zeros((1, 1, 5)), jnp.ones((1, 1), bool),
      jax.random.PRNGKey(3))[0])())
  start = jax.tree.map(lambda x: jnp.tile(x, (8,) + (1,) * (x.ndim - 1)), one)
  good = jnp.arange(8) % 2 == 0
  vector = jnp.where(good[:, None], jnp.array([0.6, 0.6, 1.0, 0.0, 0.0]),
                     jnp.array([-0.6, -0.6, 1.0, 0.0, 0.0]))
  behaviour = dream.recorded_behaviour(start.features, vector, jnp.ones((8, 3), bool), spec,
                                       "clip")
  # One replayed step of 8 streams [L=1, B=8], each its episode's last (terminated).
  replayed = dream.ReplayedReturns(start.features[None], good.astype(jnp.float32)[None],
                                   jnp.ones((1, 8), bool), jnp.ones((1, 8), bool))
  zero_reward = lambda f: (jnp.zeros(f.shape[:-1]), {})
  update = jax.jit(lambda s, k: dream.update(s, wm_params, start, k, cfg.dream, nets=nets,
                                             world_model=model, reward_fn=zero_reward,
                                             replayed=replayed, behaviour=behaviour))
  for step in range(60):
    state, metrics = update(state, jax.random.PRNGKey(10 + step))
  mean = float(nets.actor.apply(state.actor_params, start.features[:1],
                                jnp.ones((1, 3), bool)).mean[0, 0])
  if temperature:
    # Measured: mean 0.54, mean weight 10.5 (imitated alike: −0.003, 1). The critic has
    # learnt part of the good half's return, so their weight is below the cap.
    assert mean > 0.4 and float(metrics["dream/behaviour_weight"]) > 1.0, mean
  else:
    assert abs(mean) < 0.15 and float(metrics["dream/behaviour_weight"]) == 1.0, mean
