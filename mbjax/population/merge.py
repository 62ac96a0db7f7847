"""Task vectors, model merges and merge gating over parameter pytrees.

Owns the pure arithmetic of the seed's federated / population paradigm: a task vector is
τ = θ_finetuned − θ_base (Ilharco et al. 2023, "Editing Models with Task Arithmetic"), and
a merge turns N task vectors of specialists fine-tuned from one base into one vector that
is added back to the base:

- `mean_merge`: (Σ wᵢ τᵢ) / Σ wᵢ (uniform weights: the plain mean; upstream's "weighted").
- `task_arithmetic`: λ Σ wᵢ τᵢ (Ilharco et al. 2023).
- `ties_merge`: TIES-Merging (Yadav et al. 2023, "TIES-Merging: Resolving Interference When
  Merging Models"): trim each τᵢ to its top-k fraction by magnitude, elect a sign per
  coordinate, take the disjoint mean over the entries that agree with it, scale by λ.

The paper elects γᵖ = sign(Σᵢ τ̂ᵢᵖ) — the sign with the larger total *mass* (`vote="mass"`).
Upstream MetaBonk (`TIESMerger`) elects γᵖ = sign(Σᵢ sign(τ̂ᵢᵖ)) — a *count* majority in
which a tiny update outvotes a large one as easily as any other (`vote="count"`). The two
differ exactly where the many agree in direction but the few are larger: for the entries
[0.1, 0.1, −1.0] the mass vote elects − and merges to −1.0, the count vote elects + and
merges to 0.1. Upstream also trims per tensor only and never scales by λ; here trimming is
per tensor (`scope="tensor"`, upstream and mergekit) or over the whole task vector
(`scope="global"`, the paper's flattened vector and the TIES authors' code), and λ defaults
to 1.

The paper leaves two tie rules open, and the reference implementations fill them
differently; each is an argument here (`trim_rule`, `sign_tie`):

- How many entries the trim keeps of n, with k·n taken exactly (k as written in decimal,
  so 0.3·10 is 3, not the float 3.0000000000000004), and never fewer than one:
  - `"ceil"` (default): m = ⌈k·n⌉; the threshold is the m-th largest magnitude and every
    entry at least that large is kept, so ties at the threshold may keep more than m.
  - `"floor_plus_one"`: m = ⌊k·n⌋ + 1, ties at the threshold kept: the TIES authors'
    `topk_values_mask` (github.com/prateeky2806/ties-merging).
  - `"floor_first"`: exactly m = ⌊k·n⌋, ties at the threshold going to the lowest flat
    index: mergekit's magnitude sparsification (`sparsify.magnitude`; it refuses m = 0).
- What a coordinate whose vote sums to exactly zero (equal mass, equal counts, or nothing
  left after the trim) elects:
  - `"zero"` (default): no sign; the coordinate merges to 0, as upstream's count vote does.
  - `"majority"`: the sign of the sum of the elected signs over the whole task vector (the
    authors' `resolve_zero_signs`); where that sum is 0 too the coordinate stays at 0 (the
    authors' code would then average its negative entries).
  - `"positive"`: + (mergekit's `get_mask`, `sign_weight >= 0`).
  Then the disjoint mean: an entry agrees when its sign equals the elected sign, so trimmed
  zeros never count; a coordinate where nothing agrees merges to 0.

So `scope="global", trim_rule="floor_plus_one", sign_tie="majority"` is the authors' code and
`scope="tensor", trim_rule="floor_first", sign_tie="positive"` is mergekit's `ties` (with
`vote="mass"` its default consensus "sum", with `vote="count"` its "count");
`tests/test_parity.py` checks both against
outputs of their code. The defaults are kept for three properties the alternatives lack: the
merge does not depend on the order of the parameters in memory (`"floor_first"` does, at
threshold ties); a zero-sum coordinate is not decided by the rest of the vector (as with
`"majority"`); and negating every task vector negates the merge (`"positive"` favours +).
Of the counts that keep threshold ties, ⌈k·n⌉ keeps exactly k·n entries when that is whole,
where ⌊k·n⌋ + 1 keeps one more than asked.

Gating (the architecture note's open question "what metrics should gate merging vs keeping
specialists apart"): per pair of task vectors, the cosine similarity and the sign-conflict
rate over coordinates where both are non-zero (upstream reports the complementary "sign
agreement"), and a rule that picks which specialists to merge. Upstream gates all-or-nothing
(HTTP 409 when any pair fails); `GatingRule(mode="greedy")` instead keeps the largest
mutually compatible group it finds and leaves the rest apart.

Every function here is pure: no I/O, pytrees in and out. The array functions jit.
"""
from __future__ import annotations

