"""Steady-state throughput of the training steps, on a given number of devices.

Shared by `experiments/bench_scaling.py` (weak scaling on 1, 2, 4, ... devices),
`experiments/accelerator_check.py` (the GPU/TPU table), `experiments/bench_world_model.py`
(the world-model steps), `experiments/bench_motor.py` (the selective-scan paths) and the
mbjax side of the peer harness (`experiments/peers/mbjax_side.py`). Each measurement
compiles once, reports the compile time apart, runs once more to warm up, then times
`repeats` calls (median). Everything here is timing glue; the measured functions are the
library's own.
"""
from __future__ import annotations

import functools
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from mbjax.agents import dream, ppo
from mbjax.agents import world_model as wm_lib
from mbjax.envs import registry
from mbjax.envs.spaces import HybridActionSpec
from mbjax.nets import ssm
from mbjax.train import config as config_lib
from mbjax.train import sharding

# Upstream MetaBonk's RSSM: observation 204, embedding 256, GRU 256, Gaussian latents 64. Its
# PyTorch update is timed beside ours by `experiments/bench_peers.py --row=world_model`.
UPSTREAM_OBS_DIM = 204


def upstream_world_model_config(upstream_layers: bool = True) -> ml_collections.ConfigDict:
  """The base config with upstream's world-model sizes. `upstream_layers`: its layer counts
  too (linear maps around the GRU, one hidden layer per head; mbjax keeps its continue and
  std heads), else mbjax's (one hidden layer around the GRU, two per head)."""
  cfg = config_lib.base_config()
  layers = (dict(rssm_layers=0, head_layers=1) if upstream_layers
            else dict(rssm_layers=1, head_layers=2))
  cfg.world_model.update(deter=256, stoch=64, classes=0, hidden=256, **layers)
  return cfg


def call_times(call: Callable[[], Any], repeats: int) -> list[float]:
  """Seconds of each of `repeats` calls of `call` (each waits for its result)."""
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(call())
    times.append(time.perf_counter() - start)
  return times


def time_calls(call: Callable[[], Any], repeats: int) -> float:
  """Median seconds of `repeats` calls of `call`."""
  return float(np.median(call_times(call, repeats)))


def weak_scaling_efficiency(throughputs: dict[int, float]) -> dict[int, float]:
  """{devices: throughput} at a fixed batch per device → {devices: (throughput_n / n) /
  (throughput_b / b)} against the smallest device count b (1 in a weak-scaling run)."""
  base = min(throughputs)
  per_device = throughputs[base] / base
  return {n: throughput / n / per_device for n, throughput in throughputs.items()}


def ppo_update(cfg: ml_collections.ConfigDict, num_devices: int, repeats: int,
               updates_per_call: int = 1) -> dict:
  """The Anakin update (a rollout of `cfg.ppo.num_steps` × `cfg.num_envs` env steps, then
  the PPO update) sharded over the first `num_devices` devices, as `experiments/train.py`
  runs it. Returns compile seconds, seconds per update and env-steps/s."""
  env, env_params = registry.make(cfg.env.name, **cfg.env.kwargs.to_dict())
  mesh = sharding.make_mesh(num_devices)
  trainer = sharding.ShardedTrainer(cfg, env, env_params, mesh)
  runner = trainer.init(jax.random.PRNGKey(cfg.seed))
  chunk = trainer.chunk(updates_per_call)
  state = {"runner": runner}

  def call():
    # The chunk donates its input: keep the newest runner for the next call.
    state["runner"], metrics = chunk(state["runner"])
    return metrics

  start = time.perf_counter()
  jax.block_until_ready(call())
  compile_seconds = time.perf_counter() - start
  jax.block_until_ready(call())
  seconds = time_calls(call, repeats) / updates_per_call
  return {"compile_s": compile_seconds, "update_s": seconds,
          "env_steps_per_s": trainer.trainer.env_steps_per_update / seconds}


