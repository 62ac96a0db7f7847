"""Tests for `mbjax.envs.wrappers` and `mbjax.envs.gymnax_adapter`.

A tiny deterministic `Counter` env defined here checks `EpisodeStatistics` (running and final
episode returns and lengths), `FrameStack` (oldest-first order, first frame repeated at reset),
and `VecEnv` auto-reset (only finished envs replaced, `info["final_obs"]` is the pre-reset obs,
optimistic resets share fewer fresh states among finished envs and leave the others untouched,
the batch equals each env stepped on its own and a plain per-env loop). gymnax CartPole-v1
through `GymnaxEnv` checks that the 500-step limit is reported as `truncated`, a falling pole as
`terminated`, and a step that does both as `terminated` only.
"""
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mbjax.envs.base import Environment
from mbjax.envs.gymnax_adapter import GymnaxEnv
from mbjax.envs.spaces import HybridAction, HybridActionSpec
from mbjax.envs.wrappers import EpisodeStatistics, FrameStack, VecEnv


@flax.struct.dataclass
class CounterParams:
  terminate_at: int = 5  # The episode terminates when the counter reaches this value...
  time_limit: int = 3  # ...and is truncated when it reaches this one first.


@flax.struct.dataclass
class CounterState:
  episode_id: jax.Array  # f32[], drawn at reset: tells fresh episodes apart.
  count: jax.Array  # i32[], steps taken in this episode.


class Counter(Environment):
  """obs = [episode_id, count]; reward = count after the step (1, 2, 3, ...).

  Branch 0 of the action, when 1, terminates the episode now (lets a test pick who finishes).
  """

  def default_params(self):
    return CounterParams()

  def reset(self, key, params):
    state = CounterState(jax.random.uniform(key, minval=1.0, maxval=2.0), jnp.int32(0))
    return self._obs(state), state

  def step(self, key, state, action, params):
    del key
    state = CounterState(state.episode_id, state.count + 1)
    terminated = (state.count >= params.terminate_at) | (action.discrete[0] == 1)
    truncated = (state.count >= params.time_limit) & ~terminated
    return (self._obs(state), state, state.count.astype(jnp.float32), terminated, truncated,
            {"count": state.count})

  def _obs(self, state):
    return jnp.stack([state.episode_id, state.count.astype(jnp.float32)])

  def observation_shape(self, params):
    return (2,)

  def action_spec(self, params):
    return HybridActionSpec(continuous_dim=0, branches=(2,))


def _actions(finish):
  """Batched actions from a list of bools: True terminates that env on this step."""
  discrete = jnp.asarray(np.asarray(finish, np.int32)[:, None])
  return HybridAction(jnp.zeros((len(finish), 0), jnp.float32), discrete)


LONG = CounterParams(terminate_at=4, time_limit=100)
SHORT = CounterParams(terminate_at=100, time_limit=3)
STAY = HybridAction(jnp.zeros((0,)), jnp.asarray([0], jnp.int32))


# --- EpisodeStatistics ---------------------------------------------------------------------------

def test_episode_statistics_running_and_final_totals():
  env = EpisodeStatistics(Counter())
  step = jax.jit(env.step)
  _, state = env.reset(jax.random.key(0), LONG)
  np.testing.assert_array_equal([state.episode_return, state.episode_length], [0, 0])
  for t, expected_return in enumerate([1.0, 3.0, 6.0, 10.0], start=1):
    _, state, reward, terminated, truncated, info = step(jax.random.key(t), state, STAY, LONG)
    assert float(reward) == t
    assert float(info["episode_return"]) == expected_return
    assert int(info["episode_length"]) == t
    assert int(info["count"]) == t  # The inner env's info passes through.
    assert bool(terminated) == (t == 4) and not bool(truncated)
  assert env.observation_shape(LONG) == (2,) and env.name == "Counter"


# --- FrameStack ----------------------------------------------------------------------------------

