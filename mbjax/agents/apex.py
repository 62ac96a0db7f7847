"""The apex learner step: PPO on the rollout, the model-based learners on replay.

`update` runs once per rollout inside the jitted Anakin update:

1. PPO on the real rollout when PPO is the served policy (`served.policy = "ppo"`), with an
   optional distillation term towards a latent actor (`served.distill_from`);
2. CPQE (`cpqe.enabled`: teacher, consistency student, Q-ensemble) on the rollout's
   transitions, from its own key stream;
3. with the world model on: the rollout goes into the replay (device-resident, one stream
   per env), and once it holds `replay.prefill` env steps the model-based learners take
   `model_updates` steps, each on a fresh uniform sample of `replay.batch_size` windows of
   `replay.burn_in + replay.seq_len` steps: one world-model step, one dream actor-critic
   step imagining from every replayed posterior, an update of the EFE preference prior and
   one EFE step. `model_updates` = train_ratio × (env steps per rollout) / (B × L), so the
   world model sees `replay.train_ratio` replayed steps per env step (DreamerV3's ratio).

`act` is the served latent policy (`served.policy = "dreamer"` or `"efe"`): the world model
filters each observation into a posterior (carried across steps, reset at episode starts)
and the latent actor picks the action from its features under the env's action mask.

Each learner owns its parameters and optimiser; gradients stay apart because every loss
is differentiated only with respect to its own parameters and receives the others as
`stop_gradient` inputs — nothing is ever frozen or mutated. This module is the one place
that holds the whole config: each learner receives its own section. Switches mirror
upstream's `METABONK_USE_DREAM_TRAINING` / `METABONK_USE_ACTIVE_INFERENCE` /
`METABONK_TRAIN_CPQE` (`dream.enabled`, `efe.enabled`; `cpqe.enabled`).
"""
from __future__ import annotations

import math
from typing import Any

import chex
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections

from mbjax.agents import cpqe as cpqe_lib
from mbjax.agents import dream, efe, ppo
from mbjax.agents import world_model as wm_lib
from mbjax.data import replay as replay_lib
from mbjax.envs.spaces import HybridAction, HybridActionSpec
from mbjax.nets.hybrid import to_env_action

LATENT_POLICIES = ("dreamer", "efe")


@flax.struct.dataclass
class AuxState:
  """The auxiliary learners' state; a disabled learner holds `()`."""

  world_model: Any = ()
  dream: Any = ()
  efe: Any = ()
  preference: Any = ()
  cpqe: Any = ()


@flax.struct.dataclass
class LatentCarry:
  """The served latent policy's per-env state: the last posterior and the action after it."""

  state: wm_lib.LatentState  # [E]
  prev_action: jax.Array  # f32[E, A], model vector of a_{t−1}


# Folded into the init and update keys for CPQE, leaving the other learners' splits alone.
_CPQE_STREAM = 0x43505145


class Learners(flax.struct.PyTreeNode):
  """Static modules, optimisers and schedule of the auxiliary learners."""

  cfg: ml_collections.ConfigDict = flax.struct.field(pytree_node=False)
  spec: HybridActionSpec = flax.struct.field(pytree_node=False)
  squash: str = flax.struct.field(pytree_node=False)
  world_model: Any = flax.struct.field(pytree_node=False, default=None)
  wm_optimizer: Any = flax.struct.field(pytree_node=False, default=None)
  dream: Any = flax.struct.field(pytree_node=False, default=None)
  efe: Any = flax.struct.field(pytree_node=False, default=None)
  model_updates: int = flax.struct.field(pytree_node=False, default=0)

  @property
  def enabled(self) -> bool:
    return self.world_model is not None

  @property
  def cpqe(self) -> ml_collections.ConfigDict | None:
    return self.cfg.cpqe if self.cfg.cpqe.enabled else None

  @property
  def served(self) -> str:
    return self.cfg.served.policy

  @property
  def trains_ppo(self) -> bool:
    """PPO learns on-policy, so only from rollouts it acted in."""
    return self.served == "ppo"

  @property
  def serving(self):
    """(networks, state name) of the served latent actor, or None when PPO acts."""
    if self.served not in LATENT_POLICIES:
      return None
    return (self.dream, "dream") if self.served == "dreamer" else (self.efe, "efe")