import dataclasses
import fractions
import math
from typing import Any, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


def task_vector(finetuned: PyTree, base: PyTree) -> PyTree:
  """τ = θ_finetuned − θ_base, leaf by leaf (same structure and shapes required)."""
  chex.assert_trees_all_equal_shapes_and_dtypes(finetuned, base)
  return jax.tree.map(jnp.subtract, finetuned, base)


def apply_task_vector(base: PyTree, vector: PyTree, scale: float = 1.0) -> PyTree:
  """θ = θ_base + scale·τ, cast back to each base leaf's dtype."""
  chex.assert_trees_all_equal_shapes(base, vector)
  return jax.tree.map(lambda b, t: (b + scale * t).astype(b.dtype), base, vector)


def _stack(vectors: Sequence[PyTree]) -> PyTree:
  """[N, ...] leaves from N task vectors of one structure."""
  if len(vectors) == 0:
    raise ValueError("a merge needs at least one task vector")
  chex.assert_trees_all_equal_shapes(*vectors)
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *vectors)


def _weights(weights, n: int) -> jax.Array:
  if weights is None:
    return jnp.ones((n,), jnp.float32)
  weights = jnp.asarray(weights, jnp.float32)
  chex.assert_shape(weights, (n,))
  return weights


def _weighted_sum(stacked: PyTree, weights: jax.Array) -> PyTree:
  return jax.tree.map(lambda x: jnp.tensordot(weights.astype(x.dtype), x, axes=1), stacked)


def mean_merge(vectors: Sequence[PyTree], weights=None) -> PyTree:
  """(Σ wᵢ τᵢ) / Σ wᵢ; uniform weights give the plain mean. Upstream's "weighted" merge."""
  w = _weights(weights, len(vectors))
  total = _weighted_sum(_stack(vectors), w)
  return jax.tree.map(lambda x: x / jnp.sum(w).astype(x.dtype), total)


def task_arithmetic(vectors: Sequence[PyTree], lam: float = 1.0, weights=None) -> PyTree:
  """λ Σ wᵢ τᵢ (Ilharco et al. 2023); the sum, not the mean, so λ ≈ 1/N recovers the mean."""
  total = _weighted_sum(_stack(vectors), _weights(weights, len(vectors)))
  return jax.tree.map(lambda x: lam * x, total)


TRIM_RULES = ("ceil", "floor_plus_one", "floor_first")
SIGN_TIES = ("zero", "majority", "positive")


def _keep_count(k: float, n: int, rule: str) -> int:
  """How many of n entries the trim keeps (module docstring), from k·n taken exactly."""
  if not 0.0 < k <= 1.0:
    raise ValueError(f"trim fraction k must be in (0, 1], got {k}")
  kn = fractions.Fraction(repr(float(k))) * n
  if rule == "ceil":
    m = math.ceil(kn)
  elif rule == "floor_plus_one":
    m = math.floor(kn) + 1
  elif rule == "floor_first":
    m = math.floor(kn)
  else:
    raise ValueError(f"trim_rule must be one of {TRIM_RULES}, got {rule!r}")
  return min(n, max(1, m))


def _keep_mask(magnitudes: jax.Array, k: float, rule: str) -> jax.Array:
  """bool mask of the entries of a flat array of magnitudes that the trim keeps."""
  n = magnitudes.size
  m = _keep_count(k, n, rule)
  if rule == "floor_first":
    # A stable sort of −|x| puts equal magnitudes in index order, so the first m win.
    order = jnp.argsort(-magnitudes, stable=True)
    return jnp.zeros((n,), bool).at[order[:m]].set(True)
  return magnitudes >= jnp.sort(magnitudes)[n - m]


