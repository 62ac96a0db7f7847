"""The PPO actor-critic: optional pixel encoder → optional recurrent core → actor and critic.

Feed-forward (`core="none"`) it is PureJaxRL's network: separate actor and critic MLP
towers on the observation, orthogonal init, a state-independent log-std. With a core
(`"gru"`, `"lstm"`, `"cfc"` or `"mamba"`, see `mbjax.nets.cores`) an MLP embedding feeds the
core and both towers read its output; the recurrent state is an explicit carry that is
zeroed where `is_first` marks an episode start. An optional `dt` f32[B] gives the elapsed
time since the previous step to cores that take it (CfC: real timestamps from an irregular
source such as the game bridge); without it a step lasts 1, and other cores ignore it.
`sequence` applies the network to a whole time-major sequence through the core's parallel
path (Mamba); it equals stepping.
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
from mbjax.nets import cores
from mbjax.nets.cores import CoreOptions
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
  """Maps (carry, obs, is_first, mask[, dt]) to (carry, action distribution, value).

  Shapes: obs [B, *obs_shape], is_first bool[B], mask bool[B, sum(branches)], dt f32[B],
  value f32[B].
  """

  spec: HybridActionSpec
  hidden_sizes: Sequence[int]
  activation: str
  core: str  # one of cores.CORES
  core_size: int
  squash: Squash
  core_options: CoreOptions

  def setup(self):
    if self.core not in cores.CORES:
      raise ValueError(f"network.core must be one of {cores.CORES}, got {self.core!r}")
    if self.activation not in _ACTIVATIONS:
      raise ValueError(f"network.activation must be one of {sorted(_ACTIVATIONS)}, "
                       f"got {self.activation!r}")
    self.pixel_encoder = PixelEncoder()
    if self.core != "none":
      self.embed = MLP((self.core_size,), self.activation)
      self.cell = cores.make_core(self.core, self.core_size, self.core_options)
    self.actor_torso = MLP(self.hidden_sizes, self.activation)
    self.critic_torso = MLP(self.hidden_sizes, self.activation)
    if self.spec.continuous_dim:  # no zero-size parameters for discrete-only spaces
      self.mean_head = _dense(self.spec.continuous_dim, 0.01)
      self.log_std = self.param("log_std", nn.initializers.zeros, (self.spec.continuous_dim,))
    self.logit_heads = [_dense(n, 0.01) for n in self.spec.branches]
    self.value_head = _dense(1, 1.0)

  def initial_carry(self, batch_size: int) -> Carry:
    return initial_carry(self.core, self.core_size, batch_size, self.core_options)

  def _features(self, carry, obs, is_first, dt):
    if obs.ndim == 4:
      obs = self.pixel_encoder(obs)
    if self.core == "none":
      return carry, obs
    if cores.takes_dt(self.core):
      return self.cell(carry, self.embed(obs), is_first, dt)
    return self.cell(carry, self.embed(obs), is_first)

  def __call__(self, carry, obs, is_first, mask, dt=None):
    chex.assert_rank(is_first, 1)
    carry, features = self._features(carry, obs, is_first, dt)
    distribution, value = self._heads(features, mask)
    return carry, distribution, value

  def sequence(self, carry, obs, is_first, mask):
    """The network over a time-major sequence: obs [L, N, ...], is_first bool[L, N],
    mask [L, N, sum(branches)] → (carry, distribution [L, N], value f32[L, N]), through
    the core's whole-sequence path (only for cores in `cores.SEQUENCE_CORES`)."""
    if not cores.has_sequence_path(self.core):
      raise ValueError(f"core {self.core!r} has no sequence path; unroll it step by step")
    chex.assert_rank(is_first, 2)
    length, batch = is_first.shape
    merge = lambda x: x.reshape((length * batch,) + x.shape[2:])
    split = lambda x: x.reshape((length, batch) + x.shape[1:])
    obs = merge(obs)
    if obs.ndim == 4:
      obs = self.pixel_encoder(obs)
    carry, features = self.cell.sequence(carry, split(self.embed(obs)), is_first)
    distribution, value = self._heads(merge(features), merge(mask))
    return carry, jax.tree.map(split, distribution), split(value)

  def _heads(self, features, mask):
    actor = self.actor_torso(features)
    if self.spec.continuous_dim:
      mean, log_std = self.mean_head(actor), self.log_std
    else:
      mean = log_std = jnp.zeros(actor.shape[:-1] + (0,), actor.dtype)
    distribution = HybridDistribution.create(
        self.spec, mean, log_std,
        tuple(head(actor) for head in self.logit_heads), mask, self.squash)
    value = self.value_head(self.critic_torso(features))[..., 0]
    return distribution, value

  def value(self, carry, obs, is_first, dt=None):
    """The critic alone (used to bootstrap from final observations)."""
    _, features = self._features(carry, obs, is_first, dt)
    return self.value_head(self.critic_torso(features))[..., 0]


initial_carry = cores.initial_carry  # (core, core_size, batch_size, options) → zero carry
