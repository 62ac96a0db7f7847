"""Closed-form continuous-time (CfC) cell (Hasani et al. 2022, "Closed-form continuous-time
neural networks", Nature Machine Intelligence): the CfC update with a shared backbone.

    backbone = tanh(W_b [I_t, x_{t−1}] + b_b)
    f = W_f backbone + w_τ          (w_τ: a learned per-unit time-constant term, the paper's w_τ)
    g = tanh(W_g backbone + b_g),   h = tanh(W_h backbone + b_h)
    x_t = σ(−f · Δt) ⊙ g + (1 − σ(−f · Δt)) ⊙ h

Δt is the real elapsed time since the previous step (f32[b]; 1 when not given), so irregular
sampling changes the update: Δt = 0 gives (g + h)/2, and a long Δt moves the state to h where
f > 0 (to g where f < 0). The state is an explicit carry, zeroed where `is_first`.

The default PPO core of pilot roles: `config.role` containing "pilot" sets `network.core` to
"cfc" unless the config names a core itself (`mbjax.train.config`).

Differs from upstream MetaBonk (`src/learner/liquid_policy.py`, §5.1 of the notes): the
state is carried between steps (upstream reset it on every 2-D call, so its policy had no
memory when acting); Δt is an input (upstream fixed t = 1); the time constants are learned
parameters (upstream had none); the three heads share one backbone, as in the paper.
"""
from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp


class CfCCell(nn.Module):
  """One CfC step: (carry f32[b, size], x f32[b, F], is_first bool[b], dt f32[b] | None)."""

  size: int
  backbone_size: int = 0  # 0: same as `size`

  @nn.compact
  def __call__(self, carry, x, is_first, dt=None):
    batch = x.shape[0]
    chex.assert_shape(carry, (batch, self.size))
    chex.assert_shape(is_first, (batch,))
    if dt is None:
      dt = jnp.ones((batch,), x.dtype)
    chex.assert_shape(dt, (batch,))
    state = jnp.where(is_first[:, None], 0.0, carry)
    backbone = nn.tanh(nn.Dense(self.backbone_size or self.size, name="backbone")(
        jnp.concatenate([x, state], axis=-1)))
    w_tau = self.param("w_tau", nn.initializers.zeros, (self.size,))
    f = nn.Dense(self.size, use_bias=False, name="f")(backbone) + w_tau
    g = nn.tanh(nn.Dense(self.size, name="g")(backbone))
    h = nn.tanh(nn.Dense(self.size, name="h")(backbone))
    gate = jax.nn.sigmoid(-f * dt[:, None])
    new_state = gate * g + (1.0 - gate) * h
    return new_state, new_state

  @staticmethod
  def initial_carry(batch_size: int, size: int) -> jax.Array:
    return jnp.zeros((batch_size, size), jnp.float32)
