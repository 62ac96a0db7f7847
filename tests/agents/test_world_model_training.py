"""Training the world model: a small learning check on a linear system, pixel and vector
updates, the decoder's std term, and the data-parallel update's gradient sum."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mbjax.agents import world_model as wm_lib
from mbjax.train import sharding
from tests.test_collectives import while_bodies_with_all_reduce


@pytest.mark.slow
def test_world_model_learns_a_linear_system(small_config, spec):
  """o_{t+1} = R o_t (a rotation) with a small Gaussian-latent model: after 300 steps the
  one-step error is clearly below that of copying the last observation (measured
  2026-11-26: 0.054 vs 0.094) and far below its starting value (0.56)."""
  cfg = small_config(classes=0)
  cfg.world_model.lr = 1e-3
  model = wm_lib.make_world_model(cfg.world_model, (2,), spec)
  optimizer = wm_lib.make_optimizer(cfg.world_model)
  state = wm_lib.init(jax.random.PRNGKey(0), model, optimizer, (2,), jnp.float32, 5)
  angle = 0.5
  rotation = jnp.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])

  def batch(key):
    start = jax.random.normal(key, (16, 2))
    obs = jax.lax.scan(lambda o, _: (o @ rotation.T, o), start, None, 16)[1]
    is_first = jnp.zeros((16, 16), bool).at[0].set(True)
    return wm_lib.Sequence(obs, jnp.zeros((16, 16, 5)), jnp.zeros((16, 16)),
                           jnp.zeros((16, 16), bool), is_first, jnp.ones((16, 16, 3), bool))

  @jax.jit
  def train(state, key):
    def step(state, key):
      data_key, update_key = jax.random.split(key)
      state, _, metrics = wm_lib.update(state, batch(data_key), update_key, cfg.world_model,
                                        model=model, optimizer=optimizer)
      return state, metrics
    return jax.lax.scan(step, state, jax.random.split(key, 300))

  _, metrics = train(state, jax.random.PRNGKey(1))
  final_error = float(metrics["wm/one_step_error"][-10:].mean())
  baseline = float(metrics["wm/copy_last_error"][-10:].mean())
  assert final_error < 0.75 * baseline, (final_error, baseline)
  assert final_error < float(metrics["wm/one_step_error"][:10].mean()) / 5


@pytest.mark.parametrize("frame", [(16, 16, 3), (32, 16, 1)])
def test_pixel_world_model_decodes_frames_of_the_observed_shape_and_updates(small_config, spec,
                                                                            frame):
  """uint8 frames go through the convolutional encoder and decoder: the decoded mean and std
  have the frame's shape (square and 2:1 frames), the mean lies in [0, 1] pixel units, and
  one jitted update gives a finite loss and changes the decoder."""
  cfg = small_config()
  cfg.world_model.cnn_depth = 4
  model = wm_lib.make_world_model(cfg.world_model, frame, spec)
  optimizer = wm_lib.make_optimizer(cfg.world_model)
  state = wm_lib.init(jax.random.PRNGKey(0), model, optimizer, frame, jnp.uint8, 5)
  batch, length = 2, 4
  obs = jax.random.randint(jax.random.PRNGKey(1), (length, batch) + frame, 0, 256, jnp.int32)
  data = wm_lib.Sequence(obs.astype(jnp.uint8), jnp.zeros((length, batch, 5)),
                         jnp.zeros((length, batch)), jnp.zeros((length, batch), bool),
                         jnp.zeros((length, batch), bool).at[0].set(True),
                         jnp.ones((length, batch, 3), bool))
  features = jnp.zeros((length, batch, cfg.world_model.deter + 4 * 4))
  mean, std = model.apply(state.params, features, method=wm_lib.WorldModel.decode)
  assert mean.shape == std.shape == (length, batch) + frame
  assert float(mean.min()) >= 0.0 and float(mean.max()) <= 1.0
  new, _, metrics = jax.jit(lambda s, d, k: wm_lib.update(
      s, d, k, cfg.world_model, model=model, optimizer=optimizer))(
          state, data, jax.random.PRNGKey(2))
  assert np.isfinite(float(metrics["wm/loss"]))
  decoder = lambda p: jax.tree.leaves(p["params"]["decoder"])
  assert any(not np.array_equal(a, b) for a, b in zip(decoder(state.params),
                                                      decoder(new.params)))


@pytest.mark.parametrize("obs_shape", [(5,), (16, 16, 3)], ids=["vector", "pixels"])
def test_the_decoder_std_likelihood_trains_only_the_std_layer(small_config, spec, obs_shape):
  """The std's term of the decoder likelihood, (residual / σ)² / 2 + log σ with the residual
  held fixed, grows without bound as σ shrinks; it must train σ's own layer and nothing the
  mean reads (hidden layers, latent state, encoder), or it outweighs the squared error and
  the decoder learns only the observations' mean. Its gradient is zero everywhere else; the
  squared error's gradient reaches the hidden layers but not σ's layer."""
  cfg = small_config()
  cfg.world_model.cnn_depth = 4
  model = wm_lib.make_world_model(cfg.world_model, obs_shape, spec)
  optimizer = wm_lib.make_optimizer(cfg.world_model)
  dtype = jnp.uint8 if len(obs_shape) == 3 else jnp.float32
  params = wm_lib.init(jax.random.PRNGKey(0), model, optimizer, obs_shape, dtype, 5).params
  # σ's layer starts at zero, which passes no gradient back at all; give it trained-like
  # weights so that only the stop-gradient can keep its term away from the hidden layers.
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: (0.1 * jax.random.normal(jax.random.PRNGKey(3), x.shape)
                       if "log_std" in jax.tree_util.keystr(path) else x), params)
  features = jax.random.normal(jax.random.PRNGKey(1), (3, cfg.world_model.deter + 16))
  target = jax.random.uniform(jax.random.PRNGKey(2), (3,) + obs_shape)

  def decoder_terms(params, features):
    mean, std = model.apply(params, features, method=wm_lib.WorldModel.decode)
    residual = jax.lax.stop_gradient(mean) - target
    return (0.5 * jnp.square(residual / std) + jnp.log(std)).sum(), jnp.square(mean - target).sum()

  std_grads, std_feature_grad = jax.grad(lambda p, f: decoder_terms(p, f)[0], (0, 1))(
      params, features)
  mean_grads = jax.grad(lambda p: decoder_terms(p, features)[1])(params)
  decoder = lambda g: g["params"]["decoder"]
  assert float(jnp.abs(std_feature_grad).max()) == 0.0
  for name, layer in decoder(std_grads).items():
    size = sum(float(jnp.abs(x).sum()) for x in jax.tree.leaves(layer))
    assert (size > 0.0) == (name == "log_std"), name
  assert all(float(jnp.abs(x).max()) == 0.0
             for x in jax.tree.leaves(decoder(mean_grads)["log_std"]))
  hidden = [name for name in decoder(mean_grads) if name not in ("log_std", "mean", "out")]
  assert hidden and all(
      sum(float(jnp.abs(x).sum()) for x in jax.tree.leaves(decoder(mean_grads)[name])) > 0.0
      for name in hidden)


def test_data_parallel_update_sums_gradients_over_devices_once(small_config, spec):
  """`update` under shard_map over 4 devices (tests/conftest.py): the parameters' gradient is
  all-reduced once, after the filter's scan, not inside its backward loop at every step (see
  `collectives.varying`); the update is finite and the same on every device."""
  cfg = small_config(classes=0)
  model = wm_lib.make_world_model(cfg.world_model, (5,), spec)
  optimizer = wm_lib.make_optimizer(cfg.world_model)
  state = wm_lib.init(jax.random.PRNGKey(0), model, optimizer, (5,), jnp.float32, 5)
  length, batch = 6, 8
  data = wm_lib.Sequence(jax.random.normal(jax.random.PRNGKey(1), (length, batch, 5)),
                         jnp.zeros((length, batch, 5)), jnp.zeros((length, batch)),
                         jnp.zeros((length, batch), bool),
                         jnp.zeros((length, batch), bool).at[0].set(True).at[3, 1].set(True),
                         jnp.ones((length, batch, 3), bool))
  mesh = sharding.make_mesh(4)

  def step(state, data, key):
    new, _, metrics = wm_lib.update(state, data, key, cfg.world_model, model=model,
                                    optimizer=optimizer, axis_name=sharding.DATA_AXIS)
    return new, metrics["wm/loss"]

  update = jax.jit(jax.shard_map(
      step, mesh=mesh, in_specs=(sharding.P(), sharding.P(None, sharding.DATA_AXIS),
                                 sharding.P()), out_specs=(sharding.P(), sharding.P())))
  key = jax.random.PRNGKey(2)
  hlo = update.lower(state, data, key).compile().as_text()
  assert "all-reduce" in hlo and while_bodies_with_all_reduce(hlo) == 0
  new, loss = update(state, data, key)
  assert np.isfinite(float(loss))
  assert all(np.isfinite(np.asarray(x)).all() and x.sharding.is_fully_replicated
             for x in jax.tree.leaves(new.params))
