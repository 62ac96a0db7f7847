"""The full apex learner on BonkArena vectors: PPO + RSSM world model + dream + Active
Inference, all updated after every rollout (mbjax.agents.apex).

Same PPO settings as `configs/arena_ppo.py`; the world model is a CPU-sized RSSM (GRU 256,
16×16 categorical latents, windows of 32 steps, lr 1e-3) with the one-step delta head
(`world_model.predict_delta`) and BonkArena's entity head (`world_model.entity_slots` and
`agent_position`, from `BonkArena.world_model_slots()`): the nearest enemies and gems move
entity by entity in polar coordinates around the player, are re-sorted by distance, leave
and arrive. Its one-step prediction error after 1,000 updates on recorded scripted play is
8.2× below copying the last observation (4.6× with the delta head alone at lr 3e-4, 0.78×
with neither), at 1.23× the apex update's time without the head (`entity_width` 128; 1.43×
at 256, which learned no better): `experiments/bench_world_model.py`, BENCHMARKS.md "World
model". Dream and EFE imagine 15 steps from 256 posterior states each.

Served policy: PPO alone (`served.distill_from=none`); the world model, dream and EFE
learners train after every rollout but shape nothing the agent does. Chosen by
measurement (`experiments/bench_ablation.py --budget=medium`, 3 seeds, 3.1 M env steps
each with small learners and the world model of the time, without the entity head,
2026-11-26; BENCHMARKS.md "Apex ablation"): final return PPO
−1.20 ± 0.97; dream actor distilled into PPO (coefficient 0.1) −4.66 ± 0.21; EFE actor
distilled −4.06 ± 0.09; distillation decaying linearly to 0 over the run −3.04 ± 0.85;
distillation for the first quarter only −1.91 ± 1.17. Distillation reaches −5.0 about 2×
sooner (0.42–0.50 M steps vs PPO's 0.93 M) and then caps the return near the latent actor's
(about −4.3); stopping it lets PPO catch up but not overtake. For short runs (≲ 1 M steps)
`--config.served.distill_from=dream --config.served.distill_coef=0.1` is the better
choice; `served.distill_schedule` and `served.distill_end` shape it over the run. The
alternative of letting the latent actor act has no acting path in the Anakin loop.

Command:  python -m experiments.train --config=configs/arena_apex.py --workdir=runs/arena_apex
Expected: the served policy learns like `configs/arena_ppo.py`'s (same PPO settings; the
          other learners' gradients never reach it; 15.6 ± 8.0 there after 30 M steps); not
          measured at this config's own sizes and 30 M steps on this CPU
          (`python -m experiments.bench_ablation --budget=long`).
Debug:    --config=configs/arena_apex.py:debug — tiny sizes, 4 updates, used by tests.
"""
from configs import arena_ppo
from mbjax.envs.bonk_arena import BonkArena


def get_config(arg: str | None = None):
  if arg not in (None, "debug"):
    raise ValueError(f"configs/arena_apex.py: unknown variant {arg!r}; expected 'debug'")
  cfg = arena_ppo.get_config(arg)
  cfg.world_model.enabled = cfg.dream.enabled = cfg.efe.enabled = True
  # From the env's own layout; the trainer refuses a run whose env kwargs no longer match.
  entity_slots, agent_position = BonkArena(**cfg.env.kwargs.to_dict()).world_model_slots()
  cfg.world_model.update(deter=256, hidden=256, stoch=16, classes=16, seq_len=32, lr=1e-3,
                         predict_delta=True, entity_slots=entity_slots,
                         agent_position=agent_position)
  if arg == "debug":
    cfg.world_model.update(deter=32, hidden=32, stoch=4, classes=4, seq_len=16,
                           entity_width=32)
    for section in (cfg.dream, cfg.efe):
      section.update(hidden_sizes=(32,), horizon=5, num_starts=16)
  return cfg
