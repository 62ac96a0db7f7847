"""Closed-form continuous-time (CfC) cell (Hasani et al. 2022, "Closed-form continuous-time
neural networks", Nature Machine Intelligence), in the three modes of the authors' ncps
library (`ncps.torch.CfCCell`, github.com/mlech26l/ncps), with one shared backbone:

    bb = lecun_tanh(W_b [I_t, x_{t−1}] + b_b),   lecun_tanh(v) = 1.7159 · tanh(0.666 · v)
    "default":  σ_t = σ(t_a · Δt + t_b),  t_a = W_a bb + b_a,  t_b = W_tb bb + b_tb
                x_t = tanh(W_1 bb + b_1) ⊙ (1 − σ_t) + σ_t ⊙ tanh(W_2 bb + b_2)
    "no_gate":  x_t = tanh(W_1 bb + b_1) + σ_t ⊙ tanh(W_2 bb + b_2)
    "pure":     x_t = −A ⊙ exp(−Δt · (|w_τ| + |f|)) ⊙ f + A,  f = W_1 bb + b_1
                (the paper's closed-form approximation of the liquid time-constant ODE's
                solution; w_τ and A are learned per unit, initialised to 0 and 1)

Δt is the real elapsed time since the previous step, f32[b]; 1 where not given, which is what
every step of a fixed-rate env is. In "default" mode the time head t_a scales Δt and the
separate head t_b shifts the gate, so the state can move towards either tanh head as time
passes. The state is an explicit carry, zeroed where `is_first`. Parameter names are ncps's
(backbone, ff1, ff2, time_a, time_b, w_tau, A), and a layer's kernel is its torch weight
transposed, so `tests/test_parity.py` can load ncps's weights and compare outputs. Kernels are
Xavier-uniform as ncps's; biases start at 0 (torch draws them uniformly).

The default PPO core of pilot roles: `config.role` containing "pilot" sets `network.core` to
"cfc" unless the config names a core itself (`mbjax.train.config`); `network.cfc_mode` picks
the mode.

Differs from upstream MetaBonk (`src/learner/liquid_policy.py`, §5.1 of the notes): the
state is carried between steps (upstream reset it on every 2-D call, so its policy had no
memory when acting); Δt is an input (upstream fixed t = 1); the time constants are learned
heads (upstream had none); the heads share one backbone, as in the paper.
"""
from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

MODES = ("default", "no_gate", "pure")


def lecun_tanh(x: jax.Array) -> jax.Array:
  """LeCun's scaled tanh (LeCun et al. 1998, "Efficient BackProp"), ncps's backbone default."""
  return 1.7159 * jnp.tanh(0.666 * x)


class CfCCell(nn.Module):
  """One CfC step: (carry f32[b, size], x f32[b, F], is_first bool[b], dt f32[b] | None)."""

  size: int
  backbone_size: int = 0  # 0: same as `size`
  mode: str = "default"  # one of MODES

  @nn.compact
  def __call__(self, carry, x, is_first, dt=None):
    if self.mode not in MODES:
      raise ValueError(f"CfC mode must be one of {MODES}, got {self.mode!r}")
    batch = x.shape[0]
    chex.assert_shape(carry, (batch, self.size))
    chex.assert_shape(is_first, (batch,))
    dt = jnp.ones((batch,), x.dtype) if dt is None else jnp.asarray(dt, x.dtype)
    chex.assert_shape(dt, (batch,))
    dt = dt[:, None]
    dense = lambda features, name: nn.Dense(  # noqa: E731
        features, kernel_init=nn.initializers.xavier_uniform(), name=name)
    state = jnp.where(is_first[:, None], 0.0, carry)
    backbone = lecun_tanh(dense(self.backbone_size or self.size, "backbone")(
        jnp.concatenate([x, state], axis=-1)))
    ff1 = dense(self.size, "ff1")(backbone)
    if self.mode == "pure":
      w_tau = self.param("w_tau", nn.initializers.zeros, (self.size,))
      amplitude = self.param("A", nn.initializers.ones, (self.size,))
      new_state = amplitude - amplitude * jnp.exp(
          -dt * (jnp.abs(w_tau) + jnp.abs(ff1))) * ff1
    else:
      ff1 = jnp.tanh(ff1)
      ff2 = jnp.tanh(dense(self.size, "ff2")(backbone))
      gate = jax.nn.sigmoid(dense(self.size, "time_a")(backbone) * dt
                            + dense(self.size, "time_b")(backbone))
      new_state = (ff1 + gate * ff2 if self.mode == "no_gate"
                   else ff1 * (1.0 - gate) + gate * ff2)
    return new_state, new_state

  @staticmethod
  def initial_carry(batch_size: int, size: int) -> jax.Array:
    return jnp.zeros((batch_size, size), jnp.float32)
