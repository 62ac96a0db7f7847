"""KL divergences between the latent distributions of the world model (closed forms).

Diagonal Gaussians (Kingma & Welling 2014, appendix B), per dimension:
  KL(N(μq, σq²) ‖ N(μp, σp²)) = log(σp/σq) + (σq² + (μq − μp)²) / (2σp²) − ½,
summed over the last axis. Categoricals over the last axis, summed over the latent axis
before it: KL(q ‖ p) = Σ_k q_k (log q_k − log p_k).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def gaussian_kl(mean_q, std_q, mean_p, std_p) -> jax.Array:
  """KL(q ‖ p) of diagonal Gaussians, summed over the last axis."""
  per_dim = (jnp.log(std_p) - jnp.log(std_q)
             + (jnp.square(std_q) + jnp.square(mean_q - mean_p)) / (2.0 * jnp.square(std_p))
             - 0.5)
  return per_dim.sum(-1)


def categorical_kl(logits_q, logits_p) -> jax.Array:
  """KL(q ‖ p) of independent categoricals [..., latents, classes], summed over latents."""
  log_q = jax.nn.log_softmax(logits_q, -1)
  log_p = jax.nn.log_softmax(logits_p, -1)
  return (jnp.exp(log_q) * (log_q - log_p)).sum((-2, -1))