def test_frame_stack_order_and_first_frame_repeated_at_reset():
  env = FrameStack(Counter(), num_frames=3)
  assert env.observation_shape(LONG) == (6,)
  obs, state = env.reset(jax.random.key(0), LONG)
  i = float(obs[0])  # episode_id
  np.testing.assert_array_equal(obs, np.float32([i, 0, i, 0, i, 0]))
  expected = {1: [i, 0, i, 0, i, 1], 2: [i, 0, i, 1, i, 2], 3: [i, 1, i, 2, i, 3],
              4: [i, 2, i, 3, i, 4]}
  step = jax.jit(env.step)
  for t in range(1, 5):
    obs, state, *_ = step(jax.random.key(t), state, STAY, LONG)
    np.testing.assert_array_equal(obs, np.float32(expected[t]))
    assert state.frames.shape == (3, 2)


def test_frame_stack_rejects_zero_frames():
  with pytest.raises(ValueError):
    FrameStack(Counter(), num_frames=0)


# --- VecEnv --------------------------------------------------------------------------------------

NUM_ENVS = 6
STATS_VEC = VecEnv(EpisodeStatistics(Counter()))
OPTIMISTIC_VEC = VecEnv(EpisodeStatistics(Counter()), reset_fraction=1 / 3)
STACKED_VEC = VecEnv(FrameStack(Counter(), num_frames=2))


def _jit_step(vec):
  """`vec.step` taking one key per env (split into its step and reset keys)."""
  return jax.jit(lambda keys, *args: vec.step(VecEnv.split_keys(keys), *args))


_stats_step = _jit_step(STATS_VEC)
_optimistic_step = _jit_step(OPTIMISTIC_VEC)


def _keys(seed, n=NUM_ENVS):
  return jax.random.split(jax.random.key(seed), n)


def test_vec_env_auto_reset_replaces_only_finished_envs():
  obs, state = STATS_VEC.reset(_keys(0), LONG)
  ids = np.asarray(obs[:, 0])
  assert len(set(ids)) == NUM_ENVS  # Every env got its own episode.
  np.testing.assert_array_equal(obs[:, 1], 0)

  finish = [False, True, False, False, True, False]
  obs, state, reward, terminated, truncated, info = _stats_step(
      _keys(1), state, _actions(finish), LONG)
  done = np.asarray(finish)
  np.testing.assert_array_equal(terminated, done)
  np.testing.assert_array_equal(truncated, False)
  np.testing.assert_array_equal(reward, 1.0)
  # final_obs is the pre-reset observation of every env, finished or not.
  np.testing.assert_array_equal(info["final_obs"], np.stack([ids, np.ones(NUM_ENVS)], -1))
  np.testing.assert_array_equal(info["episode_return"], 1.0)
  np.testing.assert_array_equal(info["episode_length"], 1)
  # Unfinished envs continue; finished ones start fresh episodes.
  np.testing.assert_array_equal(obs[~done], np.stack([ids, np.ones(NUM_ENVS)], -1)[~done])
  np.testing.assert_array_equal(obs[done, 1], 0.0)
  new_ids = np.asarray(obs[done, 0])
  assert len(set(new_ids) | set(ids)) == NUM_ENVS + 2
  np.testing.assert_array_equal(state.env_state.count, np.where(done, 0, 1))
  np.testing.assert_array_equal(state.episode_return, np.where(done, 0.0, 1.0))
  np.testing.assert_array_equal(state.episode_length, np.where(done, 0, 1))
  np.testing.assert_array_equal(state.env_state.episode_id, obs[:, 0])

  # Steps 2..4: the counter terminates the old episodes at count 4 (step 4); the envs reset
  # at step 1 reach count 3. Their episode statistics restarted with the new episode.
  for _ in range(3):
    obs, state, reward, terminated, truncated, info = _stats_step(
        _keys(2), state, _actions([False] * NUM_ENVS), LONG)
  np.testing.assert_array_equal(terminated, ~done)
  np.testing.assert_array_equal(info["episode_length"], np.where(done, 3, 4))
  np.testing.assert_array_equal(info["episode_return"], np.where(done, 6.0, 10.0))
  np.testing.assert_array_equal(info["final_obs"][:, 1], np.where(done, 3.0, 4.0))
  np.testing.assert_array_equal(obs[:, 1], np.where(done, 3.0, 0.0))


