"""The ablation benchmark's bookkeeping (`experiments/bench_ablation.py`), by hand: arm
switches, the running return and steps-to-threshold. (Training the arms is the benchmark's
job; compiling one apex trainer here would cost more than it checks.)"""
import numpy as np
import pytest

from experiments import bench_ablation


def test_arm_switches_and_served_policy():
  budget = bench_ablation.BUDGETS["ci"]
  expected = {  # world model, dream, efe, distillation source, schedule and end, horizon
      "ppo": (False, False, False, "none", "constant", 1.0, 5),
      "ppo+wm": (True, False, False, "none", "constant", 1.0, 5),
      "ppo+wm+dream": (True, True, False, "dream", "constant", 1.0, 5),
      "ppo+wm+dream+efe": (True, True, True, "efe", "constant", 1.0, 5),
      "dream_h30": (True, True, False, "dream", "constant", 1.0, 30),
      "dream_linear": (True, True, False, "dream", "linear", 1.0, 5),
      "dream_early": (True, True, False, "dream", "constant", 0.25, 5),
  }
  for arm, (wm, dream, efe, source, schedule, end, horizon) in expected.items():
    cfg = bench_ablation.arm_config(arm, budget, 0.25)
    assert (cfg.world_model.enabled, cfg.dream.enabled, cfg.efe.enabled,
            cfg.served.distill_from, cfg.served.distill_schedule, cfg.served.distill_end,
            cfg.dream.horizon) == (wm, dream, efe, source, schedule, end, horizon), arm
    assert cfg.served.distill_coef == (0.25 if dream else 0.0)
    assert (cfg.num_envs, cfg.ppo.num_steps, cfg.total_env_steps) == (8, 32, 1024)
  with pytest.raises(ValueError, match="unknown arm 'dream'"):
    bench_ablation.arm_config("dream", budget, 0.1)


def test_running_return_and_steps_to_threshold_by_hand():
  # Seed 0: updates end episodes (return, count) = (-8, 1), (none), (-2, 3), (-6, 1), (0, 2).
  # Seed 1: no episode ends until the last update, (-7, 2).
  returns = np.array([[-8.0, 0.0, -2.0, -6.0, 0.0], [0.0, 0.0, 0.0, 0.0, -7.0]])
  counts = np.array([[1, 0, 3, 1, 2], [0, 0, 0, 0, 2]])
  running = bench_ablation.running_return(returns, counts, window=2)
  # Seed 0, window 2: -8, -8, -2, (3·-2 + -6)/4 = -3, (-6 + 0)/3 = -2.
  np.testing.assert_allclose(running[0], [-8.0, -8.0, -2.0, -3.0, -2.0])
  assert np.isnan(running[1, :4]).all() and running[1, 4] == -7.0
  summary = bench_ablation.summarize(returns, counts, steps_per_update=100, threshold=-2.5,
                                     window=2, final_fraction=0.4)
  # First update at or above -2.5 is the third (300 steps); seed 1 never: the budget, 500.
  np.testing.assert_array_equal(summary.steps_to_threshold, [300, 500])
  np.testing.assert_array_equal(summary.reached, [True, False])
  # Final: the last 2 updates' episodes, seed 0: (-6 + 0 + 0)/3 = -2; seed 1: -7.
  np.testing.assert_allclose(summary.final, [-2.0, -7.0])


def test_reread_combines_saved_runs_and_reports_steps_to_ppo_final(tmp_path, capsys):
  # PPO ends at -2 (final fraction 0.5: last 2 updates); "fast" reaches -2 at update 2.
  ppo = (np.array([[-8.0, -6.0, -2.0, -2.0]]), np.ones((1, 4), np.int32))
  fast = (np.array([[-6.0, -2.0, -1.0, -1.0]]), np.ones((1, 4), np.int32))
  nan = float("nan")
  bench_ablation.save_runs(str(tmp_path / "a.npz"), {"ppo": bench_ablation.ArmRun(*ppo, nan, nan)},
                           10)
  bench_ablation.save_runs(str(tmp_path / "b.npz"),
                           {"fast": bench_ablation.ArmRun(*fast, nan, nan)}, 10)
  assert not list(tmp_path.glob("*.tmp.npz"))
  runs, steps_per_update = bench_ablation.load_runs([str(tmp_path / "a.npz"),
                                                     str(tmp_path / "b.npz")])
  assert list(runs) == ["ppo", "fast"] and steps_per_update == 10
  np.testing.assert_array_equal(runs["fast"].returns, fast[0])
  bench_ablation.report(runs, steps_per_update, threshold=-5.0, window=1, final_fraction=0.5)
  lines = capsys.readouterr().out.splitlines()
  assert "steps to PPO's final return -2.00 (running return over 1 updates):" in lines
  # PPO first reaches -2 at its third update (30 steps), "fast" at its second (20).
  assert any(line.split()[:3] == ["ppo", "30", "±"] for line in lines)
  assert any(line.split()[:3] == ["fast", "20", "±"] for line in lines)

  np.savez(tmp_path / "c.npz", steps_per_update=20, **{"fast/return": fast[0],
                                                       "fast/count": fast[1]})
  with pytest.raises(ValueError, match="c.npz: 20 env steps per update"):
    bench_ablation.load_runs([str(tmp_path / "a.npz"), str(tmp_path / "c.npz")])
  np.savez(tmp_path / "d.npz", other=np.zeros(2))
  with pytest.raises(ValueError, match="d.npz: not a bench_ablation --save file"):
    bench_ablation.load_runs([str(tmp_path / "d.npz")])
