"""PPO on gymnax CartPole-v1 with PureJaxRL's published settings.

4 envs × 128 steps, 5e5 env steps, 4 epochs × 4 minibatches, lr 2.5e-4 annealed, γ 0.99,
λ 0.95, clip 0.2, entropy 0.01, value 0.5, separate 2×64 tanh actor and critic.

Command:  python -m experiments.train --config=configs/cartpole_ppo.py --workdir=runs/cartpole
Expected: mean episode return ≥ 475 at the end (8 seeds: see BENCHMARKS.md), about 10 s of
          compile and 5–8 s of training on a 2-core CPU.
Debug:    --config=configs/cartpole_ppo.py:debug — 4 envs × 32 steps, 40 updates, used by tests.
"""
from mbjax.train.config import base_config


def get_config(arg: str | None = None):
  cfg = base_config()
  cfg.env.name = "CartPole-v1"
  cfg.num_envs = 4
  cfg.total_env_steps = 500_000
  # Plain PPO, as in PureJaxRL: no world model, dream or Active-Inference learners.
  cfg.world_model.enabled = cfg.dream.enabled = cfg.efe.enabled = False
  cfg.run.log_every_updates = 61  # 976 updates = 16 chunks of 61
  cfg.run.checkpoint_every_updates = 244
  if arg == "debug":
    cfg.ppo.num_steps = 32
    cfg.total_env_steps = 4 * 32 * 40
    cfg.run.log_every_updates = 10
    cfg.run.checkpoint_every_updates = 20
  elif arg:
    raise ValueError(f"configs/cartpole_ppo.py: unknown variant {arg!r}; expected 'debug'")
  return cfg
