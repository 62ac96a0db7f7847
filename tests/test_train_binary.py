"""End to end through `experiments/train.py`: outputs, resume after Ctrl-C and SIGKILL,
extending a finished run, config errors.

The binary runs in subprocesses, as a user would run it, on one CPU device.
"""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from mbjax.train.metrics import read_jsonl, read_scalars

pytestmark = pytest.mark.slow  # every test runs the binary in subprocesses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Optimisation level 0 for faster compiles, as in conftest.py.
ENV = dict(os.environ, XLA_FLAGS="--xla_cpu_enable_concurrency_optimized_scheduler=false "
           "--xla_backend_optimization_level=0", JAX_PLATFORMS="cpu")
# 100 small updates, a checkpoint every 5: long enough to be killed part-way.
RESUME_FLAGS = ["--config.total_env_steps=12800", "--config.run.log_every_updates=5",
                "--config.run.checkpoint_every_updates=5", "--config.run.keep_checkpoints=1"]


def _train_command(workdir, *flags, config="configs/cartpole_ppo.py:debug"):
  return [sys.executable, "-m", "experiments.train", f"--config={config}",
          f"--workdir={workdir}", *flags]


def _train(workdir, *flags, check=True, **kwargs):
  return subprocess.run(_train_command(workdir, *flags, **kwargs), cwd=ROOT, env=ENV,
                        capture_output=True, text=True, timeout=600, check=check)


def _final_state(workdir):
  directory = os.path.join(workdir, "checkpoints")
  step = max(int(d) for d in os.listdir(directory) if d.isdigit())
  with ocp.CheckpointManager(directory, item_names=("state",)) as manager:
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  return step, restored["state"]


def _training_metrics(workdir):
  return [{k: v for k, v in r.items() if not k.startswith("perf/")}
          for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))]


def _mode(path):
  return os.stat(path).st_mode & 0o777


def test_train_writes_metrics_checkpoints_and_reports_them(tmp_path):
  result = _train(tmp_path)
  records = read_jsonl(tmp_path / "metrics.jsonl")
  # Created as open() creates files (0666 less the umask), not owner-only.
  umask = os.umask(0)
  os.umask(umask)
  assert _mode(tmp_path / "metrics.jsonl") == _mode(tmp_path / "config.json") == 0o666 & ~umask
  # Each progress line says how long the run has taken and how long it has left.
  assert "update 20/40 | env steps 2,560 | elapsed 0:00:" in result.stderr
  assert "| ETA 0:00:" in result.stderr
  assert [r["update_step"] for r in records] == [10, 20, 30, 40]
  assert records[-1]["env_steps"] == 40 * 4 * 32
  assert "perf/compile_seconds" in records[0] and "perf/compile_seconds" not in records[1]
  assert all(r["perf/env_steps_per_second"] > 0 for r in records)
  assert os.listdir(tmp_path / "tensorboard")
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["20", "40"]
  assert f"checkpoints: {tmp_path}/checkpoints" in result.stdout


