"""Latent actor-critic trained on imagined trajectories ("dream" training; Hafner et al.
2020 "Dreamer", with DreamerV3's return normalisation).

From posterior start states the world model's prior is rolled forward `horizon` steps
under the latent actor. The critic regresses λ-returns that bootstrap from a slowly
updated target critic; the actor follows REINFORCE with advantages scaled by
max(1, S), where S is a running estimate of the 5th–95th percentile range of returns,
plus an entropy bonus. Steps after a predicted episode end are down-weighted by the
cumulative product of predicted continues.

The same function trains the Active-Inference head (`mbjax.agents.efe`): only the reward
differs (`reward_fn`), so "dream" and "EFE" are two instances of one algorithm.

Differs from upstream MetaBonk (`PPO.dream_update`): a critic, λ-returns and an entropy
term instead of a pure H-step return; the hybrid action (discrete branches included)
instead of continuous dims only; gradients never flow into the world model (its parameters
are an input, not a frozen module); and the actor shapes the served policy through
`distill_coef` (see `mbjax.agents.ppo`) instead of being left unused.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax

from mbjax.agents import world_model as wm_lib
from mbjax.agents.collectives import pmean
from mbjax.agents.returns import lambda_returns
from mbjax.envs.spaces import HybridActionSpec
from mbjax.nets.actor_critic import MLP
from mbjax.nets.hybrid import HybridDistribution, to_env_action


class LatentActor(nn.Module):
  """World-model features → hybrid action distribution (all choices allowed unless a mask
  is given: imagination has no menu state to mask with)."""

  spec: HybridActionSpec
  hidden_sizes: tuple[int, ...]
  squash: str

  @nn.compact
  def __call__(self, features, mask=None):
    x = MLP(self.hidden_sizes, "silu")(features)
    batch = features.shape[:-1]
    if self.spec.continuous_dim:
      mean = nn.Dense(self.spec.continuous_dim, kernel_init=nn.initializers.zeros)(x)
      log_std = self.param("log_std", nn.initializers.zeros, (self.spec.continuous_dim,))
    else:
      mean = log_std = jnp.zeros(batch + (0,))
    logits = tuple(nn.Dense(n, kernel_init=nn.initializers.zeros)(x)
                   for n in self.spec.branches)
    mask = self.spec.all_valid_mask(batch) if mask is None else mask
    return HybridDistribution.create(self.spec, mean, log_std, logits, mask, self.squash)


class LatentCritic(nn.Module):
  hidden_sizes: tuple[int, ...]

  @nn.compact
  def __call__(self, features):
    x = MLP(self.hidden_sizes, "silu")(features)
    return nn.Dense(1, kernel_init=nn.initializers.zeros)(x)[..., 0]


@flax.struct.dataclass
class LatentActorCriticState:
  actor_params: Any
  critic_params: Any
  target_critic_params: Any
  actor_opt_state: Any
  critic_opt_state: Any
  return_scale: jax.Array  # running 5th–95th percentile range of λ-returns


class Networks(flax.struct.PyTreeNode):
  actor: LatentActor = flax.struct.field(pytree_node=False)
  critic: LatentCritic = flax.struct.field(pytree_node=False)
  actor_optimizer: Any = flax.struct.field(pytree_node=False)
  critic_optimizer: Any = flax.struct.field(pytree_node=False)


def make_networks(section: ml_collections.ConfigDict, spec: HybridActionSpec,
                  squash: str) -> Networks:
  """Actor, critic and their optimisers from the learner's config section (`dream`/`efe`)."""
  sizes = tuple(section.hidden_sizes)
  clip = lambda lr: optax.chain(optax.clip_by_global_norm(section.max_grad_norm),
                                optax.adam(lr, eps=1e-5))
  return Networks(LatentActor(spec, sizes, squash), LatentCritic(sizes),
                  clip(section.actor_lr), clip(section.critic_lr))


def init(key, nets: Networks, feature_size: int) -> LatentActorCriticState:
  actor_key, critic_key = jax.random.split(key)
  features = jnp.zeros((1, feature_size))
  actor_params = nets.actor.init(actor_key, features)
  critic_params = nets.critic.init(critic_key, features)
  return LatentActorCriticState(actor_params, critic_params, critic_params,
                                nets.actor_optimizer.init(actor_params),
                                nets.critic_optimizer.init(critic_params), jnp.float32(1.0))


