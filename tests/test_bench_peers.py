"""The peer harness's worker protocol and arithmetic, with fake workers (plain Python
processes, no JAX), and the helpers that read peer facts."""
import os
import sys
import textwrap

import pytest

from experiments.peers import protocol
from experiments.peers.mbjax_side import upstream_ppo_parameter_count
from experiments.peers.purejaxrl_side import published_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A worker whose round i reports the rate `scale` × (i + 1) and prints to stdout, which must
# not reach the protocol channel.
FAKE = textwrap.dedent("""
    import sys
    from experiments.peers import protocol
    scale = float(sys.argv[1])
    def setup():
      print("noise from the measured code")
      return (lambda i: {"rates": {"items": scale * (i + 1)}, "extra": {"seen": i}}), {"s": scale}
    protocol.serve(setup)
""")


def _worker(tmp_path, name, *args):
  return protocol.Worker(name, [sys.executable, "-c", FAKE, *args], REPO,
                         dict(os.environ, PYTHONPATH=REPO), str(tmp_path / f"{name}.log"))


def test_workers_alternate_and_ratios_are_per_round(tmp_path):
  a, b = _worker(tmp_path, "a", "6"), _worker(tmp_path, "b", "2")
  loads = iter(range(10))
  try:
    assert a.ready["info"] == {"s": 6.0} and b.ready["info"] == {"s": 2.0}
    rounds = protocol.alternate(a, b, 3, load=lambda: float(next(loads)))
  finally:
    a.close()
    b.close()
  # Load read before each side, in order a0 b0 a1 b1 a2 b2.
  assert [(r["load_a"], r["load_b"]) for r in rounds] == [(0, 1), (2, 3), (4, 5)]
  assert [r["a"]["extra"]["seen"] for r in rounds] == [0, 1, 2]
  assert [r["b"]["rates"]["items"] for r in rounds] == [2.0, 4.0, 6.0]
  summary = protocol.summarise(rounds)
  items = summary["rates"]["items"]
  assert items["ratios"] == pytest.approx([3.0, 3.0, 3.0])
  assert items["a_median"] == 12.0 and items["a_range"] == (6.0, 18.0)
  assert items["b_median"] == 4.0
  assert summary["load_range"] == (0, 5)
  assert "noise from the measured code" in open(tmp_path / "a.log").read()


def test_summary_by_hand():
  rounds = [{"a": {"rates": {"x": a, "y": 1.0}, "cpu_s": 2.0},
             "b": {"rates": {"x": b}, "cpu_s": cpu_b}, "load_a": la, "load_b": lb}
            for a, b, la, lb, cpu_b in ((10.0, 5.0, 1.0, 2.0, 5.0), (9.0, 6.0, 3.0, 0.5, 3.0),
                                        (8.0, 1.0, 1.5, 1.5, 16.0))]
  summary = protocol.summarise(rounds)
  assert list(summary["rates"]) == ["x"]  # only rates both sides report
  x = summary["rates"]["x"]
  assert x["ratios"] == pytest.approx([2.0, 1.5, 8.0])
  assert x["ratio_median"] == pytest.approx(2.0)
  assert x["ratio_range"] == pytest.approx((1.5, 8.0))
  assert summary["load_range"] == (0.5, 3.0)
  assert summary["cpu_ratios"] == pytest.approx([2.5, 1.5, 8.0])
  assert summary["cpu_ratio_median"] == pytest.approx(2.5)


def test_a_worker_that_dies_is_reported_with_its_stderr(tmp_path):
  with pytest.raises(protocol.WorkerError, match="broken: exited") as error:
    protocol.Worker("broken", [sys.executable, "-c", "1 / 0"], REPO, dict(os.environ),
                    str(tmp_path / "broken.log"))
  assert "ZeroDivisionError" in str(error.value)


def test_upstream_ppo_parameter_count_by_hand():
  # torch's count of upstream's ActorCritic(204, PPOConfig()): 204·256+256 + 256·256+256
  # (trunk) + 256·2+2 + 2 (μ, log σ) + 256·33+33 (branch) + 256+1 (value).
  assert upstream_ppo_parameter_count(204, 256, 2, (33,)) == 127_526
  assert upstream_ppo_parameter_count(3, 4, 1, (2, 3)) == (3 * 4 + 4 + 4 * 4 + 4 + 4 + 1 + 1
                                                          + 4 * 2 + 2 + 4 * 3 + 3 + 4 + 1)


def test_published_config_is_the_main_blocks_literal(tmp_path):
  path = tmp_path / "ppo.py"
  path.write_text("config = {'LR': 1.0}\nif __name__ == '__main__':\n  x = 1\n"
                  "  config = {'LR': 2.5e-4, 'NUM_ENVS': 4}\n  run(config)\n")
  assert published_config(str(path)) == {"LR": 2.5e-4, "NUM_ENVS": 4}
  path.write_text("if __name__ == '__main__':\n  run()\n")
  with pytest.raises(ValueError, match="no `config"):
    published_config(str(path))