def model_updates(cfg: ml_collections.ConfigDict) -> int:
  """Model-based updates per rollout for `replay.train_ratio` (at least 1)."""
  rollout_steps = cfg.num_envs * cfg.ppo.num_steps
  per_update = cfg.replay.batch_size * cfg.replay.seq_len
  updates = round(cfg.replay.train_ratio * rollout_steps / per_update)
  if updates < 1:
    raise ValueError(
        f"config.replay.train_ratio={cfg.replay.train_ratio}: with {rollout_steps} env steps "
        f"per rollout and {per_update} replayed steps per update it asks for "
        f"{cfg.replay.train_ratio * rollout_steps / per_update:.2f} updates per rollout; "
        "expected at least 1 (raise the ratio, num_envs or ppo.num_steps)")
  return updates


def make_learners(cfg: ml_collections.ConfigDict, spec: HybridActionSpec, obs_shape) -> Learners:
  squash = cfg.network.squash
  if cfg.cpqe.enabled and spec.continuous_dim == 0:
    raise ValueError("config.cpqe.enabled=True needs continuous action dims; the env "
                     f"{cfg.env.name!r} has none (branches {spec.branches})")
  if not cfg.world_model.enabled:
    return Learners(cfg, spec, squash)
  return Learners(
      cfg, spec, squash,
      world_model=wm_lib.make_world_model(cfg.world_model, obs_shape, spec),
      wm_optimizer=wm_lib.make_optimizer(cfg.world_model),
      dream=dream.make_networks(cfg.dream, spec, squash) if cfg.dream.enabled else None,
      efe=dream.make_networks(cfg.efe, spec, squash) if cfg.efe.enabled else None,
      model_updates=model_updates(cfg))


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


def init_replay(learners: Learners, num_envs: int, obs_shape, obs_dtype):
  """An empty replay of `replay.capacity` steps for `num_envs` env streams (`()` without a
  world model)."""
  if not learners.enabled:
    return ()
  spec = learners.spec
  # One env step as the replay stores it: a `Sequence` without its time axis.
  example = wm_lib.Sequence(
      obs=jnp.zeros(tuple(obs_shape), obs_dtype),
      action=jnp.zeros((wm_lib.action_vector_size(spec),), jnp.float32),
      reward=jnp.zeros((), jnp.float32), terminated=jnp.zeros((), bool),
      is_first=jnp.zeros((), bool), mask=jnp.zeros((spec.mask_size,), bool))
  per_env = learners.cfg.replay.capacity // learners.cfg.num_envs
  return replay_lib.init_streams(example, per_env, num_envs)


def initial_latent_carry(learners: Learners, num_envs: int, always: bool = False
                         ) -> LatentCarry | tuple:
  """The zero filter state of `num_envs` envs for a latent actor: `()` when PPO is served,
  unless `always` (tools that play a latent actor whoever is served)."""
  if learners.serving is None and not (always and learners.enabled):
    return ()
  state = learners.world_model.rssm.initial(num_envs)
  return LatentCarry(state, jnp.zeros((num_envs, wm_lib.action_vector_size(learners.spec))))


def latent_act(aux: AuxState, carry: LatentCarry, obs, is_first, mask, key, *,
               learners: Learners, source: str, deterministic: bool = False
               ) -> tuple[LatentCarry, HybridAction]:
  """A latent actor (`source`: "dream" or "efe") acting through the world model's filter
  for a batch of envs: o_t and a_{t−1} update the posterior s_t, and the actor picks a_t
  from its features under the env's `mask`. Returns (new carry, raw action)."""
  nets = learners.dream if source == "dream" else learners.efe
  if nets is None:
    raise ValueError(f"the {source!r} latent actor is disabled in this config")
  filter_key, action_key = jax.random.split(key)
  prev_action = jnp.where(is_first[:, None], 0.0, carry.prev_action)
  post = wm_lib.filter_step(learners.world_model, aux.world_model.params, carry.state,
                            prev_action, obs, is_first, filter_key)
  raw = dream.act(nets, getattr(aux, source), post.features, mask, action_key, deterministic)
  action = wm_lib.action_vector(to_env_action(raw, learners.squash), learners.spec)
  return LatentCarry(post, action), raw


