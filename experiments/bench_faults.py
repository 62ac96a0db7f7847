"""Faults on purpose, in one command: what happened, and whether the data survived.

  python -m experiments.bench_faults [--faults=name,...] [--keep_dir=DIR]

Each fault runs in its own temporary directory at debug sizes (one CartPole `:debug`
training run, about a minute on a 2-core CPU, is shared by the checkpoint faults) and
reports one row: the fault, what happened, and whether the data was kept — no checkpoint,
config or game state lost, overwritten or poisoned. Exit status 1 when a row is not kept.

A fault is a function `(Context) -> (what happened, kept)` in `FAULTS`; new faults are new
entries there.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_enable_concurrency_optimized_scheduler=false")

import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import filecmp  # noqa: E402
import logging  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import struct  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from typing import Callable  # noqa: E402

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from experiments import cli  # noqa: E402

_FAULTS = flags.DEFINE_list("faults", [], "Faults to run (default: all).")
_KEEP_DIR = flags.DEFINE_string("keep_dir", None, "Run in this directory and keep it "
                                "(default: a temporary one, removed after).")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_DEBUG_RUN = ["--config=configs/cartpole_ppo.py:debug", "--config.run.video_max_frames=0"]


@dataclasses.dataclass
class Context:
  """A fault's working directory, and the shared trained run (made on first use)."""

  root: str
  _run: str | None = None

  def directory(self, name: str) -> str:
    path = tempfile.mkdtemp(dir=self.root, prefix=f"{name}-")
    return path

  def trained_run(self) -> str:
    """A finished CartPole `:debug` run (checkpoints 20 and 40); copy it before harming it."""
    if self._run is None:
      path = os.path.join(self.root, "trained")
      result = binary("experiments.train", *_DEBUG_RUN, f"--workdir={path}")
      if result.returncode != 0:
        raise RuntimeError(f"the shared training run failed:\n{result.stderr[-3000:]}")
      self._run = path
    return self._run

  def copy_of_run(self, name: str) -> str:
    path = os.path.join(self.directory(name), "run")
    shutil.copytree(self.trained_run(), path)
    return path


def binary(module: str, *args: str) -> subprocess.CompletedProcess:
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, text=True,
                        capture_output=True, timeout=600)


def _last_line(result: subprocess.CompletedProcess, root: str = "") -> str:
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  return lines[-1].replace(root, "<tmp>") if lines and root else (lines[-1] if lines else "")


def _same_tree(a: str, b: str) -> bool:
  compared = filecmp.dircmp(a, b)
  if compared.left_only or compared.right_only or compared.funny_files:
    return False
  _, mismatch, errors = filecmp.cmpfiles(a, b, compared.common_files, shallow=False)
  return not mismatch and not errors and all(
      _same_tree(os.path.join(a, d), os.path.join(b, d)) for d in compared.common_dirs)


