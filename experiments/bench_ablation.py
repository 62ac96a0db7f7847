"""Apex ablation on BonkArena vectors: `python -m experiments.bench_ablation --budget=small`.

Arms, each trained for the same number of env steps from the same seeds, the seeds of an
arm trained together under `vmap`:

  ppo                PPO alone (`configs/arena_apex.py` with every auxiliary learner off)
  ppo+wm             + the RSSM world model trained on every rollout
  ppo+wm+dream       + dream actor-critic, distilled into PPO (served.distill_from=dream)
  ppo+wm+dream+efe   + Active-Inference head, distilled into PPO (served.distill_from=efe;
                     the served policy has one distillation teacher, so the dream actor
                     trains alongside but shapes nothing in this arm)
  dream_h5/h30       the dream arm with imagination horizon 5 / 30 (15 is the dream arm)
  dream_linear       the dream arm with the distillation coefficient decaying linearly to 0
                     over the run (served.distill_schedule=linear)
  dream_early        the dream arm distilling for the first quarter of the run only
                     (served.distill_end=0.25), then PPO alone

`ppo+wm` leaves the acting policy untouched by construction (its gradients never reach
PPO, see `mbjax.agents.apex`); it is run for its cost and as a check of that claim.

Printed per arm: mean ± std over seeds of the final return (episodes that ended in the
last `--final_fraction` of the updates) and of the env steps until the running return
(episodes of the last `--window` updates) first reaches `--threshold`; seeds that never
reach it are counted apart and enter the mean as the whole budget (a lower bound). When
the `ppo` arm runs, every arm's steps until its running return reaches PPO's mean final
return follow (the goal: the full stack within 50% of the budget).

Arms run at different times compare through their saved curves:
`--reread=runs/a.npz,runs/b.npz` trains nothing and prints the same table for every arm in
the files (PPO's final return taken from the file that has `ppo`).

Budgets (`--budget`): `ci` (seconds, for tests), `small` (82k steps per seed with small
learners: what a shared 2-core CPU runs in about 40 minutes, but no arm learns yet),
`medium` (the config's PPO rollout of 64 envs × 128 steps, 3.1 M steps per seed, the same
small learners: PPO learns well past the threshold; ~2 hours on a 2-core CPU) and `long`
(the config's own sizes and 30 M steps per seed: needs a real machine). `--total_env_steps` overrides the budget's step count.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_enable_concurrency_optimized_scheduler=false")

import time  # noqa: E402
from typing import NamedTuple  # noqa: E402

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from configs import arena_apex  # noqa: E402
from mbjax import files  # noqa: E402
from mbjax.envs import registry  # noqa: E402
from mbjax.train import anakin  # noqa: E402
from mbjax.train import config as config_lib  # noqa: E402

ARMS = ("ppo", "ppo+wm", "ppo+wm+dream", "ppo+wm+dream+efe", "dream_h5", "dream_h30",
        "dream_linear", "dream_early")

_BUDGET = flags.DEFINE_enum("budget", "small", ("ci", "small", "medium", "long"), "Run size.")
_ARMS = flags.DEFINE_list("arms", list(ARMS), f"Arms to run, from {ARMS}.")
_SEEDS = flags.DEFINE_integer("seeds", 3, "Seeds per arm (trained together under vmap).")
_TOTAL = flags.DEFINE_integer("total_env_steps", 0, "Env steps per seed (0: the budget's).")
_THRESHOLD = flags.DEFINE_float(
    "threshold", -5.0, "Return that counts as reached (random play: -6.98, scripted: 9.20).")
_WINDOW = flags.DEFINE_integer("window", 5, "Updates whose episodes form the running return.")
_FINAL_FRACTION = flags.DEFINE_float("final_fraction", 0.1,
                                     "Last fraction of updates whose episodes give the final "
                                     "return.")
_SAVE = flags.DEFINE_string("save", "", "Optional .npz for every arm's per-update episode "
                            "returns and counts (to re-read thresholds later).")
_REREAD = flags.DEFINE_list(
    "reread", [], "Train nothing: report the arms saved by earlier --save runs of one "
    "budget (comma-separated files; PPO's final return is read from whichever has `ppo`).")
_DISTILL_COEF = flags.DEFINE_float("distill_coef", 0.1, "served.distill_coef of the dream "
                                   "and EFE arms.")


class Budget(NamedTuple):
  num_envs: int
  num_steps: int  # ppo.num_steps
  total_env_steps: int  # per seed
  chunk: int  # updates per jitted call (one progress line each)
  models: str  # "debug": arena_apex's debug sizes; "small": see _small_models; "config"


BUDGETS = {
    "ci": Budget(num_envs=8, num_steps=32, total_env_steps=8 * 32 * 4, chunk=2,
                 models="debug"),
    "small": Budget(num_envs=16, num_steps=64, total_env_steps=16 * 64 * 240, chunk=40,
                    models="small"),
    "medium": Budget(num_envs=64, num_steps=128, total_env_steps=64 * 128 * 384, chunk=32,
                     models="small"),
    "long": Budget(num_envs=64, num_steps=128, total_env_steps=30_000_000, chunk=50,
                   models="config"),
}


def _small_models(cfg: ml_collections.ConfigDict) -> None:
  """Learners a shared 2-core CPU can afford for several arms × seeds: GRU 64, 8×8
  categorical latents, an entity head of width 64, latent actor-critics of 2×64 imagining
  from 64 starts."""
  cfg.world_model.update(deter=64, hidden=64, stoch=8, classes=8, entity_width=64)
  for section in (cfg.dream, cfg.efe):
    section.update(hidden_sizes=(64, 64), num_starts=64)


def arm_config(arm: str, budget: Budget, distill_coef: float) -> ml_collections.ConfigDict:
  """The apex config with the arm's learners and served-policy source, at `budget`'s size."""
  if arm not in ARMS:
    raise ValueError(f"unknown arm {arm!r}; expected one of {ARMS}")
  cfg = arena_apex.get_config("debug" if budget.models == "debug" else None)
  if budget.models == "small":
    _small_models(cfg)
  cfg.num_envs, cfg.ppo.num_steps = budget.num_envs, budget.num_steps
  cfg.total_env_steps = budget.total_env_steps
  cfg.world_model.enabled = arm != "ppo"
  cfg.dream.enabled = arm not in ("ppo", "ppo+wm")
  cfg.efe.enabled = arm == "ppo+wm+dream+efe"
  # Only the dream arms distil (the config's own default is overridden either way).
  if cfg.dream.enabled:
    cfg.served.distill_from = "efe" if cfg.efe.enabled else "dream"
    cfg.served.distill_coef = distill_coef
  else:
    cfg.served.distill_from, cfg.served.distill_coef = "none", 0.0
  if arm.startswith("dream_h"):
    cfg.dream.horizon = int(arm[len("dream_h"):])
  cfg.served.distill_schedule = "linear" if arm == "dream_linear" else "constant"
  cfg.served.distill_end = 0.25 if arm == "dream_early" else 1.0
  config_lib.validate(cfg)
  return cfg


def train_seeds(cfg: ml_collections.ConfigDict, num_seeds: int, chunk: int, log=print):
  """Trains `num_seeds` seeds of `cfg` together; returns (episode returns, episode counts)
  as f32[seeds, updates], env steps per update, and the wall seconds (compile apart)."""
  env, env_params = registry.make(cfg.env.name, **cfg.env.kwargs.to_dict())
  trainer = anakin.make_train(cfg, env, env_params)
  keys = jax.random.split(jax.random.PRNGKey(cfg.seed), num_seeds)

  def run_chunk(runner, length):
    return jax.lax.scan(lambda r, _: trainer.update(r), runner, None, length)

  # lax.map, not vmap: vmapped orthogonal initialisers can deadlock jaxlib 0.10 on this CPU
  # (BUILD.md, "Known traps"; seen here at 0% CPU with the XLA flag set).
  runner = jax.jit(lambda k: jax.lax.map(trainer.init, k))(keys)
  compiled = {}
  returns, counts = [], []
  seconds = compile_seconds = 0.0
  done = 0
  while done < trainer.num_updates:
    length = min(chunk, trainer.num_updates - done)
    if length not in compiled:
      begin = time.perf_counter()
      compiled[length] = jax.jit(jax.vmap(lambda r, n=length: run_chunk(r, n))).lower(
          runner).compile()
      compile_seconds += time.perf_counter() - begin
    begin = time.perf_counter()
    runner, metrics = jax.block_until_ready(compiled[length](runner))
    seconds += time.perf_counter() - begin
    done += length
    returns.append(np.asarray(metrics["episode/return"]))
    counts.append(np.asarray(metrics["episode/count"]))
    recent = running_return(np.concatenate(returns, 1), np.concatenate(counts, 1),
                            length)[:, -1]
    log(f"    {done}/{trainer.num_updates} updates, {done * trainer.env_steps_per_update:,} "
        f"steps/seed, {seconds:.0f} s (+{compile_seconds:.0f} s compile), load "
        f"{os.getloadavg()[0]:.1f}: return per seed {np.array2string(recent, precision=2)}")
  return (np.concatenate(returns, 1), np.concatenate(counts, 1),
          trainer.env_steps_per_update, seconds, compile_seconds)


def running_return(returns: np.ndarray, counts: np.ndarray, window: int) -> np.ndarray:
  """Episode-weighted mean return of the episodes that ended in the last `window` updates
  up to each update ([seeds, updates]; NaN where none ended)."""
  weighted = np.cumsum(returns * counts, -1)
  total = np.cumsum(counts, -1)
  shift = lambda x: np.concatenate([np.zeros_like(x[..., :window]), x[..., :-window]], -1)
  weighted, total = weighted - shift(weighted), total - shift(total)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(total > 0, weighted / np.maximum(total, 1), np.nan)


class Summary(NamedTuple):
  final: np.ndarray  # [seeds] return of the episodes in the last updates (NaN: none ended)
  steps_to_threshold: np.ndarray  # [seeds] env steps; the budget where never reached
  reached: np.ndarray  # bool[seeds]


def summarize(returns: np.ndarray, counts: np.ndarray, steps_per_update: int,
              threshold: float, window: int, final_fraction: float) -> Summary:
  """Final return and steps-to-threshold per seed from [seeds, updates] metrics."""
  num_updates = returns.shape[-1]
  last = max(1, int(round(final_fraction * num_updates)))
  ended = counts[:, -last:].sum(-1)
  final = np.where(ended > 0, (returns[:, -last:] * counts[:, -last:]).sum(-1) / np.maximum(
      ended, 1), np.nan)
  running = running_return(returns, counts, window)
  above = np.nan_to_num(running, nan=-np.inf) >= threshold
  reached = above.any(-1)
  first = np.where(reached, above.argmax(-1) + 1, num_updates)
  return Summary(final, first * steps_per_update, reached)


def _mean_std(x) -> str:
  return f"{np.mean(x):8.2f} ± {np.std(x):5.2f}"


def _seconds(x: float) -> str:
  return "—" if np.isnan(x) else f"{x:.0f}"


class ArmRun(NamedTuple):
  returns: np.ndarray  # f32[seeds, updates] mean return of the episodes ended per update
  counts: np.ndarray  # i32[seeds, updates] episodes ended per update
  seconds: float  # train wall seconds, compile apart (NaN when re-read from a file)
  compile_seconds: float


def save_runs(path: str, runs: dict[str, ArmRun], steps_per_update: int) -> None:
  """Writes every arm's curves to `path` (temp file, then rename: a stopped run keeps the
  arms it finished); `load_runs` reads them back."""
  arrays = {}
  for arm, run in runs.items():
    arrays[f"{arm}/return"], arrays[f"{arm}/count"] = run.returns, run.counts
  with files.atomic_open(path, "wb") as f:
    np.savez(f, steps_per_update=steps_per_update, **arrays)


def load_runs(paths: list[str]) -> tuple[dict[str, ArmRun], int]:
  """Arms saved by earlier runs (`--save`), in file order; returns (runs, steps per update).
  A later file's arm of the same name replaces an earlier one's."""
  runs, steps_per_update = {}, None
  for path in paths:
    with np.load(path, allow_pickle=False) as data:
      if "steps_per_update" not in data:
        raise ValueError(f"{path}: not a bench_ablation --save file (no steps_per_update)")
      steps = int(data["steps_per_update"])
      if steps_per_update not in (None, steps):
        raise ValueError(f"{path}: {steps} env steps per update, but an earlier file has "
                         f"{steps_per_update}; only runs of one budget can be compared")
      steps_per_update = steps
      for key in data.files:
        if key.endswith("/return"):
          arm = key[:-len("/return")]
          runs[arm] = ArmRun(data[key], data[f"{arm}/count"], float("nan"), float("nan"))
  if not runs:
    raise ValueError(f"no arms in {paths}")
  return runs, steps_per_update


def report(runs: dict[str, ArmRun], steps_per_update: int, threshold: float, window: int,
           final_fraction: float) -> None:
  """Prints the table: final return and steps to `threshold` per arm, then (with a `ppo`
  arm) every arm's steps until its running return reaches PPO's mean final return."""
  summary_at = lambda run, level: summarize(run.returns, run.counts, steps_per_update, level,
                                           window, final_fraction)
  print(f"\n{'arm':18s} {'final return':>17s} {'steps to ' + str(threshold):>24s} "
        f"{'reached':>7s} {'train s':>8s} {'compile s':>9s}")
  for arm, run in runs.items():
    summary = summary_at(run, threshold)
    steps = summary.steps_to_threshold
    print(f"{arm:18s} {_mean_std(summary.final):>17s} "
          f"{np.mean(steps):11,.0f} ± {np.std(steps):9,.0f} "
          f"{summary.reached.sum():3d}/{summary.reached.size:<3d} {_seconds(run.seconds):>8s} "
          f"{_seconds(run.compile_seconds):>9s}")
    print(f"{'':18s} per seed: final {np.array2string(summary.final, precision=2)}, steps "
          f"{steps.tolist()} of {run.returns.shape[-1] * steps_per_update:,}")
  ppo_final = summary_at(runs["ppo"], threshold).final if "ppo" in runs else np.array([np.nan])
  if not np.isfinite(ppo_final).any():
    return
  # The goal, read from the same curves: env steps until each arm's running return
  # first reaches PPO's mean final return (≤ 50% of the budget is the target).
  target = float(np.nanmean(ppo_final))
  print(f"\nsteps to PPO's final return {target:.2f} (running return over {window} updates):")
  for arm, run in runs.items():
    reach = summary_at(run, target)
    steps = reach.steps_to_threshold
    print(f"  {arm:18s} {np.mean(steps):11,.0f} ± {np.std(steps):9,.0f} "
          f"({np.mean(steps) / (run.returns.shape[-1] * steps_per_update):.0%} of the budget), "
          f"reached {reach.reached.sum()}/{reach.reached.size}")


def main(argv):
  del argv
  report_args = dict(threshold=_THRESHOLD.value, window=_WINDOW.value,
                     final_fraction=_FINAL_FRACTION.value)
  if _REREAD.value:
    runs, steps_per_update = load_runs(_REREAD.value)
    report(runs, steps_per_update, **report_args)
    return
  budget = BUDGETS[_BUDGET.value]
  if _TOTAL.value:
    budget = budget._replace(total_env_steps=_TOTAL.value)
  unknown = sorted(set(_ARMS.value) - set(ARMS))
  if unknown:
    raise app.UsageError(f"--arms: unknown {unknown}; expected names from {ARMS}")
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} cores; "
        f"budget {_BUDGET.value}: {budget.num_envs} envs x {budget.num_steps} steps, "
        f"{budget.total_env_steps:,} env steps per seed, {_SEEDS.value} seeds per arm; "
        f"threshold {_THRESHOLD.value}")
  runs = {}
  for arm in _ARMS.value:
    cfg = arm_config(arm, budget, _DISTILL_COEF.value)
    print(f"{arm}: world model {cfg.world_model.enabled}, dream {cfg.dream.enabled} "
          f"(H={cfg.dream.horizon}), efe {cfg.efe.enabled}, served "
          f"{cfg.served.distill_from}/{cfg.served.distill_coef}", flush=True)
    returns, counts, steps_per_update, seconds, compile_seconds = train_seeds(
        cfg, _SEEDS.value, budget.chunk, log=lambda line: print(line, flush=True))
    runs[arm] = ArmRun(returns, counts, seconds, compile_seconds)
    if _SAVE.value:  # after every arm
      save_runs(_SAVE.value, runs, steps_per_update)
  report(runs, steps_per_update, **report_args)


if __name__ == "__main__":
  app.run(main)
