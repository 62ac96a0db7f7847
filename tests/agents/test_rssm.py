"""The RSSM's filter and imagination: shapes and resets of observe/imagine, the prior after
each action against a separate transition, and how pixel frames reach the encoder."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mbjax.agents import world_model as wm_lib


def test_observe_and_imagine_shapes_and_resets(model_and_params):
  _, model, params = model_and_params
  length, batch = 6, 3
  rng = np.random.default_rng(1)
  obs = rng.normal(size=(length, batch, 5)).astype(np.float32)
  actions = rng.normal(size=(length, batch, 5)).astype(np.float32)
  is_first = np.zeros((length, batch), bool)
  is_first[0] = is_first[3] = True
  observe = jax.jit(lambda o, a, f, k: wm_lib.observe(model, params, o, a, f, k))
  posts, priors = observe(obs, actions, is_first, jax.random.PRNGKey(2))
  rssm = model.rssm
  assert posts.deter.shape == (length, batch, rssm.deter)
  assert posts.stoch.shape == (length, batch, rssm.stoch_size)
  assert priors.features.shape == posts.features.shape
  # A reset at t=3 forgets everything before it: change the history, keep the future.
  other = obs.copy()
  other[:3] += 10.0
  posts_other, _ = observe(other, actions + 1.0 * (np.arange(length) < 3)[:, None, None],
                           is_first, jax.random.PRNGKey(2))
  np.testing.assert_array_equal(posts.features[3:], posts_other.features[3:])
  assert not np.allclose(posts.features[:3], posts_other.features[:3])

  def policy(features, key):
    return jnp.zeros(features.shape[:-1] + (5,)), jnp.zeros(features.shape[:-1])

  start = jax.tree.map(lambda x: x[-1], posts)
  states, raw = wm_lib.imagine(model, params, policy, start, 4, jax.random.PRNGKey(3))
  assert states.features.shape == (5, batch, posts.features.shape[-1])
  np.testing.assert_array_equal(states.features[0], start.features)
  assert raw.shape == (4, batch)


@pytest.mark.parametrize("rssm_layers", [1, 0])
@pytest.mark.parametrize("jit", [False, True])
def test_prior_after_each_action_equals_a_separate_transition(rssm_layers, jit, small_config, spec):
  """The reward and continue heads read the prior after (s_t, a_t). The filter's scan
  already computes it as step t+1's prior from the carried state, also where o_{t+1}
  starts a new episode (the terminal transition); it must equal stepping s_t with a_t."""
  cfg = small_config(classes=0)
  cfg.world_model.rssm_layers = rssm_layers
  model = wm_lib.make_world_model(cfg.world_model, (5,))
  params = wm_lib.init(jax.random.PRNGKey(0), model, wm_lib.make_optimizer(cfg.world_model), (5,),
                       jnp.float32, wm_lib.action_vector_size(spec)).params
  length, batch = 6, 3
  rng = np.random.default_rng(4)
  is_first = np.zeros((length, batch), bool)
  is_first[0] = is_first[3, 1] = True
  sequence = wm_lib.Sequence(rng.normal(size=(length, batch, 5)).astype(np.float32),
                             rng.normal(size=(length, batch, 5)).astype(np.float32),
                             np.zeros((length, batch), np.float32),
                             np.zeros((length, batch), bool), is_first)
  rollforward = lambda p, b, k: wm_lib._rollforward(p, model, b, k)
  out = (jax.jit(rollforward) if jit else rollforward)(params, sequence, jax.random.PRNGKey(1))
  flat = lambda x: x.reshape((-1,) + x.shape[2:])
  expected = wm_lib.img_step(model, params, jax.tree.map(flat, out.posts),
                             flat(sequence.action), jax.random.PRNGKey(2))
  np.testing.assert_allclose(out.next_prior.deter, expected.deter, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out.next_prior.stats, expected.stats, rtol=1e-5, atol=1e-6)
  # ...and it is not the reset prior that the filter itself uses for env 1 at t = 3.
  after_reset = out.priors.deter[3, 1]
  assert not np.allclose(out.next_prior.deter.reshape(length, batch, -1)[2, 1], after_reset)


def test_pixel_embedding_scales_uint8_frames_for_sequences_and_single_steps(small_config, spec):
  """observe() embeds [L, B, H, W, 3] frames; they must reach the CNN as pixels / 255,
  exactly like a [B, H, W, 3] batch (a rank test on the input once routed sequences of
  frames through the vector path's symlog)."""
  cfg = small_config()
  model = wm_lib.make_world_model(cfg.world_model, (16, 16, 3))
  params = wm_lib.init(jax.random.PRNGKey(0), model, wm_lib.make_optimizer(cfg.world_model),
                       (16, 16, 3), jnp.uint8, wm_lib.action_vector_size(spec)).params
  frames = np.random.default_rng(0).integers(0, 256, (2, 3, 16, 16, 3), dtype=np.uint8)
  embed = lambda x: model.apply(params, x, method=wm_lib.WorldModel.embed)
  sequence = embed(frames)
  single = jnp.stack([embed(frames[t]) for t in range(2)])
  np.testing.assert_allclose(sequence, single, rtol=1e-5, atol=1e-6)
  direct = model.apply(params, frames[0].astype(np.float32),
                       method=lambda m, x: m.encoder(x))
  np.testing.assert_allclose(sequence[0], direct, rtol=1e-5, atol=1e-6)
