"""The world-model benchmark's open-loop bookkeeping (`experiments/bench_world_model.py`),
by hand: which starts stay in one episode, and the copy-last baseline."""
import jax
import jax.numpy as jnp
import numpy as np

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
