"""The Sebulba loop (Hessel et al. 2021, "Podracer architectures"): actor threads
(`mbjax.train.sebulba_actor`) step external games through the BonkLink bridge, the learner
here runs `ppo.update` on device. This module owns the learner, what its checkpoints hold, the
driver that trains it (`run`) and the restore of a trained run.

Learner. Waits for one rollout from every actor (bounded by `bridge.rollout_timeout`),
concatenates them along the env axis, runs the same `ppo.update` as the Anakin loop,
and publishes the new parameters, which actors pick up at their next step. Rollouts can thus
be one or two policy versions old; the stored behaviour log-probs keep the PPO ratio right.
V(s') of a transition is computed with the parameters current at the next step, which may be
one version newer.

Devices (the Sebulba split). Actors run their jitted policy on one device, `run.actor_device`
(-1, the default: the host CPU, where the observations arrive and the actions leave; k:
`jax.devices()[k]`). The learner runs data-parallel on a 1-D `data` mesh over the first
`run.num_devices` devices (0: all; `mbjax.train.sharding`): the rollout's env axis — the
`num_envs` games, the global batch of `num_envs × ppo.num_steps` transitions per update — is
split over the mesh, parameters and optimiser state are replicated, and `ppo.update` runs
under `shard_map` with `axis_name`: the loss and the advantage and observation statistics are
`lax.pmean`-ed over `data` and the gradient is taken of the averaged loss, so the update
equals the one-device update on the same rollout up to float reduction order. The
minibatches are the same whatever the device count (one key, shared by every device, draws
the chunk permutation); the actors' sampling keys are per actor thread. To keep actors and
learner apart on an accelerator host, point `run.actor_device` at a device past the first
`run.num_devices`, e.g. `run.num_devices=2`, `run.actor_device=2`: learner on devices 0
and 1, actors on device 2. `num_envs` must divide by `run.num_devices`.

I/O: `run` launches the reference servers and drives the learner with the shared driver loop
(`mbjax.train.loop`: resume, metrics, checkpoints); the sockets are the actors'. Metrics
include the actors' (`sebulba_actor.ActorStats`: observation age, episodes, faults) and the
client counters (stale/malformed packets, reconnects).
"""
from __future__ import annotations

import dataclasses
import queue
import threading
import time
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mbjax.agents import ppo
from mbjax.bridge import launch, shim
from mbjax.train import checkpoint as checkpoint_lib
from mbjax.train import config as config_lib
from mbjax.train import finite, loop, sharding
from mbjax.train.sebulba_actor import (ACTION_SPEC, Actor, ActorStats, BridgeError,
                                       PublishedParams, actor_device, evaluate, make_act_fn,
                                       server_options)


@flax.struct.dataclass
class LearnerState:
  """What a Sebulba checkpoint holds (the actors' state is not kept)."""

  agent: ppo.PPOState
  key: jax.Array  # the learner's minibatch stream
  update_step: jax.Array  # i32[]



def make_learner_update(cfg, network, optimizer, mesh: Mesh):
  """Jitted `(agent, rollout [T, E, ...], key) -> (agent, metrics)`: `ppo.update`
  data-parallel over `mesh`, the rollout's env axis split over `data` (E must divide by the
  device count), agent, key and metrics replicated. An update with non-finite inputs or
  results is skipped (`mbjax.train.finite`)."""

  def update(agent, rollout, key):
    new, metrics = ppo.update(agent, rollout, key, cfg.ppo, network=network,
                              optimizer=optimizer, axis_name=sharding.DATA_AXIS)
    return finite.guard(agent, new, rollout.obs, rollout.reward, metrics, sharding.DATA_AXIS)

  return jax.jit(jax.shard_map(update, mesh=mesh,
                               in_specs=(P(), P(None, sharding.DATA_AXIS), P()),
                               out_specs=(P(), P())))