def test_resume_after_ctrl_c_and_sigkill_is_bitwise_identical(tmp_path):
  """One run stopped by Ctrl-C (it saves the chunk it is in and says where to resume),
  resumed, killed, resumed again, ends bit for bit where an uninterrupted run does, with the
  same metrics and TensorBoard points (each once)."""
  uninterrupted, interrupted = tmp_path / "a", tmp_path / "b"
  # The uninterrupted run goes on beside the one that is killed (two processes, two cores).
  log = tmp_path / "uninterrupted.log"
  with open(log, "w") as out:
    reference = subprocess.Popen(_train_command(uninterrupted, *RESUME_FLAGS), cwd=ROOT,
                                 env=ENV, stdout=out, stderr=subprocess.STDOUT)
    stopped = _interrupt_after_checkpoint(interrupted, *RESUME_FLAGS)
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    step = max(int(d) for d in os.listdir(interrupted / "checkpoints") if d.isdigit())
    assert step < 100 and "Traceback" not in stopped.stderr
    assert stopped.stderr.strip().splitlines()[-1].endswith(
        f"Interrupted at update {step}; checkpoint {interrupted}/checkpoints/{step} saved. "
        "Rerun the same command to resume from it.")
    killed_at = _kill_after_checkpoint(interrupted, *RESUME_FLAGS, at_least=step + 10)
    assert killed_at < 100

    _train(interrupted, *RESUME_FLAGS)
    assert reference.wait(timeout=600) == 0, log.read_text()
  step_a, state_a = _final_state(uninterrupted)
  step_b, state_b = _final_state(interrupted)
  assert step_a == step_b == 100
  flat_a = ocp.tree.to_flat_dict(state_a)
  flat_b = ocp.tree.to_flat_dict(state_b)
  assert flat_a.keys() == flat_b.keys()
  for key in flat_a:  # parameters, optimiser state, env state, RNG, counters
    np.testing.assert_array_equal(flat_a[key], flat_b[key], err_msg=str(key))
  assert _training_metrics(uninterrupted) == _training_metrics(interrupted)
  points = {run: read_scalars(run / "tensorboard") for run in (uninterrupted, interrupted)}
  assert [s for s, _ in points[interrupted]["loss/total"]] == [128 * u for u in range(5, 101, 5)]
  assert {tag: [v for _, v in p] for tag, p in points[uninterrupted].items()
          if not tag.startswith("perf/")} == {
              tag: [v for _, v in p] for tag, p in points[interrupted].items()
              if not tag.startswith("perf/")}


