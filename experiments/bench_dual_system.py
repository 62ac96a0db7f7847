"""Timing benchmark of the dual-system runtime: does System 1 hold its rate while System 2
takes seconds per call?

`python -m experiments.bench_dual_system --checkpoint=runs/directives [--seconds=20]`

For each game (`--games`: the in-process arena, and the reference BonkLink server in a child
process over loopback) and each System 2 (`--planners`: the rule planner, and the LLM
planner against a loopback `ReferenceLLMServer` answering after `--delay_s` = 2 s), runs
the controller of `configs/dual_system.py` at `--hz` for `--seconds` and prints the
achieved rate, the step-latency percentiles (compute time per control step, sleep
excluded), overruns (steps longer than a period), the System 2 calls and their latency,
and the load average before and after. A final free-running pass (no pacing) with the slow
LLM planner shows the headroom: steps per second System 1 could do.

Acceptance (issue 9): with the 2 s backend, achieved rate ≥ 0.99 × hz and p99 latency below
one period (16.7 ms at 60 Hz).
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_enable_concurrency_optimized_scheduler=false")

import json  # noqa: E402

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from mbjax.runtime import dual_system  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/dual_system.py",
                                          "Runtime config (variants are set per case).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "", "Motor workdir; '': an untrained network "
                                  "of the same architecture (same cost per step).")
_SECONDS = flags.DEFINE_float("seconds", 20.0, "Seconds of control per case.")
_HZ = flags.DEFINE_float("hz", 60.0, "System 1 rate.")
_DELAY = flags.DEFINE_float("delay_s", 2.0, "Reply delay of the reference LLM backend.")
_GAMES = flags.DEFINE_list("games", ["arena", "bridge"], "arena and/or bridge.")
_PLANNERS = flags.DEFINE_list("planners", ["rule", "llm"], "rule and/or llm.")


def _case(game: str, planner: str, hz: float, steps: int) -> dict:
  cfg = _CONFIG.value
  cfg.motor.checkpoint = _CHECKPOINT.value
  cfg.game.kind = game
  cfg.system2.planner = planner
  cfg.system2.reference_delay_s = _DELAY.value
  cfg.llm.base_url = "reference"
  cfg.hz = hz
  cfg.steps = steps
  before = os.getloadavg()
  summary = dual_system.run(cfg)
  summary["load_average_before"] = before
  return summary


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  hz, steps = _HZ.value, int(round(_SECONDS.value * _HZ.value))
  period_ms = 1e3 / hz
  rows = []
  for game in _GAMES.value:
    for planner in _PLANNERS.value:
      s = _case(game, planner, hz, steps)
      rows.append((game, planner, s))
      met = s["achieved_hz"] >= 0.99 * hz and s["step_ms_p99"] < period_ms
      print(f"{game:>6} | System 2 {planner:>4}"
            f"{f' ({_DELAY.value:g} s/call)' if planner == 'llm' else ''}: "
            f"{s['achieved_hz']:.2f} Hz of {hz:g} | step p50 {s['step_ms_p50']:.2f} ms, "
            f"p99 {s['step_ms_p99']:.2f} ms, max {s['step_ms_max']:.1f} ms, overruns "
            f"{s['overruns']}/{s['steps']} | System 2 calls {s['system2_plans']} "
            f"(+{s['system2_fallbacks']} fallbacks), mean {s['system2_call_s_mean']} s | "
            f"load {tuple(round(x, 2) for x in s['load_average_before'])} → "
            f"{tuple(round(x, 2) for x in s['load_average'])} | "
            f"{'holds' if met else 'DOES NOT hold'} {hz:g} Hz", flush=True)
  if "arena" in _GAMES.value and "llm" in _PLANNERS.value:
    free = _case("arena", "llm", 1e6, steps)
    print(f" arena | free-running with the slow LLM System 2: {free['achieved_hz']:.0f} steps/s"
          f" (p50 {free['step_ms_p50']:.2f} ms, p99 {free['step_ms_p99']:.2f} ms) | load "
          f"{tuple(round(x, 2) for x in free['load_average'])}")
  print(json.dumps({f"{g}/{p}": s for g, p, s in rows}, default=str))


if __name__ == "__main__":
  app.run(main)