def trim(vector: PyTree, k: float, scope: str = "tensor", trim_rule: str = "ceil") -> PyTree:
  """Keeps each tensor's (scope="tensor") or the whole vector's (scope="global") top-k
  fraction of entries by magnitude and zeroes the rest; `trim_rule` says how many and what
  happens to ties at the threshold (module docstring)."""
  if scope == "tensor":
    return jax.tree.map(lambda x: jnp.where(
        _keep_mask(jnp.abs(x).ravel(), k, trim_rule).reshape(x.shape), x, 0), vector)
  if scope == "global":
    leaves, tree = jax.tree.flatten(vector)
    if not leaves:
      return vector
    flat = jnp.concatenate([jnp.abs(x).ravel().astype(jnp.float32) for x in leaves])
    keep = jnp.split(_keep_mask(flat, k, trim_rule), np.cumsum([x.size for x in leaves])[:-1])
    return jax.tree.unflatten(tree, [jnp.where(kept.reshape(x.shape), x, 0)
                                     for x, kept in zip(leaves, keep)])
  raise ValueError(f"trim scope must be 'tensor' or 'global', got {scope!r}")


def elect_sign(stacked: jax.Array, vote: str = "mass") -> jax.Array:
  """Per-coordinate sign in {−1, 0, +1} of trimmed vectors stacked [N, ...]: the sign of the
  summed values (vote="mass", the paper) or of the summed signs (vote="count", upstream)."""
  if vote == "mass":
    return jnp.sign(jnp.sum(stacked, axis=0))
  if vote == "count":
    return jnp.sign(jnp.sum(jnp.sign(stacked), axis=0))
  raise ValueError(f"vote must be 'mass' or 'count', got {vote!r}")


def resolve_sign_ties(signs: PyTree, sign_tie: str = "zero") -> PyTree:
  """Elected signs (a pytree of {−1, 0, +1}) with the zeros resolved by `sign_tie`."""
  if sign_tie == "zero":
    return signs
  if sign_tie == "positive":
    fill = 1.0
  elif sign_tie == "majority":
    # Integer counts: a float32 sum of ±1 stops being exact past 2²⁴ coordinates.
    fill = jnp.sign(sum(jnp.sum(s.astype(jnp.int32)) for s in jax.tree.leaves(signs)))
  else:
    raise ValueError(f"sign_tie must be one of {SIGN_TIES}, got {sign_tie!r}")
  return jax.tree.map(lambda s: jnp.where(s == 0, fill, s).astype(s.dtype), signs)


def disjoint_mean(stacked: jax.Array, sign: jax.Array) -> jax.Array:
  """Mean over the entries whose sign equals the elected one; 0 where none does."""
  chex.assert_equal_shape([stacked[0], sign])
  agree = (jnp.sign(stacked) == sign[None]) & (sign[None] != 0)
  count = jnp.sum(agree, axis=0)
  total = jnp.sum(jnp.where(agree, stacked, 0), axis=0)
  return jnp.where(count > 0, total / jnp.maximum(count, 1).astype(stacked.dtype), 0)


def ties_merge(vectors: Sequence[PyTree], k: float = 0.2, lam: float = 1.0,
               vote: str = "mass", scope: str = "tensor", trim_rule: str = "ceil",
               sign_tie: str = "zero") -> PyTree:
  """TIES-Merging (Yadav et al. 2023): trim to top-k, elect sign, disjoint mean, scale by λ.
  `vote="count"` with `scope="tensor"` and `lam=1` reproduces upstream's TIESMerger; the
  module docstring gives the settings of the authors' code and of mergekit."""
  trimmed = _stack([trim(v, k, scope, trim_rule) for v in vectors])
  signs = resolve_sign_ties(jax.tree.map(lambda x: elect_sign(x, vote), trimmed), sign_tie)
  return jax.tree.map(lambda x, s: lam * disjoint_mean(x, s), trimmed, signs)


