"""VLM menu navigation on BonkArena's level-up menu, against a loopback VLM backend.

Acceptance (issue 9 item 4): valid replies map to the right card or click (in process and as
a BonkLink click); invalid, slow and failing replies fall back to the scripted card pick
without stalling a game loop that calls the navigator every step.
"""
import base64
import io
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mbjax.bridge import coords
from mbjax.envs.bonk_arena import BonkArena, game
from mbjax.envs.bonk_arena.policies import CARD_PREFERENCE
from mbjax.envs.spaces import HybridAction
from mbjax.runtime import llm
from mbjax.runtime import menu_navigator as nav
from mbjax.runtime.reference_llm_server import (ReferenceLLMServer, last_user_text,
                                                request_images)

PIXELS = 64
MASK_ALL = np.array([True, True, True, True])
# BonkArena at 64 px: cards are 16 px boxes at x = 4, 24, 44 (interiors 5..18, 25..38,
# 45..58), rows 24..39 (interiors 25..38); pixel-centre of card 0's interior = (12, 32).
CENTRES = [(12 / 64, 0.5), (32 / 64, 0.5), (52 / 64, 0.5)]


@pytest.fixture(scope="module")
def arena():
  env = BonkArena(observation="vector", pixel_size=PIXELS)
  # A runtime's menu waits for the navigator (the dual-system game's dwell limit).
  params = env.default_params().replace(menu_dwell_limit=game.RUNTIME_MENU_DWELL)
  # Standing still keeps the loop to one env-step compile; the menu choice is the navigator's.
  step = jax.jit(lambda key, state, choice: env.step(
      key, state, HybridAction(jnp.zeros((2,)), choice[None]), params)[1])
  render = jax.jit(lambda state: env.render(state, params))
  _, state = jax.jit(env.reset)(jax.random.PRNGKey(0), params)  # eager: ~10x slower
  # Damage in the middle: the scripted pick (damage first) is slot 1.
  menu_state = state.replace(menu_open=jnp.array(True), menu_cards=jnp.array(
      [game.CARDS.index("max_health"), game.CARDS.index("damage"), game.CARDS.index("range")]))
  jax.block_until_ready((render(menu_state), step(jax.random.PRNGKey(1), state, jnp.int32(3))))
  return dict(env=env, step=step, render=render, state=state, menu_state=menu_state,
              layout=nav.CardLayout.from_renderer(env.renderer))


def _scripted_choice(state) -> int:
  """The scripted policy's card rule (`policies.scripted_policy`): the most preferred card."""
  return int(np.argmax(np.asarray(CARD_PREFERENCE)[np.asarray(state.menu_cards)]))


def _fixed(status, text):
  return lambda body: (status, text)


def _navigator(server_url, layout, deadline_s=1.0, timeout_s=2.0):
  cfg = llm.BackendConfig(protocol="ollama", base_url=server_url, model="vlm",
                          timeout_s=timeout_s)
  return nav.MenuNavigator(llm.AsyncChat(llm.ChatClient(cfg)), layout, deadline_s=deadline_s)


def _decide(navigator, frame, mask=MASK_ALL, fallback=1, seconds=3.0):
  """Steps the navigator on an open menu until it decides (not "wait")."""
  deadline = time.monotonic() + seconds
  while time.monotonic() < deadline:
    decision = navigator.step(True, frame, mask, fallback)
    if decision.kind != "wait":
      return decision
    time.sleep(0.005)
  raise AssertionError("the navigator never decided")


# -- pure parts -----------------------------------------------------------------------------

def test_layout_matches_the_rendered_boxes(arena):
  layout = arena["layout"]
  assert layout.size == (64, 64)
  for card, centre in enumerate(CENTRES):
    assert layout.centre(card) == pytest.approx(centre)
    assert layout.card_at(*centre) == card
  assert layout.card_at(4.5 / 64, 0.5) == -1  # card 0's white border
  assert layout.card_at(0.5, 0.1) == -1  # empty screen above the menu
  # The rendered frame really has card colours there and the border around them.
  frame = np.asarray(arena["render"](arena["menu_state"]))
  assert (frame[32, 4] == 255).all() and not (frame[32, 12] == frame[32, 32]).all()


