"""Weak-scaling arithmetic of `experiments/bench_scaling.py` and upstream's world-model sizes
of the world-model benchmarks, by hand. (The measurements themselves are run by the
benchmarks; compiling them here would cost more than they check.)"""
import pytest

from experiments import throughput


def test_weak_scaling_efficiency_by_hand():
  # 1 device: 100/s; 2 devices: 150/s → 75 per device → 0.75; 4 devices: 100/s → 0.25.
  efficiency = throughput.weak_scaling_efficiency({1: 100.0, 2: 150.0, 4: 100.0})
  assert efficiency == pytest.approx({1: 1.0, 2: 0.75, 4: 0.25})
  # Against the smallest count when it is not 1: 2 devices 200/s, 8 devices 400/s → 0.5.
  assert throughput.weak_scaling_efficiency({8: 400.0, 2: 200.0}) == pytest.approx(
      {2: 1.0, 8: 0.5})


def test_upstream_world_model_config_by_hand():
  wm = throughput.upstream_world_model_config().world_model
  assert (wm.deter, wm.hidden, wm.stoch, wm.classes) == (256, 256, 64, 0)
  assert (wm.rssm_layers, wm.head_layers) == (0, 1)
  wm = throughput.upstream_world_model_config(upstream_layers=False).world_model
  assert (wm.deter, wm.stoch, wm.rssm_layers, wm.head_layers) == (256, 64, 1, 2)
