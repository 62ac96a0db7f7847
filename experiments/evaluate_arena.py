"""Compare a trained BonkArena agent with the scripted and random baselines:
`python -m experiments.evaluate_arena --checkpoint=runs/arena_ppo --episodes=128`

Plays the same number of full episodes (default params, same episode keys) with each
policy — the trained one samples from its action distribution, as it did in training, or
acts on the mode with `--deterministic` — and prints mean ± std return, mean length and the
fraction of episodes that ended in death.

A run trained through the bridge (`configs/bridge_ppo.py`) plays the shim's observations,
not BonkArena's: it is evaluated against the random policy on `--episodes` reference game
servers launched here (fresh runs of up to `bridge.max_episode_steps` steps, its mode
action), as the Sebulba run's own final evaluation does.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_enable_concurrency_optimized_scheduler=false")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from mbjax.envs.bonk_arena import BonkArena, make_scripted_policy, random_policy  # noqa: E402
from mbjax.envs.bonk_arena import rollout  # noqa: E402
from mbjax.train import evaluate  # noqa: E402
from mbjax.train import metrics, sebulba  # noqa: E402
from mbjax.train import run as run_lib  # noqa: E402

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Workdir of a BonkArena training run.")
_EPISODES = flags.DEFINE_integer("episodes", 128, "Episodes per policy.")
_SEED = flags.DEFINE_integer("seed", 0, "Key of the episode set (shared by all policies).")
_DETERMINISTIC = flags.DEFINE_bool("deterministic", False, "Trained agent acts on its mode.")
flags.mark_flag_as_required("checkpoint")


def evaluate_bridge_run(policy, state) -> None:
  cfg, steps = policy.cfg, policy.cfg.bridge.max_episode_steps
  print(f"{_EPISODES.value} games each on reference servers, up to {steps} steps, update "
        f"{int(state.update_step)} of {_CHECKPOINT.value}")
  with sebulba.launched_servers(cfg, _EPISODES.value) as ports:
    for name, agent in (("trained", jax.device_get(state.agent)), ("random", None)):
      stats = sebulba.evaluate(cfg, ports, agent, steps, seed=_SEED.value)
      print(f"{name:>9}: return {stats['mean_return']:7.2f} per game | "
            f"{stats['mean_reward']:.4f} per step | died {stats['deaths']} of "
            f"{_EPISODES.value}")


def main(argv):
  del argv
  metrics.quiet_library_logging()
  trainer, runner = run_lib.restore_trained(_CHECKPOINT.value)
  if trainer.cfg.bridge.enabled:
    return evaluate_bridge_run(trainer, runner)
  if trainer.cfg.env.name != "bonk_arena":
    raise app.UsageError(f"{_CHECKPOINT.value} trained on {trainer.cfg.env.name!r}")
  env = BonkArena(**trainer.cfg.env.kwargs.to_dict())
  params = env.default_params()
  policies = {
      "trained": evaluate.stateless_policy(trainer, jax.device_get(runner.agent),
                                           _DETERMINISTIC.value),
      "scripted": make_scripted_policy(env),
      "random": random_policy,
  }
  key = jax.random.PRNGKey(_SEED.value)
  print(f"{_EPISODES.value} episodes each, update {int(runner.update_step)} of "
        f"{_CHECKPOINT.value}")
  for name, policy_fn in policies.items():
    stats = jax.device_get(jax.jit(
        lambda k, p=policy_fn: rollout.evaluate(env, params, p, k, _EPISODES.value))(key))
    returns = np.asarray(stats["return"])
    print(f"{name:>9}: return {returns.mean():7.2f} ± {returns.std():5.2f} | length "
          f"{np.mean(stats['length']):7.1f} | died {np.mean(stats['terminated']):4.0%}")


if __name__ == "__main__":
  app.run(main)
