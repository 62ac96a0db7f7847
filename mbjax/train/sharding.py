"""Data parallelism over a 1-D device mesh with `jax.shard_map`.

The runner state is split by role: the agents (parameters, optimiser states, statistics,
auxiliary learners), the key and the counters are replicated; everything with an env axis (env state,
observations, recurrent carries, the latent policy's filter state, the replay's per-env
streams) is split over the `data` axis. Inside, the Anakin
functions see their local slice and use `axis_name` for the collectives.

The same layout serves the other learners: the population trainer (`mbjax.train.population`)
stacks runner states over members and splits each member's env axis (`runner_specs(1)`), and
the Sebulba learner (`mbjax.train.sebulba`) splits the env axis of the rollouts it receives.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from mbjax.train import anakin

DATA_AXIS = "data"


def make_mesh(num_devices: int = 0) -> Mesh:
  """A 1-D mesh over the first `num_devices` devices (0: all of them)."""
  devices = jax.devices()
  if num_devices > len(devices):
    raise ValueError(f"asked for {num_devices} devices, {len(devices)} available")
  devices = devices[:num_devices or len(devices)]
  return Mesh(np.asarray(devices), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def runner_specs(leading_axes: int = 0) -> anakin.RunnerState:
  """PartitionSpecs for a RunnerState (a pytree prefix of it) whose leaves have
  `leading_axes` unsplit axes (e.g. members) before the env axis."""
  env = P(*(None,) * leading_axes, DATA_AXIS)
  return anakin.RunnerState(agent=P(), aux=P(), env_state=env, obs=env, is_first=env,
                            carry=env, latent=env, replay=env, key=P(), update_step=P())


def tree_shardings(mesh: Mesh, specs, tree):
  """NamedShardings for every leaf of `tree`, from `specs` (a pytree prefix of it)."""
  return jax.tree.map(
      lambda spec, subtree: jax.tree.map(lambda _: NamedSharding(mesh, spec), subtree),
      specs, tree, is_leaf=lambda x: isinstance(x, P))


def runner_shardings(mesh: Mesh, runner_like) -> anakin.RunnerState:
  """NamedShardings for every leaf of a RunnerState (for placing restored checkpoints)."""
  return tree_shardings(mesh, runner_specs(), runner_like)


class ShardedTrainer:
  """`init` and a chunk of `num_updates` updates, jitted and sharded over `mesh`."""

  def __init__(self, cfg, env, env_params, mesh: Mesh):
    self.mesh = mesh
    num_shards = mesh.shape[DATA_AXIS]
    self.trainer = anakin.make_train(cfg, env, env_params, num_shards, DATA_AXIS)
    specs = runner_specs()
    self.init = jax.jit(jax.shard_map(
        self.trainer.init, mesh=mesh, in_specs=P(), out_specs=specs))
    # Global shapes of the runner state, without running anything (restore targets).
    self.runner_like = jax.eval_shape(self.init, jax.random.PRNGKey(0))
    self._specs = specs
    self._chunks = {}

  def chunk(self, num_updates: int):
    """The jitted function running `num_updates` updates; metrics come back stacked."""
    if num_updates not in self._chunks:
      def run(runner):
        return jax.lax.scan(lambda r, _: self.trainer.update(r), runner, None, num_updates)

      self._chunks[num_updates] = jax.jit(
          jax.shard_map(run, mesh=self.mesh, in_specs=(self._specs,),
                        out_specs=(self._specs, P())),
          donate_argnums=0)
    return self._chunks[num_updates]


def batch_sharding(mesh: Mesh, batch_size: int, config_key: str, axis: int = 0
                   ) -> NamedSharding:
  """Splits a global batch of `batch_size` (on `axis` of every leaf) over the `data` axis.

  For the learners that train on batches rather than on a RunnerState (the offline
  phases): place the batch with this and the state with `NamedSharding(mesh, P())`, and
  call the unchanged jitted update. Sharding propagation then runs each device's rows
  locally and inserts the all-reduce where the loss means over the batch, so the gradient
  is the global-batch gradient (as on one device, up to the order of the sums) and the
  replicated parameters stay identical everywhere. `config_key` names the setting the
  batch size comes from, for the error when it does not split evenly.
  """
  devices = mesh.shape[DATA_AXIS]
  if batch_size % devices:
    raise ValueError(f"{config_key}={batch_size} is the global batch and must be divisible "
                     f"by the {devices} devices of the mesh (set run.num_devices or the "
                     "batch size)")
  return NamedSharding(mesh, P(*([None] * axis), DATA_AXIS))
