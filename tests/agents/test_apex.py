"""The apex learner step: gradient isolation between PPO and the auxiliary learners, and
the distillation coefficient's schedules and validation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mbjax.agents import apex, ppo
from mbjax.agents import world_model as wm_lib
from mbjax.data import replay as replay_lib
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
  learners (trained here from the replay the rollout was added to) never touch the policy
  unless distillation is switched on."""
  cfg = small_config()
  cfg.ppo.num_minibatches = 2
  cfg.num_envs, cfg.ppo.num_steps = 2, 16
  cfg.replay.update(capacity=2 * 32, prefill=0, train_ratio=1.0)
  network = ppo.make_network(cfg.network, spec)
  optimizer = ppo.make_optimizer(cfg.ppo, 10)
  learners = apex.make_learners(cfg, spec, (5,))
  agent = ppo.init(jax.random.PRNGKey(0), network, optimizer, (5,), jnp.float32)
  aux = apex.init(jax.random.PRNGKey(1), learners, (5,), jnp.float32)
  replay = apex.init_replay(learners, 2, (5,), jnp.float32)
  rollout = _rollout(np.random.default_rng(4), spec)
  key = jax.random.PRNGKey(5)
  step = jax.jit(lambda a, x, b, r, k: apex.update(a, x, b, r, k, learners=learners,
                                                   network=network, optimizer=optimizer))
  new_agent, new_aux, new_replay, metrics = step(agent, aux, replay, rollout, key)
  alone, _ = ppo.update(agent, rollout, jax.random.split(key, 3)[0], cfg.ppo, network=network,
                        optimizer=optimizer)
  jax.tree.map(np.testing.assert_array_equal, new_agent.params, alone.params)
  assert learners.model_updates == 1 and int(new_replay.size[0]) == 16
  for name in ("world_model", "dream", "efe"):
    before = jax.tree.leaves(getattr(aux, name))
    after = jax.tree.leaves(getattr(new_aux, name))
    assert any(not np.array_equal(a, b) for a, b in zip(before, after)), name
  for key_name in ("wm/recon", "wm/kl", "dream/return", "efe/risk", "efe/ambiguity"):
    assert np.isfinite(metrics[key_name]), key_name
  assert float(metrics["model/trained"]) == 1.0

  # With distillation on, the policy moves towards the dream actor; a linear schedule at
  # the end of the run weighs the teacher by 0: PPO alone again. (One compile: `progress`
  # is traced.)
  cfg.served.distill_from, cfg.served.distill_coef = "dream", 1.0
  cfg.served.distill_schedule = "linear"
  distill_step = jax.jit(lambda a, x, b, r, k, p: apex.update(
      a, x, b, r, k, learners=learners, network=network, optimizer=optimizer, progress=p))
  distilled, _, _, metrics = distill_step(agent, aux, replay, rollout, key, 0.0)
  assert metrics["loss/distill"] > 0 and metrics["loss/distill_coef"] == 1.0
  assert not np.array_equal(jax.tree.leaves(distilled.params)[0],
                            jax.tree.leaves(alone.params)[0])
  ended, _, _, metrics = distill_step(agent, aux, replay, rollout, key, 1.0)
  assert metrics["loss/distill"] > 0 and metrics["loss/distill_coef"] == 0.0
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               ended.params, alone.params)


def test_model_updates_wait_for_the_prefill(small_config, spec):
  """Before the replay holds `replay.prefill` env steps the learners are untouched and
  the metrics say so; `model_updates` follows the train ratio."""
  cfg = small_config()
  cfg.num_envs, cfg.ppo.num_steps = 2, 16
  cfg.replay.update(capacity=2 * 32, prefill=48, train_ratio=2.0)  # 2·(2·16)/(4·8) = 2
  learners = apex.make_learners(cfg, spec, (5,))
  assert learners.model_updates == 2
  aux = apex.init(jax.random.PRNGKey(1), learners, (5,), jnp.float32)
  replay = apex.init_replay(learners, 2, (5,), jnp.float32)
  rollout = _rollout(np.random.default_rng(4), spec)
  transitions = wm_lib.Sequence(rollout.obs, jnp.zeros((16, 2, 5)), rollout.reward,
                                rollout.terminated, rollout.is_first, rollout.mask)
  add = lambda r: replay_lib.add_streams(r, jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1),
                                                         transitions))
  train = jax.jit(lambda x, r, k: apex.train_from_replay(x, r, k, learners=learners))
  replay = add(replay)  # 32 env steps stored: below the prefill of 48
  same, metrics = train(aux, replay, jax.random.PRNGKey(2))
  assert float(metrics["model/trained"]) == 0.0 and float(metrics["wm/loss"]) == 0.0
  jax.tree.map(np.testing.assert_array_equal, same, aux)
  replay = add(replay)  # 64 ≥ 48
  moved, metrics = train(aux, replay, jax.random.PRNGKey(2))
  assert float(metrics["model/trained"]) == 1.0 and float(metrics["wm/loss"]) > 0.0
  assert not np.array_equal(jax.tree.leaves(moved.world_model)[0],
                            jax.tree.leaves(aux.world_model)[0])
  cfg.replay.train_ratio = 0.1
  with pytest.raises(ValueError, match="replay.train_ratio=0.1.*expected at least 1"):
    apex.model_updates(cfg)


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
