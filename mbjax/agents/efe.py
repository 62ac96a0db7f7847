"""Active-Inference head: a latent policy that minimises expected free energy (EFE) on
imagined rollouts (Friston et al. 2015; the risk + ambiguity decomposition of Parr &
Friston 2019, "Generalised free energy and active inference").

For an imagined state s with predicted observations q(o | s) = N(μ(s), σ(s)²) (the world
model's decoder, per observation dimension) and a learned preference prior
p̃(o) = N(μ*, σ*²) over the same observation dimensions:

  risk(s)      = KL(q(o | s) ‖ p̃(o))             — predicted outcomes vs preferred ones
  ambiguity(s) = H[q(o | s)] = Σ_d ½ log(2πe σ_d(s)²)  — expected entropy of the observation
                                                     model: large where the model is unsure
  G(s)         = risk_weight · risk(s) + ambiguity_weight · ambiguity(s)

The policy is the latent actor-critic of `mbjax.agents.dream` with reward −G. The
preference prior is a running mean and variance of the (decoder-space) observations of
high-reward transitions: those at or above the `preference_quantile` of a rollout's
rewards. It is fit to rewarded experience, not optimised against the policy's own risk.

Differs from upstream MetaBonk (`src/learner/free_energy.py`), which cannot run: there the
preference lives in a 320-d latent space but is compared with a 64-d state (shape error),
the "ambiguity" is a constant, and the failure leaves the world model frozen. Here both
terms live in observation space with matching dimensions, the ambiguity depends on the
state, and the world model is never mutated.
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections

from mbjax.agents import world_model as wm_lib
from mbjax.agents.collectives import pmean
from mbjax.agents.kl import gaussian_kl

MIN_PREFERENCE_VAR = 1e-2


@flax.struct.dataclass
class Preference:
  mean: jax.Array  # [D] in the decoder's target space
  var: jax.Array  # [D]

  @classmethod
  def create(cls, obs_size: int) -> "Preference":
    return cls(jnp.zeros((obs_size,)), jnp.ones((obs_size,)))


def update_preference(preference: Preference, obs: jax.Array, reward: jax.Array,
                      section: ml_collections.ConfigDict,
                      axis_name: str | None = None) -> Preference:
  """Moves the preference towards the observations whose transition reward is in the top
  (1 − preference_quantile) of this batch. `obs` [N, ...] are o_t, `reward` [N] r_t."""
  target = wm_lib.observation_target(obs).reshape(obs.shape[0], -1)
  threshold = jnp.quantile(reward, section.preference_quantile)
  weight = (reward >= threshold).astype(jnp.float32)
  total = pmean(weight.sum(), axis_name)
  mean = pmean((weight[:, None] * target).sum(0), axis_name) / total
  var = pmean((weight[:, None] * jnp.square(target - mean)).sum(0), axis_name) / total
  rate = section.preference_rate
  return Preference(
      (1.0 - rate) * preference.mean + rate * mean,
      jnp.maximum((1.0 - rate) * preference.var + rate * var, MIN_PREFERENCE_VAR))


def free_energy_terms(world_model: wm_lib.WorldModel, wm_params, features,
                      preference: Preference):
  """(risk, ambiguity), each [...], for world-model features [..., F]."""
  mean, std = world_model.apply(wm_params, features, method=wm_lib.WorldModel.decode)
  batch = features.shape[:-1]
  mean, std = mean.reshape(batch + (-1,)), std.reshape(batch + (-1,))
  risk = gaussian_kl(mean, std, preference.mean, jnp.sqrt(preference.var))
  ambiguity = (0.5 * jnp.log(2.0 * jnp.pi * jnp.e * jnp.square(std))).sum(-1)
  return risk, ambiguity


def negative_free_energy_reward(world_model: wm_lib.WorldModel, wm_params,
                                preference: Preference, section: ml_collections.ConfigDict):
  """reward_fn for `dream.update`: −G per imagined state, with risk/ambiguity metrics."""

  def reward_fn(features):
    risk, ambiguity = free_energy_terms(world_model, wm_params, features, preference)
    efe = section.risk_weight * risk + section.ambiguity_weight * ambiguity
    return -efe, {"risk": risk.mean(), "ambiguity": ambiguity.mean(), "efe": efe.mean()}

  return reward_fn
