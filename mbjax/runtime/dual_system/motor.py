"""System 1 of the dual-system runtime: the directive-conditioned motor policy.

`motor_step_fn` is the pure network step (normalise, apply, sample or mode, an optional
override of the discrete choice, the log-prob of the *executed* action, the value).
`MotorPolicy` wraps a trained `configs/arena_directives.py` checkpoint (or a fresh network of
that config) behind one jitted call per control step that also builds the directive block
with `directives.directive_features`, the very function the training env uses, so the motor
sees in play what it saw in training.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mbjax.agents import ppo
from mbjax.envs.bonk_arena import directives
from mbjax.envs.bonk_arena import observation as vector_obs
from mbjax.nets.hybrid import to_env_action
from mbjax.runtime import planner as planner_lib


def motor_step_fn(network, normalize: bool, deterministic: bool) -> Callable:
  """Pure `step(params, obs_stats, carry, key, obs [N, D], mask [N, M], is_first [N],
  override i32[N] | None) -> (carry, raw action, env action, log_prob [N], value [N])`.

  `override` ≥ 0 replaces the first discrete branch of the sampled action (a menu decision
  taken outside the policy); the log-prob is always that of the returned raw action under
  the distribution the network produced.
  """

  def step(params, obs_stats, carry, key, obs, mask, is_first, override=None):
    net_obs = ppo.prepare_obs(obs, obs_stats, normalize)
    carry, dist, value = network.apply(params, carry, net_obs, is_first, mask)
    raw = dist.mode() if deterministic else dist.sample(key)
    if override is not None:
      first = jnp.where(override >= 0, override, raw.discrete[..., 0])
      raw = raw._replace(discrete=raw.discrete.at[..., 0].set(first))
    return carry, raw, to_env_action(raw, network.squash), dist.log_prob(raw), value

  return step


@dataclasses.dataclass(frozen=True)
class MotorOutput:
  obs: np.ndarray  # f32[D], what the network saw (before normalisation)
  raw_continuous: np.ndarray  # f32[C], the Gaussian sample (pre-squash)
  move: np.ndarray  # f32[2], what the game receives
  choice: int  # menu branch: 0..2 a card, 3 the no-op
  log_prob: float  # of (raw_continuous, choice) under the acting distribution
  value: float
  overridden: bool


class MotorPolicy:
  """System 1: one jitted network step per call, the recurrent carry kept here."""

  def __init__(self, network, params, obs_stats, *, normalize: bool, conditioned: bool,
               directive_params: directives.DirectiveParams, deterministic: bool = False,
               seed: int = 0):
    self.network = network
    self.params, self.obs_stats = params, obs_stats
    self.conditioned = conditioned
    self.deterministic = deterministic
    arena_size = float(directive_params.game.arena_size)
    horizon = int(directive_params.horizon)
    self.horizon = horizon
    step = motor_step_fn(network, normalize, deterministic)

    def act(params, obs_stats, carry, key, base_obs, mask, is_first, directive, has_target,
            target, card, age, player_pos, override):
      key, sample_key = jax.random.split(key)
      block = directives.directive_features(directive, has_target, target, card, age,
                                            player_pos, arena_size, horizon)
      if not conditioned:
        block = jnp.zeros_like(block)
      obs = jnp.concatenate([base_obs, block])
      carry, raw, env_action, log_prob, value = step(
          params, obs_stats, carry, sample_key, obs[None], mask[None], is_first[None],
          override[None])
      return key, carry, (obs, raw.continuous[0], env_action.continuous[0],
                          raw.discrete[0, 0], log_prob[0], value[0])

    self._act = jax.jit(act)
    self._key = jax.random.PRNGKey(seed)
    self.carry = network.initial_carry(1)
    # The game adapters build the default 96-float arena observation (5 enemies, 3 gems).
    self.obs_size = vector_obs.vector_size(5, 3) + directives.DIRECTIVE_FEATURES
    # Compile now, so that the first control step does not wait for XLA.
    warm = planner_lib.Directive(directives.GOTO, (0.0, 0.0))
    self.act(np.zeros(self.obs_size - directives.DIRECTIVE_FEATURES, np.float32),
             np.ones(4, bool), True, warm, 0, (0.0, 0.0))
    self._key = jax.random.PRNGKey(seed)
    self.reset()

  def reset(self) -> None:
    """Forgets the recurrent state (the next `act` with is_first does too)."""
    self.carry = self.network.initial_carry(1)

  @classmethod
  def from_checkpoint(cls, workdir: str, deterministic: bool = False,
                      seed: int = 0) -> "MotorPolicy":
    """The latest checkpoint of a `configs/arena_directives.py` training run."""
    from mbjax.train import run as run_lib  # orbax and the trainer only when loading

    trainer, runner = run_lib.restore_trained(workdir)
    cfg = trainer.cfg
    if cfg.env.name != "bonk_arena_directives":
      raise ValueError(f"motor checkpoint {workdir} trained on env {cfg.env.name!r}: expected "
                       "'bonk_arena_directives' (configs/arena_directives.py)")
    agent = jax.device_get(runner.agent)
    env = directives.DirectiveArena(**cfg.env.kwargs.to_dict())
    return cls(trainer.network, agent.params, agent.obs_stats,
               normalize=cfg.ppo.normalize_observations, conditioned=env.conditioned,
               directive_params=env.default_params(), deterministic=deterministic, seed=seed)

  @classmethod
  def initialise(cls, cfg: ml_collections.ConfigDict, deterministic: bool = False,
                 seed: int = 0) -> "MotorPolicy":
    """A freshly initialised (untrained) motor of a directive config — for tests and for
    timing the loop without a checkpoint."""
    env = directives.DirectiveArena(**cfg.env.kwargs.to_dict())
    network = ppo.make_network(cfg.network, env.action_spec())
    obs_shape = env.observation_shape()
    # One jitted init: eager flax init compiles every initialiser op on its own.
    params = jax.jit(network.init)(jax.random.PRNGKey(seed), network.initial_carry(1),
                                   jnp.zeros((1,) + obs_shape), jnp.ones((1,), bool),
                                   network.spec.all_valid_mask((1,)))
    return cls(network, params, ppo.ObservationStatistics.create(obs_shape),
               normalize=cfg.ppo.normalize_observations, conditioned=env.conditioned,
               directive_params=env.default_params(), deterministic=deterministic, seed=seed)

  def act(self, base_obs: np.ndarray, mask: np.ndarray, is_first: bool,
          directive: planner_lib.Directive, age: int, player_pos,
          override: int = -1) -> MotorOutput:
    """One control step. `override` ≥ 0 forces that menu choice (see the module doc)."""
    target = directive.target if directive.target is not None else (0.0, 0.0)
    self._key, self.carry, out = self._act(
        self.params, self.obs_stats, self.carry, self._key,
        np.asarray(base_obs, np.float32), np.asarray(mask, bool), np.bool_(is_first),
        np.int32(directive.index), np.bool_(directive.target is not None),
        np.asarray(target, np.float32), np.int32(directive.card),
        np.int32(min(age, self.horizon)), np.asarray(player_pos, np.float32),
        np.int32(override))
    obs, raw, move, choice, log_prob, value = jax.device_get(out)
    return MotorOutput(obs, raw, move, int(choice), float(log_prob), float(value),
                       override >= 0)