def test_a_finished_run_extends_and_refuses_a_different_config(tmp_path):
  _train(tmp_path)
  result = _train(tmp_path, "--config.ppo.lr=0.001", check=False)
  assert result.returncode != 0
  assert "different config" in result.stderr and "ppo.lr" in result.stderr
  # A larger total_env_steps extends the finished run (40 updates of 128 steps → 50).
  _train(tmp_path, "--config.total_env_steps=6400")
  assert [r["update_step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [
      10, 20, 30, 40, 50]
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["40", "50"]
  result = _train(tmp_path, check=False)  # back to 5,120: a run is not shortened
  assert result.returncode != 0 and "extended, not shortened" in result.stderr


@pytest.mark.parametrize("flag,message", [
    ("--config.ppo.learning_rate=0.1", "learning_rate"),
    ("--config.ppo.num_steps=many", "num_steps"),
    ("--config.network.core=transformer", "network.core"),
])
def test_bad_config_fails_naming_the_key(tmp_path, flag, message):
  result = _train(tmp_path, flag, check=False)
  assert result.returncode != 0
  assert message in result.stderr
  assert not (tmp_path / "checkpoints").exists()


def test_apex_run_trains_every_learner_and_its_checkpoint_plays_in_the_recorder(tmp_path):
  """The arena's model-based config through the binary (the dream actor acting, the world
  model, dream and EFE trained on replay), then its checkpoint — a latent actor with a
  filter state — through the recorder and the evaluator."""
  workdir, videos = tmp_path / "run", tmp_path / "recorded"
  result = _train(workdir, config="configs/arena_apex.py:debug")
  last = read_jsonl(workdir / "metrics.jsonl")[-1]
  assert last["served/policy"] == "dreamer" and last["model/trained"] == 1.0
  for key in ("wm/recon", "wm/reward_loss", "wm/kl", "dream/return", "dream/actor_loss",
              "dream/critic_loss", "dream/kl_from_init", "efe/risk", "efe/ambiguity"):
    assert key in last and np.isfinite(last[key]), key
  video = workdir / "videos" / "update_0000004.mp4"
  assert f"video: {video}" in result.stdout and video.stat().st_size > 0
  recording = subprocess.run(
      [sys.executable, "-m", "experiments.record_arena", "--policy=checkpoint",
       f"--checkpoint={workdir}", "--episodes=1", f"--out_dir={videos}"],
      cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600, check=True)
  evaluation = subprocess.run(
      [sys.executable, "-m", "experiments.evaluate_arena", f"--checkpoint={workdir}",
       "--episodes=2"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600,
      check=True)
  rows = {line.split("|")[0].strip() for line in evaluation.stdout.splitlines() if "|" in line}
  assert {"trained", "scripted", "random", "idle"} <= rows, evaluation.stdout
  # The results come without orbax's INFO lines about reading the checkpoint.
  for output in (recording.stderr, evaluation.stderr):
    assert not [line for line in output.splitlines()
                if line.startswith("I") and ("orbax" in line or "CheckpointManager" in line)]
  recorded = np.load(videos / "checkpoint_000.npz", allow_pickle=False)
  assert recorded["rewards"].shape[0] > 0
  assert (videos / "checkpoint_000.mp4").stat().st_size > 0


def _interrupt_after_checkpoint(workdir, *flags):
  """Starts a training run, sends it SIGINT (Ctrl-C) once it has written a checkpoint and
  returns the finished process (with its output)."""
  process = subprocess.Popen(_train_command(workdir, *flags), cwd=ROOT, env=ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  checkpoints = workdir / "checkpoints"
  deadline = time.time() + 300
  while time.time() < deadline and process.poll() is None:
    if checkpoints.exists() and any(d.isdigit() for d in os.listdir(checkpoints)):
      break
    time.sleep(0.02)
  process.send_signal(signal.SIGINT)
  stdout, stderr = process.communicate(timeout=300)
  return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def _kill_after_checkpoint(workdir, *flags, env=ENV, at_least=20):
  """Starts a training run and SIGKILLs it once a checkpoint ≥ `at_least` exists."""
  process = subprocess.Popen(_train_command(workdir, *flags), cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  checkpoints = workdir / "checkpoints"
  deadline = time.time() + 300
  while time.time() < deadline and process.poll() is None:
    if checkpoints.exists() and any(d.isdigit() and int(d) >= at_least
                                    for d in os.listdir(checkpoints)):
      break
    time.sleep(0.02)
  process.send_signal(signal.SIGKILL)
  assert process.wait() == -signal.SIGKILL, "the run finished before it could be killed"
  return max(int(d) for d in os.listdir(checkpoints) if d.isdigit())



def test_checkpoint_from_four_devices_restores_on_two(tmp_path):
  """Checkpoints hold global arrays: written by a 4-device run, they restore bit for bit
  onto a 2-device mesh (env state re-split 2 envs per device) and training goes on."""
  import jax
  import ml_collections

  from mbjax.envs import registry
  from mbjax.train import checkpoint as checkpoint_lib
  from mbjax.train import sharding

  env = dict(ENV, XLA_FLAGS=ENV["XLA_FLAGS"] + " --xla_force_host_platform_device_count=4")
  subprocess.run(_train_command(tmp_path, "--config.run.num_devices=4"), cwd=ROOT, env=env,
                 capture_output=True, text=True, timeout=600, check=True)
  cfg = ml_collections.ConfigDict(json.loads((tmp_path / "config.json").read_text()))
  mesh = sharding.make_mesh(2)
  trainer = sharding.ShardedTrainer(cfg, *registry.make(cfg.env.name), mesh)
  abstract = checkpoint_lib.abstract_like(
      trainer.runner_like, sharding.runner_shardings(mesh, trainer.runner_like))
  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), keep=2)
  runner = checkpointer.restore(40, abstract, cfg)
  checkpointer.close()
  assert runner.obs.sharding.num_devices == 2
  assert {s.data.shape[0] for s in runner.obs.addressable_shards} == {2}
  _, saved = _final_state(tmp_path)
  restored = ocp.tree.to_flat_dict(jax.device_get(runner))
  saved = ocp.tree.to_flat_dict(saved)
  assert len(restored) == len(saved)
  for (key, value), saved_value in zip(sorted(restored.items()), (saved[k] for k in sorted(saved))):
    np.testing.assert_array_equal(value, saved_value, err_msg=str(key))
  runner, metrics = trainer.chunk(2)(runner)
  assert int(runner.update_step) == 42 and np.isfinite(metrics["loss/total"]).all()
