"""A device-resident ring replay as pure functions: `init`, `add`, `sample`,
`sample_sequences`, `latest`, and per-stream buffers: `init_streams`, `add_streams`,
`sample_windows`.

Items are any pytree; the buffer stores each leaf as `[capacity, *leaf_shape]` on device.
`add` writes a batch of B consecutive items at the write head (wrapping around) and is meant
to be jitted with the buffer donated (`add_jit` does that), so XLA updates it in place
instead of copying the whole buffer each call. Sampling is uniform over the stored items;
`sample_sequences` draws windows of L consecutive items that never cross the write head
(the seam between the newest and the oldest item), so a sequence is always one contiguous
stretch of time; `latest` returns the newest L items in order (the Sebulba loop reads its
rollouts this way). `init_streams` / `add_streams` / `sample_windows` keep S such buffers
side by side (one per env, leaves [S, capacity, ...]) and draw windows from random streams.

Nothing here comes from upstream MetaBonk, whose replay was Python lists of CPU tensors; the
interface follows flashbax's item/trajectory buffers.
"""
from __future__ import annotations

from typing import Any

import chex
import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class ReplayState:
  data: Any  # pytree, each leaf [capacity, ...]
  head: jax.Array  # i32[], where the next item goes
  size: jax.Array  # i32[], how many slots hold items (saturates at capacity)

  @property
  def capacity(self) -> int:
    return jax.tree.leaves(self.data)[0].shape[0]


def init(example_item: Any, capacity: int) -> ReplayState:
  """An empty buffer for items shaped and typed like `example_item` (no batch axis)."""
  if capacity < 1:
    raise ValueError(f"capacity={capacity}: expected >= 1")
  data = jax.tree.map(lambda x: jnp.zeros((capacity,) + jnp.shape(x), jnp.asarray(x).dtype),
                      example_item)
  return ReplayState(data, jnp.int32(0), jnp.int32(0))


def add(state: ReplayState, items: Any) -> ReplayState:
  """Writes items (leaves [B, ...], B ≤ capacity) at the head, oldest overwritten first."""
  capacity = state.capacity
  batch = jax.tree.leaves(items)[0].shape[0]
  if batch > capacity:
    raise ValueError(f"adding {batch} items to a buffer of capacity {capacity}")
  chex.assert_trees_all_equal_shapes_and_dtypes(
      jax.tree.map(lambda x: x[0], items), jax.tree.map(lambda x: x[0], state.data))
  if batch == capacity or capacity % batch == 0:
    # Writes of a size dividing the capacity never straddle the end if they start aligned;
    # then a contiguous dynamic_update_slice (a memcpy) beats a scatter.
    aligned = state.head % batch == 0
  else:
    aligned = False
  index = (state.head + jnp.arange(batch)) % capacity

  def scatter(buffer, new):
    return buffer.at[index].set(new, unique_indices=True, mode="promise_in_bounds")

  def write_slice(buffer, new):
    start = (state.head,) + (0,) * (buffer.ndim - 1)
    return jax.lax.dynamic_update_slice(buffer, new.astype(buffer.dtype), start)

  if aligned is False:
    data = jax.tree.map(scatter, state.data, items)
  else:
    data = jax.lax.cond(aligned, lambda d: jax.tree.map(write_slice, d, items),
                        lambda d: jax.tree.map(scatter, d, items), state.data)
  return ReplayState(data, (state.head + batch) % capacity,
                     jnp.minimum(state.size + batch, capacity))


add_jit = jax.jit(add, donate_argnums=0)


def _oldest(state: ReplayState) -> jax.Array:
  return (state.head - state.size) % state.capacity


def sample(state: ReplayState, key: jax.Array, batch_size: int) -> Any:
  """`batch_size` items drawn uniformly (with replacement) from the stored ones. The buffer
  must not be empty (check `state.size` outside jit)."""
  offsets = jax.random.randint(key, (batch_size,), 0, jnp.maximum(state.size, 1))
  index = (_oldest(state) + offsets) % state.capacity
  # Indices are in bounds by construction; "clip" lowers to the cheapest gather on CPU.
  return jax.tree.map(lambda x: jnp.take(x, index, axis=0, mode="clip"),
                      state.data)


def sample_sequences(state: ReplayState, key: jax.Array, batch_size: int, seq_len: int) -> Any:
  """`batch_size` windows of `seq_len` consecutive items, leaves [B, L, ...], each window
  wholly inside the stored stretch (it never crosses the write head). Needs
  `state.size >= seq_len`."""
  if seq_len > state.capacity:
    raise ValueError(f"seq_len={seq_len} exceeds the capacity {state.capacity}")
  starts = jax.random.randint(key, (batch_size,), 0,
                              jnp.maximum(state.size - seq_len + 1, 1))
  index = (_oldest(state) + starts[:, None] + jnp.arange(seq_len)[None, :]) % state.capacity
  # Indices are in bounds by construction; "clip" lowers to the cheapest gather on CPU.
  return jax.tree.map(lambda x: jnp.take(x, index, axis=0, mode="clip"),
                      state.data)


def init_streams(example_item: Any, capacity: int, num_streams: int) -> ReplayState:
  """`num_streams` buffers of `capacity` items side by side (e.g. one per env): every leaf,
  `head` and `size` included, gets a leading stream axis, so the streams split over devices
  like the envs they belong to. Use with `add_streams` and `sample_windows`."""
  one = init(example_item, capacity)
  return jax.tree.map(lambda x: jnp.broadcast_to(x, (num_streams,) + x.shape), one)


def add_streams(state: ReplayState, items: Any) -> ReplayState:
  """Writes items [S, B, ...] (B consecutive items of each of the S streams)."""
  return jax.vmap(add)(state, items)


def sample_windows(state: ReplayState, key: jax.Array, batch_size: int, seq_len: int) -> Any:
  """`batch_size` windows of `seq_len` consecutive items of one stream each, time-major
  leaves [L, B, ...], from a stream buffer (`init_streams`): the stream is uniform over the
  S streams, the start uniform over its stored stretch as in `sample_sequences` (never
  crossing its write head). Needs every stream to hold `seq_len` items."""
  capacity = jax.tree.leaves(state.data)[0].shape[1]
  if seq_len > capacity:
    raise ValueError(f"seq_len={seq_len} exceeds the capacity {capacity}")
  streams = state.head.shape[0]
  start_key, stream_key = jax.random.split(key)
  stream = jax.random.randint(stream_key, (batch_size,), 0, streams)
  size, head = state.size[stream], state.head[stream]
  starts = jax.random.randint(start_key, (batch_size,), 0, jnp.maximum(size - seq_len + 1, 1))
  oldest = (head - size) % capacity
  time = (oldest[None, :] + starts[None, :] + jnp.arange(seq_len)[:, None]) % capacity
  return jax.tree.map(lambda x: x[stream[None, :], time], state.data)


def latest(state: ReplayState, length: int) -> Any:
  """The newest `length` items, oldest first, leaves [length, ...]."""
  if length > state.capacity:
    raise ValueError(f"length={length} exceeds the capacity {state.capacity}")
  index = (state.head - length + jnp.arange(length)) % state.capacity
  # Indices are in bounds by construction; "clip" lowers to the cheapest gather on CPU.
  return jax.tree.map(lambda x: jnp.take(x, index, axis=0, mode="clip"),
                      state.data)
