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
per tensor (upstream) or over the whole task vector (`scope="global"`, as the paper's
flattened-vector formulation), and λ defaults to 1.

Tie rules (the paper leaves both open; ours are deterministic and permutation-invariant):
- Trim: keep m = ⌈k·n⌉ entries (at least one) of n; the threshold is the m-th largest
  magnitude and *every* entry at least that large is kept, so magnitudes tied at the
  threshold are all kept (possibly more than m) rather than split by memory order.
- Elect: a coordinate whose vote sums to exactly zero (equal mass, or equal counts) has no
  elected sign and merges to 0, as upstream's count vote does.
- Disjoint mean: an entry agrees when its sign equals the elected sign, so trimmed zeros
  never count; a coordinate where nothing agrees merges to 0.

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


def _keep_count(k: float, n: int) -> int:
  if not 0.0 < k <= 1.0:
    raise ValueError(f"trim fraction k must be in (0, 1], got {k}")
  return min(n, max(1, math.ceil(k * n)))


def _threshold(magnitudes: jax.Array, k: float) -> jax.Array:
  """The m-th largest of a flat array of magnitudes, m = ⌈k·n⌉."""
  m = _keep_count(k, magnitudes.size)
  return jnp.sort(magnitudes)[magnitudes.size - m]


def trim(vector: PyTree, k: float, scope: str = "tensor") -> PyTree:
  """Keeps each tensor's (scope="tensor") or the whole vector's (scope="global") top-k
  fraction of entries by magnitude and zeroes the rest; ties at the threshold are kept."""
  if scope == "tensor":
    return jax.tree.map(
        lambda x: jnp.where(jnp.abs(x) >= _threshold(jnp.abs(x).ravel(), k), x, 0), vector)
  if scope == "global":
    leaves = jax.tree.leaves(vector)
    if not leaves:
      return vector
    flat = jnp.concatenate([jnp.abs(x).ravel().astype(jnp.float32) for x in leaves])
    cut = _threshold(flat, k)
    return jax.tree.map(lambda x: jnp.where(jnp.abs(x).astype(jnp.float32) >= cut, x, 0),
                        vector)
  raise ValueError(f"trim scope must be 'tensor' or 'global', got {scope!r}")


def elect_sign(stacked: jax.Array, vote: str = "mass") -> jax.Array:
  """Per-coordinate sign in {−1, 0, +1} of trimmed vectors stacked [N, ...]: the sign of the
  summed values (vote="mass", the paper) or of the summed signs (vote="count", upstream)."""
  if vote == "mass":
    return jnp.sign(jnp.sum(stacked, axis=0))
  if vote == "count":
    return jnp.sign(jnp.sum(jnp.sign(stacked), axis=0))
  raise ValueError(f"vote must be 'mass' or 'count', got {vote!r}")


def disjoint_mean(stacked: jax.Array, sign: jax.Array) -> jax.Array:
  """Mean over the entries whose sign equals the elected one; 0 where none does."""
  chex.assert_equal_shape([stacked[0], sign])
  agree = (jnp.sign(stacked) == sign[None]) & (sign[None] != 0)
  count = jnp.sum(agree, axis=0)
  total = jnp.sum(jnp.where(agree, stacked, 0), axis=0)
  return jnp.where(count > 0, total / jnp.maximum(count, 1).astype(stacked.dtype), 0)


def ties_merge(vectors: Sequence[PyTree], k: float = 0.2, lam: float = 1.0,
               vote: str = "mass", scope: str = "tensor") -> PyTree:
  """TIES-Merging (Yadav et al. 2023): trim to top-k, elect sign, disjoint mean, scale by λ.
  `vote="count"` with `scope="tensor"` and `lam=1` reproduces upstream's TIESMerger."""
  trimmed = _stack([trim(v, k, scope) for v in vectors])
  return jax.tree.map(lambda x: lam * disjoint_mean(x, elect_sign(x, vote)), trimmed)


def merge(vectors: Sequence[PyTree], method: str, *, lam: float = 1.0, k: float = 0.2,
          scope: str = "tensor", weights=None) -> PyTree:
  """One entry point by name: "mean", "task_arithmetic", "ties" (mass vote) or
  "ties_count" (upstream's count vote)."""
  if method == "mean":
    return mean_merge(vectors, weights)
  if method == "task_arithmetic":
    return task_arithmetic(vectors, lam, weights)
  if method in ("ties", "ties_count"):
    if weights is not None:
      raise ValueError("TIES takes no per-vector weights; scale the task vectors instead")
    return ties_merge(vectors, k, lam, "mass" if method == "ties" else "count", scope)
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
