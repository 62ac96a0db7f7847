"""Role specialists on BonkArena: a population fine-tuned from one arena_ppo base, with PBT.

Four roles (scout, speedrunner, killer, tank: reward re-weightings, see
mbjax/envs/bonk_arena/rewards.py) × 2 members each, all starting from the base's parameters
and observation statistics; every member has its own 64 envs and PPO hyperparameters. Every
20 updates each member plays 8 evaluation episodes and, within each role, the worse member
copies the better one's agent and perturbs its learning rate, entropy and clip coefficients
(mbjax/train/population.py). The network and env must equal the base's.

Command:  python -m experiments.train --config=configs/arena_ppo.py --workdir=runs/arena_ppo
          python -m experiments.train_population --config=configs/arena_population.py \
              --workdir=runs/arena_population
          python -m experiments.merge --base=runs/arena_ppo \
              --specialists=runs/arena_population/specialists/scout,... --out=runs/merged
Expected: 2 M env steps per member (16 M in all); the full run was not made on the shared
          CPU. Its first 20 updates ran at 12k env-steps/s (compile 19 s) and the PBT round at
          update 20 replaced one member per role (measured 2026-11-26, load average 5).
          The `bench` variant (one member per role, no PBT, 1 M steps per member) is what
          experiments/bench_population.py trains: 6–12 min per seed on the shared CPU;
          over 3 seeds × 128 episodes the role returns (scout, speedrunner, killer, tank) are
          base 7.36 / 11.62 / 7.55 / 3.07, mean merge 7.48 / 12.07 / 7.81 / 2.07 (BENCHMARKS.md,
          "Population: role specialists and merges").
Devices:  `--config.run.num_devices=N` (0, the default: all) splits each member's 64 envs
          over N devices, the same global batch (mbjax/train/population.py); a checkpoint
          resumes on any N dividing 64.
Variants: `:bench` as above; `:debug` — 2 roles × 2 members, 8 envs × 32 steps, 4 updates,
          PBT every update on 2 short evaluation episodes (used by the tests; its base is an
          arena_ppo:debug run).
"""
from configs import arena_ppo
from mbjax.train import population


def get_config(arg: str | None = None):
  cfg = arena_ppo.get_config("debug" if arg == "debug" else None)
  cfg.population = population.default_section()
  cfg.total_env_steps = 2_000_000  # per member
  cfg.run.video_max_frames = 0
  if arg == "bench":
    cfg.total_env_steps = 1_000_000
    cfg.population.members_per_role = 1
    cfg.population.pbt_every_updates = 0
    cfg.population.base_workdir = "runs/arena_base"
  elif arg == "debug":
    cfg.total_env_steps = cfg.num_envs * cfg.ppo.num_steps * 4
    cfg.population.roles = ("scout", "tank")
    cfg.population.pbt_every_updates = 1
    cfg.population.eval_episodes = 2
    cfg.population.eval_max_steps = 48
    cfg.population.base_workdir = "runs/arena_ppo_debug"
    cfg.run.log_every_updates = 1
    cfg.run.checkpoint_every_updates = 2
  elif arg:
    raise ValueError(f"configs/arena_population.py: unknown variant {arg!r}; expected "
                     "'debug' or 'bench'")
  return cfg
