"""The shared driver loop (mbjax/train/loop.py) and its metrics sinks, on a toy driver whose
"parameters" are a vector that each update moves by 1 — no compiles, so every fault can be
staged exactly: a resume that keeps each logged point once, non-finite updates skipped,
counted and ending the run, non-finite parameters never saved, the workdir lock, Ctrl-C,
and extending a finished run.
"""
import json
import logging
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mbjax.agents import ppo
from mbjax.train import checkpoint as checkpoint_lib
from mbjax.train import config as config_lib
from mbjax.train import finite, loop
from mbjax.train.metrics import MetricsWriter, read_jsonl, read_scalars


class ToyDriver(loop.Driver):
  """Update t (1-based) adds 1 to every parameter, fed reward `rewards(t)`; the guard skips
  it when that reward is not finite. `on_update(t)` runs before update t (to stage faults)."""

  def __init__(self, cfg, rewards=lambda t: 1.0, on_update=lambda t: None):
    self.cfg, self.rewards, self.on_update = cfg, rewards, on_update
    self.num_updates = int(cfg.total_env_steps)
    self.env_steps_per_update = 1
    self.corrupt = False  # True: the next update writes NaN parameters past the guard

  def init(self):
    return {"params": jnp.zeros(3), "update_step": jnp.int32(0)}

  def restore_target(self):
    like = self.init()
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return checkpoint_lib.abstract_like(like, jax.tree.map(lambda _: device, like))

  def update_step(self, state):
    return int(state["update_step"])

  def run_chunk(self, state, num_updates):
    metrics = []
    for _ in range(num_updates):
      t = int(state["update_step"]) + 1
      self.on_update(t)
      reward = jnp.float32(self.rewards(t))
      params, m = finite.guard(state["params"], state["params"] + 1.0, jnp.zeros(2),
                               reward[None], {"loss/total": 2 * reward,
                                              "optim/grad_norm": jnp.float32(1.0)})
      if self.corrupt:
        params = jnp.full(3, jnp.nan)
      state = {"params": params, "update_step": jnp.int32(t)}
      metrics.append({k: np.asarray(v) for k, v in m.items()})
    return state, {k: np.stack([m[k] for m in metrics]) for k in metrics[0]}

  def record(self, metrics, seconds):
    return loop.summarize_chunk(metrics)

  def learned(self, state):
    return state["params"]


def toy_config(total=10, log_every=2, checkpoint_every=4, keep=1, max_nonfinite=3):
  cfg = config_lib.base_config()
  cfg.total_env_steps = total
  cfg.run.log_every_updates = log_every
  cfg.run.checkpoint_every_updates = checkpoint_every
  cfg.run.keep_checkpoints = keep
  cfg.run.max_nonfinite_updates = max_nonfinite
  return cfg


def checkpoint_steps(workdir):
  return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


def saved_params(workdir, step):
  checkpointer = checkpoint_lib.Checkpointer(str(workdir), 1)
  state = checkpointer.restore(step, ToyDriver(toy_config()).restore_target(), toy_config())
  checkpointer.close()
  return np.asarray(state["params"])


def strict_records(workdir):
  """metrics.jsonl parsed as strict JSON (a bare NaN or Infinity fails)."""
  def refuse(constant):
    raise ValueError(f"non-strict JSON constant {constant}")
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line, parse_constant=refuse) for line in f]


