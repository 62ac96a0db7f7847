"""The Anakin trainer behind `experiments/train.py`: its side of the shared driver loop.

`run(cfg, workdir)` trains (or resumes) one agent with `mbjax.train.loop` — jitted chunks
of `run.log_every_updates` updates sharded over `run.num_devices` devices — and finally
records a video of the trained agent when the environment can render. Bridge configs
(`bridge.enabled`) go to the Sebulba trainer instead. `restore_trained` reads a finished
run back for the evaluation and recording tools.
"""
from __future__ import annotations

import os
import time

import jax
from absl import logging

from mbjax.envs import registry
from mbjax.envs.wrappers import can_render
from mbjax.train import checkpoint as checkpoint_lib
from mbjax.train import config as config_lib
from mbjax.train import distributed, evaluate, loop, sharding, video


def served_policy(cfg) -> str:
  """What the served policy is, as the metrics record it."""
  s = cfg.served
  if s.distill_from == "none":
    return s.policy
  return (f"ppo+distill({s.distill_from}, {s.distill_coef}, {s.distill_schedule} to "
          f"{s.distill_end})")


class AnakinDriver(loop.Driver):
  """Acting and learning in one jitted chunk (`mbjax.train.anakin`), data-parallel."""

  def __init__(self, cfg):
    self.cfg = cfg
    env, env_params = registry.make(cfg.env.name, **cfg.env.kwargs.to_dict())
    self.mesh = sharding.make_mesh(cfg.run.num_devices)
    self.sharded = sharding.ShardedTrainer(cfg, env, env_params, self.mesh)
    self.trainer = self.sharded.trainer
    self.num_updates = self.trainer.num_updates
    self.env_steps_per_update = self.trainer.env_steps_per_update
    self.served_policy = served_policy(cfg)
    self._compiled = {}
    learners = (["ppo"] if cfg.served.policy == "ppo" else []) + [
        name for name in ("world_model", "dream", "efe") if cfg[name].enabled]
    logging.info("Learners: %s; served policy: %s", ", ".join(learners), self.served_policy)

  def init(self):
    logging.info("Starting %s: %d updates of %d env steps over %d device(s).",
                 self.cfg.env.name, self.num_updates, self.env_steps_per_update,
                 self.mesh.size)
    return self.sharded.init(jax.random.PRNGKey(self.cfg.seed))

  def restore_target(self):
    like = self.sharded.runner_like
    return checkpoint_lib.abstract_like(like, sharding.runner_shardings(self.mesh, like))

  def update_step(self, runner) -> int:
    return int(distributed.host_value(runner.update_step))

  def compile(self, runner, num_updates):
    if num_updates in self._compiled:
      return None
    start = time.perf_counter()
    self._compiled[num_updates] = self.sharded.chunk(num_updates).lower(runner).compile()
    return time.perf_counter() - start

  def run_chunk(self, runner, num_updates):
    runner, metrics = self._compiled[num_updates](runner)
    jax.block_until_ready(runner)
    return runner, distributed.host_value(metrics)

  def record(self, metrics, seconds):
    record = loop.summarize_chunk(metrics)
    record["served/policy"] = self.served_policy
    num_updates = len(metrics["episode/count"])
    record["perf/env_steps_per_second"] = num_updates * self.env_steps_per_update / seconds
    return record

  def learned(self, runner):
    return runner.agent, runner.aux

  def describe(self, record):
    episode_return = record["episode/return"]
    return "%.0f steps/s | return %s | length %s%s" % (
        record["perf/env_steps_per_second"],
        "-" if episode_return is None else f"{episode_return:.2f}",
        "-" if episode_return is None else f"{record['episode/length']:.1f}",
        "" if "perf/compile_seconds" not in record
        else f" | compiled in {record['perf/compile_seconds']:.1f} s")

  def finish(self, runner, update_step, record, workdir):
    del update_step, record
    cfg = self.cfg
    if (cfg.run.video_max_frames > 0 and can_render(self.trainer.env)
        and distributed.is_primary()):
      return runner, {}, {"video": _record_video(self.trainer, runner, cfg, workdir)}
    return runner, {}, {}


def run(cfg, workdir: str) -> dict:
  """Trains (or resumes) the experiment `cfg` in `workdir`; returns the last metrics record
  plus the output locations."""
  config_lib.validate(cfg)
  if cfg.bridge.enabled:  # an external game over the bridge: the Sebulba loop
    from mbjax.train import sebulba
    return sebulba.run(cfg, workdir)
  result = loop.run(AnakinDriver(cfg), cfg, workdir)
  return {**result.record, "outputs": result.outputs}


def restore_trained(workdir: str):
  """(trainer, runner) of the latest checkpoint in `workdir`, on one device, built from the
  config saved beside it — for evaluation and recording tools. A Sebulba (bridge) run gives
  (`sebulba.BridgePolicy`, `sebulba.LearnerState`): an agent of the bridge's observations,
  which plays reference servers, not an Anakin environment."""
  cfg = checkpoint_lib.read_run_config(workdir)
  if cfg.bridge.enabled:
    from mbjax.train import sebulba
    return sebulba.restore_trained(workdir, cfg)
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
  agent, aux = distributed.host_value((runner.agent, runner.aux))
  out = jax.device_get(episode(agent, aux, jax.random.PRNGKey(cfg.seed + 1)))
  frames = out["frames"][out["alive"]]
  update_step = int(distributed.host_value(runner.update_step))
  path = os.path.join(workdir, "videos", f"update_{update_step:07d}.mp4")
  return video.write_mp4(path, frames, cfg.run.video_fps)
