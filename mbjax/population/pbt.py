"""Population-based training (Jaderberg et al. 2017, "Population Based Training of Neural
Networks"): exploit and explore over a stacked population.

A population is any pytree whose leaves carry a leading member axis [P, ...] — what
`jax.vmap` of an init function returns (e.g. a stacked `ppo.PPOState`: parameters,
optimiser state, observation statistics). Hyperparameters are a dict name → [P] array:
floats as floats, integers as an integer dtype, categorical choices as the int32 index into
the declared `choices`, so that the whole population state stays one jittable pytree.

- `exploit` (truncation selection): rank members by the mean of their multi-episode
  evaluation returns; each member of the bottom fraction copies everything — parameters,
  optimiser state, and whatever else the pytree holds — from a member of the top fraction
  drawn uniformly at random. `step` copies the hyperparameters with the same draw.
- `explore` (perturb / resample): multiply numeric hyperparameters by a factor drawn from
  `factors` (the paper's 0.8 or 1.2), round integers back to integers, clamp to the declared
  range; resample categorical choices uniformly with probability `resample_prob`.

Upstream MetaBonk's live PBT (`pbt_manager.py`) copies hyperparameters only — weights are
never copied — ranks on the last single-step reward unless an eval ladder is switched on,
multiplies every hyperparameter by U[0.8, 1.2] so that integers and booleans become floats,
and has no ranges. Here exploit copies the full member state, ranking is always on
evaluation episodes, and explore keeps types and ranges.

Ranking ties are broken by member index (the lower index ranks lower), so a step is a pure
function of its key and inputs. Everything here is pure and jits (specs and fractions are
static).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


@dataclasses.dataclass(frozen=True)
class HParam:
  """One hyperparameter's type and range.

  kind "float" or "int": perturbed by factors and clamped to [low, high].
  kind "categorical": an index into `choices`, resampled uniformly.
  """

  kind: str
  low: float | None = None
  high: float | None = None
  choices: tuple = ()

  def __post_init__(self):
    if self.kind in ("float", "int"):
      if self.low is None or self.high is None or self.low > self.high:
        raise ValueError(f"{self.kind} hyperparameter needs low <= high, got {self}")
    elif self.kind == "categorical":
      if not self.choices:
        raise ValueError("categorical hyperparameter needs choices")
    else:
      raise ValueError(f"kind must be 'float', 'int' or 'categorical', got {self.kind!r}")


Specs = Mapping[str, HParam]


def population_size(population: PyTree) -> int:
  leaves = jax.tree.leaves(population)
  if not leaves:
    raise ValueError("empty population pytree")
  size = leaves[0].shape[0]
  chex.assert_tree_shape_prefix(population, (size,))
  return size


def member_scores(returns: jax.Array, episode_mask: jax.Array | None = None) -> jax.Array:
  """Mean evaluation return per member from returns [P, E] (E episodes each); with
  `episode_mask` [P, E] only the True episodes count (a member with none scores −inf)."""
  chex.assert_rank(returns, 2)
  returns = returns.astype(jnp.float32)
  if episode_mask is None:
    return jnp.mean(returns, axis=1)
  chex.assert_equal_shape([returns, episode_mask])
  count = jnp.sum(episode_mask, axis=1)
  total = jnp.sum(jnp.where(episode_mask, returns, 0.0), axis=1)
  return jnp.where(count > 0, total / jnp.maximum(count, 1), -jnp.inf)


def truncation_count(size: int, fraction: float) -> int:
  """How many members are replaced (and how many are eligible donors): ⌈fraction·P⌉."""
  n = math.ceil(fraction * size)
  if not 0.0 < fraction <= 0.5 or size < 2 or 2 * n > size:
    raise ValueError(f"need 0 < fraction <= 0.5 and 2·⌈fraction·P⌉ <= P; got fraction "
                     f"{fraction}, P={size}")
  return n


def exploit(key: jax.Array, population: PyTree, returns: jax.Array, fraction: float = 0.2,
            episode_mask: jax.Array | None = None):
  """Truncation selection. Returns (population, source, replaced): `source[i]` is the
  member whose state member i now holds (i itself unless replaced), `replaced` [P] bool."""
  size = population_size(population)
  chex.assert_shape(returns, (size, None))
  n = truncation_count(size, fraction)
  # Stable argsort of the scores: ties keep index order, so the lower index ranks lower.
  order = jnp.argsort(member_scores(returns, episode_mask), stable=True)
  bottom, top = order[:n], order[size - n:]
  donors = top[jax.random.randint(key, (n,), 0, n)]
  source = jnp.arange(size).at[bottom].set(donors)
  replaced = jnp.zeros((size,), bool).at[bottom].set(True)
  return jax.tree.map(lambda x: x[source], population), source, replaced


def explore(key: jax.Array, hparams: Mapping[str, jax.Array], specs: Specs,
            mask: jax.Array | None = None, factors: Sequence[float] = (0.8, 1.2),
            resample_prob: float = 0.25) -> dict:
  """Perturbs the members where `mask` [P] is True (all if None); dtypes are kept."""
  if set(hparams) != set(specs):
    raise ValueError(f"hparams {sorted(hparams)} do not match specs {sorted(specs)}")
  size = population_size(dict(hparams))
  mask = jnp.ones((size,), bool) if mask is None else mask
  chex.assert_shape(mask, (size,))
  factors = jnp.asarray(factors, jnp.float32)
  out = {}
  for name, key_i in zip(sorted(specs), jax.random.split(key, len(specs))):
    spec, value = specs[name], hparams[name]
    chex.assert_shape(value, (size,))
    if spec.kind == "categorical":
      if not jnp.issubdtype(value.dtype, jnp.integer):
        raise TypeError(f"categorical {name!r} must be stored as an integer index")
      draw_key, pick_key = jax.random.split(key_i)
      resample = jax.random.bernoulli(draw_key, resample_prob, (size,))
      new = jnp.where(resample, jax.random.randint(pick_key, (size,), 0, len(spec.choices)),
                      value).astype(value.dtype)
    else:
      factor = factors[jax.random.randint(key_i, (size,), 0, factors.shape[0])]
      scaled = value.astype(jnp.float32) * factor
      if spec.kind == "int":
        if not jnp.issubdtype(value.dtype, jnp.integer):
          raise TypeError(f"int hyperparameter {name!r} is stored as {value.dtype}")
        # Clamp to the integers inside [low, high] so rounding cannot leave the range.
        scaled = jnp.clip(jnp.round(scaled), math.ceil(spec.low), math.floor(spec.high))
      else:
        scaled = jnp.clip(scaled, spec.low, spec.high)
      new = scaled.astype(value.dtype)
    out[name] = jnp.where(mask, new, value)
  return out


def step(key: jax.Array, population: PyTree, hparams: Mapping[str, jax.Array],
         returns: jax.Array, specs: Specs, fraction: float = 0.2,
         factors: Sequence[float] = (0.8, 1.2), resample_prob: float = 0.25,
         episode_mask: jax.Array | None = None):
  """One PBT round: exploit (state and hyperparameters from the same donor), then explore
  the replaced members' hyperparameters. Returns (population, hparams, source, replaced)."""
  exploit_key, explore_key = jax.random.split(key)
  (population, hparams), source, replaced = exploit(
      exploit_key, (population, dict(hparams)), returns, fraction, episode_mask)
  hparams = explore(explore_key, hparams, specs, replaced, factors, resample_prob)
  return population, hparams, source, replaced


