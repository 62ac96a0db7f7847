"""Role specialists and their merges on BonkArena, evaluated on every role's reward.

  python -m experiments.bench_population --base=runs/arena_base \
      --workdir=runs/bench_population --seeds=0,1,2

For each training seed: trains (or resumes, or reuses) a population from the base
(`configs/arena_population.py:bench` by default — one member per role, no PBT), takes each
role's specialist, the task vectors τᵢ = θᵢ − θ_base, and the mean, task-arithmetic and TIES
merges of all four, and plays `--episodes` evaluation episodes with every policy (base,
specialists, merges; the same episode keys within a seed). One episode's summed reward terms
give its return under all four role weightings, so each policy is scored on every role.

Then, per pair of specialists: cosine similarity and sign-conflict rate of their task
vectors, their own-role returns, the returns of their pairwise TIES merge on both roles, and
two gating decisions — the weight-space rule (`--min_cosine`, `--max_sign_conflict`,
mbjax.population.merge.GatingRule) and the evaluated rule (`--min_retention`,
mbjax.train.population.retains_gains). Prints markdown tables (mean ± std over the training
seeds) and writes them with the raw numbers to <workdir>/bench_population.json.
Each seed's population trains in <workdir>/seed<N>, so the command can be run seed by seed
(`--seeds=0`, then `--seeds=1` …) and a final run over all seeds only evaluates.
"""
import os

# Avoids a jaxlib 0.10 CPU scheduler deadlock (see BUILD.md); must precede importing jax.
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_enable_concurrency_optimized_scheduler=false")

import itertools  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from mbjax import files  # noqa: E402
from mbjax.population import merge as merge_lib  # noqa: E402
from mbjax.train import population  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/arena_population.py:bench", "Population config.")
_BASE = flags.DEFINE_string("base", "runs/arena_base", "Workdir of the base run.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/bench_population", "Output directory.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Training seeds (one population each).")
_EPISODES = flags.DEFINE_integer("episodes", 32, "Evaluation episodes per policy and seed.")
_LAM_TA = flags.DEFINE_float("lam_task_arithmetic", 0.4, "λ of the task-arithmetic merge.")
_K = flags.DEFINE_float("k", 0.2, "TIES: fraction of entries kept per tensor.")
_LAM_TIES = flags.DEFINE_float("lam_ties", 1.0, "λ of the TIES merge.")
_MIN_COSINE = flags.DEFINE_float("min_cosine", 0.0, "Weight-space gate: least cosine.")
_MAX_CONFLICT = flags.DEFINE_float("max_sign_conflict", 0.5,
                                   "Weight-space gate: largest sign-conflict rate.")
_MIN_RETENTION = flags.DEFINE_float(
    "min_retention", 0.5, "Evaluated gate: least share of each specialist's own-role gain "
    "over the base that the pair merge must keep.")


def _merges():
  return {
      "mean": lambda vs: merge_lib.merge(vs, "mean"),
      "task_arithmetic": lambda vs: merge_lib.merge(vs, "task_arithmetic",
                                                    lam=_LAM_TA.value),
      "ties": lambda vs: merge_lib.merge(vs, "ties", k=_K.value, lam=_LAM_TIES.value),
  }


