"""Symlog and the two-hot symlog distribution against hand-computed values."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mbjax.agents import symlog


def test_symlog_and_symexp_are_inverse_and_odd():
  x = jnp.array([-1e4, -3.0, -0.5, 0.0, 0.5, 3.0, 1e4])
  np.testing.assert_allclose(symlog.symlog(x)[4:], [math.log(1.5), math.log(4.0),
                                                    math.log(1e4 + 1)], rtol=1e-6)
  np.testing.assert_allclose(symlog.symlog(-x), -symlog.symlog(x))
  np.testing.assert_allclose(symlog.symexp(symlog.symlog(x)), x, rtol=1e-5)


@pytest.mark.parametrize("jit", [False, True])
def test_twohot_puts_the_mass_on_the_two_neighbouring_bins(jit):
  # 5 bins on [-20, 20]: -20, -10, 0, 10, 20. symlog(y) = 2.5 sits a quarter of the way
  # from 0 to 10: weights 0.75 on bin 2, 0.25 on bin 3.
  y = jnp.array([math.expm1(2.5), 0.0, -math.expm1(15.0), 1e30])
  encode = jax.jit(symlog.twohot, static_argnums=1) if jit else symlog.twohot
  encoded = np.asarray(encode(y, 5))
  np.testing.assert_allclose(encoded[0], [0, 0, 0.75, 0.25, 0], atol=1e-6)
  np.testing.assert_allclose(encoded[1], [0, 0, 1, 0, 0], atol=1e-6)
  np.testing.assert_allclose(encoded[2], [0.5, 0.5, 0, 0, 0], atol=1e-6)  # symlog −15
  np.testing.assert_allclose(encoded[3], [0, 0, 0, 0, 1], atol=1e-6)  # clipped at 20
  # The expected bin of a two-hot target is the symlog of the value (inside the range).
  np.testing.assert_allclose(encoded[:3] @ np.linspace(-20, 20, 5), [2.5, 0.0, -15.0],
                             atol=1e-5)


def test_twohot_prediction_and_loss():
  # Zero logits: uniform over symmetric bins, a prediction of exactly 0 and a loss of
  # log(K) whatever the target.
  logits = jnp.zeros((2, symlog.NUM_BINS))
  np.testing.assert_allclose(symlog.twohot_mean(logits), [0.0, 0.0], atol=1e-5)
  np.testing.assert_allclose(symlog.twohot_loss(logits, jnp.array([3.0, -7.0])),
                             [math.log(symlog.NUM_BINS)] * 2, rtol=1e-6)
  # Logits equal to the log of a two-hot target predict that target.
  target = jnp.array([12.5])
  logits = jnp.log(symlog.twohot(target) + 1e-30)
  np.testing.assert_allclose(symlog.twohot_mean(logits), target, rtol=1e-4)
  # The loss is the cross-entropy: −Σ_k target_k log softmax(logits)_k.
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(1, symlog.NUM_BINS)),
                       jnp.float32)
  expected = -(np.asarray(symlog.twohot(target)) * np.asarray(
      jax.nn.log_softmax(logits))).sum()
  np.testing.assert_allclose(symlog.twohot_loss(logits, target), [expected], rtol=1e-5)
