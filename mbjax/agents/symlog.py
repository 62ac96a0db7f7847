"""Symlog squashing and the two-hot symlog distribution over scalars (Hafner et al. 2023,
"Mastering Diverse Domains through World Models", DreamerV3, section 2).

symlog(x) = sign(x) ln(1 + |x|) compresses large magnitudes while staying the identity near
0; symexp is its inverse. A scalar y is predicted as a categorical over fixed bins
b_1 < … < b_K in symlog space: the target is the two-hot vector that puts weight on the two
bins around symlog(y) so that its expectation is exactly symlog(y) (for y inside the bin
range), the loss is the cross-entropy against it, and the prediction is
symexp(Σ_k softmax(logits)_k b_k). Regression this way is invariant to the scale of the
rewards and returns, and a zero-initialised output layer predicts exactly 0.
"""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

# DreamerV3's bins: 255 equally spaced points on [-20, 20] in symlog space.
NUM_BINS = 255
LOW, HIGH = -20.0, 20.0


def symlog(x):
  return jnp.sign(x) * jnp.log1p(jnp.abs(x))


def symexp(x):
  return jnp.sign(x) * jnp.expm1(jnp.abs(x))


def bins(num_bins: int = NUM_BINS) -> jax.Array:
  return jnp.linspace(LOW, HIGH, num_bins)


def twohot(y: jax.Array, num_bins: int = NUM_BINS) -> jax.Array:
  """[..., K] two-hot encoding of symlog(y) (clipped into the bin range): weights
  (b_{k+1} − s)/(b_{k+1} − b_k) on b_k and the rest on b_{k+1}, b_k ≤ s < b_{k+1}."""
  points = bins(num_bins)
  s = jnp.clip(symlog(y), LOW, HIGH)
  below = jnp.clip(jnp.searchsorted(points, s, side="right") - 1, 0, num_bins - 2)
  lower, upper = points[below], points[below + 1]
  weight_upper = (s - lower) / (upper - lower)
  return (jax.nn.one_hot(below, num_bins) * (1.0 - weight_upper)[..., None]
          + jax.nn.one_hot(below + 1, num_bins) * weight_upper[..., None])


def twohot_mean(logits: jax.Array) -> jax.Array:
  """The predicted scalar of [..., K] logits: symexp of the expected bin."""
  probs = jax.nn.softmax(logits, -1)
  return symexp((probs * bins(logits.shape[-1])).sum(-1))


def twohot_loss(logits: jax.Array, y: jax.Array) -> jax.Array:
  """Cross-entropy between the prediction [..., K] and the two-hot encoding of y [...]."""
  chex.assert_equal_shape_prefix([logits, y], y.ndim)
  target = jax.lax.stop_gradient(twohot(y, logits.shape[-1]))
  return -(target * jax.nn.log_softmax(logits, -1)).sum(-1)