def test_vec_env_truncation_is_reported_and_reset():
  obs, state = STATS_VEC.reset(_keys(3), SHORT)
  ids = np.asarray(obs[:, 0])
  for t in range(1, 4):
    obs, state, reward, terminated, truncated, info = _stats_step(
        _keys(10 + t), state, _actions([False] * NUM_ENVS), SHORT)
    np.testing.assert_array_equal(terminated, False)
    np.testing.assert_array_equal(truncated, t == 3)
  # Truncated at the time limit: final_obs keeps the last obs for bootstrapping.
  np.testing.assert_array_equal(info["final_obs"], np.stack([ids, np.full(NUM_ENVS, 3.0)], -1))
  np.testing.assert_array_equal(info["episode_return"], 6.0)
  np.testing.assert_array_equal(obs[:, 1], 0.0)
  assert not set(np.asarray(obs[:, 0])) & set(ids)


def test_vec_env_frame_stack_resets_to_repeated_first_frame():
  step = _jit_step(STACKED_VEC)
  obs, state = STACKED_VEC.reset(_keys(4, 2), LONG)
  ids = np.asarray(obs[:, 0])
  obs, state, _, _, _, info = step(_keys(5, 2), state, _actions([True, False]), LONG)
  np.testing.assert_array_equal(info["final_obs"][0], [ids[0], 0, ids[0], 1])
  new_id = float(obs[0, 0])
  assert new_id != ids[0]
  np.testing.assert_array_equal(obs[0], np.float32([new_id, 0, new_id, 0]))
  np.testing.assert_array_equal(obs[1], np.float32([ids[1], 0, ids[1], 1]))


def test_optimistic_reset_shares_fewer_fresh_states_among_finished_envs():
  # reset_fraction 1/3 of 6 envs: a pool of 2 fresh episodes per step.
  obs, state = OPTIMISTIC_VEC.reset(_keys(6), LONG)
  obs, state, *_ = _optimistic_step(_keys(7), state, _actions([False] * NUM_ENVS), LONG)
  before_obs = obs

  finish = np.array([True, False, True, True, False, True])
  obs, state, reward, terminated, truncated, info = _optimistic_step(
      _keys(8), state, _actions(finish), LONG)
  np.testing.assert_array_equal(terminated, finish)

  # Unfinished envs are stepped normally and keep their episode.
  np.testing.assert_array_equal(obs[~finish, 0], before_obs[~finish, 0])
  np.testing.assert_array_equal(obs[~finish, 1], 2.0)
  np.testing.assert_array_equal(state.episode_length[~finish], 2)
  np.testing.assert_array_equal(state.episode_return[~finish], 3.0)
  # final_obs is still each env's own last observation.
  np.testing.assert_array_equal(info["final_obs"][:, 0], before_obs[:, 0])
  np.testing.assert_array_equal(info["final_obs"][:, 1], 2.0)

  # Finished envs 0, 2, 3, 5 are the 1st..4th finishers: pool slots 0, 1, 0, 1.
  np.testing.assert_array_equal(obs[finish, 1], 0.0)
  np.testing.assert_array_equal(state.episode_length[finish], 0)
  new_ids = np.asarray(obs[:, 0])
  assert new_ids[0] == new_ids[3] and new_ids[2] == new_ids[5] and new_ids[0] != new_ids[2]
  assert not {new_ids[0], new_ids[2]} & set(np.asarray(before_obs[:, 0]))
  jax.tree.map(lambda x: np.testing.assert_array_equal(x[0], x[3]), state)
  jax.tree.map(lambda x: np.testing.assert_array_equal(x[2], x[5]), state)


