"""Sample efficiency of the model-based agent against PPO, several seeds per arm:
`python -m experiments.bench_ablation --suite=arena --arms=ppo,dreamer --seeds=3`.

Each arm is a config of `configs/` (with variants) trained for `--total_env_steps` per seed
(0: the config's own budget), the seeds of an arm together under `vmap`. Arms:

  suite arena (BonkArena vectors, rules v2)
    ppo        configs/arena_ppo.py — PPO, the main job's settings
    ppo_1m     PPO tuned for a 1 M-step budget (16 envs × 128 steps, 4 × 4 minibatches)
    dreamer    configs/arena_apex.py — world model, dream and EFE on replay, the dream actor
               acting
    efe        configs/arena_apex.py:efe — the same, the Active-Inference actor acting
    full       configs/arena_apex.py:ppo — PPO acting, the model-based learners alongside
  suite minatar (gymnax MinAtar, flattened observations; `--game`)
    ppo        configs/minatar.py:<game>,ppo — PPO tuned for 1 M steps
    dreamer    configs/minatar.py:<game>,dreamer

Printed per arm: the return at each of `--at` env steps — the mean return of the episodes
that ended in the `--window` env steps before it — as mean ± 95% confidence interval over
seeds (Student's t), the seeds' values, the training wall clock (compile apart) and the
machine's load. `--save` writes every arm's curve (after each arm: a stopped run keeps the
arms it finished); `--reread=a.npz,b.npz` trains nothing and prints the table of saved arms;
`--workdirs=w0,w1,w2 --arms=dreamer` trains nothing and prints the table of one arm whose
seeds were trained one at a time by `experiments.train` (a seed per workdir, read from its
metrics.jsonl), e.g. when the seeds together under vmap would take too long in one go.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_enable_concurrency_optimized_scheduler=false")

import time  # noqa: E402
from typing import NamedTuple  # noqa: E402

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import scipy.stats  # noqa: E402
from absl import app, flags  # noqa: E402

from configs import arena_apex, arena_ppo, minatar  # noqa: E402
from experiments import cli  # noqa: E402
from mbjax import files  # noqa: E402
from mbjax.envs import registry  # noqa: E402
from mbjax.train import anakin  # noqa: E402
from mbjax.train import config as config_lib  # noqa: E402
from mbjax.train import metrics as metrics_lib  # noqa: E402

SUITES = {"arena": ("ppo", "ppo_1m", "dreamer", "efe", "full"),
          "minatar": ("ppo", "dreamer")}

_SUITE = flags.DEFINE_enum("suite", "arena", tuple(SUITES), "Which environments.")
_GAME = flags.DEFINE_enum("game", "breakout", ("breakout", "asterix"), "MinAtar game.")
_ARMS = flags.DEFINE_list("arms", ["ppo", "dreamer"], "Arms to run (see the docstring).")
_SEEDS = flags.DEFINE_integer("seeds", 3, "Seeds per arm (trained together under vmap).",
                              lower_bound=1)
_TOTAL = flags.DEFINE_integer("total_env_steps", 0, "Env steps per seed (0: the config's).",
                              lower_bound=0)
_AT = flags.DEFINE_list("at", [], "Env steps at which returns are reported (default: the "
                        "end of the run).")
_WINDOW = flags.DEFINE_integer("window", 50_000, "Env steps whose finished episodes give the "
                               "return at a point.", lower_bound=1)
_CHUNK = flags.DEFINE_integer("chunk", 10, "Updates per jitted call (one progress line).",
                              lower_bound=1)
_SAVE = flags.DEFINE_string("save", "", "Optional .npz for every arm's curves.")
_REREAD = flags.DEFINE_list("reread", [], "Train nothing: report the arms of earlier --save "
                            "files (comma-separated; a later file's arm replaces an earlier's).")
_WORKDIRS = flags.DEFINE_list("workdirs", [], "Train nothing: report the first of --arms from "
                              "these `experiments.train` workdirs, one seed each.")
_OVERRIDE = flags.DEFINE_multi_string("override", [], "section.field=value applied to every "
                                      "arm's config (e.g. replay.train_ratio=8).")


def arm_config(suite: str, arm: str, game: str = "breakout") -> ml_collections.ConfigDict:
  """The config an arm trains (its own budget in `total_env_steps`)."""
  if arm not in SUITES[suite]:
    raise ValueError(f"unknown arm {arm!r} of suite {suite!r}; expected one of "
                     f"{SUITES[suite]}")
  if suite == "minatar":
    return minatar.get_config(f"{game},{arm}")
  if arm == "ppo":
    return arena_ppo.get_config()
  if arm == "ppo_1m":
    cfg = arena_ppo.get_config()
    cfg.num_envs, cfg.ppo.num_steps, cfg.ppo.num_minibatches = 16, 128, 4
    cfg.total_env_steps = 1_000_000
    return cfg
  return arena_apex.get_config({"dreamer": None, "efe": "efe", "full": "ppo"}[arm])


def _apply(cfg: ml_collections.ConfigDict, override: str) -> None:
  path, _, text = override.partition("=")
  *sections, field = path.split(".")
  target = cfg
  for section in sections:
    target = target[section]
  old = target[field]
  target[field] = (tuple(type(old[0])(v) for v in text.split(",")) if isinstance(old, tuple)
                   else type(old)(text) if not isinstance(old, bool)
                   else text.lower() in ("1", "true"))


class ArmRun(NamedTuple):
  env_steps: np.ndarray  # i64[updates] env steps per seed after each update (or logged chunk)
  returns: np.ndarray  # f32[seeds, updates] mean return of the episodes ended per update
  counts: np.ndarray  # i32[seeds, updates] episodes ended per update
  seconds: float  # train wall seconds, compile apart (NaN when re-read from a file)
  compile_seconds: float


def train_seeds(cfg: ml_collections.ConfigDict, num_seeds: int, chunk: int, log=print) -> ArmRun:
  """Trains `num_seeds` seeds of `cfg` together; returns the arm's curves."""
  config_lib.validate(cfg)
  env, env_params = registry.make(cfg.env.name, **cfg.env.kwargs.to_dict())
  trainer = anakin.make_train(cfg, env, env_params)
  keys = jax.random.split(jax.random.PRNGKey(cfg.seed), num_seeds)

  def run_chunk(runner, length):
    return jax.lax.scan(lambda r, _: trainer.update(r), runner, None, length)

  # lax.map, not vmap: vmapped orthogonal initialisers can deadlock jaxlib 0.10 on this CPU
  # (BUILD.md, "Known traps").
  runner = jax.jit(lambda k: jax.lax.map(trainer.init, k))(keys)
  compiled, returns, counts = {}, [], []
  seconds = compile_seconds = 0.0
  done = 0
  while done < trainer.num_updates:
    length = min(chunk, trainer.num_updates - done)
    if length not in compiled:
      begin = time.perf_counter()
      compiled[length] = jax.jit(jax.vmap(lambda r, n=length: run_chunk(r, n)),
                                 donate_argnums=0).lower(runner).compile()
      compile_seconds += time.perf_counter() - begin
    begin = time.perf_counter()
    runner, metrics = jax.block_until_ready(compiled[length](runner))
    seconds += time.perf_counter() - begin
    done += length
    returns.append(np.asarray(metrics["episode/return"]))
    counts.append(np.asarray(metrics["episode/count"]))
    recent = np.nansum(returns[-1] * counts[-1], -1) / np.maximum(counts[-1].sum(-1), 1)
    log(f"    {done}/{trainer.num_updates} updates, {done * trainer.env_steps_per_update:,} "
        f"steps/seed, {seconds:.0f} s (+{compile_seconds:.0f} s compile), load "
        f"{os.getloadavg()[0]:.1f}: return per seed {np.array2string(recent, precision=2)}")
  steps = trainer.env_steps_per_update * np.arange(1, trainer.num_updates + 1)
  return ArmRun(steps, np.concatenate(returns, 1), np.concatenate(counts, 1), seconds,
                compile_seconds)


