"""Checkpoints of the whole runner state (orbax), with the config that produced them.

A checkpoint holds parameters, optimiser state, observation statistics, env state,
observations, recurrent carries, the RNG key and the update counter — everything needed to
continue bitwise-identically. orbax writes each step into a temporary directory and renames
it when complete, so a run killed mid-save leaves the previous checkpoint intact.

Failures are loud: a save that orbax declines (a step not newer than the latest) raises, and
resuming skips an unreadable checkpoint (truncated metadata, a broken array store) for the
newest one that restores, with a warning naming the bad one.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging

from mbjax.train import config as config_lib

# Where a resuming run moves the unreadable checkpoints it skipped, beside `checkpoints/`.
UNREADABLE_DIRNAME = "checkpoints_unreadable"


class CheckpointError(Exception):
  """A checkpoint or run directory that cannot be used as asked; the message says why."""


class IncompatibleCheckpointError(CheckpointError, ValueError):
  """The checkpoint was written with a config whose numerics differ from this run's."""


class RunNotFoundError(CheckpointError, FileNotFoundError):
  """A workdir without the config.json or the checkpoints that a training run leaves."""


class UnreadableCheckpointError(CheckpointError):
  """No checkpoint in the directory restores."""


class CheckpointNotSavedError(CheckpointError):
  """orbax declined to write a step (it writes only steps newer than the latest)."""


# What orbax and TensorStore raise for a damaged checkpoint: JSONDecodeError (a ValueError)
# for truncated metadata, ValueError for a broken array store, KeyError for a missing item.
_READ_ERRORS = (ValueError, KeyError, OSError)
# What orbax says when the checkpoint's pytree is not the one asked for: the code changed the
# state's layout, which is not damage.
_LAYOUT_MISMATCH = ("tree structures do not match", "Structure mismatch")


def read_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config.json a training run wrote in `workdir`, with fields added since at their
  defaults."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise RunNotFoundError(f"{path} not found: expected the workdir of a training run "
                           "(experiments/train.py writes config.json there)")
  try:
    with open(path) as f:
      saved = json.load(f)
  except json.JSONDecodeError as e:
    raise RunNotFoundError(f"{path} is not valid JSON ({e})") from None
  return ml_collections.ConfigDict(_with_defaults(saved, config_lib.base_config().to_dict()))


def _with_defaults(saved: dict, defaults: dict) -> dict:
  """`saved` with the `base_config()` fields it lacks at their defaults: fields are added
  with defaults that keep the earlier behaviour (as `config.incompatible_fields` assumes),
  so a run written before a field existed reads as it ran."""
  merged = dict(saved)
  for key, default in defaults.items():
    if key not in merged:
      merged[key] = default
    elif isinstance(default, dict) and isinstance(merged[key], dict):
      merged[key] = _with_defaults(merged[key], default)
  return merged


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
    """Writes step `step`; raises CheckpointNotSavedError when nothing was written."""
    saved = self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(cfg.to_dict())))
    if not saved:
      raise CheckpointNotSavedError(
          f"checkpoint {self.directory}/{step} was not written: the directory already holds "
          f"step {self.latest_step()}, and only a newer step can be added")

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
    try:
      restored = self._manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
    except ValueError as error:
      if not any(marker in str(error) for marker in _LAYOUT_MISMATCH):
        raise
      raise IncompatibleCheckpointError(
          f"checkpoint {self.directory}/{step} holds a state of another layout than this "
          "code builds for its config (written by another version of mbjax?); retrain in a "
          "new --workdir, or restore it with the code that wrote it") from None
    return restored["state"]

  def restore_latest(self, abstract_state: Any, cfg: ml_collections.ConfigDict, *,
                     set_aside: bool = False) -> tuple[int | None, Any]:
    """(step, state) of the newest checkpoint that restores; (None, None) when there is none.

    An unreadable checkpoint is skipped with a warning naming it. With `set_aside` (a run
    that will save again), the skipped ones are moved to `<workdir>/checkpoints_unreadable/`
    — kept for inspection, and out of the way of the steps the run writes next. Raises
    UnreadableCheckpointError, naming each one and why, when none restores (nothing is
    moved then), and IncompatibleCheckpointError at once for a config mismatch, which is the
    user's to resolve rather than damage.
    """
    skipped = []
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        state = self.restore(step, abstract_state, cfg)
      except IncompatibleCheckpointError:
        raise
      except _READ_ERRORS as e:
        reason = _first_line(e)
        logging.warning("checkpoint %s/%d is unreadable (%s); trying an older one",
                        self.directory, step, reason)
        skipped.append((step, reason))
        continue
      if skipped:
        logging.warning("resuming from %s/%d instead of the unreadable %s", self.directory,
                        step, ", ".join(str(s) for s, _ in skipped))
        if set_aside:
          self._set_aside([s for s, _ in skipped])
      return step, state
    if skipped:
      raise UnreadableCheckpointError(
          f"no checkpoint under {self.directory} restores:\n  "
          + "\n  ".join(f"{step}: {reason}" for step, reason in skipped))
    return None, None

  def _set_aside(self, steps: list[int]) -> None:
    target = os.path.join(os.path.dirname(self.directory), UNREADABLE_DIRNAME)
    if jax.process_index() == 0:
      os.makedirs(target, exist_ok=True)
      for step in steps:
        destination, n = os.path.join(target, str(step)), 1
        while os.path.exists(destination):
          destination, n = os.path.join(target, f"{step}.{n}"), n + 1
        os.replace(os.path.join(self.directory, str(step)), destination)
        logging.warning("moved the unreadable checkpoint %s/%d to %s", self.directory, step,
                        destination)
    if jax.process_count() > 1:
      ocp.multihost.sync_global_processes("mbjax_checkpoint_set_aside")
    self._manager.reload()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def _first_line(error: Exception) -> str:
  lines = str(error).splitlines()
  return f"{type(error).__name__}: {lines[0] if lines else ''}"[:300]


def abstract_like(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `tree` placed with `shardings` (a matching tree)."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
