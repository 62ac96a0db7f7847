"""The hybrid action distribution: Normal continuous dims × masked categorical branches.

Upstream MetaBonk (`src/learner/ppo.py`) samples a Normal with a tanh'd mean, sends the raw
sample to the game and sums per-part log-probs; its mask reaches only branch 0. Here every
branch has its own mask slice, and the continuous part has an explicit squash:

* `"clip"` (default): the policy samples u ~ N(μ, σ); the env receives clip(u, -1, 1). The
  log-prob and entropy are those of the Gaussian over u (CleanRL/PureJaxRL convention).
* `"tanh"`: the env receives a = tanh(u), and the log-prob includes the change of variables,
  log p(a) = log N(u; μ, σ) − Σ log(1 − tanh²(u)). The squashed entropy has no closed form;
  `entropy()` returns the Gaussian's, the usual surrogate for the entropy bonus.

Either way the *raw* sample u is what a rollout stores, so log-probs are recomputed exactly
(no atanh of a saturated action). The joint log-prob and entropy are sums over all parts.
Masked choices get a logit of `MASKED_LOGIT`, whose probability underflows to exactly 0 in
float32 while keeping entropies finite.
"""
from __future__ import annotations

from typing import Literal

import chex
import distrax
import flax.struct
import jax
import jax.numpy as jnp

from mbjax.envs.spaces import HybridAction, HybridActionSpec

MASKED_LOGIT = -1e9
Squash = Literal["clip", "tanh"]


def mask_logits(logits: jax.Array, mask: jax.Array) -> jax.Array:
  return jnp.where(mask, logits, MASKED_LOGIT)


@flax.struct.dataclass
class HybridDistribution:
  """A batch of joint action distributions; every field has the same leading batch shape."""

  mean: jax.Array  # f32[..., C]
  log_std: jax.Array  # f32[..., C]
  logits: tuple[jax.Array, ...]  # one f32[..., n_i] per branch, already masked
  squash: Squash = flax.struct.field(pytree_node=False, default="clip")

  @classmethod
  def create(cls, spec: HybridActionSpec, mean, log_std, logits, mask,
             squash: Squash = "clip") -> "HybridDistribution":
    """Builds the distribution, applying each branch's slice of the flat `mask`."""
    if squash not in ("clip", "tanh"):
      raise ValueError(f"squash must be 'clip' or 'tanh', got {squash!r}")
    chex.assert_equal(len(logits), spec.num_branches)
    chex.assert_shape(mask, mean.shape[:-1] + (spec.mask_size,))
    masked = tuple(
        mask_logits(branch_logits, mask[..., offset:offset + n])
        for branch_logits, offset, n in zip(logits, spec.branch_offsets, spec.branches))
    log_std = jnp.broadcast_to(log_std, mean.shape)
    return cls(mean=mean, log_std=log_std, logits=masked, squash=squash)

  def _normal(self) -> distrax.Normal:
    return distrax.Normal(self.mean, jnp.exp(self.log_std))

  def sample(self, key: jax.Array) -> HybridAction:
    """Raw action: the pre-squash Gaussian sample and one index per branch."""
    cont_key, *branch_keys = jax.random.split(key, 1 + len(self.logits))
    continuous = self._normal().sample(seed=cont_key)
    discrete = [distrax.Categorical(logits=l).sample(seed=k)
                for l, k in zip(self.logits, branch_keys)]
    return HybridAction(continuous, self._stack_branches(discrete))

  def mode(self) -> HybridAction:
    """The deterministic action: Gaussian mean and each branch's arg-max."""
    discrete = [jnp.argmax(l, axis=-1) for l in self.logits]
    return HybridAction(self.mean, self._stack_branches(discrete))

  def _stack_branches(self, discrete: list[jax.Array]) -> jax.Array:
    batch_shape = self.mean.shape[:-1]
    if not discrete:
      return jnp.zeros(batch_shape + (0,), jnp.int32)
    return jnp.stack(discrete, axis=-1).astype(jnp.int32)

  def log_prob(self, action: HybridAction) -> jax.Array:
    """Joint log-probability of a raw action, f32[...]."""
    log_prob = self._normal().log_prob(action.continuous).sum(-1)
    if self.squash == "tanh":
      log_prob -= distrax.Tanh().forward_log_det_jacobian(action.continuous).sum(-1)
    for i, branch_logits in enumerate(self.logits):
      log_prob += distrax.Categorical(logits=branch_logits).log_prob(action.discrete[..., i])
    return log_prob

  def kl_divergence(self, other: "HybridDistribution") -> jax.Array:
    """KL(self ‖ other), f32[...]: closed forms per part, summed (pre-squash Gaussians)."""
    kl = distrax.Normal(self.mean, jnp.exp(self.log_std)).kl_divergence(
        distrax.Normal(other.mean, jnp.exp(other.log_std))).sum(-1)
    for mine, theirs in zip(self.logits, other.logits):
      log_p, log_q = jax.nn.log_softmax(mine, -1), jax.nn.log_softmax(theirs, -1)
      kl += (jnp.exp(log_p) * (log_p - log_q)).sum(-1)
    return kl

  def entropy(self) -> jax.Array:
    """Joint entropy, f32[...] (the Gaussian's for the continuous part, see module doc)."""
    entropy = self._normal().entropy().sum(-1)
    for branch_logits in self.logits:
      entropy += distrax.Categorical(logits=branch_logits).entropy()
    return entropy


def to_env_action(raw: HybridAction, squash: Squash) -> HybridAction:
  """Maps a raw sampled action onto what the environment accepts ([-1, 1] continuous)."""
  squashed = jnp.tanh(raw.continuous) if squash == "tanh" else jnp.clip(raw.continuous, -1, 1)
  return HybridAction(squashed, raw.discrete)
