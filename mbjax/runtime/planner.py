"""System 2 of the dual-system runtime: planners that turn game snapshots into directives,
and the worker thread that runs them at a low rate without ever blocking System 1.

A `Directive` names one entry of the fixed vocabulary `directives.DIRECTIVES` (hunt, flee,
collect_gem, goto, pick_card) with an optional world-space target or menu slot, plus the
subgoal text. Its motor embedding is the vocabulary index (a one-hot; see
`mbjax/envs/bonk_arena/directives.py`), identical in every process. Free text (an LLM's
subgoal, its reasons) is embedded by `text_embedding`, a stable BLAKE2b digest rather than
Python's per-process salted `hash()` (upstream seeded its directive vector from `hash(text)`,
so the same subgoal meant something else after every restart).

Planners (`plan(snapshot) -> Directive`, blocking, may raise):
* `RulePlanner` — built in and pure: menu open → pick the preferred card; low health with
  an enemy close → flee; a gem near → collect it; enemies about → hunt; else go to the
  centre.
* `LLMPlanner` — asks an LLM/VLM (the shared `mbjax.runtime.llm.ChatClient`, OpenAI or
  Ollama protocol) for one directive as JSON under `REPLY_SCHEMA`, with the snapshot as JSON
  and optionally the frame; `parse_reply` checks the reply against the game (a gem to
  collect, a card on offer) and raises `InvalidDirective` otherwise.

`System2` runs a planner on a daemon thread at `rate_hz` (default 0.5 Hz, upstream's
strategist rate). The control loop only `publish`es its newest snapshot (a reference swap)
and reads `latest()` (the newest directive, swapped in whole under a lock); a planning call
that takes seconds delays the next directive, never a control step. A failed or invalid
plan is logged and replaced by the fallback planner's directive (the rule planner by
default), so System 1 always has a directive. `request_now()` asks for a plan before the
next due time (the controller calls it when the menu opens or a target is reached).

Differs from upstream (`upstream_runtime.md` §4.1): planning is asynchronous (upstream's
strategist call ran inside the worker loop and stalled it for the LLM's latency), LLM errors
fall back instead of propagating out of the step, and replies are schema-validated.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
import time
from typing import Callable, Protocol

import numpy as np
from absl import logging

from mbjax.envs.bonk_arena import directives
from mbjax.envs.bonk_arena.game import CARDS, CARDS_PER_MENU
from mbjax.envs.bonk_arena.policies import CARD_PREFERENCE
from mbjax.runtime import llm

DIRECTIVE_TEXT = {
    "hunt": "hunt the nearest enemies",
    "flee": "flee from the nearest enemies",
    "collect_gem": "collect the gem at ({x:.2f}, {y:.2f})",
    "goto": "move to ({x:.2f}, {y:.2f})",
    "pick_card": "pick card {card} ({name})",
}
TEXT_EMBEDDING_SIZE = 16


def text_embedding(text: str, size: int = TEXT_EMBEDDING_SIZE) -> np.ndarray:
  """A unit vector f32[size] determined by the UTF-8 bytes of `text` alone.

  BLAKE2b in counter mode (block i keyed by salt i) gives 4 bytes per dimension, read as
  little-endian uint32 and mapped to [-1, 1); the vector is then L2-normalised. Same text →
  same vector in every process, on every platform.
  """
  if size < 1:
    raise ValueError(f"text_embedding size={size}: expected >= 1")
  data = text.encode("utf-8")
  blocks, need = [], 4 * size
  for i in range(-(-need // 64)):
    blocks.append(hashlib.blake2b(data, digest_size=64, salt=i.to_bytes(16, "little"),
                                  person=b"mbjax-directive").digest())
  words = np.frombuffer(b"".join(blocks)[:need], dtype="<u4").astype(np.float64)
  vector = words / 2.0**31 - 1.0
  return (vector / max(np.linalg.norm(vector), 1e-12)).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class GameSnapshot:
  """What System 2 sees of the game: world units (x right, y down), no JAX arrays."""

  player_pos: tuple[float, float]
  health_frac: float
  menu_open: bool
  menu_cards: tuple[str, ...]  # names of the offered cards (empty while closed)
  enemies: np.ndarray  # f32[N, 2] positions of live enemies
  gems: np.ndarray  # f32[M, 2] positions of gems on the ground (empty over the bridge)
  arena_size: float = 24.0
  game_time_s: float = 0.0
  frame: np.ndarray | None = None  # uint8[H, W, 3] when the game provides one

  def __post_init__(self):
    for name in ("enemies", "gems"):
      value = np.asarray(getattr(self, name), np.float32).reshape(-1, 2)
      object.__setattr__(self, name, value)

  def nearest(self, points: np.ndarray) -> tuple[int, float]:
    """(index, distance) of the point nearest the player; (-1, inf) when there is none."""
    if len(points) == 0:
      return -1, float("inf")
    dist = np.linalg.norm(points - np.asarray(self.player_pos, np.float32), axis=-1)
    i = int(np.argmin(dist))
    return i, float(dist[i])

  def summary(self, max_entities: int = 8) -> dict:
    """The snapshot as JSON-ready data in normalised coordinates ([0, 1]², top-left origin),
    nearest entities first — the LLM planner's prompt."""
    size = self.arena_size

    def entities(points):
      if len(points) == 0:
        return []
      dist = np.linalg.norm(points - np.asarray(self.player_pos, np.float32), axis=-1)
      order = np.argsort(dist, kind="stable")[:max_entities]
      return [[round(float(points[i, 0]) / size, 3), round(float(points[i, 1]) / size, 3),
               round(float(dist[i]) / size, 3)] for i in order]

    return {
        "player": [round(self.player_pos[0] / size, 3), round(self.player_pos[1] / size, 3)],
        "health": round(float(self.health_frac), 3),
        "menu_open": bool(self.menu_open),
        "cards": list(self.menu_cards),
        "enemies_xy_dist": entities(self.enemies),
        "enemy_count": int(len(self.enemies)),
        "gems_xy_dist": entities(self.gems),
        "game_time_s": round(float(self.game_time_s), 2),
    }