def parameter_count(params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def ppo_learner_network(obs_dim: int, spec: HybridActionSpec, hidden: int,
                        activation: str = "relu"):
  """A feed-forward actor-critic (two hidden layers of `hidden` per tower) and its number of
  parameters."""
  net = config_lib.base_config().network
  net.update(hidden_sizes=(hidden, hidden), activation=activation, core="none")
  network = ppo.make_network(net, spec)
  shapes = jax.eval_shape(lambda: ppo.init(jax.random.PRNGKey(0), network, optax.sgd(0.0),
                                           (obs_dim,), jnp.float32).params)
  return network, parameter_count(shapes)


def width_for_parameters(obs_dim: int, spec: HybridActionSpec, target: int) -> int:
  """The largest hidden width whose `ppo_learner_network` has at most `target` parameters
  (bisection: the count grows with the width)."""
  low, high = 1, 4096  # count(low) <= target < count(high) once checked
  if ppo_learner_network(obs_dim, spec, low)[1] > target:
    raise ValueError(f"even width 1 has more than {target} parameters")
  while high - low > 1:
    middle = (low + high) // 2
    if ppo_learner_network(obs_dim, spec, middle)[1] <= target:
      low = middle
    else:
      high = middle
  return low


def compile_ppo_learner_update(obs_dim: int, spec: HybridActionSpec, hidden: int,
                               num_steps: int, num_envs: int, epochs: int,
                               minibatch_size: int) -> tuple[Callable[[], Any], float, dict]:
  """One `ppo.update` (no acting) on a fixed random rollout [num_steps, num_envs] of
  `obs_dim` vector observations, with actions, log-probs and values from the initial policy:
  `epochs` passes of minibatches of `minibatch_size` transitions, Adam 3e-4 with global-norm
  clipping 0.5, as upstream's learner. Returns (call, compile seconds, {"parameters": n,
  "transitions": per update})."""
  transitions = num_steps * num_envs
  if transitions % minibatch_size or minibatch_size % num_envs:
    raise ValueError(f"{num_steps} × {num_envs} transitions must split into minibatches of "
                     f"{minibatch_size}, a multiple of the {num_envs} envs")
  cfg = config_lib.base_config().ppo
  cfg.update(update_epochs=epochs, num_minibatches=transitions // minibatch_size, lr=3e-4,
             anneal_lr=False, clip_value_loss=False, vf_coef=1.0)
  network, count = ppo_learner_network(obs_dim, spec, hidden)
  optimizer = ppo.make_optimizer(cfg, 1)
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  state = ppo.init(keys[0], network, optimizer, (obs_dim,), jnp.float32)
  obs = jax.random.normal(keys[1], (num_steps, num_envs, obs_dim))
  is_first = jnp.zeros((num_steps, num_envs), bool)
  mask = spec.all_valid_mask((num_steps, num_envs))
  carry = network.initial_carry(num_envs)
  _, dist, value = jax.vmap(lambda o, f, m: network.apply(state.params, carry, o, f, m))(
      obs, is_first, mask)
  action = jax.vmap(lambda d, k: d.sample(k))(dist, jax.random.split(keys[2], num_steps))
  reward = jax.random.normal(keys[3], (num_steps, num_envs))
  terminated = jnp.zeros((num_steps, num_envs), bool).at[63].set(True)
  rollout = ppo.Rollout(
      obs=obs, is_first=is_first, carry=jax.tree.map(lambda c: jnp.stack([c] * num_steps),
                                                     carry),
      mask=mask, action=action, log_prob=dist.log_prob(action), value=value, reward=reward,
      terminated=terminated, truncated=jnp.zeros_like(terminated),
      next_value=jnp.roll(value, -1, axis=0))
  update = jax.jit(functools.partial(ppo.update, ppo=cfg, network=network, optimizer=optimizer))
  key = jax.random.PRNGKey(1)
  start = time.perf_counter()
  compiled = update.lower(state, rollout, key).compile()
  compile_seconds = time.perf_counter() - start
  return (lambda: compiled(state, rollout, key)), compile_seconds, {
      "parameters": count, "transitions": transitions}


def compile_world_model_step(cfg: ml_collections.ConfigDict, obs_dim: int, action_size: int,
                             batch_per_device: int, length: int, num_devices: int = 1,
                             dream_spec: HybridActionSpec | None = None, shard: bool = True
                             ) -> tuple[Callable[[], Any], float, int]:
  """One world-model optimiser step on `batch_per_device` windows of `length` steps per
  device (random vector observations), data-parallel over the first `num_devices` devices
  with device-mean losses, as the apex learner runs it; with `dream_spec` (the action
  spec), also one dream step imagining from every posterior. `shard=False` compiles a plain
  jit on one device instead (`num_devices` 1): the single-device program, with no mesh or
  collectives, which the peer harness compares with upstream's single-process update.
  Returns (call: runs one step on fixed inputs and returns its result, compile seconds,
  transitions per step)."""
  if not shard and num_devices != 1:
    raise ValueError(f"shard=False times one device; got num_devices={num_devices}")
  axis_name = sharding.DATA_AXIS if shard else None
  model = wm_lib.make_world_model(cfg.world_model, (obs_dim,))
  optimizer = wm_lib.make_optimizer(cfg.world_model)
  state = wm_lib.init(jax.random.PRNGKey(0), model, optimizer, (obs_dim,), jnp.float32,
                      action_size)
  if dream_spec is not None:
    nets = dream.make_networks(cfg.dream, dream_spec, cfg.network.squash)
    rssm = model.rssm
    state = (state, dream.init(jax.random.PRNGKey(3), nets, rssm.deter + rssm.stoch_size))
  batch = batch_per_device * num_devices
  data = wm_lib.Sequence(
      jax.random.normal(jax.random.PRNGKey(1), (length, batch, obs_dim)),
      jnp.zeros((length, batch, action_size)), jnp.zeros((length, batch)),
      jnp.zeros((length, batch), bool), jnp.zeros((length, batch), bool).at[0].set(True))
  if shard:
    mesh = sharding.make_mesh(num_devices)
    data = jax.device_put(data, NamedSharding(mesh, P(None, sharding.DATA_AXIS)))
    state = jax.device_put(state, NamedSharding(mesh, P()))

  def step(state, data, key):
    wm_state = state if dream_spec is None else state[0]
    wm_key, dream_key = jax.random.split(key)
    wm_state, posts, metrics = wm_lib.update(wm_state, data, wm_key, cfg.world_model,
                                             model=model, optimizer=optimizer,
                                             axis_name=axis_name)
    if dream_spec is None:
      return wm_state, metrics["wm/loss"]
    starts = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), posts)
    actor_critic, _ = dream.update(
        state[1], wm_state.params, starts, dream_key, cfg.dream, nets=nets, world_model=model,
        reward_fn=dream.world_model_reward(model, wm_state.params), axis_name=axis_name)
    return (wm_state, actor_critic), metrics["wm/loss"]

  update = jax.jit(jax.shard_map(step, mesh=mesh,
                                 in_specs=(P(), P(None, sharding.DATA_AXIS), P()),
                                 out_specs=(P(), P())) if shard else step)
  key = jax.random.PRNGKey(2)
  start = time.perf_counter()
  compiled = update.lower(state, data, key).compile()
  compile_seconds = time.perf_counter() - start
  return (lambda: compiled(state, data, key)), compile_seconds, batch * length


