"""MinAtar (gymnax) with flattened observations: the external sample-efficiency check of the
model-based agent against PPO (`experiments/bench_ablation.py --suite=minatar`).

Variants (comma-separated): the game — `breakout` (default) or `asterix`; the agent —
`dreamer` (default: the world model, the dream actor acting, trained on replay at
`replay.train_ratio` 64; at 32 its return rose ≈ 40 k env steps later) or `ppo` (PPO tuned
for a 1 M-step budget: 16 envs × 128 steps, lr 5e-4 annealed, 4 epochs × 4 minibatches,
2×256 ReLU networks); `debug` shrinks everything for the tests.

Command:  python -m experiments.train --config=configs/minatar.py:breakout,dreamer \\
              --workdir=runs/minatar_breakout_dreamer
Expected: Breakout, dreamer: return 3.8 at 100 k env steps (seeds 0–2: 3.56, 3.53, 4.30)
          and 6.4 at 200 k (5.43, 6.84, 6.84; 2.5–2.7 h a seed on 2 CPU cores; at train
          ratio 32, 5.9 over three seeds), PPO: 6.2 at 200 k and 6.5 at 1 M — BENCHMARKS.md
          "Model-based agent".
Debug:    --config=configs/minatar.py:debug — tiny sizes, 4 updates, used by tests.
"""
from mbjax.train.config import base_config

_GAMES = {"breakout": "Breakout-MinAtar", "asterix": "Asterix-MinAtar"}
_AGENTS = ("dreamer", "ppo")


def get_config(arg: str | None = None):
  parts = set(arg.split(",")) if arg else set()
  known = set(_GAMES) | set(_AGENTS) | {"debug"}
  if parts - known:
    raise ValueError(f"configs/minatar.py: unknown variant(s) {sorted(parts - known)}; "
                     f"expected one game of {tuple(_GAMES)}, one agent of {_AGENTS}, "
                     "and/or 'debug'")
  games, agents = parts & set(_GAMES), parts & set(_AGENTS)
  if len(games) > 1 or len(agents) > 1:
    raise ValueError(f"configs/minatar.py: one game and one agent, got {sorted(parts)}")
  game = games.pop() if games else "breakout"
  agent = agents.pop() if agents else "dreamer"
  cfg = base_config()
  cfg.env.name = _GAMES[game]
  cfg.env.kwargs.flatten = True
  cfg.network.hidden_sizes = (256, 256)
  cfg.network.activation = "relu"
  cfg.run.video_max_frames = 0
  if agent == "ppo":
    cfg.world_model.enabled = cfg.dream.enabled = cfg.efe.enabled = False
    cfg.num_envs, cfg.ppo.num_steps = 16, 128
    cfg.total_env_steps = 1_000_000
    cfg.ppo.update(lr=5e-4, update_epochs=4, num_minibatches=4)
    cfg.run.log_every_updates = 20
    cfg.run.checkpoint_every_updates = 100
  else:
    cfg.efe.enabled = False
    cfg.served.policy = "dreamer"
    cfg.num_envs, cfg.ppo.num_steps = 16, 64
    cfg.total_env_steps = 200_000
    cfg.world_model.update(deter=512, blocks=8, hidden=128, stoch=32, classes=16)
    cfg.replay.update(capacity=200_000, batch_size=16, seq_len=64, burn_in=8,
                      train_ratio=64.0, prefill=5_000)
    cfg.dream.hidden_sizes = (128, 128)
    cfg.run.log_every_updates = 5
    cfg.run.checkpoint_every_updates = 25
  if "debug" in parts:
    cfg.num_envs, cfg.ppo.num_steps = 4, 32
    cfg.total_env_steps = 4 * 32 * 4
    cfg.network.hidden_sizes = (32, 32)
    cfg.world_model.update(deter=32, blocks=2, hidden=32, stoch=4, classes=4)
    cfg.replay.update(capacity=4 * 128, batch_size=4, seq_len=8, burn_in=2, train_ratio=1.0,
                      prefill=128)
    cfg.dream.update(hidden_sizes=(32,), horizon=5)
    cfg.run.log_every_updates = 2
    cfg.run.checkpoint_every_updates = 4
  return cfg
