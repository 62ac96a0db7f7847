"""Proximal Policy Optimisation (Schulman et al. 2017) on the hybrid action space.

Pure functions over a `PPOState`: `init` builds parameters, optimiser and observation
statistics; `loss` is the clipped-surrogate objective on one minibatch; `update` runs
`epochs × minibatches` optimiser steps on one rollout. Everything takes an optional
`axis_name`: under `shard_map` over a data axis each device holds a slice of the envs, and
the loss, advantage statistics and observation statistics are averaged over that axis, so
one update equals the single-device update on the same global batch.

Differs from upstream MetaBonk (`src/learner/ppo.py`): GAE bootstraps from the true next
observation and keeps truncation apart from termination; old log-probs and values always
come from the behaviour policy (stored in the rollout), recurrent ones included; the mask
covers every discrete branch; logged losses are means, not sums over minibatches.

Minibatches are random subsets of *time chunks* (length `seq_len`; 1 for feed-forward
networks) taken across all envs. Because the chunk permutation is shared by every device,
the global minibatch is the same however the envs are sharded. A recurrent network is
unrolled over each chunk from the carry the rollout recorded at the chunk's first step.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import chex
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax

from mbjax.agents.collectives import pmean, varying
from mbjax.agents.returns import generalized_advantage_estimation
from mbjax.envs.spaces import HybridAction
from mbjax.nets import cores
from mbjax.nets.actor_critic import ActorCritic, Carry


@flax.struct.dataclass
class ObservationStatistics:
  """Running mean and variance of observations (Chan et al.'s parallel update)."""

  mean: jax.Array
  var: jax.Array
  count: jax.Array  # f32[]

  @classmethod
  def create(cls, shape) -> "ObservationStatistics":
    return cls(jnp.zeros(shape, jnp.float32), jnp.ones(shape, jnp.float32), jnp.float32(1e-4))

  def normalize(self, obs: jax.Array, clip: float = 10.0) -> jax.Array:
    return jnp.clip((obs - self.mean) / jnp.sqrt(self.var + 1e-8), -clip, clip)

  def update(self, obs: jax.Array, axis_name: str | None) -> "ObservationStatistics":
    """Folds in a batch of observations [N, *shape] (all devices' N when sharded)."""
    batch_axes = tuple(range(obs.ndim - self.mean.ndim))
    batch_mean = pmean(obs.mean(batch_axes), axis_name)
    batch_var = pmean(jnp.square(obs - batch_mean).mean(batch_axes), axis_name)
    batch_count = jnp.float32(obs.size // self.mean.size)
    if axis_name is not None:
      batch_count = jax.lax.psum(batch_count, axis_name)
    total = self.count + batch_count
    delta = batch_mean - self.mean
    mean = self.mean + delta * batch_count / total
    m2 = self.var * self.count + batch_var * batch_count + jnp.square(delta) * (
        self.count * batch_count / total)
    return ObservationStatistics(mean, m2 / total, total)


@flax.struct.dataclass
class PPOState:
  params: Any
  opt_state: Any
  obs_stats: ObservationStatistics


class Rollout(NamedTuple):
  """One rollout, time-major [T, E, ...]. `carry` is the recurrent state *before* step t."""

  obs: jax.Array
  is_first: jax.Array
  carry: Carry
  mask: jax.Array
  action: HybridAction  # raw (pre-squash) actions
  log_prob: jax.Array
  value: jax.Array
  reward: jax.Array
  terminated: jax.Array
  truncated: jax.Array
  next_value: jax.Array  # V of the observation that followed the action
  # Optional distillation target [T, E] (a HybridDistribution from a latent policy).
  teacher: Any = None
  dt: Any = None  # optional f32[T, E]: elapsed time before each step (CfC cores); None = 1


def make_network(net: ml_collections.ConfigDict, spec) -> ActorCritic:
  """The actor-critic of the `network` config section."""
  options = cores.CoreOptions(
      mamba_layers=net.mamba_layers, ssm_state_size=net.ssm_state_size,
      conv_size=net.conv_size, expand=net.mamba_expand, scan_path=net.scan_path,
      scan_chunk=net.scan_chunk,
      cfc_mode=net.cfc_mode)
  return ActorCritic(spec=spec, hidden_sizes=tuple(net.hidden_sizes), activation=net.activation,
                     core=net.core, core_size=net.core_size, squash=net.squash,
                     core_options=options)


class LossCoefficients(NamedTuple):
  """The loss's coefficients, Python floats or traced arrays (one PBT member's values)."""

  clip_eps: Any
  ent_coef: Any
  vf_coef: Any

  @classmethod
  def from_section(cls, ppo: ml_collections.ConfigDict) -> "LossCoefficients":
    return cls(ppo.clip_eps, ppo.ent_coef, ppo.vf_coef)


def make_optimizer(ppo: ml_collections.ConfigDict, num_updates: int
                   ) -> optax.GradientTransformation:
  """Adam with global-norm clipping from the `ppo` section. The learning rate `lr` lives in
  the optimiser state (`optax.inject_hyperparams`; `with_learning_rate` sets it, e.g. per PBT
  member); `anneal_lr` decays it linearly from there to 0 at the last of `num_updates`
  updates. A run extended to more updates (a larger `total_env_steps` on resume) keeps its
  step count, so the decay is re-stretched: from the resumed step t on, the rate is
  lr · (1 − t / T_new) over the new run's T_new optimiser steps."""
  steps = num_updates * ppo.update_epochs * ppo.num_minibatches

  def clipped_adam(learning_rate):
    if ppo.anneal_lr:
      learning_rate = optax.linear_schedule(learning_rate, 0.0, steps)
    return optax.chain(optax.clip_by_global_norm(ppo.max_grad_norm),
                       optax.adam(learning_rate, eps=1e-5))

  return optax.inject_hyperparams(clipped_adam)(learning_rate=ppo.lr)


def with_learning_rate(opt_state, learning_rate: jax.Array | float):
  """`opt_state` (of `make_optimizer`) with its base learning rate set to `learning_rate`."""
  return opt_state._replace(hyperparams={**opt_state.hyperparams,
                                         "learning_rate": jnp.asarray(learning_rate,
                                                                      jnp.float32)})


def init(key: jax.Array, network: ActorCritic, optimizer: optax.GradientTransformation,
         obs_shape, obs_dtype) -> PPOState:
  dummy_obs = jnp.zeros((1,) + tuple(obs_shape), obs_dtype)
  params = network.init(key, network.initial_carry(1), dummy_obs, jnp.ones((1,), bool),
                        network.spec.all_valid_mask((1,)))
  return PPOState(params, optimizer.init(params),
                  ObservationStatistics.create(tuple(obs_shape)))


def prepare_obs(obs: jax.Array, stats: ObservationStatistics, normalize: bool) -> jax.Array:
  """What the network sees: pixels untouched (uint8), vectors optionally normalised."""
  if normalize and jnp.issubdtype(obs.dtype, jnp.floating):
    return stats.normalize(obs)
  return obs


def unroll(network: ActorCritic, params, carry: Carry, obs, is_first, mask, dt=None):
  """Applies the network over a sequence [L, N, ...] from `carry`; returns (dist, value)
  with leading [L, N]. Feed-forward networks are applied to all steps at once, cores with a
  whole-sequence path (Mamba) use it, the others are stepped by `lax.scan` (with the
  per-step elapsed time `dt` [L, N] where the core takes it)."""
  if network.core == "none":
    length, batch = is_first.shape
    merge = lambda x: x.reshape((length * batch,) + x.shape[2:])
    _, dist, value = network.apply(params, carry, merge(obs), merge(is_first), merge(mask))
    return jax.tree.map(lambda x: x.reshape((length, batch) + x.shape[1:]), (dist, value))
  if cores.has_sequence_path(network.core):
    _, dist, value = network.apply(params, carry, obs, is_first, mask, method=network.sequence)
    return dist, value

  def step(carry, inputs):
    carry, dist, value = network.apply(params, carry, *inputs)
    return carry, (dist, value)

  timed = dt is not None and cores.takes_dt(network.core)
  _, (dist, value) = jax.lax.scan(
      step, carry, (obs, is_first, mask, dt) if timed else (obs, is_first, mask))
  return dist, value


class Minibatch(NamedTuple):
  rollout: Rollout  # [L, N, ...]; rollout.carry holds only the chunk-start carry [N, ...]
  advantage: jax.Array  # [L, N]
  target: jax.Array  # [L, N] value targets (GAE returns)


def loss(params, batch: Minibatch, ppo: ml_collections.ConfigDict, *, network: ActorCritic,
         obs_stats: ObservationStatistics, axis_name: str | None = None,
         distill_coef: jax.Array | float | None = None,
         coefficients: LossCoefficients | None = None):
  """Clipped-surrogate PPO loss on one minibatch with the `ppo` section's coefficients (or
  `coefficients`, e.g. one PBT member's); returns (loss, metrics).

  loss = −E[min(ρA, clip(ρ, 1±ε)A)] + c_v · ½E[(V − R)²] (optionally clipped around the old
  value) − c_e · E[H[π]] (H of the squashed action with `ppo.squashed_entropy`, see
  `mbjax.nets.hybrid`), with ρ = π(a|s)/π_old(a|s), plus c_d · E[KL(teacher ‖ π)] when the
  rollout carries a teacher (c_d: `distill_coef`, required then). Averaged over devices
  when sharded.
  """
  coef = LossCoefficients.from_section(ppo) if coefficients is None else coefficients
  data = batch.rollout
  if data.teacher is not None and distill_coef is None:
    raise ValueError("ppo.loss: the rollout carries a distillation teacher; pass distill_coef")
  obs = prepare_obs(data.obs, obs_stats, ppo.normalize_observations)
  params = varying(params, axis_name)  # the gradient's device sum once (a core's scan)
  dist, value = unroll(network, params, data.carry, obs, data.is_first, data.mask, data.dt)
  log_prob = dist.log_prob(data.action)
  entropy = dist.entropy(ppo.squashed_entropy).mean()

  advantage = batch.advantage
  if ppo.normalize_advantages:
    mean = pmean(advantage.mean(), axis_name)
    var = pmean(jnp.square(advantage - mean).mean(), axis_name)
    advantage = (advantage - mean) / (jnp.sqrt(var) + 1e-8)

  log_ratio = log_prob - data.log_prob
  ratio = jnp.exp(log_ratio)
  clipped_ratio = jnp.clip(ratio, 1.0 - coef.clip_eps, 1.0 + coef.clip_eps)
  policy_loss = -jnp.minimum(ratio * advantage, clipped_ratio * advantage).mean()

  value_error = jnp.square(value - batch.target)
  if ppo.clip_value_loss:
    clipped_value = data.value + jnp.clip(value - data.value, -coef.clip_eps, coef.clip_eps)
    value_error = jnp.maximum(value_error, jnp.square(clipped_value - batch.target))
  value_loss = 0.5 * value_error.mean()

  total = policy_loss + coef.vf_coef * value_loss - coef.ent_coef * entropy
  distill = {}
  if data.teacher is not None:
    distill_loss = data.teacher.kl_divergence(dist).mean()
    total += distill_coef * distill_loss
    distill = {"loss/distill": distill_loss,
               "loss/distill_coef": jnp.asarray(distill_coef, jnp.float32)}
  metrics = {
      **distill,
      "loss/total": total,
      "loss/policy": policy_loss,
      "loss/value": value_loss,
      "policy/entropy": entropy,
      "policy/approx_kl": ((ratio - 1.0) - log_ratio).mean(),
      "policy/clip_fraction": (jnp.abs(ratio - 1.0) > coef.clip_eps).mean(),
  }
  # Differentiating the device-mean gives the mean gradient (see module docstring).
  return pmean(total, axis_name), jax.tree.map(lambda m: pmean(m, axis_name), metrics)


def _chunk(rollout: Rollout, advantage, target, seq_len: int):
  """[T, E, ...] → [T/L, L, E, ...] chunks; the carry keeps only each chunk's first step."""
  def split(x):
    return x.reshape((x.shape[0] // seq_len, seq_len) + x.shape[1:])

  carry = jax.tree.map(lambda c: c[::seq_len], rollout.carry)
  rollout = rollout._replace(carry=None)
  chunks = jax.tree.map(split, (rollout, advantage, target))
  return chunks[0]._replace(carry=carry), chunks[1], chunks[2]


def _gather_minibatch(chunks, indices) -> Minibatch:
  """Takes chunks `indices` and merges them with the env axis: [k, L, E] → [L, k·E]."""
  rollout, advantage, target = chunks

  def take_seq(x):
    x = x[indices]  # [k, L, E, ...]
    x = jnp.swapaxes(x, 0, 1)  # [L, k, E, ...]
    return x.reshape((x.shape[0], x.shape[1] * x.shape[2]) + x.shape[3:])

  def take_carry(c):
    c = c[indices]  # [k, E, ...]
    return c.reshape((c.shape[0] * c.shape[1],) + c.shape[2:])

  carry = jax.tree.map(take_carry, rollout.carry)
  seq = jax.tree.map(take_seq, (rollout._replace(carry=None), advantage, target))
  return Minibatch(seq[0]._replace(carry=carry), seq[1], seq[2])


def update(state: PPOState, rollout: Rollout, key: jax.Array, ppo: ml_collections.ConfigDict,
           *, network: ActorCritic, optimizer: optax.GradientTransformation,
           axis_name: str | None = None, distill_coef: jax.Array | float | None = None,
           coefficients: LossCoefficients | None = None
           ) -> tuple[PPOState, dict[str, jax.Array]]:
  """One PPO update on a rollout [T, E, ...] with the `ppo` config section; `key` must be
  equal on every device. `distill_coef` weighs the KL towards `rollout.teacher` (a
  schedule, see `mbjax.agents.apex`); `coefficients` replace the section's loss
  coefficients."""
  rollout = jax.tree.map(jnp.asarray, rollout)  # host arrays cannot be indexed by tracers
  num_steps = rollout.reward.shape[0]
  seq_len = ppo.seq_len if network.core != "none" else 1
  num_chunks = num_steps // seq_len
  if num_steps % seq_len or num_chunks % ppo.num_minibatches:
    raise ValueError(
        f"rollout length {num_steps} must split into chunks of ppo.seq_len={seq_len} whose "
        f"count is divisible by ppo.num_minibatches={ppo.num_minibatches}")
  chex.assert_rank(rollout.reward, 2)

  advantage, target = generalized_advantage_estimation(
      rollout.reward, rollout.value, rollout.next_value, rollout.terminated,
      rollout.truncated, ppo.gamma, ppo.gae_lambda)
  chunks = _chunk(rollout, advantage, target, seq_len)
  grad_fn = jax.grad(loss, has_aux=True)

  def minibatch_step(train, indices):
    params, opt_state = train
    grads, metrics = grad_fn(params, _gather_minibatch(chunks, indices), ppo, network=network,
                             obs_stats=state.obs_stats, axis_name=axis_name,
                             distill_coef=distill_coef, coefficients=coefficients)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    metrics["optim/grad_norm"] = optax.tree.norm(grads)
    return (optax.apply_updates(params, updates), opt_state), metrics

  def epoch(train, order):
    return jax.lax.scan(minibatch_step, train, order.reshape(ppo.num_minibatches, -1))

  # Every epoch's shuffle drawn at once, before the loop (one batched draw, not a threefry
  # loop and a sort per epoch); the same orders as drawing each inside its epoch.
  orders = jax.vmap(lambda k: jax.random.permutation(k, num_chunks))(
      jax.random.split(key, ppo.update_epochs))
  (params, opt_state), metrics = jax.lax.scan(epoch, (state.params, state.opt_state), orders)
  obs_stats = state.obs_stats
  if ppo.normalize_observations and jnp.issubdtype(rollout.obs.dtype, jnp.floating):
    obs_stats = obs_stats.update(rollout.obs, axis_name)
  metrics = jax.tree.map(jnp.mean, metrics)
  metrics["value/target_mean"] = pmean(target.mean(), axis_name)
  return PPOState(params, opt_state, obs_stats), metrics
