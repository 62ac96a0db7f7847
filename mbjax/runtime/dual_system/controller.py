"""The control loop: observe → publish the snapshot to System 2 → take the newest directive
(or the rule planner's, until System 2 first answers) → level-up menu handling → motor step →
act → record → sleep to the next period. It keeps per-step latencies (compute time of an
iteration, sleep excluded) for the timing benchmark.

The level-up menu: while it is open the directive is `pick_card`; the card comes from the
menu decider (a VLM menu navigator when configured; it must answer without blocking and
may answer "no decision yet"), else from a System 2 `pick_card` directive issued since the
menu opened, else from the rule planner. With `menu_override` the chosen card is also forced
as the executed discrete action; such steps are flagged `overridden` in the rollout (their
log-prob is still the policy's log-prob of what was executed, so a learner can weight or
drop them knowingly).
"""
from __future__ import annotations

import dataclasses
import gc
import time
from typing import Callable, Protocol

import numpy as np

from mbjax.envs.bonk_arena.env import MENU_NOOP
from mbjax.runtime import planner as planner_lib
from mbjax.runtime.dual_system.games import Game, GameView
from mbjax.runtime.dual_system.motor import MotorPolicy
from mbjax.runtime.dual_system.rollouts import RolloutRecorder


class MenuDecider(Protocol):
  def decide(self, view: GameView) -> tuple[int, str] | None:
    """(menu choice 0..3, source) for an open menu — 3 (the no-op) to wait for a pending
    decision — or None to leave the choice to System 2 / the rule; must return at once."""


class NavigatorMenu:
  """The VLM menu navigator (`mbjax.runtime.menu_navigator.MenuNavigator`) as the
  controller's menu decider. `frame_fn()` renders the current frame (called only when the
  navigator sends a request). While a reply is pending the decision is the no-op: the game
  is paused while the menu is open, so waiting costs menu steps, not game time; past the
  navigator's deadline (or on an error or invalid reply) it falls back to the rule card."""

  def __init__(self, navigator, frame_fn: Callable[[], np.ndarray]):
    self.navigator, self.frame_fn = navigator, frame_fn

  def decide(self, view: GameView) -> tuple[int, str] | None:
    snap = view.snapshot
    decision = self.navigator.step(snap.menu_open, self.frame_fn, view.mask,
                                   planner_lib.preferred_card(snap.menu_cards),
                                   card_names=snap.menu_cards)
    if decision is None:
      return None
    if decision.kind == "card":
      return decision.card, f"navigator:{decision.source}"
    return MENU_NOOP, f"navigator:{decision.kind}"


@dataclasses.dataclass
class LoopStats:
  steps: int
  wall_s: float
  latencies_s: np.ndarray  # compute time of every iteration
  period_s: float
  directive_sources: dict
  menu_sources: dict
  system2: planner_lib.System2Stats

  def summary(self) -> dict:
    lat = self.latencies_s * 1e3
    s2 = self.system2.latencies_s
    return {
        "steps": self.steps, "wall_s": round(self.wall_s, 3),
        "achieved_hz": round(self.steps / self.wall_s, 2) if self.wall_s else None,
        "step_ms_p50": round(float(np.percentile(lat, 50)), 3),
        "step_ms_p99": round(float(np.percentile(lat, 99)), 3),
        "step_ms_max": round(float(lat.max()), 3),
        "overruns": int((self.latencies_s > self.period_s).sum()),
        "directives": dict(self.directive_sources), "menu": dict(self.menu_sources),
        "system2_plans": self.system2.plans, "system2_fallbacks": self.system2.fallbacks,
        "system2_call_s_mean": round(float(np.mean(s2)), 3) if s2 else None,
        "system2_call_s_max": round(float(np.max(s2)), 3) if s2 else None,
    }


