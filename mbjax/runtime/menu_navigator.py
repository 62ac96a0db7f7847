"""VLM menu navigation: the frame and a goal go to a vision-language model, its click comes back.

When BonkArena's level-up menu (or a BonkLink menu) is on screen, `MenuNavigator.step` sends
the rendered frame and the goal text to the VLM backend (`mbjax.runtime.llm.AsyncChat`,
OpenAI-compatible or Ollama protocol) and turns the reply into an action. Replies follow
`menu_schema`, with upstream's three action names (`upstream_runtime.md` §5):

  {"action": "click", "card": i}            card i of the menu, 0 = leftmost
  {"action": "click_xy", "x": u, "y": v}    a click at normalised frame coordinates,
                                            top-left origin, u, v in [0, 1]
  {"action": "noop"}                        do nothing
  (each may carry "reason": a short string)

A reply is *valid* when it satisfies the schema and the menu: a `click` needs a card that is
offered and allowed by the action mask, a `click_xy` must land inside an allowed card's box
(`CardLayout`, the renderer's card rectangles; a click on a border or on empty screen picks
nothing, and on a masked card is refused), a `noop` is always valid. Upstream's
`click(target_text)` is replaced by the card index because BonkArena's cards are told apart
by colour and position, not by text.

Decisions map to the two action interfaces:
- in process: `MenuDecision.menu_choice`, the BonkArena discrete-branch value (0..2 a card,
  3 the no-op; the 33-way UI-click index is `env.ui_click_from_menu_choice` of it);
- through the bridge: `bonklink_action(decision, layout, frame_size, capture_size)`, a
  `codec.Action` with `ui_click` at the card's centre or the clicked point, converted with
  `coords.top_left_to_bonklink` (bottom-left capture pixels, as BonkLink.cs expects).

Never blocking: `step` submits at most one request per menu opening and returns at once.
Until the reply arrives the decision is "wait" (the no-op: BonkArena pauses the game while the
menu is open, so waiting costs menu steps, not game time). The caller's fallback choice (the
scripted card pick, or the trained policy's masked choice) is used instead, logged with the
reason, when the reply is late (`deadline_s` after the menu opened), the backend is absent
(connection refused, or no backend configured), answers with an error, or answers something
invalid. One VLM decision per opening: a chosen card is repeated while the menu still
looks open for up to `settle_s` (through the bridge the state showing the click's effect
arrives a packet or more later; a repeated click on a closed menu does nothing), after which
— and right after a `noop` — the steps of that opening take the fallback, so a model that
keeps saying noop cannot hold the game in the menu.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

import numpy as np
from absl import logging

from mbjax.bridge import codec, coords
from mbjax.runtime import llm

ACTIONS = ("click", "click_xy", "noop")
NOOP_CHOICE = 3  # BonkArena's menu-branch no-op (`env.MENU_NOOP`)
DEFAULT_GOAL = ("Pick the level-up card that best helps the player survive and kill enemies "
                "(damage and attack speed first).")


def menu_schema(num_cards: int = 3) -> dict:
  """JSON schema of a navigator reply (the combination rules are checked by `parse_reply`)."""
  return {
      "type": "object",
      "properties": {
          "action": {"type": "string", "enum": list(ACTIONS)},
          "card": {"type": "integer", "minimum": 0, "maximum": num_cards - 1},
          "x": {"type": "number", "minimum": 0, "maximum": 1},
          "y": {"type": "number", "minimum": 0, "maximum": 1},
          "reason": {"type": "string", "maxLength": 500},
      },
      "required": ["action"],
      "additionalProperties": False,
  }


@dataclasses.dataclass(frozen=True)
class CardLayout:
  """Where the menu's cards are on screen: `boxes[y, x]` = card index, −1 for none."""

  boxes: np.ndarray  # i32[H, W]

  @classmethod
  def from_renderer(cls, renderer) -> "CardLayout":
    """BonkArena's layout (`render.Renderer.menu_boxes`: 0..2 card interiors, 3 borders)."""
    boxes = np.asarray(renderer.menu_boxes).reshape(renderer.size, renderer.size)
    return cls(np.where(boxes <= 2, boxes, -1).astype(np.int32))

  @property
  def size(self) -> tuple[int, int]:
    """(width, height) in pixels."""
    return self.boxes.shape[1], self.boxes.shape[0]

  def card_at(self, x: float, y: float) -> int:
    """The card under normalised (x, y) (top-left origin), or −1."""
    w, h = self.size
    col, row = min(int(x * w), w - 1), min(int(y * h), h - 1)
    return int(self.boxes[row, col])

  def centre(self, card: int) -> tuple[float, float]:
    """Normalised centre of a card's box (pixel centres, top-left origin)."""
    ys, xs = np.nonzero(self.boxes == card)
    if xs.size == 0:
      raise ValueError(f"card {card} is not in the layout (cards "
                       f"{sorted(set(np.unique(self.boxes)) - {-1})})")
    w, h = self.size
    return float((xs.mean() + 0.5) / w), float((ys.mean() + 0.5) / h)


