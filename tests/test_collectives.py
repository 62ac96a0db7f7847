"""`pmean`: the identity without an axis, the mean over the named axis with one (the axis
of a `vmap` here, as of a `shard_map` in the learners)."""
import jax
import numpy as np

from mbjax.agents.collectives import pmean


def test_pmean_without_an_axis_is_the_identity():
  tree = {"a": np.arange(3.0), "b": (np.float32(2.0),)}
  assert pmean(tree, None) is tree


def test_pmean_averages_every_leaf_over_the_named_axis():
  x = np.array([[1.0, 2.0], [3.0, 6.0], [5.0, 1.0]], np.float32)  # 3 "devices"
  y = np.array([0.0, 3.0, 9.0], np.float32)
  out = jax.vmap(lambda t: pmean(t, "data"), axis_name="data")({"x": x, "y": y})
  np.testing.assert_allclose(out["x"], np.broadcast_to([3.0, 3.0], (3, 2)))
  np.testing.assert_allclose(out["y"], [4.0, 4.0, 4.0])
