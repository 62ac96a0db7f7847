"""The sample-efficiency benchmark's bookkeeping (`experiments/bench_ablation.py`), by hand:
arm configs, the return at an env-step point, the confidence interval, save and re-read.
(Training the arms is the benchmark's job.)"""
import json
import math

import numpy as np
import pytest
import scipy.stats

from experiments import bench_ablation


def test_arms_pick_their_configs():
  served = {arm: bench_ablation.arm_config("arena", arm).served.policy
            for arm in bench_ablation.SUITES["arena"]}
  assert served == {"ppo": "ppo", "ppo_1m": "ppo", "dreamer": "dreamer", "efe": "efe",
                    "full": "ppo"}
  assert bench_ablation.arm_config("arena", "full").world_model.enabled
  assert not bench_ablation.arm_config("arena", "ppo_1m").world_model.enabled
  assert bench_ablation.arm_config("arena", "ppo_1m").total_env_steps == 1_000_000
  minatar = bench_ablation.arm_config("minatar", "dreamer", "asterix")
  assert minatar.env.name == "Asterix-MinAtar" and minatar.served.policy == "dreamer"
  with pytest.raises(ValueError, match="unknown arm 'efe' of suite 'minatar'"):
    bench_ablation.arm_config("minatar", "efe")


def _run():
  # Two seeds, updates of 100 env steps. Seed 0 ends (return, count) = (-8, 1), (none),
  # (-2, 3), (-6, 1); seed 1 ends only (-7, 2) in the last update.
  return bench_ablation.ArmRun(
      np.array([100, 200, 300, 400]),
      np.array([[-8.0, 0.0, -2.0, -6.0], [0.0, 0.0, 0.0, -7.0]], np.float32),
      np.array([[1, 0, 3, 1], [0, 0, 0, 2]]), 12.0, 3.0)


def test_return_at_an_env_step_point_by_hand():
  run = _run()
  # Window 200 up to 400: updates 3 and 4. Seed 0: (3·-2 + -6)/4 = -3; seed 1: -7.
  np.testing.assert_allclose(bench_ablation.return_at(run, 400, 200), [-3.0, -7.0])
  # Up to 200: seed 0 only the -8; seed 1 none ended.
  at = bench_ablation.return_at(run, 200, 200)
  assert at[0] == -8.0 and math.isnan(at[1])
  # Less than one update past the end is the end (a budget the updates do not divide).
  np.testing.assert_allclose(bench_ablation.return_at(run, 450, 200), [-3.0, -7.0])
  assert np.isnan(bench_ablation.return_at(run, 500, 200)).all()  # past the run


def test_mean_and_confidence_interval():
  mean, half = bench_ablation.mean_ci(np.array([1.0, 2.0, 3.0, np.nan]))
  assert mean == 2.0
  np.testing.assert_allclose(half, scipy.stats.t.ppf(0.975, 2) * 1.0 / math.sqrt(3))
  assert math.isnan(bench_ablation.mean_ci(np.array([5.0]))[1])


def test_save_and_reread(tmp_path, capsys):
  path = str(tmp_path / "runs.npz")
  bench_ablation.save_runs(path, {"ppo": _run()})
  assert not list(tmp_path.glob("*.tmp.npz"))
  runs = bench_ablation.load_runs([path])
  np.testing.assert_array_equal(runs["ppo"].counts, _run().counts)
  assert runs["ppo"].seconds == 12.0
  bench_ablation.report(runs, [400], 200)
  assert "400:   -5.00 ±" in capsys.readouterr().out
  np.savez(tmp_path / "other.npz", x=np.zeros(2))
  with pytest.raises(ValueError, match="other.npz: not a bench_ablation --save file"):
    bench_ablation.load_runs([str(tmp_path / "other.npz")])


def _write_metrics(workdir, records):
  workdir.mkdir()
  with open(workdir / "metrics.jsonl", "w") as f:
    for steps, ret, count in records:
      f.write(json.dumps({"update_step": steps // 100, "env_steps": steps,
                          "episode/return": ret, "episode/count": count, "wm/loss": 1.0})
              + "\n")


def test_workdirs_give_one_arm_a_seed_each(tmp_path, capsys):
  """The `_run()` curves written as two `experiments.train` workdirs' metrics.jsonl (a chunk
  without episodes logs its return as null) read back as the same arm."""
  _write_metrics(tmp_path / "s0", [(100, -8.0, 1), (200, None, 0), (300, -2.0, 3),
                                   (400, -6.0, 1)])
  _write_metrics(tmp_path / "s1", [(100, None, 0), (200, None, 0), (300, None, 0),
                                   (400, -7.0, 2)])
  run = bench_ablation.load_workdirs([str(tmp_path / "s0"), str(tmp_path / "s1")])
  expected = _run()
  np.testing.assert_array_equal(run.env_steps, expected.env_steps)
  np.testing.assert_array_equal(run.counts, expected.counts)
  np.testing.assert_allclose(run.returns, expected.returns)
  np.testing.assert_allclose(bench_ablation.return_at(run, 400, 200), [-3.0, -7.0])
  assert math.isnan(run.seconds)

  one_seed = bench_ablation.load_workdirs([str(tmp_path / "s1")])
  bench_ablation.report({"dreamer": one_seed}, [200, 400], 200)
  out = capsys.readouterr().out
  assert "200: no episode ended" in out and "400:   -7.00 (one seed)" in out
  assert "nan" not in out.split("per seed")[0]

  _write_metrics(tmp_path / "short", [(100, -8.0, 1), (200, -1.0, 1)])
  with pytest.raises(ValueError, match="short logged at other env steps"):
    bench_ablation.load_workdirs([str(tmp_path / "s0"), str(tmp_path / "short")])
  with pytest.raises(ValueError, match="nowhere/metrics.jsonl does not exist"):
    bench_ablation.load_workdirs([str(tmp_path / "nowhere")])
