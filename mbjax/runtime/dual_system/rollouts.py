"""Rollout pushing: every executed step into a `mbjax.data.replay` ring, with the log-prob of
the executed action under the distribution that sampled it (upstream pushed log-prob 0 and
value 0 for System-2-driven steps).
"""
from __future__ import annotations

import jax
import numpy as np

from mbjax.data import replay
from mbjax.runtime import planner as planner_lib
from mbjax.runtime.dual_system.games import GameView
from mbjax.runtime.dual_system.motor import MotorOutput


class RolloutRecorder:
  """Executed steps → a replay ring (`mbjax.data.replay`), staged on the host and written
  `flush_every` at a time (one compiled `add` of a fixed batch size).

  A row is one step: the motor's input, the executed raw action, its log-prob under the
  acting distribution, the value, and the reward / episode end reported by the next fresh
  game state. Over the bridge a step whose action was replaced by the next one before any
  new state arrived is dropped (it has no outcome of its own)."""

  def __init__(self, obs_size: int, mask_size: int, capacity: int = 4096,
               flush_every: int = 64):
    if not 1 <= flush_every <= capacity:
      raise ValueError(f"push.flush_every={flush_every}: expected 1..capacity={capacity}")
    self.example = dict(
        obs=np.zeros(obs_size, np.float32), mask=np.zeros(mask_size, bool),
        action_continuous=np.zeros(2, np.float32), action_discrete=np.zeros(1, np.int32),
        log_prob=np.float32(0), value=np.float32(0), reward=np.float32(0),
        terminated=np.bool_(False), truncated=np.bool_(False), is_first=np.bool_(False),
        overridden=np.bool_(False), directive=np.int32(0))
    self.state = replay.init(self.example, capacity)
    self.flush_every = flush_every
    self._rows: list[dict] = []
    self._pending: dict | None = None
    batch = {k: np.stack([v] * flush_every) for k, v in self.example.items()}
    self._add = jax.jit(replay.add, donate_argnums=0).lower(self.state, batch).compile()
    self.pushed = 0

  def begin(self, view: GameView, out: MotorOutput, directive: planner_lib.Directive) -> None:
    """Stages the step just acted; its reward arrives with the next view (`complete`)."""
    self._pending = dict(
        obs=out.obs, mask=np.asarray(view.mask, bool), action_continuous=out.raw_continuous,
        action_discrete=np.array([out.choice], np.int32), log_prob=np.float32(out.log_prob),
        value=np.float32(out.value), is_first=np.bool_(view.is_first),
        overridden=np.bool_(out.overridden), directive=np.int32(directive.index))

  def complete(self, view: GameView) -> None:
    if self._pending is None or not view.fresh:
      return
    self._rows.append(dict(self._pending, reward=np.float32(view.reward),
                           terminated=np.bool_(view.terminated),
                           truncated=np.bool_(view.truncated)))
    self._pending = None
    if len(self._rows) >= self.flush_every:
      self._write(self._rows[:self.flush_every], self._add)
      self._rows = self._rows[self.flush_every:]

  def flush(self) -> None:
    """Writes the staged rows (a batch size of its own: call it outside timed loops)."""
    if self._rows:
      self._write(self._rows, replay.add)
      self._rows = []

  def _write(self, rows, add) -> None:
    batch = {k: np.stack([r[k] for r in rows]) for k in self.example}
    self.state = add(self.state, batch)
    self.pushed += len(rows)
