"""The driver loop every trainer shares: lock the workdir, resume or initialise, run chunks,
log, checkpoint, and stop cleanly.

`run(driver, cfg, workdir)` takes the workdir's lock (`WorkdirLock`: a second run on the
same workdir stops at once, naming the holder), restores the latest checkpoint in `workdir`
if there is one (so rerunning a command resumes it; a larger `total_env_steps` extends a
finished run) or initialises, writes `config.json`, then runs chunks of
`run.log_every_updates` updates, writing one metrics record (JSONL and TensorBoard) and one
console line (with elapsed time and ETA) per chunk and a checkpoint every
`run.checkpoint_every_updates` updates and at the end.

Faults end a run with a `RunStopped` error whose message says what happened and where the
run can resume: updates skipped for non-finite values (`mbjax.train.finite`) more than
`run.max_nonfinite_updates` times in a row, non-finite parameters at a checkpoint (never
saved, so the newest checkpoint always holds finite ones), or Ctrl-C (the first finishes
the chunk and saves it, a second stops at once).

A `Driver` is one trainer's side of the loop — the Anakin runner (`mbjax.train.run`), the
population (`mbjax.train.population`), the Sebulba learner (`mbjax.train.sebulba`): how to
build, restore, advance and describe its state, and what it does once the run is done.
"""
from __future__ import annotations

import abc
import contextlib
import errno
import fcntl
import os
import signal
import threading
import time
from typing import Any, NamedTuple

import numpy as np
from absl import logging

from mbjax import files
from mbjax.train import checkpoint as checkpoint_lib
from mbjax.train import distributed, finite
from mbjax.train.metrics import METRICS_FILE, TENSORBOARD_DIR, MetricsWriter

LOCK_FILE = ".lock"


def summarize_chunk(metrics: dict) -> dict:
  """Reduces a chunk's per-update metrics [n] to one record: episode statistics
  (`episode/*`) weighted by the number of episodes that finished in each update, counts of
  skipped updates and their causes (`nonfinite/*`) summed, everything else averaged."""
  metrics = distributed.host_value(metrics)
  counts = np.asarray(metrics.get("episode/count", 0), np.float64)
  summary = {}
  for key, values in metrics.items():
    values = np.asarray(values, np.float64)
    if key == "episode/count" or key.startswith("nonfinite/"):
      summary[key] = int(values.sum())
    elif key.startswith("episode/"):
      summary[key] = float((values * counts).sum() / counts.sum()) if counts.sum() else None
    else:
      summary[key] = float(values.mean())
  return summary


class RunStopped(RuntimeError):
  """A run ended before its last update for a reason its message names, with where it can
  resume; `exit_code` is what a binary exits with."""

  exit_code = 1


class WorkdirBusy(RunStopped):
  """Another live process holds the workdir's lock."""


class NonFiniteUpdates(RunStopped):
  """Updates kept producing non-finite values, or parameters were non-finite at a save."""


class Interrupted(RunStopped):
  """Ctrl-C (SIGINT)."""

  exit_code = 130  # the shell's code for a process ended by SIGINT


class WorkdirLock:
  """An exclusive lock on a workdir: `<workdir>/.lock`, holding the owner's PID, locked with
  `fcntl.flock`. The kernel drops the lock when its process dies, so a lock file left by a
  dead process is taken over; one held by a live process raises `WorkdirBusy`."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_FILE)
    while True:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError as e:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        if e.errno not in (errno.EAGAIN, errno.EACCES):
          raise
        raise WorkdirBusy(f"workdir {workdir} is in use by process {holder} (lock file "
                          f"{self.path}); wait for it to finish or stop it, or use another "
                          "--workdir") from None
      # The previous holder may have removed the file between our open and lock: lock the
      # file that is there now.
      if os.path.exists(self.path) and os.path.samestat(os.fstat(fd), os.stat(self.path)):
        break
      os.close(fd)
    previous = os.read(fd, 64).decode(errors="replace").strip()
    if previous and previous != str(os.getpid()):
      logging.warning("Took over the lock of %s from process %s, which is no longer running.",
                      workdir, previous)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    self._fd = fd

  def release(self) -> None:
    if self._fd is None:
      return
    with contextlib.suppress(FileNotFoundError):
      os.unlink(self.path)
    os.close(self._fd)  # closing drops the flock
    self._fd = None


class _InterruptRequest:
  """While active (main thread only): the first SIGINT asks the loop to stop after the
  current chunk, a second raises KeyboardInterrupt as usual."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGINT, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True
    signal.signal(signal.SIGINT, signal.default_int_handler)
    logging.warning("Ctrl-C: stopping after this chunk, with a checkpoint; Ctrl-C again to "
                    "stop at once.")

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGINT, self._previous)