class DualSystemController:
  """System 1 at `hz` on the calling thread; System 2 already running on its own."""

  def __init__(self, game: Game, motor: MotorPolicy, system2: planner_lib.System2, *,
               hz: float = 60.0, recorder: RolloutRecorder | None = None,
               menu: MenuDecider | None = None, menu_override: bool = True,
               rule: planner_lib.RulePlanner | None = None,
               goto_radius: float = 1.0, clock: Callable[[], float] = time.perf_counter,
               sleep: Callable[[float], None] = time.sleep):
    if hz <= 0:
      raise ValueError(f"hz={hz}: expected > 0")
    self.game, self.motor, self.system2 = game, motor, system2
    self.period = 1.0 / hz
    self.recorder, self.menu, self.menu_override = recorder, menu, menu_override
    self.rule = rule or planner_lib.RulePlanner()
    self.goto_radius = goto_radius
    self.clock, self.sleep = clock, sleep
    self._directive: planner_lib.Directive | None = None
    self._age = 0
    self._menu_opened_at = None
    self._menu_card: tuple[int, str] | None = None
    self._requested: planner_lib.Directive | None = None

  def _choose_directive(self, view: GameView) -> tuple[planner_lib.Directive, int]:
    """(directive for this step, override choice or −1)."""
    snap = view.snapshot
    latest, _ = self.system2.latest()
    # Called on every step: the navigator also needs to see the menu close.
    decided = self.menu.decide(view) if self.menu is not None else None
    if snap.menu_open:
      if self._menu_opened_at is None:
        self._menu_opened_at = time.monotonic()
        self._menu_card = None
        self.system2.request_now()
      card, source = decided if decided is not None else (None, None)
      waiting = card == MENU_NOOP
      if card is None or waiting:
        card = None
        if latest is not None and latest.name == "pick_card" and (
            latest.issued_at >= self._menu_opened_at):
          card, source = latest.card, source or f"system2:{latest.source}"
      if card is None or not view.mask[card]:
        card, source = planner_lib.preferred_card(snap.menu_cards), source or "rule"
      if self._menu_card != (card, source):
        self._menu_card = (card, source)
        directive = planner_lib.make_directive("pick_card", snap, card=card, source=source)
      else:
        directive = self._directive
      if waiting:  # the navigator is still thinking: hold the menu open
        return directive, MENU_NOOP
      return directive, card if self.menu_override else -1
    if self._menu_opened_at is not None:  # the menu just closed: ask for a fresh plan
      self._menu_opened_at = None
      self.system2.request_now()
    if latest is None or latest.name == "pick_card":
      if self._directive is None or self._directive.name == "pick_card":
        return dataclasses.replace(self.rule.plan(snap), source="bootstrap"), -1
      return self._directive, -1
    return latest, -1

  def _target_reached(self, view: GameView, directive: planner_lib.Directive) -> bool:
    if directive.target is None:
      return False
    dist = np.linalg.norm(np.asarray(view.snapshot.player_pos) - np.asarray(directive.target))
    return bool(dist <= self.goto_radius)

  def run(self, num_steps: int) -> LoopStats:
    """Runs `num_steps` control steps at the controller's rate. Python's cyclic garbage
    collector is paused meanwhile (a collection can take tens of ms) and run after."""
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
      return self._run(num_steps)
    finally:
      if gc_was_enabled:
        gc.enable()
      gc.collect()

  def _run(self, num_steps: int) -> LoopStats:
    latencies = np.zeros(num_steps)
    sources: dict[str, int] = {}
    menu_sources: dict[str, int] = {}
    start = self.clock()
    next_tick = start
    for i in range(num_steps):
      t0 = self.clock()
      view = self.game.observe()
      if self.recorder is not None:
        self.recorder.complete(view)
      self.system2.publish(view.snapshot)
      directive, override = self._choose_directive(view)
      if directive is not self._directive:
        self._directive, self._age = directive, 0
        sources[directive.source] = sources.get(directive.source, 0) + 1
        if directive.name == "pick_card":
          menu_sources[directive.source] = menu_sources.get(directive.source, 0) + 1
      out = self.motor.act(view.base_obs, view.mask, view.is_first, directive, self._age,
                           view.snapshot.player_pos, override)
      self.game.act(out.move, out.choice)
      if self.recorder is not None:
        self.recorder.begin(view, out, directive)
      self._age += 1
      if self._requested is not directive and (
          self._target_reached(view, directive) or self._age >= self.motor.horizon):
        self._requested = directive  # once per directive: System 2 keeps its own pace
        self.system2.request_now()
      latencies[i] = self.clock() - t0
      next_tick += self.period
      wait = next_tick - self.clock()
      if wait > 0:
        self.sleep(wait)
      elif wait < -self.period:  # more than a period behind: drop the backlog, keep the rate
        next_tick = self.clock()
    wall = self.clock() - start
    return LoopStats(num_steps, wall, latencies, self.period, sources, menu_sources,
                     self.system2.stats)
