"""Metric sinks: a JSONL file and TensorBoard event files in the workdir, plus the console.

Records are strict JSON: a metric whose value is not finite (a NaN loss) is left out of the
record and named in its `nonfinite/metrics` list instead, and a warning says so. On resume,
`MetricsWriter(..., resume_step=n)` drops the JSONL records written after the checkpoint
being resumed (rewriting the file atomically) and rebuilds the TensorBoard event files from
the records it keeps, so the logs read as if the run had never been interrupted: every
point once, none lost; a fresh run in an old workdir starts them afresh.
"""
from __future__ import annotations

import json
import math
import os
import struct

import numpy as np
from absl import logging
from tensorboardX import SummaryWriter
from tensorboardX.proto import event_pb2

from mbjax import files

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def _jsonable(value):
  return np.asarray(value).item() if np.ndim(value) == 0 else np.asarray(value).tolist()


def read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _events(path: str):
  """The events of a TensorBoard event file (TFRecord framing: length u64, its CRC u32,
  data, its CRC u32); a record cut off by a kill ends it."""
  with open(path, "rb") as f:
    data = f.read()
  offset = 0
  while offset + 12 <= len(data):
    (length,) = struct.unpack("<Q", data[offset:offset + 8])
    end = offset + 12 + length + 4
    if end > len(data):
      return
    yield event_pb2.Event.FromString(data[offset + 12:end - 4])
    offset = end


def read_scalars(directory: str) -> dict[str, list[tuple[int, float]]]:
  """tag → [(step, value)] of the scalars in a TensorBoard directory, read as TensorBoard
  reads them: files in name order, and a SessionLog.START event at step s (a purge, as other
  writers leave on resume) drops the points at steps ≥ s read before it."""
  points = {}
  for name in sorted(os.listdir(directory)):
    for event in _events(os.path.join(directory, name)):
      if event.HasField("session_log") and event.session_log.status == event.session_log.START:
        points = {tag: [p for p in ps if p[0] < event.step] for tag, ps in points.items()}
      for value in event.summary.value:
        points.setdefault(value.tag, []).append((event.step, value.simple_value))
  return points


def _remove_event_files(directory: str) -> None:
  if os.path.isdir(directory):
    for name in os.listdir(directory):
      if "tfevents" in name:
        os.remove(os.path.join(directory, name))


class MetricsWriter:

  def __init__(self, workdir: str, resume_step: int | None = None):
    self.path = os.path.join(workdir, METRICS_FILE)
    kept = []
    if resume_step is not None and os.path.exists(self.path):
      kept = [r for r in read_jsonl(self.path) if r["update_step"] <= resume_step]
      with files.atomic_open(self.path) as f:
        f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in kept)
    elif resume_step is None and os.path.exists(self.path):
      os.remove(self.path)  # a fresh run in an old workdir without checkpoints
    # TensorBoard's files are rebuilt from the JSONL records: its writer works on a thread,
    # so a killed run can leave part of a record that the JSONL holds whole.
    tensorboard = os.path.join(workdir, TENSORBOARD_DIR)
    _remove_event_files(tensorboard)
    self._file = open(self.path, "a")
    self._tensorboard = SummaryWriter(tensorboard)
    for record in kept:
      self._add_scalars(record)
    self._tensorboard.flush()

  def write(self, update_step: int, env_steps: int, metrics: dict) -> None:
    record = {"update_step": int(update_step), "env_steps": int(env_steps)}
    nonfinite = []
    for key, value in metrics.items():
      value = _jsonable(value)
      if isinstance(value, float) and not math.isfinite(value):
        nonfinite.append(key)
      else:
        record[key] = value
    if nonfinite:
      record["nonfinite/metrics"] = sorted(nonfinite)
      logging.warning("update %d: non-finite metrics left out of the record: %s", update_step,
                      ", ".join(sorted(nonfinite)))
    self._file.write(json.dumps(record, sort_keys=True, allow_nan=False) + "\n")
    self._file.flush()
    self._add_scalars(record)
    self._tensorboard.flush()

  def _add_scalars(self, record: dict) -> None:
    for key, value in record.items():
      if key not in ("env_steps", "update_step") and isinstance(value, (int, float)):
        self._tensorboard.add_scalar(key, value, global_step=record["env_steps"])

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
