"""Compare a trained BonkArena agent with the baselines:
`python -m experiments.evaluate_arena --checkpoint=runs/arena_ppo --episodes=128`

Plays the same number of full episodes (default params, same episode keys) with each
policy — the trained one (with `--checkpoint`) samples from its action distribution, as it
did in training, or acts on the mode with `--deterministic` (whichever policy the run served:
PPO, or a latent actor through the world model's filter); the scripted baseline; random
play; and the menu-idle probe (random moves, never a card) — and prints per policy the mean
return with its 95% confidence interval, mean length, the fraction of episodes that ended in
death, `menu_fraction` (share of env steps with the level-up menu open) and each reward
term's contribution (weight × summed term), so a degenerate policy (idling in the menu,
pinned to a wall) shows in the table. Without `--checkpoint` it prints the baselines only.

A run trained through the bridge (`configs/bridge_ppo.py`) plays the shim's observations,
not BonkArena's: it is evaluated against the random policy on reference game servers
launched here, `--episodes` fresh runs of up to `bridge.max_episode_steps` steps in rounds
of its `num_envs` games (its mode action), as the Sebulba run's own final evaluation does.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_enable_concurrency_optimized_scheduler=false")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from experiments import cli  # noqa: E402
from mbjax.envs.bonk_arena import (BonkArena, idle_menu_policy, make_scripted_policy,  # noqa: E402
                                   random_policy, rewards, rollout)
from mbjax.envs.bonk_arena import game  # noqa: E402
from mbjax.train import evaluate  # noqa: E402
from mbjax.train import metrics as metrics_lib  # noqa: E402
from mbjax.train import sebulba_actor  # noqa: E402
from mbjax.train import run as run_lib  # noqa: E402

_CHECKPOINT = flags.DEFINE_string("checkpoint", None,
                                  "Workdir of a BonkArena training run (optional).")
_EPISODES = flags.DEFINE_integer("episodes", 128, "Episodes per policy.", lower_bound=1)
_SEED = flags.DEFINE_integer("seed", 0, "Key of the episode set (shared by all policies).")
_DETERMINISTIC = flags.DEFINE_bool("deterministic", False, "Trained agent acts on its mode.")


def evaluate_policies(env: BonkArena, params, policies: dict, key, episodes: int) -> dict:
  """{policy name: per-episode stats (numpy) of `rollout.evaluate`}, same keys for all."""
  results = {}
  for name, policy_fn in policies.items():
    results[name] = jax.device_get(jax.jit(
        lambda k, p=policy_fn: rollout.evaluate(env, params, p, k, episodes))(key))
  return results


def format_table(results: dict, params) -> str:
  """The comparison table: return (mean ± 95% CI), length, died, menu_fraction, and the
  mean per-episode contribution of every reward term."""
  weights = np.asarray(params.reward_weights, np.float64)
  head = (f"{'policy':>9} | {'return (95% CI)':>17} | {'length':>7} | {'died':>5} | "
          f"{'menu':>6} | " + " | ".join(f"{t:>8}" for t in rewards.REWARD_TERMS))
  lines = [head, "-" * len(head)]
  for name, stats in results.items():
    returns = np.asarray(stats["return"], np.float64)
    half = 1.96 * returns.std(ddof=1) / np.sqrt(len(returns)) if len(returns) > 1 else 0.0
    terms = np.asarray(stats["reward_terms"], np.float64).mean(0) * weights
    lines.append(
        f"{name:>9} | {returns.mean():8.2f} ± {half:6.2f} | {np.mean(stats['length']):7.1f} | "
        f"{np.mean(stats['terminated']):5.0%} | {np.mean(stats['menu_fraction']):6.2%} | "
        + " | ".join(f"{c:8.2f}" for c in terms))
  return "\n".join(lines)


def evaluate_bridge_run(policy, state) -> None:
  cfg, steps = policy.cfg, policy.cfg.bridge.max_episode_steps
  games = min(_EPISODES.value, cfg.num_envs)
  rounds = -(-_EPISODES.value // games)
  print(f"{rounds * games} runs each on reference servers, up to {steps} steps, update "
        f"{int(state.update_step)} of {_CHECKPOINT.value}")
  with sebulba_actor.launched_servers(cfg, games) as ports:
    for name, agent in (("trained", jax.device_get(state.agent)), ("random", None)):
      stats = [sebulba_actor.evaluate(cfg, ports, agent, steps, seed=_SEED.value + r)
               for r in range(rounds)]
      print(f"{name:>9}: return {np.mean([s['mean_return'] for s in stats]):7.2f} per run | "
            f"{np.mean([s['mean_reward'] for s in stats]):.4f} per step | died "
            f"{sum(s['deaths'] for s in stats)} of {rounds * games}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  metrics_lib.quiet_library_logging()
  policies = {}
  kwargs = {}
  header = f"{_EPISODES.value} episodes each, BonkArena rules version {game.RULES_VERSION}"
  if _CHECKPOINT.value:
    trainer, runner = run_lib.restore_trained(_CHECKPOINT.value)
    if trainer.cfg.bridge.enabled:
      return evaluate_bridge_run(trainer, runner)
    if trainer.cfg.env.name != "bonk_arena":
      raise app.UsageError(f"{_CHECKPOINT.value} trained on {trainer.cfg.env.name!r}")
    kwargs = trainer.cfg.env.kwargs.to_dict()
    agent, aux = jax.device_get((runner.agent, runner.aux))
    policies["trained"] = evaluate.trained_policy(trainer, agent, aux, _DETERMINISTIC.value)
    header += f", update {int(runner.update_step)} of {_CHECKPOINT.value}"
  env = BonkArena(**kwargs)
  params = env.default_params()
  if env.observation == "vector":
    policies["scripted"] = make_scripted_policy(env)
  policies["random"] = random_policy
  policies["idle"] = idle_menu_policy
  results = evaluate_policies(env, params, policies, jax.random.PRNGKey(_SEED.value),
                              _EPISODES.value)
  print(header)
  print("reward terms: mean per-episode contribution (weight × summed term)")
  print(format_table(results, params))


if __name__ == "__main__":
  cli.run(main)
