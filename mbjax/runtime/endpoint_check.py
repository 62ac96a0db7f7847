"""How often a chat endpoint gives a usable reply on each of mbjax's LLM/VLM paths.

Three paths ask a chat backend for JSON and accept a reply only when it satisfies their schema
and their own rules:
* `planner` — System 2's directive (`planner.LLMPlanner`): a directive that fits the game
  state (e.g. `collect_gem` needs a gem on the ground);
* `navigator` — the VLM menu navigator (`menu_navigator.parse_reply`): a rendered BonkArena
  level-up menu goes with the request; the click must land on an offered card;
* `merge` — LLM merge weighting (`population.llm_weighting.parse_weights`): a weight per
  specialist, in range, not all zero.

`check_endpoint` sends each path `requests` prompts built from seeded synthetic situations
(random game states, random card triples, random role returns) and reports, per path, the
valid replies, their rate, latencies and the first failure reasons. In the repository's tests
and benchmarks these paths run against `ReferenceLLMServer` with `reference_responder`, whose
replies are written by rules, not by a language model; this module is how to measure a real
model (`experiments/check_llm_endpoint.py`).
"""
from __future__ import annotations

import json
import time
from typing import Callable

import numpy as np

from mbjax.population import llm_weighting
from mbjax.runtime import llm, menu_navigator
from mbjax.runtime import planner as planner_lib

PATHS = ("planner", "navigator", "merge")
_MAX_REASONS = 5  # distinct failure reasons kept per path
_SPECIALISTS = ("scout", "tank", "killer")
_ROLES = ("scout", "tank", "killer", "speedrunner")


def planner_cases(count: int, seed: int) -> list[planner_lib.GameSnapshot]:
  """Game states on BonkArena's 24-unit arena: enemies, gems, health; a quarter with the
  level-up menu open."""
  rng = np.random.default_rng(seed)
  cases = []
  for _ in range(count):
    menu = rng.random() < 0.25
    cards = tuple(rng.choice(_card_names(), 3, replace=False)) if menu else ()
    cases.append(planner_lib.GameSnapshot(
        player_pos=tuple(rng.uniform(2.0, 22.0, 2)), health_frac=float(rng.uniform(0.1, 1.0)),
        menu_open=menu, menu_cards=cards,
        enemies=rng.uniform(0.0, 24.0, (int(rng.integers(0, 9)), 2)),
        gems=rng.uniform(0.0, 24.0, (int(rng.integers(0, 6)), 2)),
        game_time_s=float(rng.uniform(0.0, 600.0))))
  return cases


def merge_cases(count: int, seed: int) -> list[llm_weighting.WeightRequest]:
  """Merge requests for three specialists with random per-role returns and base returns."""
  rng = np.random.default_rng(seed)
  return [llm_weighting.merge_request(
      _SPECIALISTS, role_names=_ROLES,
      returns=rng.normal(5.0, 2.0, (len(_SPECIALISTS), len(_ROLES))),
      base_returns=rng.normal(4.0, 1.0, len(_ROLES)),
      norms=rng.uniform(0.5, 3.0, len(_SPECIALISTS))) for _ in range(count)]


def navigator_cases(count: int, seed: int, pixel_size: int = 128):
  """(frame, card names, layout) of BonkArena level-up menus with random card triples."""
  import jax
  import jax.numpy as jnp

  from mbjax.envs.bonk_arena import BonkArena

  env = BonkArena(observation="vector", pixel_size=pixel_size)
  params = env.default_params()
  _, state = jax.jit(env.reset)(jax.random.PRNGKey(seed), params)
  render = jax.jit(lambda s: env.render(s, params))
  layout = menu_navigator.CardLayout.from_renderer(env.renderer)
  rng = np.random.default_rng(seed)
  names = _card_names()
  cases = []
  for _ in range(count):
    cards = rng.choice(len(names), 3, replace=False)
    frame = render(state.replace(menu_open=jnp.array(True),
                                 menu_cards=jnp.asarray(cards, jnp.int32)))
    cases.append((np.asarray(frame), tuple(names[int(c)] for c in cards), layout))
  return cases


