"""The apex learner step: PPO → world model → dream → Active Inference, on one rollout.

One pure function, `update`, run once per rollout inside the jitted Anakin update:

1. PPO on the real rollout (with an optional distillation term towards a latent policy,
   `served.distill_from` / `served.distill_coef`: how dream or EFE training shapes the
   policy that acts);
2. one world-model step on fixed-length windows cut from the rollout;
3. one dream actor-critic step on trajectories imagined from the new posteriors;
4. an update of the EFE preference prior and one EFE actor-critic step.

With `cpqe.enabled`, CPQE (teacher, consistency student, Q-ensemble; `mbjax.agents.cpqe`)
also takes one step on the rollout's transitions after PPO, from its own key stream, so the
other learners compute the same numbers with it on or off.

Each learner owns its parameters and optimiser; gradients stay apart because every loss
is differentiated only with respect to its own parameters and receives the others as
`stop_gradient` inputs — nothing is ever frozen or mutated. This module reads the whole
experiment config and hands each learner its own section (`ppo`, `world_model`, `dream`,
`efe`, `cpqe`; `served` for distillation). Switches mirror upstream's
`METABONK_USE_DREAM_TRAINING` / `METABONK_USE_ACTIVE_INFERENCE` / `METABONK_TRAIN_CPQE`
(`dream.enabled`, `efe.enabled`, both on by default; `cpqe.enabled`, off).
"""
from __future__ import annotations

import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections

from mbjax.agents import cpqe as cpqe_lib
from mbjax.agents import dream, efe, ppo
from mbjax.agents import world_model as wm_lib
from mbjax.envs.spaces import HybridActionSpec
from mbjax.nets.hybrid import to_env_action


@flax.struct.dataclass
class AuxState:
  """The auxiliary learners' state; a disabled learner holds `()`."""

  world_model: Any = ()
  dream: Any = ()
  efe: Any = ()
  preference: Any = ()
  cpqe: Any = ()


# Folded into the init and update keys for CPQE, leaving the other learners' splits alone.
_CPQE_STREAM = 0x43505145


class Learners(flax.struct.PyTreeNode):
  """Static modules and optimisers of the auxiliary learners."""

  cfg: ml_collections.ConfigDict = flax.struct.field(pytree_node=False)
  spec: HybridActionSpec = flax.struct.field(pytree_node=False)
  squash: str = flax.struct.field(pytree_node=False)
  world_model: Any = flax.struct.field(pytree_node=False, default=None)
  wm_optimizer: Any = flax.struct.field(pytree_node=False, default=None)
  dream: Any = flax.struct.field(pytree_node=False, default=None)
  efe: Any = flax.struct.field(pytree_node=False, default=None)

  @property
  def enabled(self) -> bool:
    return self.world_model is not None

  @property
  def cpqe(self) -> ml_collections.ConfigDict | None:
    """The CPQE config section when it trains in the learner."""
    return self.cfg.cpqe if self.cfg.cpqe.enabled else None


def make_learners(cfg: ml_collections.ConfigDict, spec: HybridActionSpec, obs_shape) -> Learners:
  squash = cfg.network.squash
  if Learners(cfg, spec, squash).cpqe is not None and spec.continuous_dim == 0:
    raise ValueError("config.cpqe.enabled=True needs continuous action dims; the env "
                     f"{cfg.env.name!r} has none (branches {spec.branches})")
  if not cfg.world_model.enabled:
    return Learners(cfg, spec, squash)
  return Learners(
      cfg, spec, squash,
      world_model=wm_lib.make_world_model(cfg.world_model, obs_shape),
      wm_optimizer=wm_lib.make_optimizer(cfg.world_model),
      dream=dream.make_networks(cfg.dream, spec, squash) if cfg.dream.enabled else None,
      efe=dream.make_networks(cfg.efe, spec, squash) if cfg.efe.enabled else None)