class Sebulba:
  """Actors + learner around running games. `step()` = one PPO update on fresh rollouts,
  on the learner mesh (`run.num_devices` devices unless `mesh` is given). A fresh agent;
  `load` continues a checkpoint."""

  def __init__(self, cfg, ports: list[int], clock_epoch: float | None = None,
               mesh: Mesh | None = None):
    b = cfg.bridge
    if cfg.num_envs != len(ports):
      raise ValueError(f"num_envs={cfg.num_envs} but {len(ports)} game ports were given")
    if not 1 <= b.num_actor_threads <= cfg.num_envs or cfg.num_envs % b.num_actor_threads:
      raise ValueError(f"bridge.num_actor_threads={b.num_actor_threads} must divide "
                       f"num_envs={cfg.num_envs}")
    self.mesh = sharding.make_mesh(cfg.run.num_devices) if mesh is None else mesh
    if cfg.num_envs % self.mesh.size:
      raise ValueError(f"num_envs={cfg.num_envs} (games) must be divisible by the "
                       f"{self.mesh.size} learner devices (config.run.num_devices="
                       f"{cfg.run.num_devices})")
    self.replicated = NamedSharding(self.mesh, P())
    self.rollout_sharding = NamedSharding(self.mesh, P(None, sharding.DATA_AXIS))
    self.cfg = cfg
    self.num_updates = int(cfg.total_env_steps) // (cfg.num_envs * cfg.ppo.num_steps)
    if self.num_updates < 1:
      raise ValueError(f"total_env_steps={cfg.total_env_steps} is less than one update of "
                       f"num_envs × ppo.num_steps = {cfg.num_envs * cfg.ppo.num_steps}")
    self.network = ppo.make_network(cfg.network, ACTION_SPEC)
    self.optimizer = ppo.make_optimizer(cfg.ppo, self.num_updates)
    self.obs_shape = (shim.observation_size(b.num_obs_enemies),)
    key = jax.random.PRNGKey(cfg.seed)
    key, init_key = jax.random.split(key)
    self.key = jax.device_put(key, self.replicated)
    self.agent = jax.device_put(ppo.init(init_key, self.network, self.optimizer,
                                         self.obs_shape, jnp.float32), self.replicated)
    self.update_step = 0
    self._update = make_learner_update(cfg, self.network, self.optimizer, self.mesh)
    self.published = PublishedParams(self.agent, actor_device(cfg.run.actor_device))
    self.stop_event = threading.Event()
    act_fn = make_act_fn(self.network, cfg.ppo.normalize_observations)
    per_actor = cfg.num_envs // b.num_actor_threads
    self.actors = [
        Actor(i, ports[i * per_actor:(i + 1) * per_actor], cfg, self.network, act_fn,
              self.published, queue.Queue(maxsize=1), self.stop_event, clock_epoch)
        for i in range(b.num_actor_threads)]

  @property
  def started(self) -> bool:
    return any(actor.ident is not None for actor in self.actors)

  def start(self) -> None:
    for actor in self.actors:
      actor.start()

  def checkpoint(self) -> LearnerState:
    """What a checkpoint of the learner holds."""
    return LearnerState(self.agent, self.key, jnp.int32(self.update_step))

  def load(self, saved: LearnerState) -> None:
    """Continues from `saved` (a restored `checkpoint()`), before `start`."""
    self.agent, self.key = saved.agent, saved.key
    self.update_step = int(saved.update_step)
    self.published.publish(self.update_step, self.agent)

  def stop(self) -> None:
    self.stop_event.set()
    for actor in self.actors:
      if actor.ident is not None:  # started
        actor.join(timeout=5.0)

  def _get_rollout(self, actor: Actor):
    deadline = time.monotonic() + self.cfg.bridge.rollout_timeout
    while time.monotonic() < deadline:
      if actor.error is not None:
        raise actor.error
      try:
        return actor.rollouts.get(timeout=0.1)
      except queue.Empty:
        continue
    raise BridgeError(f"{actor.name} produced no rollout in {self.cfg.bridge.rollout_timeout} s")

  def step(self) -> dict:
    """Waits for a rollout from every actor, updates, publishes; returns the metrics."""
    parts, versions = zip(*[self._get_rollout(a) for a in self.actors])
    rollout = jax.device_put(jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=1), *parts),
                             self.rollout_sharding)
    # Policy lag: how many updates older than the learner's parameters the data's policy is.
    lag = self.update_step - min(versions)
    self.key, update_key = jax.random.split(self.key)
    self.agent, metrics = self._update(self.agent, rollout, update_key)
    self.update_step += 1
    self.published.publish(self.update_step, self.agent)
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    metrics["reward/mean"] = float(jnp.mean(rollout.reward))
    metrics["actor/policy_lag"] = float(lag)
    return metrics

  def drain_stats(self) -> dict:
    """Actor statistics since the last call, merged over actors."""
    merged = ActorStats()
    for a in self.actors:
      s = a.stats.drain()
      merged.steps += s.steps
      merged.episodes += s.episodes
      merged.ages_ms += s.ages_ms
      merged.receive_ages_ms += s.receive_ages_ms
      merged.faults += s.faults
      merged.bad_dt += s.bad_dt
    out = {"actor/steps": merged.steps, "episode/count": len(merged.episodes),
           "bridge/faults": merged.faults, "bridge/bad_dt": merged.bad_dt}
    if merged.episodes:
      returns, lengths, dead = map(np.asarray, zip(*merged.episodes))
      out.update({"episode/return": float(returns.mean()), "episode/length": float(lengths.mean()),
                  "episode/death_fraction": float(dead.mean())})
    for name, values in (("bridge/obs_age_ms", merged.ages_ms),
                         ("bridge/receive_age_ms", merged.receive_ages_ms)):
      if values:
        out[f"{name}_p50"] = float(np.percentile(values, 50))
        out[f"{name}_p99"] = float(np.percentile(values, 99))
    counters = [dataclasses.asdict(c.counters) for a in self.actors for c in a.clients]
    for key in ("stale_states", "malformed_states", "bad_lengths", "disconnects",
                "actions_dropped"):
      out[f"bridge/{key}"] = sum(c[key] for c in counters)
    return out