@dataclasses.dataclass(frozen=True)
class Directive:
  """One System 2 decision; immutable, so swapping it in is atomic."""

  index: int  # into directives.DIRECTIVES
  target: tuple[float, float] | None = None  # world position (goto, collect_gem)
  card: int = 0  # menu slot (pick_card)
  text: str = ""
  source: str = "rule"  # which planner produced it ("rule", "llm", "fallback", "menu")
  issued_at: float = 0.0  # time.monotonic()

  def __post_init__(self):
    if not 0 <= self.index < directives.NUM_DIRECTIVES:
      raise ValueError(f"Directive.index={self.index}: expected 0..{directives.NUM_DIRECTIVES - 1}")
    if not 0 <= self.card < CARDS_PER_MENU:
      raise ValueError(f"Directive.card={self.card}: expected a menu slot 0..2")

  @property
  def name(self) -> str:
    return directives.DIRECTIVES[self.index]

  @property
  def embedding(self) -> np.ndarray:
    """The motor's directive embedding: one-hot over the vocabulary."""
    return np.eye(directives.NUM_DIRECTIVES, dtype=np.float32)[self.index]

  @property
  def text_embedding(self) -> np.ndarray:
    return text_embedding(self.text)



def make_directive(name: str, snapshot: GameSnapshot, *, target=None, card: int = 0,
                   source: str = "rule", text: str | None = None) -> Directive:
  """A directive with its canonical subgoal text (`DIRECTIVE_TEXT`, normalised coords)."""
  index = directives.DIRECTIVES.index(name)
  if text is None:
    x, y = ((target[0] / snapshot.arena_size, target[1] / snapshot.arena_size)
            if target is not None else (0.0, 0.0))
    card_name = snapshot.menu_cards[card] if card < len(snapshot.menu_cards) else "?"
    text = DIRECTIVE_TEXT[name].format(x=x, y=y, card=card, name=card_name)
  target = None if target is None else (float(target[0]), float(target[1]))
  return Directive(index, target, int(card), text, source, time.monotonic())


def preferred_card(cards: tuple[str, ...]) -> int:
  """The slot of the most preferred offered card (the scripted policy's preference)."""
  scores = [CARD_PREFERENCE[CARDS.index(c)] if c in CARDS else -1.0 for c in cards]
  return int(np.argmax(scores)) if scores else 0


class Planner(Protocol):
  def plan(self, snapshot: GameSnapshot) -> Directive:
    ...


