"""The world-model benchmark's open-loop bookkeeping (`experiments/bench_world_model.py`),
by hand: which starts stay in one episode, and the copy-last baseline."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import bench_world_model
from mbjax.agents import apex
from mbjax.envs.spaces import HybridActionSpec
from mbjax.train import config as config_lib


def test_open_loop_masks_episode_ends_and_copy_last_is_by_hand():
  cfg = config_lib.base_config()
  cfg.world_model.update(deter=16, blocks=2, stoch=4, classes=4, hidden=16)
  spec = HybridActionSpec(1, (2,))
  learners = apex.make_learners(cfg, spec, (3,))
  aux = apex.init(jax.random.PRNGKey(0), learners, (3,), jnp.float32)
  length, envs, horizon = 20, 2, bench_world_model.HORIZON
  rng = np.random.default_rng(0)
  obs = rng.normal(size=(length, envs, 3)).astype(np.float32)
  is_first = np.zeros((length, envs), bool)
  is_first[0] = True
  is_first[9, 1] = True  # env 1 starts a new episode at step 9
  data = {"obs": obs, "action": rng.normal(size=(length, envs, 3)).astype(np.float32),
          "reward": rng.normal(size=(length, envs)).astype(np.float32), "is_first": is_first}
  model_error, copy_error, predicted, real, inside = jax.device_get(jax.jit(
      lambda d: bench_world_model.open_loop(learners, aux.world_model.params, d,
                                            jax.random.PRNGKey(1)))(data))
  assert model_error.shape == (length - horizon, envs, horizon)
  # Env 0 never resets: every (start, k) is inside. Env 1: from start t, o_{t+k} is in the
  # same episode while t + k < 9 (k = 1..15, stored at index k − 1).
  assert inside[:, 0].all()
  for t in range(length - horizon):
    np.testing.assert_array_equal(inside[t, 1], [t + k < 9 for k in range(1, horizon + 1)])
  target = np.sign(obs) * np.log1p(np.abs(obs))
  for t, k in ((0, 1), (3, 7), (4, 15)):
    expected = np.square(target[t] - target[t + k]).mean(-1)
    np.testing.assert_allclose(copy_error[t, :, k - 1], expected, rtol=1e-5)
    np.testing.assert_allclose(real[t, :, k - 1], data["reward"][t + k - 1])
  assert np.isfinite(model_error).all() and np.isfinite(predicted).all()


def test_play_records_each_step_before_the_action_and_restarts_finished_episodes():
  """`play` with a carry-less policy: step t holds the observation and mask the action was
  chosen on, the action as the model's vector, and is_first exactly after a finished
  episode (BonkArena with a short time limit, random actions)."""
  from mbjax.envs import registry
  from mbjax.envs.bonk_arena import random_policy
  from mbjax.agents import world_model as wm_lib

  env, params = registry.make("bonk_arena", observation="vector")
  params = params.replace(time_limit=12)
  spec = env.action_spec(params)
  envs, length = 3, 40
  data = jax.device_get(jax.jit(lambda k: bench_world_model.play(
      env, params, spec, bench_world_model._Stateless(random_policy), envs, length, k))(
          jax.random.PRNGKey(0)))
  assert data["obs"].shape[:2] == (length, envs)
  assert data["action"].shape == (length, envs, wm_lib.action_vector_size(spec))
  done = data["terminated"] | data["truncated"]
  assert done.any()
  np.testing.assert_array_equal(data["is_first"][0], True)
  np.testing.assert_array_equal(data["is_first"][1:], done[:-1])
  masks = jax.vmap(jax.vmap(env.action_mask, in_axes=(0, None)), in_axes=(0, None))(
      data["state"], params)
  np.testing.assert_array_equal(data["mask"], masks)


def test_copy_last_ratios_and_reward_pearson_by_hand():
  horizon = bench_world_model.HORIZON
  rng = np.random.default_rng(0)
  model_error = rng.uniform(size=(6, 2, horizon))
  copy_error = rng.uniform(0.5, 1.0, size=(6, 2, horizon))
  inside = np.ones((6, 2, horizon), bool)
  inside[4:, 1, 3:] = False
  ratios = bench_world_model.copy_last_ratios(model_error, copy_error, inside)
  k = 5
  keep = inside[..., k]
  assert ratios.shape == (horizon,)
  np.testing.assert_allclose(ratios[k], model_error[..., k][keep].mean()
                             / copy_error[..., k][keep].mean())
  real = rng.normal(size=(6, 2, horizon))
  step_r, sum_r = bench_world_model.reward_pearson(2.0 * real + 1.0, real, inside)
  np.testing.assert_allclose([step_r, sum_r], [1.0, 1.0], rtol=1e-6)
  assert bench_world_model.reward_pearson(-real, real, inside)[0] == pytest.approx(-1.0)
