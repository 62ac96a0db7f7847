"""The one-step delta head: it reads the action, and it starts as copy-last with
per-dimension errors computed by hand."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mbjax.agents import world_model as wm_lib


@pytest.mark.parametrize("jit", [False, True])
def test_delta_head_reads_the_action_itself(jit, small_config):
  """The one-step head reads o_t and a_t: with o_t held fixed, a different a_t changes the
  predicted delta (once the zero-initialised output layer has moved), in the plain head's
  dimensions and in an entity block's."""
  cfg = small_config()
  cfg.world_model.predict_delta = True
  cfg.world_model.entity_slots = ((3, 2, 3, 1),)
  model = wm_lib.make_world_model(cfg.world_model, (9,))
  params = wm_lib.init(jax.random.PRNGKey(0), model, wm_lib.make_optimizer(cfg.world_model), (9,),
                       jnp.float32, 5).params
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda x: x + 0.3 * jnp.asarray(rng.normal(size=x.shape), x.dtype),
                        params)
  obs = jnp.asarray(rng.normal(size=(2, 9)), jnp.float32)
  obs = obs.at[:, (3, 6)].set(1.0).at[:, 4].set(0.2).at[:, 7].set(0.7)  # sorted, present
  delta = lambda action: model.apply(params, obs, action,
                                     method=wm_lib.WorldModel.next_obs_delta)
  delta = jax.jit(delta) if jit else delta
  still, moving = jnp.zeros((2, 5)), jnp.zeros((2, 5)).at[:, 0].set(1.0)
  change = np.abs(np.asarray(delta(moving)) - np.asarray(delta(still)))
  assert change[:, :3].min() > 0.0 and change[:, (4, 5, 7, 8)].min() > 0.0


def test_delta_head_starts_as_copy_last_and_errors_are_per_dimension(small_config):
  """With `predict_delta` the one-step prediction is o_t + head(...), and the head's output
  layer starts at zero: at initialisation the model's per-dimension errors equal copying
  o_t, computed here by hand in symlog space, over the steps that stay in an episode."""
  cfg = small_config()
  cfg.world_model.predict_delta = True
  model = wm_lib.make_world_model(cfg.world_model, (3,))
  params = wm_lib.init(jax.random.PRNGKey(0), model, wm_lib.make_optimizer(cfg.world_model), (3,),
                       jnp.float32, 5).params
  obs = np.array([[[0.0, 1.0, -2.0]], [[1.0, 1.0, 0.0]], [[3.0, 0.0, 0.0]]], np.float32)
  is_first = np.array([[True], [False], [True]])  # o_2 starts a new episode
  batch = wm_lib.Sequence(obs, np.zeros((3, 1, 5), np.float32), np.zeros((3, 1), np.float32),
                          np.zeros((3, 1), bool), is_first)
  key = jax.random.PRNGKey(1)
  # One compiled program for both: the per-dimension errors and the loss's metrics.
  (model_sq, copy_sq, inside), metrics = jax.jit(lambda p, b: (
      wm_lib.one_step_squared_errors(p, model, b, key),
      wm_lib.loss(p, b, key, cfg.world_model, model=model)[1][1]))(params, batch)
  log2 = math.log(2.0)
  np.testing.assert_allclose(copy_sq[0, 0], [log2 ** 2, 0.0, math.log(3.0) ** 2], rtol=1e-6)
  np.testing.assert_allclose(model_sq, copy_sq, rtol=1e-6)
  np.testing.assert_array_equal(inside, [[True], [False]])
  expected = (log2 ** 2 + math.log(3.0) ** 2) / 3  # mean over dims of the one inside step
  np.testing.assert_allclose(metrics["wm/one_step_error"], expected, rtol=1e-6)
  np.testing.assert_allclose(metrics["wm/copy_last_error"], expected, rtol=1e-6)
  with pytest.raises(ValueError, match="predict_delta=True needs vector observations"):
    wm_lib.make_world_model(cfg.world_model, (8, 8, 3)).init(
        jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3), jnp.uint8), jnp.zeros((1, 5)),
        jnp.ones((1,), bool), jax.random.PRNGKey(0))
