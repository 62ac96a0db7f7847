"""The PPO actor-critic: optional pixel encoder → optional recurrent core → actor and critic.

Feed-forward (`core="none"`) it is PureJaxRL's network: separate actor and critic MLP
towers on the observation, orthogonal init, a state-independent log-std. With a core
(`"gru"` or `"lstm"`) an MLP embedding feeds the cell and both towers read its output; the
recurrent state is an explicit carry that is zeroed where `is_first` marks an episode start.
Pixel observations (uint8, rank 3) go through a small shared CNN first.
"""
from __future__ import annotations

from typing import Any, Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mbjax.envs.spaces import HybridActionSpec
from mbjax.nets.hybrid import HybridDistribution, Squash

Carry = Any
_ACTIVATIONS = {"tanh": nn.tanh, "relu": nn.relu, "silu": nn.silu, "elu": nn.elu}


def _dense(features: int, scale: float) -> nn.Dense:
  return nn.Dense(features, kernel_init=nn.initializers.orthogonal(scale),
                  bias_init=nn.initializers.zeros)


class MLP(nn.Module):
  hidden_sizes: Sequence[int]
  activation: str = "tanh"

  @nn.compact
  def __call__(self, x):
    for size in self.hidden_sizes:
      x = _ACTIVATIONS[self.activation](_dense(size, np.sqrt(2))(x))
    return x


class PixelEncoder(nn.Module):
  """Three strided convolutions and a dense layer; uint8 pixels are scaled to [0, 1]."""

  features: int = 256

  @nn.compact
  def __call__(self, pixels):
    x = pixels.astype(jnp.float32) / 255.0
    for channels, kernel, stride in ((32, 8, 4), (64, 4, 2), (64, 3, 1)):
      x = nn.relu(nn.Conv(channels, (kernel, kernel), (stride, stride),
                          kernel_init=nn.initializers.orthogonal(np.sqrt(2)))(x))
    x = x.reshape(x.shape[:-3] + (-1,))
    return nn.relu(_dense(self.features, np.sqrt(2))(x))


class ActorCritic(nn.Module):
  """Maps (carry, obs, is_first, mask) to (carry, action distribution, value).

  Shapes: obs [B, *obs_shape], is_first bool[B], mask bool[B, sum(branches)], value f32[B].
  """

  spec: HybridActionSpec
  hidden_sizes: Sequence[int] = (64, 64)
  activation: str = "tanh"
  core: str = "none"  # "none" | "gru" | "lstm"
  core_size: int = 128
  squash: Squash = "clip"

  def setup(self):
    if self.core not in ("none", "gru", "lstm"):
      raise ValueError(f"network.core must be 'none', 'gru' or 'lstm', got {self.core!r}")
    if self.activation not in _ACTIVATIONS:
      raise ValueError(f"network.activation must be one of {sorted(_ACTIVATIONS)}, "
                       f"got {self.activation!r}")
    self.pixel_encoder = PixelEncoder()
    if self.core != "none":
      self.embed = MLP((self.core_size,), self.activation)
      cell_type = nn.GRUCell if self.core == "gru" else nn.OptimizedLSTMCell
      self.cell = cell_type(self.core_size)
    self.actor_torso = MLP(self.hidden_sizes, self.activation)
    self.critic_torso = MLP(self.hidden_sizes, self.activation)
    if self.spec.continuous_dim:  # no zero-size parameters for discrete-only spaces
      self.mean_head = _dense(self.spec.continuous_dim, 0.01)
      self.log_std = self.param("log_std", nn.initializers.zeros, (self.spec.continuous_dim,))
    self.logit_heads = [_dense(n, 0.01) for n in self.spec.branches]
    self.value_head = _dense(1, 1.0)

  def initial_carry(self, batch_size: int) -> Carry:
    return initial_carry(self.core, self.core_size, batch_size)

  def _features(self, carry, obs, is_first):
    if obs.ndim == 4:
      obs = self.pixel_encoder(obs)
    if self.core == "none":
      return carry, obs
    zero = initial_carry(self.core, self.core_size, obs.shape[0])
    carry = jax.tree.map(lambda z, c: jnp.where(is_first[:, None], z, c), zero, carry)
    return self.cell(carry, self.embed(obs))

  def __call__(self, carry, obs, is_first, mask):
    chex.assert_rank(is_first, 1)
    carry, features = self._features(carry, obs, is_first)
    actor = self.actor_torso(features)
    if self.spec.continuous_dim:
      mean, log_std = self.mean_head(actor), self.log_std
    else:
      mean = log_std = jnp.zeros(actor.shape[:-1] + (0,), actor.dtype)
    distribution = HybridDistribution.create(
        self.spec, mean, log_std,
        tuple(head(actor) for head in self.logit_heads), mask, self.squash)
    value = self.value_head(self.critic_torso(features))[..., 0]
    return carry, distribution, value

  def value(self, carry, obs, is_first):
    """The critic alone (used to bootstrap from final observations)."""
    _, features = self._features(carry, obs, is_first)
    return self.value_head(self.critic_torso(features))[..., 0]


def initial_carry(core: str, core_size: int, batch_size: int) -> Carry:
  """The zero recurrent state; feed-forward networks carry nothing (an empty tuple)."""
  if core == "lstm":
    zeros = jnp.zeros((batch_size, core_size), jnp.float32)
    return (zeros, zeros)
  if core == "gru":
    return jnp.zeros((batch_size, core_size), jnp.float32)
  return ()
