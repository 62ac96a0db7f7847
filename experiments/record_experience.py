"""Records frames + the inputs actually applied from a BonkLink game into `.npz` chunks.

  # against a running game (plugin on 5560, HINP input snapshots enabled):
  python -m experiments.record_experience --port=5560 --out_dir=data/bonklink --fps=10 --seconds=600
  # self-contained: a reference server whose scripted autopilot stands in for the human:
  python -m experiments.record_experience --launch_server --out_dir=/tmp/rec --seconds=20

Chunk format: `mbjax/bridge/record.py`. Labels come from the HINP trailer (`--actions=hinp`)
or from the random actions this binary sends itself (`--actions=random`).

Exits with an error when no game answers within `--connect_timeout_s`, and when the
recording holds no frame (a game that sends no frames, or no HINP inputs to label them).
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_enable_concurrency_optimized_scheduler=false")

from absl import app, flags, logging  # noqa: E402

from experiments import cli  # noqa: E402
from mbjax.bridge import client as client_lib  # noqa: E402
from mbjax.bridge import launch, record  # noqa: E402

_HOST = flags.DEFINE_string("host", "127.0.0.1", "BonkLink host.")
_PORT = flags.DEFINE_integer("port", 5560, "BonkLink port (ignored with --launch_server).")
_OUT = flags.DEFINE_string("out_dir", None, "Directory for the .npz chunks.")
_FPS = flags.DEFINE_float("fps", 10.0, "Recorded frames per second (at most the game's frame rate).")
_SECONDS = flags.DEFINE_float("seconds", 60.0, "How long to record.")
_CHUNK = flags.DEFINE_integer("frames_per_chunk", 1000, "Frames per .npz file.")
_ACTIONS = flags.DEFINE_enum("actions", "hinp", ["hinp", "random"], "Where the labels come from.")
_LAUNCH = flags.DEFINE_bool("launch_server", False,
                            "Start a reference server (scripted autopilot, JPEG frames at --fps).")
_CONNECT_TIMEOUT = flags.DEFINE_float("connect_timeout_s", 10.0, "Longest wait for the game's "
                                      "first state before giving up.", lower_bound=0.0)
flags.mark_flag_as_required("out_dir")


def main(argv):
  del argv
  server, port = None, _PORT.value
  if _LAUNCH.value:
    server = launch.ServerProcess(1, base_port=0, frame_hz=_FPS.value,
                                  autopilot="scripted" if _ACTIONS.value == "hinp" else "none")
    port = server.start()[0]
  try:
    client = client_lib.BonkLinkClient(_HOST.value, port)
    if client.read(_CONNECT_TIMEOUT.value) is None:
      raise app.UsageError(
          f"no BonkLink game answered on {_HOST.value}:{port} within "
          f"{_CONNECT_TIMEOUT.value:g} s ({client.counters.connect_failures} refused "
          "connections): start the game with the BonkLink plugin, or pass --launch_server")
    try:
      recorder = record.Recorder(client, _OUT.value, fps=_FPS.value,
                                 frames_per_chunk=_CHUNK.value, actions=_ACTIONS.value)
    except ValueError as e:
      raise app.UsageError(str(e)) from None
    paths = recorder.run(_SECONDS.value)
    logging.info("wrote %d chunks; client counters %s; frames without HINP %d", len(paths),
                 client.counters, recorder.missing_inputs)
    if not paths:
      raise app.UsageError(
          f"recorded nothing in {_SECONDS.value:g} s from {_HOST.value}:{port}: "
          f"{client.counters.packets} states, {client.counters.frames} frames, "
          f"{recorder.missing_inputs} frames without a HINP input snapshot (enable frame "
          "capture and, for --actions=hinp, the plugin's input snapshots)")
    for path in paths:
      print(path)
  finally:
    if server is not None:
      server.stop()


if __name__ == "__main__":
  cli.run(main)
