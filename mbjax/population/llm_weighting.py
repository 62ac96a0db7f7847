"""LLM-assisted weights for merges and skill scaling: prompts, reply schemas, parsing, fallbacks.

Two kinds of weights, one per specialist (or skill) name:
- **Merge weights** (`merge_request`): relative shares wᵢ ≥ 0 with Σ wᵢ = 1 of each
  specialist's task vector in a merge. The prompt gives the model each specialist's evaluated
  return on every role reward, the task-vector norms and the pairwise cosine similarity and
  sign-conflict rate (`merge.pair_statistics`). `weighted_merge` feeds them to any merge
  method as N·wᵢ, so uniform shares reproduce the unweighted merge *exactly* for every method
  (mean, task arithmetic, TIES). TIES takes no weights (`merge.merge` refuses them), so there
  each task vector is scaled by N·wᵢ before trimming — upstream passed LLM weights only to
  its weighted mean, so with its default TIES merge they had no effect
  (`upstream_runtime.md` §6.3).
- **Skill scales** (`skill_request`): per-skill factors sᵢ in [0, 2] (upstream's range) with
  which skill task vectors are composed at run time, θ = θ_base + Σ sᵢ τᵢ (`compose_skills`);
  not normalised, since "use less of every skill" is a meaningful answer.

The reply schema (`weights_schema`) is `{"weights": {name: number in [low, high]}, "rationale":
str}` with every name required and no others allowed, so a reply that drops or invents a
specialist is invalid rather than silently defaulted (upstream filled missing names with 1).
A valid merge reply whose weights are all zero cannot be normalised and is invalid too.

The deterministic fallbacks, used until a valid reply arrives and whenever the backend is
absent, slow or wrong: uniform merge shares, or (`fallback_merge_weights(returns)`) a
softmax over each specialist's mean standardised return across roles; skill scales of 1.

Everything here is pure: no I/O. Asking the backend without blocking is
`mbjax.runtime.weighting.AsyncWeights`.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Sequence

import chex
import jax
import numpy as np

from mbjax.population import merge as merge_lib

PyTree = Any

MERGE_RANGE = (0.0, 1.0)
SKILL_RANGE = (0.0, 2.0)
RATIONALE_CHARS = 2000


@dataclasses.dataclass(frozen=True)
class WeightRequest:
  """Everything needed to ask for one set of weights and to interpret the answer."""

  kind: str  # "merge" (normalised shares) or "skill" (scales)
  names: tuple[str, ...]
  low: float
  high: float
  normalise: bool  # merge shares are divided by their sum
  fallback: np.ndarray  # f32[N], used until a valid reply arrives
  messages: tuple[dict, ...]
  schema: dict


def _check_names(names: Sequence[str]) -> tuple[str, ...]:
  names = tuple(str(n) for n in names)
  if not names:
    raise ValueError("weights need at least one name")
  if len(set(names)) != len(names) or any(not n for n in names):
    raise ValueError(f"names {list(names)}: expected distinct non-empty names")
  return names


def weights_schema(names: Sequence[str], low: float, high: float) -> dict:
  """JSON schema of a reply: every name's weight in [low, high], plus a short rationale."""
  names = _check_names(names)
  if not low < high:
    raise ValueError(f"weight range [{low}, {high}]: expected low < high")
  return {
      "type": "object",
      "properties": {
          "weights": {
              "type": "object",
              "properties": {n: {"type": "number", "minimum": low, "maximum": high}
                             for n in names},
              "required": list(names),
              "additionalProperties": False,
          },
          "rationale": {"type": "string", "maxLength": RATIONALE_CHARS},
      },
      "required": ["weights"],
      "additionalProperties": False,
  }


def parse_weights(reply: dict, names: Sequence[str], low: float, high: float,
                  normalise: bool) -> np.ndarray:
  """f32[N] in `names` order from a reply of `weights_schema`'s shape; normalised to sum 1
  when asked. Raises ValueError naming what is wrong (missing name, out of range, all zero)."""
  names = _check_names(names)
  weights = reply.get("weights") if isinstance(reply, dict) else None
  if not isinstance(weights, dict):
    raise ValueError(f"reply {reply!r}: expected an object with a 'weights' object")
  missing = [n for n in names if n not in weights]
  if missing:
    raise ValueError(f"reply weights lack {missing}")
  values = []
  for n in names:
    w = weights[n]
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not np.isfinite(w):
      raise ValueError(f"weight of {n!r} is {w!r}: expected a finite number")
    if not low <= w <= high:
      raise ValueError(f"weight of {n!r} is {w}: expected within [{low}, {high}]")
    values.append(float(w))
  out = np.asarray(values, np.float64)
  if normalise:
    total = out.sum()
    if total <= 0:
      raise ValueError(f"all weights are zero for {list(names)}: cannot normalise")
    out = out / total
  return out.astype(np.float32)