def return_at(run: ArmRun, env_steps: int, window: int) -> np.ndarray:
  """[seeds] mean return of the episodes that ended in the `window` env steps up to
  `env_steps` (NaN for a seed where none ended, or beyond the run). A point less than one
  update past the run's end is its end: a budget of 1 M steps runs the whole updates that
  fit (999,424 steps of 2,048-step updates)."""
  per_update = run.env_steps[0]
  if env_steps >= run.env_steps[-1] + per_update:
    return np.full(run.returns.shape[0], np.nan)
  env_steps = min(env_steps, int(run.env_steps[-1]))
  inside = (run.env_steps <= env_steps) & (run.env_steps > env_steps - window)
  total = (run.returns * run.counts * inside).sum(-1)
  count = (run.counts * inside).sum(-1)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def mean_ci(values: np.ndarray) -> tuple[float, float]:
  """(mean, half-width of the 95% confidence interval, Student's t) of the finite values."""
  values = values[np.isfinite(values)]
  if len(values) < 2:
    return (float(values.mean()) if len(values) else float("nan")), float("nan")
  half = scipy.stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
  return float(values.mean()), float(half)


def _mean_ci_text(values: np.ndarray) -> str:
  """'mean ± half-width', or what is missing: a single seed has no interval, a point where
  no seed ended an episode has no mean."""
  mean, half = mean_ci(values)
  if np.isnan(mean):
    return "no episode ended"
  if np.isnan(half):
    return f"{mean:7.2f} (one seed)"
  return f"{mean:7.2f} ± {half:5.2f}"


