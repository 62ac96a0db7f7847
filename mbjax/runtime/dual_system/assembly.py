"""The dual-system runtime built from its config (`configs/dual_system.py`): the motor, the
System 2 planner and its backend, the game, the optional rollout recorder and menu
navigator, then the controller run for `cfg.steps` control steps.
"""
from __future__ import annotations

import json
import os
import re

import ml_collections
import numpy as np
from absl import logging

from mbjax.runtime import planner as planner_lib
from mbjax.runtime.dual_system.controller import DualSystemController, NavigatorMenu
from mbjax.runtime.dual_system.games import ArenaGame, BridgeGame
from mbjax.runtime.dual_system.motor import MotorPolicy
from mbjax.runtime.dual_system.rollouts import RolloutRecorder


def reference_responder(body: dict) -> tuple[int, str]:
  """A `ReferenceLLMServer` responder that answers as the rule planner would: System 2
  requests from the game state JSON in the prompt, menu-navigator requests (their schema has
  an "action") with a click on the preferred card listed in the prompt. An HTTP stand-in
  for a real model in demos, tests and benchmarks."""
  from mbjax.runtime.reference_llm_server import last_user_text, request_schema

  text = last_user_text(body)
  schema = request_schema(body) or {}
  if "action" in schema.get("properties", {}):
    cards = tuple(name for _, name in re.findall(r"(\d+): (\w+)", text))
    return 200, json.dumps({"action": "click", "card": planner_lib.preferred_card(cards),
                            "reason": "reference rule responder"})
  try:
    state = json.loads(text[text.index("{"):text.rindex("}") + 1])
  except ValueError:
    return 200, json.dumps({"directive": "hunt"})
  # The prompt's coordinates are normalised: plan on a unit arena, radii scaled to match.
  snapshot = planner_lib.GameSnapshot(
      player_pos=tuple(state["player"]), health_frac=state["health"],
      menu_open=state["menu_open"], menu_cards=tuple(state["cards"]),
      enemies=np.array([e[:2] for e in state["enemies_xy_dist"]], np.float32).reshape(-1, 2),
      gems=np.array([g[:2] for g in state["gems_xy_dist"]], np.float32).reshape(-1, 2),
      arena_size=1.0)
  default = planner_lib.RulePlanner()
  rule = planner_lib.RulePlanner(default.flee_health, default.danger_radius / 24.0,
                                 default.gem_radius / 24.0)
  directive = rule.plan(snapshot)
  reply = {"directive": directive.name, "reason": "reference rule responder"}
  if directive.target is not None:
    reply["target"] = [min(max(float(v), 0.0), 1.0) for v in directive.target]
  if directive.name == "pick_card":
    reply["card"] = directive.card
  return 200, json.dumps(reply)


def make_planner(cfg: ml_collections.ConfigDict):
  """(planner, cleanup) from `cfg.system2`; "llm" with base_url "reference" starts a loopback
  `ReferenceLLMServer` answering with `reference_responder` after `reference_delay_s`."""
  s2 = cfg.system2
  if s2.planner == "rule":
    return planner_lib.RulePlanner(), lambda: None
  if s2.planner != "llm":
    raise ValueError(f"config.system2.planner={s2.planner!r}: expected 'rule' or 'llm'")
  from mbjax.runtime import llm

  backend = cfg.llm.to_dict()
  server = None
  if backend["base_url"] == "reference":
    from mbjax.runtime.reference_llm_server import ReferenceLLMServer

    server = ReferenceLLMServer(reference_responder, delay_s=s2.reference_delay_s).start()
    backend["base_url"] = server.url
  client = llm.ChatClient(llm.BackendConfig.from_config(backend))
  planner = planner_lib.LLMPlanner(client, goal=s2.goal, send_frame=s2.send_frame)
  return planner, (server.stop if server is not None else (lambda: None))


def make_motor(cfg: ml_collections.ConfigDict) -> MotorPolicy:
  """System 1 from `cfg.motor`: its checkpoint, or without one an untrained network of
  `configs/arena_directives.py:<motor.untrained_variant>` (the same cost per step)."""
  m = cfg.motor
  if m.checkpoint:
    return MotorPolicy.from_checkpoint(m.checkpoint, m.deterministic, cfg.seed)
  try:
    from configs import arena_directives  # the repository's configs, on sys.path from its root
  except ModuleNotFoundError as e:
    raise ValueError("config.motor.checkpoint is empty, and the untrained motor's config "
                     "(configs/arena_directives.py) is not importable: run from the "
                     "repository root or set config.motor.checkpoint") from e
  logging.warning("No motor checkpoint (config.motor.checkpoint): using an untrained "
                  "network of configs/arena_directives.py:%s", m.untrained_variant)
  return MotorPolicy.initialise(arena_directives.get_config(m.untrained_variant or None),
                                m.deterministic, cfg.seed)