class Driver(abc.ABC):
  """One trainer's side of `run`. `num_updates` (the run's length) and
  `env_steps_per_update` (the metrics' x-axis) are set by the subclass."""

  num_updates: int
  env_steps_per_update: int

  @abc.abstractmethod
  def init(self) -> Any:
    """A fresh state (nothing in the workdir yet)."""

  @abc.abstractmethod
  def restore_target(self) -> Any:
    """The abstract state (shapes, dtypes, shardings) a checkpoint is restored onto."""

  def resume(self, restored) -> Any:
    """The state to continue from, given a restored checkpoint."""
    return restored

  @abc.abstractmethod
  def update_step(self, state) -> int:
    """Updates done by `state`."""

  def compile(self, state, num_updates: int) -> float | None:
    """Compiles the chunk of `num_updates` updates unless it is compiled; returns the
    seconds it took (None if nothing was compiled). Timed apart from the chunk's run."""
    del state, num_updates
    return None

  @abc.abstractmethod
  def run_chunk(self, state, num_updates: int) -> tuple[Any, dict]:
    """Advances `state` by `num_updates` updates; returns (state, per-update metrics as host
    arrays with a leading [num_updates] axis, holding the `finite.guard` flags)."""

  @abc.abstractmethod
  def record(self, metrics: dict, seconds: float) -> dict:
    """The chunk's metrics record from its per-update `metrics` and run time."""

  def after_chunk(self, state, update_step: int, record: dict) -> Any:
    """Runs after each chunk, before its record is written (may add to `record`)."""
    del update_step, record
    return state

  def describe(self, record: dict) -> str:
    """This trainer's part of the console line of a chunk."""
    del record
    return ""

  def saved(self, state) -> Any:
    """The pytree a checkpoint holds."""
    return state

  @abc.abstractmethod
  def learned(self, state) -> Any:
    """The learned (replicated) part of `state`, checked to be finite before each save."""

  def finish(self, state, update_step: int, record: dict, workdir: str
             ) -> tuple[Any, dict, dict]:
    """Runs after the loop; returns (the final state, metrics to add to the last record —
    written as a second record at its step —, output name → path)."""
    del update_step, record, workdir
    return state, {}, {}

  def close(self) -> None:
    """Releases what the driver holds (threads, sockets); called however the run ends."""


class Result(NamedTuple):
  state: Any
  record: dict  # the last metrics record
  outputs: dict  # output name → path


def _clock(seconds: float) -> str:
  seconds = int(round(seconds))
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class _NonFiniteStreak:
  """Consecutive skipped updates and their causes, across chunks."""

  def __init__(self, limit: int):
    self.limit, self.length, self.causes = limit, 0, {}

  def add(self, metrics: dict) -> None:
    if finite.SKIPPED not in metrics:
      return
    reduce = lambda x: np.asarray(x).reshape(len(x), -1).any(axis=1)  # any member
    skipped = reduce(metrics[finite.SKIPPED])
    flags = {c: reduce(metrics[f"nonfinite/{c}"]) for c in finite.CAUSES}
    for i, bad in enumerate(skipped):
      if not bad:
        self.length, self.causes = 0, {}
        continue
      self.length += 1
      for cause, found in flags.items():
        self.causes[cause] = self.causes.get(cause, 0) + int(found[i])

  @property
  def exceeded(self) -> bool:
    return self.length >= self.limit

  def describe(self) -> str:
    names = {"obs": "observations from the env", "reward": "rewards from the env",
             "loss": "the loss", "grads": "the gradients", "params": "the updated parameters"}
    return ", ".join(f"{names[c]} in {n}" for c, n in self.causes.items() if n)