def _seed_results(cfg, seed: int, evaluate, merges) -> dict:
  """Trains (or reuses) one population and evaluates base, specialists and merges."""
  cfg = cfg.copy_and_resolve_references()
  cfg.seed = seed
  cfg.population.base_workdir = _BASE.value
  workdir = os.path.join(_WORKDIR.value, f"seed{seed}")
  start = time.perf_counter()
  result = population.run(cfg, workdir, trainer=evaluate.trainer)
  train_seconds = time.perf_counter() - start
  trainer, state = evaluate.trainer, result["state"]
  roles = tuple(cfg.population.roles)
  base = population.load_base(cfg)
  best = population.best_members(trainer, state)
  specialists = [population.member_agent(state, best[r]) for r in roles]
  vectors = [merge_lib.task_vector(s.params, base.params) for s in specialists]

  policies = {"base": base, **dict(zip(roles, specialists))}
  for name, fn in merges.items():
    policies[name] = base.replace(params=merge_lib.apply_task_vector(base.params,
                                                                     fn(vectors)))
  pairs = list(itertools.combinations(range(len(roles)), 2))
  for i, j in pairs:
    pair = merges["ties"]([vectors[i], vectors[j]])
    policies[f"ties({roles[i]},{roles[j]})"] = base.replace(
        params=merge_lib.apply_task_vector(base.params, pair))

  key = jax.random.PRNGKey(10_000 + seed)  # the same episodes for every policy of a seed
  returns = {name: evaluate(agent, key) for name, agent in policies.items()}
  stats = jax.jit(merge_lib.pair_statistics)(vectors)
  return {"seed": seed, "train_seconds": train_seconds,
          "returns": {n: r.tolist() for n, r in returns.items()},
          "cosine": np.asarray(stats.cosine).tolist(),
          "sign_conflict": np.asarray(stats.sign_conflict).tolist(),
          "co_nonzero": np.asarray(stats.co_nonzero).tolist(),
          "task_vector_norms": [float(np.sqrt(sum(np.sum(np.square(x))
                                                  for x in jax.tree.leaves(v))))
                                for v in vectors]}


class _Evaluator:
  """Mean return per role [R] of one agent over the evaluation episodes."""

  def __init__(self, trainer, roles, episodes):
    self.trainer = trainer
    self._terms = jax.jit(lambda agent, key: trainer.episode_terms(agent, key, episodes))
    self._weights = population.role_weight_matrix(roles)  # [R, 7]

  def __call__(self, agent, key) -> np.ndarray:
    terms = np.asarray(jax.device_get(self._terms(agent, key)))  # [E, 7]
    return (terms @ self._weights.T).mean(axis=0)


