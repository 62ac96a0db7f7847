"""Checkpoints of the whole runner state (orbax), with the config that produced them.

A checkpoint holds parameters, optimiser state, observation statistics, env state,
observations, recurrent carries, the RNG key and the update counter — everything needed to
continue bitwise-identically. orbax writes each step into a temporary directory and renames
it when complete, so a run killed mid-save leaves the previous checkpoint intact.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

from mbjax.train import config as config_lib


class IncompatibleCheckpointError(ValueError):
  pass


class Checkpointer:
  """Saves and restores runner states under `<workdir>/checkpoints/<update_step>`."""

  def __init__(self, workdir: str, keep: int):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self._manager = ocp.CheckpointManager(
        self.directory,
        # Synchronous: the next jitted chunk donates the runner's buffers, so a save must
        # have read them before it returns.
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=False),
        item_names=("state", "config"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, cfg: ml_collections.ConfigDict) -> None:
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(cfg.to_dict())))

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def restore(self, step: int, abstract_state: Any, cfg: ml_collections.ConfigDict) -> Any:
    """Restores step `step` onto the shapes/shardings of `abstract_state`.

    Raises IncompatibleCheckpointError when the checkpoint came from a config whose
    numerics differ from `cfg` (anything outside `run.*`).
    """
    saved_config = self._manager.restore(
        step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    try:
      config_lib.check_env_version(saved_config, f"checkpoint {self.directory}/{step}")
    except ValueError as error:
      raise IncompatibleCheckpointError(str(error)) from None
    differences = config_lib.incompatible_fields(saved_config, cfg)
    if differences:
      raise IncompatibleCheckpointError(
          f"checkpoint {self.directory}/{step} was written with a different config; use a "
          "new --workdir or the original config. Differences:\n  " + "\n  ".join(differences))
    restored = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
    return restored["state"]

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_like(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `tree` placed with `shardings` (a matching tree)."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
