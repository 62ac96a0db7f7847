"""Latent actor-critic trained on imagined trajectories ("dream" training: Hafner et al.
2020 "Dreamer"; the objective and its stabilisers as in DreamerV3, Hafner et al. 2023).

From posterior start states (every replayed posterior) the world model's prior is rolled
forward `horizon` steps under the latent actor, which is masked by the world model's mask
head. With r_h the predicted reward of step h, c_h its predicted continue probability and
v the critic:

  λ-returns   G_h = r_h + γ c_h ((1 − λ) v(s_{h+1}) + λ G_{h+1}),  G_{H−1} bootstraps v(s_H)
  weights     w_h = Π_{k<h} c_k           (the imagined episode is still running)
  scale       S ← (1 − rate) S + rate (P95(G) − P5(G)),  advantages (G − v(s)) / max(1, S)
  actor       −w (log π(a|s) sg(advantage) + η H[π(·|s)])      (score function, no
              gradient through the dynamics)
              − bc_scale · the u-weighted mean of log π(a_t|s_t) over the replayed steps,
              with their recorded actions (`behaviour`; 0 by default); u_t = 1, or with
              bc_temperature β > 0, u_t = min(exp(A_t / β), bc_max_weight), A_t =
              (R_t − v(s_t)) / max(1, S) (advantage-weighted regression; 0 where R_t is
              unknown)
  critic      w · CE(twohot(G), v(s)) + slow_reg · CE(twohot(v_slow(s)), v(s))
              + replay_scale · CE(twohot(R_t), v(s_t)) on the replayed real trajectory,
  slow critic v_slow ← (1 − τ) v_slow + τ v after every update.

R_t are λ-returns of the replayed real rewards and episode ends, bootstrapped by the
imagined return G_0 from each replayed state. The critic is a two-hot symlog distribution
(`mbjax.agents.symlog`), zero-initialised (it predicts 0 at first); the actor's output layer
is initialised at `outscale` × the usual scale, so the initial policy is near a fixed one
(uniform choices, a centred Gaussian) without being exactly constant, and its categorical
choices mix 1% (`unimix`) of the uniform distribution over the allowed choices.

The behaviour term is for data the learner did not collect (the offline pipeline's videos):
there the world model and the reward are only known where the recorded play went, and an
actor free to leave it finds states whose predicted reward is wrong (a player pinned to a
wall, a state the videos almost never show, predicted to cost nothing). Keeping the actor
near the recorded actions is the behaviour-regularised offline recipe (TD3+BC, Fujimoto &
Gu 2021; here on the imagined actor-critic). Where the recordings mix good and bad play,
imitating all of it alike imitates the bad too; weighting each step by how much better
its replayed return was than the critic expected (AWR, Peng et al. 2019; as in AWAC and
IQL's policy extraction) keeps the actor near the recorded play that paid.

The same function trains the Active-Inference head (`mbjax.agents.efe`): only the reward
differs (`reward_fn`) and it has no replayed returns, so "dream" and "EFE" are two
instances of one algorithm.

Differs from upstream MetaBonk (`PPO.dream_update`): a critic, λ-returns and an entropy
term instead of a pure H-step return; the hybrid action (discrete branches included)
instead of continuous dims only; gradients never flow into the world model (its parameters
are an input, not a frozen module); and the actor can act (`served.policy`).
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import chex
import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax

from mbjax.agents import world_model as wm_lib
from mbjax.agents.collectives import pmean
from mbjax.agents.returns import lambda_returns
from mbjax.agents.symlog import NUM_BINS, twohot_loss, twohot_mean
from mbjax.envs.spaces import HybridAction, HybridActionSpec
from mbjax.nets.hybrid import HybridDistribution, action_noise, to_env_action

MIN_STD, MAX_STD = 0.1, 1.0


def _mlp(x, sizes):
  for size in sizes:
    x = nn.silu(nn.LayerNorm(epsilon=1e-3)(nn.Dense(size)(x)))
  return x


def _unimix_logits(logits, mask, unimix: float):
  """log((1 − u) softmax(logits over the allowed choices) + u / #allowed); masked entries
  are left to `HybridDistribution.create`."""
  probs = jax.nn.softmax(jnp.where(mask, logits, -jnp.inf), -1)
  uniform = mask / jnp.maximum(mask.sum(-1, keepdims=True), 1)
  mixed = (1.0 - unimix) * probs + unimix * uniform
  return jnp.log(jnp.where(mask, mixed, 1.0))


class LatentActor(nn.Module):
  """World-model features → hybrid action distribution, masked by `mask` (all choices when
  None). The continuous std is state-dependent within [MIN_STD, MAX_STD]."""

  spec: HybridActionSpec
  hidden_sizes: tuple[int, ...]
  squash: str
  unimix: float
  outscale: float

  @nn.compact
  def __call__(self, features, mask=None):
    x = _mlp(features, self.hidden_sizes)
    batch = features.shape[:-1]
    out_init = nn.initializers.variance_scaling(self.outscale ** 2, "fan_in", "normal")
    mask = self.spec.all_valid_mask(batch) if mask is None else mask
    if self.spec.continuous_dim:
      mean = nn.Dense(self.spec.continuous_dim, kernel_init=out_init, name="mean")(x)
      raw_std = nn.Dense(self.spec.continuous_dim, kernel_init=out_init, name="std")(x)
      # At initialisation (raw ≈ 0) the std is 0.55, halfway between the bounds.
      log_std = jnp.log(MIN_STD + (MAX_STD - MIN_STD) * nn.sigmoid(raw_std))
    else:
      mean = log_std = jnp.zeros(batch + (0,))
    logits = []
    for i, (n, offset) in enumerate(zip(self.spec.branches, self.spec.branch_offsets)):
      raw = nn.Dense(n, kernel_init=out_init, name=f"branch_{i}")(x)
      logits.append(_unimix_logits(raw, mask[..., offset:offset + n], self.unimix))
    return HybridDistribution.create(self.spec, mean, log_std, tuple(logits), mask,
                                     self.squash)


class LatentCritic(nn.Module):
  """World-model features → two-hot symlog value logits [..., NUM_BINS] (zero at init)."""

  hidden_sizes: tuple[int, ...]

  @nn.compact
  def __call__(self, features):
    x = _mlp(features, self.hidden_sizes)
    return nn.Dense(NUM_BINS, kernel_init=nn.initializers.zeros)(x)


@flax.struct.dataclass
class LatentActorCriticState:
  actor_params: Any
  critic_params: Any
  slow_critic_params: Any
  actor_opt_state: Any
  critic_opt_state: Any
  return_scale: jax.Array  # running 5th–95th percentile range of λ-returns
  initial_actor_params: Any  # the actor at initialisation, to measure how far it moved


class Networks(flax.struct.PyTreeNode):
  actor: LatentActor = flax.struct.field(pytree_node=False)
  critic: LatentCritic = flax.struct.field(pytree_node=False)
  actor_optimizer: Any = flax.struct.field(pytree_node=False)
  critic_optimizer: Any = flax.struct.field(pytree_node=False)


class ReplayedReturns(NamedTuple):
  """The trained part of the replayed windows, [L, B], for the critic's replay term."""

  features: jax.Array  # posterior features [L, B, F]
  reward: jax.Array
  terminated: jax.Array
  is_first: jax.Array


class Behaviour(NamedTuple):
  """Replayed steps and the actions recorded there, flat [N], for the behaviour term."""

  features: jax.Array  # posterior features [N, F]
  action: HybridAction  # raw (pre-squash) actions [N]
  mask: jax.Array  # the recorded action masks [N, M]
  weight: jax.Array  # f32[N]: 1 where every recorded choice is allowed by the mask


def recorded_behaviour(features: jax.Array, vector: jax.Array, mask: jax.Array,
                       spec: HybridActionSpec, squash: str) -> Behaviour:
  """Replayed features [N, F], the world model's action vectors [N, A] (continuous dims,
  then one-hot branches) and masks [N, M] → `Behaviour`. The raw action is the one whose
  squash gives the recorded one: continuous atanh'd for "tanh" (clipped just inside ±1),
  as is for "clip"; each branch's choice is the argmax of its one-hot. A step whose
  recorded choice the mask forbids (a labelling error) gets weight 0."""
  chex.assert_rank([features, vector, mask], 2)
  continuous = vector[:, :spec.continuous_dim]
  if squash == "tanh":
    continuous = jnp.arctanh(jnp.clip(continuous, -0.999, 0.999))
  start, choices, allowed = spec.continuous_dim, [], jnp.ones(vector.shape[:1], bool)
  for n, offset in zip(spec.branches, spec.branch_offsets):
    choice = jnp.argmax(vector[:, start + offset:start + offset + n], -1)
    allowed &= jnp.take_along_axis(mask[:, offset:offset + n], choice[:, None], 1)[:, 0] > 0
    choices.append(choice)
  discrete = (jnp.stack(choices, -1) if choices else
              jnp.zeros(vector.shape[:1] + (0,), jnp.int32)).astype(jnp.int32)
  return Behaviour(features, HybridAction(continuous, discrete), mask,
                   allowed.astype(jnp.float32))


def advantage_weights(advantages: jax.Array, known: jax.Array, temperature: float,
                      max_weight: float) -> jax.Array:
  """known · min(exp(advantages / temperature), max_weight): the behaviour term's weight of
  each replayed step (0 where its return is unknown)."""
  chex.assert_equal_shape([advantages, known])
  return known * jnp.minimum(jnp.exp(advantages / temperature), max_weight)


def make_networks(section: ml_collections.ConfigDict, spec: HybridActionSpec,
                  squash: str) -> Networks:
  sizes = tuple(section.hidden_sizes)
  clip = lambda lr: optax.chain(optax.clip_by_global_norm(section.max_grad_norm),
                                optax.adam(lr, eps=1e-5))
  actor = LatentActor(spec, sizes, squash, section.unimix, section.outscale)
  return Networks(actor, LatentCritic(sizes), clip(section.actor_lr), clip(section.critic_lr))


def init(key, nets: Networks, feature_size: int) -> LatentActorCriticState:
  actor_key, critic_key = jax.random.split(key)
  features = jnp.zeros((1, feature_size))
  actor_params = nets.actor.init(actor_key, features)
  critic_params = nets.critic.init(critic_key, features)
  return LatentActorCriticState(actor_params, critic_params, critic_params,
                                nets.actor_optimizer.init(actor_params),
                                nets.critic_optimizer.init(critic_params), jnp.float32(1.0),
                                actor_params)


def replay_returns(replayed: ReplayedReturns, bootstrap: jax.Array, gamma: float,
                   lambda_: float) -> tuple[jax.Array, jax.Array]:
  """(λ-returns R [L, B] of the replayed real rewards bootstrapped by `bootstrap` [L, B]
  (a value estimate of each replayed state), weights [L, B]).

  R_t = r_t + γ (1 − term_t) ((1 − λ) b_{t+1} + λ R_{t+1}) inside an episode. At an
  episode's last step R_t = r_t when it terminated; when it was truncated (auto-reset
  replaced its final state) or it is the window's last step, R_t is unknown: its weight is
  0 and the step before bootstraps from b_t alone (λ = 0 there).
  """
  chex.assert_equal_shape([replayed.reward, bootstrap])
  ends = jnp.concatenate([replayed.is_first[1:], jnp.ones_like(replayed.is_first[:1])])
  not_term = 1.0 - replayed.terminated.astype(jnp.float32)
  next_boot = jnp.concatenate([bootstrap[1:], bootstrap[-1:]])

  def backward(carry, xs):
    next_return, next_known = carry
    reward, cont, boot, end, terminated = xs
    tail = jnp.where(next_known, (1.0 - lambda_) * boot + lambda_ * next_return, boot)
    ret = reward + gamma * cont * jnp.where(end, 0.0, tail)
    known = terminated | ~end
    return (ret, known), (ret, known)

  initial = (bootstrap[-1], jnp.zeros_like(ends[-1]))
  _, (returns, known) = jax.lax.scan(
      backward, initial, (replayed.reward, not_term, next_boot, ends, replayed.terminated),
      reverse=True)
  return returns, known.astype(jnp.float32)


def updated_return_scale(scale: jax.Array, returns: jax.Array, rate: float,
                         axis_name: str | None = None) -> jax.Array:
  """S ← (1 − rate) S + rate (P95(G) − P5(G)): the running spread of the λ-returns (the
  percentiles of this device's returns, averaged over devices). Advantages are divided by
  max(1, S), so large returns are scaled down and small ones are not scaled up."""
  spread = pmean(jnp.percentile(returns, 95) - jnp.percentile(returns, 5), axis_name)
  return (1.0 - rate) * scale + rate * spread


def imagine_actor(nets: Networks, actor_params, world_model: wm_lib.WorldModel, wm_params,
                  start: wm_lib.LatentState, horizon: int, key):
  """The latent actor played `horizon` steps in the world model from `start` [N], its
  choices masked by the model's predicted action mask: (states [H+1, N], raw actions
  [H, N], masks [H, N, M])."""
  spec = nets.actor.spec

  def policy(features, noise):
    mask = wm_lib.predicted_mask(world_model, wm_params, features, spec)
    raw = nets.actor.apply(actor_params, features, mask).sample_with(noise)
    return wm_lib.action_vector(to_env_action(raw, nets.actor.squash), spec), (raw, mask)

  policy_key, dynamics_key = jax.random.split(key)
  policy_noise = action_noise(policy_key, spec, (horizon, start.deter.shape[0]))
  states, (raw_actions, masks) = wm_lib.imagine(world_model, wm_params, policy, start,
                                                horizon, policy_noise, dynamics_key)
  return states, raw_actions, masks


def update(state: LatentActorCriticState, wm_params, start: wm_lib.LatentState, key,
           section: ml_collections.ConfigDict, *, nets: Networks,
           world_model: wm_lib.WorldModel,
           reward_fn: Callable[[jax.Array], tuple[jax.Array, dict]],
           replayed: ReplayedReturns | None = None, behaviour: Behaviour | None = None,
           axis_name: str | None = None, prefix: str = "dream"):
  """Imagines from `start` [N] (no gradient to the world model) and takes one actor and
  one critic step with the `section`'s settings. `reward_fn(features [H, N, F]) -> (rewards
  [H, N], metrics)` scores each imagined transition by the state it leads to. `replayed`
  (N = L·B starts in its [L, B] order) adds the critic's replay term, `behaviour` the
  actor's (weighted by `section.bc_scale`). Returns (state, metrics)."""
  start = jax.lax.stop_gradient(start)
  states, raw_actions, masks = imagine_actor(nets, state.actor_params, world_model, wm_params,
                                             start, section.horizon, key)
  states, raw_actions = jax.lax.stop_gradient((states, raw_actions))
  features = states.features  # [H+1, N, F]
  rewards, reward_metrics = reward_fn(features[1:])
  continues = jax.nn.sigmoid(world_model.apply(wm_params, features[1:],
                                               method=wm_lib.WorldModel.continue_logit))
  values = twohot_mean(nets.critic.apply(state.critic_params, features))
  returns = lambda_returns(rewards, continues, values[1:], section.gamma, section.lambda_)
  weights = jnp.cumprod(jnp.concatenate([jnp.ones_like(continues[:1]), continues[:-1]]), 0)

  return_scale = updated_return_scale(state.return_scale, returns,
                                      section.return_scale_rate, axis_name)
  advantages = (returns - values[:-1]) / jnp.maximum(1.0, return_scale)

  if replayed is not None:
    boot = returns[0].reshape(replayed.reward.shape)
    replay_targets, replay_weights = replay_returns(replayed, boot, section.gamma,
                                                    section.lambda_)
  use_behaviour = behaviour is not None and section.bc_scale > 0
  behaviour_weight = jnp.ones(())
  if use_behaviour:
    behaviour = jax.lax.stop_gradient(behaviour)
    if section.bc_temperature > 0:
      if replayed is None:
        raise ValueError("bc_temperature > 0 weights the recorded steps by their replayed "
                         "returns: pass `replayed`")
      replay_values = twohot_mean(nets.critic.apply(state.critic_params, replayed.features))
      replay_advantages = (replay_targets - replay_values) / jnp.maximum(1.0, return_scale)
      weighted = advantage_weights(replay_advantages, replay_weights,
                                   section.bc_temperature, section.bc_max_weight)
      weighted = jax.lax.stop_gradient(weighted.reshape(-1))
      behaviour_weight = (jnp.sum(behaviour.weight * weighted)
                          / jnp.maximum(behaviour.weight.sum(), 1.0))
      behaviour = behaviour._replace(weight=behaviour.weight * weighted)

  def actor_loss(params):
    dist = nets.actor.apply(params, features[:-1], masks)
    log_prob = dist.log_prob(raw_actions)
    entropy = dist.entropy()
    loss = -(weights * (log_prob * advantages + section.ent_coef * entropy)).mean()
    behaviour_log_prob = jnp.zeros(())
    if use_behaviour:
      log_probs = nets.actor.apply(params, behaviour.features, behaviour.mask).log_prob(
          behaviour.action)
      behaviour_log_prob = (jnp.sum(behaviour.weight * log_probs)
                            / jnp.maximum(behaviour.weight.sum(), 1e-6))
      loss -= section.bc_scale * behaviour_log_prob
    return pmean(loss, axis_name), (entropy.mean(), behaviour_log_prob)

  slow_values = twohot_mean(nets.critic.apply(state.slow_critic_params, features[:-1]))

  def critic_loss(params):
    logits = nets.critic.apply(params, features[:-1])
    loss = (weights * twohot_loss(logits, returns)).mean()
    loss += section.slow_reg * (weights * twohot_loss(logits, slow_values)).mean()
    if replayed is not None:
      replay_logits = nets.critic.apply(params, replayed.features)
      replay_loss = (replay_weights * twohot_loss(replay_logits, replay_targets)).sum() / (
          jnp.maximum(replay_weights.sum(), 1.0))
      loss += section.replay_scale * replay_loss
    return pmean(loss, axis_name)

  (actor_value, (entropy, behaviour_log_prob)), actor_grads = jax.value_and_grad(
      actor_loss, has_aux=True)(state.actor_params)
  critic_value, critic_grads = jax.value_and_grad(critic_loss)(state.critic_params)
  actor_updates, actor_opt = nets.actor_optimizer.update(actor_grads, state.actor_opt_state,
                                                         state.actor_params)
  critic_updates, critic_opt = nets.critic_optimizer.update(
      critic_grads, state.critic_opt_state, state.critic_params)
  actor_params = optax.apply_updates(state.actor_params, actor_updates)
  critic_params = optax.apply_updates(state.critic_params, critic_updates)
  slow = optax.incremental_update(critic_params, state.slow_critic_params,
                                  section.slow_critic_rate)
  new_state = state.replace(actor_params=actor_params, critic_params=critic_params,
                            slow_critic_params=slow, actor_opt_state=actor_opt,
                            critic_opt_state=critic_opt, return_scale=return_scale)
  # How far the actor has moved from its initialisation, on this update's start states.
  start_mask = masks[0]
  moved = nets.actor.apply(actor_params, features[0], start_mask).kl_divergence(
      nets.actor.apply(state.initial_actor_params, features[0], start_mask))
  metrics = {
      f"{prefix}/actor_loss": actor_value,
      f"{prefix}/critic_loss": critic_value,
      f"{prefix}/return": pmean(returns[0].mean(), axis_name),
      f"{prefix}/reward": pmean(rewards.mean(), axis_name),
      f"{prefix}/value": pmean(values[0].mean(), axis_name),
      f"{prefix}/entropy": pmean(entropy, axis_name),
      f"{prefix}/return_scale": return_scale,
      f"{prefix}/kl_from_init": pmean(moved.mean(), axis_name),
      **({f"{prefix}/behaviour_log_prob": pmean(behaviour_log_prob, axis_name),
          f"{prefix}/behaviour_weight": pmean(behaviour_weight, axis_name)}
         if use_behaviour else {}),
      **{f"{prefix}/{k}": pmean(v, axis_name) for k, v in reward_metrics.items()},
  }
  return new_state, metrics


def world_model_reward(world_model: wm_lib.WorldModel, wm_params):
  """The dream objective: the world model's predicted reward."""
  return lambda features: (world_model.apply(wm_params, features,
                                             method=wm_lib.WorldModel.reward), {})


def act(nets: Networks, state: LatentActorCriticState, features, mask, key,
        deterministic: bool = False):
  """The latent actor's raw action for features [B, F] under the env's mask [B, M]."""
  dist = nets.actor.apply(state.actor_params, features, mask)
  return dist.mode() if deterministic else dist.sample(key)
