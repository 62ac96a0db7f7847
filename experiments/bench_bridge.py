"""Bridge benchmarks: observation age and actor throughput over BonkLink.

  python -m experiments.bench_bridge                       # 20 s, 8 games at 60 Hz
  python -m experiments.bench_bridge --duration_s=300      # the 5-minute run in BENCHMARKS.md

It launches 8 reference games (realtime, 60 Hz, JPEG frames at 10 Hz by default) and
drives them with the Sebulba actors (random-init policy, no learner: rollouts are consumed
and dropped), reporting per window and overall: observation age at the actor (game stamped
the state → the policy used it) p50/p99, actor steps/s, client counters. Target: p99 < 20
ms with no growth over time. The device replay's add and sample are timed beside
flashbax's by `experiments/bench_peers.py --row=replay`.

Measured (2026-11-26, the 2-core CPU with nothing else running, 300 s): obs age p50 5.2 ms,
p99 18.8 ms (per-30 s windows 16.7–22.7 ms, no trend), 462 actor steps/s of 480. Under a load average of 6–8 from other jobs p99 rose to 34 ms.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_enable_concurrency_optimized_scheduler=false")

import json  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from mbjax import files  # noqa: E402
from mbjax.bridge import launch  # noqa: E402
from mbjax.train import config as config_lib  # noqa: E402
from mbjax.train import sebulba, sebulba_actor  # noqa: E402

_DURATION = flags.DEFINE_float("duration_s", 20.0, "Seconds of bridge traffic to measure.")
_WINDOW = flags.DEFINE_float("window_s", 10.0, "Seconds per reported window.")
_GAMES = flags.DEFINE_integer("games", 8, "Reference games (one server process).")
_ACTORS = flags.DEFINE_integer("actor_threads", 2, "Actor threads (must divide --games).")
_HZ = flags.DEFINE_float("update_hz", 60.0, "Game state rate.")
_FRAME_HZ = flags.DEFINE_float("frame_hz", 10.0, "Frames per second per game (0: none).")
_FORMAT = flags.DEFINE_enum("frame_format", "jpeg", ["jpeg", "raw"], "Frame encoding.")
_OUT = flags.DEFINE_string("json_out", None, "Optional path for the results as JSON.")


def bench_bridge() -> dict:
  cfg = config_lib.base_config()
  cfg.num_envs = _GAMES.value
  cfg.ppo.num_steps = 64
  cfg.total_env_steps = 10**9
  cfg.bridge.enabled = True
  cfg.bridge.num_actor_threads = _ACTORS.value
  cfg.bridge.frame_hz = _FRAME_HZ.value
  cfg.bridge.frame_format = _FORMAT.value
  cfg.bridge.update_hz = _HZ.value
  epoch = time.monotonic()
  server = launch.ServerProcess(cfg.num_envs, base_port=0, epoch=epoch,
                                **sebulba_actor.server_options(cfg))
  ports = server.start()
  learner = sebulba.Sebulba(cfg, ports, clock_epoch=epoch)
  for actor in learner.actors:  # decode frames like a pixel learner would
    for c in actor.clients:
      c.decode_frames = True
  stop = threading.Event()

  def drop_rollouts():
    while not stop.is_set():
      for actor in learner.actors:
        try:
          actor.rollouts.get(timeout=0.05)
        except Exception:  # queue.Empty
          pass

  consumer = threading.Thread(target=drop_rollouts, daemon=True)
  learner.start()
  consumer.start()
  windows, all_ages = [], []
  start = time.monotonic()
  warmup_until = start + 3.0  # first-call compilation in the actors
  try:
    time.sleep(3.0)
    learner.drain_stats()
    for actor in learner.actors:
      actor.stats.ages_ms.clear()
    while time.monotonic() - warmup_until < _DURATION.value:
      t0 = time.monotonic()
      time.sleep(min(_WINDOW.value, _DURATION.value - (t0 - warmup_until)))
      ages = [a for actor in learner.actors for a in list(actor.stats.ages_ms)]
      stats = learner.drain_stats()
      seconds = time.monotonic() - t0
      for actor in learner.actors:
        if actor.error is not None:
          raise actor.error
      all_ages += ages
      window = {"t_s": round(time.monotonic() - warmup_until, 1),
                "actor_steps_per_s": stats["actor/steps"] / seconds,
                "obs_age_ms_p50": stats.get("bridge/obs_age_ms_p50"),
                "obs_age_ms_p99": stats.get("bridge/obs_age_ms_p99"),
                "stale_states": stats["bridge/stale_states"],
                "disconnects": stats["bridge/disconnects"]}
      windows.append(window)
      print(json.dumps(window))
  finally:
    stop.set()
    learner.stop()
    server.stop()
  steps = [w["actor_steps_per_s"] for w in windows]
  return {"games": cfg.num_envs, "update_hz": _HZ.value, "frame_hz": _FRAME_HZ.value,
          "frame_format": _FORMAT.value, "duration_s": _DURATION.value,
          "obs_age_ms_p50": float(np.percentile(all_ages, 50)),
          "obs_age_ms_p99": float(np.percentile(all_ages, 99)),
          "actor_steps_per_s": float(np.mean(steps)), "windows": windows}


def main(argv):
  del argv
  results = {"device": str(jax.devices()[0]), "cpu_count": os.cpu_count()}
  results["bridge"] = b = bench_bridge()
  print(f"bridge {b['games']} games @ {b['update_hz']:.0f} Hz for {b['duration_s']:.0f} s: "
          f"obs age p50 {b['obs_age_ms_p50']:.2f} ms p99 {b['obs_age_ms_p99']:.2f} ms | "
          f"{b['actor_steps_per_s']:.0f} actor steps/s")
  if _OUT.value:
    files.write_json(_OUT.value, results)


if __name__ == "__main__":
  app.run(main)