def stack_hparams(members: Sequence[Mapping[str, Any]], specs: Specs) -> dict:
  """Python dicts of hyperparameters, one per member → dict of [P] arrays (float32, int32,
  or int32 choice indices), checked against the declared types and ranges."""
  out = {}
  for name, spec in specs.items():
    values = [m[name] for m in members]
    if spec.kind == "categorical":
      out[name] = jnp.asarray([spec.choices.index(v) for v in values], jnp.int32)
      continue
    for v in values:
      if spec.kind == "int" and (isinstance(v, bool) or not isinstance(v, (int, np.integer))):
        raise TypeError(f"{name!r} is declared int, got {v!r}")
      if not spec.low <= v <= spec.high:
        raise ValueError(f"{name!r}={v!r} outside [{spec.low}, {spec.high}]")
    out[name] = jnp.asarray(values, jnp.int32 if spec.kind == "int" else jnp.float32)
  return out


def member_hparams(hparams: Mapping[str, jax.Array], specs: Specs, index: int) -> dict:
  """Member `index`'s hyperparameters as Python values: int, float or the chosen item."""
  out = {}
  for name, spec in specs.items():
    value = np.asarray(hparams[name])[index]
    if spec.kind == "categorical":
      out[name] = spec.choices[int(value)]
    elif spec.kind == "int":
      out[name] = int(value)
    else:
      out[name] = float(value)
  return out