def init(key, learners: Learners, obs_shape, obs_dtype) -> AuxState:
  aux = AuxState()
  if learners.cpqe is not None:
    aux = aux.replace(cpqe=cpqe_lib.init(
        jax.random.fold_in(key, _CPQE_STREAM), learners.cpqe, math.prod(obs_shape),
        learners.spec.continuous_dim))
  if not learners.enabled:
    return aux
  wm_key, dream_key, efe_key = jax.random.split(key, 3)
  world_model = wm_lib.init(wm_key, learners.world_model, learners.wm_optimizer, obs_shape,
                            obs_dtype, wm_lib.action_vector_size(learners.spec))
  rssm = learners.world_model.rssm
  feature_size = rssm.deter + rssm.stoch_size
  obs_size = math.prod(obs_shape)
  return aux.replace(
      world_model=world_model,
      dream=dream.init(dream_key, learners.dream, feature_size) if learners.dream else (),
      efe=dream.init(efe_key, learners.efe, feature_size) if learners.efe else (),
      preference=efe.Preference.create(obs_size) if learners.efe else ())


def _model_actions(rollout: ppo.Rollout, learners: Learners) -> jax.Array:
  return wm_lib.action_vector(to_env_action(rollout.action, learners.squash), learners.spec)


def _windows(rollout: ppo.Rollout, learners: Learners) -> wm_lib.Sequence:
  """[T, E] rollout → [L, (T/L)·E] windows, each starting from a fresh latent state."""
  length = learners.cfg.world_model.seq_len

  def cut(x):
    x = x.reshape((x.shape[0] // length, length) + x.shape[1:])  # [T/L, L, E, ...]
    x = jnp.swapaxes(x, 0, 1)
    return x.reshape((length, x.shape[1] * x.shape[2]) + x.shape[3:])

  sequence = wm_lib.Sequence(rollout.obs, _model_actions(rollout, learners), rollout.reward,
                             rollout.terminated, rollout.is_first)
  sequence = jax.tree.map(cut, sequence)
  return sequence._replace(is_first=sequence.is_first.at[0].set(True))


def _teacher(aux: AuxState, rollout: ppo.Rollout, learners: Learners, key):
  """The latent policy's action distributions on the rollout's posteriors, masked like the
  behaviour policy — the distillation target for PPO."""
  source = learners.cfg.served.distill_from
  nets, state = (learners.dream, aux.dream) if source == "dream" else (learners.efe, aux.efe)
  actions = _model_actions(rollout, learners)
  is_first = rollout.is_first.at[0].set(True)
  posts, _ = wm_lib.observe(learners.world_model, aux.world_model.params, rollout.obs,
                            wm_lib.previous_actions(actions), is_first, key)
  teacher = nets.actor.apply(state.actor_params, posts.features, rollout.mask)
  return jax.lax.stop_gradient(teacher)


def _starts(posts: wm_lib.LatentState, num_starts: int, key) -> wm_lib.LatentState:
  flat = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), posts)
  count = flat.deter.shape[0]
  index = jax.random.choice(key, count, (min(num_starts, count),), replace=False)
  return jax.tree.map(lambda x: x[index], flat)


def distill_coef(served: ml_collections.ConfigDict, progress: jax.Array | float) -> jax.Array:
  """The distillation coefficient of the `served` config section after `progress` (the
  fraction of the run's updates done).

  Distillation runs until `distill_end` (a fraction of the run) and is 0 after it: at
  `distill_coef` throughout ("constant"), or decaying linearly from it to 0 at the end
  ("linear"). The latent teacher can guide PPO early and then let it go.
  """
  coef = jnp.asarray(served.distill_coef, jnp.float32)
  progress = jnp.asarray(progress, jnp.float32)
  end = served.distill_end
  if served.distill_schedule == "linear":
    return coef * jnp.clip(1.0 - progress / end, 0.0, 1.0)
  return jnp.where(progress < end, coef, 0.0)