def _fmt(values) -> str:
  values = np.asarray(values, np.float64)
  return f"{values.mean():.2f} ± {values.std():.2f}" if len(values) > 1 else f"{values[0]:.2f}"


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cfg = _CONFIG.value
  cfg.population.base_workdir = _BASE.value
  roles = tuple(cfg.population.roles)
  trainer = population.PopulationTrainer(cfg)
  evaluate = _Evaluator(trainer, roles, _EPISODES.value)
  merges = {name: jax.jit(fn) for name, fn in _merges().items()}
  print(f"load average at start {os.getloadavg()}")
  runs = [_seed_results(cfg, int(s), evaluate, merges) for s in _SEEDS.value]

  names = list(runs[0]["returns"])
  table = {n: np.asarray([r["returns"][n] for r in runs]) for n in names}  # [S, R]
  n_seeds = len(runs)
  lines = [f"| policy | {' | '.join(roles)} |", "|---" * (len(roles) + 1) + "|"]
  for name in names:
    if name.startswith("ties("):
      continue
    lines.append(f"| {name} | " + " | ".join(_fmt(table[name][:, r])
                                             for r in range(len(roles))) + " |")
  print(f"\nReturns per role reward, mean ± std over {n_seeds} training seed(s), "
        f"{_EPISODES.value} episodes each:\n" + "\n".join(lines))

  verdicts = {}
  for name in _merges():
    wins = table[name].mean(0) > table["base"].mean(0)
    # Paired by seed: within a seed every policy plays the same episodes.
    seed_wins = (table[name] > table["base"]).sum(0)
    verdicts[name] = {role: {"mean_beats_base": bool(w), "seeds_beating_base": int(k)}
                      for role, w, k in zip(roles, wins, seed_wins)}
    below = [r for r, w in zip(roles, wins) if not w]
    print(f"{name}: " + ("beats the base on every role" if not below else
                         "does not beat the base on " + ", ".join(below))
          + " (seeds in which it beats the base: " + ", ".join(
              f"{r} {k}/{n_seeds}" for r, k in zip(roles, seed_wins)) + ")")

  rule = merge_lib.GatingRule(_MIN_COSINE.value, _MAX_CONFLICT.value, "greedy")
  cosine = np.mean([r["cosine"] for r in runs], axis=0)
  conflict = np.mean([r["sign_conflict"] for r in runs], axis=0)
  co_nonzero = np.asarray(runs[0]["co_nonzero"])
  base = table["base"].mean(0)
  pair_lines = ["| pair | cosine | sign conflict | specialists' own-role returns | "
                "pair TIES on those roles | base on those roles | weight gate | "
                "evaluated gate |", "|---" * 8 + "|"]
  gating = []
  for i, j in itertools.combinations(range(len(roles)), 2):
    pair = f"ties({roles[i]},{roles[j]})"
    merged = table[pair].mean(0)
    own = (table[roles[i]].mean(0)[i], table[roles[j]].mean(0)[j])
    stats = merge_lib.PairStatistics(cosine=cosine[np.ix_([i, j], [i, j])],
                                     sign_conflict=conflict[np.ix_([i, j], [i, j])],
                                     co_nonzero=co_nonzero[np.ix_([i, j], [i, j])])
    weight_ok = bool(merge_lib.gate(stats, rule).all())
    evaluated_ok = population.retains_gains(
        base[[i, j]], np.asarray(own), merged[[i, j]], _MIN_RETENTION.value)
    gating.append({"pair": [roles[i], roles[j]], "cosine": float(cosine[i, j]),
                   "sign_conflict": float(conflict[i, j]), "own_returns": list(map(float, own)),
                   "pair_merge_returns": [float(merged[i]), float(merged[j])],
                   "base_returns": [float(base[i]), float(base[j])],
                   "weight_gate_merges": weight_ok, "evaluated_gate_merges": evaluated_ok})
    pair_lines.append(
        f"| {roles[i]} × {roles[j]} | {cosine[i, j]:+.3f} | {conflict[i, j]:.3f} | "
        f"{own[0]:.2f}, {own[1]:.2f} | {merged[i]:.2f}, {merged[j]:.2f} | "
        f"{base[i]:.2f}, {base[j]:.2f} | {'merge' if weight_ok else 'apart'} | "
        f"{'merge' if evaluated_ok else 'apart'} |")
  group = merge_lib.gate(merge_lib.PairStatistics(cosine=cosine, sign_conflict=conflict,
                                                  co_nonzero=co_nonzero), rule)
  print(f"\nGating per pair (seed means; weight gate: cosine ≥ {rule.min_cosine}, sign "
        f"conflict ≤ {rule.max_sign_conflict}; evaluated gate: the pair merge keeps ≥ "
        f"{_MIN_RETENTION.value:.0%} of each specialist's gain over the base):\n"
        + "\n".join(pair_lines))
  print("weight gate over all four (greedy): merge "
        + (", ".join(r for r, g in zip(roles, group) if g) or "none")
        + "; keep apart " + (", ".join(r for r, g in zip(roles, group) if not g) or "none"))
  print(f"training seconds per seed: {[round(r['train_seconds']) for r in runs]}; "
        f"load average at end {os.getloadavg()}")

  os.makedirs(_WORKDIR.value, exist_ok=True)
  files.write_json(os.path.join(_WORKDIR.value, "bench_population.json"), {
      "roles": list(roles), "seeds": [r["seed"] for r in runs], "episodes": _EPISODES.value,
      "env_steps_per_member": int(cfg.total_env_steps), "merge_settings": {
          "lam_task_arithmetic": _LAM_TA.value, "k": _K.value, "lam_ties": _LAM_TIES.value},
      "runs": runs, "beats_base": verdicts, "gating": gating,
      "weight_gate_group": [r for r, g in zip(roles, group) if g]})
  logging.info("wrote %s", os.path.join(_WORKDIR.value, "bench_population.json"))


if __name__ == "__main__":
  app.run(main)