def act(aux: AuxState, carry: LatentCarry, obs, is_first, mask, key, *, learners: Learners,
        deterministic: bool = False) -> tuple[LatentCarry, HybridAction]:
  """The served latent policy (`served.policy`) for a batch of envs."""
  _, source = learners.serving
  return latent_act(aux, carry, obs, is_first, mask, key, learners=learners, source=source,
                    deterministic=deterministic)


def _teacher(aux: AuxState, rollout: ppo.Rollout, learners: Learners, key):
  """The latent policy's action distributions on the rollout's posteriors, masked like the
  behaviour policy — the distillation target for PPO."""
  source = learners.cfg.served.distill_from
  nets, state = (learners.dream, aux.dream) if source == "dream" else (learners.efe, aux.efe)
  actions = _model_actions(rollout.action, learners)
  is_first = rollout.is_first.at[0].set(True)
  posts, _ = wm_lib.observe(learners.world_model, aux.world_model.params, rollout.obs,
                            wm_lib.previous_actions(actions), is_first, key)
  teacher = nets.actor.apply(state.actor_params, posts.features, rollout.mask)
  return jax.lax.stop_gradient(teacher)


def _model_actions(raw: HybridAction, learners: Learners) -> jax.Array:
  return wm_lib.action_vector(to_env_action(raw, learners.squash), learners.spec)


def distill_coef(served: ml_collections.ConfigDict, progress: jax.Array | float) -> jax.Array:
  """The distillation coefficient after `progress` (the fraction of the run's updates done),
  from the `served` section.

  Distillation runs until `served.distill_end` (a fraction of the run) and is 0 after it:
  at `served.distill_coef` throughout ("constant"), or decaying linearly from it to 0 at
  the end ("linear"). The latent teacher can guide PPO early and then let it go.
  """
  coef = jnp.asarray(served.distill_coef, jnp.float32)
  progress = jnp.asarray(progress, jnp.float32)
  end = served.distill_end
  if served.distill_schedule == "linear":
    return coef * jnp.clip(1.0 - progress / end, 0.0, 1.0)
  return jnp.where(progress < end, coef, 0.0)


def update(agent: ppo.PPOState, aux: AuxState, replay, rollout: ppo.Rollout, key, *,
           learners: Learners, network, optimizer, axis_name: str | None = None,
           progress: jax.Array | float = 0.0,
           coefficients: ppo.LossCoefficients | None = None,
           store: jax.Array | bool = True):
  """One apex learner step; returns (agent, aux, replay, metrics). `progress` is the
  fraction of the run's updates done before this one (for `served.distill_schedule`);
  `coefficients` override the config's PPO loss coefficients; the rollout goes into the
  replay only where `store` (the same on every device: the streams stay equally full)."""
  cfg = learners.cfg
  rollout = jax.tree.map(jnp.asarray, rollout)
  ppo_key, teacher_key, aux_key = jax.random.split(key, 3)
  metrics = {}
  if learners.trains_ppo:
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
    return agent, aux, replay, metrics
  transitions = wm_lib.Sequence(rollout.obs, _model_actions(rollout.action, learners),
                                rollout.reward, rollout.terminated, rollout.is_first,
                                rollout.mask)
  # The replay passes through the untaken branch unchanged, so it is updated in place.
  replay = jax.lax.cond(
      store, lambda r: replay_lib.add_streams(r, jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1),
                                                              transitions)),
      lambda r: r, replay)
  aux, model_metrics = train_from_replay(aux, replay, aux_key, learners=learners,
                                         axis_name=axis_name)
  return agent, aux, replay, {**metrics, **model_metrics}


