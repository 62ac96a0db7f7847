"""The training driver behind `experiments/train.py`: build, resume, loop, log, save.

`run(cfg, workdir)` is the only function here with side effects on disk. It restores the
latest checkpoint in `workdir` if there is one (so rerunning a command resumes it), runs
jitted chunks of `run.log_every_updates` updates, writes metrics after each chunk,
checkpoints every `run.checkpoint_every_updates` updates and at the end, and finally
records a video of the trained agent when the environment can render.
"""
from __future__ import annotations

import json
import os
import tempfile
import time

import jax
import numpy as np
from absl import logging

from mbjax.envs import registry
from mbjax.envs.wrappers import can_render
from mbjax.train import checkpoint as checkpoint_lib
from mbjax.train import config as config_lib
from mbjax.train import distributed, evaluate, sharding, video
from mbjax.train.metrics import MetricsWriter

def summarize_chunk(metrics: dict) -> dict:
  """Reduces a chunk's per-update metrics [n] to one record: episode statistics
  (`episode/*`) weighted by the number of episodes that finished in each update, everything
  else averaged."""
  metrics = distributed.host_value(metrics)
  counts = np.asarray(metrics["episode/count"], np.float64)
  summary = {}
  for key, values in metrics.items():
    values = np.asarray(values, np.float64)
    if key == "episode/count":
      summary[key] = int(values.sum())
    elif key.startswith("episode/"):
      summary[key] = float((values * counts).sum() / counts.sum()) if counts.sum() else None
    else:
      summary[key] = float(values.mean())
  return summary


def _write_json_atomic(path: str, payload: dict) -> None:
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
  with os.fdopen(fd, "w") as f:
    json.dump(payload, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def run(cfg, workdir: str) -> dict:
  """Trains (or resumes) the experiment `cfg` in `workdir`; returns the last metrics record
  plus the output locations."""
  config_lib.validate(cfg)
  if cfg.bridge.enabled:  # an external game over the bridge: the Sebulba loop
    from mbjax.train import sebulba
    return sebulba.run(cfg, workdir)
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  env, env_params = registry.make(cfg.env.name, **cfg.env.kwargs.to_dict())
  mesh = sharding.make_mesh(cfg.run.num_devices)
  trainer = sharding.ShardedTrainer(cfg, env, env_params, mesh)
  num_updates = trainer.trainer.num_updates
  steps_per_update = trainer.trainer.env_steps_per_update

  checkpointer = checkpoint_lib.Checkpointer(workdir, cfg.run.keep_checkpoints)
  abstract = checkpoint_lib.abstract_like(
      trainer.runner_like, sharding.runner_shardings(mesh, trainer.runner_like))
  resume_step, runner = checkpointer.restore_latest(abstract, cfg, set_aside=True)
  if resume_step is None:
    runner = trainer.init(jax.random.PRNGKey(cfg.seed))
    logging.info("Starting %s on %s: %d updates of %d env steps over %d device(s).",
                 cfg.env.name, workdir, num_updates, steps_per_update, mesh.size)
  else:
    logging.info("Resumed %s from update %d.", workdir, resume_step)
  if distributed.is_primary():
    _write_json_atomic(os.path.join(workdir, "config.json"), cfg.to_dict())
  writer = (MetricsWriter(workdir, steps_per_update, resume_step)
            if distributed.is_primary() else None)

  served_policy = ("ppo" if cfg.served.distill_from == "none" else
                   f"ppo+distill({cfg.served.distill_from}, {cfg.served.distill_coef}, "
                   f"{cfg.served.distill_schedule} to {cfg.served.distill_end})")
  logging.info("Learners: ppo%s; served policy: %s", "".join(
      f", {name}" for name in ("world_model", "dream", "efe") if cfg[name].enabled),
      served_policy)
  compiled = {}
  record = {}
  update_step = int(distributed.host_value(runner.update_step))
  while update_step < num_updates:
    chunk_size = min(cfg.run.log_every_updates, num_updates - update_step)
    compile_seconds = None
    if chunk_size not in compiled:
      start = time.perf_counter()
      compiled[chunk_size] = trainer.chunk(chunk_size).lower(runner).compile()
      compile_seconds = time.perf_counter() - start
    start = time.perf_counter()
    runner, metrics = compiled[chunk_size](runner)
    jax.block_until_ready(runner)
    seconds = time.perf_counter() - start
    update_step += chunk_size
    env_steps = update_step * steps_per_update

    record = summarize_chunk(metrics)
    record["served/policy"] = served_policy
    record["perf/env_steps_per_second"] = chunk_size * steps_per_update / seconds
    if compile_seconds is not None:
      record["perf/compile_seconds"] = compile_seconds
    if writer:
      writer.write(update_step, env_steps, record)
    episode_return = record["episode/return"]
    logging.info(
        "update %d/%d | env steps %s | %.0f steps/s | return %s | length %s%s",
        update_step, num_updates, f"{env_steps:,}", record["perf/env_steps_per_second"],
        "-" if episode_return is None else f"{episode_return:.2f}",
        "-" if episode_return is None else f"{record['episode/length']:.1f}",
        "" if compile_seconds is None else f" | compiled in {compile_seconds:.1f} s")

    if update_step % cfg.run.checkpoint_every_updates == 0 or update_step == num_updates:
      checkpointer.save(update_step, runner, cfg)
  checkpointer.close()
  if writer:
    writer.close()

  outputs = {"metrics": os.path.join(workdir, "metrics.jsonl"), "tensorboard": os.path.join(workdir, "tensorboard"),
             "checkpoints": checkpointer.directory}
  if (cfg.run.video_max_frames > 0 and can_render(trainer.trainer.env)
      and distributed.is_primary()):
    outputs["video"] = _record_video(trainer.trainer, runner, cfg, workdir)
  return {**record, "outputs": outputs}


def restore_trained(workdir: str):
  """(trainer, runner) of the latest checkpoint in `workdir`, on one device, built from the
  config saved beside it — for evaluation and recording tools."""
  cfg = checkpoint_lib.read_run_config(workdir)
  checkpointer = checkpoint_lib.Checkpointer(workdir, cfg.run.keep_checkpoints)
  if checkpointer.latest_step() is None:
    raise checkpoint_lib.RunNotFoundError(f"no checkpoint under {checkpointer.directory}")
  env, env_params = registry.make(cfg.env.name, **cfg.env.kwargs.to_dict())
  mesh = sharding.make_mesh(1)
  trainer = sharding.ShardedTrainer(cfg, env, env_params, mesh)
  abstract = checkpoint_lib.abstract_like(
      trainer.runner_like, sharding.runner_shardings(mesh, trainer.runner_like))
  _, runner = checkpointer.restore_latest(abstract, cfg)
  checkpointer.close()
  return trainer.trainer, runner


def _record_video(trainer, runner, cfg, workdir: str) -> str:
  episode = jax.jit(evaluate.make_episode_fn(trainer, cfg.run.video_max_frames))
  agent = distributed.host_value(runner.agent)
  out = jax.device_get(episode(agent, jax.random.PRNGKey(cfg.seed + 1)))
  frames = out["frames"][out["alive"]]
  update_step = int(distributed.host_value(runner.update_step))
  path = os.path.join(workdir, "videos", f"update_{update_step:07d}.mp4")
  return video.write_mp4(path, frames, cfg.run.video_fps)
