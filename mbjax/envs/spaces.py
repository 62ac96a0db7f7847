"""The hybrid action space shared by every environment and policy head.

An action is a `HybridAction`: `continuous` dims (the env sees values in [-1, 1]) plus one
integer per discrete branch. Upstream MetaBonk uses 2 continuous dims and a single 33-way
UI-click branch; discrete-only (gymnax CartPole: 0 continuous, branches (2,)) and
continuous-only (branches ()) are special cases of the same layout.

An action mask is a flat boolean vector of length `sum(branches)`: branch i owns the
slice `offsets[i]:offsets[i] + branches[i]`. True means the choice is allowed.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class HybridAction(NamedTuple):
  continuous: jax.Array  # f32[..., continuous_dim]
  discrete: jax.Array  # i32[..., num_branches]


@dataclasses.dataclass(frozen=True)
class HybridActionSpec:
  """Static description of a hybrid action space (hashable, so usable as a jit static arg)."""

  continuous_dim: int
  branches: tuple[int, ...]

  def __post_init__(self):
    if self.continuous_dim < 0:
      raise ValueError(f"continuous_dim must be >= 0, got {self.continuous_dim}")
    if any(n < 1 for n in self.branches):
      raise ValueError(f"every discrete branch needs >= 1 choice, got {self.branches}")
    if self.continuous_dim == 0 and not self.branches:
      raise ValueError("an action space needs at least one continuous dim or discrete branch")
    object.__setattr__(self, "branches", tuple(int(n) for n in self.branches))

  @property
  def num_branches(self) -> int:
    return len(self.branches)

  @property
  def mask_size(self) -> int:
    return int(sum(self.branches))

  @property
  def branch_offsets(self) -> tuple[int, ...]:
    return tuple(int(o) for o in np.cumsum((0,) + self.branches[:-1])) if self.branches else ()

  def all_valid_mask(self, batch_shape: tuple[int, ...] = ()) -> jax.Array:
    return jnp.ones(batch_shape + (self.mask_size,), dtype=bool)

  def zeros(self, batch_shape: tuple[int, ...] = ()) -> HybridAction:
    return HybridAction(
        continuous=jnp.zeros(batch_shape + (self.continuous_dim,), jnp.float32),
        discrete=jnp.zeros(batch_shape + (self.num_branches,), jnp.int32),
    )


def rare_choices(discrete: np.ndarray) -> np.ndarray:
  """bool[T] of labels i32[T, K]: some branch's choice is not that branch's most common one
  (in BonkArena a card picked in a menu: a few steps in a thousand). Learners that must
  see such steps oversample them (`offline.bc`'s batches, `train.offline`'s windows)."""
  discrete = np.asarray(discrete)
  if discrete.ndim != 2:
    raise ValueError(f"discrete labels must be i32[T, K], got shape {discrete.shape}")
  if not discrete.shape[1] or not len(discrete):
    return np.zeros(len(discrete), bool)
  modes = [np.bincount(column).argmax() for column in discrete.T]
  return (discrete != np.asarray(modes)[None]).any(axis=1)