def test_a_resumed_writer_keeps_every_point_once(tmp_path):
  """Steps 1-3 logged, the run killed while TensorBoard's writer thread had written only part
  of them (the event file cut short), then resumed from its checkpoint at 2 (step 3 is logged
  again): each sink holds steps 1, 2, 3 once, with the resumed step 3."""
  steps_per_update = 8
  writer = MetricsWriter(str(tmp_path))
  for step in (1, 2, 3):
    writer.write(step, step * steps_per_update, {"loss": float(step), "kl": 0.1})
  writer.close()
  (events,) = (tmp_path / "tensorboard").iterdir()
  os.truncate(events, events.stat().st_size // 2)
  writer = MetricsWriter(str(tmp_path), resume_step=2)
  writer.write(3, 3 * steps_per_update, {"loss": 30.0})
  writer.close()
  points = read_scalars(tmp_path / "tensorboard")
  assert points["loss"] == [(8, 1.0), (16, 2.0), (24, 30.0)]
  assert points["kl"] == [(8, pytest.approx(0.1)), (16, pytest.approx(0.1))]
  assert [(r["update_step"], r["loss"]) for r in read_jsonl(tmp_path / "metrics.jsonl")] == [
      (1, 1.0), (2, 2.0), (3, 30.0)]


def test_records_are_strict_json_and_name_the_non_finite_metrics(tmp_path):
  writer = MetricsWriter(str(tmp_path))
  writer.write(1, 1, {"loss": float("nan"), "kl": np.float32(np.inf), "entropy": 0.5})
  writer.close()
  (record,) = strict_records(tmp_path)
  assert record == {"update_step": 1, "env_steps": 1, "entropy": 0.5,
                    "nonfinite/metrics": ["kl", "loss"]}
  assert sorted(read_scalars(tmp_path / "tensorboard")) == ["entropy"]


def test_non_finite_updates_are_skipped_counted_and_stop_the_run(tmp_path, caplog):
  """Rewards turn NaN from update 5 on: updates 5, 6, ... are skipped. The checkpoint at 6
  (finite: the parameters of update 4) is kept; at update 8 the streak of 4 ≥ 3 stops the
  run, naming the cause and that checkpoint."""
  caplog.set_level(logging.INFO)
  cfg = toy_config(checkpoint_every=2)
  driver = ToyDriver(cfg, rewards=lambda t: 1.0 if t <= 4 else float("nan"))
  with pytest.raises(loop.NonFiniteUpdates) as stopped:
    loop.run(driver, cfg, str(tmp_path))
  message = str(stopped.value)
  assert "4 updates in a row (up to update 8)" in message
  assert "rewards from the env in 4, the loss in 4" in message
  assert f"{tmp_path}/checkpoints/6" in message
  assert checkpoint_steps(tmp_path) == [6]
  np.testing.assert_array_equal(saved_params(tmp_path, 6), [4.0, 4.0, 4.0])
  records = strict_records(tmp_path)
  assert [r["update_step"] for r in records] == [2, 4, 6, 8]
  assert [r["nonfinite/skipped"] for r in records] == [0, 0, 2, 2]
  assert [r["nonfinite/reward"] for r in records] == [0, 0, 2, 2]
  assert records[2]["nonfinite/metrics"] == ["loss/total"] and "loss/total" not in records[2]
  assert records[1]["loss/total"] == 2.0
  # The progress line shows the elapsed time and what is left.
  assert any("update 4/10 | env steps 4 | elapsed 0:00:0" in m and "| ETA 0:00:0" in m
             for m in caplog.messages)


def test_non_finite_parameters_are_never_saved(tmp_path):
  """Parameters gone non-finite past the guard (e.g. a restored bad state) stop the run at
  the next save, which is not made: rotation (keep 1) cannot delete the finite one."""
  cfg = toy_config(checkpoint_every=2)
  driver = ToyDriver(cfg, on_update=lambda t: setattr(driver, "corrupt", t >= 3))
  with pytest.raises(loop.NonFiniteUpdates, match=r"non-finite at update 4; not saved"):
    loop.run(driver, cfg, str(tmp_path))
  assert checkpoint_steps(tmp_path) == [2]
  np.testing.assert_array_equal(saved_params(tmp_path, 2), [2.0, 2.0, 2.0])


def test_a_second_run_on_the_workdir_is_refused_naming_the_holder(tmp_path):
  from configs import cartpole_ppo
  from mbjax.train import run as run_lib

  cfg = cartpole_ppo.get_config("debug")
  cfg.run.num_devices = 1
  holder = loop.WorkdirLock(str(tmp_path))
  with pytest.raises(loop.WorkdirBusy, match=f"in use by process {os.getpid()}"):
    run_lib.run(cfg, str(tmp_path))
  assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "config.json").exists()
  holder.release()
  assert not (tmp_path / ".lock").exists()


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path, caplog):
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True)
  (tmp_path / ".lock").write_text(dead.stdout)
  cfg = toy_config()
  loop.run(ToyDriver(cfg), cfg, str(tmp_path))
  assert checkpoint_steps(tmp_path) == [10]
  assert f"from process {dead.stdout.strip()}, which is no longer running" in caplog.text
  assert not (tmp_path / ".lock").exists()


def test_ctrl_c_saves_the_chunk_and_says_where_to_resume(tmp_path):
  """SIGINT during update 3 (in the chunk of updates 3-4, checkpoints every 6): the run
  stops after that chunk with a checkpoint at 4, and a rerun continues to the end; the
  SIGINT handler the run found is back afterwards (the default one, or SIG_IGN where the
  tests run as a background job)."""
  handler_before = signal.getsignal(signal.SIGINT)
  cfg = toy_config(checkpoint_every=6, keep=2)
  driver = ToyDriver(cfg, on_update=lambda t: t == 3 and os.kill(os.getpid(), signal.SIGINT))
  with pytest.raises(loop.Interrupted) as stopped:
    loop.run(driver, cfg, str(tmp_path))
  assert str(stopped.value) == (f"Interrupted at update 4; checkpoint {tmp_path}/checkpoints/4 "
                                "saved. Rerun the same command to resume from it.")
  assert stopped.value.exit_code == 130
  assert checkpoint_steps(tmp_path) == [4]
  assert signal.getsignal(signal.SIGINT) is handler_before
  result = loop.run(ToyDriver(cfg), cfg, str(tmp_path))
  np.testing.assert_array_equal(result.state["params"], [10.0, 10.0, 10.0])
  assert [r["update_step"] for r in strict_records(tmp_path)] == [2, 4, 6, 8, 10]