def fallback_merge_weights(n: int, returns: np.ndarray | None = None,
                           temperature: float = 1.0) -> np.ndarray:
  """f32[N] shares summing to 1: uniform, or with `returns` f32[N, R] (specialist i's mean
  evaluated return on role r) softmax(mean_r z_ir / temperature), where z standardises each
  role's column (mean 0, std 1; a constant column contributes 0)."""
  if returns is None:
    return np.full((n,), 1.0 / n, np.float32)
  returns = np.asarray(returns, np.float64)
  chex.assert_rank(returns, 2)
  if returns.shape[0] != n:
    raise ValueError(f"returns has {returns.shape[0]} rows: expected one per specialist ({n})")
  if not temperature > 0:
    raise ValueError(f"temperature={temperature}: expected > 0")
  std = returns.std(axis=0)
  z = np.where(std > 0, (returns - returns.mean(axis=0)) / np.where(std > 0, std, 1), 0.0)
  score = z.mean(axis=1) / temperature
  e = np.exp(score - score.max())
  return (e / e.sum()).astype(np.float32)


def role_returns_from_json(data: dict, names: Sequence[str]):
  """(roles, f32[N, R] returns in `names` order, f32[R] base returns or None) from
  `{"roles": [...], "returns": {name: [one per role]}, "base": [one per role]}`."""
  names = _check_names(names)
  roles = tuple(str(r) for r in data.get("roles", ()))
  table = data.get("returns", {})
  missing = [n for n in names if n not in table]
  if not roles or missing or any(len(table[n]) != len(roles) for n in names):
    raise ValueError(f"role returns {_short_json(data)}: expected 'roles' and, for each of "
                     f"{list(names)}, one return per role; missing {missing}")
  base = data.get("base")
  if base is not None and len(base) != len(roles):
    raise ValueError(f"role returns: 'base' has {len(base)} values for {len(roles)} roles")
  return (roles, np.asarray([table[n] for n in names], np.float64),
          None if base is None else np.asarray(base, np.float64))


def _short_json(data, limit: int = 200) -> str:
  text = json.dumps(data)
  return text if len(text) <= limit else text[:limit] + "…"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  lines = [" | ".join(header), " | ".join("---" for _ in header)]
  lines += [" | ".join(r) for r in rows]
  return "\n".join(lines)


_SYSTEM = ("You are a research engineer weighting reinforcement-learning policies. Answer with "
           "one JSON object only.")


def merge_request(names: Sequence[str], *, role_names: Sequence[str] = (),
                  returns: np.ndarray | None = None, base_returns: np.ndarray | None = None,
                  stats: merge_lib.PairStatistics | None = None,
                  norms: Sequence[float] | None = None, method: str = "ties",
                  goal: str = "a merged policy that does well on every role",
                  fallback: np.ndarray | None = None) -> WeightRequest:
  """Asks for merge shares of the specialists `names` (see the module docstring).

  Args:
    returns: f32[N, R] evaluated return of specialist i on role reward `role_names[r]`.
    base_returns: f32[R], the base policy's returns on the same roles.
    stats: pairwise statistics of the specialists' task vectors.
    norms: the task vectors' L2 norms.
    fallback: f32[N] shares to use until a valid reply arrives; default
      `fallback_merge_weights(N, returns)`.
  """
  names = _check_names(names)
  n = len(names)
  parts = [f"Goal: {goal}.",
           f"Merge method: {method} over the task vectors (fine-tuned minus base parameters) "
           f"of {n} specialists trained from one base policy."]
  if returns is not None:
    returns = np.asarray(returns, np.float64)
    role_names = tuple(role_names)
    chex.assert_shape(returns, (n, len(role_names)))
    rows = [[name] + [f"{v:.3f}" for v in row] for name, row in zip(names, returns)]
    if base_returns is not None:
      base_returns = np.asarray(base_returns, np.float64)
      chex.assert_shape(base_returns, (len(role_names),))
      rows.append(["(base)"] + [f"{v:.3f}" for v in base_returns])
    parts.append("Mean evaluated return of each policy under each role's reward (higher is "
                 "better):\n" + _table(["policy", *role_names], rows))
  if norms is not None:
    chex.assert_shape(np.asarray(norms), (n,))
    parts.append("Task-vector L2 norms: " + ", ".join(
        f"{name} {float(v):.4g}" for name, v in zip(names, norms)))
  if stats is not None:
    cosine, conflict = np.asarray(stats.cosine), np.asarray(stats.sign_conflict)
    chex.assert_shape([cosine, conflict], (n, n))
    pairs = [[f"{names[i]} × {names[j]}", f"{cosine[i, j]:+.3f}", f"{conflict[i, j]:.3f}"]
             for i in range(n) for j in range(i + 1, n)]
    if pairs:
      parts.append("Pairwise task-vector statistics (sign conflict = share of coordinates "
                   "both change where the signs differ):\n"
                   + _table(["pair", "cosine", "sign conflict"], pairs))
  parts.append(f"Give each specialist a weight in [{MERGE_RANGE[0]:g}, {MERGE_RANGE[1]:g}]: its "
               "share of the merge (weights are normalised to sum to 1; not all zero). Reply "
               'as {"weights": {' + ", ".join(f'"{m}": w' for m in names)
               + '}, "rationale": "one or two sentences"}.')
  fallback = (fallback_merge_weights(n, returns) if fallback is None
              else np.asarray(fallback, np.float32))
  chex.assert_shape(fallback, (n,))
  return WeightRequest("merge", names, *MERGE_RANGE, True, fallback,
                       ({"role": "system", "content": _SYSTEM},
                        {"role": "user", "content": "\n\n".join(parts)}),
                       weights_schema(names, *MERGE_RANGE))