def world_model_update(cfg: ml_collections.ConfigDict, obs_dim: int, action_size: int,
                       batch_per_device: int, length: int, num_devices: int,
                       repeats: int, dream_spec: HybridActionSpec | None = None,
                       shard: bool = True) -> dict:
  """`compile_world_model_step`'s step timed: compile seconds, median seconds per step of
  `repeats` (after one warm-up) and transitions/s."""
  call, compile_seconds, transitions = compile_world_model_step(
      cfg, obs_dim, action_size, batch_per_device, length, num_devices, dream_spec, shard)
  jax.block_until_ready(call())
  seconds = time_calls(call, repeats)
  return {"compile_s": compile_seconds, "update_s": seconds,
          "transitions_per_s": transitions / seconds}


def scan_inputs(length: int, batch: int = 8, channels: int = 64, state: int = 16):
  """Selective-scan inputs (x, Δ, A, B, C, h0, reset) with resets at 1% of the steps."""
  k = jax.random.split(jax.random.PRNGKey(0), 6)
  return (jax.random.normal(k[0], (length, batch, channels)),
          jax.nn.softplus(jax.random.normal(k[1], (length, batch, channels))),
          -jnp.exp(jax.random.normal(k[2], (channels, state))),
          jax.random.normal(k[3], (length, batch, state)),
          jax.random.normal(k[4], (length, batch, state)),
          jnp.zeros((batch, channels, state)),
          jax.random.bernoulli(k[5], 0.01, (length, batch)))


def compile_scan_gradient(inputs, path: str, **scan_options):
  """The jitted gradient of sum(y) + sum(h_L) through `ssm.selective_scan` with respect to
  x, Δ, A, B and C, compiled for `inputs`; returns (compiled, compile seconds)."""
  def loss(x, delta, A, B, C, h0, reset):
    y, h = ssm.selective_scan(x, delta, A, B, C, h0, reset, path=path, **scan_options)
    return jnp.sum(y) + jnp.sum(h)

  start = time.perf_counter()
  compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))).lower(*inputs).compile()
  return compiled, time.perf_counter() - start


def scan_forward_backward(inputs, path: str, repeats: int, **scan_options) -> dict:
  """Compile seconds and the best of `repeats` seconds of `compile_scan_gradient`'s
  function (the scan is short enough that the minimum is the least noisy statistic on a
  shared machine)."""
  compiled, compile_seconds = compile_scan_gradient(inputs, path, **scan_options)
  jax.block_until_ready(compiled(*inputs))
  return {"compile_s": compile_seconds,
          "best_s": min(call_times(lambda: compiled(*inputs), repeats))}