def _card_names() -> tuple[str, ...]:
  from mbjax.envs.bonk_arena import game

  return tuple(game.CARDS)


def check_endpoint(backend: llm.BackendConfig, requests: int, seed: int = 0,
                   paths: tuple[str, ...] = PATHS,
                   progress: Callable[[str], None] | None = None) -> dict:
  """Per path: requests, valid, rate, latency_s (median, max) and reasons (the first
  distinct failure messages). One request at a time, each bounded by `backend.timeout_s`."""
  unknown = sorted(set(paths) - set(PATHS))
  if unknown:
    raise ValueError(f"paths {unknown}: expected some of {PATHS}")
  client = llm.ChatClient(backend)
  asks = {}
  if "planner" in paths:
    planner = planner_lib.LLMPlanner(client)
    asks["planner"] = [lambda s=s: planner.plan(s) for s in planner_cases(requests, seed)]
  if "navigator" in paths:
    mask = np.ones(4, bool)  # every card allowed, and the no-op
    asks["navigator"] = [
        lambda f=f, n=n, layout=layout: menu_navigator.parse_reply(client.chat_json(
            menu_navigator.menu_messages(menu_navigator.DEFAULT_GOAL, n),
            menu_navigator.menu_schema(3), [f]), mask, layout)
        for f, n, layout in navigator_cases(requests, seed)]
  if "merge" in paths:
    asks["merge"] = [
        lambda r=r: llm_weighting.parse_weights(client.chat_json(list(r.messages), r.schema),
                                                r.names, r.low, r.high, r.normalise)
        for r in merge_cases(requests, seed)]
  report = {}
  for path, calls in asks.items():
    valid, latencies, reasons = 0, [], []
    for call in calls:
      start = time.perf_counter()
      try:
        call()
      except (llm.LLMError, ValueError) as e:  # ValueError: the path's own rules refused it
        reason = f"{type(e).__name__}: {e}"[:300]
        if reason not in reasons and len(reasons) < _MAX_REASONS:
          reasons.append(reason)
      else:
        valid += 1
      latencies.append(time.perf_counter() - start)
    report[path] = {"requests": len(calls), "valid": valid, "rate": valid / max(len(calls), 1),
                    "latency_s": {"median": float(np.median(latencies)),
                                  "max": float(np.max(latencies))},
                    "reasons": reasons}
    if progress is not None:
      progress(f"{path}: {valid}/{len(calls)} valid")
  return report


def unreachable(report: dict) -> bool:
  """Whether no request reached the endpoint (every failure a refused connection)."""
  return all(entry["valid"] == 0 and entry["reasons"]
             and all(r.startswith("LLMUnavailable") for r in entry["reasons"])
             for entry in report.values())


def format_report(report: dict, endpoint: str) -> str:
  lines = [f"valid-reply rate at {endpoint}",
           f"{'path':<10} {'valid':>9} {'rate':>7} {'median s':>9} {'max s':>8}"]
  for path, e in report.items():
    lines.append(f"{path:<10} {e['valid']:>4}/{e['requests']:<4} {e['rate']:>7.1%} "
                 f"{e['latency_s']['median']:>9.3f} {e['latency_s']['max']:>8.3f}")
  for path, e in report.items():
    lines.extend(f"  {path} failure: {reason}" for reason in e["reasons"])
  return "\n".join(lines)


def reference_responder(body: dict) -> tuple[int, str]:
  """A `ReferenceLLMServer` responder for all three paths, written by rules: the dual-system
  runtime's (planner, navigator) and equal merge weights. Not a language model."""
  from mbjax.runtime import dual_system
  from mbjax.runtime.reference_llm_server import request_schema

  weights = ((request_schema(body) or {}).get("properties") or {}).get("weights")
  if weights is not None:
    return 200, json.dumps({"weights": {name: 1.0 for name in weights["properties"]},
                            "rationale": "reference rule responder: equal shares"})
  return dual_system.reference_responder(body)
