"""Cross-device reductions that are the identity on one device.

Every learner takes an optional `axis_name`: under `shard_map` (or `vmap`) over that axis
each device holds part of the batch and the learners average their losses and statistics
over it; with `axis_name=None` the same code runs unsharded.
"""
from __future__ import annotations

import jax


def pmean(tree, axis_name: str | None):
  """The mean of `tree` (any pytree) over the named axis; `tree` itself without one."""
  return tree if axis_name is None else jax.lax.pmean(tree, axis_name)


def varying(tree, axis_name: str | None):
  """`tree` (e.g. replicated parameters) marked as varying over the named axis, values
  unchanged; `tree` itself without one. A device-invariant value that meets per-device data
  inside a scan has its gradient summed over the devices at every step of the scan's
  backward pass (an all-reduce a step, even on one device); marked once before the scan,
  the gradient is summed once, at the mark."""
  return tree if axis_name is None else jax.lax.pcast(tree, axis_name, to="varying")