@dataclasses.dataclass(frozen=True)
class MenuDecision:
  """What to do on this menu step."""

  kind: str  # "card" (a card is chosen), "noop", or "wait" (a reply is pending)
  source: str  # "vlm", "fallback" or "pending"
  card: int | None = None  # the chosen card, when kind == "card"
  click_norm: tuple[float, float] | None = None  # where the VLM clicked (click_xy only)
  reason: str = ""  # the VLM's reason, or why the fallback was taken

  @property
  def menu_choice(self) -> int:
    """BonkArena's discrete menu-branch value: the card, else the no-op (3)."""
    return self.card if self.kind == "card" else NOOP_CHOICE


def parse_reply(value: dict, mask: np.ndarray, layout: CardLayout) -> MenuDecision:
  """A schema-valid reply → a decision, or ValueError when it does not fit the menu.
  `mask` is bool[num_cards + 1] (BonkArena's `action_mask`; the last entry is the no-op)."""
  mask = np.asarray(mask, bool)
  num_cards = mask.shape[0] - 1
  action, reason = value.get("action"), str(value.get("reason", ""))
  if action == "noop":
    return MenuDecision("noop", "vlm", reason=reason)
  if action == "click":
    if "card" not in value:
      raise ValueError("a 'click' needs a 'card'")
    card = int(value["card"])
    if not 0 <= card < num_cards or not mask[card]:
      raise ValueError(f"card {card} is not allowed (mask {mask[:num_cards].tolist()})")
    return MenuDecision("card", "vlm", card=card, reason=reason)
  if action == "click_xy":
    if "x" not in value or "y" not in value:
      raise ValueError("a 'click_xy' needs 'x' and 'y'")
    x, y = float(value["x"]), float(value["y"])
    card = layout.card_at(x, y)
    if card < 0:
      raise ValueError(f"click_xy at ({x:.3f}, {y:.3f}) hits no card")
    if card >= num_cards or not mask[card]:
      raise ValueError(f"click_xy at ({x:.3f}, {y:.3f}) hits card {card}, which is not "
                       f"allowed (mask {mask[:num_cards].tolist()})")
    return MenuDecision("card", "vlm", card=card, click_norm=(x, y), reason=reason)
  raise ValueError(f"unknown action {action!r}: expected one of {ACTIONS}")


def menu_messages(goal: str, card_names: Sequence[str] = (), state_hint: str = "") -> list[dict]:
  """The system and user messages of one request (the frame is attached by the client)."""
  cards = ("Cards on offer, left to right: " + ", ".join(
      f"{i}: {name}" for i, name in enumerate(card_names)) + ".\n") if card_names else ""
  return [
      {"role": "system", "content": (
          "You navigate a game's menus from screenshots. The level-up menu shows cards as "
          "coloured boxes in a row across the middle of the screen. Answer with one JSON "
          'object: {"action": "click", "card": i} to pick card i (0 = leftmost), '
          '{"action": "click_xy", "x": u, "y": v} to click at u, v in [0, 1] from the '
          'top-left corner, or {"action": "noop"}; add "reason" in a few words.')},
      {"role": "user", "content": f"Goal: {goal}\n{cards}{state_hint}".strip()},
  ]


def bonklink_action(decision: MenuDecision, layout: CardLayout, frame_size: tuple[int, int],
                    capture_size: tuple[int, int] | None = None,
                    move: tuple[float, float] = (0.0, 0.0)) -> codec.Action:
  """The BonkLink action for a decision: a `ui_click` at the clicked point (click_xy) or the
  card's centre (click, fallback), in the plugin's bottom-left capture pixels; no click for
  noop/wait. `frame_size` = (width, height) of the frames the client receives."""
  if decision.kind != "card":
    return codec.Action(move_x=move[0], move_y=move[1])
  u, v = decision.click_norm or layout.centre(decision.card)
  fw, fh = frame_size
  x, y = coords.top_left_to_bonklink(u * fw, v * fh, frame_size, capture_size)
  return codec.Action(move_x=move[0], move_y=move[1], ui_click=True, click_x=x, click_y=y)


