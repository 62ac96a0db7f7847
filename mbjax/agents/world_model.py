"""Recurrent state-space world model (RSSM) trained on replayed windows (Hafner et al. 2019
"PlaNet"; DreamerV3, Hafner et al. 2023, for categorical latents, KL balancing with free
bits, symlog inputs and two-hot reward regression).

Latent state s_t = (h_t, z_t): h_t is a GRU's deterministic state (optionally block-diagonal,
as DreamerV3's core), z_t a stochastic sample — `stoch` categoricals of `classes` classes with
straight-through gradients and a 1% uniform mixture (`unimix`), or a diagonal Gaussian
(`classes = 0`, as upstream, with a minimum std).

  prior     h_t = GRU(h_{t−1}, [z_{t−1}, a_{t−1}]),  z_t ~ p(z_t | h_t)
  posterior                                         z_t ~ q(z_t | h_t, embed(o_t))
  heads     o_t ~ N(dec(s_t), σ_dec(s_t));  r_t, c_t, m_t from the prior *after* a_t

The reward (two-hot symlog), continue (Bernoulli "not terminal") and action-mask heads read
the prior state that follows action a_t — exactly the states imagination produces, so
`imagine` scores each imagined step with the heads that were trained for it, and terminal
transitions are learned although auto-reset replaced their final observation. The mask head
predicts which discrete choices the env will allow in the next state, so an imagined actor
is masked like the acting one (BonkArena's cards exist only while the level-up menu is
open). Episode starts (`is_first`) reset the latent state and the previous action to zero.

A replayed window of `burn_in + L` steps is filtered from the zero state; its first
`burn_in` steps only warm up the latent state (no loss, no imagination starts), so the
trained steps start from a posterior that has seen the recent past, not from zeros.

Differs from upstream MetaBonk (`src/learner/world_model.py`): trained on uniformly replayed
windows instead of one rollout; discrete actions are one-hot (not raw indices as floats);
KL balancing with free bits; a continue and a mask head; resets at episode starts; two-hot
reward regression; the decoder also predicts a per-dimension std (the input-dependent
observation entropy the Active-Inference head uses) from its mean's hidden layers, which
only the squared error trains.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import chex
import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax

from mbjax.agents.collectives import pmean, varying
from mbjax.agents.kl import categorical_kl, gaussian_kl
from mbjax.agents.symlog import NUM_BINS, symlog, twohot_loss, twohot_mean
from mbjax.envs.spaces import HybridAction, HybridActionSpec

MIN_LOG_STD, MAX_LOG_STD = -5.0, 2.0
# The reward head's last layer starts at 0.3 × the usual scale (predictions within a few
# tenths of 0): at DreamerV3's 0 the head's hidden layers get no gradient until that layer
# has grown, and a reward that depends on the state and the action together was learned
# 2–3× later (a sign-matching bandit: ~1,200 updates at 0, ~600 at 0.3, lr 1e-3).
REWARD_OUTSCALE = 0.3


@flax.struct.dataclass
class LatentState:
  deter: jax.Array  # [B, deter]
  stoch: jax.Array  # [B, stoch * max(classes, 1)], the sample (one-hot for categoricals)
  stats: jax.Array  # categorical: log-probs [B, stoch, classes]; Gaussian: [B, 2 * stoch]

  @property
  def features(self) -> jax.Array:
    return jnp.concatenate([self.deter, self.stoch], -1)


def action_vector(action: HybridAction, spec: HybridActionSpec) -> jax.Array:
  """Env-space hybrid action → the model's input: continuous dims then one-hot branches."""
  parts = [action.continuous.astype(jnp.float32)]
  parts += [jax.nn.one_hot(action.discrete[..., i], n) for i, n in enumerate(spec.branches)]
  return jnp.concatenate(parts, -1)


def action_vector_size(spec: HybridActionSpec) -> int:
  return spec.continuous_dim + spec.mask_size


def _mlp(x, sizes, name):
  for i, size in enumerate(sizes):
    x = nn.Dense(size, name=f"{name}_{i}")(x)
    # A large epsilon keeps gradients bounded for all-zero inputs (the reset state).
    x = nn.silu(nn.LayerNorm(epsilon=1e-3, name=f"{name}_norm_{i}")(x))
  return x