def merge(vectors: Sequence[PyTree], method: str, *, lam: float = 1.0, k: float = 0.2,
          scope: str = "tensor", trim_rule: str = "ceil", sign_tie: str = "zero",
          weights=None) -> PyTree:
  """One entry point by name: "mean", "task_arithmetic", "ties" (mass vote) or
  "ties_count" (upstream's count vote)."""
  if method == "mean":
    return mean_merge(vectors, weights)
  if method == "task_arithmetic":
    return task_arithmetic(vectors, lam, weights)
  if method in ("ties", "ties_count"):
    if weights is not None:
      raise ValueError("TIES takes no per-vector weights; scale the task vectors instead")
    return ties_merge(vectors, k, lam, "mass" if method == "ties" else "count", scope,
                      trim_rule, sign_tie)
  raise ValueError(f"unknown merge method {method!r}")


METHODS = ("mean", "task_arithmetic", "ties", "ties_count")


# ---------------------------------------------------------------------------------------
# Gating


def _flat(vector: PyTree) -> jax.Array:
  leaves = jax.tree.leaves(vector)
  return jnp.concatenate([jnp.ravel(x).astype(jnp.float32) for x in leaves])


@chex.dataclass(frozen=True)
class PairStatistics:
  """Pairwise statistics of N task vectors, each [N, N] (symmetric)."""

  cosine: jax.Array  # ⟨τᵢ, τⱼ⟩ / (‖τᵢ‖‖τⱼ‖); 0 when either vector is all zeros
  sign_conflict: jax.Array  # share of co-non-zero coordinates with opposite signs; 0 if none
  co_nonzero: jax.Array  # how many coordinates are non-zero in both


def pair_statistics(vectors: Sequence[PyTree]) -> PairStatistics:
  """Cosine similarity and sign-conflict rate for every pair of task vectors."""
  chex.assert_trees_all_equal_shapes(*vectors)
  flat = jnp.stack([_flat(v) for v in vectors])  # [N, D]
  norms = jnp.linalg.norm(flat, axis=1)
  dots = flat @ flat.T
  denom = norms[:, None] * norms[None, :]
  cosine = jnp.where(denom > 0, dots / jnp.where(denom > 0, denom, 1), 0.0)
  # Integer counts: float32 sums stop being exact past 2²⁴ coordinates.
  signs = jnp.sign(flat).astype(jnp.int32)
  nonzero = jnp.abs(signs)
  co_nonzero = nonzero @ nonzero.T
  # For co-non-zero entries sᵢsⱼ = −1 exactly when the signs differ.
  conflicts = (co_nonzero - signs @ signs.T) // 2
  sign_conflict = jnp.where(co_nonzero > 0, conflicts / jnp.maximum(co_nonzero, 1), 0.0)
  return PairStatistics(cosine=cosine, sign_conflict=sign_conflict.astype(jnp.float32),
                        co_nonzero=co_nonzero)


@dataclasses.dataclass(frozen=True)
class GatingRule:
  """Which pairs are compatible, and how to turn compatible pairs into one merge group.

  A pair is compatible when cosine ≥ min_cosine and sign_conflict ≤ max_sign_conflict.
  mode="all": merge everyone if every pair is compatible, else no one (upstream's gate).
  mode="greedy": visit specialists by number of compatible partners (most first, then by
  index) and add each one compatible with everyone already added; the others stay apart.
  """

  min_cosine: float = 0.0
  max_sign_conflict: float = 1.0
  mode: str = "greedy"


def gate(stats: PairStatistics, rule: GatingRule) -> np.ndarray:
  """Boolean [N]: True for the specialists to merge, False for those kept apart. A group of
  fewer than two is no merge, so it comes back all False."""
  cosine = np.asarray(stats.cosine)
  conflict = np.asarray(stats.sign_conflict)
  n = cosine.shape[0]
  chex.assert_shape([cosine, conflict], (n, n))
  ok = (cosine >= rule.min_cosine) & (conflict <= rule.max_sign_conflict)
  np.fill_diagonal(ok, True)
  if rule.mode == "all":
    chosen = np.full((n,), bool(ok.all()))
  elif rule.mode == "greedy":
    order = sorted(range(n), key=lambda i: (-int(ok[i].sum()), i))
    chosen = np.zeros((n,), bool)
    for i in order:
      if ok[i, chosen].all():
        chosen[i] = True
  else:
    raise ValueError(f"gating mode must be 'all' or 'greedy', got {rule.mode!r}")
  return chosen if chosen.sum() >= 2 else np.zeros((n,), bool)
