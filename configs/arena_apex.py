"""The full apex learner on BonkArena vectors: PPO + RSSM world model + dream + Active
Inference, all updated after every rollout (mbjax.agents.apex).

Same PPO settings as `configs/arena_ppo.py`; the world model is a CPU-sized RSSM (GRU 256,
16×16 categorical latents, windows of 32 steps) with the one-step delta head
(`world_model.predict_delta`: without it the model's one-step prediction was worse than
copying the last observation, 0.78× after 1000 updates; with it 3.0× after 200, see
BENCHMARKS.md "World model"); dream and EFE imagine 15 steps from 256 posterior states
each.

Served policy: PPO, with the dream actor distilled into it (`served.distill_from=dream`,
`distill_coef=0.1`). Chosen by measurement (`experiments/bench_ablation.py --budget=small`,
3 seeds, 82k env steps each, 2026-11-26): final return −5.88 ± 0.34 with dream
distillation, −6.68 ± 0.48 distilling the EFE actor instead, −7.87 ± 0.34 without
distillation (where dream and EFE shape nothing the agent does). A small budget only; the
alternative of letting the latent actor act has no acting path in the Anakin loop yet.
`--config.served.distill_from=none` restores plain PPO serving.

Command:  python -m experiments.train --config=configs/arena_apex.py --workdir=runs/arena_apex
Expected: not yet measured at full length (`python -m experiments.bench_ablation
          --budget=long` is the full ablation; see BENCHMARKS.md "Apex ablation").
Debug:    --config=configs/arena_apex.py:debug — tiny sizes, 4 updates, used by tests.
"""
import importlib.util
import os

_ARENA_PPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "arena_ppo.py")


def _arena_ppo(arg):
  spec = importlib.util.spec_from_file_location("arena_ppo", _ARENA_PPO)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def get_config(arg: str | None = None):
  if arg not in (None, "debug"):
    raise ValueError(f"configs/arena_apex.py: unknown variant {arg!r}; expected 'debug'")
  cfg = _arena_ppo(arg)
  cfg.world_model.enabled = cfg.dream.enabled = cfg.efe.enabled = True
  cfg.world_model.update(deter=256, hidden=256, stoch=16, classes=16, seq_len=32,
                         predict_delta=True)
  cfg.served.distill_from, cfg.served.distill_coef = "dream", 0.1
  if arg == "debug":
    cfg.world_model.update(deter=32, hidden=32, stoch=4, classes=4, seq_len=16)
    for section in (cfg.dream, cfg.efe):
      section.update(hidden_sizes=(32,), horizon=5, num_starts=16)
  return cfg