@pytest.mark.parametrize("reply, mask, expected", [
    ({"action": "click", "card": 2}, MASK_ALL, ("card", 2, None)),
    ({"action": "click_xy", "x": 0.5, "y": 0.45}, MASK_ALL, ("card", 1, (0.5, 0.45))),
    ({"action": "noop", "reason": "wait"}, MASK_ALL, ("noop", None, None)),
    ({"action": "click", "card": 1}, [True, False, True, True], "card 1 is not allowed"),
    ({"action": "click_xy", "x": 0.5, "y": 0.5}, [True, False, True, True],
     "hits card 1, which is not allowed"),
    ({"action": "click_xy", "x": 0.5, "y": 0.1}, MASK_ALL, "hits no card"),
    ({"action": "click"}, MASK_ALL, "needs a 'card'"),
    ({"action": "click_xy", "x": 0.5}, MASK_ALL, "needs 'x' and 'y'"),
])
def test_parse_reply(arena, reply, mask, expected):
  llm.validate(reply, nav.menu_schema())  # all of these pass the schema; the menu decides
  if isinstance(expected, str):
    with pytest.raises(ValueError, match=expected):
      nav.parse_reply(reply, np.array(mask), arena["layout"])
  else:
    decision = nav.parse_reply(reply, np.array(mask), arena["layout"])
    assert (decision.kind, decision.card, decision.click_norm) == expected
    assert decision.menu_choice == (expected[1] if expected[0] == "card" else 3)


def test_schema_rejects_out_of_range_and_unknown_actions():
  schema = nav.menu_schema()
  for bad in ({"action": "click", "card": 3}, {"action": "click_xy", "x": 1.2, "y": 0.5},
              {"action": "click", "target_text": "Play"}, {"action": "press"}):
    with pytest.raises(ValueError):
      llm.validate(bad, schema)


def test_bonklink_click_lands_on_the_card(arena):
  layout = arena["layout"]
  card0 = nav.MenuDecision("card", "vlm", card=0)
  # Capture 1280x720: (12, 32) frame px → (240, 360) capture px → y flipped: 720 − 1 − 360.
  action = nav.bonklink_action(card0, layout, (64, 64), (1280, 720), move=(0.5, 0.0))
  assert (action.ui_click, action.click_x, action.click_y, action.move_x) == (True, 240, 359,
                                                                              0.5)
  # Same-size capture, as the reference game server: its hit test finds the card again.
  for decision in (card0, nav.MenuDecision("card", "vlm", card=2, click_norm=(0.75, 0.55))):
    action = nav.bonklink_action(decision, layout, (64, 64))
    x, y = coords.bonklink_to_top_left(action.click_x, action.click_y, (64, 64))
    assert layout.boxes[y, x] == decision.card
  assert not nav.bonklink_action(nav.MenuDecision("wait", "pending"), layout, (64, 64)).ui_click


# -- against a loopback VLM -----------------------------------------------------------------

def _reddest_card(body):
  """A stand-in VLM that looks: decodes the frame and clicks the reddest card's centre."""
  from PIL import Image

  (data,) = request_images(body)
  frame = np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"), float)
  redness = [frame[26:38, int(64 * x) - 6:int(64 * x) + 6].mean(axis=(0, 1)) @ [1, -0.5, -0.5]
             for x, _ in CENTRES]
  x, y = CENTRES[int(np.argmax(redness))]
  return 200, f'{{"action": "click_xy", "x": {x}, "y": {y}, "reason": "most red"}}'


def test_a_looking_vlm_picks_the_damage_card_from_the_frame(arena):
  pytest.importorskip("PIL")
  frame = np.asarray(arena["render"](arena["menu_state"]))
  with ReferenceLLMServer(_reddest_card) as server:
    navigator = _navigator(server.url, arena["layout"])
    decision = _decide(navigator, frame, fallback=0)
  assert (decision.kind, decision.source, decision.card) == ("card", "vlm", 1)
  assert decision.click_norm == pytest.approx(CENTRES[1])
  body = server.requests[0]
  assert "Goal: Pick the level-up card" in last_user_text(body)
  assert body["format"] == nav.menu_schema()


