"""Metric sinks: a JSONL file and TensorBoard event files in the workdir, plus the console.

On resume, `MetricsWriter(..., resume_step=n)` drops JSONL records written after the
checkpoint being resumed (rewriting the file atomically) and tells TensorBoard to purge
events past it, so the logs read as if the run had never been interrupted.
"""
from __future__ import annotations

import json
import math
import os
import tempfile

import numpy as np
from absl import logging
from tensorboardX import SummaryWriter

METRICS_FILE = "metrics.jsonl"


def _jsonable(value):
  value = np.asarray(value).item() if np.ndim(value) == 0 else np.asarray(value).tolist()
  return None if isinstance(value, float) and not math.isfinite(value) else value


def read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


class MetricsWriter:

  def __init__(self, workdir: str, env_steps_per_update: int, resume_step: int | None = None):
    self.path = os.path.join(workdir, METRICS_FILE)
    if resume_step is not None and os.path.exists(self.path):
      kept = [r for r in read_jsonl(self.path) if r["update_step"] <= resume_step]
      fd, tmp = tempfile.mkstemp(dir=workdir, prefix=".metrics-", suffix=".jsonl")
      with os.fdopen(fd, "w") as f:
        f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in kept)
      os.replace(tmp, self.path)
    elif resume_step is None and os.path.exists(self.path):
      os.remove(self.path)  # a fresh run in an old workdir without checkpoints
    self._file = open(self.path, "a")
    self._tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"),
                                      purge_step=None if resume_step is None else resume_step * env_steps_per_update)

  def write(self, update_step: int, env_steps: int, metrics: dict) -> None:
    record = {"update_step": int(update_step), "env_steps": int(env_steps)}
    record.update({k: _jsonable(v) for k, v in metrics.items()})
    self._file.write(json.dumps(record, sort_keys=True) + "\n")
    self._file.flush()
    for key, value in record.items():
      if key not in ("env_steps", "update_step") and isinstance(value, (int, float)):
        self._tensorboard.add_scalar(key, value, global_step=env_steps)
    self._tensorboard.flush()

  def close(self) -> None:
    self._file.close()
    self._tensorboard.close()


class _QuietLibraries(logging.logging.Filter):
  """Drops orbax's per-save INFO records; its warnings still show."""

  def filter(self, record):
    return record.levelno >= logging.logging.WARNING or "/orbax/" not in record.pathname


def quiet_library_logging() -> None:
  """Keeps library chatter (orbax's per-save INFO lines) out of a binary's console."""
  logging.get_absl_handler().addFilter(_QuietLibraries())
