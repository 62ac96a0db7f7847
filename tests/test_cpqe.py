"""CPQE on a multimodal 2-D action dataset: the one-step student covers every mode, Q-guided
selection picks the high-value mode, the deterministic mode is repeatable, and the pieces
(boundary condition, EDM preconditioning, independent Q targets) hold by construction.

One training run (teacher, then distillation, then Q) is shared by the behavioural tests.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mbjax.agents import cpqe

MODES = np.array([[0.6, 0.6], [-0.6, 0.6], [-0.6, -0.6], [0.6, -0.6]], np.float32)
HIGH_VALUE_MODE = 0
ACTION_DIM, OBS_DIM = 2, 3


def _config():
  cfg = cpqe.default_config()
  cfg.horizon = 2
  cfg.hidden = 128
  cfg.q_hidden = 64
  cfg.lr = 1e-3
  cfg.q_lr = 1e-3
  cfg.num_samples = 32  # 4 equal modes: P(no high-value candidate among 32) = 0.75³² ≈ 1e-4
  return cfg


def _dataset(key, size):
  """Chunks that repeat one of 4 modes (± 0.05 noise); a bandit: reward 1 on mode 0, done."""
  k_mode, k_noise, k_obs = jax.random.split(key, 3)
  mode = jax.random.randint(k_mode, (size,), 0, len(MODES))
  chunk = jnp.asarray(MODES)[mode][:, None, :] + 0.05 * jax.random.normal(
      k_noise, (size, 2, ACTION_DIM))
  obs = 0.1 * jax.random.normal(k_obs, (size, OBS_DIM))
  return cpqe.Transitions(obs=obs, chunk=chunk,
                          reward=(mode == HIGH_VALUE_MODE).astype(jnp.float32),
                          next_obs=obs, done=jnp.ones((size,), bool))


def _mode_of(actions):
  """Nearest mode index and distance, for points [..., 2]."""
  dist = np.linalg.norm(np.asarray(actions)[..., None, :] - MODES, axis=-1)
  return dist.argmin(-1), dist.min(-1)


@pytest.fixture(scope="module")
def trained():
  cfg = _config()
  state = cpqe.init(jax.random.PRNGKey(0), cfg, OBS_DIM, ACTION_DIM)
  data = _dataset(jax.random.PRNGKey(1), 4096)

  def batches(key, steps):
    idx = jax.random.randint(key, (steps, 256), 0, 4096)
    return jax.tree.map(lambda x: x[idx], data)

  def phase(update_fn, steps, state, key):
    def body(state, inputs):
      batch, k = inputs
      return update_fn(state, batch, k)
    k_batch, k_steps = jax.random.split(key)
    return jax.lax.scan(body, state, (batches(k_batch, steps), jax.random.split(k_steps, steps)))

  @jax.jit
  def train(state, key):
    k1, k2, k3 = jax.random.split(key, 3)
    state, m1 = phase(lambda s, b, k: cpqe.update_teacher(s, b.obs, b.chunk, k, cfg), 3000,
                      state, k1)
    # The student starts from the trained teacher's weights.
    state = state.replace(student=state.teacher, student_target=state.teacher,
                          student_opt=jax.tree.map(jnp.zeros_like, state.student_opt))
    state, m2 = phase(lambda s, b, k: cpqe.update_student(s, b.obs, b.chunk, k, cfg), 3000,
                      state, k2)
    state, m3 = phase(lambda s, b, k: cpqe.update_q(s, b, k, cfg), 1000, state, k3)
    return state, (m1, m2, m3)

  state, metrics = train(state, jax.random.PRNGKey(2))
  return cfg, state, metrics


def test_one_step_student_covers_every_mode(trained):
  cfg, state, _ = trained
  obs = 0.1 * jax.random.normal(jax.random.PRNGKey(3), (1000, OBS_DIM))
  sample = jax.jit(functools.partial(cpqe.sample_student, cfg=cfg, action_dim=ACTION_DIM))
  teacher = jax.jit(functools.partial(cpqe.sample_teacher, cfg=cfg, action_dim=ACTION_DIM))
  for name, chunks in (("student", sample(state.student, obs=obs, key=jax.random.PRNGKey(4))),
                       ("teacher", teacher(state.teacher, obs=obs, key=jax.random.PRNGKey(4)))):
    mode, dist = _mode_of(chunks)
    near = (dist < 0.2).mean()
    shares = np.bincount(mode[dist < 0.2].ravel(), minlength=4) / max((dist < 0.2).sum(), 1)
    print(f"\n{name}: {near:.1%} of actions within 0.2 of a mode; mode shares "
          f"{np.round(shares, 3)}")
    # Coverage: ≥ 80% of actions within 0.2 of a mode and every mode holds ≥ 15% of those
    # (uniform: 25%). Measured 2026-11-26: student 87%, shares 0.22–0.29; teacher 98%.
    assert near >= 0.8, (name, near)
    assert shares.min() >= 0.15, (name, shares)


def test_q_guided_selection_picks_the_high_value_mode(trained):
  cfg, state, _ = trained
  obs = 0.1 * jax.random.normal(jax.random.PRNGKey(5), (200, OBS_DIM))
  select = jax.jit(functools.partial(cpqe.select_action, cfg=cfg, action_dim=ACTION_DIM),
                   static_argnames="deterministic")
  action, chunk = select(state, obs=obs, key=jax.random.PRNGKey(6))
  assert action.shape == (200, ACTION_DIM) and chunk.shape == (200, cfg.horizon, ACTION_DIM)
  assert np.abs(chunk).max() <= 1.0
  mode, _ = _mode_of(action)
  picked = (mode == HIGH_VALUE_MODE).mean()
  print(f"\nQ-guided selection: high-value mode picked {picked:.1%} of the time")
  assert picked >= 0.9
  # Deterministic mode: repeatable whatever the key, and still Q-guided.
  a1, _ = select(state, obs=obs, key=jax.random.PRNGKey(7), deterministic=True)
  a2, _ = select(state, obs=obs, key=jax.random.PRNGKey(8), deterministic=True)
  np.testing.assert_array_equal(a1, a2)
  assert (_mode_of(a1)[0] == HIGH_VALUE_MODE).mean() >= 0.9


def test_losses_fell(trained):
  _, _, (teacher, student, q) = trained
  # The EDM loss has an irreducible part at large σ, so "fell" means by a third, not to 0.
  for name, series in (("teacher", teacher["cpqe/teacher_loss"]),
                       ("q", q["cpqe/q_loss"])):
    assert np.mean(series[-100:]) < 0.67 * np.mean(series[:100]), name
  assert np.isfinite(student["cpqe/distill_loss"]).all()


def test_student_boundary_condition_and_teacher_preconditioning():
  cfg = _config()
  state = cpqe.init(jax.random.PRNGKey(0), cfg, OBS_DIM, ACTION_DIM)
  state = state.replace(student=jax.tree.map(lambda p: p + 0.1, state.student))
  x = jax.random.normal(jax.random.PRNGKey(1), (5, cfg.horizon, ACTION_DIM))
  obs = jnp.ones((5, OBS_DIM))
  # f(x, σ_min) = x exactly, whatever the network outputs.
  at_min = cpqe.consistency(state.student, cfg, x, jnp.full((5,), cfg.sigma_min), obs)
  np.testing.assert_allclose(at_min, x, rtol=0, atol=1e-6)
  # A zero-output F makes the EDM denoiser c_skip·x = σ_d²/(σ²+σ_d²)·x (hand formula).
  zero_net = jax.tree.map(jnp.zeros_like, state.teacher)
  sigma = jnp.array([0.1, 0.5, 1.0, 10.0, 80.0])
  out = cpqe.denoise(zero_net, cfg, x, sigma, obs)
  c_skip = 0.25 / (np.asarray(sigma) ** 2 + 0.25)
  np.testing.assert_allclose(out, c_skip[:, None, None] * np.asarray(x), rtol=1e-6)


def test_q_members_have_independent_targets():
  """Each member's TD target uses its own target network: with rewards 0 and γ = 1, the
  target of member i is Q̄_i(s', a'), so the loss equals Σ_i mean (Q_i − Q̄_i)²/num."""
  cfg = _config()
  cfg.gamma = 1.0
  state = cpqe.init(jax.random.PRNGKey(0), cfg, OBS_DIM, ACTION_DIM)
  q_target = cpqe.init(jax.random.PRNGKey(9), cfg, OBS_DIM, ACTION_DIM).q
  obs = jax.random.normal(jax.random.PRNGKey(1), (6, OBS_DIM))
  chunk = jnp.zeros((6, cfg.horizon, ACTION_DIM))
  batch = cpqe.Transitions(obs, chunk, jnp.zeros(6), obs, jnp.zeros(6, bool))
  key = jax.random.PRNGKey(2)
  loss = cpqe.q_loss(state.q, q_target, state.student, cfg, batch, key)
  next_chunk = jnp.clip(cpqe.sample_student(state.student, cfg, obs, key, ACTION_DIM), -1, 1)
  q = np.asarray(cpqe.q_values(state.q, cfg, obs, chunk))
  q_bar = np.asarray(cpqe.q_values(q_target, cfg, obs, next_chunk))
  assert q.shape == (cfg.num_q, 6)
  np.testing.assert_allclose(loss, np.mean((q - q_bar) ** 2), rtol=1e-5)
  # Members differ (independent initialisation through nn.vmap's split RNGs).
  assert np.abs(q[0] - q[1]).max() > 1e-3
