"""Keeping non-finite numbers out of a learner's state, inside the jitted update.

`guard` compares an update's inputs and results with what a sound update has: finite
observations and rewards in the rollout, a finite loss and gradient norm, finite new
parameters (and optimiser and auxiliary states). When any is not, the update is skipped —
the previous state is kept — and the metrics say so and why (`nonfinite/<cause>`, 1 for the
causes found), so the driver loop can count skipped updates and stop a run that keeps
producing them (`mbjax.train.loop`).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# What can be non-finite, in the order a fault propagates (the first is the likely source).
CAUSES = ("obs", "reward", "loss", "grads", "params")
SKIPPED = "nonfinite/skipped"


def all_finite(tree: Any) -> jax.Array:
  """bool[]: every floating-point leaf of `tree` is finite (integer leaves always are)."""
  checks = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
  return jnp.all(jnp.stack(checks)) if checks else jnp.bool_(True)


def host_all_finite(tree: Any) -> bool:
  """`all_finite` on host values (numpy), for a check outside jit."""
  return all(np.isfinite(x).all() for x in jax.tree.leaves(tree)
             if np.issubdtype(np.asarray(x).dtype, np.inexact))


def guard(old: Any, new: Any, obs: jax.Array, reward: jax.Array, metrics: dict,
          axis_name: str | None = None) -> tuple[Any, dict]:
  """(`new` or, if the update was not sound, `old`; `metrics` with the `nonfinite/*` flags).

  `obs` and `reward` are the rollout's (this device's slice when sharded), `metrics` the
  update's: every entry named "*loss*" or "*grad_norm" is checked. Under `shard_map` the flags are
  combined over `axis_name`, so every device keeps or skips alike."""
  # Every learner's losses and gradient norms (PPO's "loss/*", the world model's "wm/loss",
  # the latent actor-critic's "dream/actor_loss", their "*grad_norm").
  losses = [v for k, v in metrics.items() if "loss" in k]
  grads = [v for k, v in metrics.items() if k.endswith("grad_norm")]
  found = jnp.stack([~all_finite(obs), ~all_finite(reward), ~all_finite(losses),
                     ~all_finite(grads), ~all_finite(new)])
  if axis_name is not None:
    found = jax.lax.pmax(found.astype(jnp.int32), axis_name) > 0
  skipped = found.any()
  # One branch for the whole state (compiles faster than a select per leaf; vmapped, as
  # in the population, it becomes the select).
  state = jax.lax.cond(skipped, lambda: old, lambda: new)
  flags = {f"nonfinite/{cause}": found[i].astype(jnp.float32) for i, cause in enumerate(CAUSES)}
  return state, {**metrics, **flags, SKIPPED: skipped.astype(jnp.float32)}