class MenuNavigator:
  """Per-step menu decisions from a VLM, with a fallback; `step` never blocks."""

  def __init__(self, chat: llm.AsyncChat | None, layout: CardLayout, goal: str = DEFAULT_GOAL,
               deadline_s: float = 2.0, settle_s: float = 0.5):
    if not deadline_s > 0 or settle_s < 0:
      raise ValueError(f"deadline_s={deadline_s}, settle_s={settle_s}: expected > 0 and >= 0")
    self.chat, self.layout, self.goal = chat, layout, goal
    self.deadline_s, self.settle_s = deadline_s, settle_s
    self._opened_at: float | None = None  # when the current menu opening was first seen
    self._asked = False  # a request was submitted for this opening
    self._resolved = False  # this opening already had its VLM (or fallback) decision
    self._decision: MenuDecision | None = None  # the VLM's card decision for this opening
    self._decided_at = 0.0
    self.counts = {"vlm": 0, "fallback": 0, "wait": 0, "repeat": 0}

  def _fallback(self, choice: int, mask: np.ndarray, why: str) -> MenuDecision:
    self._resolved = True
    self.counts["fallback"] += 1
    logging.warning("menu navigator fell back to choice %d: %s", choice, why)
    return (MenuDecision("card", "fallback", card=int(choice), reason=why)
            if choice < mask.shape[0] - 1 and mask[choice]
            else MenuDecision("noop", "fallback", reason=why))

  def step(self, menu_open: bool, frame: np.ndarray | Callable[[], np.ndarray],
           mask: np.ndarray, fallback_choice: int, card_names: Sequence[str] = (),
           state_hint: str = "") -> MenuDecision | None:
    """One control step. Returns None when no menu is open (the caller's policy acts),
    else the menu decision. `frame` may be a callable, rendered only when a request is sent
    (None: no frame yet — the navigator waits for one until the deadline);
    `fallback_choice` is the menu-branch value to take when the VLM cannot decide."""
    if not menu_open:
      if self._asked and self.chat is not None:
        self.chat.poll()  # drop a reply for a menu that is gone
      self._opened_at, self._asked, self._resolved = None, False, False
      self._decision = None
      return None
    mask = np.asarray(mask, bool)
    now = time.monotonic()
    if self._opened_at is None:
      self._opened_at = now
    if self._resolved:
      if self._decision is not None and now - self._decided_at <= self.settle_s:
        self.counts["repeat"] += 1
        return self._decision
      return self._fallback(fallback_choice, mask, "the VLM's decision did not close the menu")
    if self.chat is None:
      return self._fallback(fallback_choice, mask, "no VLM backend configured")
    if not self._asked:
      self.chat.poll()  # a stale reply from an earlier opening is not for this menu
      if self.chat.in_flight:  # the previous opening's request has not finished yet
        return self._wait_or_fallback(now, mask, fallback_choice)
      image = frame() if callable(frame) else frame
      if image is None:  # e.g. the bridge has not delivered a frame yet
        return self._wait_or_fallback(now, mask, fallback_choice)
      self._asked = self.chat.submit(menu_messages(self.goal, card_names, state_hint),
                                     menu_schema(mask.shape[0] - 1), images=[image])
    reply = self.chat.poll()
    if reply is None:
      return self._wait_or_fallback(now, mask, fallback_choice)
    if reply.error is not None:
      return self._fallback(fallback_choice, mask,
                            f"{type(reply.error).__name__}: {reply.error}")
    try:
      decision = parse_reply(reply.value, mask, self.layout)
    except ValueError as e:
      return self._fallback(fallback_choice, mask,
                            f"invalid reply from {self.chat.client.cfg.endpoint}: {e}")
    if reply.latency_s > self.deadline_s:  # arrived late, between two of our steps
      return self._fallback(fallback_choice, mask, f"the reply came after the deadline "
                            f"({reply.latency_s:.2f} s > deadline_s={self.deadline_s})")
    self._resolved = True
    if decision.kind == "card":
      self._decision, self._decided_at = decision, now
    self.counts["vlm"] += 1
    logging.info("menu navigator: VLM chose %s after %.2f s (%s)",
                 decision.card if decision.kind == "card" else "noop", reply.latency_s,
                 decision.reason)
    return decision

  def _wait_or_fallback(self, now: float, mask: np.ndarray, choice: int) -> MenuDecision:
    waited = now - self._opened_at
    if waited > self.deadline_s:
      return self._fallback(choice, mask, f"no reply within deadline_s={self.deadline_s} "
                            f"({waited:.2f} s)")
    self.counts["wait"] += 1
    return MenuDecision("wait", "pending")