def run(cfg: ml_collections.ConfigDict) -> dict:
  """Runs the controller for `cfg.steps` control steps; returns the loop summary."""
  motor = make_motor(cfg)
  planner, stop_backend = make_planner(cfg)
  cleanups = [stop_backend]
  try:
    navigator = cfg.menu.navigator
    if navigator not in ("none", "vlm"):
      raise ValueError(f"config.menu.navigator={navigator!r}: expected 'none' or 'vlm'")
    if cfg.game.kind == "arena":
      game_obj = ArenaGame(seed=cfg.seed, frame_every=cfg.game.frame_every,
                           render=navigator == "vlm")
    elif cfg.game.kind == "bridge":
      game_obj, close = _bridge_game(cfg)
      cleanups.append(close)
    else:
      raise ValueError(f"config.game.kind={cfg.game.kind!r}: expected 'arena' or 'bridge'")
    recorder = None
    if cfg.push.enabled:
      recorder = RolloutRecorder(motor.obs_size, 4, cfg.push.capacity,
                                 cfg.push.flush_every)
    game_obj.observe()  # connect and wait for the first state before the clock starts
    system2 = planner_lib.System2(planner, cfg.system2.rate_hz).start()
    cleanups.append(system2.close)
    menu = None
    if navigator == "vlm":
      menu, close_menu = _navigator_menu(cfg, game_obj)
      cleanups.append(close_menu)
    controller = DualSystemController(game_obj, motor, system2, hz=cfg.hz, recorder=recorder,
                                      menu=menu, menu_override=cfg.menu.override)
    stats = controller.run(cfg.steps)
    summary = stats.summary()
    if recorder is not None:
      recorder.flush()
      summary["pushed_steps"] = recorder.pushed
    if menu is not None:
      summary["navigator"] = dict(menu.navigator.counts)
    summary["load_average"] = os.getloadavg()
    return summary
  finally:
    for cleanup in reversed(cleanups):
      cleanup()


def _navigator_menu(cfg, game_obj):
  """(NavigatorMenu, close) over the `cfg.llm` backend (a VLM), for the arena or the bridge."""
  from mbjax.envs.bonk_arena import render
  from mbjax.runtime import llm, menu_navigator

  backend = cfg.llm.to_dict()
  server = None
  if backend["base_url"] == "reference":
    from mbjax.runtime.reference_llm_server import ReferenceLLMServer

    server = ReferenceLLMServer(reference_responder, delay_s=cfg.menu.reference_delay_s).start()
    backend["base_url"] = server.url
  chat = llm.AsyncChat(llm.ChatClient(llm.BackendConfig.from_config(backend)))
  if isinstance(game_obj, ArenaGame):
    layout = menu_navigator.CardLayout.from_renderer(game_obj.env.renderer)
    frame_fn = game_obj.render_frame
  else:
    if cfg.bridge.frame_hz <= 0:
      raise ValueError("config.menu.navigator='vlm' over the bridge needs frames: set "
                       "config.bridge.frame_hz > 0")
    layout = menu_navigator.CardLayout.from_renderer(render.Renderer(cfg.bridge.capture_size))
    frame_fn = game_obj.latest_frame
  navigator = menu_navigator.MenuNavigator(chat, layout, deadline_s=cfg.menu.deadline_s)

  def close():
    chat.close()
    if server is not None:
      server.stop()

  return NavigatorMenu(navigator, frame_fn), close


def _bridge_game(cfg):
  from mbjax.bridge.client import BonkLinkClient
  from mbjax.bridge.launch import ServerProcess

  b = cfg.bridge
  server = None
  port = b.port
  if b.launch_server:
    server = ServerProcess(1, 0, update_hz=b.update_hz, frame_hz=b.frame_hz,
                           pixel_size=b.capture_size, time_limit=b.time_limit)
    port = server.start()[0]
  client = BonkLinkClient(b.host, port)

  def close():
    client.close()
    if server is not None:
      server.stop()

  return BridgeGame(client, update_hz=b.update_hz, time_limit=b.time_limit,
                    capture_size=b.capture_size), close
