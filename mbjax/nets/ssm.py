"""Selective scan (Gu & Dao 2023, "Mamba", Alg. 2): the reset-aware linear recurrence of S6.

For channels d and state size N, with input-dependent step Δ_t, B_t, C_t and a fixed
diagonal A (negative real):

    ā_t = exp(Δ_t A)              (zero-order hold for A)
    b̄_t = Δ_t x_t B_t             (Euler step for B, as in Mamba-1)
    h_t = ā_t ⊙ h_{t−1} + b̄_t     h ∈ R^{d×N}
    y_t = h_t C_t                 (contracted over N)

An episode start at t (`reset[t]`) means h_{t−1} is replaced by zeros. That is the same as
multiplying ā_t by 0, so the reset is folded into the decay and survives every path below.

`selective_scan` has three interchangeable paths over a time-major sequence [L, ...]:
* `"sequential"`: `lax.scan` of the recurrence, one step at a time.
* `"associative"`: `lax.associative_scan` over (ā, b̄) with the operator
  (a₁, b₁) ∘ (a₂, b₂) = (a₁a₂, a₂b₁ + b₂); O(log L) depth, the GPU/TPU path.
* `"chunked"`: associative within chunks of `chunk_size`, sequential across chunks (the
  chunk's start state folded into its first drive), so only one chunk of states is live at
  a time: L / chunk_size loop steps of log(chunk_size) depth. With chunks of 2 (the default)
  it was the fastest forward+backward on a 2-core CPU, 0.7–1.0× the sequential scan.
With `checkpoint` (default) the sequential path runs in blocks of `block_size` steps and the
chunked path chunk by chunk, and each block keeps only its start state for the backward
pass, which recomputes the block (`jax.checkpoint`). Storing every step's state instead made
the backward pass memory-bound on a 2-core CPU (BENCHMARKS.md has the measurements).
All take an initial state h₀ and return the final state, so a long sequence can be cut
anywhere and resumed. Differs from upstream MetaBonk (`src/neuro_genie/mamba_policy.py`):
upstream runs a Python loop over L with no resets and no parallel path.
"""
from __future__ import annotations

from typing import Literal

import chex
import jax
import jax.numpy as jnp

ScanPath = Literal["sequential", "associative", "chunked"]
SCAN_PATHS = ("sequential", "associative", "chunked")


def discretize(x, delta, A, B, reset):
  """(ā, b̄) for one or many steps: x, delta [..., d], A [d, N], B [..., N], reset [...]."""
  keep = 1.0 - reset.astype(x.dtype)
  decay = jnp.exp(delta[..., None] * A) * keep[..., None, None]
  drive = (delta * x)[..., None] * B[..., None, :]
  return decay, drive


def selective_step(h, x, delta, A, B, C, reset):
  """One step of the recurrence: h [b, d, N], x/delta [b, d], B/C [b, N], reset bool[b].

  Returns (h_t, y_t) with y_t [b, d]. The O(1) inference step of an S6 layer.
  """
  decay, drive = discretize(x, delta, A, B, reset)
  h = decay * h + drive
  return h, jnp.einsum("...dn,...n->...d", h, C)


def _combine(earlier, later):
  a1, b1 = earlier
  a2, b2 = later
  return a1 * a2, a2 * b1 + b2


def _sequential_states(decay, drive, h0):
  """All states h_1..h_T from h0, one step at a time."""
  def step(h, decay_drive):
    h = decay_drive[0] * h + decay_drive[1]
    return h, h

  return jax.lax.scan(step, h0, (decay, drive))[1]


def _associative_states(decay, drive, h0):
  """All states h_1..h_L from h0, by `lax.associative_scan` over axis 0."""
  # h0 enters as part of the first drive: h_1 = ā_1 h_0 + b̄_1 (ā_1 = 0 on a reset).
  drive = drive.at[0].add(decay[0] * h0)
  _, states = jax.lax.associative_scan(_combine, (decay, drive), axis=0)
  return states


def _blocked_scan(states_fn, x, delta, A, B, C, h0, reset, block: int, checkpoint: bool):
  """Sequential over blocks of `block` steps; `states_fn` gives the states inside a block."""
  length = x.shape[0]
  block = min(block, length)
  padded = -length % block
  # Padding with Δ = 0 gives ā = 1 and b̄ = 0: the state passes through unchanged.
  pad = lambda v: jnp.pad(v, [(0, padded)] + [(0, 0)] * (v.ndim - 1))
  split = lambda v: pad(v).reshape((-1, block) + v.shape[1:])

  def run_block(h, inputs):
    xb, db, bb, cb, rb = inputs
    decay, drive = discretize(xb, db, A, bb, rb)
    states = states_fn(decay, drive, h)
    return states[-1], jnp.einsum("lbdn,lbn->lbd", states, cb)

  if checkpoint:
    run_block = jax.checkpoint(run_block)
  h_last, y = jax.lax.scan(run_block, h0, tuple(map(split, (x, delta, B, C, reset))))
  return y.reshape((-1,) + y.shape[2:])[:length], h_last


def selective_scan(x, delta, A, B, C, h0, reset, *, path: ScanPath = "sequential",
                   chunk_size: int = 2, block_size: int = 32, checkpoint: bool = True):
  """Runs the selective recurrence over a time-major sequence.

  Args:
    x, delta: f32[L, b, d] inputs and positive step sizes Δ.
    A: f32[d, N] (negative for a stable decay).
    B, C: f32[L, b, N] input and output projections.
    h0: f32[b, d, N] state before the first step.
    reset: bool[L, b]; True zeroes the carried state before that step.
    path: "sequential" | "associative" | "chunked" (same result up to float rounding).
    chunk_size: time steps per associative chunk of the chunked path. 2 was fastest on a
      2-core CPU (two steps per loop iteration; longer chunks add log-depth work there);
      accelerators want longer chunks.
    block_size: time steps per checkpointed block of the sequential path.
    checkpoint: recompute each block's (chunk's) states in the backward pass rather than
      storing them (sequential and chunked paths; no effect on values).

  Returns:
    (y f32[L, b, d], h_L f32[b, d, N]).
  """
  length, batch, channels = x.shape
  state_size = A.shape[-1]
  chex.assert_shape(delta, (length, batch, channels))
  chex.assert_shape(A, (channels, state_size))
  chex.assert_shape([B, C], (length, batch, state_size))
  chex.assert_shape(h0, (batch, channels, state_size))
  chex.assert_shape(reset, (length, batch))
  if chunk_size < 1 or block_size < 1:
    raise ValueError(f"chunk_size and block_size must be positive, got {chunk_size} and "
                     f"{block_size}")

  if path == "associative":
    decay, drive = discretize(x, delta, A, B, reset)
    states = _associative_states(decay, drive, h0)
    return jnp.einsum("lbdn,lbn->lbd", states, C), states[-1]
  if path == "sequential":
    return _blocked_scan(_sequential_states, x, delta, A, B, C, h0, reset, block_size,
                         checkpoint)
  if path == "chunked":
    return _blocked_scan(_associative_states, x, delta, A, B, C, h0, reset, chunk_size,
                         checkpoint)
  raise ValueError(f"scan path must be one of {SCAN_PATHS}, got {path!r}")
