"""The dual-system controller: a slow System 2 never blocks System 1, pushed log-probs are
the behaviour policy's log-probs of the executed actions (checked by hand against the
distribution's parameters), the VLM menu navigator drives the level-up menu, and the loop
runs against the reference BonkLink server over loopback.

One untrained motor (the `debug` size of `configs/arena_directives.py`) and one in-process
arena are shared by the tests, so each jitted function compiles once.
"""
import json
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import arena_directives
from mbjax.agents import ppo
from mbjax.bridge import codec
from mbjax.bridge.client import BonkLinkClient
from mbjax.bridge.server import ReferenceServer, ServerConfig
from mbjax.data import replay
from mbjax.envs.bonk_arena import directives as D
from mbjax.envs.bonk_arena import game
from mbjax.runtime import dual_system as DS
from mbjax.runtime import llm, menu_navigator
from mbjax.runtime import planner as P
from mbjax.runtime.reference_llm_server import ReferenceLLMServer


@pytest.fixture(scope="module")
def motor():
  return DS.MotorPolicy.initialise(arena_directives.get_config("debug"), seed=3)


@pytest.fixture(scope="module")
def arena():
  return DS.ArenaGame(seed=0)


def _client(url, timeout=5.0):
  return llm.ChatClient(llm.BackendConfig(protocol="ollama", base_url=url, model="m",
                                          timeout_s=timeout))


def test_slow_system2_never_blocks_system1(motor, arena):
  motor.reset()
  with ReferenceLLMServer(DS.reference_responder, delay_s=1.0) as server:
    system2 = P.System2(P.LLMPlanner(_client(server.url)), rate_hz=5.0).start()
    controller = DS.DualSystemController(arena, motor, system2, hz=60.0)
    stats = controller.run(60)  # 1 s of control while the first plan takes 1 s
    system2.close()
    requests = len(server.requests)
  summary = stats.summary()
  assert requests >= 1  # System 2 was asking all along ...
  assert summary["system2_plans"] <= 1  # ... and had answered at most once
  # ... while System 1 kept its rate: a blocking call would add a whole second to one step
  # (bounds loose enough for scheduler hiccups on a loaded 2-core machine).
  assert stats.wall_s < 1.8, summary
  assert stats.latencies_s.max() < 0.5, summary
  assert summary["directives"].get("bootstrap", 0) >= 1  # the rule stood in meanwhile


def _log_prob_by_hand(mean, log_std, logits, raw, choice):
  """log N(raw; mean, exp(log_std)) summed over dims + log softmax(logits)[choice]."""
  std = np.exp(log_std)
  gauss = np.sum(-0.5 * ((raw - mean) / std) ** 2 - log_std - 0.5 * math.log(2 * math.pi))
  logits = np.asarray(logits, np.float64)
  top = logits.max()
  return gauss + logits[choice] - (top + math.log(np.exp(logits - top).sum()))