def train_from_replay(aux: AuxState, replay, key, *, learners: Learners,
                      axis_name: str | None = None):
  """`learners.model_updates` model-based updates on windows sampled from `replay`, once
  it holds `replay.prefill` env steps (over all envs and devices); metrics are the
  updates' means (zeros before the prefill is reached, with `model/trained` 0)."""
  section = learners.cfg.replay
  num_shards = 1 if axis_name is None else jax.lax.psum(1, axis_name)
  local_batch = section.batch_size // num_shards
  length = section.burn_in + section.seq_len
  # Every stream holds as many steps; summed over the devices, the count is the same on
  # each of them, so every device takes the same branch below.
  streams = replay.size.shape[0] * num_shards
  stored = replay.size[0] * replay.size.shape[0]
  if axis_name is not None:
    stored = jax.lax.psum(stored, axis_name)
    key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))  # each its own windows

  def one_update(aux, update_key):
    sample_key, learn_key = jax.random.split(update_key)
    windows = replay_lib.sample_windows(replay, sample_key, local_batch, length)
    sequence = windows._replace(is_first=windows.is_first.at[0].set(True))
    return model_update(aux, sequence, learn_key, learners=learners, axis_name=axis_name)

  def train(aux):
    aux, metrics = jax.lax.scan(one_update, aux,
                                jax.random.split(key, learners.model_updates))
    return aux, jax.tree.map(lambda m: m.mean(0), metrics)

  def skip(aux):
    return aux, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes)

  metric_shapes = jax.eval_shape(train, aux)[1]
  ready = (stored >= section.prefill) & (stored >= length * streams)  # a whole window each
  aux, metrics = jax.lax.cond(ready, train, skip, aux)
  return aux, {**metrics, "model/trained": ready.astype(jnp.float32)}


def model_update(aux: AuxState, sequence: wm_lib.Sequence, key, *, learners: Learners,
                 axis_name: str | None = None, train_world_model: bool = True,
                 behaviour_action: jax.Array | None = None):
  """World model → dream → EFE on windows [burn_in + L, B]; returns (aux, metrics).

  The online learner calls it with windows sampled from its replay; the offline entry
  (`mbjax.train.offline`) with windows sampled from exported episodes. With
  `train_world_model=False` the world model only supplies posteriors (an offline phase that
  trains the latent policies against a finished model). The actors' behaviour term imitates
  the windows' own actions, or `behaviour_action` [burn_in + L, B, A] (the same action
  vectors, e.g. a teacher's choices on the replayed observations) where given.
  """
  cfg = learners.cfg
  burn_in = cfg.replay.burn_in
  wm_key, dream_key, efe_key = jax.random.split(key, 3)
  if train_world_model:
    world_model, posts, metrics = wm_lib.update(
        aux.world_model, sequence, wm_key, cfg.world_model, model=learners.world_model,
        optimizer=learners.wm_optimizer, burn_in=burn_in, axis_name=axis_name)
    aux = aux.replace(world_model=world_model)
  else:
    posts, _ = wm_lib.observe(learners.world_model, aux.world_model.params, sequence.obs,
                              wm_lib.previous_actions(sequence.action),
                              sequence.is_first, wm_key)
    posts = jax.tree.map(lambda x: x[burn_in:], posts)
    metrics = {}
  wm_params = aux.world_model.params
  trained = jax.tree.map(lambda x: x[burn_in:], sequence)
  flat = lambda x: x.reshape((-1,) + x.shape[2:])
  starts = jax.tree.map(flat, posts)  # every posterior

  imitated = trained.action if behaviour_action is None else behaviour_action[burn_in:]
  chex.assert_equal_shape([imitated, trained.action])

  def behaviour(nets: dream.Networks):  # the replayed steps' recorded (or teacher's) actions
    return dream.recorded_behaviour(starts.features, flat(imitated),
                                    flat(trained.mask), nets.actor.spec, nets.actor.squash)

  if learners.dream is not None:
    replayed = dream.ReplayedReturns(posts.features, trained.reward, trained.terminated,
                                     trained.is_first)
    dream_state, dream_metrics = dream.update(
        aux.dream, wm_params, starts, dream_key, cfg.dream, nets=learners.dream,
        world_model=learners.world_model,
        reward_fn=dream.world_model_reward(learners.world_model, wm_params),
        replayed=replayed, behaviour=behaviour(learners.dream), axis_name=axis_name,
        prefix="dream")
    metrics.update(dream_metrics)
    aux = aux.replace(dream=dream_state)

  if learners.efe is not None:
    preference = efe.update_preference(aux.preference, flat(trained.obs), flat(trained.reward),
                                       cfg.efe, axis_name)
    reward_fn = efe.negative_free_energy_reward(learners.world_model, wm_params, preference,
                                                cfg.efe)
    efe_state, efe_metrics = dream.update(
        aux.efe, wm_params, starts, efe_key, cfg.efe, nets=learners.efe,
        world_model=learners.world_model, reward_fn=reward_fn,
        behaviour=behaviour(learners.efe), axis_name=axis_name, prefix="efe")
    metrics.update(efe_metrics)
    aux = aux.replace(efe=efe_state, preference=preference)
  return aux, metrics