def test_optimistic_reset_pool_size():
  # ceil(fraction · num_envs), at least 1: 0.01 of 6 gives a single shared fresh episode.
  vec = VecEnv(Counter(), reset_fraction=0.01)
  _, state = vec.reset(_keys(9), LONG)
  obs, *_ = _jit_step(vec)(_keys(10), state, _actions([True] * NUM_ENVS), LONG)
  assert len(set(np.asarray(obs[:, 0]))) == 1
  np.testing.assert_array_equal(obs[:, 1], 0.0)


@pytest.mark.parametrize("fraction", [0.0, -0.5, 1.5])
def test_vec_env_rejects_bad_reset_fraction(fraction):
  with pytest.raises(ValueError):
    VecEnv(Counter(), reset_fraction=fraction)


FINISH_SCHEDULE = np.array([  # [step, env]: True terminates the env on that step.
    [False, True, False, False, False, False],
    [False, False, False, True, False, True],
    [True, False, False, False, False, False],
    [False, False, False, False, False, False],
    [False, True, True, False, False, False],
])


def _rollout(step, vec, keys, params, schedule):
  """Steps `vec` along `schedule`; per step, a fresh key per env from `keys`."""
  obs, state = vec.reset(keys, params)
  outputs = [obs]
  for t, finish in enumerate(schedule):
    step_keys = jax.vmap(lambda k: jax.random.fold_in(k, t))(keys)
    obs, state, reward, terminated, truncated, info = step(
        step_keys, state, _actions(finish), params)
    outputs.append((obs, reward, terminated, truncated, info, state))
  return outputs


def test_vec_env_batch_equals_each_env_stepped_alone():
  keys = _keys(11)
  batched = _rollout(_stats_step, STATS_VEC, keys, SHORT, FINISH_SCHEDULE)
  for e in range(NUM_ENVS):
    single = _rollout(_stats_step, STATS_VEC, keys[e:e + 1], SHORT, FINISH_SCHEDULE[:, e:e + 1])
    for b, s in zip(batched, single):
      jax.tree.map(lambda x, y: np.testing.assert_array_equal(x[e], y[0]), b, s)


def test_vec_env_matches_plain_per_env_loop():
  """The deterministic parts of a batched rollout, replayed env by env in Python."""
  keys = _keys(12)
  batched = _rollout(_stats_step, STATS_VEC, keys, SHORT, FINISH_SCHEDULE)
  for e in range(NUM_ENVS):
    count, episode_return = 0, 0.0
    for t, finish in enumerate(FINISH_SCHEDULE[:, e]):
      obs, reward, terminated, truncated, info, _ = batched[t + 1]
      count += 1
      episode_return += count
      ends_by_time = count >= SHORT.time_limit
      assert bool(terminated[e]) == finish
      assert bool(truncated[e]) == (ends_by_time and not finish)
      assert float(reward[e]) == count
      assert float(info["final_obs"][e, 1]) == count
      assert float(info["episode_return"][e]) == episode_return
      assert int(info["episode_length"][e]) == count
      if finish or ends_by_time:
        count, episode_return = 0, 0.0
      assert float(obs[e, 1]) == count


# --- gymnax CartPole-v1 through GymnaxEnv --------------------------------------------------------

CARTPOLE = GymnaxEnv.from_name("CartPole-v1")
CARTPOLE_PARAMS = CARTPOLE.default_params()
_cartpole_step = jax.jit(CARTPOLE.step)
PUSH_RIGHT = HybridAction(jnp.zeros((0,)), jnp.asarray([1], jnp.int32))


def _cartpole_state(**fields):
  _, state = CARTPOLE.reset(jax.random.key(0), CARTPOLE_PARAMS)
  return state.replace(**fields)