def test_pushed_log_probs_are_the_behaviour_log_probs(motor, arena):
  motor.reset()
  recorder = DS.RolloutRecorder(motor.obs_size, 4, capacity=64, flush_every=8)
  with P.System2(P.RulePlanner(), rate_hz=5.0) as system2:
    controller = DS.DualSystemController(arena, motor, system2, hz=1000.0, recorder=recorder,
                                         sleep=lambda s: None)
    controller.run(33)
  recorder.flush()
  assert recorder.pushed == 32  # the last step's reward has not arrived yet
  data = jax.device_get(replay.latest(recorder.state, recorder.pushed))
  assert np.abs(data["log_prob"]).min() > 0  # upstream pushed 0

  network = motor.network
  apply = jax.jit(network.apply)
  carry = network.initial_carry(1)  # the controller started from a reset motor
  net_obs = ppo.prepare_obs(jnp.asarray(data["obs"]), motor.obs_stats, True)
  for t in range(recorder.pushed):
    carry, dist, value = apply(motor.params, carry, net_obs[t:t + 1],
                               data["is_first"][t:t + 1], data["mask"][t:t + 1])
    expected = _log_prob_by_hand(np.asarray(dist.mean[0]), np.asarray(dist.log_std[0]),
                                 np.asarray(dist.logits[0][0]), data["action_continuous"][t],
                                 int(data["action_discrete"][t, 0]))
    np.testing.assert_allclose(data["log_prob"][t], expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(data["value"][t], float(value[0]), atol=1e-5)
  assert not data["overridden"].any()


def test_an_overridden_choice_gets_its_own_log_prob(motor, arena):
  motor.reset()
  view = arena.observe()
  directive = P.make_directive("pick_card", view.snapshot, card=2)
  carry = motor.carry
  out = motor.act(view.base_obs, np.ones(4, bool), True, directive, 0,
                  view.snapshot.player_pos, override=2)
  assert out.choice == 2 and out.overridden
  obs = ppo.prepare_obs(jnp.asarray(out.obs)[None], motor.obs_stats, True)
  _, dist, _ = motor.network.apply(motor.params, carry, obs, jnp.ones((1,), bool),
                                   jnp.ones((1, 4), bool))
  expected = _log_prob_by_hand(np.asarray(dist.mean[0]), np.asarray(dist.log_std[0]),
                               np.asarray(dist.logits[0][0]), out.raw_continuous, 2)
  np.testing.assert_allclose(out.log_prob, expected, rtol=1e-4, atol=1e-4)
  # The directive block the motor saw: pick_card, card slot 2, the full horizon left.
  np.testing.assert_allclose(out.obs[96:], [0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, 1])


def test_menu_navigator_picks_the_card(motor, arena):
  motor.reset()
  # Cards on offer: max_health, damage, pickup_radius → the reference VLM clicks damage (1).
  state = arena.state.replace(menu_open=jnp.bool_(True),
                              menu_cards=jnp.asarray([4, 0, 5], jnp.int32),
                              upgrades=jnp.zeros((game.NUM_CARDS,), jnp.int32))
  arena.set_state(state)
  with ReferenceLLMServer(DS.reference_responder, delay_s=0.3) as server:
    chat = llm.AsyncChat(_client(server.url))
    layout = menu_navigator.CardLayout.from_renderer(arena.env.renderer)
    navigator = menu_navigator.MenuNavigator(chat, layout, deadline_s=3.0)
    frame = np.zeros((64, 64, 3), np.uint8)  # the reference VLM reads the prompt, not pixels
    with P.System2(P.RulePlanner(), rate_hz=0.5) as system2:
      controller = DS.DualSystemController(
          arena, motor, system2, hz=60.0, menu=DS.NavigatorMenu(navigator, lambda: frame))
      stats = controller.run(45)
    chat.close()
    body = server.requests[0]
  assert len(body["messages"][-1]["images"]) == 1  # the rendered frame went to the VLM
  assert stats.menu_sources.get("navigator:wait", 0) == 1  # held the menu while it thought
  assert stats.menu_sources.get("navigator:vlm", 0) == 1
  assert navigator.counts["vlm"] == 1 and navigator.counts["fallback"] == 0
  assert int(arena.state.upgrades[game.DAMAGE]) == 1
  assert int(arena.state.upgrades.sum()) == 1


def test_arena_observation_from_a_packet():
  state = codec.GameState(
      player_position=(12.0, 0.0, 6.0), player_velocity=(6.0, 0.0, 0.0), player_health=5.0,
      player_max_health=10.0, game_time=105.0, is_playing=True, is_paused=False,
      enemies=(codec.Enemy((15.0, 0.0, 10.0), 2.0),), current_menu="Gameplay",
      level_up_options=())
  obs = DS.arena_observation(state, run_time_s=5.0)
  expected = np.zeros(96, np.float32)
  expected[0:9] = [0.0, -0.5, 6 / 60 / 0.3, 0.0, 0.5, 1.0, 0.0, 0.1, 0.0]
  expected[16:24] = [1.0, 3 / 24, 4 / 24, 5 / 24, 1.0, 0.0, 0.0, 0.0]  # the one enemy
  expected[56:59] = [1 / 32, math.tanh(3 / 30), math.tanh(4 / 30)]  # weight 1/(5·6)
  # 5 s at 60 Hz = 300 ticks; a bridged game forces no card, so its dwell entry is 0.
  expected[93:96] = [300 / 1500, 0.0, 1 - 300 / 500]
  np.testing.assert_allclose(obs, expected, atol=1e-6)
  menu = DS.arena_observation(state.__class__(**{
      **state.__dict__, "current_menu": "LevelUp",
      "level_up_options": ("range", "damage", "regeneration")}), run_time_s=5.0)
  cards = np.zeros((3, 7))
  cards[0, 2] = cards[1, 0] = cards[2, 6] = 1.0
  assert menu[71] == 1.0
  np.testing.assert_array_equal(menu[72:93], cards.reshape(-1))


def test_controller_drives_the_reference_server_over_the_bridge(motor):
  motor.reset()
  server = ReferenceServer(1, 0, ServerConfig(update_hz=60.0, frame_hz=0.0))
  server.start()
  client = BonkLinkClient("127.0.0.1", server.ports[0])
  try:
    bridge = DS.BridgeGame(client, first_timeout=10.0)
    start = bridge.observe().snapshot.player_pos
    with P.System2(P.RulePlanner(), rate_hz=0.5) as system2:
      stats = DS.DualSystemController(bridge, motor, system2, hz=60.0).run(90)
    time.sleep(0.1)
    end = bridge.observe().snapshot.player_pos
    instance = server.instances[0]
  finally:
    client.close()
    server.stop()
  assert stats.steps == 90
  assert client.counters.actions_sent == 90 and client.counters.actions_dropped == 0
  assert instance.counters.actions >= 85  # the game received them over loopback
  assert client.counters.packets >= 60  # and sent 60 Hz states back
  assert math.dist(start, end) > 0.5  # the motor's moves moved the player
  assert stats.summary()["achieved_hz"] > 40  # 60 Hz paced; loose for a loaded machine


def test_the_backend_api_key_comes_from_the_named_environment_variable(monkeypatch):
  """`--config.llm.api_key_env=NAME` on the locked config run_dual_system loads: System 2's
  requests carry the key held in NAME."""
  from configs import dual_system as dual_system_config

  cfg = dual_system_config.get_config("llm")
  cfg.lock()
  monkeypatch.setenv("MBJAX_TEST_DUAL_SYSTEM_KEY", "k-dual")
  with ReferenceLLMServer(DS.reference_responder) as server:
    cfg.llm.base_url = server.url
    cfg.llm.api_key_env = "MBJAX_TEST_DUAL_SYSTEM_KEY"
    planner, stop_backend = DS.make_planner(cfg)
    directive = planner.plan(P.GameSnapshot(player_pos=(12.0, 12.0), health_frac=1.0,
                                            menu_open=False, menu_cards=(),
                                            enemies=np.zeros((0, 2)), gems=np.zeros((0, 2))))
    stop_backend()
  assert directive is not None and len(server.requests) == 1
  assert server.headers[0]["Authorization"] == "Bearer k-dual"
