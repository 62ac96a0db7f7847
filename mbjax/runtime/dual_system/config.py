"""Every field the dual-system runtime reads, with defaults: System 1 at 60 Hz on the
in-process arena, the rule planner as System 2, no menu navigator, nothing recorded.
`configs/dual_system.py` starts from `base_config()` and sets its variants."""
import ml_collections


def base_config() -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict()
  cfg.seed = 0
  cfg.hz = 60.0  # System 1 control rate
  cfg.steps = 1200  # control steps to run (20 s at 60 Hz)

  cfg.motor = ml_collections.ConfigDict()
  cfg.motor.checkpoint = ""  # workdir of configs/arena_directives.py; "": untrained network
  cfg.motor.untrained_variant = ""  # configs/arena_directives.py variant used without one
  cfg.motor.deterministic = False  # act on the mode instead of sampling

  cfg.system2 = ml_collections.ConfigDict()
  cfg.system2.planner = "rule"  # rule | llm
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
  cfg.game.kind = "arena"  # arena | bridge
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
  cfg.menu.navigator = "none"  # none | vlm (llm.* backend)
  cfg.menu.deadline_s = 2.0  # navigator: fall back to the rule card after this long
  cfg.menu.reference_delay_s = 0.5  # reply delay of the reference backend for menu requests
  cfg.menu.override = True  # force the chosen card as the executed menu action

  cfg.push = ml_collections.ConfigDict()
  cfg.push.enabled = False
  cfg.push.capacity = 4096  # replay ring size (steps)
  cfg.push.flush_every = 64  # steps staged on the host per replay write
  return cfg
