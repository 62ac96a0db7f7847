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

  def policy(features, noise):
    return jnp.zeros(features.shape[:-1] + (5,)), noise

  start = jax.tree.map(lambda x: x[-1], posts)
  policy_noise = jnp.arange(4.0)[:, None] * jnp.ones((4, batch))
  states, raw = wm_lib.imagine(model, params, policy, start, 4, policy_noise,
                               jax.random.PRNGKey(3))
  assert states.features.shape == (5, batch, posts.features.shape[-1])
  np.testing.assert_array_equal(states.features[0], start.features)
  np.testing.assert_array_equal(raw, policy_noise)  # step t's policy got step t's noise


def _sequence(rng, length, batch, is_first):
  return wm_lib.Sequence(rng.normal(size=(length, batch, 5)).astype(np.float32),
                         rng.normal(size=(length, batch, 5)).astype(np.float32),
                         np.zeros((length, batch), np.float32), np.zeros((length, batch), bool),
                         is_first, np.ones((length, batch, 3), bool))


@pytest.mark.parametrize("rssm_layers", [1, 0])
@pytest.mark.parametrize("jit", [False, True])
def test_prior_after_each_action_equals_a_separate_transition(rssm_layers, jit, small_config, spec):
  """The reward, continue and mask heads read the prior after (s_t, a_t). The filter's scan
  already computes it as step t+1's prior from the carried state, also where o_{t+1}
  starts a new episode (the terminal transition); it must equal stepping s_t with a_t."""
  cfg = small_config(classes=0)
  cfg.world_model.rssm_layers = rssm_layers
  model = wm_lib.make_world_model(cfg.world_model, (5,), spec)
  params = wm_lib.init(jax.random.PRNGKey(0), model, wm_lib.make_optimizer(cfg.world_model), (5,),
                       jnp.float32, wm_lib.action_vector_size(spec)).params
  length, batch = 6, 3
  is_first = np.zeros((length, batch), bool)
  is_first[0] = is_first[3, 1] = True
  sequence = _sequence(np.random.default_rng(4), length, batch, is_first)
  rollforward = lambda p, b, k: wm_lib.rollforward(p, model, b, k)
  posts, priors, next_prior = (jax.jit(rollforward) if jit else rollforward)(
      params, sequence, jax.random.PRNGKey(1))
  flat = lambda x: x.reshape((-1,) + x.shape[2:])
  expected = wm_lib.img_step(model, params, jax.tree.map(flat, posts),
                             flat(sequence.action), jax.random.PRNGKey(2))
  np.testing.assert_allclose(flat(next_prior.deter), expected.deter, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(flat(next_prior.stats), expected.stats, rtol=1e-5, atol=1e-6)
  # ...and it is not the reset prior that the filter itself uses for env 1 at t = 3.
  assert not np.allclose(next_prior.deter[2, 1], priors.deter[3, 1])


@pytest.mark.parametrize("blocks", [1, 2])
def test_block_gru_is_independent_gru_cells_on_the_blocks(blocks):
  """With 2 blocks, each half of the state follows its own GRU over its own half of the
  recurrent weights; the input map is shared (1 block: a plain GRU, computed by a plain
  matrix product). Checked against numpy gate equations."""
  gru = wm_lib.GRU(size=4, blocks=blocks)
  rng = np.random.default_rng(0)
  h, x = rng.normal(size=(3, 4)).astype(np.float32), rng.normal(size=(3, 5)).astype(np.float32)
  params = gru.init(jax.random.PRNGKey(0), h, x)["params"]
  params = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
  out = np.asarray(gru.apply({"params": params}, h, x))
  sigmoid = lambda v: 1 / (1 + np.exp(-v))
  projected = x @ params["input"]["kernel"] + params["input"]["bias"]  # [3, 12]
  w = 4 // blocks
  for g in range(blocks):
    hg = h[:, w * g:w * g + w]
    rec = hg @ params["recurrent"][g] + params["recurrent_bias"][g]  # [3, 3w]
    inp = projected[:, 3 * w * g:3 * w * (g + 1)]
    reset = sigmoid(inp[:, 0:w] + rec[:, 0:w])
    update = sigmoid(inp[:, w:2 * w] + rec[:, w:2 * w])
    candidate = np.tanh(inp[:, 2 * w:] + reset * rec[:, 2 * w:])
    np.testing.assert_allclose(out[:, w * g:w * g + w],
                               (1 - update) * candidate + update * hg, rtol=1e-5, atol=1e-6)


def test_kl_loss_has_free_bits_and_balancing(small_config):
  section = small_config().world_model  # dyn 0.5, rep 0.1, free 1.0
  dyn = jnp.array([0.3, 2.0, 5.0])
  rep = jnp.array([4.0, 0.2, 1.5])
  expected = [0.5 * 1.0 + 0.1 * 4.0, 0.5 * 2.0 + 0.1 * 1.0, 0.5 * 5.0 + 0.1 * 1.5]
  np.testing.assert_allclose(wm_lib.kl_loss(dyn, rep, section), expected, rtol=1e-6)
  # Below the free bits a KL has no gradient.
  grad = jax.grad(lambda d: wm_lib.kl_loss(d, rep, section).sum())(dyn)
  np.testing.assert_allclose(grad, [0.0, 0.5, 0.5])


def test_the_mask_head_opens_a_branch_it_would_close_entirely(model_and_params, spec):
  _, model, params = model_and_params
  head = dict(params["params"]["mask_head"])
  # Bias (+, −, −): only choice 0 allowed; then (−, −, −): the whole branch reopens.
  features = jnp.zeros((1, model.rssm.deter + model.rssm.stoch_size))
  for bias, expected in (([3.0, -3.0, -3.0], [True, False, False]),
                         ([-3.0, -3.0, -3.0], [True, True, True])):
    head["out"] = {"kernel": jnp.zeros_like(head["out"]["kernel"]), "bias": jnp.asarray(bias)}
    patched = {"params": {**params["params"], "mask_head": head}}
    np.testing.assert_array_equal(
        wm_lib.predicted_mask(model, patched, features, spec)[0], expected)


def test_pixel_embedding_scales_uint8_frames_for_sequences_and_single_steps(small_config, spec):
  """observe() embeds [L, B, H, W, 3] frames; they must reach the CNN as pixels / 255,
  exactly like a [B, H, W, 3] batch (a rank test on the input once routed sequences of
  frames through the vector path's symlog)."""
  cfg = small_config()
  model = wm_lib.make_world_model(cfg.world_model, (16, 16, 3), spec)
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


def test_categorical_latents_are_sampled_with_their_probabilities(small_config):
  """Inverse-CDF sampling of the latents: class frequencies match the (unimix) probabilities
  within sampling error, and the straight-through sample is one-hot."""
  rssm = wm_lib.RSSM(deter=4, stoch=2, classes=4, hidden=4, layers=1, blocks=1, min_std=0.1,
                     unimix=0.0)
  probs = np.array([[0.1, 0.2, 0.3, 0.4], [0.7, 0.0, 0.0, 0.3]], np.float32)
  stats = jnp.log(jnp.broadcast_to(probs, (20000, 2, 4)))
  noise = rssm.noise(jax.random.PRNGKey(0), (20000,))
  assert noise.shape == (20000, 2, 1)
  sample = np.asarray(rssm.apply({}, stats, noise, method=wm_lib.RSSM._sample))
  sample = sample.reshape(20000, 2, 4)
  assert np.all(np.isclose(sample, 0.0, atol=1e-6) | np.isclose(sample, 1.0, atol=1e-6))
  np.testing.assert_allclose(sample.sum(-1), 1.0, atol=1e-6)
  np.testing.assert_allclose(sample.mean(0), probs, atol=0.012)  # 4 standard errors
  # By hand: a uniform u picks the first class whose cumulative probability exceeds it
  # (cumulative 0.1, 0.3, 0.6, 1.0 for the first latent).
  u = jnp.array([0.05, 0.15, 0.35, 0.95])[:, None, None] * jnp.ones((4, 2, 1))
  picked = rssm.apply({}, stats[:4], u, method=wm_lib.RSSM._sample).reshape(4, 2, 4)
  np.testing.assert_array_equal(np.argmax(picked[:, 0], -1), [0, 1, 2, 3])


def test_gaussian_latents_are_the_mean_plus_std_times_the_noise():
  rssm = wm_lib.RSSM(deter=4, stoch=2, classes=0, hidden=4, layers=1, blocks=1, min_std=0.1,
                     unimix=0.0)
  noise = rssm.noise(jax.random.PRNGKey(0), (3,))
  assert noise.shape == (3, 2)
  stats = jnp.array([[1.0, -2.0, 0.5, 2.0]] * 3)  # mean (1, −2), std (0.5, 2)
  sample = rssm.apply({}, stats, noise, method=wm_lib.RSSM._sample)
  np.testing.assert_allclose(sample, jnp.array([1.0, -2.0]) + jnp.array([0.5, 2.0]) * noise,
                             rtol=1e-6)