@pytest.mark.parametrize("case, responder, delay_s, reason", [
    ("invalid_json", _fixed(200, "the red one"), 0.0, "LLMInvalidReply"),
    ("masked_card", _fixed(200, '{"action": "click", "card": 2}'), 0.0, "card 2 is not allowed"),
    ("http_500", _fixed(500, "overloaded"), 0.0, "LLMHTTPError"),
    ("slow", _fixed(200, '{"action": "click", "card": 0}'), 1.0, "no reply within deadline_s"),
])
def test_bad_backends_fall_back_with_a_logged_reason(arena, case, responder, delay_s, reason,
                                                     caplog):
  frame = np.asarray(arena["render"](arena["menu_state"]))
  mask = np.array([True, True, False, True])
  with ReferenceLLMServer(responder, delay_s=delay_s) as server:
    navigator = _navigator(server.url, arena["layout"], deadline_s=0.3)
    with caplog.at_level(logging.WARNING):
      decision = _decide(navigator, frame, mask, fallback=1)
  assert (decision.kind, decision.source, decision.card) == ("card", "fallback", 1), case
  assert reason in decision.reason
  assert any(reason in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


def test_a_card_decision_is_repeated_while_the_menu_settles(arena):
  """Through the bridge the state showing the click's effect arrives later: the same card is
  clicked again (harmless on a closed menu) for settle_s, then the fallback takes over."""
  with ReferenceLLMServer(_fixed(200, '{"action": "click", "card": 0}')) as server:
    navigator = _navigator(server.url, arena["layout"])
    navigator.settle_s = 0.1
    frame = np.zeros((PIXELS, PIXELS, 3), np.uint8)
    first = _decide(navigator, frame, fallback=2)
    again = navigator.step(True, frame, MASK_ALL, 2)
    assert (first.source, first.card) == (again.source, again.card) == ("vlm", 0)
    time.sleep(0.15)
    late = navigator.step(True, frame, MASK_ALL, 2)
    assert (late.source, late.card) == ("fallback", 2)
    assert navigator.step(False, frame, MASK_ALL, 2) is None  # closed: the next opening asks
    assert _decide(navigator, frame, fallback=2).source == "vlm"
  assert len(server.requests) == 2


def test_absent_backend_and_noop_loops_fall_back(arena):
  with ReferenceLLMServer(_fixed(200, '{"action": "noop"}')) as server:
    navigator = _navigator(server.url, arena["layout"])
    frame = np.zeros((PIXELS, PIXELS, 3), np.uint8)
    assert _decide(navigator, frame).kind == "noop"  # the VLM may say noop once ...
    second = navigator.step(True, frame, MASK_ALL, 2)  # ... then the menu is still open
    assert (second.source, second.card) == ("fallback", 2)
    assert "did not close the menu" in second.reason
    # No frame yet (a bridge that has not sent one): nothing is asked, then the deadline.
    blind = _navigator(server.url, arena["layout"], deadline_s=0.1)
    assert blind.step(True, None, MASK_ALL, 1).kind == "wait"
    decision = _decide(blind, None, fallback=1)
    assert (decision.source, decision.card) == ("fallback", 1)
    assert len(server.requests) == 1  # only the first navigator's
  refused = _navigator(server.url, arena["layout"])  # the server is gone: connection refused
  decision = _decide(refused, frame, fallback=0)
  assert (decision.source, decision.card) == ("fallback", 0)
  assert "LLMUnavailable" in decision.reason
  offline = nav.MenuNavigator(None, arena["layout"])
  assert offline.step(True, frame, MASK_ALL, 3).kind == "noop"
  assert offline.step(False, frame, MASK_ALL, 3) is None


# -- the game loop never stalls -------------------------------------------------------------

@pytest.mark.parametrize("backend", ["good", "slow", "failing"])
def test_game_loop_never_stalls(arena, backend):
  """Plays BonkArena (standing still), opening the level-up menu every 25 steps;
  the navigator is consulted on every step and must return within a few milliseconds."""
  responder = (_fixed(500, "down") if backend == "failing"
               else _fixed(200, '{"action": "click", "card": 2}'))
  renders = []

  def frame_fn():
    renders.append(1)
    return np.asarray(arena["render"](state))

  with ReferenceLLMServer(responder, delay_s=1.0 if backend == "slow" else 0.0) as server:
    navigator = _navigator(server.url, arena["layout"], deadline_s=0.25)
    state, key = arena["state"], jax.random.PRNGKey(3)
    step_s, chosen, fallbacks, menus = [], [], [], 0
    start = time.monotonic()
    while menus < 3 or bool(state.menu_open):
      if time.monotonic() - start > 8.0:
        raise AssertionError(f"{backend}: the menus were not resolved ({chosen})")
      if menus < 3 and not bool(state.menu_open) and len(step_s) % 25 == 0:
        state = state.replace(menu_open=jnp.array(True),
                              menu_cards=arena["menu_state"].menu_cards)
        menus += 1
      mask = np.array([bool(state.menu_open)] * 3 + [True])
      fallback = _scripted_choice(state)
      t = time.perf_counter()
      decision = navigator.step(bool(state.menu_open), frame_fn, mask, fallback)
      step_s.append(time.perf_counter() - t)
      choice = 3 if decision is None else decision.menu_choice
      if decision is not None and decision.kind == "card":
        chosen.append(decision.card)
        fallbacks.append(decision.source == "fallback")
      key, k = jax.random.split(key)
      state = arena["step"](k, state, jnp.int32(choice))
      time.sleep(0.002)  # a 500 Hz game loop
    navigator.chat.close()
  # A frame is rendered only to be sent: one per request (in the slow case a menu can open
  # and fall back while the previous opening's request is still in flight).
  assert len(renders) == len(server.requests) == (3 if backend != "slow" else len(renders))
  assert len(renders) >= 1
  assert int(state.upgrades.sum()) == 3 and not bool(state.menu_open)
  if backend == "good":
    assert chosen == [2, 2, 2] and fallbacks == [False] * 3
  else:  # the scripted pick: damage, in slot 1
    assert chosen == [1, 1, 1] and fallbacks == [True] * 3
  # Never waits for the backend (1 s replies, a 0.25 s deadline); the max bound leaves room
  # for a frame render and scheduler noise on a loaded machine, the median is tight.
  assert max(step_s) < 0.1 and np.median(step_s) < 0.001, (backend, max(step_s),
                                                           np.median(step_s))


# -- through the bridge ---------------------------------------------------------------------

def test_bridge_menu_clicks_reach_the_reference_game_server():
  """A BonkLink LevelUp menu (reference game server, lock-step, raw frames): the VLM's
  click_xy picks the card under it in the server's hit test; with the VLM too slow, the
  scripted pick from the offered names is clicked instead."""
  from mbjax.bridge import client as client_lib
  from mbjax.bridge import codec, server as game_server, shim

  cfg = game_server.ServerConfig(mode="lockstep", frame_hz=60.0, frame_format="raw",
                                 pixel_size=PIXELS)
  offered = ("max_health", "damage", "range")
  x, y = CENTRES[2]
  with game_server.ReferenceServer(1, base_port=0, cfg=cfg) as srv, ReferenceLLMServer(
      _fixed(200, f'{{"action": "click_xy", "x": {x}, "y": {y}}}'), delay_s=0.0) as vlm:
    inst = srv.instances[0]
    layout = nav.CardLayout.from_renderer(BonkArena(pixel_size=PIXELS).renderer)
    client = client_lib.BonkLinkClient(port=srv.ports[0], connect_timeout=2.0)
    assert client.read(10.0) is not None
    for delay_s, expected in ((0.0, "range"), (1.0, "damage")):
      vlm.delay_s = delay_s
      navigator = _navigator(vlm.url, layout, deadline_s=0.3)
      # Open the menu as a level-up would (the lock-step thread only ticks on actions).
      inst._state = inst._state.replace(menu_open=jnp.array(True), menu_cards=jnp.array(
          [game.CARDS.index(name) for name in offered]))
      before = np.asarray(inst._state.upgrades).copy()
      client.send(codec.Action())
      start, steps = time.monotonic(), []
      while time.monotonic() - start < 5.0:
        state = client.read(5.0)
        menu = state.state.current_menu == shim.LEVEL_UP_MENU
        if not menu and steps:
          break
        options = state.state.level_up_options
        fallback = int(np.argmax([CARD_PREFERENCE[game.CARDS.index(n)] for n in options]))
        t = time.perf_counter()
        decision = navigator.step(menu, state.frame, shim.menu_mask(state.state), fallback,
                                  card_names=options)
        steps.append(time.perf_counter() - t)
        client.send(nav.bonklink_action(decision, layout, (PIXELS, PIXELS)))
      gained = np.asarray(inst._state.upgrades) - before
      assert gained.tolist() == [int(n == expected) for n in game.CARDS], (delay_s, gained)
      assert max(steps) < 0.1
      navigator.chat.close()
    client.close()
  assert "Cards on offer, left to right: 0: max_health, 1: damage, 2: range" in last_user_text(
      vlm.requests[0])
