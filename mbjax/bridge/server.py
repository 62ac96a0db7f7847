"""Reference BonkLink game server: BonkArena served over the BonkLink wire format on loopback.

The stand-in for the MegaBonk plugin in tests, demos and benchmarks (`upstream_runtime.md`
§1). One process hosts several game instances, instance i listening on `base_port + i`
(upstream: 5560 + worker index), each in its own thread with its own BonkArena run.

Per instance, like the plugin: TCP, `TCP_NODELAY`, bound to 127.0.0.1 unless told otherwise;
one state packet per tick at `update_hz` (60); a frame (JPEG or MBRF raw RGB, bottom row
first as Unity sends it) attached to one packet every `1 / frame_hz` s; actions
`<4f4?[2i]`; the optional `HINP` trailer. World mapping: the arena is Unity's x–z ground
plane (position = (x, 0, y_arena), y_arena growing down the screen); velocity in world units
per second; `gameTime` is seconds since `epoch` (Unity `Time.time` semantics; lock-step:
ticks / update_hz); `currentMenu` is "Gameplay", "LevelUp" (options = the offered card names;
the game is paused) or "GameOver"; `isPlaying` is false once the run ended (death or
BonkArena's time limit), until a `ui_click` starts the next run.

Controls: move_x/move_y move the player (screen axes, y down — the plugin's V axis is
−moveY). A `ui_click` while the level-up menu is open picks the card under the click
(capture pixels, bottom-left origin, hit-tested against the rendered card boxes).

Differs from the upstream plugin, on purpose:
* The movement of the newest action is held until the next action arrives (upstream applied
  an action for one 60 Hz tick and went neutral, so a 20 Hz worker moved 1 tick in 3).
* A new client replaces the old one *and closes it* (upstream leaked the old socket).
* Sends never block: if the client is not reading, the packet is dropped and counted
  (upstream's send thread blocked, which also stopped it from reading actions).
* A bad action length closes that connection (framing is lost); a malformed payload —
  including one with a NaN or infinite move, which would otherwise turn the player and the
  enemies chasing it into NaN for every later client — is skipped and counted.
* `mode="lockstep"`: `ticks_per_action` ticks per received action, then one packet (the
  "send only on request" variant the spec suggests), for fast deterministic training; the default
  `"realtime"` mode ticks on the clock like the game.
* `autopilot`: "scripted"/"random" makes the server play by itself and report its inputs in
  the HINP trailer — a stand-in for a human playing, for `experiments/record_experience.py`.

Run: `python -m mbjax.bridge.server --num_instances 8 --base_port 5560`. Prints
`BONKLINK READY <port>,<port>,...` once every instance listens; exits on SIGTERM/SIGINT.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import select
import signal
import socket
import sys
import threading
import time

import numpy as np

from mbjax.bridge import codec, coords

MENU_GAMEPLAY, MENU_LEVEL_UP, MENU_GAME_OVER = "Gameplay", "LevelUp", "GameOver"


@dataclasses.dataclass
class ServerConfig:
  host: str = "127.0.0.1"
  update_hz: float = 60.0  # state packets (and game ticks, in realtime mode) per second
  frame_hz: float = 10.0  # frames per second attached to packets; 0 = none
  frame_format: str = "jpeg"  # "jpeg" | "raw" (MBRF)
  jpeg_quality: int = 75
  pixel_size: int = 64  # capture size (square), BonkArena's render size
  mode: str = "realtime"  # "realtime" | "lockstep"
  ticks_per_action: int = 1  # lock-step: game ticks each action is held for (action repeat)
  time_limit: int = 1500  # BonkArena ticks per run
  seed: int = 0
  epoch: float | None = None  # time.monotonic() base of gameTime; None: server start
  autopilot: str = "none"  # "none" | "scripted" | "random"
  input_snapshot: bool = False  # send the HINP trailer (always on with an autopilot)
  restart_on_connect: bool = False  # a new client starts a new run (evaluation protocol)

  def __post_init__(self):
    if self.mode not in ("realtime", "lockstep"):
      raise ValueError(f"mode={self.mode!r}: expected 'realtime' or 'lockstep'")
    if self.frame_format not in ("jpeg", "raw"):
      raise ValueError(f"frame_format={self.frame_format!r}: expected 'jpeg' or 'raw'")
    if self.autopilot not in ("none", "scripted", "random"):
      raise ValueError(f"autopilot={self.autopilot!r}: expected none, scripted or random")
    if self.update_hz <= 0 or self.frame_hz < 0:
      raise ValueError(f"update_hz={self.update_hz} must be > 0, frame_hz={self.frame_hz} >= 0")


@dataclasses.dataclass
class ServerCounters:
  ticks: int = 0
  packets_sent: int = 0
  packets_dropped: int = 0  # client not reading: dropped instead of blocking
  frames_sent: int = 0
  actions: int = 0
  malformed_actions: int = 0
  bad_lengths: int = 0
  clients: int = 0
  runs: int = 0


class _Game:
  """BonkArena plus jitted tick functions shared by every instance of a server."""

  def __init__(self, cfg: ServerConfig):
    import jax
    import jax.numpy as jnp

    from mbjax.envs.bonk_arena import BonkArena, game, policies
    from mbjax.envs.spaces import HybridAction

    self.env = BonkArena(observation="vector", pixel_size=cfg.pixel_size)
    # The client's player picks the cards, with a player's time (`game.RUNTIME_MENU_DWELL`).
    self.params = self.env.default_params().replace(
        time_limit=int(cfg.time_limit), menu_dwell_limit=game.RUNTIME_MENU_DWELL)
    self.card_names = game.CARDS
    boxes = self.env.renderer.menu_boxes.reshape(cfg.pixel_size, cfg.pixel_size)
    self.card_boxes = np.where(boxes <= 2, boxes, -1)  # border pixels pick nothing
    env, params = self.env, self.params
    scripted = policies.make_scripted_policy(env)
    autopilot = {"scripted": scripted, "random": policies.random_policy}.get(cfg.autopilot)

    def summary(state):
      return dict(pos=state.player_pos, vel=state.player_vel, health=state.health,
                  max_health=game.stat(params, state.upgrades, game.MAX_HEALTH),
                  menu_open=state.menu_open, cards=state.menu_cards,
                  enemy_pos=state.enemy_pos, enemy_health=state.enemy_health,
                  enemy_alive=state.enemy_alive)

    self.noop = noop = env.action_spec().branches[0] - 1  # the menu branch's no-op

    def one_tick(key, state, move, choice):
      act_key, step_key = jax.random.split(key)
      if autopilot is not None:
        auto = autopilot(act_key, env.vector_observation(state, params),
                         env.action_mask(state, params))
        move, choice = auto.continuous, auto.discrete[0]
      action = HybridAction(jnp.clip(move, -1.0, 1.0), choice[None])
      _, state, _, terminated, truncated, _ = env.step(step_key, state, action, params)
      return state, terminated | truncated, move, choice

    def ticks(key, state, move, choice, num_ticks):
      """Up to `num_ticks` ticks holding `move` (the card `choice` on the first tick only),
      stopping after the tick that ends the run: one dispatch and one transfer per action
      instead of one per tick (the server's cost in lock-step training)."""

      def body(carry):
        key, state, _, _, _, done = carry
        key, tick_key = jax.random.split(key)
        chosen = jnp.where(done == 0, choice, noop).astype(jnp.int32)
        state, over, ticked_move, ticked_choice = one_tick(tick_key, state, move, chosen)
        return key, state, over, ticked_move, ticked_choice, done + 1

      def more(carry):
        *_, over, _, _, done = carry
        return (done < num_ticks) & ~over

      carry = (key, state, jnp.bool_(False), move, choice.astype(jnp.int32), jnp.int32(0))
      key, state, over, move, choice, done = jax.lax.while_loop(more, body, carry)
      return key, state, over, summary(state), move, choice, done

    def reset():
      _, state = env.reset(jax.random.PRNGKey(0), params)
      return state, summary(state)

    self.ticks = jax.jit(ticks)
    self.reset = jax.jit(reset)
    self.render = jax.jit(lambda state: env.render(state, params))
    self.jax = jax


class GameInstance:
  """One BonkArena run behind one listening socket, driven by its own thread."""

  def __init__(self, game: _Game, cfg: ServerConfig, port: int, index: int):
    self.game, self.cfg, self.index = game, cfg, index
    self.counters = ServerCounters()
    self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    self._listener.bind((cfg.host, port))
    self._listener.listen(4)
    self._listener.setblocking(False)
    self.port = self._listener.getsockname()[1]
    self._client: socket.socket | None = None
    self._rx = bytearray()
    self._tx = b""
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, name=f"bonklink-{self.port}", daemon=True)
    self._key = game.jax.random.PRNGKey(cfg.seed * 1000 + index)
    self._epoch = cfg.epoch if cfg.epoch is not None else time.monotonic()
    self._tick_count = 0
    self._new_run()
    self._move = np.zeros(2, np.float32)
    self._pending_choice = game.noop
    self._pending_click = False
    self._last_input = codec.HumanInput((0.0, 0.0), (0.0, 0.0), False, False, False, False,
                                        (0.0, 0.0))
    self._next_frame = 0.0

  # -- game -------------------------------------------------------------------------------

  def _new_run(self):
    self._state, summary = self.game.reset()
    self._summary = self.game.jax.device_get(summary)
    self._playing = True
    self.counters.runs += 1

  def _apply(self, action: codec.Action) -> None:
    self.counters.actions += 1
    self._move = np.array([action.move_x, action.move_y], np.float32)
    if action.ui_click:
      self._pending_click = True
      if self._summary["menu_open"]:
        x, y = coords.bonklink_to_top_left(action.click_x, action.click_y,
                                           (self.cfg.pixel_size, self.cfg.pixel_size))
        card = int(self.game.card_boxes[y, x])
        if card >= 0:
          self._pending_choice = card

  def _tick(self, num_ticks: int = 1) -> None:
    """Advances the game up to `num_ticks` ticks (fewer if the run ends) with the last
    received input; a finished run restarts on a click or with an autopilot, which takes
    one tick of its own."""
    if not self._playing:
      ticked = 1
      if self._pending_click or self.cfg.autopilot != "none":
        self._new_run()
    else:
      self._key, self._state, over, summary, move, choice, done = self.game.ticks(
          self._key, self._state, self._move, np.int32(self._pending_choice),
          np.int32(num_ticks))
      over, self._summary, move, choice, ticked = self.game.jax.device_get(
          (over, summary, move, choice, done))
      self._playing = not bool(over)
      if self.cfg.autopilot != "none":
        self._last_input = self._human_input(move, int(choice))
    self.counters.ticks += int(ticked)
    self._tick_count += int(ticked)
    self._pending_choice, self._pending_click = self.game.noop, False

  def _human_input(self, move, choice) -> codec.HumanInput:
    """The autopilot's input as the plugin's snapshot would report it (click centre of the
    chosen card, normalised, top-left origin)."""
    click = choice < 3  # 3 is the menu no-op
    if click:
      ys, xs = np.nonzero(self.game.card_boxes == choice)
      s = float(self.cfg.pixel_size)
      norm = ((xs.mean() + 0.5) / s, (ys.mean() + 0.5) / s)
    else:
      norm = (0.0, 0.0)
    return codec.HumanInput((float(move[0]), float(move[1])), (0.0, 0.0), False, False,
                            False, bool(click), norm)

  def _game_time(self) -> float:
    if self.cfg.mode == "lockstep":
      return self._tick_count / self.cfg.update_hz
    return time.monotonic() - self._epoch

  def _packet(self, with_frame: bool) -> bytes:
    s = self._summary
    hz = self.cfg.update_hz
    alive = np.nonzero(s["enemy_alive"])[0]
    enemies = tuple(codec.Enemy((float(s["enemy_pos"][0, i]), 0.0, float(s["enemy_pos"][1, i])),
                                float(s["enemy_health"][i])) for i in alive)
    menu_open = bool(s["menu_open"]) and self._playing
    state = codec.GameState(
        player_position=(float(s["pos"][0]), 0.0, float(s["pos"][1])),
        player_velocity=(float(s["vel"][0]) * hz, 0.0, float(s["vel"][1]) * hz),
        player_health=float(s["health"]), player_max_health=float(s["max_health"]),
        game_time=self._game_time(), is_playing=self._playing, is_paused=menu_open,
        enemies=enemies,
        current_menu=(MENU_LEVEL_UP if menu_open else
                      MENU_GAMEPLAY if self._playing else MENU_GAME_OVER),
        level_up_options=tuple(self.game.card_names[int(c)] for c in s["cards"])
        if menu_open else (),
        human_input=self._last_input
        if (self.cfg.input_snapshot or self.cfg.autopilot != "none") else None)
    frame = b""
    if with_frame:
      pixels = np.asarray(self.game.render(self._state))
      frame = (codec.encode_jpeg(pixels, self.cfg.jpeg_quality)
               if self.cfg.frame_format == "jpeg" else codec.encode_mbrf(pixels))
      self.counters.frames_sent += 1
    return codec.encode_packet(codec.encode_state(state), frame)

  def _frame_due(self, ticks_before: int = 0) -> bool:
    """Lock-step: whether a tick since `ticks_before` fell on the frame period.
    Real time: whether the wall clock passed the next frame time."""
    if self.cfg.frame_hz <= 0:
      return False
    if self.cfg.mode == "lockstep":
      every = max(int(round(self.cfg.update_hz / self.cfg.frame_hz)), 1)
      return self._tick_count // every > ticks_before // every
    now = time.monotonic()
    if now >= self._next_frame:
      self._next_frame = max(self._next_frame + 1.0 / self.cfg.frame_hz, now)
      return True
    return False

  # -- network ----------------------------------------------------------------------------

  def _close_client(self) -> None:
    if self._client is not None:
      try:
        self._client.close()
      except OSError:
        pass
    self._client, self._rx, self._tx = None, bytearray(), b""

  def _accept(self) -> None:
    try:
      sock, _ = self._listener.accept()
    except (BlockingIOError, InterruptedError):
      return
    self._close_client()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)
    self._client = sock
    self.counters.clients += 1
    if self.cfg.restart_on_connect:
      self._new_run()
    if self.cfg.mode == "lockstep":
      self._send(self._packet(with_frame=self.cfg.frame_hz > 0))

  def _receive(self) -> list[codec.Action]:
    """Reads what the client sent; returns the decoded actions in order."""
    actions = []
    while self._client is not None:
      try:
        chunk = self._client.recv(65536)
      except (BlockingIOError, InterruptedError):
        break
      except OSError:
        self._close_client()
        break
      if not chunk:
        self._close_client()
        break
      self._rx += chunk
    offset = 0
    while self._client is not None:
      try:
        found = codec.split_action(self._rx, offset)
      except codec.BadLength:
        self.counters.bad_lengths += 1
        self._close_client()
        break
      if found is None:
        break
      payload, offset = found
      try:
        actions.append(codec.decode_action(payload))
      except codec.MalformedPacket:
        self.counters.malformed_actions += 1
    if self._client is not None:
      del self._rx[:offset]
    return actions

  def _send(self, packet: bytes) -> None:
    if self._client is None:
      return
    if self._tx:  # the previous packet is still partly queued: keep the stream whole
      self._flush()
      if self._tx:
        self.counters.packets_dropped += 1
        return
    self._tx = packet
    self._flush()
    self.counters.packets_sent += 1

  def _flush(self) -> None:
    try:
      sent = self._client.send(self._tx)
      self._tx = self._tx[sent:]
    except (BlockingIOError, InterruptedError):
      pass
    except OSError:
      self._close_client()

  def _run(self) -> None:
    period = 1.0 / self.cfg.update_hz
    next_tick = time.monotonic()
    while not self._stop.is_set():
      if self.cfg.mode == "lockstep":
        wait = 0.05
      else:
        wait = max(next_tick - time.monotonic(), 0.0)
      readers = [self._listener] + ([self._client] if self._client is not None else [])
      writers = [self._client] if self._client is not None and self._tx else []
      try:
        readable, writable, _ = select.select(readers, writers, [], wait)
      except (OSError, ValueError):
        self._close_client()
        continue
      if self._listener in readable:
        self._accept()
      if self._client is not None and self._client in writable:
        self._flush()
      if self._client is not None and self._client in readable:
        for action in self._receive():
          self._apply(action)
          if self.cfg.mode == "lockstep":
            ticks_before, remaining = self._tick_count, max(self.cfg.ticks_per_action, 1)
            if not self._playing:  # a restart (or a wait for the click) takes one tick
              self._tick()
              remaining -= 1
            if self._playing and remaining:
              self._tick(remaining)
            self._send(self._packet(self._frame_due(ticks_before)))
      if self.cfg.mode == "realtime" and time.monotonic() >= next_tick:
        self._tick()
        if self._client is not None:
          self._send(self._packet(self._frame_due()))
        # Catch up at most one period: a stalled process skips ticks instead of bursting.
        next_tick = max(next_tick + period, time.monotonic() - period)
    self._close_client()
    self._listener.close()

  def start(self) -> None:
    self._thread.start()

  def stop(self, timeout: float = 2.0) -> None:
    self._stop.set()
    self._thread.join(timeout)


