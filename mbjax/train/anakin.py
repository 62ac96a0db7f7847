"""The Anakin loop (Hessel et al. 2021, "Podracer architectures"): acting and learning in
one jitted program.

`make_train(cfg, env, env_params)` returns pure functions in PureJaxRL's shape:
`init(key) -> RunnerState`, `update(runner) -> (runner, metrics)` (collect one rollout of
`num_steps` × envs, then one PPO update; optionally with traced `ppo.LossCoefficients`) and
`train(key)`, the whole run as one
`jit(scan(...))` that can be vmapped over seeds.

Every function takes `axis_name`: under `shard_map` (see `mbjax.train.sharding`) each device
steps `num_envs / num_devices` envs. Each env's randomness is derived from its *global*
index (`fold_in(step_key, env_index)`), so a run's trajectory does not depend on how many
devices it is split over; only float reduction order does.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections

from mbjax.agents import apex, ppo
from mbjax.envs.base import Environment
from mbjax.envs.wrappers import EpisodeStatistics, FrameStack, VecEnv, unwrapped
from mbjax.nets.hybrid import ActionNoise, action_noise, to_env_action
from mbjax.train import finite


@flax.struct.dataclass
class RunnerState:
  agent: ppo.PPOState
  aux: apex.AuxState  # world model, dream and EFE learners (empty when disabled)
  env_state: Any  # [E_local, ...]
  obs: jax.Array  # [E_local, *obs_shape]
  is_first: jax.Array  # bool[E_local], obs starts an episode
  carry: Any  # PPO's recurrent state [E_local, ...]
  latent: Any  # the served latent policy's filter state [E_local, ...] (() when PPO acts)
  replay: Any  # the model-based learners' replay, one stream per env [C, E_local, ...]
  key: jax.Array  # replicated; per-env streams are folded from it
  update_step: jax.Array  # i32[]


class Trainer(NamedTuple):
  init: Callable[[jax.Array], RunnerState]
  update: Callable[..., tuple[RunnerState, dict]]  # (runner, coefficients=None)
  train: Callable[[jax.Array], tuple[RunnerState, dict]]
  num_updates: int
  env_steps_per_update: int
  network: Any
  env: Environment
  env_params: Any
  cfg: ml_collections.ConfigDict
  learners: apex.Learners


def wrap_env(env: Environment, cfg: ml_collections.ConfigDict) -> Environment:
  env = EpisodeStatistics(env)
  if cfg.env.frame_stack > 1:
    env = FrameStack(env, cfg.env.frame_stack)
  return env


def _env_indices(num_local: int, axis_name: str | None) -> jax.Array:
  offset = 0 if axis_name is None else jax.lax.axis_index(axis_name) * num_local
  return offset + jnp.arange(num_local)


def _psum(x, axis_name):
  return x if axis_name is None else jax.lax.psum(x, axis_name)


def make_train(cfg: ml_collections.ConfigDict, env: Environment, env_params: Any,
               num_shards: int = 1, axis_name: str | None = None) -> Trainer:
  """Builds the pure training functions for `num_shards` equal slices of the envs."""
  num_envs, num_steps = cfg.num_envs, cfg.ppo.num_steps
  if num_envs % num_shards:
    raise ValueError(f"num_envs={num_envs} must be divisible by the {num_shards} devices")
  local_envs = num_envs // num_shards
  env_steps_per_update = num_envs * num_steps
  num_updates = int(cfg.total_env_steps) // env_steps_per_update
  if num_updates < 1:
    raise ValueError(f"total_env_steps={cfg.total_env_steps} is less than one update of "
                     f"num_envs × ppo.num_steps = {env_steps_per_update} env steps")

  env = wrap_env(env, cfg)
  vec_env = VecEnv(env, cfg.env.reset_fraction)
  spec = env.action_spec(env_params)
  network = ppo.make_network(cfg.network, spec)
  optimizer = ppo.make_optimizer(cfg.ppo, num_updates)
  obs_shape, obs_dtype = env.observation_shape(env_params), env.observation_dtype(env_params)
  learners = apex.make_learners(cfg, spec, obs_shape)
  normalize = cfg.ppo.normalize_observations
  # The env's per-episode `info` entries (e.g. BonkArena's menu_fraction), reported like the
  # return: their values on the steps where episodes ended.
  episode_keys = ("return", "length") + tuple(getattr(unwrapped(env), "episode_metrics", ()))

  def per_env_keys(key):
    return jax.vmap(jax.random.fold_in, (None, 0))(key, _env_indices(local_envs, axis_name))

  def init(key: jax.Array) -> RunnerState:
    key, agent_key, aux_key, reset_key = jax.random.split(key, 4)
    agent = ppo.init(agent_key, network, optimizer, obs_shape, obs_dtype)
    aux = apex.init(aux_key, learners, obs_shape, obs_dtype)
    obs, env_state = vec_env.reset(per_env_keys(reset_key), env_params)
    return RunnerState(agent, aux, env_state, obs, jnp.ones((local_envs,), bool),
                       network.initial_carry(local_envs),
                       apex.initial_latent_carry(learners, local_envs),
                       apex.init_replay(learners, local_envs, obs_shape, obs_dtype),
                       key, jnp.int32(0))

  def ppo_act(runner: RunnerState, mask, noise: ActionNoise):
    """PPO's action, with what its update needs (log-prob, value, next carry)."""
    net_obs = ppo.prepare_obs(runner.obs, runner.agent.obs_stats, normalize)
    # JAX envs tick uniformly: no dt, so timed cores (CfC) step by Δt = 1 here and in unroll.
    carry, dist, value = network.apply(runner.agent.params, runner.carry, net_obs,
                                       runner.is_first, mask)
    action = dist.sample_with(noise)
    return runner.replace(carry=carry), action, dist.log_prob(action), value

  def latent_act(runner: RunnerState, mask, keys):
    """The served latent actor's action; PPO's log-prob and value are not computed."""
    latent, action = jax.vmap(
        lambda carry, obs, first, m, k: jax.tree.map(lambda x: x[0], apex.act(
            runner.aux, jax.tree.map(lambda x: x[None], carry), obs[None], first[None],
            m[None], k, learners=learners)),
    )(runner.latent, runner.obs, runner.is_first, mask, keys)
    zeros = jnp.zeros((local_envs,))
    return runner.replace(latent=latent), action, zeros, zeros

  act = ppo_act if learners.serving is None else latent_act

  def rollout_randomness(key: jax.Array):
    """Every env's randomness for a whole rollout, drawn before it runs: [T, E_local] keys
    for the env steps and their resets (`VecEnv.step`) and PPO's action noise (or the
    latent actor's keys). One batched draw instead of several threefry calls a step."""
    step_keys = jax.vmap(per_env_keys)(jax.random.split(key, num_steps))  # [T, E]
    act_keys, env_keys = jnp.moveaxis(jax.vmap(jax.vmap(jax.random.split))(step_keys), 2, 0)
    env_keys = VecEnv.split_keys(env_keys)
    if learners.serving is not None:
      return act_keys, env_keys
    return jax.vmap(jax.vmap(lambda k: action_noise(k, spec)))(act_keys), env_keys

  def env_step(runner: RunnerState, randomness):
    act_randomness, env_keys = randomness
    mask = vec_env.action_mask(runner.env_state, env_params)
    acted, action, log_prob, value = act(runner, mask, act_randomness)
    obs, env_state, reward, terminated, truncated, info = vec_env.step(
        env_keys, runner.env_state, to_env_action(action, network.squash), env_params)
    if learners.trains_ppo:
      # V(s') of a truncated episode's final observation, which auto-reset replaced;
      # computed only on the (rare) steps where an env was truncated. `bootstrap_values`
      # completes it. The predicate is made device-invariant (psum): under the population's
      # vmap inside shard_map, a device-varying batched predicate trips JAX's varying-axis
      # check.
      any_truncated = _psum(truncated.any().astype(jnp.int32), axis_name) > 0
      final_value = jax.lax.cond(
          any_truncated,
          lambda: network.apply(runner.agent.params, acted.carry,
                                ppo.prepare_obs(info["final_obs"], runner.agent.obs_stats,
                                                normalize),
                                jnp.zeros_like(runner.is_first), method=network.value),
          lambda: jnp.zeros_like(value))
    else:
      final_value = jnp.zeros_like(reward)
    done = terminated | truncated
    transition = ppo.Rollout(
        obs=runner.obs, is_first=runner.is_first, carry=runner.carry, mask=mask,
        action=action, log_prob=log_prob, value=value, reward=reward, terminated=terminated,
        truncated=truncated, next_value=final_value)
    info = dict(info, **{"return": info["episode_return"], "length": info["episode_length"]})
    stats = (done, {k: info[k] for k in episode_keys})
    runner = acted.replace(env_state=env_state, obs=obs, is_first=done)
    return runner, (transition, stats)

  def update(runner: RunnerState, coefficients: ppo.LossCoefficients | None = None
             ) -> tuple[RunnerState, dict]:
    key, rollout_key, update_key = jax.random.split(runner.key, 3)
    runner, (rollout, (done, ended)) = jax.lax.scan(env_step, runner,
                                                    rollout_randomness(rollout_key))
    if learners.trains_ppo:
      last_value = network.apply(
          runner.agent.params, runner.carry,
          ppo.prepare_obs(runner.obs, runner.agent.obs_stats, normalize), runner.is_first,
          method=network.value)
      rollout = rollout._replace(next_value=bootstrap_values(
          rollout.value, last_value, rollout.next_value, rollout.terminated,
          rollout.truncated))
    finite_rollout = finite.all_finite((rollout.obs, rollout.reward))
    if axis_name is not None:
      finite_rollout = jax.lax.pmin(finite_rollout.astype(jnp.int32), axis_name) > 0
    agent, aux, replay, metrics = apex.update(
        runner.agent, runner.aux, runner.replay, rollout, update_key, learners=learners,
        network=network, optimizer=optimizer, axis_name=axis_name,
        progress=runner.update_step / num_updates, coefficients=coefficients,
        store=finite_rollout)
    # A non-finite observation, reward, loss or result skips the update (counted); a
    # non-finite rollout also stays out of the replay.
    (agent, aux), metrics = finite.guard((runner.agent, runner.aux), (agent, aux), rollout.obs,
                                         rollout.reward, metrics, axis_name)
    episodes = _psum(done.sum(), axis_name)
    metrics["episode/count"] = episodes
    for name, value in ended.items():
      metrics[f"episode/{name}"] = _psum(jnp.where(done, value, 0).sum(), axis_name) / (
          jnp.maximum(episodes, 1))
    metrics["reward/mean"] = _psum(rollout.reward.mean(), axis_name) / num_shards
    return runner.replace(agent=agent, aux=aux, replay=replay, key=key,
                          update_step=runner.update_step + 1), metrics

  def train(key: jax.Array) -> tuple[RunnerState, dict]:
    runner = init(key)
    return jax.lax.scan(lambda r, _: update(r), runner, None, num_updates)

  return Trainer(init, update, train, num_updates, env_steps_per_update, network, env,
                 env_params, cfg, learners)


def bootstrap_values(value: jax.Array, last_value: jax.Array, final_value: jax.Array,
                     terminated: jax.Array, truncated: jax.Array) -> jax.Array:
  """V(s'_t) for a rollout [T, E]: where step t ended its episode by truncation, the value
  of the final observation (`final_value`); by termination, 0; elsewhere s' is the next
  step's observation, whose value the next step computed (`value[t + 1]`; after the last
  step, `last_value` [E]). Same carry, observation and is_first as a separate forward of
  s' would use, so the same numbers, without a second critic forward per step."""
  following = jnp.concatenate([value[1:], last_value[None]])
  return jnp.where(truncated, final_value, jnp.where(terminated, 0.0, following))


def final_episode_return(metrics: dict, last_updates: int) -> jax.Array:
  """Mean return of the episodes that finished in the last `last_updates` updates of a
  `train` run's metrics (leading axes, e.g. seeds, are kept)."""
  returns = metrics["episode/return"][..., -last_updates:]
  counts = metrics["episode/count"][..., -last_updates:]
  return (returns * counts).sum(-1) / jnp.maximum(counts.sum(-1), 1)
