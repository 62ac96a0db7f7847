"""Mamba (Gu & Dao 2023) blocks and stack with an O(1) recurrent step and a reset-aware
full-sequence path that give the same outputs.

A block is pre-LayerNorm → in_proj (x, z) → causal depthwise conv over time → SiLU →
x_proj (Δ_low, B, C) → Δ = softplus(dt_proj(Δ_low)) → selective scan (`mbjax.nets.ssm`) →
+ D ⊙ x → ⊙ SiLU(z) → out_proj → + residual. The stack applies `num_layers` blocks and a
final LayerNorm. Per layer the carry is `MambaState(conv, ssm)`: the last `conv_size − 1`
conv inputs and the SSM state. Sequences are time-major [L, b, ...].

Episode starts (`is_first`) zero both states: the SSM through its decay, the conv by masking
taps that would read from before the start, in the sequence path as in `step`.

`step_weights` + `fast_step` are the System-1 inference path: the same step as
`MambaStack.__call__` as a pure function of plain arrays, with A = −exp(A_log) computed once
per weight update instead of every step, the conv as four multiply-adds, and Δ kept out of
the per-state fusion. At batch 1 the step is bound by reading the in/out projections
(40 MB in f32 at the System-1 size, more than a 32 MiB L3), so `step_weights` stores them by
default in bf16 as [out, in] rows: 20 MB that stay in cache, read by row dot products with f32
accumulation. On a 2-core CPU that took the step from about 2.5 to 1.4 ms (BENCHMARKS.md,
"Motor policies"); `projection_dtype=jnp.float32` gives the module's numbers exactly.

Differs from upstream MetaBonk (`src/neuro_genie/mamba_policy.py`, §5.2 of the notes): the
conv state is cached, so token-by-token stepping reproduces the sequence output exactly;
state is an explicit carry (no module attribute, nothing leaks between calls); resets are
inputs; there is a trainable sequence path. Same initialisations: A = −(1..N) per channel
(S4D-real), D = 1, Δ bias = softplus⁻¹ of a log-uniform draw in [dt_min, dt_max], LayerNorm
ε = 1e-5. `tests/test_parity.py` checks the selective scan against state-spaces/mamba's
`selective_scan_ref` and a block against its `Mamba` mixer behind a LayerNorm.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from mbjax.nets import ssm

LAYER_NORM_EPS = 1e-5  # upstream Mamba's norm_epsilon (flax's LayerNorm defaults to 1e-6)


class MambaState(NamedTuple):
  conv: jax.Array  # f32[b, conv_size − 1, d_inner]: the latest conv inputs, oldest first
  ssm: jax.Array  # f32[b, d_inner, N]


def _dt_bias_init(dt_min: float, dt_max: float):
  def init(key, shape, dtype=jnp.float32):
    log_dt = jax.random.uniform(key, shape, dtype, math.log(dt_min), math.log(dt_max))
    dt = jnp.exp(log_dt)
    return dt + jnp.log(-jnp.expm1(-dt))  # softplus⁻¹(dt)
  return init


def _symmetric_uniform(bound: float):
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def _conv_ages(is_first: jax.Array, history: int) -> jax.Array:
  """Steps since the last episode start at each position [L, b]; with no start inside the
  sequence every tap may read the carried history, so the age is at least `history`."""
  t = jnp.arange(is_first.shape[0])[:, None]
  last_start = jax.lax.cummax(jnp.where(is_first, t, -history - 1), axis=0)
  return t - last_start


def _conv_step(history, x, kernel, bias):
  """The causal depthwise conv at one step: history [b, K−1, d] (oldest first), x [b, d].

  Written as K multiply-adds: XLA fuses them into one loop, where an einsum over the
  [b, K, d] window became a transpose and a reduction per layer."""
  out = bias + x * kernel[-1]
  for k in range(history.shape[1]):
    out = out + history[:, k] * kernel[k]
  return out


def _push(history, x):
  """The conv state after x: drop the oldest input, append x."""
  return jnp.concatenate([history[:, 1:], x[:, None]], axis=1)


class MambaBlock(nn.Module):
  d_model: int
  d_state: int = 16
  conv_size: int = 4
  expand: int = 2
  dt_rank: int = 0  # 0: ceil(d_model / 16), as upstream's "auto"
  dt_min: float = 0.001
  dt_max: float = 0.1
  scan_path: str = "sequential"
  chunk_size: int = 2  # chunked scan path only; 2 was fastest on a 2-core CPU

  @property
  def d_inner(self) -> int:
    return self.expand * self.d_model

  @property
  def rank(self) -> int:
    return self.dt_rank or math.ceil(self.d_model / 16)

  def setup(self):
    d_inner, rank = self.d_inner, self.rank
    self.norm = nn.LayerNorm(epsilon=LAYER_NORM_EPS)
    self.in_proj = nn.Dense(2 * d_inner, use_bias=False)
    # Depthwise conv taps, oldest first: tap k multiplies the input conv_size − 1 − k steps ago.
    self.conv_kernel = self.param(
        "conv_kernel", _symmetric_uniform(self.conv_size ** -0.5), (self.conv_size, d_inner))
    self.conv_bias = self.param("conv_bias", nn.initializers.zeros, (d_inner,))
    self.x_proj = nn.Dense(rank + 2 * self.d_state, use_bias=False)
    self.dt_proj = nn.Dense(
        d_inner, kernel_init=_symmetric_uniform(rank ** -0.5),
        bias_init=_dt_bias_init(self.dt_min, self.dt_max))
    self.A_log = self.param(
        "A_log", lambda key, shape: jnp.log(jnp.broadcast_to(
            jnp.arange(1, shape[1] + 1, dtype=jnp.float32), shape)),
        (d_inner, self.d_state))
    self.D = self.param("D", nn.initializers.ones, (d_inner,))
    self.out_proj = nn.Dense(self.d_model, use_bias=False)

  def _ssm_inputs(self, x):
    """Δ, B, C from the conv output x [..., d_inner]."""
    dt_low, B, C = jnp.split(self.x_proj(x), [self.rank, self.rank + self.d_state], axis=-1)
    return nn.softplus(self.dt_proj(dt_low)), B, C

  def _output(self, u, x, y, z):
    return u + self.out_proj((y + self.D * x) * nn.silu(z))

  def __call__(self, state: MambaState, u: jax.Array, is_first: jax.Array):
    """Full sequence: u [L, b, d_model], is_first bool[L, b] → (state, out [L, b, d_model])."""
    length, batch = is_first.shape
    chex.assert_shape(u, (length, batch, self.d_model))
    history = self.conv_size - 1
    x, z = jnp.split(self.in_proj(self.norm(u)), 2, axis=-1)

    # Causal depthwise conv over [carried history; x], skipping taps before an episode start.
    padded = jnp.concatenate([jnp.swapaxes(state.conv, 0, 1), x], axis=0)
    ages = _conv_ages(is_first, history)
    conv = self.conv_bias
    for k in range(self.conv_size):
      lag = history - k
      visible = (ages >= lag)[..., None]
      conv = conv + jnp.where(visible, padded[k:k + length], 0.0) * self.conv_kernel[k]
    last_lags = jnp.arange(history - 1, -1, -1)  # lag of each entry of the new conv state
    new_conv = jnp.where((ages[-1][:, None] >= last_lags)[..., None],
                         jnp.swapaxes(padded[length:], 0, 1), 0.0)

    xc = nn.silu(conv)
    delta, B, C = self._ssm_inputs(xc)
    A = -jnp.exp(self.A_log)
    y, h = ssm.selective_scan(xc, delta, A, B, C, state.ssm, is_first, path=self.scan_path,
                              chunk_size=self.chunk_size)
    return MambaState(new_conv, h), self._output(u, xc, y, z)

  def step(self, state: MambaState, u: jax.Array, is_first: jax.Array):
    """One token in O(1): u [b, d_model], is_first bool[b] → (state, out [b, d_model])."""
    chex.assert_shape(u, (is_first.shape[0], self.d_model))
    x, z = jnp.split(self.in_proj(self.norm(u)), 2, axis=-1)
    history = jnp.where(is_first[:, None, None], 0.0, state.conv)
    xc = nn.silu(_conv_step(history, x, self.conv_kernel, self.conv_bias))
    delta, B, C = self._ssm_inputs(xc)
    h, y = ssm.selective_step(state.ssm, xc, delta, -jnp.exp(self.A_log), B, C, is_first)
    return MambaState(_push(history, x), h), self._output(u, xc, y, z)


class MambaStack(nn.Module):
  """`num_layers` Mamba blocks and a final LayerNorm; carry = tuple of per-layer states."""

  d_model: int
  num_layers: int = 2
  d_state: int = 16
  conv_size: int = 4
  expand: int = 2
  scan_path: str = "sequential"
  chunk_size: int = 2  # chunked scan path only; 2 was fastest on a 2-core CPU

  def setup(self):
    self.blocks = [MambaBlock(self.d_model, self.d_state, self.conv_size, self.expand,
                              scan_path=self.scan_path, chunk_size=self.chunk_size)
                   for _ in range(self.num_layers)]
    self.norm = nn.LayerNorm(epsilon=LAYER_NORM_EPS)

  def initial_carry(self, batch_size: int) -> tuple[MambaState, ...]:
    return initial_state(batch_size, self.d_model, self.num_layers, self.d_state,
                         self.conv_size, self.expand)

  def __call__(self, carry, x, is_first):
    """One step (the core interface): x [b, d_model] → (carry, features [b, d_model])."""
    return self._run(carry, x, is_first, lambda block, *args: block.step(*args))

  def sequence(self, carry, xs, is_first):
    """Whole sequence: xs [L, b, d_model], is_first bool[L, b] → (carry, [L, b, d_model])."""
    return self._run(carry, xs, is_first, lambda block, *args: block(*args))

  def _run(self, carry, x, is_first, apply_block):
    chex.assert_equal(len(carry), self.num_layers)
    new_carry = []
    for block, state in zip(self.blocks, carry):
      state, x = apply_block(block, state, x, is_first)
      new_carry.append(state)
    return tuple(new_carry), self.norm(x)


def initial_state(batch_size: int, d_model: int, num_layers: int, d_state: int = 16,
                  conv_size: int = 4, expand: int = 2) -> tuple[MambaState, ...]:
  d_inner = expand * d_model
  return tuple(MambaState(jnp.zeros((batch_size, conv_size - 1, d_inner), jnp.float32),
                          jnp.zeros((batch_size, d_inner, d_state), jnp.float32))
               for _ in range(num_layers))


class LayerWeights(NamedTuple):
  """One block's parameters as plain arrays, for `fast_step`."""

  norm_scale: jax.Array  # [d_model]
  norm_bias: jax.Array  # [d_model]
  in_proj: jax.Array  # [2·d_inner, d_model] ([out, in]): x rows then z rows
  conv_kernel: jax.Array  # [conv_size, d_inner], oldest tap first
  conv_bias: jax.Array  # [d_inner]
  x_proj: jax.Array  # [d_inner, rank + 2N]: Δ_low, B, C
  dt_proj: jax.Array  # [rank, d_inner]
  dt_bias: jax.Array  # [d_inner]
  A: jax.Array  # [d_inner, N] = −exp(A_log)
  D: jax.Array  # [d_inner]
  out_proj: jax.Array  # [d_model, d_inner] ([out, in])


