"""The PPO objective (with the Gaussian or the squashed entropy bonus) and observation
statistics against formulas computed in numpy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mbjax.agents import ppo
from mbjax.envs.spaces import HybridAction, HybridActionSpec
from mbjax.nets.hybrid import expected_tanh_log_det
from mbjax.train import config as config_lib

SPEC = HybridActionSpec(continuous_dim=2, branches=(3,))


def _config(clip_value_loss, squashed_entropy=False):
  cfg = config_lib.base_config()
  cfg.network.squash = "tanh" if squashed_entropy else "clip"
  cfg.ppo.squashed_entropy = squashed_entropy
  cfg.ppo.clip_value_loss = clip_value_loss
  cfg.ppo.clip_eps = 0.2
  cfg.ppo.vf_coef = 0.5
  cfg.ppo.ent_coef = 0.01
  return cfg


def _minibatch(rng, length, batch):
  obs = rng.normal(size=(length, batch, 5)).astype(np.float32)
  action = HybridAction(rng.normal(size=(length, batch, 2)).astype(np.float32),
                        rng.integers(0, 3, size=(length, batch, 1)).astype(np.int32))
  rollout = ppo.Rollout(
      obs=obs, is_first=np.zeros((length, batch), bool), carry=(),
      mask=np.ones((length, batch, 3), bool), action=action,
      log_prob=rng.normal(-3.0, 0.3, size=(length, batch)).astype(np.float32),
      value=rng.normal(size=(length, batch)).astype(np.float32),
      reward=None, terminated=None, truncated=None, next_value=None)
  advantage = rng.normal(size=(length, batch)).astype(np.float32)
  target = rng.normal(size=(length, batch)).astype(np.float32)
  return ppo.Minibatch(rollout, advantage, target)


@pytest.mark.parametrize("clip_value_loss,jit,squashed_entropy", [
    (True, True, False), (True, False, False), (False, True, False), (False, False, False),
    (True, True, True)])
def test_loss_matches_the_clipped_surrogate_formula(clip_value_loss, jit, squashed_entropy):
  cfg = _config(clip_value_loss, squashed_entropy)
  network = ppo.make_network(cfg.network, SPEC)
  state = ppo.init(jax.random.PRNGKey(0), network, ppo.make_optimizer(cfg.ppo, 10), (5,),
                   jnp.float32)
  batch = _minibatch(np.random.default_rng(0), 4, 6)
  loss_fn = lambda params, batch, stats: ppo.loss(params, batch, cfg.ppo, network=network,
                                                 obs_stats=stats)
  loss_fn = jax.jit(loss_fn) if jit else loss_fn
  total, metrics = loss_fn(state.params, batch, state.obs_stats)

  # The network's outputs, then the objective by hand.
  _, dist, value = network.apply(state.params, (), batch.rollout.obs.reshape(24, 5),
                                 np.zeros(24, bool), np.ones((24, 3), bool))
  log_prob = np.asarray(dist.log_prob(jax.tree.map(lambda x: x.reshape(24, -1),
                                                   batch.rollout.action)))
  entropy = np.asarray(dist.entropy()).mean()
  if squashed_entropy:  # the bonus is on tanh(u): H[u] + Σ_d E[log(1 − tanh²(u_d))]
    entropy += np.asarray(expected_tanh_log_det(dist.mean, jnp.exp(dist.log_std))).sum(-1).mean()
  value = np.asarray(value)
  adv = batch.advantage.reshape(-1)
  adv = (adv - adv.mean()) / (adv.std() + 1e-8)
  ratio = np.exp(log_prob - batch.rollout.log_prob.reshape(-1))
  policy_loss = -np.minimum(ratio * adv, np.clip(ratio, 0.8, 1.2) * adv).mean()
  target, old_value = batch.target.reshape(-1), batch.rollout.value.reshape(-1)
  error = (value - target) ** 2
  if clip_value_loss:
    clipped = old_value + np.clip(value - old_value, -0.2, 0.2)
    error = np.maximum(error, (clipped - target) ** 2)
  value_loss = 0.5 * error.mean()
  expected = policy_loss + 0.5 * value_loss - 0.01 * entropy

  np.testing.assert_allclose(metrics["loss/policy"], policy_loss, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics["loss/value"], value_loss, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics["policy/entropy"], entropy, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(total, expected, rtol=1e-5, atol=1e-6)
  # A distillation teacher without its coefficient is refused.
  taught = batch._replace(rollout=batch.rollout._replace(teacher=dist))
  with pytest.raises(ValueError, match="carries a distillation teacher; pass distill_coef"):
    loss_fn(state.params, taught, state.obs_stats)


def test_observation_statistics_track_mean_and_variance():
  rng = np.random.default_rng(1)
  first = rng.normal(3.0, 2.0, size=(50, 4, 3)).astype(np.float32)
  second = rng.normal(-1.0, 0.5, size=(30, 4, 3)).astype(np.float32)
  stats = ppo.ObservationStatistics.create((3,))
  stats = stats.update(jnp.asarray(first), None).update(jnp.asarray(second), None)
  everything = np.concatenate([first.reshape(-1, 3), second.reshape(-1, 3)])
  # The initial pseudo-count of 1e-4 shifts the moments by ~1e-6 relative.
  np.testing.assert_allclose(stats.mean, everything.mean(0), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(stats.var, everything.var(0), rtol=1e-4)
  np.testing.assert_allclose(stats.count, everything.shape[0], rtol=1e-5)
  normalized = stats.normalize(jnp.asarray(everything))
  np.testing.assert_allclose(np.asarray(normalized).mean(0), 0.0, atol=1e-3)
  np.testing.assert_allclose(np.asarray(normalized).std(0), 1.0, rtol=1e-3)
