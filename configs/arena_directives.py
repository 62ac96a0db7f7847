"""System 1 of the dual-system runtime: a goal-conditioned motor policy trained with PPO on
directive-following BonkArena (`mbjax/envs/bonk_arena/directives.py`).

The observation is BonkArena's 96-float vector plus the 13-float directive block (one-hot
directive, target offset, card slot, time left); the reward is for carrying the directive
out (reach the directed point or gem, kill, flee unharmed, take the directed card) minus
damage. Network: 64-unit embedding → CfC core (64) → separate 2×128 tanh actor and critic,
BPTT chunks of 16 steps, observation normalisation.

Variants (the `arg` string, comma-separated):
  `cfc` (default) or `mamba` — the core; `blind` — the same network and task with the
  directive block zeroed (the non-conditioned baseline); `debug` — the tiny size the tests
  use.

Command:  python -m experiments.train --config=configs/arena_directives.py --workdir=runs/directives
          python -m experiments.train --config=configs/arena_directives.py:blind --workdir=runs/directives_blind
          python -m experiments.evaluate_directives --conditioned=runs/directives \
              --baseline=runs/directives_blind
Acceptance: the conditioned motor reaches the directed target (goto, collect_gem and
          pick_card directives pooled) at least 2× as often as the blind baseline and in at
          least 60% of those directives.
Expected: 3.28 M env steps (400 updates) per run, 8.5–9 min each on the shared 2-core CPU
          (load average ≈ 11; 7.5–13k env-steps/s, compile ≈ 80 s). Measured 2026-11-26,
          seed 0, evaluation 64 envs × 1500 steps (seed 1), success / directives ended:
            conditioned: goto 768/778 (99%), collect_gem 470/471 (100%), pick_card 334/369
                         (91%), hunt 334/337 (99%), flee 135/250 (54%); targeted 97.2%
            blind:       goto 55/343 (16%), collect_gem 155/217 (71%), pick_card 159/464
                         (34%), hunt 227/227 (100%), flee 18/97 (19%); targeted 36.0%
          → 2.70× (acceptance met). The blind motor still kills and sweeps up gems (it is
          trained on the same rewards) but cannot know which point or card is meant.
"""
from mbjax.train.config import base_config

_CORES = ("cfc", "mamba")


def get_config(arg: str | None = None):
  parts = [p for p in (arg or "").split(",") if p]
  unknown = [p for p in parts if p not in _CORES + ("blind", "debug")]
  cores = [p for p in parts if p in _CORES]
  if unknown or len(cores) > 1:
    raise ValueError(f"configs/arena_directives.py: bad variant {arg!r}; expected one of "
                     f"{_CORES}, 'blind' and 'debug', comma-separated")
  cfg = base_config()
  cfg.env.name = "bonk_arena_directives"
  cfg.env.kwargs.conditioned = "blind" not in parts
  cfg.num_envs = 64
  cfg.total_env_steps = 400 * 64 * 128  # 3.28 M
  cfg.ppo.num_steps = 128
  cfg.ppo.seq_len = 16
  cfg.ppo.lr = 3e-4
  cfg.ppo.num_minibatches = 8
  cfg.ppo.normalize_observations = True
  cfg.network.core = cores[0] if cores else "cfc"
  cfg.network.core_size = 64
  cfg.network.hidden_sizes = (128, 128)
  cfg.network.mamba_layers = 1
  cfg.network.ssm_state_size = 8
  cfg.network.mamba_expand = 1
  cfg.world_model.enabled = cfg.dream.enabled = cfg.efe.enabled = False
  cfg.run.log_every_updates = 20
  cfg.run.checkpoint_every_updates = 100
  cfg.run.video_max_frames = 0
  if "debug" in parts:
    cfg.num_envs = 4
    cfg.ppo.num_steps = 32
    cfg.ppo.seq_len = 8
    cfg.ppo.num_minibatches = 2
    cfg.total_env_steps = 4 * 32 * 2
    cfg.network.core_size = 16
    cfg.network.hidden_sizes = (16,)
    cfg.run.log_every_updates = 1
    cfg.run.checkpoint_every_updates = 2
  return cfg