class ReferenceServer:
  """Several game instances in this process (threads); `ports` once constructed."""

  def __init__(self, num_instances: int = 1, base_port: int = 5560,
               cfg: ServerConfig | None = None, ports: list[int] | None = None):
    self.cfg = cfg or ServerConfig()
    if ports is None:
      ports = [0 if base_port == 0 else base_port + i for i in range(num_instances)]
    game = _Game(self.cfg)
    self.instances = [GameInstance(game, self.cfg, p, i) for i, p in enumerate(ports)]
    self.ports = [inst.port for inst in self.instances]
    # Compile the jitted tick and render now, so the first packets are on time.
    first = self.instances[0]
    game.ticks(first._key, first._state, np.zeros(2, np.float32), np.int32(3), np.int32(1))
    game.render(first._state)

  def __enter__(self):
    self.start()
    return self

  def __exit__(self, *exc):
    self.stop()

  def start(self) -> None:
    for inst in self.instances:
      inst.start()

  def stop(self) -> None:
    for inst in self.instances:
      inst.stop()


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--num_instances", type=int, default=1)
  p.add_argument("--base_port", type=int, default=5560, help="instance i listens on base+i; 0: any free")
  p.add_argument("--ports", default="", help="comma-separated explicit ports (overrides base_port)")
  for field in dataclasses.fields(ServerConfig):
    default = field.default
    kind = {bool: lambda s: s.lower() in ("1", "true", "yes"), int: int, float: float}.get(
        type(default), str)
    if field.name == "epoch":
      kind = float
    p.add_argument(f"--{field.name}", type=kind, default=default)
  args = p.parse_args(argv)
  cfg = ServerConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ServerConfig)})
  ports = [int(x) for x in args.ports.split(",")] if args.ports else None
  server = ReferenceServer(args.num_instances, args.base_port, cfg, ports)
  stop = threading.Event()
  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, lambda *_: stop.set())
  server.start()
  print("BONKLINK READY " + ",".join(map(str, server.ports)), flush=True)
  while not stop.wait(0.5):
    pass
  server.stop()


if __name__ == "__main__":
  os.environ.setdefault("XLA_FLAGS", "--xla_cpu_enable_concurrency_optimized_scheduler=false")
  main(sys.argv[1:])