class StepWeights(NamedTuple):
  layers: tuple[LayerWeights, ...]
  norm_scale: jax.Array  # final LayerNorm
  norm_bias: jax.Array


def step_weights(variables, projection_dtype=jnp.bfloat16) -> StepWeights:
  """`MambaStack` variables → `StepWeights` (run once per weight update, not per step).

  in_proj and out_proj are stored transposed, in `projection_dtype` (see the module
  docstring for why bf16 is the default; float32 reproduces the module step)."""
  params = variables["params"]
  layers = []
  for i in range(sum(name.startswith("blocks_") for name in params)):
    p = params[f"blocks_{i}"]
    layers.append(LayerWeights(
        p["norm"]["scale"], p["norm"]["bias"],
        p["in_proj"]["kernel"].T.astype(projection_dtype), p["conv_kernel"], p["conv_bias"],
        p["x_proj"]["kernel"], p["dt_proj"]["kernel"], p["dt_proj"]["bias"],
        -jnp.exp(p["A_log"]), p["D"], p["out_proj"]["kernel"].T.astype(projection_dtype)))
  return StepWeights(tuple(layers), params["norm"]["scale"], params["norm"]["bias"])


def _project(x, rows):
  """x [b, in] @ rowsᵀ for `rows` [out, in] in any float dtype, accumulated in x's dtype."""
  return jnp.dot(x.astype(rows.dtype), rows.T, preferred_element_type=x.dtype)


