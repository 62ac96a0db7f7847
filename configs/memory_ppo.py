"""Recurrent PPO on RememberCue (`mbjax/envs/memory.py`): the cue at t = 0, 4 blank steps,
then a query where naming the cue earns +1 and anything else −1. Memory is required: a
feed-forward policy's best expected return is 0, a policy that remembers scores 1.

Variants (the `arg` string, comma-separated): a core name — `mamba` (default), `cfc`, `gru`,
`lstm` or `none` (the feed-forward baseline) — and optionally `debug` (the small size used by
`tests/test_mamba_cfc.py`).

Command:  python -m experiments.train --config=configs/memory_ppo.py:cfc --workdir=runs/memory_cfc
Expected: mamba and cfc end at a mean return of 1.00 (last 10 updates; ≥ 0.9 within 15
          updates), `none` near 0 (−0.02, 0.01). Compile 12–18 s, run 3–18 s per seed on a
          2-core CPU (measured 2026-11-26; BENCHMARKS.md, "Memory task").
Debug:    --config=configs/memory_ppo.py:mamba,debug — 16 envs × 24 steps, small core.
"""
from mbjax.train.config import base_config

_CORES = ("mamba", "cfc", "gru", "lstm", "none")


def get_config(arg: str | None = None):
  parts = [p for p in (arg or "").split(",") if p]
  unknown = [p for p in parts if p not in _CORES + ("debug",)]
  cores = [p for p in parts if p in _CORES]
  if unknown or len(cores) > 1:
    raise ValueError(f"configs/memory_ppo.py: bad variant {arg!r}; expected one of {_CORES} "
                     "and optionally 'debug', comma-separated")
  cfg = base_config()
  cfg.env.name = "remember_cue"
  cfg.env.kwargs.delay = 4
  # Plain PPO: the auxiliary learners (world model, dream, EFE) are not part of this test bed.
  cfg.world_model.enabled = cfg.dream.enabled = cfg.efe.enabled = False
  cfg.num_envs = 16
  cfg.ppo.num_steps = 24  # 4 whole episodes of 6 steps per env per update
  cfg.ppo.seq_len = 6  # = episode length: BPTT chunks line up with episodes
  cfg.ppo.num_minibatches = 2
  cfg.ppo.lr = 1e-3
  cfg.ppo.gamma = 0.99
  cfg.total_env_steps = 16 * 24 * 300
  cfg.network.core = cores[0] if cores else "mamba"
  cfg.network.core_size = 64
  cfg.network.mamba_layers = 2
  cfg.network.ssm_state_size = 8
  cfg.network.scan_chunk = 6
  cfg.run.log_every_updates = 10
  cfg.run.checkpoint_every_updates = 100
  cfg.run.video_max_frames = 0  # nothing to look at
  if "debug" in parts:
    cfg.network.core_size = 32
    cfg.network.hidden_sizes = (32,)
    cfg.network.mamba_layers = 1
    cfg.network.ssm_state_size = 4
    cfg.total_env_steps = 16 * 24 * 150
  return cfg