def update(agent: ppo.PPOState, aux: AuxState, rollout: ppo.Rollout, key, *, learners: Learners,
           network, optimizer, axis_name: str | None = None, progress: jax.Array | float = 0.0,
           coefficients: ppo.LossCoefficients | None = None):
  """One apex learner step; returns (agent, aux, metrics). `progress` is the fraction of
  the run's updates done before this one (for `served.distill_schedule`); `coefficients`
  override the config's PPO loss coefficients."""
  cfg = learners.cfg
  rollout = jax.tree.map(jnp.asarray, rollout)
  ppo_key, teacher_key, aux_key = jax.random.split(key, 3)
  if learners.enabled and cfg.served.distill_from != "none":
    rollout = rollout._replace(teacher=_teacher(aux, rollout, learners, teacher_key))
  agent, metrics = ppo.update(agent, rollout, ppo_key, cfg.ppo, network=network,
                              optimizer=optimizer, axis_name=axis_name,
                              distill_coef=distill_coef(cfg.served, progress),
                              coefficients=coefficients)
  if learners.cpqe is not None:
    chunks = cpqe_lib.rollout_chunks(
        rollout.obs, to_env_action(rollout.action, learners.squash).continuous, rollout.reward,
        rollout.terminated, rollout.truncated, learners.cpqe.horizon)
    cpqe_state, cpqe_metrics = cpqe_lib.learner_update(
        aux.cpqe, chunks, jax.random.fold_in(key, _CPQE_STREAM), learners.cpqe, axis_name)
    aux = aux.replace(cpqe=cpqe_state)
    metrics = {**metrics, **cpqe_metrics}
  if not learners.enabled:
    return agent, aux, metrics
  aux, aux_metrics = auxiliary_update(aux, _windows(rollout, learners), aux_key,
                                      learners=learners, axis_name=axis_name)
  return agent, aux, {**metrics, **aux_metrics}


def auxiliary_update(aux: AuxState, sequence: wm_lib.Sequence, key, *, learners: Learners,
                     axis_name: str | None = None, train_world_model: bool = True):
  """World model → dream → EFE on [L, B] windows; returns (aux, metrics).

  The online learner calls it with windows cut from each rollout; the offline entry
  (`mbjax.train.offline`) with windows sampled from exported episodes. With
  `train_world_model=False` the world model only supplies posteriors (an offline phase that
  trains the latent policies against a finished model).
  """
  cfg = learners.cfg
  wm_key, dream_key, dream_start_key, efe_key, efe_start_key = jax.random.split(key, 5)
  if train_world_model:
    world_model, posts, metrics = wm_lib.update(
        aux.world_model, sequence, wm_key, cfg.world_model, model=learners.world_model,
        optimizer=learners.wm_optimizer, axis_name=axis_name)
    aux = aux.replace(world_model=world_model)
  else:
    posts, _ = wm_lib.observe(learners.world_model, aux.world_model.params, sequence.obs,
                              wm_lib.previous_actions(sequence.action),
                              sequence.is_first, wm_key)
    metrics = {}
  wm_params = aux.world_model.params

  if learners.dream is not None:
    reward_fn = dream.world_model_reward(learners.world_model, wm_params)
    dream_state, dream_metrics = dream.update(
        aux.dream, wm_params, _starts(posts, cfg.dream.num_starts, dream_start_key),
        dream_key, cfg.dream, nets=learners.dream, world_model=learners.world_model,
        reward_fn=reward_fn, axis_name=axis_name, prefix="dream")
    metrics.update(dream_metrics)
    aux = aux.replace(dream=dream_state)

  if learners.efe is not None:
    flat = lambda x: x.reshape((-1,) + x.shape[2:])
    preference = efe.update_preference(aux.preference, flat(sequence.obs),
                                       flat(sequence.reward), cfg.efe, axis_name)
    reward_fn = efe.negative_free_energy_reward(learners.world_model, wm_params, preference,
                                                cfg.efe)
    efe_state, efe_metrics = dream.update(
        aux.efe, wm_params, _starts(posts, cfg.efe.num_starts, efe_start_key),
        efe_key, cfg.efe, nets=learners.efe, world_model=learners.world_model,
        reward_fn=reward_fn, axis_name=axis_name, prefix="efe")
    metrics.update(efe_metrics)
    aux = aux.replace(efe=efe_state, preference=preference)
  return aux, metrics