def report(runs: dict[str, ArmRun], at: list[int], window: int) -> None:
  print(f"\nreturn at env steps (episodes ending in the {window:,} steps before each), "
        "mean ± 95% CI over seeds:")
  for arm, run in runs.items():
    points = at or [int(run.env_steps[-1])]
    cells = []
    for steps in points:
      cells.append(f"{steps:>10,}: " + _mean_ci_text(return_at(run, steps, window)))
    wall = "" if np.isnan(run.seconds) else (f" | train {run.seconds / 60:.0f} min + "
                                             f"{run.compile_seconds:.0f} s compile")
    print(f"  {arm:8s} " + " | ".join(cells) + wall)
    for steps in points:
      print(f"  {'':8s} per seed at {steps:,}: "
            f"{np.array2string(return_at(run, steps, window), precision=2)}")


def save_runs(path: str, runs: dict[str, ArmRun]) -> None:
  arrays = {}
  for arm, run in runs.items():
    arrays.update({f"{arm}/env_steps": run.env_steps, f"{arm}/return": run.returns,
                   f"{arm}/count": run.counts,
                   f"{arm}/seconds": np.array([run.seconds, run.compile_seconds])})
  with files.atomic_open(path, "wb") as f:
    np.savez(f, **arrays)


def load_runs(paths: list[str]) -> dict[str, ArmRun]:
  runs = {}
  for path in paths:
    with np.load(path, allow_pickle=False) as data:
      arms = [key[:-len("/return")] for key in data.files if key.endswith("/return")]
      if not arms or any(f"{arm}/env_steps" not in data.files for arm in arms):
        raise ValueError(f"{path}: not a bench_ablation --save file (no arm curves)")
      for arm in arms:
        seconds, compile_seconds = data[f"{arm}/seconds"]
        runs[arm] = ArmRun(data[f"{arm}/env_steps"], data[f"{arm}/return"],
                           data[f"{arm}/count"], float(seconds), float(compile_seconds))
  return runs


def load_workdirs(workdirs: list[str]) -> ArmRun:
  """One arm from `experiments.train` runs of one config, a seed per workdir: each logged
  chunk of its metrics.jsonl is one point of the curve (its env steps, the mean return and
  the number of the episodes that ended in it)."""
  curves = []
  for workdir in workdirs:
    path = os.path.join(workdir, metrics_lib.METRICS_FILE)
    if not os.path.exists(path):
      raise ValueError(f"--workdirs: {path} does not exist; expected the workdir of an "
                       "experiments.train run")
    records = [r for r in metrics_lib.read_jsonl(path) if "episode/count" in r]
    if not records:
      raise ValueError(f"--workdirs: {path} holds no episode statistics")
    counts = np.array([r["episode/count"] for r in records])
    # A chunk in which no episode ended logs its return as null.
    returns = np.array([r["episode/return"] if r["episode/count"] else 0.0 for r in records])
    curves.append((np.array([r["env_steps"] for r in records]), returns, counts))
  steps = curves[0][0]
  for workdir, (other, _, _) in zip(workdirs, curves):
    if other.shape != steps.shape or (other != steps).any():
      raise ValueError(f"--workdirs: {workdir} logged at other env steps than {workdirs[0]}; "
                       "expected seeds of one config, each run to the same budget")
  return ArmRun(steps, np.stack([c[1] for c in curves]), np.stack([c[2] for c in curves]),
                float("nan"), float("nan"))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  at = [int(float(x)) for x in _AT.value]
  if _REREAD.value:
    report(load_runs(_REREAD.value), at, _WINDOW.value)
    return
  if _WORKDIRS.value:
    if len(_ARMS.value) != 1:
      raise app.UsageError(f"--workdirs: name their one arm with --arms (got {_ARMS.value})")
    report({_ARMS.value[0]: load_workdirs(_WORKDIRS.value)}, at, _WINDOW.value)
    return
  unknown = sorted(set(_ARMS.value) - set(SUITES[_SUITE.value]))
  if unknown:
    raise app.UsageError(f"--arms: unknown {unknown} in suite {_SUITE.value!r}; expected "
                         f"names from {SUITES[_SUITE.value]}")
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} cores, load "
        f"{os.getloadavg()[0]:.1f}; suite {_SUITE.value}"
        f"{' (' + _GAME.value + ')' if _SUITE.value == 'minatar' else ''}, "
        f"{_SEEDS.value} seeds per arm", flush=True)
  runs = {}
  for arm in _ARMS.value:
    cfg = arm_config(_SUITE.value, arm, _GAME.value)
    if _TOTAL.value:
      cfg.total_env_steps = _TOTAL.value
    for override in _OVERRIDE.value:
      _apply(cfg, override)
    print(f"{arm}: {cfg.env.name}, served {cfg.served.policy}, world model "
          f"{cfg.world_model.enabled}, {cfg.total_env_steps:,} env steps per seed", flush=True)
    runs[arm] = train_seeds(cfg, _SEEDS.value, _CHUNK.value,
                            log=lambda line: print(line, flush=True))
    if _SAVE.value:
      save_runs(_SAVE.value, runs)
  report(runs, at, _WINDOW.value)


if __name__ == "__main__":
  cli.run(main)