def test_cartpole_spec():
  assert CARTPOLE.action_spec(CARTPOLE_PARAMS) == HybridActionSpec(0, (2,))
  assert CARTPOLE.observation_shape(CARTPOLE_PARAMS) == (4,)
  assert CARTPOLE_PARAMS.max_steps_in_episode == 500
  obs, _ = CARTPOLE.reset(jax.random.key(0), CARTPOLE_PARAMS)
  assert obs.dtype == jnp.float32 and obs.shape == (4,)


def test_cartpole_time_limit_is_truncation_not_termination():
  state = _cartpole_state(time=498)
  _, state, reward, terminated, truncated, _ = _cartpole_step(
      jax.random.key(1), state, PUSH_RIGHT, CARTPOLE_PARAMS)
  assert int(state.time) == 499 and not bool(terminated) and not bool(truncated)
  obs, state, reward, terminated, truncated, info = _cartpole_step(
      jax.random.key(2), state, PUSH_RIGHT, CARTPOLE_PARAMS)
  assert int(state.time) == 500
  assert bool(truncated) and not bool(terminated)
  assert float(reward) == 1.0 and info == {}


def test_cartpole_falling_pole_is_termination():
  # 12° = 0.2094 rad; one step of τ·θ̇ = 0.02 · 1.0 takes θ = 0.2 past it.
  state = _cartpole_state(theta=jnp.float32(0.2), theta_dot=jnp.float32(1.0), time=10)
  _, _, _, terminated, truncated, _ = _cartpole_step(
      jax.random.key(3), state, PUSH_RIGHT, CARTPOLE_PARAMS)
  assert bool(terminated) and not bool(truncated)


def test_cartpole_falling_at_the_time_limit_is_termination_only():
  state = _cartpole_state(theta=jnp.float32(0.2), theta_dot=jnp.float32(1.0), time=499)
  _, _, _, terminated, truncated, _ = _cartpole_step(
      jax.random.key(4), state, PUSH_RIGHT, CARTPOLE_PARAMS)
  assert bool(terminated) and not bool(truncated)


def test_cartpole_vec_env_truncates_and_resets():
  vec = VecEnv(EpisodeStatistics(CARTPOLE))
  _, state = vec.reset(_keys(13, 2), CARTPOLE_PARAMS)
  # Env 0 is one step from the time limit after 499 steps of a long episode; env 1 is fresh.
  inner = state.env_state.replace(time=jnp.asarray([499, 0]))
  state = state.replace(env_state=inner, episode_length=jnp.asarray([499, 0], jnp.int32),
                        episode_return=jnp.asarray([499.0, 0.0]))
  actions = HybridAction(jnp.zeros((2, 0)), jnp.asarray([[1], [0]], jnp.int32))
  obs, state, reward, terminated, truncated, info = _jit_step(vec)(
      _keys(14, 2), state, actions, CARTPOLE_PARAMS)
  np.testing.assert_array_equal(truncated, [True, False])
  np.testing.assert_array_equal(terminated, [False, False])
  np.testing.assert_array_equal(info["episode_length"], [500, 1])
  np.testing.assert_array_equal(info["episode_return"], [500.0, 1.0])
  np.testing.assert_array_equal(state.env_state.time, [0, 1])
  np.testing.assert_array_equal(obs[1], info["final_obs"][1])
  assert np.all(np.abs(np.asarray(obs[0])) <= 0.05)  # A fresh CartPole start.
  assert not np.array_equal(obs[0], info["final_obs"][0])


def test_pendulum_box_action_is_rescaled_onto_bounds():
  env = GymnaxEnv.from_name("Pendulum-v1")
  assert env.action_spec(env.default_params()) == HybridActionSpec(1, ())
  for policy_action, torque in [(-1.0, -2.0), (0.0, 0.0), (1.0, 2.0)]:
    action = HybridAction(jnp.asarray([policy_action]), jnp.zeros((0,), jnp.int32))
    np.testing.assert_allclose(env._to_gymnax(action), [torque], atol=1e-6)