def _truncate(path: str) -> None:
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[:len(data) // 2])


# -- the faults -----------------------------------------------------------------------------

def merge_into_a_run(ctx: Context):
  """merge --out=<another training run>"""
  target = ctx.copy_of_run("merge")
  before = target + ".before"
  shutil.copytree(target, before)
  run = ctx.trained_run()
  result = binary("experiments.merge", f"--base={run}", f"--specialists={run},{run}",
                  "--min_cosine=-1", f"--out={target}")
  unchanged = _same_tree(target, before)
  return (f"exit {result.returncode}: {_last_line(result, ctx.root)[:90]}…; the run is "
          f"{'unchanged' if unchanged else 'CHANGED'}", result.returncode != 0 and unchanged)


def declined_save(ctx: Context):
  """checkpoint save of a step not newer than the latest (orbax declines it)"""
  from mbjax.train import checkpoint as checkpoint_lib
  from mbjax.train import config as config_lib

  directory = ctx.directory("save")
  checkpointer = checkpoint_lib.Checkpointer(directory, keep=2)
  cfg = config_lib.base_config()
  checkpointer.save(40, {"w": np.ones(3, np.float32)}, cfg)
  try:
    checkpointer.save(40, {"w": np.zeros(3, np.float32)}, cfg)
    happened = "saved nothing, no error"
  except checkpoint_lib.CheckpointNotSavedError as e:
    happened = f"raised {type(e).__name__}"
  checkpointer.close()
  restored = checkpoint_lib.Checkpointer(directory, keep=2)
  step, state = restored.restore_latest({"w": np.zeros(3, np.float32)}, cfg)
  restored.close()
  kept = happened == "raised CheckpointNotSavedError" and step == 40 and bool(
      np.all(state["w"] == 1.0))
  return f"{happened}; step 40 restores as first written", kept


def resume_past_a_corrupt_checkpoint(ctx: Context):
  """train resumes; latest checkpoint's state/_METADATA truncated"""
  run = ctx.copy_of_run("resume")
  _truncate(os.path.join(run, "checkpoints", "40", "state", "_METADATA"))
  result = binary("experiments.train", *_DEBUG_RUN, f"--workdir={run}")
  set_aside = os.path.isdir(os.path.join(run, "checkpoints_unreadable", "40"))
  warned = "checkpoints/40 is unreadable" in result.stderr
  resumed = "checkpoints/20 instead of the unreadable 40" in result.stderr
  rewritten = sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["20", "40"]
  return (f"exit {result.returncode}; a warning names checkpoints/40: {warned}; resumed from "
          f"update 20: {resumed}; the bad 40 in checkpoints_unreadable/: {set_aside}; 40 "
          f"written again: {rewritten}",
          result.returncode == 0 and warned and resumed and set_aside and rewritten)


class _Warnings(logging.Handler):
  """Collects the absl warnings logged while it is attached."""

  def __init__(self):
    super().__init__(logging.WARNING)
    self.messages = []

  def emit(self, record):
    self.messages.append(record.getMessage())


def _restore_past(ctx: Context, name: str, harm: Callable[[str], None]):
  from mbjax.train import run as run_lib

  run = ctx.copy_of_run(name)
  harm(os.path.join(run, "checkpoints", "40"))
  warnings = _Warnings()
  logging.getLogger("absl").addHandler(warnings)
  try:
    _, runner = run_lib.restore_trained(run)
  except Exception as e:  # the fault this row is about: report it as the outcome
    return f"{type(e).__name__}: {str(e)[:100]}", False
  finally:
    logging.getLogger("absl").removeHandler(warnings)
  step = int(runner.update_step)
  named = any("checkpoints/40 is unreadable" in m for m in warnings.messages)
  return f"restored update {step}; a warning names checkpoints/40: {named}", step == 20 and named


def evaluate_past_a_truncated_config(ctx: Context):
  """evaluate restores; latest checkpoint's config/metadata truncated"""
  return _restore_past(ctx, "config", lambda d: _truncate(os.path.join(d, "config", "metadata")))


def evaluate_past_a_broken_array_store(ctx: Context):
  """evaluate restores; latest checkpoint's TensorStore manifest truncated"""
  return _restore_past(ctx, "store",
                       lambda d: _truncate(os.path.join(d, "state", "manifest.ocdbt")))


def bridge_flood(ctx: Context):
  """bridge: a game floods valid states faster than the client parses"""
  from mbjax.bridge import client as client_lib
  from mbjax.bridge import codec

  listener = socket.socket()
  listener.bind(("127.0.0.1", 0))
  listener.listen(1)
  state = codec.GameState((1.0, 0.0, 2.0), (0.0, 0.0, 0.0), 5.0, 10.0, 0.0, True, False, (),
                          "Gameplay", ())
  blob = codec.encode_packet(codec.encode_state(state)) * 2000
  stop = threading.Event()

  def flood():
    conn, _ = listener.accept()
    try:
      while not stop.is_set():
        conn.sendall(blob)
    except OSError:
      pass
    finally:
      conn.close()

  threading.Thread(target=flood, daemon=True).start()
  client = client_lib.BonkLinkClient(port=listener.getsockname()[1])
  result = {}
  reader = threading.Thread(target=lambda: result.update(
      start=time.monotonic(), obs=client.read(0.5), end=time.monotonic()), daemon=True)
  reader.start()
  reader.join(10.0)
  stop.set()
  reader.join(10.0)
  client.close()
  listener.close()
  if "end" not in result:
    return "read(0.5) had not returned after 10 s", False
  seconds = result["end"] - result["start"]
  return (f"read(0.5) returned the newest state after {seconds:.2f} s "
          f"({client.counters.stale_states} superseded)", result["obs"] is not None)


def nan_action(ctx: Context):
  """bridge: a client sends a NaN move to the reference server"""
  from mbjax.bridge import client as client_lib
  from mbjax.bridge import codec, server

  cfg = server.ServerConfig(mode="lockstep", frame_hz=0.0)
  with server.ReferenceServer(1, base_port=0, cfg=cfg) as srv:
    c = client_lib.BonkLinkClient(port=srv.ports[0])
    c.read(10.0)
    body = struct.pack("<4f4?", float("nan"), 0.0, 0.0, 0.0, False, False, False, False)
    c._sock.sendall(struct.pack("<i", len(body)) + body)
    c.send(codec.Action(move_x=1.0))
    state = c.read(10.0).state
    c.close()
    later = client_lib.BonkLinkClient(port=srv.ports[0])
    later_state = later.read(10.0).state
    later.close()
    malformed = srv.instances[0].counters.malformed_actions
  finite = all(np.isfinite(s.player_position).all() and all(
      np.isfinite(e.position).all() for e in s.enemies) for s in (state, later_state))
  return f"counted as malformed ({malformed}); the game stayed finite: {finite}", bool(
      finite and malformed == 1)


def jpeg_bomb(ctx: Context):
  """bridge: a 9000×9000 JPEG frame (~1.3 MB file, 243 MB decoded)"""
  from mbjax.bridge import codec

  small = codec.encode_jpeg(np.zeros((16, 16, 3), np.uint8))
  at = small.index(b"\xff\xc0")
  bomb = small[:at + 5] + struct.pack(">HH", 9000, 9000) + small[at + 9:]
  start = time.perf_counter()
  try:
    codec.decode_frame(bomb)
    return "decoded", False
  except codec.MalformedPacket as e:
    return (f"refused from its header in {(time.perf_counter() - start) * 1e3:.1f} ms "
            "(MalformedPacket, counted)", "MAX_FRAME_PIXELS" in str(e))


def config_mistakes(ctx: Context):
  """train --config.ppo.lrr=1 (no such key), --config.ppo.lr=nan"""
  workdir = os.path.join(ctx.directory("config"), "run")
  lines = []
  for override in ("--config.ppo.lrr=1", "--config.ppo.lr=nan"):
    result = binary("experiments.train", *_DEBUG_RUN, f"--workdir={workdir}", override)
    lines.append((result.returncode, _last_line(result), "Traceback" in result.stderr))
  ok = all(code == cli.EXIT_USER_ERROR and line.startswith("error: ") and not traceback
           for code, line, traceback in lines)
  return "; ".join(line for _, line, _ in lines), ok and not os.path.exists(workdir)


def record_without_a_game(ctx: Context):
  """record_experience with no game listening"""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  out = os.path.join(ctx.directory("record"), "chunks")
  result = binary("experiments.record_experience", f"--port={port}", f"--out_dir={out}",
                  "--connect_timeout_s=1")
  return (f"exit {result.returncode}: {_last_line(result)[:75]}…",
          result.returncode == cli.EXIT_USER_ERROR and not os.path.exists(out))


def two_runs_on_one_workdir(ctx: Context):
  """train on a workdir that another live process is training in"""
  from mbjax.train import loop

  run = ctx.copy_of_run("lock")
  before = run + ".before"
  shutil.copytree(run, before)
  holder = loop.WorkdirLock(run)  # this process stands for the first run
  try:
    result = binary("experiments.train", *_DEBUG_RUN, f"--workdir={run}",
                    "--config.total_env_steps=6400")
  finally:
    holder.release()
  unchanged = _same_tree(run, before)
  named = f"in use by process {os.getpid()}" in result.stderr
  return (f"exit {result.returncode}: {_last_line(result, ctx.root)[:90]}…; the run is "
          f"{'unchanged' if unchanged else 'CHANGED'}",
          result.returncode != 0 and named and unchanged)


def ctrl_c_during_training(ctx: Context):
  """Ctrl-C (SIGINT) while train runs, between its checkpoints"""
  from mbjax.train import run as run_lib

  workdir = os.path.join(ctx.directory("interrupt"), "run")
  process = subprocess.Popen(
      [sys.executable, "-m", "experiments.train", *_DEBUG_RUN, f"--workdir={workdir}",
       "--config.total_env_steps=25600", "--config.run.log_every_updates=5",
       "--config.run.checkpoint_every_updates=50"],
      cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"}, text=True,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 300
  while time.time() < deadline and process.poll() is None and not (
      os.path.exists(metrics) and os.path.getsize(metrics)):
    time.sleep(0.05)
  process.send_signal(signal.SIGINT)
  _, stderr = process.communicate(timeout=300)
  result = subprocess.CompletedProcess(process.args, process.returncode, "", stderr)
  _, runner = run_lib.restore_trained(workdir)
  step = int(runner.update_step)
  said = f"Interrupted at update {step}; checkpoint" in stderr
  return (f"exit {result.returncode}: {_last_line(result, ctx.root)[:90]}…; update {step} "
          "restores", result.returncode == 130 and said and 0 < step < 200)


@contextlib.contextmanager
def nan_rewards(env_name: str):
  """While active, the registered env `env_name` pays NaN for every step (in this process)."""
  import jax.numpy as jnp

  from mbjax.envs import registry
  from mbjax.envs.wrappers import Wrapper

  class NaNRewards(Wrapper):
    def reset(self, key, params):
      return self.env.reset(key, params)

    def step(self, key, state, action, params):
      obs, state, reward, terminated, truncated, info = self.env.step(key, state, action,
                                                                      params)
      return obs, state, reward * jnp.nan, terminated, truncated, info

    def action_mask(self, state, params):
      return self.env.action_mask(state, params)

  make = registry._FACTORIES[env_name]
  registry._FACTORIES[env_name] = lambda **kw: (NaNRewards(make(**kw)[0]), make(**kw)[1])
  try:
    yield
  finally:
    registry._FACTORIES[env_name] = make


def non_finite_rewards(ctx: Context):
  """an env whose rewards are NaN (CartPole :debug run, in this process)"""
  from configs import cartpole_ppo
  from mbjax.train import finite, loop
  from mbjax.train import run as run_lib

  workdir = os.path.join(ctx.directory("nan"), "run")
  cfg = cartpole_ppo.get_config("debug")
  cfg.run.num_devices, cfg.run.video_max_frames = 1, 0
  # A checkpoint after the first 10 skipped updates, the stop after 20 > 15 of them.
  cfg.run.checkpoint_every_updates, cfg.run.max_nonfinite_updates = 10, 15
  try:
    with nan_rewards(cfg.env.name):
      run_lib.run(cfg, workdir)
    happened = "finished, no error"
  except loop.NonFiniteUpdates as e:
    happened = str(e).replace(ctx.root, "<tmp>")
  _, runner = run_lib.restore_trained(workdir)
  finite_saved = finite.host_all_finite(runner.agent.params)
  return (f"{happened[:110]}…; checkpoint {int(runner.update_step)} finite: {finite_saved}",
          "rewards from the env" in happened and finite_saved)


def extend_a_finished_run(ctx: Context):
  """train a finished run again with a larger total_env_steps"""
  run = ctx.copy_of_run("extend")
  result = binary("experiments.train", *_DEBUG_RUN, f"--workdir={run}",
                  "--config.total_env_steps=6400")
  steps = sorted(int(d) for d in os.listdir(os.path.join(run, "checkpoints")) if d.isdigit())
  return (f"exit {result.returncode}; checkpoints {steps}", result.returncode == 0
          and steps == [40, 50])


FAULTS: list[Callable[[Context], tuple[str, bool]]] = [
    merge_into_a_run, declined_save, resume_past_a_corrupt_checkpoint,
    evaluate_past_a_truncated_config, evaluate_past_a_broken_array_store, bridge_flood,
    nan_action, jpeg_bomb, config_mistakes, record_without_a_game, two_runs_on_one_workdir,
    ctrl_c_during_training, non_finite_rewards, extend_a_finished_run,
]


def run(names: list[str], root: str) -> list[tuple[str, str, bool]]:
  """(fault, what happened, kept) for the named faults (all when empty)."""
  by_name = {f.__name__: f for f in FAULTS}
  unknown = sorted(set(names) - set(by_name))
  if unknown:
    raise app.UsageError(f"--faults: unknown {unknown}; expected some of {sorted(by_name)}")
  ctx = Context(root)
  rows = []
  for fault in [by_name[n] for n in names] if names else FAULTS:
    try:
      happened, kept = fault(ctx)
    except Exception as e:  # a fault that breaks the bench is a row, not a crash
      happened, kept = f"bench error {type(e).__name__}: {str(e)[:120]}", False
    rows.append((fault.__doc__.strip().splitlines()[0], happened, bool(kept)))
  return rows


def format_rows(rows: list[tuple[str, str, bool]]) -> str:
  width = max(len(r[0]) for r in rows)
  lines = [f"| {'fault':<{width}} | what happened | data kept |",
           f"|{'-' * (width + 2)}|---|---|"]
  lines += [f"| {fault:<{width}} | {happened} | {'kept' if kept else 'LOST'} |"
            for fault, happened, kept in rows]
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  root = _KEEP_DIR.value or tempfile.mkdtemp(prefix="bench_faults-")
  os.makedirs(root, exist_ok=True)
  try:
    rows = run(_FAULTS.value, root)
  finally:
    if not _KEEP_DIR.value:
      shutil.rmtree(root, ignore_errors=True)
  print(format_rows(rows))
  if not all(kept for _, _, kept in rows):
    sys.exit(1)


if __name__ == "__main__":
  cli.run(main)
