"""PPO on BonkArena through the BonkLink bridge (Sebulba loop), against reference servers.

The same path a real MegaBonk install takes: the learner launches `num_envs` reference game
servers (`python -m mbjax.bridge.server`, ports from base_port), actor threads play them over
TCP on 127.0.0.1 and the learner updates on device. Point `bridge.launch_server=False`,
`bridge.base_port=5560` at running BonkLink plugins to train on the real game instead.
Observation/reward: `mbjax.bridge.shim` (state packet → 69 floats; survival, damage, level-up
at the upstream weights, plus a nearest-enemy distance term, `bridge.distance_reward`, that
makes kiting learnable in short runs — set it to 0 for the upstream terms alone).

Command:  python -m experiments.train --config=configs/bridge_ppo.py --workdir=runs/bridge_ppo
Expected: 8 games at 60 Hz in real time, 300–470 actor steps/s while learning on a shared
          2-core CPU, ≈ 5 min; the final evaluation (300 steps per game from fresh runs)
          gives the trained policy ≈ 0.25 reward/step vs ≈ 0.18 for the random policy
          (measured 2026-11-26, BENCHMARKS.md "Bridges").
Devices:  actors act on the host CPU (`run.actor_device=-1`; k: jax.devices()[k]); the
          learner's update is data-parallel over the first `run.num_devices` devices (0: all;
          `num_envs` must divide by it); `--config.run.num_devices=2 --config.run.actor_device=2`
          puts the 8 games' actors on GPU 2, apart from the learner on GPUs 0 and 1
          (mbjax/train/sebulba.py).
Debug:    --config=configs/bridge_ppo.py:debug — 4 lock-step games (4 ticks per action),
          32-step rollouts, 50 updates (6,400 steps, ≈ 25 s); the smoke test
          (tests/bridge/test_sebulba.py) trains it for 150 updates.
"""
from mbjax.train.config import base_config


def get_config(arg: str | None = None):
  cfg = base_config()
  cfg.env.name = "bonk_arena"  # informational: the game is behind the bridge
  cfg.bridge.enabled = True
  cfg.bridge.base_port = 0  # any free ports for the launched servers
  cfg.num_envs = 8
  cfg.total_env_steps = 102_400  # 400 updates of 8 × 32
  cfg.ppo.num_steps = 32
  cfg.ppo.num_minibatches = 4
  cfg.ppo.update_epochs = 4
  cfg.ppo.lr = 1e-3
  cfg.ppo.anneal_lr = False
  cfg.ppo.ent_coef = 0.0
  cfg.ppo.gamma = 0.8  # short horizon: contact damage follows a move within a few steps
  cfg.ppo.normalize_observations = True
  cfg.bridge.server_mode = "realtime"
  cfg.bridge.max_episode_steps = 300
  cfg.bridge.distance_reward = 1.0
  cfg.bridge.num_actor_threads = 2
  cfg.bridge.eval_steps = 300  # final evaluation against the random policy
  cfg.run.log_every_updates = 20
  cfg.run.checkpoint_every_updates = 100
  cfg.run.video_max_frames = 0
  if arg == "debug":
    cfg.num_envs = 4
    cfg.bridge.server_mode = "lockstep"
    cfg.bridge.ticks_per_action = 4  # about what a ~15 Hz actor gets from a 60 Hz game
    cfg.bridge.max_episode_steps = 100
    cfg.bridge.num_actor_threads = 1
    cfg.total_env_steps = 4 * 32 * 50
    cfg.run.log_every_updates = 10
    cfg.run.checkpoint_every_updates = 50
    cfg.bridge.eval_steps = 0
  elif arg:
    raise ValueError(f"configs/bridge_ppo.py: unknown variant {arg!r}; expected 'debug'")
  return cfg