def test_a_finished_run_extends_to_a_larger_total_and_not_a_smaller(tmp_path):
  loop.run(ToyDriver(toy_config(total=10)), toy_config(total=10), str(tmp_path))
  cfg = toy_config(total=14)
  result = loop.run(ToyDriver(cfg), cfg, str(tmp_path))
  np.testing.assert_array_equal(result.state["params"], [14.0, 14.0, 14.0])
  assert checkpoint_steps(tmp_path) == [14]
  cfg = toy_config(total=12)
  with pytest.raises(checkpoint_lib.IncompatibleCheckpointError,
                     match=r"total_env_steps: checkpoint 14 vs now 12 \(a run can be "
                     r"extended, not shortened\)"):
    loop.run(ToyDriver(cfg), cfg, str(tmp_path))


def test_an_extended_run_stretches_the_annealed_learning_rate():
  """ppo.anneal_lr: the rate decays from ppo.lr to 0 over the run's optimiser steps T. A run
  extended from T_old to T_new steps keeps its step count t, so from the resumed step on the
  rate is lr · (1 − t / T_new): Adam's first step on a constant gradient moves each
  parameter by the rate (times 1 / (1 + eps))."""
  cfg = config_lib.base_config()
  cfg.ppo.update_epochs, cfg.ppo.num_minibatches, cfg.ppo.max_grad_norm = 1, 1, 1e9
  params, grads = jnp.zeros(2), jnp.ones(2)
  old = ppo.make_optimizer(cfg.ppo, num_updates=4)
  state = old.init(params)
  for _ in range(4):  # the finished run: its last step used lr · (1 − 3/4)
    updates, state = old.update(grads, state, params)
  new = ppo.make_optimizer(cfg.ppo, num_updates=10)
  updates, _ = new.update(grads, state, params)
  # Adam's bias-corrected m / √v is exactly 1 for a constant unit gradient.
  np.testing.assert_allclose(updates, -cfg.ppo.lr * (1 - 4 / 10) / (1 + 1e-5) * np.ones(2),
                             rtol=1e-5)
  # PBT sets the injected base rate per member; the schedule starts from it.
  state = ppo.with_learning_rate(new.init(params), 2 * cfg.ppo.lr)
  updates, _ = new.update(grads, state, params)
  np.testing.assert_allclose(updates, -2 * cfg.ppo.lr / (1 + 1e-5) * np.ones(2), rtol=1e-5)
  assert isinstance(state, optax.InjectStatefulHyperparamsState)


def test_an_anakin_run_with_nan_rewards_skips_every_update_and_stops(tmp_path):
  """Through `experiments/train.py`'s driver: an env whose rewards are all NaN. Every update
  is skipped inside the jitted chunk, the run stops after run.max_nonfinite_updates of them
  naming the rewards, and its one checkpoint holds the untouched initial agent."""
  from configs import cartpole_ppo
  from experiments.bench_faults import nan_rewards
  from mbjax.train import run as run_lib

  cfg = cartpole_ppo.get_config("debug")
  cfg.run.num_devices, cfg.run.video_max_frames = 1, 0
  cfg.run.log_every_updates = cfg.run.checkpoint_every_updates = 2
  cfg.run.max_nonfinite_updates = 3
  with nan_rewards(cfg.env.name), pytest.raises(loop.NonFiniteUpdates, match=r"4 updates in a row \(up to update 4\) "
                     r"were skipped for non-finite values \(rewards from the env in 4, the "
                     r"loss in 4, the gradients in 4, the updated parameters in 4\)"):
    run_lib.run(cfg, str(tmp_path))
  assert checkpoint_steps(tmp_path) == [2]
  import orbax.checkpoint as ocp
  with ocp.CheckpointManager(tmp_path / "checkpoints", item_names=("state",)) as manager:
    agent = manager.restore(2, args=ocp.args.Composite(
        state=ocp.args.StandardRestore()))["state"]["agent"]
  assert finite.host_all_finite(agent["params"])
  # No optimiser step was taken: the injected learning rate's step count is still 0.
  assert int(agent["opt_state"]["count"]) == 0
  assert [r["nonfinite/reward"] for r in strict_records(tmp_path)] == [2, 2]