def update(state: LatentActorCriticState, wm_params, start: wm_lib.LatentState, key,
           section: ml_collections.ConfigDict, *, nets: Networks,
           world_model: wm_lib.WorldModel,
           reward_fn: Callable[[jax.Array], tuple[jax.Array, dict]],
           axis_name: str | None = None, prefix: str = "dream"):
  """Imagines from `start` [N] (no gradient to the world model) and takes one actor and
  one critic step, with the learner's config section (`dream` or `efe`).
  `reward_fn(features [H, N, F]) -> (rewards [H, N], metrics)` scores each imagined
  transition by the state it leads to. Returns (state, metrics)."""
  spec = nets.actor.spec
  start = jax.lax.stop_gradient(start)

  def policy(features, policy_key):
    raw = nets.actor.apply(state.actor_params, features).sample(policy_key)
    return wm_lib.action_vector(to_env_action(raw, nets.actor.squash), spec), raw

  imagine_key, _ = jax.random.split(key)
  states, raw_actions = wm_lib.imagine(world_model, wm_params, policy, start,
                                       section.horizon, imagine_key)
  states, raw_actions = jax.lax.stop_gradient((states, raw_actions))
  features = states.features  # [H+1, N, F]
  rewards, reward_metrics = reward_fn(features[1:])
  continues = jax.nn.sigmoid(world_model.apply(wm_params, features[1:],
                                               method=wm_lib.WorldModel.continue_logit))
  target_values = nets.critic.apply(state.target_critic_params, features)
  returns = lambda_returns(rewards, continues, target_values[1:], section.gamma,
                           section.lambda_)
  # Weight of step h: the probability that the imagined episode is still running.
  weights = jnp.cumprod(jnp.concatenate([jnp.ones_like(continues[:1]), continues[:-1]]), 0)

  def critic_loss(params):
    values = nets.critic.apply(params, features[:-1])
    return pmean((0.5 * weights * jnp.square(values - returns)).mean(), axis_name)

  percentile_range = (jnp.percentile(returns, 95) - jnp.percentile(returns, 5))
  percentile_range = pmean(percentile_range, axis_name)
  return_scale = (section.return_scale_decay * state.return_scale
                  + (1.0 - section.return_scale_decay) * percentile_range)
  baseline = nets.critic.apply(state.critic_params, features[:-1])
  advantages = (returns - baseline) / jnp.maximum(1.0, return_scale)

  def actor_loss(params):
    dist = nets.actor.apply(params, features[:-1])
    log_prob = dist.log_prob(raw_actions)
    entropy = dist.entropy()
    loss = -(weights * (log_prob * advantages + section.ent_coef * entropy)).mean()
    return pmean(loss, axis_name), entropy.mean()

  (actor_value, entropy), actor_grads = jax.value_and_grad(actor_loss, has_aux=True)(
      state.actor_params)
  critic_value, critic_grads = jax.value_and_grad(critic_loss)(state.critic_params)
  actor_updates, actor_opt = nets.actor_optimizer.update(actor_grads, state.actor_opt_state,
                                                         state.actor_params)
  critic_updates, critic_opt = nets.critic_optimizer.update(
      critic_grads, state.critic_opt_state, state.critic_params)
  critic_params = optax.apply_updates(state.critic_params, critic_updates)
  target = optax.incremental_update(critic_params, state.target_critic_params,
                                    section.target_update_rate)
  new_state = LatentActorCriticState(
      optax.apply_updates(state.actor_params, actor_updates), critic_params, target,
      actor_opt, critic_opt, return_scale)
  metrics = {
      f"{prefix}/actor_loss": actor_value,
      f"{prefix}/critic_loss": critic_value,
      f"{prefix}/return": pmean(returns[0].mean(), axis_name),
      f"{prefix}/reward": pmean(rewards.mean(), axis_name),
      f"{prefix}/entropy": pmean(entropy, axis_name),
      f"{prefix}/return_scale": return_scale,
      **{f"{prefix}/{k}": pmean(v, axis_name) for k, v in reward_metrics.items()},
  }
  return new_state, metrics


def world_model_reward(world_model: wm_lib.WorldModel, wm_params):
  """The dream objective: the world model's predicted reward."""
  return lambda features: (world_model.apply(wm_params, features,
                                             method=wm_lib.WorldModel.reward), {})
