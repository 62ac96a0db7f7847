"""The world-model benchmark's recorded data (`experiments/bench_world_model.py`): which
enemies each observation's slots show, and the full-state floor of the one-step error."""
import jax
import numpy as np
import pytest
from absl import app

from experiments import bench_world_model
from mbjax.envs.bonk_arena import BonkArena


def test_slots_belong_to_o_t_and_the_floor_is_zero_where_the_game_is_deterministic():
  env = BonkArena()
  params = env.default_params()
  data, shown, floor_sq = jax.jit(
      lambda key: bench_world_model.collect(env, params, 4, 24, key, floor_keys=4))(
          jax.random.PRNGKey(0))
  layout = env.vector_layout
  assert floor_sq.shape == data.obs.shape == (24, 4, 96)
  assert shown.shape == (24, 4, env.num_obs_enemies)
  # shown[t] are o_t's slots: a slot is present in o_t exactly where an enemy is shown.
  present = np.asarray(data.obs[..., layout["enemies"]]).reshape(24, 4, -1, 8)[..., 0]
  np.testing.assert_array_equal(present > 0, np.asarray(shown) >= 0)
  # Given the game state and the action, the player's move and the attack timer do not
  # depend on the env key; the first wave's spawn points do.
  floor_sq = np.asarray(floor_sq)
  np.testing.assert_array_equal(floor_sq[..., layout["player_vel"]], 0.0)
  np.testing.assert_array_equal(floor_sq[..., layout["attack_timer"]], 0.0)
  assert floor_sq[..., layout["enemies"]].max() > 1e-4


def test_window_lengths_must_cut_the_recording_into_whole_windows():
  bench_world_model.check_window_lengths(512, 16)
  with pytest.raises(app.UsageError, match="--train_window_length, 3"):
    bench_world_model.check_window_lengths(512, 3)
  with pytest.raises(app.UsageError, match="must be at least 2"):
    bench_world_model.check_window_lengths(512, 1)
  with pytest.raises(app.UsageError, match="held-out windows' length, 64"):
    bench_world_model.check_window_lengths(480, 16)
