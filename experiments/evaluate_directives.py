"""Directive following: a goal-conditioned motor vs a non-conditioned baseline.

`python -m experiments.evaluate_directives --conditioned=runs/directives
    --baseline=runs/directives_blind`

Both checkpoints are played on the same directive-following BonkArena episodes (same keys,
same number of env steps; each agent sees the observation it was trained on, so the
baseline's directive block is zeros). Prints, per directive and pooled over the targeted
ones (goto, collect_gem, pick_card), how many directives ended and the success rate, then
the acceptance check stated in `configs/arena_directives.py`.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_enable_concurrency_optimized_scheduler=false")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from experiments import cli  # noqa: E402
from mbjax.envs.bonk_arena import directives  # noqa: E402
from mbjax.runtime import dual_system  # noqa: E402
from mbjax.train import metrics  # noqa: E402
from mbjax.train import run as run_lib  # noqa: E402

_CONDITIONED = flags.DEFINE_string("conditioned", None, "Workdir of the conditioned motor.")
_BASELINE = flags.DEFINE_string("baseline", None, "Workdir of the non-conditioned baseline.")
_ENVS = flags.DEFINE_integer("envs", 64, "Parallel envs.", lower_bound=1)
_STEPS = flags.DEFINE_integer("steps", 1500, "Steps per env.", lower_bound=1)
_SEED = flags.DEFINE_integer("seed", 1, "Key of the evaluation episodes.")
_DETERMINISTIC = flags.DEFINE_bool("deterministic", False, "Act on the policy's mode.")
_MIN_RATIO = flags.DEFINE_float("min_ratio", 2.0, "Acceptance: targeted success ratio.")
_MIN_RATE = flags.DEFINE_float("min_rate", 0.6, "Acceptance: conditioned targeted rate.")
flags.mark_flags_as_required(["conditioned", "baseline"])

TARGETED = (directives.GOTO, directives.COLLECT_GEM, directives.PICK_CARD)


def rates(workdir: str) -> dict:
  trainer, runner = run_lib.restore_trained(workdir)
  if trainer.cfg.env.name != "bonk_arena_directives":
    raise app.UsageError(f"{workdir} trained on {trainer.cfg.env.name!r}, expected "
                         "'bonk_arena_directives'")
  env = directives.DirectiveArena(**trainer.cfg.env.kwargs.to_dict())
  params = env.default_params()
  agent = jax.device_get(runner.agent)
  motor = dual_system.motor_step_fn(trainer.network, trainer.cfg.ppo.normalize_observations,
                                    _DETERMINISTIC.value)

  def policy_step(carry, key, obs, mask, is_first):
    carry, _, env_action, _, _ = motor(agent.params, agent.obs_stats, carry, key, obs, mask,
                                       is_first)
    return carry, env_action

  count = jax.jit(lambda key: directives.following_rates(
      env, params, policy_step, trainer.network.initial_carry(_ENVS.value), key, _ENVS.value,
      _STEPS.value))
  out = jax.device_get(count(jax.random.PRNGKey(_SEED.value)))
  return {k: np.asarray(v) for k, v in out.items()}


def pooled(stats: dict) -> float:
  idx = list(TARGETED)
  return float(stats["success"][idx].sum() / max(stats["ended"][idx].sum(), 1))


def main(argv):
  del argv
  metrics.quiet_library_logging()
  results = {"conditioned": rates(_CONDITIONED.value), "baseline": rates(_BASELINE.value)}
  print(f"{_ENVS.value} envs × {_STEPS.value} steps, seed {_SEED.value}, load average "
        f"{os.getloadavg()}")
  for name, stats in results.items():
    cells = " | ".join(
        f"{d} {stats['success'][i]}/{stats['ended'][i]} "
        f"({stats['success'][i] / max(stats['ended'][i], 1):.0%})"
        for i, d in enumerate(directives.DIRECTIVES))
    print(f"{name:>11}: {cells} | targeted {pooled(stats):.1%}")
  cond, base = pooled(results["conditioned"]), pooled(results["baseline"])
  ratio = cond / max(base, 1e-9)
  met = ratio >= _MIN_RATIO.value and cond >= _MIN_RATE.value
  print(f"targeted success: conditioned {cond:.1%} vs baseline {base:.1%} = {ratio:.2f}×; "
        f"acceptance (≥ {_MIN_RATIO.value}× and ≥ {_MIN_RATE.value:.0%}): "
        f"{'met' if met else 'NOT met'}")


if __name__ == "__main__":
  cli.run(main)
