"""`pmean`: the identity without an axis, the mean over the named axis with one (the axis
of a `vmap` here, as of a `shard_map` in the learners); `varying`: where a replicated
parameter's gradient is summed over devices (4 simulated CPU devices, tests/conftest.py)."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mbjax.agents.collectives import pmean, varying
from mbjax.train import sharding


def test_pmean_without_an_axis_is_the_identity():
  tree = {"a": np.arange(3.0), "b": (np.float32(2.0),)}
  assert pmean(tree, None) is tree


def test_pmean_averages_every_leaf_over_the_named_axis():
  x = np.array([[1.0, 2.0], [3.0, 6.0], [5.0, 1.0]], np.float32)  # 3 "devices"
  y = np.array([0.0, 3.0, 9.0], np.float32)
  out = jax.vmap(lambda t: pmean(t, "data"), axis_name="data")({"x": x, "y": y})
  np.testing.assert_allclose(out["x"], np.broadcast_to([3.0, 3.0], (3, 2)))
  np.testing.assert_allclose(out["y"], [4.0, 4.0, 4.0])


def test_varying_without_an_axis_is_the_identity():
  tree = {"w": np.ones((2, 2), np.float32)}
  assert varying(tree, None) is tree


def while_bodies_with_all_reduce(hlo: str) -> int:
  """How many while-loop bodies of an optimised HLO module contain an all-reduce."""
  bodies = set(re.findall(r"body=%([\w.\-]+)", hlo))
  count = 0
  for computation in re.split(r"\n(?=(?:ENTRY )?%[\w.\-]+ \()", hlo):
    name = re.match(r"(?:ENTRY )?%([\w.\-]+)", computation.strip())
    count += bool(name and name.group(1) in bodies and "all-reduce" in computation)
  return count


@pytest.mark.parametrize("mark", [False, True], ids=["unmarked", "varying"])
def test_a_scans_parameter_gradient_is_summed_once_when_marked_varying(mark):
  """A recurrence over per-device data with replicated weights, under shard_map over 4
  devices: the gradient of the device-mean loss equals the single-device gradient either
  way; unmarked, the weights' gradient is all-reduced inside the scan's backward loop (every
  step), marked `varying` only after it."""
  mesh = sharding.make_mesh(4)
  axis = sharding.DATA_AXIS
  rng = np.random.default_rng(0)
  weights = rng.normal(size=(3, 3)).astype(np.float32) * 0.5
  inputs = rng.normal(size=(6, 8, 3)).astype(np.float32)  # [T, B, 3], B split over devices

  def loss(w, x, axis_name):
    if mark:
      w = varying(w, axis_name)
    final, _ = jax.lax.scan(lambda h, x_t: (jnp.tanh(h @ w + x_t), None), jnp.zeros_like(x[0]),
                            x)
    return pmean(jnp.square(final).mean(), axis_name)

  plain = jax.grad(loss)(weights, inputs, None)
  sharded = jax.jit(jax.shard_map(
      lambda w, x: jax.grad(loss)(w, x, axis), mesh=mesh,
      in_specs=(sharding.P(), sharding.P(None, axis)), out_specs=sharding.P()))
  np.testing.assert_allclose(sharded(weights, inputs), plain, rtol=1e-5, atol=1e-6)
  hlo = sharded.lower(weights, inputs).compile().as_text()
  assert "all-reduce" in hlo
  assert while_bodies_with_all_reduce(hlo) == (0 if mark else 1)
