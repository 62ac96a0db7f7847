"""System 2: rule-planner decisions on hand-built snapshots, reproducible embeddings across
processes, LLM replies mapped onto the game (or refused), and a worker thread that never
blocks its caller and falls back when the backend fails. No JAX compiles here."""
import hashlib
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from mbjax.envs.bonk_arena import directives as D
from mbjax.runtime import llm
from mbjax.runtime import planner as P
from mbjax.runtime.reference_llm_server import ReferenceLLMServer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def snap(pos=(12.0, 12.0), health=1.0, enemies=(), gems=(), menu_cards=()):
  return P.GameSnapshot(player_pos=pos, health_frac=health, menu_open=bool(menu_cards),
                        menu_cards=tuple(menu_cards), enemies=np.array(enemies, np.float32),
                        gems=np.array(gems, np.float32))


RULE = P.RulePlanner()  # flee below 0.35 health within 6; gems within 8


@pytest.mark.parametrize("snapshot, name, target, card", [
    # The menu wins over everything; damage (preference 7) beats range (4), regeneration (1).
    (snap(health=0.1, enemies=[(13, 12)], menu_cards=("regeneration", "damage", "range")),
     "pick_card", None, 1),
    (snap(menu_cards=("max_health", "pickup_radius", "move_speed")), "pick_card", None, 2),
    # Hurt with an enemy 3 away: flee, even with a gem close.
    (snap(health=0.2, enemies=[(15, 12)], gems=[(12, 14)]), "flee", None, 0),
    # Hurt but the enemy is 10 away: the gem 5 away is collected.
    (snap(health=0.2, enemies=[(22, 12)], gems=[(30, 30), (12, 17)]), "collect_gem",
     (12.0, 17.0), 0),
    # Healthy, the only gem 12 away (> 8): hunt.
    (snap(enemies=[(5, 5)], gems=[(24, 12)]), "hunt", None, 0),
    # Nothing around: go to the centre.
    (snap(pos=(3.0, 4.0)), "goto", (12.0, 12.0), 0),
])
def test_rule_planner_decisions(snapshot, name, target, card):
  d = RULE.plan(snapshot)
  assert d.name == name and d.card == card
  assert d.target == target
  np.testing.assert_array_equal(d.embedding, np.eye(5)[D.DIRECTIVES.index(name)])


def _embedding_by_hand(text, size):
  """The documented construction, written out as a plain loop."""
  raw = b""
  block = 0
  while len(raw) < 4 * size:
    raw += hashlib.blake2b(text.encode(), digest_size=64, salt=block.to_bytes(16, "little"),
                           person=b"mbjax-directive").digest()
    block += 1
  values = [int.from_bytes(raw[4 * i:4 * i + 4], "little") / 2**31 - 1 for i in range(size)]
  norm = sum(v * v for v in values) ** 0.5
  return [v / norm for v in values]


def test_text_embedding_matches_the_construction_and_other_processes():
  text = "collect the gem at (0.25, 0.75): it is close and safe"
  mine = P.text_embedding(text, 24)  # 96 bytes: spans two BLAKE2b blocks
  np.testing.assert_allclose(mine, _embedding_by_hand(text, 24), atol=1e-6)
  assert abs(np.linalg.norm(mine) - 1.0) < 1e-5
  assert not np.allclose(mine, P.text_embedding(text + ".", 24))
  code = ("import json; from mbjax.runtime.planner import text_embedding; "
          f"print(json.dumps([hash({text!r}) % 1000, text_embedding({text!r}, 24).tolist()]))")
  procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            cwd=ROOT, env=dict(os.environ, PYTHONHASHSEED=seed,
                                               JAX_PLATFORMS="cpu"))
           for seed in ("1", "2")]  # concurrently: each spends its time importing
  outputs = []
  for proc in procs:
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0
    outputs.append(json.loads(out.strip().splitlines()[-1]))
  # Python's hash() differs between the two processes; the embedding does not.
  assert outputs[0][0] != outputs[1][0]
  np.testing.assert_array_equal(outputs[0][1], outputs[1][1])
  np.testing.assert_allclose(outputs[0][1], mine, atol=0)


