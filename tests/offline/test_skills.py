"""Skill VQ-VAE: straight-through gradients, perplexity and EMA/restart updates by hand,
reconstruction improves, and the window/token bookkeeping of labelling."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mbjax.envs.spaces import HybridActionSpec
from mbjax.offline import skills

SPEC = HybridActionSpec(continuous_dim=2, branches=(4,))


def test_straight_through_passes_the_gradient_to_z_unchanged():
  z = jnp.array([[0.2, -0.1], [1.0, 3.0]])
  codes = jnp.array([[0.0, 0.0], [1.0, 2.0]])
  w = jnp.array([[1.0, 2.0], [3.0, 4.0]])
  value = skills.straight_through(z, codes)
  np.testing.assert_allclose(value, codes, atol=1e-7)  # forward: the codes
  grad = jax.grad(lambda z: jnp.sum(w * skills.straight_through(z, codes)))(z)
  np.testing.assert_allclose(grad, w)  # backward: identity to z
  grad_codes = jax.grad(lambda c: jnp.sum(w * skills.straight_through(z, c)))(codes)
  np.testing.assert_allclose(grad_codes, 0.0)


def test_perplexity_by_hand():
  assert float(skills.perplexity(jnp.array([0, 0, 1, 1]), 4)) == pytest.approx(2.0)
  assert float(skills.perplexity(jnp.array([0, 1, 2, 3]), 4)) == pytest.approx(4.0)
  assert float(skills.perplexity(jnp.array([3, 3, 3, 3]), 4)) == pytest.approx(1.0)
  # p = (1/2, 1/4, 1/4): H = 1.5 ln 2 → 2^1.5.
  assert float(skills.perplexity(jnp.array([0, 0, 1, 2]), 4)) == pytest.approx(2 ** 1.5)


def test_nearest_code_and_ema_update_by_hand():
  embedding = jnp.array([[0.0], [10.0]])
  z = jnp.array([[1.0], [3.0], [9.0]])
  codes = skills.nearest_code(z, embedding)
  np.testing.assert_array_equal(codes, [0, 0, 1])
  book = skills.Codebook(embedding, jnp.array([1.0, 1.0]), embedding, jnp.array([4, 7]))
  new = skills.ema_update(book, z, codes, decay=0.5, epsilon=0.0)
  # N = 0.5·1 + 0.5·(2, 1) = (1.5, 1); m = 0.5·(0, 10) + 0.5·(4, 9) = (2, 9.5); e = m / N.
  np.testing.assert_allclose(new.cluster_size, [1.5, 1.0])
  np.testing.assert_allclose(new.embed_sum, [[2.0], [9.5]])
  np.testing.assert_allclose(new.embedding, [[2.0 / 1.5], [9.5]], rtol=1e-6)
  np.testing.assert_array_equal(new.unused_for, [0, 0])


def test_dead_code_is_restarted_at_an_encoder_output():
  embedding = jnp.array([[0.0, 0.0], [5.0, 5.0], [9.0, 9.0]])
  book = skills.Codebook(embedding, jnp.array([2.0, 0.1, 3.0]), embedding * 2,
                         jnp.array([0, 5, 4]))
  z = jnp.array([[1.0, -1.0], [2.0, 7.0]])
  new, restarted = skills.restart_dead_codes(jax.random.PRNGKey(0), book, z, dead_after=5)
  assert int(restarted) == 1
  assert any(np.allclose(new.embedding[1], row) for row in np.asarray(z))
  np.testing.assert_allclose(new.embed_sum[1], new.embedding[1])
  np.testing.assert_allclose(np.asarray(new.embedding)[[0, 2]], np.asarray(embedding)[[0, 2]])
  np.testing.assert_array_equal(new.unused_for, [0, 0, 4])
  np.testing.assert_allclose(new.cluster_size, [2.0, 1.0, 3.0])


def skill_windows(rng: np.random.Generator, num: int) -> np.ndarray:
  """Windows drawn from 4 motifs (a constant move direction and a menu choice at step 5)."""
  angles = np.array([0.0, 0.5, 2.0, 4.0])
  motif = rng.integers(0, 4, size=num)
  continuous = np.repeat(np.stack([np.cos(angles), np.sin(angles)], -1)[motif][:, None], 16, 1)
  continuous = continuous + rng.normal(0, 0.05, continuous.shape)
  discrete = np.full((num, 16, 1), 3)
  discrete[:, 5, 0] = motif % 3
  return np.stack([skills.action_vectors(c, d, SPEC) for c, d in zip(continuous, discrete)])


def test_reconstruction_improves_and_codes_are_used():
  cfg = skills.SkillConfig(num_codes=16, code_dim=8, hidden=64, dead_after=20, lr=1e-3)
  windows = skill_windows(np.random.default_rng(0), 512)
  state = skills.init(jax.random.PRNGKey(0), cfg, SPEC)
  state, first = skills.fit(state, windows, 1, np.random.default_rng(1), jax.random.PRNGKey(1))
  state, last = skills.fit(state, windows, 300, np.random.default_rng(2),
                           jax.random.PRNGKey(2))
  assert last["recon_mse"] < 0.2 * first["recon_mse"], (first, last)
  assert last["recon_accuracy"] > 0.99
  assert last["perplexity"] > 3.0  # the four motifs spread over several codes
  tokens, starts = skills.encode(state.params, state.codebook, cfg, SPEC,
                                 windows[0, :, :2], np.argmax(windows[0, :, 2:], -1)[:, None])
  assert tokens.shape == (1,) and starts.tolist() == [0]


def test_label_windows_and_per_frame_tokens():
  np.testing.assert_array_equal(skills.label_starts(20, 8), [0, 8, 12])
  np.testing.assert_array_equal(skills.label_starts(16, 8), [0, 8])
  assert skills.label_starts(5, 8).size == 0
  per_frame = skills.tokens_per_frame(np.array([7, 8, 9]), np.array([0, 8, 12]), 20, 8)
  np.testing.assert_array_equal(per_frame, [7] * 8 + [8] * 8 + [9] * 4)
  np.testing.assert_array_equal(skills.tokens_per_frame(np.zeros(0, int), np.zeros(0, int),
                                                        3, 8), [-1, -1, -1])
  windows = skills.training_windows(np.arange(20.0)[:, None], 8, 4)
  np.testing.assert_array_equal(windows[:, 0, 0], [0, 4, 8, 12])


def test_action_vectors_are_continuous_then_one_hot():
  vectors = skills.action_vectors(np.array([[0.5, -1.0]]), np.array([[2]]), SPEC)
  np.testing.assert_allclose(vectors, [[0.5, -1.0, 0, 0, 1, 0]])