class GRU(nn.Module):
  """GRU cell (Cho et al. 2014, flax's gate equations). The state is split into `blocks`
  equal groups with their own recurrent weights (block-diagonal, DreamerV3's core: 1/blocks
  of the recurrent cost); the three gates' maps are fused, so a step is one input and one
  (batched) recurrent matrix product."""

  size: int
  blocks: int = 1

  @nn.compact
  def __call__(self, h, x):
    groups, width = self.blocks, self.size // self.blocks
    kernel = self.param("recurrent", nn.initializers.lecun_normal(batch_axis=(0,)),
                        (groups, width, 3 * width))
    bias = self.param("recurrent_bias", nn.initializers.zeros, (groups, 3 * width))
    inputs = nn.Dense(3 * self.size, name="input")(x)
    if groups == 1:
      # A plain matrix product: as a one-group batched product, XLA's CPU backend copied
      # the kernel to another layout every step (and its gradient back).
      state, recurrent = h, h @ kernel[0] + bias[0]
    else:
      # Groups leading, [G, M, ·]: the batched product's natural layout, in which the gate
      # arithmetic stays contiguous (with the groups inside, [..., G, ·], XLA's CPU backend
      # left it transposed: a step took 1.7× as long at 1,024 rows, 1.25× with its gradient
      # at 16).
      to_groups = lambda v, w: v.reshape(-1, groups, w).transpose(1, 0, 2)
      state = to_groups(h, width)
      recurrent = jnp.matmul(state, kernel) + bias[:, None]
      inputs = to_groups(inputs, 3 * width)
    hr, hz, h_n = jnp.split(recurrent, 3, -1)
    ir, iz, i_n = jnp.split(inputs, 3, -1)
    reset, update = nn.sigmoid(ir + hr), nn.sigmoid(iz + hz)
    candidate = jnp.tanh(i_n + reset * h_n)
    new = (1.0 - update) * candidate + update * state
    if groups > 1:
      new = new.transpose(1, 0, 2)
    return new.reshape(h.shape)