class BridgePolicy(NamedTuple):
  """What evaluation and recording tools need of a trained Sebulba run beside its state."""

  cfg: Any
  network: Any


def restore_trained(workdir: str, cfg) -> tuple[BridgePolicy, LearnerState]:
  """(its policy, the `LearnerState` of the latest checkpoint) of a Sebulba run in `workdir`
  trained with `cfg`, on the host CPU (`mbjax.train.run.restore_trained` reads any run)."""
  network = ppo.make_network(cfg.network, ACTION_SPEC)
  obs_size = shim.observation_size(cfg.bridge.num_obs_enemies)
  optimizer = ppo.make_optimizer(cfg.ppo, 1)
  like = jax.eval_shape(lambda key: LearnerState(
      ppo.init(key, network, optimizer, (obs_size,), jnp.float32), key, jnp.int32(0)),
      jax.random.PRNGKey(0))
  cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
  checkpointer = checkpoint_lib.Checkpointer(workdir, cfg.run.keep_checkpoints)
  try:
    step, state = checkpointer.restore_latest(checkpoint_lib.abstract_like(
        like, jax.tree.map(lambda _: cpu, like)), cfg)
  finally:
    checkpointer.close()
  if step is None:
    raise checkpoint_lib.RunNotFoundError(f"no checkpoint under {checkpointer.directory}")
  return BridgePolicy(cfg, network), state


