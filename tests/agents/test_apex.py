"""The apex learner step: gradient isolation between PPO and the auxiliary learners, and
the distillation coefficient's schedules and validation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mbjax.agents import apex, ppo
from mbjax.train import config as config_lib


def _rollout(rng, spec, length=16, envs=2, obs_dim=5):
  is_first = np.zeros((length, envs), bool)
  is_first[0] = True
  terminated = np.zeros((length, envs), bool)
  terminated[9, 0] = True
  is_first[10, 0] = True
  return ppo.Rollout(
      obs=rng.normal(size=(length, envs, obs_dim)).astype(np.float32), is_first=is_first,
      carry=(), mask=np.ones((length, envs, 3), bool),
      action=spec.zeros((length, envs))._replace(
          continuous=rng.normal(size=(length, envs, 2)).astype(np.float32)),
      log_prob=np.full((length, envs), -2.0, np.float32),
      value=np.zeros((length, envs), np.float32),
      reward=rng.normal(size=(length, envs)).astype(np.float32), terminated=terminated,
      truncated=np.zeros((length, envs), bool),
      next_value=np.zeros((length, envs), np.float32))


def test_apex_step_keeps_gradients_apart(small_config, spec):
  """PPO's update inside the apex step equals PPO alone: the world model, dream and EFE
  learners never touch the policy unless distillation is switched on."""
  cfg = small_config()
  cfg.ppo.num_minibatches = 2
  network = ppo.make_network(cfg.network, spec)
  optimizer = ppo.make_optimizer(cfg.ppo, 10)
  learners = apex.make_learners(cfg, spec, (5,))
  agent = ppo.init(jax.random.PRNGKey(0), network, optimizer, (5,), jnp.float32)
  aux = apex.init(jax.random.PRNGKey(1), learners, (5,), jnp.float32)
  rollout = _rollout(np.random.default_rng(4), spec)
  key = jax.random.PRNGKey(5)
  step = jax.jit(lambda a, x, r, k: apex.update(a, x, r, k, learners=learners,
                                                network=network, optimizer=optimizer))
  new_agent, new_aux, metrics = step(agent, aux, rollout, key)
  alone, _ = ppo.update(agent, rollout, jax.random.split(key, 7)[0], cfg.ppo, network=network,
                        optimizer=optimizer)
  jax.tree.map(np.testing.assert_array_equal, new_agent.params, alone.params)
  for name in ("world_model", "dream", "efe"):
    before = jax.tree.leaves(getattr(aux, name))
    after = jax.tree.leaves(getattr(new_aux, name))
    assert any(not np.array_equal(a, b) for a, b in zip(before, after)), name
  for key_name in ("wm/recon", "wm/kl", "dream/return", "efe/risk", "efe/ambiguity"):
    assert np.isfinite(metrics[key_name]), key_name

  # With distillation on, the policy moves towards the dream actor; a linear schedule at
  # the end of the run weighs the teacher by 0: PPO alone again. (One compile: `progress`
  # is traced.)
  cfg.served.distill_from, cfg.served.distill_coef = "dream", 1.0
  cfg.served.distill_schedule = "linear"
  distill_step = jax.jit(lambda a, x, r, k, p: apex.update(
      a, x, r, k, learners=learners, network=network, optimizer=optimizer, progress=p))
  distilled, _, metrics = distill_step(agent, aux, rollout, key, 0.0)
  assert metrics["loss/distill"] > 0 and metrics["loss/distill_coef"] == 1.0
  assert not np.array_equal(jax.tree.leaves(distilled.params)[0],
                            jax.tree.leaves(alone.params)[0])
  ended, _, metrics = distill_step(agent, aux, rollout, key, 1.0)
  assert metrics["loss/distill"] > 0 and metrics["loss/distill_coef"] == 0.0
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               ended.params, alone.params)


@pytest.mark.parametrize("jit", [False, True])
def test_distill_coef_schedules_hand_computed(jit, small_config):
  cfg = small_config()
  cfg.served.distill_coef = 0.1
  for schedule, end, cases in (
      ("constant", 1.0, ((0.0, 0.1), (0.5, 0.1), (0.999, 0.1))),
      ("constant", 0.25, ((0.0, 0.1), (0.24, 0.1), (0.25, 0.0), (0.6, 0.0))),
      ("linear", 1.0, ((0.0, 0.1), (0.25, 0.075), (1.0, 0.0), (1.5, 0.0))),
      ("linear", 0.5, ((0.0, 0.1), (0.125, 0.075), (0.5, 0.0), (0.9, 0.0)))):
    cfg.served.distill_schedule, cfg.served.distill_end = schedule, end
    coef = lambda progress: apex.distill_coef(cfg.served, progress)
    coef = jax.jit(coef) if jit else coef
    for progress, expected in cases:
      np.testing.assert_allclose(coef(progress), expected, rtol=1e-6, atol=1e-9,
                                 err_msg=f"{schedule} to {end} at {progress}")


def test_distill_end_is_validated(small_config):
  cfg = small_config()
  cfg.served.distill_end = 0.0
  with pytest.raises(ValueError, match="served.distill_end=0.0"):
    config_lib.validate(cfg)