def run(driver: Driver, cfg, workdir: str, *, stop_after: int | None = None) -> Result:
  """Trains (or resumes) `driver` in `workdir`, stopping after update `stop_after` when
  given (checkpointed there, so a rerun continues). Raises `RunStopped` (see the module
  docstring) when the run cannot go on."""
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  primary = distributed.is_primary()
  lock = WorkdirLock(workdir) if primary else None
  checkpointer = writer = None
  try:
    checkpointer = checkpoint_lib.Checkpointer(workdir, cfg.run.keep_checkpoints)
    # The newest checkpoint that restores (unreadable ones are set aside, with a warning).
    resume_step, restored = checkpointer.restore_latest(driver.restore_target(), cfg,
                                                        set_aside=True)
    if resume_step is None:
      logging.info("New run in %s.", workdir)
      state = driver.init()
    else:
      state = driver.resume(restored)
      logging.info("Resumed %s from update %d.", workdir, resume_step)
    if primary:
      files.write_json(os.path.join(workdir, "config.json"), cfg.to_dict())
      writer = MetricsWriter(workdir, resume_step)

    def save(step, state):
      if not finite.host_all_finite(distributed.host_value(driver.learned(state))):
        raise NonFiniteUpdates(
            f"the parameters are non-finite at update {step}; not saved. The newest "
            f"checkpoint, {_newest(checkpointer)}, holds finite ones.")
      checkpointer.save(step, driver.saved(state), cfg)

    last = driver.num_updates if stop_after is None else min(stop_after, driver.num_updates)
    record = {}
    update_step = driver.update_step(state)
    streak = _NonFiniteStreak(cfg.run.max_nonfinite_updates)
    start, timed_seconds, timed_updates = time.perf_counter(), 0.0, 0
    with _InterruptRequest() as interrupt:
      try:
        while update_step < last:
          size = min(cfg.run.log_every_updates, last - update_step)
          compile_seconds = driver.compile(state, size)
          chunk_start = time.perf_counter()
          state, metrics = driver.run_chunk(state, size)
          seconds = time.perf_counter() - chunk_start
          update_step += size
          timed_seconds, timed_updates = timed_seconds + seconds, timed_updates + size
          record = driver.record(metrics, seconds)
          if compile_seconds is not None:
            record["perf/compile_seconds"] = compile_seconds
          state = driver.after_chunk(state, update_step, record)
          env_steps = update_step * driver.env_steps_per_update
          if writer:
            writer.write(update_step, env_steps, record)
          eta = (last - update_step) * timed_seconds / timed_updates
          logging.info("update %d/%d | env steps %s | elapsed %s | ETA %s | %s", update_step,
                       driver.num_updates, f"{env_steps:,}", _clock(time.perf_counter() - start),
                       _clock(eta), driver.describe(record))
          streak.add(metrics)
          if streak.exceeded:
            raise NonFiniteUpdates(
                f"{streak.length} updates in a row (up to update {update_step}) were skipped "
                f"for non-finite values ({streak.describe()}); run.max_nonfinite_updates="
                f"{streak.limit}. The newest checkpoint, {_newest(checkpointer)}, holds "
                "finite parameters.")
          if (update_step % cfg.run.checkpoint_every_updates == 0 or update_step == last
              or interrupt.requested):
            save(update_step, state)
          if interrupt.requested and update_step < last:
            checkpointer.wait()
            raise Interrupted(f"Interrupted at update {update_step}; checkpoint "
                              f"{_newest(checkpointer)} saved. Rerun the same command to "
                              "resume from it.")
      except KeyboardInterrupt:
        raise Interrupted(f"Interrupted during the updates after {update_step}; the newest "
                          f"checkpoint is {_newest(checkpointer)}. Rerun the same command to "
                          "resume from it.") from None
    checkpointer.wait()

    state, extra, outputs = driver.finish(state, update_step, record, workdir)
    if extra:
      record = {**record, **extra}
      if writer:  # a second record at the last step, with only the new metrics
        writer.write(update_step, update_step * driver.env_steps_per_update, extra)
  finally:
    driver.close()
    if checkpointer:
      checkpointer.close()
    if writer:
      writer.close()
    if lock:
      lock.release()
  outputs = {"metrics": os.path.join(workdir, METRICS_FILE),
             "tensorboard": os.path.join(workdir, TENSORBOARD_DIR),
             "checkpoints": checkpointer.directory, **outputs}
  return Result(state, record, outputs)


def _newest(checkpointer: checkpoint_lib.Checkpointer) -> str:
  step = checkpointer.latest_step()
  return "none" if step is None else os.path.join(checkpointer.directory, str(step))