class SebulbaDriver(loop.Driver):
  """The Sebulba learner's side of the driver loop: one `Sebulba.step` per update, the
  actors started before the first, the final evaluation against the random policy."""

  def __init__(self, cfg, ports: list[int], clock_epoch: float | None, evaluate_after: bool):
    self.cfg, self.ports, self.clock_epoch = cfg, ports, clock_epoch
    self.evaluate_after = evaluate_after
    self.env_steps_per_update = cfg.num_envs * cfg.ppo.num_steps
    self.learner: Sebulba | None = None

  @property
  def num_updates(self) -> int:
    return self.learner.num_updates

  def init(self):
    if self.learner is None:
      self.learner = Sebulba(self.cfg, self.ports, clock_epoch=self.clock_epoch)
    return self.learner

  def restore_target(self):
    learner = self.init()
    like = learner.checkpoint()
    # Replicated on this run's learner mesh, whatever device count wrote the checkpoint.
    return checkpoint_lib.abstract_like(like, jax.tree.map(lambda _: learner.replicated, like))

  def resume(self, restored):
    self.learner.load(restored)
    return self.learner

  def update_step(self, learner) -> int:
    return learner.update_step

  def run_chunk(self, learner, num_updates):
    if not learner.started:
      learner.start()
    chunk = [learner.step() for _ in range(num_updates)]
    return learner, {k: np.asarray([m[k] for m in chunk]) for k in chunk[0]}

  def record(self, metrics, seconds):
    record = loop.summarize_chunk(metrics)
    record.update(self.learner.drain_stats())
    record["perf/actor_steps_per_second"] = record["actor/steps"] / seconds
    record["perf/updates_per_second"] = len(metrics["loss/total"]) / seconds
    return record

  def learned(self, learner):
    return learner.agent

  def describe(self, record):
    # The age since the game stamped a state needs the game's clock (`bridge.clock_epoch`);
    # without it (lock-step servers, a real game) the age since its bytes arrived.
    age = ("obs age p99 %.1f ms" % record["bridge/obs_age_ms_p99"]
           if "bridge/obs_age_ms_p99" in record else
           "obs age p99 %.1f ms since received" % record["bridge/receive_age_ms_p99"]
           if "bridge/receive_age_ms_p99" in record else "obs age p99 -")
    return "%.0f actor steps/s | return %s | %s | faults %d" % (
        record["perf/actor_steps_per_second"],
        f"{record['episode/return']:.3f}" if "episode/return" in record else "-", age,
        record["bridge/faults"])

  def saved(self, learner):
    return learner.checkpoint()

  def finish(self, learner, update_step, record, workdir):
    del update_step, record, workdir
    if not self.evaluate_after:
      return learner, {}, {}
    learner.stop()
    cfg, steps = self.cfg, self.cfg.bridge.eval_steps
    trained = evaluate(cfg, self.ports, learner.agent, steps, seed=cfg.seed)
    random = evaluate(cfg, self.ports, None, steps, seed=cfg.seed)
    logging.info("evaluation over %d steps per game from fresh runs: trained %.4f / step "
                 "(%d deaths), random %.4f / step (%d deaths)", steps,
                 trained["mean_reward"], trained["deaths"], random["mean_reward"],
                 random["deaths"])
    return learner, {"eval/trained_mean_reward": trained["mean_reward"],
                     "eval/random_mean_reward": random["mean_reward"],
                     "eval/trained_deaths": trained["deaths"],
                     "eval/random_deaths": random["deaths"]}, {}

  def close(self):
    if self.learner is not None:
      self.learner.stop()


def run(cfg, workdir: str) -> dict:
  """Trains through the bridge with the shared driver loop (`mbjax.train.loop`): launches
  reference servers if `bridge.launch_server` (else connects to `bridge.host:bridge.base_port
  + i`), resumes from `workdir`'s latest checkpoint, logs metrics every
  `run.log_every_updates` updates and, with launched servers and `bridge.eval_steps`,
  evaluates the trained policy against the random one at the end."""
  config_lib.validate(cfg)
  b = cfg.bridge
  server, epoch = None, None
  try:
    if b.launch_server:
      epoch = time.monotonic()
      # restart_on_connect: the final evaluation starts fresh runs by reconnecting.
      server = launch.ServerProcess(cfg.num_envs, base_port=b.base_port, epoch=epoch,
                                    restart_on_connect=True, **server_options(cfg))
      ports = server.start()
      if b.server_mode == "lockstep":
        epoch = None  # lock-step gameTime is tick-based: no wall-clock age
    else:
      ports = [b.base_port + i for i in range(cfg.num_envs)]
    driver = SebulbaDriver(cfg, ports, epoch, evaluate_after=bool(b.eval_steps and server))
    result = loop.run(driver, cfg, workdir)
    return {**result.record, "outputs": result.outputs}
  finally:
    if server is not None:
      server.stop()
