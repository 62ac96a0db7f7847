"""The model-based agent on BonkArena vectors: a world model, a dream actor-critic and an
Active-Inference head trained on replay (`mbjax.agents.apex`), the dream actor acting.

Every env step goes into a uniform replay (1 M steps); after each rollout of 16 envs × 64
steps the world model (GRU 512 in 8 blocks, 32 × 16 categorical latents, MLPs of 128) takes
`replay.train_ratio` × 1,024 / (16 × 64) updates on windows of 8 warm-up + 64 trained
steps, and the dream and EFE actor-critics imagine 15 steps from every replayed posterior.
The dream actor acts through the world model's filter (`served.policy=dreamer`).

Variants (comma-separated): `ppo` serves PPO instead (arena_ppo's rollout of 64 × 128, the
model-based learners trained alongside, shaping nothing the agent does unless
`served.distill_from` is set); `efe` serves the Active-Inference actor; `debug` shrinks
everything for the tests.

Command:  python -m experiments.train --config=configs/arena_apex.py --workdir=runs/arena_apex
          python -m experiments.evaluate_arena --checkpoint=runs/arena_apex --episodes=128
Expected: see BENCHMARKS.md "Model-based agent" for the measured return against PPO at
          equal env steps (`experiments/bench_ablation.py`).
Debug:    --config=configs/arena_apex.py:debug — tiny sizes, 4 updates, used by tests.
"""
from configs import arena_ppo

_VARIANTS = ("debug", "ppo", "efe")


def get_config(arg: str | None = None):
  parts = set(arg.split(",")) if arg else set()
  if parts - set(_VARIANTS):
    raise ValueError(f"configs/arena_apex.py: unknown variant(s) {sorted(parts - set(_VARIANTS))}"
                     f"; expected some of {_VARIANTS}, comma-separated")
  if {"ppo", "efe"} <= parts:
    raise ValueError("configs/arena_apex.py: 'ppo' and 'efe' each choose the served policy; "
                     "give one")
  debug = "debug" in parts
  cfg = arena_ppo.get_config("debug" if debug else None)
  cfg.world_model.enabled = cfg.dream.enabled = cfg.efe.enabled = True
  cfg.served.policy = "ppo" if "ppo" in parts else "efe" if "efe" in parts else "dreamer"
  cfg.total_env_steps = 1_000_000
  if cfg.served.policy != "ppo":
    cfg.num_envs, cfg.ppo.num_steps = 16, 64
  # KL weights at a tenth of DreamerV3's: BonkArena's symlog observations vary little per
  # dimension (variance 0.033), so at 0.5 / 0.1 the reconstruction gain of a nat of
  # information costs more than the nat and the posterior took in < 1 nat per step
  # (`python -m experiments.bench_world_model --fit`: see BENCHMARKS.md).
  cfg.world_model.update(deter=512, blocks=8, hidden=128, stoch=32, classes=16,
                         dyn_scale=0.05, rep_scale=0.01)
  cfg.replay.update(capacity=1_000_000, batch_size=16, seq_len=64, burn_in=8,
                    train_ratio=16.0, prefill=5_000)
  for section in (cfg.dream, cfg.efe):
    section.hidden_sizes = (128, 128)
  cfg.run.log_every_updates = 10
  cfg.run.checkpoint_every_updates = 50
  if debug:
    cfg.num_envs, cfg.ppo.num_steps = 8, 32
    cfg.total_env_steps = 8 * 32 * 4
    cfg.world_model.update(deter=32, blocks=2, hidden=32, stoch=4, classes=4)
    cfg.replay.update(capacity=8 * 128, batch_size=4, seq_len=8, burn_in=2, train_ratio=1.0,
                      prefill=256)
    for section in (cfg.dream, cfg.efe):
      section.update(hidden_sizes=(32,), horizon=5)
    cfg.run.log_every_updates = 2
    cfg.run.checkpoint_every_updates = 4
  return cfg
