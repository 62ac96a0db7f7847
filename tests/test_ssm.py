"""Selective scan: the three paths against a plain-Python loop, against each other in values
and gradients (fp32, 1e-5), with and without per-block checkpointing, exact zeroing on
resets, jitted == un-jitted."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mbjax.nets import ssm

L, BATCH, D, N = 37, 3, 5, 4  # L is not a multiple of the chunk size: padding is exercised
CHUNK = 8
BLOCK = 16  # checkpointed block of the sequential path: three blocks, the last one padded


def _inputs(seed=0, reset_prob=0.15):
  k = jax.random.split(jax.random.PRNGKey(seed), 7)
  x = jax.random.normal(k[0], (L, BATCH, D))
  delta = jax.nn.softplus(jax.random.normal(k[1], (L, BATCH, D)))
  A = -jnp.exp(0.5 * jax.random.normal(k[2], (D, N)))
  B = jax.random.normal(k[3], (L, BATCH, N))
  C = jax.random.normal(k[4], (L, BATCH, N))
  h0 = jax.random.normal(k[5], (BATCH, D, N))
  reset = jax.random.bernoulli(k[6], reset_prob, (L, BATCH))
  reset = reset.at[5, 0].set(True).at[0, 1].set(True)  # resets mid-sequence and at t = 0
  return x, delta, A, B, C, h0, reset


def _python_reference(x, delta, A, B, C, h0, reset):
  """h_t = exp(Δ_t A) h_{t−1}·(1 − reset_t) + Δ_t x_t B_t, y_t = h_t C_t, in float64 loops."""
  x, delta, A, B, C, h0, reset = (np.asarray(v, np.float64) for v in
                                  (x, delta, A, B, C, h0, reset))
  y = np.zeros(x.shape)
  h = h0.copy()
  for t in range(x.shape[0]):
    for b in range(x.shape[1]):
      if reset[t, b]:
        h[b] = 0.0
      for d in range(x.shape[2]):
        for n in range(A.shape[1]):
          h[b, d, n] = np.exp(delta[t, b, d] * A[d, n]) * h[b, d, n] + (
              delta[t, b, d] * x[t, b, d] * B[t, b, n])
        y[t, b, d] = sum(h[b, d, n] * C[t, b, n] for n in range(A.shape[1]))
  return y, h


@functools.partial(jax.jit, static_argnames=("path", "checkpoint"))
def _value_and_grads(inputs, path, checkpoint=True):
  x, delta, A, B, C, h0, reset = inputs

  def objective(x, delta, A, B, C, h0):
    y, h = ssm.selective_scan(x, delta, A, B, C, h0, reset, path=path, chunk_size=CHUNK,
                              block_size=BLOCK, checkpoint=checkpoint)
    # Weighted sums so every output position and the final state carry gradient.
    return jnp.sum(y * jnp.cos(y)) + jnp.sum(jnp.sin(h)), (y, h)

  grads, (y, h) = jax.grad(objective, argnums=tuple(range(6)), has_aux=True)(
      x, delta, A, B, C, h0)
  return y, h, grads


@pytest.fixture(scope="module")
def results():
  inputs = _inputs()
  outputs = {path: _value_and_grads(inputs, path) for path in ssm.SCAN_PATHS}
  outputs["sequential, stored"] = _value_and_grads(inputs, "sequential", checkpoint=False)
  return inputs, outputs


def test_every_path_matches_the_python_loop(results):
  inputs, outputs = results
  y_ref, h_ref = _python_reference(*inputs)
  for path, (y, h, _) in outputs.items():
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5, err_msg=path)
    np.testing.assert_allclose(h, h_ref, rtol=1e-5, atol=1e-5, err_msg=path)


def test_paths_agree_in_gradients(results):
  _, outputs = results
  _, _, reference = outputs["sequential"]
  names = ("x", "delta", "A", "B", "C", "h0")
  for path in ("associative", "chunked", "sequential, stored"):
    for name, g, g_ref in zip(names, outputs[path][2], reference):
      np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-5, err_msg=f"{path} d/d{name}")
  # h0 only reaches outputs before each sequence's first reset; batch 1 resets at t = 0.
  assert np.all(reference[5][1] == 0.0) and np.abs(reference[5][0]).max() > 0


def test_reset_zeroes_the_carried_state_exactly():
  x, delta, A, B, C, h0, _ = _inputs()
  t = 11
  reset = jnp.zeros((L, BATCH), bool).at[t].set(True)
  y, h = ssm.selective_scan(x, delta, A, B, C, h0, reset, path="sequential", block_size=BLOCK)
  # A fresh run from zeros at t gives bit-identical outputs: nothing before t leaks through.
  y_fresh, h_fresh = ssm.selective_scan(x[t:], delta[t:], A, B[t:], C[t:], jnp.zeros_like(h0),
                                        reset[t:], path="sequential", block_size=BLOCK)
  np.testing.assert_array_equal(y[t:], y_fresh)
  np.testing.assert_array_equal(h, h_fresh)
  for path in ("associative", "chunked"):
    y_path, h_path = ssm.selective_scan(x, delta, A, B, C, h0 * 1e6, reset, path=path,
                                        chunk_size=CHUNK)
    # Even a huge h0 leaves no trace after the reset (only float rounding of the prefix).
    np.testing.assert_allclose(y_path[t:], y_fresh, rtol=1e-5, atol=1e-5, err_msg=path)
    np.testing.assert_allclose(h_path, h_fresh, rtol=1e-5, atol=1e-5, err_msg=path)


def test_resuming_from_the_final_state_equals_one_long_scan():
  x, delta, A, B, C, h0, reset = _inputs(seed=1)
  y, h = ssm.selective_scan(x, delta, A, B, C, h0, reset, path="chunked", chunk_size=CHUNK)
  cut = 20
  y1, h1 = ssm.selective_scan(x[:cut], delta[:cut], A, B[:cut], C[:cut], h0, reset[:cut],
                              path="chunked", chunk_size=CHUNK)
  y2, h2 = ssm.selective_scan(x[cut:], delta[cut:], A, B[cut:], C[cut:], h1, reset[cut:],
                              path="chunked", chunk_size=CHUNK)
  np.testing.assert_allclose(jnp.concatenate([y1, y2]), y, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(h2, h, rtol=1e-5, atol=1e-5)


def test_jitted_equals_unjitted(results):
  inputs, outputs = results
  with jax.disable_jit():
    y, h = ssm.selective_scan(*inputs, path="chunked", chunk_size=CHUNK)
  np.testing.assert_allclose(y, outputs["chunked"][0], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(h, outputs["chunked"][1], rtol=1e-6, atol=1e-6)


def test_bad_path_is_named():
  with pytest.raises(ValueError, match="'parallel'"):
    ssm.selective_scan(*_inputs(), path="parallel")