def skill_request(names: Sequence[str], context: str, *,
                  descriptions: Sequence[str] | None = None,
                  fallback: np.ndarray | None = None) -> WeightRequest:
  """Asks for run-time scales of skill task vectors given the current `context` (e.g. the
  directive and game state); the fallback is 1 for every skill (the plain sum)."""
  names = _check_names(names)
  n = len(names)
  if descriptions is not None and len(descriptions) != n:
    raise ValueError(f"{len(descriptions)} descriptions for {n} skills")
  listing = ([f"- {name}: {d}" for name, d in zip(names, descriptions)]
             if descriptions is not None else [f"- {name}" for name in names])
  content = "\n\n".join([
      f"Current situation: {context}",
      "Skills (each a task vector added to a base policy):\n" + "\n".join(listing),
      f"Give each skill a scale in [{SKILL_RANGE[0]:g}, {SKILL_RANGE[1]:g}] (1 = as trained, 0 = "
      'off) for this situation. Reply as {"weights": {' + ", ".join(f'"{m}": s' for m in names)
      + '}, "rationale": "one or two sentences"}.'])
  fallback = (np.ones((n,), np.float32) if fallback is None
              else np.asarray(fallback, np.float32))
  chex.assert_shape(fallback, (n,))
  return WeightRequest("skill", names, *SKILL_RANGE, False, fallback,
                       ({"role": "system", "content": _SYSTEM},
                        {"role": "user", "content": content}),
                       weights_schema(names, *SKILL_RANGE))


def request_summary(request: WeightRequest) -> str:
  """One line for logs: the kind and the fallback weights by name."""
  return f"{request.kind} weights " + json.dumps(
      {n: round(float(w), 4) for n, w in zip(request.names, request.fallback)})


def weighted_merge(vectors: Sequence[PyTree], method: str, shares: np.ndarray,
                   **kwargs) -> PyTree:
  """`merge.merge` with relative shares f32[N] (Σ = 1): mean and task arithmetic get weights
  N·wᵢ; TIES methods get the task vectors scaled by N·wᵢ. Uniform shares give exactly the
  unweighted merge."""
  n = len(vectors)
  shares = np.asarray(shares, np.float32)
  chex.assert_shape(shares, (n,))
  if np.any(shares < 0) or not np.isclose(shares.sum(), 1.0, atol=1e-5):
    raise ValueError(f"merge shares {shares.tolist()}: expected non-negative, summing to 1")
  scale = n * shares
  if method in ("ties", "ties_count"):
    scaled = [jax.tree.map(lambda x, s=s: (x * s).astype(x.dtype), v)
              for v, s in zip(vectors, scale)]
    return merge_lib.merge(scaled, method, **kwargs)
  return merge_lib.merge(vectors, method, weights=scale, **kwargs)


def compose_skills(base: PyTree, vectors: Sequence[PyTree], scales: np.ndarray) -> PyTree:
  """Run-time skill composition θ = θ_base + Σ sᵢ τᵢ."""
  scales = np.asarray(scales, np.float32)
  chex.assert_shape(scales, (len(vectors),))
  return merge_lib.apply_task_vector(
      base, merge_lib.task_arithmetic(vectors, 1.0, weights=scales))
