"""The dual-system runtime (`mbjax/runtime/dual_system.py`): System 1, the directive-following
motor of `configs/arena_directives.py`, at 60 Hz on the main loop; System 2 (rule planner or
an LLM/VLM over `mbjax.runtime.llm`) at 0.5 Hz on a worker thread. Inference only unless
`push.enabled`.

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
import ml_collections

_VARIANTS = ("llm", "bridge", "push", "navigator")


def get_config(arg: str | None = None):
  parts = [p for p in (arg or "").split(",") if p]
  unknown = [p for p in parts if p not in _VARIANTS]
  if unknown:
    raise ValueError(f"configs/dual_system.py: unknown variant(s) {unknown}; expected some of "
                     f"{_VARIANTS}, comma-separated")
  cfg = ml_collections.ConfigDict()
  cfg.seed = 0
  cfg.hz = 60.0  # System 1 control rate
  cfg.steps = 1200  # control steps to run (20 s at 60 Hz)

  cfg.motor = ml_collections.ConfigDict()
  cfg.motor.checkpoint = ""  # workdir of configs/arena_directives.py; "": untrained network
  cfg.motor.untrained_variant = ""  # configs/arena_directives.py variant used without one
  cfg.motor.deterministic = False  # act on the mode instead of sampling

  cfg.system2 = ml_collections.ConfigDict()
  cfg.system2.planner = "llm" if "llm" in parts else "rule"  # rule | llm
  cfg.system2.rate_hz = 0.5  # planning calls per second (at most)
  cfg.system2.goal = "survive and level up"
  cfg.system2.send_frame = False  # attach the newest frame (a VLM backend)
  cfg.system2.reference_delay_s = 2.0  # reply delay of the built-in reference backend

  # mbjax.runtime.llm.BackendConfig fields (base_url "reference": the loopback stand-in).
  cfg.llm = ml_collections.ConfigDict()
  cfg.llm.protocol = "ollama"  # ollama | openai
  cfg.llm.base_url = "reference"
  cfg.llm.model = "llava:7b"
  cfg.llm.timeout_s = 10.0
  # NAME of the environment variable holding the API key (e.g. OPENAI_API_KEY); "" sends none.
  cfg.llm.api_key_env = ""

  cfg.game = ml_collections.ConfigDict()
  cfg.game.kind = "bridge" if "bridge" in parts else "arena"  # arena | bridge
  cfg.game.frame_every = 0  # arena: render a frame for System 2 every N steps (0: never)

  cfg.bridge = ml_collections.ConfigDict()
  cfg.bridge.launch_server = True  # start the reference server as a child process
  cfg.bridge.host = "127.0.0.1"
  cfg.bridge.port = 5560  # used when launch_server is False
  cfg.bridge.update_hz = 60.0
  cfg.bridge.frame_hz = 0.0  # frames attached per second (a VLM System 2 wants some)
  cfg.bridge.capture_size = 64
  cfg.bridge.time_limit = 1500

  cfg.menu = ml_collections.ConfigDict()
  cfg.menu.navigator = "vlm" if "navigator" in parts else "none"  # none | vlm (llm.* backend)
  cfg.menu.deadline_s = 2.0  # navigator: fall back to the rule card after this long
  cfg.menu.reference_delay_s = 0.5  # reply delay of the reference backend for menu requests
  cfg.menu.override = True  # force the chosen card as the executed menu action

  cfg.push = ml_collections.ConfigDict()
  cfg.push.enabled = "push" in parts
  cfg.push.capacity = 4096  # replay ring size (steps)
  cfg.push.flush_every = 64  # steps staged on the host per replay write
  return cfg
