"""Recurrent state-space world model (RSSM): encoder, latent dynamics, decoder, reward and
continue heads, trained on sequences (Hafner et al. 2019 "PlaNet"; DreamerV3, Hafner et
al. 2023, for categorical latents, KL balancing with free nats and symlog targets).

Latent state s_t = (h_t, z_t): h_t is a GRU's deterministic state, z_t a stochastic sample —
a diagonal Gaussian (`classes = 0`, as upstream, with a minimum std) or `stoch` categoricals
of `classes` classes with straight-through gradients and 1% uniform mixing (DreamerV3).

  prior    h_t = GRU(h_{t−1}, [z_{t−1}, a_{t−1}]),  z_t ~ p(z_t | h_t)
  posterior                                        z_t ~ q(z_t | h_t, embed(o_t))
  heads    o_t ~ N(dec(s_t), σ_dec(s_t));  r_t, c_t from the prior *after* a_t

The reward and continue heads read the prior state that follows action a_t, i.e. exactly
what imagination produces, so terminal transitions are learned even though auto-reset
replaced their final observation in the rollout. Episode starts (`is_first`) reset the
latent state and the previous action to zero.

Differs from upstream MetaBonk (`src/learner/world_model.py`): discrete actions are one-hot
(not raw indices as floats); a min std bounds the Gaussian; KL balancing and free nats;
a continue head; resets at episode starts; the decoder reconstructs o_t from (h_t, z_t) and
also predicts a per-dimension std (an input-dependent observation entropy for the Active
Inference head); batches of several windows, not one whole rollout.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import chex
import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mbjax.agents.collectives import pmean
from mbjax.agents.kl import categorical_kl, gaussian_kl
from mbjax.envs.spaces import HybridAction, HybridActionSpec
from mbjax.nets.actor_critic import PixelEncoder

MIN_LOG_STD, MAX_LOG_STD = -5.0, 2.0


def symlog(x):
  return jnp.sign(x) * jnp.log1p(jnp.abs(x))


def symexp(x):
  return jnp.sign(x) * jnp.expm1(jnp.abs(x))


@flax.struct.dataclass
class LatentState:
  deter: jax.Array  # [B, deter]
  stoch: jax.Array  # [B, stoch * max(classes, 1)], the sample (one-hot for categoricals)
  stats: jax.Array  # categorical: logits [B, stoch, classes]; Gaussian: [B, 2 * stoch]

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
  """GRU cell (Cho et al. 2014, flax's gate equations) with the three gates' input and
  recurrent maps each fused into one matrix: two matrix products per step instead of six."""

  size: int

  @nn.compact
  def __call__(self, h, x):
    ir, iz, i_n = jnp.split(nn.Dense(3 * self.size, name="input")(x), 3, -1)
    hr, hz, h_n = jnp.split(nn.Dense(3 * self.size, name="recurrent")(h), 3, -1)
    reset, update = nn.sigmoid(ir + hr), nn.sigmoid(iz + hz)
    candidate = jnp.tanh(i_n + reset * h_n)
    return (1.0 - update) * candidate + update * h


class RSSM(nn.Module):
  """`layers` hidden MLP layers sit on each side of the GRU (DreamerV3: 1): before its
  input, before the prior's and before the posterior's statistics; 0 gives upstream
  MetaBonk's linear maps ([z, a] straight into the GRU, linear prior and posterior)."""

  deter: int
  stoch: int
  classes: int  # 0: diagonal Gaussian latents
  hidden: int
  layers: int
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

  def _sample(self, stats, key):
    if self.classes:
      probs = jax.nn.softmax(stats, -1)
      index = jax.random.categorical(key, stats, -1)
      one_hot = jax.nn.one_hot(index, self.classes)
      sample = one_hot + probs - jax.lax.stop_gradient(probs)  # straight-through
      return sample.reshape(stats.shape[:-2] + (self.stoch_size,))
    mean, std = jnp.split(stats, 2, -1)
    return mean + std * jax.random.normal(key, mean.shape)

  @nn.compact
  def img_step(self, state: LatentState, action: jax.Array, key: jax.Array) -> LatentState:
    """Prior transition: p(s_t | s_{t−1}, a_{t−1})."""
    x = _mlp(jnp.concatenate([state.stoch, action], -1), (self.hidden,) * self.layers, "img_in")
    deter = GRU(self.deter, name="gru")(state.deter, x)
    x = _mlp(deter, (self.hidden,) * self.layers, "img_out")
    stats = self._stats(nn.Dense(self._stats_size, name="prior_stats")(x))
    return LatentState(deter, self._sample(stats, key), stats)

  @nn.compact
  def embed_projection(self, embed: jax.Array) -> jax.Array:
    """The observation's term in the posterior's first linear map, whose input is
    [h_t, embed(o_t)]: it does not depend on h_t, so `observe` computes it for a whole
    window in one matrix product instead of one per step."""
    return nn.Dense(self.hidden if self.layers else self._stats_size, use_bias=False,
                    name="post_embed")(embed)

  @nn.compact
  def obs_step(self, state: LatentState, action: jax.Array, embed_projection: jax.Array,
               is_first: jax.Array, key: jax.Array
               ) -> tuple[LatentState, LatentState, LatentState]:
    """(posterior q(s_t | s_{t−1}, a_{t−1}, o_t), the prior p(s_t | s_{t−1}, a_{t−1}) it
    refines, `continued`): the observation enters as `embed_projection(embed(o_t))`. Where
    o_t starts an episode the prior starts from the reset state; `continued` is the prior
    from the carried state everywhere, i.e. the state after the previous transition, whose
    reward and continue flag belong to the episode that ended."""
    prior_key, post_key = jax.random.split(key)
    continued = self.img_step(state, action, prior_key)
    # The reset state and action are zeros, so every env's reset prior is the same row.
    fresh = self.img_step(self.initial(1), jnp.zeros((1, action.shape[-1]), action.dtype),
                          prior_key)
    prior = jax.tree.map(
        lambda f, c: jnp.where(is_first.reshape((-1,) + (1,) * (c.ndim - 1)), f, c),
        fresh, continued)
    if self.layers:
      x = nn.Dense(self.hidden, name="post_deter")(prior.deter) + embed_projection
      x = nn.silu(nn.LayerNorm(epsilon=1e-3, name="post_norm")(x))
      x = _mlp(x, (self.hidden,) * (self.layers - 1), "post_hidden")
      raw = nn.Dense(self._stats_size, name="post_stats")(x)
    else:
      raw = nn.Dense(self._stats_size, name="post_deter")(prior.deter) + embed_projection
    stats = self._stats(raw)
    return LatentState(prior.deter, self._sample(stats, post_key), stats), prior, continued


class WorldModel(nn.Module):
  """Encoder + RSSM + heads. Pixel observations (rank 3) use CNNs; vectors MLPs. Built by
  `make_world_model` from the `world_model` config section, which holds the defaults."""

  obs_shape: tuple[int, ...]
  rssm: RSSM
  hidden: int
  head_layers: int
  predict_delta: bool  # vectors only: a head for o_{t+1} − o_t, see next_obs_delta
  # Slot lists inside the vector observation, (start, slots, features per slot, sort
  # feature) each, presence first: their delta comes from `EntityDeltaHead` instead.
  entity_slots: tuple[tuple[int, int, int, int], ...]
  # (start, scale): o[start:start + 2] is the agent's position, and a change of `scale` in
  # it moves the slots' relative positions by 1. Set, the entity head moves each entity in
  # polar coordinates around the agent's predicted next position (`EntityDeltaHead.polar`).
  agent_position: tuple[int, float]
  entity_width: int  # the entity head's MLPs (per slot and arrival)

  def setup(self):
    pixels = len(self.obs_shape) == 3
    if pixels and self.predict_delta:
      raise ValueError("world_model.predict_delta=True needs vector observations; got "
                       f"observation shape {self.obs_shape}")
    self.encoder = PixelEncoder(self.hidden) if pixels else _MLPStack(self.hidden, 2)
    self.decoder = PixelDecoder(self.obs_shape) if pixels else VectorDecoder(
        self.obs_shape[0], self.hidden, self.head_layers)
    self.reward_head = _ScalarHead(self.hidden, self.head_layers)
    self.continue_head = _ScalarHead(self.hidden, self.head_layers)
    if self.entity_slots and not self.predict_delta:
      raise ValueError("world_model.entity_slots needs world_model.predict_delta=True")
    covered = np.zeros(self.obs_shape[0] if not pixels else 0, int)
    for block in self.entity_slots:
      start, count, size, sort_feature = (tuple(block) + (-1,) * 4)[:4]
      if (len(block) != 4 or start < 0 or count < 1 or size < 2
          or start + count * size > len(covered) or not 0 < sort_feature < size):
        raise ValueError(
            f"world_model.entity_slots block {tuple(block)}: expected (start, slots, "
            f"features ≥ 2, sort feature in 1..features−1) inside the {len(covered)}-d "
            "observation")
      covered[start:start + count * size] += 1
    if (covered > 1).any():
      raise ValueError(f"world_model.entity_slots={self.entity_slots}: blocks overlap")
    if self.entity_slots and self.entity_width < 1:
      raise ValueError(f"world_model.entity_width={self.entity_width}: expected ≥ 1")
    self._entity_dims = covered > 0
    if self.agent_position:
      start, scale = (tuple(self.agent_position) + (None, None))[:2]
      if (len(self.agent_position) != 2 or not self.entity_slots or int(start) != start
          or not 0 <= start <= len(covered) - 2 or covered[int(start):int(start) + 2].any()
          or not scale or any(block[3] != 3 or block[2] < 4 for block in self.entity_slots)):
        raise ValueError(
            f"world_model.agent_position={tuple(self.agent_position)}: expected (start, "
            "scale ≠ 0) of the agent's 2-d position outside the entity blocks, with "
            "entity_slots whose features are (presence, dx, dy, distance, ...) sorted by "
            f"distance (sort feature 3); entity_slots={self.entity_slots}")
    if self.predict_delta:
      self.delta_head = _VectorHead(self.obs_shape[0], self.hidden, self.head_layers)
    if self.entity_slots:
      self.entity_head = EntityDeltaHead(self.entity_slots, self.obs_shape[0],
                                         self.entity_width, polar=bool(self.agent_position))

  def embed(self, obs):
    # Decided by the model's observation rank, not the input's: observe() passes [L, B, ...].
    return self.encoder(obs if len(self.obs_shape) == 3 else symlog(obs))

  def projected_embed(self, obs):
    """What `RSSM.obs_step` takes for o_t (see `RSSM.embed_projection`)."""
    return self.rssm.embed_projection(self.embed(obs))

  def decode(self, features):
    """Mean and std of p(o | s) — in symlog space for vectors, [0, 1] for pixels."""
    return self.decoder(features)

  def reward(self, features):
    return symexp(self.reward_head(features))

  def continue_logit(self, features):
    return self.continue_head(features)

  def next_obs_delta(self, obs, action):
    """symlog(o_{t+1}) − symlog(o_t) from symlog(o_t) and a_t alone: the one-step predictor
    conditions on o_t, as copy-last does, and the raw values give it the exact offsets and
    distances the change depends on. It reads no latent state: with the prior state after
    a_t beside them (all of it, or its deterministic part with or without a stop-gradient)
    it learned more slowly (docs/experiments/2026-11-27-world-model-one-step.md).
    Imagination never calls it."""
    context = jnp.concatenate([symlog(obs), action], -1)
    delta = self.delta_head(context)
    if self.entity_slots:
      agent_move = None
      if self.agent_position:
        start, scale = int(self.agent_position[0]), float(self.agent_position[1])
        now = obs[..., start:start + 2]
        # The plain head's own prediction of the agent's move, as a fixed input: learned
        # from the entities' error instead, the move drifted and the enemy block got worse
        # (docs/experiments/2026-11-27-world-model-one-step.md).
        agent_move = jax.lax.stop_gradient(
            symexp(symlog(now) + delta[..., start:start + 2]) - now) / scale
      delta = jnp.where(self._entity_dims,
                        self.entity_head(context, obs, action, agent_move), delta)
    return delta

  def __call__(self, obs, action, is_first, key):
    """Touches every parameter (for `init`): one observe step plus all heads."""
    state = self.rssm.initial(obs.shape[0])
    post, _, _ = self.rssm.obs_step(state, action, self.projected_embed(obs), is_first, key)
    heads = (self.decode(post.features), self.reward(post.features),
             self.continue_logit(post.features))
    return heads + ((self.next_obs_delta(obs, action),)
                    if self.predict_delta else ())


class _MLPStack(nn.Module):
  width: int
  layers: int

  @nn.compact
  def __call__(self, x):
    return _mlp(x, (self.width,) * self.layers, "layer")


def _zero_init_head(x, size: int, width: int, layers: int):
  """MLP → `size` outputs, zero at initialisation (called inside a compact module)."""
  x = _mlp(x, (width,) * layers, "layer")
  return nn.Dense(size, kernel_init=nn.initializers.zeros)(x)


class _ScalarHead(nn.Module):
  width: int
  layers: int

  @nn.compact
  def __call__(self, x):
    return _zero_init_head(x, 1, self.width, self.layers)[..., 0]


class _VectorHead(nn.Module):
  """MLP → a vector, zero at initialisation (a delta head starts as copy-last)."""

  size: int
  width: int
  layers: int

  @nn.compact
  def __call__(self, x):
    return _zero_init_head(x, self.size, self.width, self.layers)


def _slot_order(entities: jax.Array, sort_feature: int) -> jax.Array:
  """Indices that sort a slot list [..., K, F] by `sort_feature`, ascending, absent
  entities (presence, feature 0, ≤ 0.5) last and ties in their order; no gradient."""
  key = jnp.where(entities[..., 0] > 0.5, entities[..., sort_feature], jnp.inf)
  return jnp.argsort(jax.lax.stop_gradient(key), axis=-1, stable=True)


def resort_and_shift(entities: jax.Array, leave_prob: jax.Array, newcomer: jax.Array,
                     sort_feature: int) -> jax.Array:
  """Expected next contents of a slot list from per-entity predictions.

  entities [..., K, F]: each slot's entity at the next step (feature 0: presence, 1 or 0);
  leave_prob [..., K]: the probability that it leaves the list (killed, picked up);
  newcomer [..., F]: what enters the last slot when one leaves.
  The entities are re-sorted by `sort_feature` (ascending; absent ones last, ties keep
  their order), then a leaver shifts those behind it up one slot: at most one leaves per
  step, so slot j keeps its entity with probability 1 − c_j, c_j = min(Σ_{i≤j} p_i, 1),
  and shows the next one (the newcomer after the last) otherwise — the mixture is the
  squared-error optimum between the outcomes. The sort takes no gradient; the values do.
  """
  chex.assert_rank(entities, leave_prob.ndim + 1)
  chex.assert_equal_shape_prefix((entities, leave_prob), leave_prob.ndim)
  present = entities[..., 0] > 0.5
  order = _slot_order(entities, sort_feature)
  entities = jnp.take_along_axis(entities, order[..., None], axis=-2)
  leave_prob = jnp.take_along_axis(leave_prob * present, order, axis=-1)
  behind = jnp.concatenate([entities[..., 1:, :], newcomer[..., None, :]], axis=-2)
  shifted = jnp.minimum(jnp.cumsum(leave_prob, axis=-1), 1.0)[..., None]
  return (1.0 - shifted) * entities + shifted * behind


def insert_arrival(entities: jax.Array, arrive_prob: jax.Array, arrival: jax.Array,
                   sort_feature: int) -> jax.Array:
  """Expected contents of a sorted slot list into which one entity may arrive.

  entities [..., K, F]: the slots without the arrival (feature 0: presence), sorted;
  arrive_prob [...]: the probability that `arrival` [..., F] (present) joins the list.
  The arrival goes in at its place by `sort_feature` and pushes the slots behind it back
  one (the last drops out of view); the result mixes that list and `entities` by the
  probability (the squared-error optimum between the two). Example: an XP gem dropped by a
  kill beside the player becomes the nearest gem. The sort takes no gradient; the values do.
  """
  chex.assert_rank(entities, arrive_prob.ndim + 2)
  chex.assert_equal_shape((entities[..., 0, :], arrival))
  count = entities.shape[-2]
  joined = jnp.concatenate([entities, arrival[..., None, :]], axis=-2)
  order = _slot_order(joined, sort_feature)[..., :count]
  inserted = jnp.take_along_axis(joined, order[..., None], axis=-2)
  arrive_prob = arrive_prob[..., None, None]
  return (1.0 - arrive_prob) * entities + arrive_prob * inserted


class EntityDeltaHead(nn.Module):
  """The change of slot-list blocks (e.g. the nearest enemies, sorted by distance), entity
  by entity: one MLP, shared by every slot, maps a slot's own raw features, a narrow
  projection of the shared context and a_t to the change of that entity's features (all
  but presence) and the logit that it leaves the list; then `resort_and_shift` re-sorts
  them by the predicted sort feature and shifts a learned newcomer (from the context) in
  behind a leaver; last, `insert_arrival` lets one entity (an MLP of the context) arrive
  at its sorted place. When two enemies trade places the slots trade contents, which a
  per-dimension delta can only blur: on BonkArena, exact chase dynamics plus the re-sort
  remove 99% of copy-last's error on such steps (BENCHMARKS.md "World model").

  The context projection is narrow (`context_width`, 64) so that a slot's own few features
  are not drowned in the first layer: with 256 the enemy block learned more slowly
  (docs/experiments/2026-11-27-world-model-one-step.md).

  With `polar`, features 1–3 are the entity's position relative to the agent and its
  distance (the sort feature), and the head is given the agent's move this step
  (`agent_move`, in those units): each entity is first placed relative to the agent's next
  position, then moved in polar coordinates around it by two more outputs, a radial step
  (the distance cannot go below 0) and a turn, before the additive changes. Chasing,
  fleeing and circling are then one number each, where the additive form has to compute a
  product of the bearing and a speed; the floor at 0 puts enemies that reach the agent
  exactly on it, so their order stays as it was. On BonkArena it is what brought the enemy
  block's error well below the additive head's (BENCHMARKS.md "World model").

  Returns symlog(next) − symlog(o_t) on the blocks and 0 elsewhere (the world model uses it
  in place of the plain delta head there). Near copy-last at initialisation: zero feature
  changes (with `polar`: zero radial step and turn, and the agent's move as given), leave
  probability sigmoid(`leave_bias`) per present entity, arrival probability
  sigmoid(`arrive_bias`)."""

  blocks: tuple[tuple[int, int, int, int], ...]  # (start, slots, features, sort feature)
  obs_dim: int
  width: int
  layers: int = 2
  context_width: int = 64
  leave_bias: float = -4.0
  arrive_bias: float = -4.0
  polar: bool = False

  @nn.compact
  def __call__(self, context, obs, action, agent_move=None):
    lead = obs.shape[:-1]
    if self.polar:
      chex.assert_shape(agent_move, lead + (2,))
    shared = nn.Dense(self.context_width, name="context")(context)
    per_slot = jnp.concatenate([shared, action], -1)
    delta = jnp.zeros(lead + (self.obs_dim,), obs.dtype)
    for k, (start, count, size, sort_feature) in enumerate(self.blocks):
      stop = start + count * size
      block = obs[..., start:stop].reshape(lead + (count, size))
      present = block[..., :1] > 0.5
      inputs = [block, jnp.broadcast_to(per_slot[..., None, :],
                                        lead + (count, per_slot.shape[-1]))]
      if self.polar:
        relative = block[..., 1:3] - agent_move[..., None, :]
        radius = jnp.sqrt(jnp.sum(jnp.square(relative), -1, keepdims=True) + 1e-12)
        inputs.append(radius)
      # Features 1.. change; presence only through leaving (and the newcomer).
      out = _VectorHead(size + 2 * self.polar, self.width, self.layers,
                        name=f"entity_{k}")(jnp.concatenate(inputs, -1))
      moved = block[..., 1:]
      if self.polar:
        bearing = relative / radius
        normal = jnp.stack([-bearing[..., 1], bearing[..., 0]], -1)
        next_radius = jax.nn.relu(radius + out[..., size:size + 1])
        turn = out[..., size + 1:size + 2]
        position = next_radius * (jnp.cos(turn) * bearing + jnp.sin(turn) * normal)
        moved = jnp.concatenate([position, next_radius, block[..., 4:]], -1)
      moved = moved + out[..., 1:size]
      entities = jnp.concatenate([block[..., :1], jnp.where(present, moved, block[..., 1:])], -1)
      leave_prob = jax.nn.sigmoid(out[..., 0] + self.leave_bias)
      newcomer = nn.Dense(size, name=f"newcomer_{k}")(shared)
      following = resort_and_shift(entities, leave_prob, newcomer, sort_feature)
      # One entity may arrive anywhere in the list (not only behind a leaver): its
      # probability and features need the whole context (a kill's gem lands where the
      # nearest enemy in range stood), so an MLP of it rather than a linear map.
      arriving = _VectorHead(size, self.width, self.layers, name=f"arrival_{k}")(context)
      arrival = jnp.concatenate([jnp.ones_like(arriving[..., :1]), arriving[..., 1:]], -1)
      arrive_prob = jax.nn.sigmoid(arriving[..., 0] + self.arrive_bias)
      following = insert_arrival(following, arrive_prob, arrival, sort_feature)
      delta = delta.at[..., start:stop].set(
          (symlog(following) - symlog(block)).reshape(lead + (-1,)))
    return delta


class VectorDecoder(nn.Module):
  obs_dim: int
  width: int
  layers: int

  @nn.compact
  def __call__(self, features):
    x = _mlp(features, (self.width,) * self.layers, "layer")
    mean = nn.Dense(self.obs_dim, name="mean")(x)
    log_std = nn.Dense(self.obs_dim, name="log_std", kernel_init=nn.initializers.zeros)(x)
    return mean, jnp.exp(jnp.clip(log_std, MIN_LOG_STD, MAX_LOG_STD))


class PixelDecoder(nn.Module):
  """Dense → 8×8 map → transposed convolutions up to the frame size; mean and std per pixel."""

  obs_shape: tuple[int, int, int]

  @nn.compact
  def __call__(self, features):
    height, width, channels = self.obs_shape
    base_h, base_w = height // 8, width // 8
    x = nn.Dense(base_h * base_w * 64)(features)
    x = x.reshape(features.shape[:-1] + (base_h, base_w, 64))
    for features_out in (64, 32):
      x = nn.silu(nn.ConvTranspose(features_out, (4, 4), (2, 2))(x))
    x = nn.ConvTranspose(2 * channels, (4, 4), (2, 2))(x)
    mean, log_std = jnp.split(x, 2, -1)
    return jax.nn.sigmoid(mean), jnp.exp(jnp.clip(log_std, MIN_LOG_STD, MAX_LOG_STD))


@flax.struct.dataclass
class WorldModelState:
  params: Any
  opt_state: Any


class Sequence(NamedTuple):
  """Training windows, time-major [L, B, ...]. `action[t]` is the action taken after o_t;
  `reward[t]`, `terminated[t]` belong to that transition."""

  obs: jax.Array
  action: jax.Array  # f32[L, B, A], see action_vector
  reward: jax.Array
  terminated: jax.Array
  is_first: jax.Array


def make_world_model(wm: ml_collections.ConfigDict, obs_shape) -> WorldModel:
  """The model of the `world_model` config section for observations of `obs_shape`."""
  rssm = RSSM(deter=wm.deter, stoch=wm.stoch, classes=wm.classes, hidden=wm.hidden,
              layers=wm.rssm_layers, min_std=wm.min_std, unimix=wm.unimix)
  return WorldModel(obs_shape=tuple(obs_shape), rssm=rssm, hidden=wm.hidden,
                    head_layers=wm.head_layers, predict_delta=wm.predict_delta,
                    entity_slots=tuple(tuple(int(v) for v in block)
                                       for block in wm.entity_slots),
                    agent_position=tuple(wm.agent_position), entity_width=wm.entity_width)


def make_optimizer(wm: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Adam with global-norm clipping from the `world_model` section."""
  if wm.lr_decay_updates < 0:
    raise ValueError(f"world_model.lr_decay_updates={wm.lr_decay_updates}: expected ≥ 0 "
                     "(0: a constant learning rate)")
  lr = (optax.cosine_decay_schedule(wm.lr, wm.lr_decay_updates) if wm.lr_decay_updates
        else wm.lr)
  return optax.chain(optax.clip_by_global_norm(wm.max_grad_norm), optax.adam(lr, eps=1e-8))


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

  def step(state, inputs):
    projected_t, action_t, first_t, key_t = inputs
    post, prior, continued = model.apply(params, state, action_t, projected_t, first_t, key_t,
                                         method=lambda m, *a: m.rssm.obs_step(*a))
    return post, (post, prior, continued)

  keys = jax.random.split(key, is_first.shape[0])
  initial = model.apply(params, is_first.shape[1], method=lambda m, b: m.rssm.initial(b))
  # Derive the zero state from the data so that, under shard_map, it varies over the data
  # axis like the states the scan produces (a constant would be device-invariant).
  anchor = jnp.zeros_like(projected[0, :, 0])
  initial = jax.tree.map(lambda x: x + anchor.reshape((-1,) + (1,) * (x.ndim - 1)), initial)
  _, outputs = jax.lax.scan(step, initial, (projected, prev_action, is_first, keys))
  return outputs


def img_step(model: WorldModel, params, state: LatentState, action, key) -> LatentState:
  return model.apply(params, state, action, key, method=lambda m, *a: m.rssm.img_step(*a))


def imagine(model: WorldModel, params, policy, start: LatentState, horizon: int, key):
  """Rolls the prior forward `horizon` steps from `start` [N] with `policy(features, key)
  -> (model_action [N, A], raw_action)`; returns (states [H+1, N], raw actions [H, N])."""

  def step(state, key_t):
    policy_key, dynamics_key = jax.random.split(key_t)
    model_action, raw_action = policy(state.features, policy_key)
    next_state = img_step(model, params, state, model_action, dynamics_key)
    return next_state, (next_state, raw_action)

  _, (states, raw_actions) = jax.lax.scan(step, start, jax.random.split(key, horizon))
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
  if jnp.issubdtype(obs.dtype, jnp.integer):
    return obs.astype(jnp.float32) / 255.0
  return symlog(obs)


class _Rollforward(NamedTuple):
  posts: LatentState  # [L, B] posteriors
  priors: LatentState  # [L, B] priors of the same steps
  next_prior: LatentState  # [L·B] prior after a_t, from each posterior
  target: jax.Array  # [L, B, ...] the decoder's target for each o_t
  predicted: jax.Array  # [L−1, B, ...] one-step prediction of target[1:]
  inside: jax.Array  # bool[L−1, B]: o_{t+1} belongs to o_t's episode


def _rollforward(params, model: WorldModel, batch: Sequence, key) -> _Rollforward:
  """Filters the windows, steps every posterior once through the prior with its action,
  and predicts each next observation: from the delta head added to the observed o_t
  (`predict_delta`), else by decoding that prior state."""
  observe_key, transition_key = jax.random.split(key)
  posts, priors, continued = _filter(model, params, batch.obs, previous_actions(batch.action),
                                     batch.is_first, observe_key)
  # The prior after (s_t, a_t) is the scan's `continued` prior of step t + 1; only the
  # window's last step needs a further transition.
  last = img_step(model, params, jax.tree.map(lambda x: x[-1], posts), batch.action[-1],
                  transition_key)
  flat = lambda x: x.reshape((-1,) + x.shape[2:])
  next_prior = jax.tree.map(lambda c, x: flat(jnp.concatenate([c[1:], x[None]])), continued,
                            last)
  target = observation_target(batch.obs)
  if model.predict_delta:
    delta = model.apply(params, flat(batch.obs), flat(batch.action),
                        method=WorldModel.next_obs_delta)
    predicted = target + delta.reshape(target.shape)
  else:
    predicted, _ = model.apply(params, next_prior.features, method=WorldModel.decode)
    predicted = predicted.reshape(target.shape)
  return _Rollforward(posts, priors, next_prior, target, predicted[:-1], ~batch.is_first[1:])


def one_step_squared_errors(params, model: WorldModel, batch: Sequence, key):
  """Per-dimension squared errors of the one-step prediction and of copying o_t, both
  against the decoder's target of o_{t+1}: (model [L−1, B, ...], copy-last [L−1, B, ...],
  bool inside [L−1, B]). Steps whose o_{t+1} starts a new episode are marked outside."""
  out = _rollforward(params, model, batch, key)
  return (jnp.square(out.predicted - out.target[1:]),
          jnp.square(out.target[:-1] - out.target[1:]), out.inside)


def _masked_mean(x, inside):
  return (x * inside).sum() / jnp.maximum(inside.sum(), 1)


def loss(params, batch: Sequence, key, wm: ml_collections.ConfigDict, *, model: WorldModel,
         axis_name: str | None = None):
  """World-model loss on windows [L, B] with the `world_model` section's KL weights;
  returns (loss, (posteriors, metrics))."""
  posts, priors, next_prior, target, predicted, inside = _rollforward(params, model, batch, key)
  features = posts.features
  obs_axes = tuple(range(2, batch.obs.ndim))

  mean, std = model.apply(params, features, method=WorldModel.decode)
  squared_error = jnp.square(mean - target).sum(obs_axes)
  # The std head learns the residual scale without rescaling the mean's gradient.
  residual = jax.lax.stop_gradient(mean) - target
  std_nll = (0.5 * jnp.square(residual / std) + jnp.log(std)).sum(obs_axes)

  # Reward and continuation of each transition, from the prior that follows a_t.
  flat = lambda x: x.reshape((-1,) + x.shape[2:])
  reward_pred = model.apply(params, next_prior.features, method=lambda m, f: m.reward_head(f))
  reward_loss = jnp.square(reward_pred - symlog(flat(batch.reward)))
  continue_logit = model.apply(params, next_prior.features, method=WorldModel.continue_logit)
  continue_loss = optax.sigmoid_binary_cross_entropy(
      continue_logit, 1.0 - flat(batch.terminated).astype(jnp.float32))

  # One-step prediction of o_{t+1}, where t+1 is in the same episode: the delta heads'
  # (from o_t, a_t) is trained on it; a decoded one (from s_t, a_t) is only measured.
  one_step = jnp.square(predicted - target[1:])
  delta_loss = _masked_mean(one_step.sum(obs_axes), inside) if model.predict_delta else 0.0

  dyn, rep = kl_terms(model, posts, priors)
  kl_loss = (wm.dyn_scale * jnp.maximum(dyn, wm.free_nats)
             + wm.rep_scale * jnp.maximum(rep, wm.free_nats))
  total = (squared_error.mean() + std_nll.mean() + reward_loss.mean() + continue_loss.mean()
           + kl_loss.mean() + delta_loss)
  metrics = {
      "wm/loss": total,
      "wm/recon": jnp.square(mean - target).mean(),
      "wm/reward": reward_loss.mean(),
      "wm/continue": continue_loss.mean(),
      "wm/kl": rep.mean(),
      "wm/obs_std": std.mean(),
      "wm/one_step_error": jax.lax.stop_gradient(_masked_mean(one_step.mean(obs_axes), inside)),
      "wm/copy_last_error": copy_last_observation_error(batch.obs, batch.is_first),
  }
  return pmean(total, axis_name), (jax.lax.stop_gradient(posts),
                                    jax.tree.map(lambda m: pmean(m, axis_name), metrics))


def update(state: WorldModelState, batch: Sequence, key, wm: ml_collections.ConfigDict, *,
           model: WorldModel, optimizer, axis_name: str | None = None):
  """One optimiser step with the `world_model` section; returns (state, posteriors [L, B]
  (no gradient), metrics)."""
  grads, (posts, metrics) = jax.grad(loss, has_aux=True)(state.params, batch, key, wm,
                                                         model=model, axis_name=axis_name)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  metrics["wm/grad_norm"] = optax.tree.norm(grads)
  return WorldModelState(optax.apply_updates(state.params, updates), opt_state), posts, metrics


def copy_last_observation_error(obs: jax.Array, is_first: jax.Array) -> jax.Array:
  """The baseline a one-step model must beat: MSE (in the decoder's target space) of
  predicting o_{t+1} = o_t, over steps that stay inside an episode."""
  target = observation_target(obs)
  error = jnp.square(target[1:] - target[:-1]).mean(tuple(range(2, obs.ndim)))
  return _masked_mean(error, ~is_first[1:])