def test_parse_reply_maps_onto_the_game():
  s = snap(enemies=[(5, 5)], gems=[(6.0, 6.0), (18.0, 18.0)])
  goto = P.parse_reply({"directive": "goto", "target": [0.25, 0.5]}, s)
  assert goto.name == "goto" and goto.target == (6.0, 12.0) and goto.source == "llm"
  # collect_gem snaps to the real gem nearest the target ...
  gem = P.parse_reply({"directive": "collect_gem", "target": [0.7, 0.8]}, s)
  assert gem.target == (18.0, 18.0)
  # ... or the player's nearest gem without one (player at 12, 12: both 6√2 away → first).
  assert P.parse_reply({"directive": "collect_gem"}, s).target == (6.0, 6.0)
  hunt = P.parse_reply({"directive": "hunt", "reason": "xp"}, s)
  assert hunt.text == "hunt the nearest enemies: xp"
  menu = snap(menu_cards=("damage", "range", "regeneration"))
  assert P.parse_reply({"directive": "pick_card", "card": 2}, menu).card == 2
  for bad, state in [({"directive": "goto"}, s),
                     ({"directive": "collect_gem"}, snap()),
                     ({"directive": "pick_card", "card": 0}, s),
                     ({"directive": "hunt"}, menu),
                     ({"directive": "pick_card"}, menu),
                     ({"directive": "pick_card", "card": 2}, snap(menu_cards=("damage",)))]:
    with pytest.raises(P.InvalidDirective):
      P.parse_reply(bad, state)


def _client(url, timeout=2.0):
  return llm.ChatClient(llm.BackendConfig(protocol="ollama", base_url=url, model="m",
                                          timeout_s=timeout))


def test_llm_planner_asks_with_the_schema_and_state():
  reply = {"directive": "goto", "target": [0.5, 0.25], "reason": "open ground"}
  s = snap(enemies=[(12, 18)])
  with ReferenceLLMServer(lambda body: (200, json.dumps(reply))) as server:
    d = P.LLMPlanner(_client(server.url), goal="level up").plan(s)
    body = server.requests[0]
  assert d.name == "goto" and d.target == (12.0, 6.0)
  assert body["format"]["properties"]["directive"]["enum"] == list(D.DIRECTIVES)
  state = json.loads(body["messages"][-1]["content"].split("Game state: ")[1].split("\n")[0])
  assert state["goal"] == "level up"
  assert state["enemies_xy_dist"] == [[0.5, 0.75, 0.25]]


class SlowPlanner:
  def __init__(self, seconds):
    self.seconds, self.calls = seconds, 0

  def plan(self, snapshot):
    self.calls += 1
    time.sleep(self.seconds)
    return P.make_directive("hunt", snapshot, source="slow")


def test_system2_never_blocks_its_caller():
  planner = SlowPlanner(0.6)
  with P.System2(planner, rate_hz=10.0) as system2:
    worst = 0.0
    deadline = time.monotonic() + 0.4
    while time.monotonic() < deadline:  # the first plan is in progress all along
      t = time.perf_counter()
      system2.publish(snap())
      directive, version = system2.latest()
      worst = max(worst, time.perf_counter() - t)
      time.sleep(0.005)
    assert directive is None and version == 0 and planner.calls == 1
    assert worst < 0.05  # a blocking call would take 0.6 s
    time.sleep(0.4)
    directive, version = system2.latest()
  assert directive.source == "slow" and version == 1


@pytest.mark.parametrize("responder, error", [
    (lambda body: (200, "I think you should hunt."), "LLMInvalidReply"),
    (lambda body: (500, "model crashed"), "LLMHTTPError"),
    (lambda body: (200, json.dumps({"directive": "collect_gem"})), "InvalidDirective"),
])
def test_system2_falls_back_to_the_rule_planner(responder, error):
  s = snap(health=0.2, enemies=[(14, 12)])  # no gem on the ground: collect_gem is invalid
  with ReferenceLLMServer(responder) as server:
    system2 = P.System2(P.LLMPlanner(_client(server.url)), rate_hz=10.0).start()
    system2.publish(s)
    for _ in range(200):
      directive, _ = system2.latest()
      if directive is not None:
        break
      time.sleep(0.01)
    system2.close(timeout=1.0)
  assert directive.source == "fallback" and directive.name == "flee"
  assert system2.stats.fallbacks >= 1 and system2.stats.plans == 0
  assert error in system2.stats.errors[0]


def test_system2_falls_back_on_a_timeout_without_stalling():
  with ReferenceLLMServer(lambda body: (200, '{"directive": "hunt"}'), delay_s=1.0) as server:
    system2 = P.System2(P.LLMPlanner(_client(server.url, timeout=0.2)), rate_hz=10.0)
    system2.start().publish(snap())
    time.sleep(0.5)
    directive, _ = system2.latest()
    system2.close()
  assert directive.source == "fallback" and "LLMTimeout" in system2.stats.errors[0]
  assert threading.active_count() >= 1