class RSSM(nn.Module):
  """`layers` hidden MLP layers sit on each side of the GRU (DreamerV3: 1): before its
  input, before the prior's and before the posterior's statistics; 0 gives upstream
  MetaBonk's linear maps ([z, a] straight into the GRU, linear prior and posterior)."""

  deter: int
  stoch: int
  classes: int  # 0: diagonal Gaussian latents
  hidden: int
  layers: int
  blocks: int
  min_std: float
  unimix: float

  @property
  def stoch_size(self) -> int:
    return self.stoch * max(self.classes, 1)

  @property
  def _stats_size(self) -> int:
    return self.stoch * self.classes if self.classes else 2 * self.stoch

  def initial(self, batch: int) -> LatentState:
    if self.classes:
      stats = jnp.zeros((batch, self.stoch, self.classes))
    else:
      stats = jnp.concatenate([jnp.zeros((batch, self.stoch)), jnp.ones((batch, self.stoch))], -1)
    return LatentState(jnp.zeros((batch, self.deter)), jnp.zeros((batch, self.stoch_size)), stats)

  def _stats(self, raw):
    """Raw outputs of the last linear map → log-probabilities or (mean, std)."""
    if self.classes:
      logits = raw.reshape(raw.shape[:-1] + (self.stoch, self.classes))
      probs = (1.0 - self.unimix) * jax.nn.softmax(logits, -1) + self.unimix / self.classes
      return jnp.log(probs)
    mean, raw_std = jnp.split(raw, 2, -1)
    return jnp.concatenate([mean, nn.softplus(raw_std) + self.min_std], -1)

  def noise(self, key: jax.Array, batch_shape: tuple[int, ...]) -> jax.Array:
    """The random draws `_sample` turns into latents of `batch_shape`: a uniform per
    categorical latent (inverse-CDF sampling: one draw per latent instead of the Gumbel
    trick's one per class) or a standard normal per Gaussian dimension. Drawn for a whole
    window or horizon before its scan: inside it, the random bits of each step were a
    tenth of a world-model update's time on a CPU."""
    if self.classes:
      return jax.random.uniform(key, tuple(batch_shape) + (self.stoch, 1))
    return jax.random.normal(key, tuple(batch_shape) + (self.stoch,))

  def _sample(self, stats, noise):
    if self.classes:
      probs = jnp.exp(stats)
      index = (jnp.cumsum(probs, -1)[..., :-1] < noise).sum(-1)
      one_hot = jax.nn.one_hot(index, self.classes)
      sample = one_hot + probs - jax.lax.stop_gradient(probs)  # straight-through
      return sample.reshape(stats.shape[:-2] + (self.stoch_size,))
    mean, std = jnp.split(stats, 2, -1)
    return mean + std * noise

  @nn.compact
  def _transition(self, state: LatentState, action: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(h_t, statistics of p(z_t | h_t)) after (s_{t−1}, a_{t−1})."""
    x = _mlp(jnp.concatenate([state.stoch, action], -1), (self.hidden,) * self.layers, "img_in")
    deter = GRU(self.deter, self.blocks, name="gru")(state.deter, x)
    x = _mlp(deter, (self.hidden,) * self.layers, "img_out")
    return deter, self._stats(nn.Dense(self._stats_size, name="prior_stats")(x))

  def img_step(self, state: LatentState, action: jax.Array, noise: jax.Array) -> LatentState:
    """Prior transition: p(s_t | s_{t−1}, a_{t−1}), sampled with `noise` (see `noise`)."""
    deter, stats = self._transition(state, action)
    return LatentState(deter, self._sample(stats, noise), stats)

  def reset_prior(self, action_size: int) -> tuple[jax.Array, jax.Array]:
    """(h, prior statistics) [1, ...] of an episode's first step: the transition from the
    zero state and action, the same for every env — computed once per window, outside
    `obs_step`'s scan (inside it, its gradient cost a dozen small ops a step)."""
    return self._transition(self.initial(1), jnp.zeros((1, action_size)))

  @nn.compact
  def embed_projection(self, embed: jax.Array) -> jax.Array:
    """The observation's term in the posterior's first linear map, whose input is
    [h_t, embed(o_t)]: it does not depend on h_t, so `observe` computes it for a whole
    window in one matrix product instead of one per step."""
    return nn.Dense(self.hidden if self.layers else self._stats_size, use_bias=False,
                    name="post_embed")(embed)

  @nn.compact
  def obs_step(self, state: LatentState, action: jax.Array, embed_projection: jax.Array,
               is_first: jax.Array, noise: jax.Array,
               reset_prior: tuple[jax.Array, jax.Array]
               ) -> tuple[LatentState, LatentState, LatentState]:
    """(posterior q(s_t | s_{t−1}, a_{t−1}, o_t), the prior p(s_t | s_{t−1}, a_{t−1}) it
    refines, `continued`): the observation enters as `embed_projection(embed(o_t))`;
    `noise` [2, B, ...] samples the prior and the posterior (see `noise`). Where o_t starts
    an episode the prior is `reset_prior` (see `reset_prior`); `continued` is the prior
    from the carried state everywhere, i.e. the state after the previous transition, whose
    reward and continue flag belong to the episode that ended."""
    prior_noise, post_noise = noise
    continued_deter, continued_stats = self._transition(state, action)
    continued = LatentState(continued_deter, self._sample(continued_stats, prior_noise),
                            continued_stats)
    fresh_deter, fresh_stats = reset_prior
    first = lambda x: is_first.reshape((-1,) + (1,) * (x.ndim - 1))
    deter = jnp.where(first(continued_deter), fresh_deter, continued_deter)
    stats = jnp.where(first(continued_stats), fresh_stats, continued_stats)
    prior = LatentState(deter, self._sample(stats, prior_noise), stats)
    if self.layers:
      x = nn.Dense(self.hidden, name="post_deter")(prior.deter) + embed_projection
      x = nn.silu(nn.LayerNorm(epsilon=1e-3, name="post_norm")(x))
      x = _mlp(x, (self.hidden,) * (self.layers - 1), "post_hidden")
      raw = nn.Dense(self._stats_size, name="post_stats")(x)
    else:
      raw = nn.Dense(self._stats_size, name="post_deter")(prior.deter) + embed_projection
    stats = self._stats(raw)
    return LatentState(prior.deter, self._sample(stats, post_noise), stats), prior, continued


class ConvEncoder(nn.Module):
  """Stride-2 convolutions of `depth` × (1, 2, 4, …) channels down to 4×4 (DreamerV3's
  image encoder), LayerNorm and SiLU; uint8 pixels are scaled to [0, 1]."""

  depth: int

  @nn.compact
  def __call__(self, pixels):
    x = pixels.astype(jnp.float32) / 255.0
    channels = self.depth
    while x.shape[-2] > 4:
      x = nn.Conv(channels, (4, 4), (2, 2), name=f"conv_{channels}")(x)
      x = nn.silu(nn.LayerNorm(epsilon=1e-3, name=f"norm_{channels}")(x))
      channels *= 2
    return x.reshape(x.shape[:-3] + (-1,))


class ConvDecoder(nn.Module):
  """Features → 4×4 map → stride-2 transposed convolutions up to the frame; mean and std
  per pixel in [0, 1] units (the mirror of `ConvEncoder`).

  The std's layer reads the mean's hidden layers through a stop-gradient: its likelihood
  term, (residual / σ)² / 2 + log σ, grows without bound where σ is small, and when it could
  train the shared layers it outweighed the squared error so far that the decoder learned
  only the observations' mean (a BonkArena model reconstructed no better than the data's
  variance after 600 updates; with the stop-gradient it beat copy-last at every k ≤ 15)."""

  obs_shape: tuple[int, int, int]
  depth: int

  @nn.compact
  def __call__(self, features):
    height, width, channels = self.obs_shape
    ups = max(round(math.log2(height / 4)), 0)  # static: a Python number, not traced
    filters = self.depth * 2 ** max(ups - 1, 0)
    x = nn.Dense(4 * (width * 4 // height) * filters, name="project")(features)
    x = x.reshape(features.shape[:-1] + (4, width * 4 // height, filters))
    for i in range(ups - 1):
      filters //= 2
      x = nn.ConvTranspose(filters, (4, 4), (2, 2), name=f"deconv_{i}")(x)
      x = nn.silu(nn.LayerNorm(epsilon=1e-3, name=f"norm_{i}")(x))
    mean = nn.ConvTranspose(channels, (4, 4), (2, 2), name="out")(x)
    log_std = nn.ConvTranspose(channels, (4, 4), (2, 2), name="log_std",
                               kernel_init=nn.initializers.zeros)(jax.lax.stop_gradient(x))
    return jax.nn.sigmoid(mean), jnp.exp(jnp.clip(log_std, MIN_LOG_STD, MAX_LOG_STD))


class VectorDecoder(nn.Module):
  obs_dim: int
  width: int
  layers: int

  @nn.compact
  def __call__(self, features):
    x = _mlp(features, (self.width,) * self.layers, "layer")
    mean = nn.Dense(self.obs_dim, name="mean")(x)
    # The std reads the mean's hidden layers without training them (see `ConvDecoder`).
    log_std = nn.Dense(self.obs_dim, name="log_std", kernel_init=nn.initializers.zeros)(
        jax.lax.stop_gradient(x))
    return mean, jnp.exp(jnp.clip(log_std, MIN_LOG_STD, MAX_LOG_STD))


class _Head(nn.Module):
  """MLP → `size` outputs whose last layer starts at `outscale` × the usual scale (0: zero,
  a two-hot head then predicts exactly 0)."""

  size: int
  width: int
  layers: int
  outscale: float = 0.0

  @nn.compact
  def __call__(self, x):
    x = _mlp(x, (self.width,) * self.layers, "layer")
    init = (nn.initializers.variance_scaling(self.outscale ** 2, "fan_in", "normal")
            if self.outscale else nn.initializers.zeros)
    return nn.Dense(self.size, kernel_init=init, name="out")(x)


class WorldModel(nn.Module):
  """Encoder + RSSM + heads. Pixel observations (rank 3) use CNNs; vectors MLPs. Built by
  `make_world_model` from the `world_model` config section, which holds the defaults."""

  obs_shape: tuple[int, ...]
  rssm: RSSM
  hidden: int
  head_layers: int
  cnn_depth: int
  mask_size: int  # discrete choices of the action space (0: no mask head)

  def setup(self):
    pixels = len(self.obs_shape) == 3
    self.encoder = (ConvEncoder(self.cnn_depth) if pixels
                    else _MLPStack(self.hidden, max(self.head_layers, 1)))
    self.decoder = (ConvDecoder(self.obs_shape, self.cnn_depth) if pixels
                    else VectorDecoder(self.obs_shape[0], self.hidden, self.head_layers))
    self.reward_head = _Head(NUM_BINS, self.hidden, self.head_layers, REWARD_OUTSCALE)
    self.continue_head = _Head(1, self.hidden, self.head_layers)
    if self.mask_size:
      self.mask_head = _Head(self.mask_size, self.hidden, self.head_layers)

  def embed(self, obs):
    # Decided by the model's observation rank, not the input's: observe() passes [L, B, ...].
    return self.encoder(obs if len(self.obs_shape) == 3 else symlog(obs))

  def projected_embed(self, obs):
    """What `RSSM.obs_step` takes for o_t (see `RSSM.embed_projection`)."""
    return self.rssm.embed_projection(self.embed(obs))

  def decode(self, features):
    """Mean and std of p(o | s) — in symlog space for vectors, [0, 1] for pixels."""
    return self.decoder(features)

  def reward_logits(self, features):
    return self.reward_head(features)

  def reward(self, features):
    return twohot_mean(self.reward_head(features))

  def continue_logit(self, features):
    return self.continue_head(features)[..., 0]

  def mask_logits(self, features):
    return self.mask_head(features)

  def __call__(self, obs, action, is_first, key):
    """Touches every parameter (for `init`): one observe step plus all heads."""
    state = self.rssm.initial(obs.shape[0])
    post, _, _ = self.rssm.obs_step(state, action, self.projected_embed(obs), is_first,
                                    self.rssm.noise(key, (2, obs.shape[0])),
                                    self.rssm.reset_prior(action.shape[-1]))
    features = post.features
    heads = (self.decode(features), self.reward(features), self.continue_logit(features))
    return heads + ((self.mask_logits(features),) if self.mask_size else ())


class _MLPStack(nn.Module):
  width: int
  layers: int

  @nn.compact
  def __call__(self, x):
    return _mlp(x, (self.width,) * self.layers, "layer")


@flax.struct.dataclass
class WorldModelState:
  params: Any
  opt_state: Any


class Sequence(NamedTuple):
  """Replayed windows, time-major [L, B, ...]. `action[t]` is the action taken after o_t
  (model vector, see `action_vector`); `reward[t]`, `terminated[t]` belong to that
  transition; `mask[t]` is the env's action mask in the state o_t shows."""

  obs: jax.Array
  action: jax.Array
  reward: jax.Array
  terminated: jax.Array
  is_first: jax.Array
  mask: jax.Array


def make_world_model(section: ml_collections.ConfigDict, obs_shape,
                     spec: HybridActionSpec) -> WorldModel:
  rssm = RSSM(deter=section.deter, stoch=section.stoch, classes=section.classes,
              hidden=section.hidden, layers=section.rssm_layers, blocks=section.blocks,
              min_std=section.min_std, unimix=section.unimix)
  if section.deter % section.blocks:
    raise ValueError(f"world_model.blocks={section.blocks} must divide world_model.deter="
                     f"{section.deter}")
  if len(obs_shape) == 3 and (obs_shape[0] % 4 or obs_shape[0] < 8):
    raise ValueError(f"world_model: pixel observations {tuple(obs_shape)} need a side that "
                     "is a multiple of 4 and at least 8 (the CNN halves it down to 4)")
  return WorldModel(obs_shape=tuple(obs_shape), rssm=rssm, hidden=section.hidden,
                    head_layers=section.head_layers, cnn_depth=section.cnn_depth,
                    mask_size=spec.mask_size if spec.branches else 0)


def make_optimizer(section: ml_collections.ConfigDict) -> optax.GradientTransformation:
  return optax.chain(optax.clip_by_global_norm(section.max_grad_norm),
                     optax.adam(section.lr, eps=1e-8))


def init(key, model: WorldModel, optimizer, obs_shape, obs_dtype, action_size: int):
  params = model.init(key, jnp.zeros((1,) + tuple(obs_shape), obs_dtype),
                      jnp.zeros((1, action_size)), jnp.ones((1,), bool), key)
  return WorldModelState(params, optimizer.init(params))


def previous_actions(action: jax.Array) -> jax.Array:
  """a_{t−1} for every step of [L, ...] actions (zero before the first step)."""
  return jnp.concatenate([jnp.zeros_like(action[:1]), action[:-1]])


def observe(model: WorldModel, params, obs, prev_action, is_first, key):
  """Filters a sequence [L, B, ...] from the zero state; returns (posteriors, priors) with
  leading [L, B]. `prev_action[t]` is a_{t−1} (ignored where `is_first`)."""
  posts, priors, _ = _filter(model, params, obs, prev_action, is_first, key)
  return posts, priors


def _filter(model: WorldModel, params, obs, prev_action, is_first, key):
  """`observe` plus each step's `continued` prior (see `RSSM.obs_step`)."""
  chex.assert_rank(is_first, 2)
  projected = model.apply(params, obs, method=WorldModel.projected_embed)

  reset_prior = _reset_prior(model, params, prev_action.shape[-1])

  def step(state, inputs):
    projected_t, action_t, first_t, noise_t = inputs
    post, prior, continued = model.apply(params, state, action_t, projected_t, first_t,
                                         noise_t, reset_prior,
                                         method=lambda m, *a: m.rssm.obs_step(*a))
    return post, (post, prior, continued)

  # [L, 2, B, ...]: each step's prior and posterior draws.
  noise = model.rssm.noise(key, (is_first.shape[0], 2, is_first.shape[1]))
  initial = model.apply(params, is_first.shape[1], method=lambda m, b: m.rssm.initial(b))
  # Derive the zero state from the data so that, under shard_map, it varies over the data
  # axis like the states the scan produces (a constant would be device-invariant).
  anchor = jnp.zeros_like(projected[0, :, 0])
  initial = jax.tree.map(lambda x: x + anchor.reshape((-1,) + (1,) * (x.ndim - 1)), initial)
  _, outputs = jax.lax.scan(step, initial, (projected, prev_action, is_first, noise))
  return outputs


def filter_step(model: WorldModel, params, state: LatentState, prev_action, obs, is_first,
                key) -> LatentState:
  """One acting step of the filter: the posterior of o_t [B, ...] after (s_{t−1}, a_{t−1})."""
  projected = model.apply(params, obs, method=WorldModel.projected_embed)
  post, _, _ = model.apply(params, state, prev_action, projected, is_first,
                           model.rssm.noise(key, (2, is_first.shape[0])),
                           _reset_prior(model, params, prev_action.shape[-1]),
                           method=lambda m, *a: m.rssm.obs_step(*a))
  return post


def _reset_prior(model: WorldModel, params, action_size: int):
  return model.apply(params, action_size, method=lambda m, n: m.rssm.reset_prior(n))


def img_step(model: WorldModel, params, state: LatentState, action, key) -> LatentState:
  """One prior transition of states [B] (its draws from `key`)."""
  noise = model.rssm.noise(key, action.shape[:-1])
  return model.apply(params, state, action, noise, method=lambda m, *a: m.rssm.img_step(*a))


def predicted_mask(model: WorldModel, params, features: jax.Array, spec: HybridActionSpec):
  """bool[..., mask_size]: the choices the mask head expects the env to allow; a branch the
  head closes entirely is opened whole (an actor must be able to choose something)."""
  if not model.mask_size:
    return spec.all_valid_mask(features.shape[:-1])
  allowed = model.apply(params, features, method=WorldModel.mask_logits) > 0.0
  parts, start = [], 0
  for size in spec.branches:
    branch = allowed[..., start:start + size]
    parts.append(branch | ~branch.any(-1, keepdims=True))
    start += size
  return jnp.concatenate(parts, -1)


def imagine(model: WorldModel, params, policy, start: LatentState, horizon: int,
            policy_noise, key):
  """Rolls the prior forward `horizon` steps from `start` [N] with `policy(features,
  noise_t) -> (model_action [N, A], raw_action)`, where `noise_t` is step t of
  `policy_noise` (a pytree with leading axis [H], e.g. `hybrid.action_noise(k, spec, (H, N))`,
  drawn before the loop like the latents' noise); returns (states [H+1, N], raw actions
  [H, N])."""
  chex.assert_tree_shape_prefix(policy_noise, (horizon,))

  def step(state, inputs):
    policy_noise_t, noise_t = inputs
    model_action, raw_action = policy(state.features, policy_noise_t)
    next_state = model.apply(params, state, model_action, noise_t,
                             method=lambda m, *a: m.rssm.img_step(*a))
    return next_state, (next_state, raw_action)

  noise = model.rssm.noise(key, (horizon, start.deter.shape[0]))
  _, (states, raw_actions) = jax.lax.scan(step, start, (policy_noise, noise))
  states = jax.tree.map(lambda s0, s: jnp.concatenate([s0[None], s]), start, states)
  return states, raw_actions


def kl_terms(model: WorldModel, post: LatentState, prior: LatentState):
  """(dynamics KL, representation KL) per position: KL(sg(q) ‖ p) and KL(q ‖ sg(p))."""
  sg = jax.lax.stop_gradient
  if model.rssm.classes:
    return categorical_kl(sg(post.stats), prior.stats), categorical_kl(post.stats, sg(prior.stats))
  q_mean, q_std = jnp.split(post.stats, 2, -1)
  p_mean, p_std = jnp.split(prior.stats, 2, -1)
  return (gaussian_kl(sg(q_mean), sg(q_std), p_mean, p_std),
          gaussian_kl(q_mean, q_std, sg(p_mean), sg(p_std)))


def observation_target(obs):
  """What the decoder predicts: [0, 1] for (integer) pixels, symlog of vectors."""
  if jnp.issubdtype(obs.dtype, jnp.integer) or obs.dtype == jnp.bool_:
    scale = 255.0 if jnp.issubdtype(obs.dtype, jnp.integer) else 1.0
    return obs.astype(jnp.float32) / scale
  return symlog(obs)


def _masked_mean(x, weight):
  return (x * weight).sum() / jnp.maximum(weight.sum(), 1.0)


def rollforward(params, model: WorldModel, batch: Sequence, key):
  """Filters windows [L, B] and steps every posterior once through the prior with its
  action: (posteriors, priors, next priors), each [L, B]; next_prior[t] is the state after
  (s_t, a_t) that the reward, continue and mask heads of transition t read."""
  observe_key, transition_key = jax.random.split(key)
  posts, priors, continued = _filter(model, params, batch.obs,
                                     previous_actions(batch.action), batch.is_first,
                                     observe_key)
  # The prior after (s_t, a_t) is the scan's `continued` prior of step t + 1; only the
  # window's last step needs a further transition.
  last = img_step(model, params, jax.tree.map(lambda x: x[-1], posts), batch.action[-1],
                  transition_key)
  next_prior = jax.tree.map(lambda c, x: jnp.concatenate([c[1:], x[None]]), continued, last)
  return posts, priors, next_prior


def kl_loss(dyn: jax.Array, rep: jax.Array, section: ml_collections.ConfigDict) -> jax.Array:
  """KL balancing with free bits: β_dyn max(dyn, free) + β_rep max(rep, free), so a KL
  already below `free_nats` nats gives no gradient (DreamerV3, eq. 5)."""
  return (section.dyn_scale * jnp.maximum(dyn, section.free_nats)
          + section.rep_scale * jnp.maximum(rep, section.free_nats))


def loss(params, batch: Sequence, key, section: ml_collections.ConfigDict, *,
         model: WorldModel, burn_in: int = 0, axis_name: str | None = None):
  """World-model loss on windows [L, B] whose first `burn_in` steps only warm up the latent
  state; returns (loss, (posteriors [L − burn_in, B] (no gradient), metrics))."""
  params = varying(params, axis_name)  # the gradient's device sum once, not per filter step
  posts, priors, next_prior = rollforward(params, model, batch, key)
  length = batch.is_first.shape[0]
  trained = jnp.broadcast_to((jnp.arange(length) >= burn_in)[:, None], batch.is_first.shape)
  trained = trained.astype(jnp.float32)
  obs_axes = tuple(range(2, batch.obs.ndim))

  target = observation_target(batch.obs)
  mean, std = model.apply(params, posts.features, method=WorldModel.decode)
  squared_error = jnp.square(mean - target).sum(obs_axes)
  # The std head learns the residual scale without rescaling the mean's gradient.
  residual = jax.lax.stop_gradient(mean) - target
  std_nll = (0.5 * jnp.square(residual / std) + jnp.log(std)).sum(obs_axes)

  # Reward, continuation and next mask of each transition, from the prior after a_t.
  reward_logits = model.apply(params, next_prior.features, method=WorldModel.reward_logits)
  reward_loss = twohot_loss(reward_logits, batch.reward)
  continue_logit = model.apply(params, next_prior.features, method=WorldModel.continue_logit)
  continue_loss = optax.sigmoid_binary_cross_entropy(
      continue_logit, 1.0 - batch.terminated.astype(jnp.float32))
  if model.mask_size:
    # The next state's mask is mask[t + 1] inside an episode; unknown at the window's end
    # and across episode ends (auto-reset replaced the final state).
    mask_logits = model.apply(params, next_prior.features, method=WorldModel.mask_logits)
    next_mask = jnp.concatenate([batch.mask[1:], batch.mask[-1:]]).astype(jnp.float32)
    known = jnp.concatenate([~batch.is_first[1:], jnp.zeros_like(batch.is_first[:1])])
    mask_loss = optax.sigmoid_binary_cross_entropy(mask_logits, next_mask).sum(-1)
    mask_loss = _masked_mean(mask_loss, trained * known)
  else:
    mask_loss = 0.0

  dyn, rep = kl_terms(model, posts, priors)
  total = (_masked_mean(squared_error + std_nll + reward_loss + continue_loss
                        + kl_loss(dyn, rep, section), trained) + mask_loss)
  # What imagination would predict one step ahead: the prior after a_t decoded, against
  # o_{t+1} inside the episode, beside copying o_t.
  decoded_next, _ = model.apply(params, next_prior.features, method=WorldModel.decode)
  inside = trained[:-1] * (~batch.is_first[1:]).astype(jnp.float32)
  one_step = jnp.square(decoded_next[:-1] - target[1:]).mean(obs_axes)
  copy_last = jnp.square(target[:-1] - target[1:]).mean(obs_axes)
  metrics = {
      "wm/loss": total,
      "wm/recon": _masked_mean(jnp.square(mean - target).mean(obs_axes), trained),
      "wm/reward_loss": _masked_mean(reward_loss, trained),
      "wm/reward_error": _masked_mean(
          jnp.abs(model.apply(params, next_prior.features, method=WorldModel.reward)
                  - batch.reward), trained),
      "wm/continue": _masked_mean(continue_loss, trained),
      "wm/mask": mask_loss,
      "wm/kl": _masked_mean(rep, trained),
      "wm/obs_std": std.mean(),
      "wm/one_step_error": jax.lax.stop_gradient(_masked_mean(one_step, inside)),
      "wm/copy_last_error": _masked_mean(copy_last, inside),
  }
  posts = jax.tree.map(lambda x: x[burn_in:], jax.lax.stop_gradient(posts))
  return pmean(total, axis_name), (posts, pmean(metrics, axis_name))


def update(state: WorldModelState, batch: Sequence, key, section: ml_collections.ConfigDict,
           *, model: WorldModel, optimizer, burn_in: int = 0, axis_name: str | None = None):
  """One optimiser step; returns (state, posteriors [L − burn_in, B] (no gradient), metrics)."""
  grads, (posts, metrics) = jax.grad(loss, has_aux=True)(
      state.params, batch, key, section, model=model, burn_in=burn_in, axis_name=axis_name)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  metrics["wm/grad_norm"] = optax.tree.norm(grads)
  return WorldModelState(optax.apply_updates(state.params, updates), opt_state), posts, metrics
