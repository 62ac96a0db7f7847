"""Recurrent cores of the actor-critic behind one interface.

A core is a flax module called as `core(carry, x f32[b, F], is_first bool[b]) ->
(carry, features f32[b, size])`: one step, with the carry zeroed where `is_first`. Cores in
`TIMED_CORES` also take `dt` f32[b], the elapsed time since the previous step (1 when not
given); the others assume a fixed step. Cores in
`SEQUENCE_CORES` also have `core.sequence(carry, xs [L, b, F], is_first [L, b]) -> (carry,
features [L, b, size])`, a whole-sequence path equal to stepping (Mamba's parallel scan);
the others are unrolled one step at a time by `lax.scan`. `initial_carry` gives the zero
carry of any core without parameters.

Cores: "gru", "lstm" (flax cells), "cfc" (`mbjax.nets.cfc`), "mamba" (`mbjax.nets.mamba`).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mbjax.nets import cfc, mamba
from mbjax.nets.ssm import SCAN_PATHS

Carry = Any
CORES = ("none", "gru", "lstm", "cfc", "mamba")
SEQUENCE_CORES = ("mamba",)
TIMED_CORES = ("cfc",)


@dataclasses.dataclass(frozen=True)
class CoreOptions:
  """Core settings beyond the kind and size (hashable: a flax module field)."""

  mamba_layers: int = 2
  ssm_state_size: int = 16  # N, the SSM state per channel
  conv_size: int = 4  # causal depthwise conv width
  expand: int = 2  # d_inner = expand × core_size
  scan_path: str = "sequential"  # one of ssm.SCAN_PATHS
  scan_chunk: int = 16  # time steps per chunk of the chunked scan
  cfc_mode: str = "default"  # one of cfc.MODES

  def __post_init__(self):
    if self.scan_path not in SCAN_PATHS:
      raise ValueError(f"scan_path must be one of {SCAN_PATHS}, got {self.scan_path!r}")
    if self.cfc_mode not in cfc.MODES:
      raise ValueError(f"cfc_mode must be one of {cfc.MODES}, got {self.cfc_mode!r}")


class RNNCellCore(nn.Module):
  """A flax GRU or LSTM cell behind the core interface."""

  kind: str
  size: int

  @nn.compact
  def __call__(self, carry, x, is_first):
    zero = initial_carry(self.kind, self.size, x.shape[0])
    carry = _zero_where(is_first, zero, carry)
    cell = nn.GRUCell(self.size) if self.kind == "gru" else nn.OptimizedLSTMCell(self.size)
    return cell(carry, x)


class CfCCore(nn.Module):
  size: int
  mode: str = "default"

  @nn.compact
  def __call__(self, carry, x, is_first, dt=None):
    return cfc.CfCCell(self.size, mode=self.mode)(carry, x, is_first, dt)


def _zero_where(is_first, zero, carry):
  return jax.tree.map(
      lambda z, c: jnp.where(is_first.reshape(is_first.shape + (1,) * (c.ndim - 1)), z, c),
      zero, carry)


def make_core(kind: str, size: int, options: CoreOptions = CoreOptions()) -> nn.Module:
  if kind in ("gru", "lstm"):
    return RNNCellCore(kind, size)
  if kind == "cfc":
    return CfCCore(size, options.cfc_mode)
  if kind == "mamba":
    return mamba.MambaStack(size, options.mamba_layers, options.ssm_state_size,
                            options.conv_size, options.expand, options.scan_path,
                            options.scan_chunk)
  raise ValueError(f"network.core must be one of {CORES[1:]} for a recurrent core, "
                   f"got {kind!r}")


def initial_carry(kind: str, size: int, batch_size: int,
                  options: CoreOptions = CoreOptions()) -> Carry:
  """The zero carry; feed-forward networks carry nothing (an empty tuple)."""
  if kind == "lstm":
    zeros = jnp.zeros((batch_size, size), jnp.float32)
    return (zeros, zeros)
  if kind in ("gru", "cfc"):
    return jnp.zeros((batch_size, size), jnp.float32)
  if kind == "mamba":
    return mamba.initial_state(batch_size, size, options.mamba_layers, options.ssm_state_size,
                               options.conv_size, options.expand)
  if kind == "none":
    return ()
  raise ValueError(f"network.core must be one of {CORES}, got {kind!r}")


def has_sequence_path(kind: str) -> bool:
  return kind in SEQUENCE_CORES


def takes_dt(kind: str) -> bool:
  return kind in TIMED_CORES
