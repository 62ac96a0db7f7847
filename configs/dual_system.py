"""The dual-system runtime (`mbjax/runtime/dual_system/`): System 1, the directive-following
motor of `configs/arena_directives.py`, at 60 Hz on the main loop; System 2 (rule planner or
an LLM/VLM over `mbjax.runtime.llm`) at 0.5 Hz on a worker thread. Inference only unless
`push.enabled`. Every field and its default: `mbjax/runtime/dual_system/config.py`.

Variants (the `arg` string, comma-separated):
  `llm`    — System 2 asks a chat backend; `llm.base_url="reference"` (the default here)
             starts a loopback `ReferenceLLMServer` that answers like the rule planner after
             `system2.reference_delay_s` (2 s: a slow model). Point `llm.*` at Ollama or an
             OpenAI-compatible server for a real model.
  `bridge` — the game is the reference BonkLink server in a child process, over loopback TCP
             (or any BonkLink game at `bridge.host:bridge.port` with `bridge.launch_server=False`).
  `push`   — record executed steps with their behaviour log-probs into a replay ring.
  `navigator` — the VLM menu navigator (`mbjax.runtime.menu_navigator`, backend `llm.*`)
             picks level-up cards from the rendered frame; the rule card after
             `menu.deadline_s` or on a bad reply.
  `debug`  — 60 steps (1 s); without a checkpoint, the untrained motor at
             `configs/arena_directives.py:debug` size; a small replay ring.

Command:  python -m experiments.run_dual_system --config=configs/dual_system.py:llm \
              --config.motor.checkpoint=runs/directives
          python -m experiments.bench_dual_system --checkpoint=runs/directives
Expected: (experiments/bench_dual_system.py, 30 s per case, 2026-11-26, the 2-core CPU with
          nothing else running) 60.00 Hz achieved in all four cases (arena / bridge × rule /
          2 s LLM System 2), 0 of 1800 steps overrun, System 1 step p50 1.1–1.7 ms, p99
          1.9–2.8 ms; free-running 1,850 steps/s. Under a load average of 10–12 from other
          jobs the rate fell to 49–59.5 Hz with 0–7% of steps overrun, no worse with the
          2 s LLM backend than with the instant rule planner: the OS scheduler, not System 2
          (BENCHMARKS.md, "Dual system").
"""
from mbjax.runtime.dual_system import config as dual_system_config

_VARIANTS = ("llm", "bridge", "push", "navigator", "debug")


def get_config(arg: str | None = None):
  parts = [p for p in (arg or "").split(",") if p]
  unknown = [p for p in parts if p not in _VARIANTS]
  if unknown:
    raise ValueError(f"configs/dual_system.py: unknown variant(s) {unknown}; expected some of "
                     f"{_VARIANTS}, comma-separated")
  cfg = dual_system_config.base_config()
  if "llm" in parts:
    cfg.system2.planner = "llm"
  if "bridge" in parts:
    cfg.game.kind = "bridge"
  if "navigator" in parts:
    cfg.menu.navigator = "vlm"
  cfg.push.enabled = "push" in parts
  if "debug" in parts:
    cfg.steps = 60  # 1 s at 60 Hz
    cfg.motor.untrained_variant = "debug"  # without a checkpoint: the motor's test size
    cfg.push.capacity = 256
    cfg.push.flush_every = 16
  return cfg