@dataclasses.dataclass(frozen=True)
class RulePlanner:
  """The built-in planner (pure): the first rule that fires, in the order of the table in
  the module docstring. Distances in world units."""

  flee_health: float = 0.35  # flee below this health fraction ...
  danger_radius: float = 6.0  # ... when an enemy is this close
  gem_radius: float = 8.0  # collect gems this close

  def plan(self, snapshot: GameSnapshot) -> Directive:
    if snapshot.menu_open:
      return make_directive("pick_card", snapshot, card=preferred_card(snapshot.menu_cards))
    _, enemy_dist = snapshot.nearest(snapshot.enemies)
    if snapshot.health_frac < self.flee_health and enemy_dist <= self.danger_radius:
      return make_directive("flee", snapshot)
    gem, gem_dist = snapshot.nearest(snapshot.gems)
    if gem_dist <= self.gem_radius:
      return make_directive("collect_gem", snapshot, target=snapshot.gems[gem])
    if len(snapshot.enemies):
      return make_directive("hunt", snapshot)
    centre = (snapshot.arena_size / 2, snapshot.arena_size / 2)
    return make_directive("goto", snapshot, target=centre)


# -- the LLM/VLM planner --------------------------------------------------------------------

REPLY_SCHEMA = {
    "type": "object",
    "properties": {
        "directive": {"type": "string", "enum": list(directives.DIRECTIVES)},
        "target": {"type": "array", "items": {"type": "number", "minimum": 0.0, "maximum": 1.0},
                   "minItems": 2, "maxItems": 2},
        "card": {"type": "integer", "minimum": 0, "maximum": 2},
        "reason": {"type": "string", "maxLength": 500},
    },
    "required": ["directive"],
    "additionalProperties": False,
}

SYSTEM_PROMPT = (
    "You are System 2, the planner of an agent playing BonkArena, a survivors-like arena: "
    "enemies chase the player, the player attacks the nearest enemy in range automatically, "
    "kills drop XP gems, and enough XP opens a level-up menu offering 3 cards. Every couple "
    "of seconds choose ONE directive for the motor controller:\n"
    "- hunt: close in on the nearest enemies so the auto-attack kills them\n"
    "- flee: get away from the nearest enemies\n"
    "- collect_gem: walk to a gem; target = that gem's [x, y]\n"
    "- goto: walk to target [x, y]\n"
    "- pick_card: only while the menu is open; card = the slot 0, 1 or 2 to take\n"
    "Coordinates are normalised to [0, 1] (x right, y down). Reply with JSON only: "
    '{"directive": ..., "target": [x, y] (goto, collect_gem), "card": slot (pick_card), '
    '"reason": short}.')


class InvalidDirective(ValueError):
  """A schema-valid reply that does not fit the game (no gem, card not on offer, ...)."""


def parse_reply(value: dict, snapshot: GameSnapshot, source: str = "llm") -> Directive:
  """Maps a schema-valid reply onto a feasible directive, or raises `InvalidDirective`
  naming what does not fit. collect_gem snaps to the real gem nearest the target (nearest
  the player without one)."""
  name = value["directive"]
  target = value.get("target")
  reason = str(value.get("reason", ""))
  if snapshot.menu_open and name != "pick_card":
    raise InvalidDirective(f"directive {name!r} while the level-up menu is open: expected "
                           "pick_card")
  if name == "pick_card":
    if not snapshot.menu_open:
      raise InvalidDirective("pick_card while the menu is closed")
    card = value.get("card")
    if card is None or not 0 <= card < len(snapshot.menu_cards):
      raise InvalidDirective(f"pick_card card={card!r}: expected a slot in "
                             f"0..{len(snapshot.menu_cards) - 1}")
    return make_directive(name, snapshot, card=int(card), source=source)
  world = None if target is None else np.asarray(target, np.float32) * snapshot.arena_size
  if name == "goto":
    if world is None:
      raise InvalidDirective("goto without a target: expected target [x, y] in [0, 1]")
    return make_directive(name, snapshot, target=world, source=source)
  if name == "collect_gem":
    if len(snapshot.gems) == 0:
      raise InvalidDirective("collect_gem but there is no gem on the ground")
    anchor = np.asarray(snapshot.player_pos, np.float32) if world is None else world
    gem = int(np.argmin(np.linalg.norm(snapshot.gems - anchor, axis=-1)))
    return make_directive(name, snapshot, target=snapshot.gems[gem], source=source)
  directive = make_directive(name, snapshot, source=source)
  if reason:  # keep the model's own words with the canonical text
    directive = dataclasses.replace(directive, text=f"{directive.text}: {reason}")
  return directive