def _layer_norm(x, scale, bias):
  centred = x - x.mean(-1, keepdims=True)
  variance = jnp.square(centred).mean(-1, keepdims=True)
  return centred * jax.lax.rsqrt(variance + LAYER_NORM_EPS) * scale + bias


def fast_step(weights: StepWeights, carry: tuple[MambaState, ...], u: jax.Array,
              is_first: jax.Array):
  """`MambaStack.__call__` (one token, every layer) on `step_weights(variables)`: the same
  numbers up to float rounding with float32 projections, up to bf16 rounding of the
  projections' inputs and weights with the default. u [b, d_model], is_first bool[b] →
  (carry, out [b, d_model])."""
  chex.assert_equal(len(carry), len(weights.layers))
  chex.assert_shape(u, (is_first.shape[0], weights.norm_scale.shape[0]))
  keep = 1.0 - is_first.astype(u.dtype)
  new_carry = []
  for w, state in zip(weights.layers, carry):
    x, z = jnp.split(_project(_layer_norm(u, w.norm_scale, w.norm_bias), w.in_proj), 2,
                     axis=-1)
    history = state.conv * keep[:, None, None]
    xc = nn.silu(_conv_step(history, x, w.conv_kernel, w.conv_bias))
    rank, size = w.dt_proj.shape[0], w.A.shape[1]
    dt_low, B, C = jnp.split(xc @ w.x_proj, [rank, rank + size], axis=-1)
    # The barrier keeps XLA from re-evaluating softplus for each of the N state entries
    # inside the fused state update.
    delta = jax.lax.optimization_barrier(nn.softplus(dt_low @ w.dt_proj + w.dt_bias))
    h, y = ssm.selective_step(state.ssm, xc, delta, w.A, B, C, is_first)
    u = u + _project((y + w.D * xc) * nn.silu(z), w.out_proj)
    new_carry.append(MambaState(_push(history, x), h))
  return tuple(new_carry), _layer_norm(u, weights.norm_scale, weights.norm_bias)
