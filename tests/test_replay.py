"""Replay semantics against hand-computed expectations: wraparound, uniform sampling over
stored items, sequences that never cross the write head, `latest`, in-place donated adds."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mbjax.data import replay


def items(values):
  values = jnp.asarray(values, jnp.int32)
  return {"x": values, "pair": jnp.stack([values, -values], axis=-1)}


def test_add_wraps_around_oldest_first():
  state = replay.init({"x": jnp.int32(0), "pair": jnp.zeros(2, jnp.int32)}, capacity=5)
  state = replay.add(state, items([1, 2, 3]))
  assert (int(state.head), int(state.size)) == (3, 3)
  state = replay.add(state, items([4, 5, 6, 7]))
  # Slots: 6 7 3 4 5 — items 1 and 2 were the oldest and got overwritten.
  np.testing.assert_array_equal(state.data["x"], [6, 7, 3, 4, 5])
  np.testing.assert_array_equal(state.data["pair"][:, 1], [-6, -7, -3, -4, -5])
  assert (int(state.head), int(state.size)) == (2, 5)
  np.testing.assert_array_equal(replay.latest(state, 4)["x"], [4, 5, 6, 7])


def test_aligned_and_unaligned_writes_agree():
  """The dynamic-slice fast path (batch divides capacity) equals the scatter path."""
  fast = replay.init(jnp.int32(0), 8)
  for start in range(0, 24, 4):
    fast = replay.add(fast, jnp.arange(start, start + 4))
  np.testing.assert_array_equal(fast.data, [16, 17, 18, 19, 20, 21, 22, 23])
  slow = replay.init(jnp.int32(0), 8)
  slow = replay.add(slow, jnp.arange(3))  # head 3: later 4-item writes are unaligned
  for start in range(3, 23, 4):
    slow = replay.add(slow, jnp.arange(start, start + 4))
  np.testing.assert_array_equal(slow.data, [16, 17, 18, 19, 20, 21, 22, 15])


def test_sample_only_stored_items():
  state = replay.add(replay.init(jnp.int32(0), 100), jnp.arange(1, 8))
  drawn = replay.sample(state, jax.random.PRNGKey(0), 2000)
  assert set(np.unique(drawn).tolist()) == set(range(1, 8))  # never an empty slot (0)


@pytest.mark.parametrize("adds", [[7], [10, 3], [10, 10, 4]])
def test_sequences_never_cross_the_write_head(adds):
  capacity, seq_len = 10, 4
  state, counter = replay.init(jnp.int32(0), capacity), 0
  for n in adds:
    state = replay.add(state, jnp.arange(counter, counter + n))
    counter += n
  stored = list(range(max(0, counter - capacity), counter))
  valid_windows = {tuple(stored[i:i + seq_len]) for i in range(len(stored) - seq_len + 1)}
  windows = replay.sample_sequences(state, jax.random.PRNGKey(1), 3000, seq_len)
  drawn = {tuple(w) for w in np.asarray(windows).tolist()}
  assert drawn == valid_windows  # every valid window drawn, no other (e.g. [.., 23, 14, ..])


def test_jitted_donated_add_matches_and_reuses_buffer():
  state = replay.init(jnp.zeros((3,), jnp.uint8), 16)
  expected = replay.add(replay.init(jnp.zeros((3,), jnp.uint8), 16),
                        jnp.ones((4, 3), jnp.uint8))
  state = replay.add_jit(state, jnp.ones((4, 3), jnp.uint8))
  np.testing.assert_array_equal(state.data, expected.data)
  old = state
  state = replay.add_jit(state, jnp.full((4, 3), 2, jnp.uint8))
  assert old.data.is_deleted()  # donated: updated in place, the old handle is gone
  assert int(state.size) == 8


def test_bad_sizes_are_named():
  state = replay.init(jnp.int32(0), 4)
  with pytest.raises(ValueError, match="capacity 4"):
    replay.add(state, jnp.arange(5))
  with pytest.raises(ValueError, match="seq_len=5"):
    replay.sample_sequences(state, jax.random.PRNGKey(0), 1, 5)


def test_stream_windows_stay_in_one_stream_and_never_cross_the_write_head():
  # 3 streams written together; item t of stream s holds 100·s + t. Capacity 6, 9 steps
  # written: steps 3..8 are stored, and a window of 4 starts at step 3, 4 or 5.
  capacity, seq_len, streams = 6, 4, 3
  state = replay.init_streams(jnp.int32(0), capacity, streams)
  steps = jnp.arange(9)[None, :] + 100 * jnp.arange(streams)[:, None]  # [S, T]
  state = replay.add_streams(state, steps[:, :5])
  state = replay.add_streams(state, steps[:, 5:])
  np.testing.assert_array_equal(state.head, [3, 3, 3])
  windows = np.asarray(replay.sample_windows(state, jax.random.PRNGKey(2), 2000, seq_len))
  assert windows.shape == (seq_len, 2000)  # time-major
  expected = {tuple(100 * s + t for t in range(start, start + seq_len))
              for s in range(streams) for start in (3, 4, 5)}
  assert {tuple(w) for w in windows.T.tolist()} == expected