class LLMPlanner:
  """Asks a chat backend for a directive (blocking: run it on `System2`'s thread)."""

  def __init__(self, client: llm.ChatClient, goal: str = "survive and level up",
               send_frame: bool = False):
    self.client = client
    self.goal = goal
    self.send_frame = send_frame

  def messages(self, snapshot: GameSnapshot) -> list[dict]:
    state = json.dumps({"goal": self.goal, **snapshot.summary()}, separators=(",", ":"))
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": f"Game state: {state}\nYour directive (JSON):"}]

  def plan(self, snapshot: GameSnapshot) -> Directive:
    images = [snapshot.frame] if self.send_frame and snapshot.frame is not None else []
    value = self.client.chat_json(self.messages(snapshot), REPLY_SCHEMA, images)
    return parse_reply(value, snapshot)


# -- the worker ---------------------------------------------------------------------------

@dataclasses.dataclass
class System2Stats:
  plans: int = 0  # directives the planner produced
  fallbacks: int = 0  # plans replaced by the fallback planner's
  latencies_s: list = dataclasses.field(default_factory=list)  # per planner call
  errors: list = dataclasses.field(default_factory=list)  # the last few failure messages


class System2:
  """Runs `planner` on a daemon thread at most every `1 / rate_hz` seconds.

  The control loop calls `publish(snapshot)` and `latest()`; both only swap or read a
  reference under a lock that the worker holds for no longer than a swap.
  """

  def __init__(self, planner: Planner, rate_hz: float = 0.5,
               fallback: Planner | None = None, clock: Callable[[], float] = time.monotonic):
    if rate_hz <= 0:
      raise ValueError(f"System2 rate_hz={rate_hz}: expected > 0")
    self.planner = planner
    self.fallback = fallback if fallback is not None else RulePlanner()
    self.period = 1.0 / rate_hz
    self.clock = clock
    self.stats = System2Stats()
    self._lock = threading.Lock()
    self._wake = threading.Event()
    self._stop = threading.Event()
    self._snapshot: GameSnapshot | None = None
    self._directive: Directive | None = None
    self._version = 0
    self._thread = threading.Thread(target=self._run, name="system2", daemon=True)

  def start(self) -> "System2":
    self._thread.start()
    return self

  def close(self, timeout: float = 0.0) -> None:
    """Stops planning; does not wait for a call in progress unless `timeout` > 0."""
    self._stop.set()
    self._wake.set()
    if timeout > 0:
      self._thread.join(timeout)

  def __enter__(self):
    return self.start()

  def __exit__(self, *exc):
    self.close()

  def publish(self, snapshot: GameSnapshot) -> None:
    with self._lock:
      first = self._snapshot is None
      self._snapshot = snapshot
    if first:
      self._wake.set()

  def request_now(self) -> None:
    self._wake.set()

  def latest(self) -> tuple[Directive | None, int]:
    """(newest directive, its version); version counts directives issued so far."""
    with self._lock:
      return self._directive, self._version

  def _run(self) -> None:
    next_due = self.clock()
    while not self._stop.is_set():
      self._wake.wait(max(next_due - self.clock(), 0.0))
      self._wake.clear()
      if self._stop.is_set():
        return
      with self._lock:
        snapshot = self._snapshot
      if snapshot is None:
        next_due = self.clock() + self.period
        continue
      start = self.clock()
      directive = self._plan(snapshot)
      self.stats.latencies_s.append(self.clock() - start)
      with self._lock:
        self._directive = directive
        self._version += 1
      next_due = start + self.period

  def _plan(self, snapshot: GameSnapshot) -> Directive:
    try:
      directive = self.planner.plan(snapshot)
      self.stats.plans += 1
      return directive
    except (llm.LLMError, InvalidDirective) as e:
      reason = f"{type(e).__name__}: {e}"
    except Exception as e:  # a planner bug must not leave System 1 without directives
      reason = f"unexpected {type(e).__name__}: {e}"
    logging.warning("System 2 planner failed (%s); using the fallback planner", reason)
    self.stats.fallbacks += 1
    self.stats.errors = (self.stats.errors + [reason])[-8:]
    return dataclasses.replace(self.fallback.plan(snapshot), source="fallback")
