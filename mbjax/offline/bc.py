"""Behaviour cloning from labelled video (the VPT recipe): a policy that reads frames as the
video shows them and acts as the chunks' `actions` say — the IDM's labels on most chunks,
the true labels on the few that carry them. No reward and no interaction with the game are
used to train it.

Net: the IDM's `FrameEncoder` (flatten pooling: where the enemies and gems are drawn is what
the demonstrator acts on) → a hidden layer → logits over a grid of moves and one logit
vector per discrete branch. The move is discretised, as VPT discretises the mouse: each of
the C continuous dims into `move_bins` bins over [−1, 1], one class per cell of the joint
grid, the label spread over the 2^C cells around it (bilinear weights, so the weighted mean
of the cell centres is the label). A regression would average the ways the demonstrator
might move from a frame (flee left or right) into a short step between them; sampling the
grid keeps each way whole and at its speed. Loss: the cross-entropy of the move grid and of
each branch against the labels' probabilities (the IDM writes soft choices, a true label is
one-hot). Frame t is the screen the action at t was chosen on
(`mbjax/envs/bonk_arena/recording.py`'s layout, which the chunks keep).

Top-down games look the same turned: with `symmetry_fraction`, that share of the training
frames is rotated (or, unless `rotations_only`, also mirrored) with the move turned to match
(`idm_training.random_symmetry`); their menu choices are not trained on (the cards turn
with the image). A mirror turns a player who circles clockwise into one who circles the
other way, hence `rotations_only`.

Rare choices (a card picked in a menu: a few frames in a thousand) get `rare_fraction` of
each batch, drawn from the frames whose discrete label is not its branch's most common
choice; the rest is uniform over all frames. Colours are left alone (unlike the death
classifier's training frames): they tell an enemy from a gem.

Acting: a grid cell's centre is sampled for the move (at `move_temperature`; 0 takes the
most likely cell) and each branch's choice from its masked softmax, so a demonstrator that waits a random number of menu frames before it
picks is imitated as such (an arg-max would wait for ever when waiting is the likelier
label).

Fixed camera: where the camera does not follow the player, the player is a small sprite
anywhere on screen, and a net over the whole frame has to learn "what is near the player"
for every place it can be. With `crop_fraction`, a frozen `locator` (learnt from the
labelled moves alone, `mbjax/offline/locator.py`) finds the player and a second encoder
reads the view centred on it, as a follow camera would show it.

API (`BCConfig` and the action spec are hashable, static fields of `BCState`):
  init(key, cfg, spec, frame_shape) -> BCState;  with_locator(state, locator params) -> BCState
  update(state, frames u8[B, H, W, 3], moves f32[B, C], choice_probs f32[B, Σn], key) ->
         (state, metrics)
  move_targets(moves f32[B, C], bins) -> f32[B, bins^C];  move_centres(bins, C) -> f32[bins^C, C]
  act(params, cfg, spec, frames u8[N, H, W, 3], mask bool[N, Σn], key) -> HybridAction
  features(params, cfg, spec, frames u8[N, H, W, 3]) -> f32[N, hidden]  (the heads' input)
  act_on_features(params, cfg, spec, hidden f32[N, hidden], mask, key) -> HybridAction
  policy_fn(params, cfg, spec, obs_fn) -> a single-env `policy_fn(key, obs, mask)`
  sample_batch / fit: host-side sampling and a training loop over in-memory episodes.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import chex
import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from mbjax.envs.spaces import HybridAction, HybridActionSpec, rare_choices
from mbjax.nets.hybrid import mask_logits
from mbjax.offline import idm_training, locator
from mbjax.offline.idm import FrameEncoder


MAX_MOVE_CELLS = 4096  # the joint grid suits a few continuous dims (a 2-d move), not many


@dataclasses.dataclass(frozen=True)
class BCConfig:
  """Behaviour-cloning policy hyperparameters (hashable: a static jit argument)."""

  stem: int = 8  # space-to-depth block of the first layer
  channels: tuple[int, ...] = (32, 64, 64)  # stem width, then one 3×3/2 conv per entry
  embed_dim: int = 256
  hidden: int = 256
  pool: str = "flatten"
  move_bins: int = 11  # per continuous dim; the grid has move_bins^C cells
  rare_fraction: float = 0.25  # share of each batch drawn from frames with a rare choice
  # Acting: the move grid's softmax temperature (0: its most likely cell). Choices are
  # always sampled at temperature 1.
  move_temperature: float = 1.0
  # A second view of each frame, centred on the player (`locator.crop` of this fraction of
  # the side, at the frozen `locator` net's location), encoded by its own encoder beside the
  # whole frame; 0: none. For videos whose camera does not follow the player.
  crop_fraction: float = 0.0
  locator_channels: tuple[int, ...] = (16, 16)
  symmetry_fraction: float = 0.0  # training frames turned (top-down games only)
  rotations_only: bool = True  # turned, never mirrored
  lr: float = 3e-4
  weight_decay: float = 1e-4
  max_grad_norm: float = 1.0

  def __post_init__(self):
    if self.move_temperature < 0:
      raise ValueError(f"BCConfig.move_temperature must be >= 0, got {self.move_temperature}")
    if self.move_bins < 2:
      raise ValueError(f"BCConfig.move_bins must be >= 2, got {self.move_bins}")
    if not 0.0 <= self.symmetry_fraction <= 1.0:
      raise ValueError(f"BCConfig.symmetry_fraction must be in [0, 1], got "
                       f"{self.symmetry_fraction}")
    if not 0.0 <= self.rare_fraction < 1.0:
      raise ValueError(f"BCConfig.rare_fraction must be in [0, 1), got {self.rare_fraction}")
    if not 0.0 <= self.crop_fraction <= 1.0:
      raise ValueError(f"BCConfig.crop_fraction must be in [0, 1], got {self.crop_fraction}")
    object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
    object.__setattr__(self, "locator_channels",
                       tuple(int(c) for c in self.locator_channels))

  @property
  def locator(self) -> locator.LocatorConfig:
    return locator.LocatorConfig(channels=self.locator_channels)


class BCPolicyNet(nn.Module):
  cfg: BCConfig
  spec: HybridActionSpec

  @nn.compact
  def __call__(self, frames: jax.Array, features_only: bool = False):
    """uint8 [N, H, W, 3] → (move logits f32[N, bins^C], choice logits f32[N, Σn]), or with
    `features_only` the hidden layer both heads read, f32[N, hidden]."""
    cfg, spec = self.cfg, self.spec
    z = FrameEncoder(cfg.stem, cfg.channels, cfg.embed_dim, cfg.pool, name="encoder")(frames)
    if cfg.crop_fraction:
      # The locator is trained apart (`locator.fit`) and frozen here (`make_optimizer`).
      centres = jax.lax.stop_gradient(locator.LocatorNet(cfg.locator, name="locator")(frames))
      view = locator.crop(frames, centres, cfg.crop_fraction)
      z = jnp.concatenate([z, FrameEncoder(cfg.stem, cfg.channels, cfg.embed_dim, cfg.pool,
                                           name="view_encoder")(view)], -1)
    h = nn.relu(nn.Dense(cfg.hidden, name="hidden")(nn.relu(z)))
    if features_only:
      return h
    move_logits = nn.Dense(cfg.move_bins ** spec.continuous_dim, name="move")(h)
    return move_logits, nn.Dense(spec.mask_size, name="choices")(h)


def move_centres(bins: int, dims: int) -> jax.Array:
  """f32[bins^dims, dims]: the grid's cell centres, the last dim varying fastest."""
  axis = jnp.linspace(-1.0, 1.0, bins)
  grids = jnp.meshgrid(*([axis] * dims), indexing="ij")
  return jnp.stack([g.reshape(-1) for g in grids], -1)


def move_targets(moves: jax.Array, bins: int) -> jax.Array:
  """f32[B, bins^C] of moves f32[B, C] (clipped to [−1, 1]): on each dim the two nearest
  centres share the weight linearly, and a cell's weight is the product over dims, so the
  targets sum to 1 and their weighted mean of `move_centres` is the move."""
  position = (jnp.clip(moves, -1.0, 1.0) + 1.0) * 0.5 * (bins - 1)  # [B, C] in [0, bins−1]
  low = jnp.clip(jnp.floor(position), 0, bins - 2)
  upper = position - low  # weight of the upper neighbour
  per_dim = (jax.nn.one_hot(low.astype(jnp.int32), bins) * (1.0 - upper)[..., None]
             + jax.nn.one_hot(low.astype(jnp.int32) + 1, bins) * upper[..., None])  # [B,C,bins]
  joint = per_dim[:, 0]
  for d in range(1, moves.shape[-1]):
    joint = (joint[:, :, None] * per_dim[:, d, None, :]).reshape(moves.shape[0], -1)
  return joint


@flax.struct.dataclass
class BCState:
  params: Any
  opt_state: Any
  step: jax.Array  # i32[]
  cfg: BCConfig = flax.struct.field(pytree_node=False)
  spec: HybridActionSpec = flax.struct.field(pytree_node=False)


def make_optimizer(cfg: BCConfig) -> optax.GradientTransformation:
  """AdamW on everything but the locator's parameters, which stay as `with_locator` set them
  (weight decay would otherwise shrink them)."""
  train = optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm),
                      optax.adamw(cfg.lr, weight_decay=cfg.weight_decay))
  if not cfg.crop_fraction:
    return train
  labels = lambda params: jax.tree_util.tree_map_with_path(
      lambda path, _: "frozen" if any(getattr(k, "key", None) == "locator" for k in path)
      else "train", params)
  return optax.multi_transform({"train": train, "frozen": optax.set_to_zero()}, labels)


def init(key: jax.Array, cfg: BCConfig, spec: HybridActionSpec,
         frame_shape: tuple[int, int, int]) -> BCState:
  if len(frame_shape) != 3 or frame_shape[-1] != 3:
    raise ValueError(f"frame_shape must be (H, W, 3), got {frame_shape}")
  if cfg.move_bins ** spec.continuous_dim > MAX_MOVE_CELLS:
    raise ValueError(f"a move grid of {cfg.move_bins}^{spec.continuous_dim} cells is above "
                     f"{MAX_MOVE_CELLS}; use fewer BCConfig.move_bins")
  params = BCPolicyNet(cfg, spec).init(key, jnp.zeros((1,) + tuple(frame_shape), jnp.uint8))
  return BCState(params, make_optimizer(cfg).init(params), jnp.zeros((), jnp.int32), cfg, spec)


def with_locator(state: BCState, locator_params) -> BCState:
  """`state` with its frozen locator's parameters replaced by a fitted locator's
  (`locator.fit`'s `params`, of the net `state.cfg.locator` describes)."""
  if not state.cfg.crop_fraction:
    raise ValueError("BCConfig.crop_fraction is 0: the policy has no locator")
  fitted = locator_params["params"]
  shapes = lambda tree: jax.tree.map(jnp.shape, tree)
  if shapes(state.params["params"]["locator"]) != shapes(fitted):
    raise ValueError("the fitted locator's parameters do not match BCConfig.locator_channels")
  params = dict(state.params, params=dict(state.params["params"], locator=fitted))
  return state.replace(params=params, opt_state=make_optimizer(state.cfg).init(params))


def _branch_log_softmax(logits: jax.Array, spec: HybridActionSpec) -> list[jax.Array]:
  return [jax.nn.log_softmax(logits[..., o:o + n])
          for o, n in zip(spec.branch_offsets, spec.branches)]


def loss(params, cfg: BCConfig, spec: HybridActionSpec, frames: jax.Array, moves: jax.Array,
         choice_probs: jax.Array, choice_weight: jax.Array):
  """Cross-entropy of the move grid against `move_targets(moves)` + Σ_branches the
  cross-entropy against `choice_probs`, weighted per frame by `choice_weight` (0 where the
  choice is not trained on); also the cosine between the grid's mean move and the label,
  and each branch's accuracy against the labels' arg-max."""
  chex.assert_rank(frames, 4)
  batch = frames.shape[0]
  chex.assert_shape(moves, (batch, spec.continuous_dim))
  chex.assert_shape(choice_probs, (batch, spec.mask_size))
  chex.assert_shape(choice_weight, (batch,))
  move_logits, logits = BCPolicyNet(cfg, spec).apply(params, frames)
  move_log_probs = jax.nn.log_softmax(move_logits)
  move_loss = -jnp.mean(jnp.sum(move_targets(moves, cfg.move_bins) * move_log_probs, -1))
  mean_move = jnp.exp(move_log_probs) @ move_centres(cfg.move_bins, spec.continuous_dim)
  cosine = jnp.sum(mean_move * moves, -1) / (
      jnp.linalg.norm(mean_move, axis=-1) * jnp.linalg.norm(moves, axis=-1) + 1e-6)
  metrics = {"move_loss": move_loss, "move_cosine": jnp.mean(cosine)}
  choice_loss = jnp.float32(0.0)
  weight = choice_weight / jnp.maximum(jnp.sum(choice_weight), 1.0)
  for b, (offset, n, log_probs) in enumerate(zip(spec.branch_offsets, spec.branches,
                                                 _branch_log_softmax(logits, spec))):
    target = choice_probs[:, offset:offset + n]
    choice_loss += -jnp.sum(weight * jnp.sum(target * log_probs, -1))
    metrics[f"accuracy_{b}"] = jnp.sum(weight * (log_probs.argmax(-1) == target.argmax(-1)))
  metrics["choice_loss"] = choice_loss
  return move_loss + choice_loss, metrics


@functools.partial(jax.jit, donate_argnums=0)
def update(state: BCState, frames: jax.Array, moves: jax.Array, choice_probs: jax.Array,
           key: jax.Array):
  """One AdamW step on frames uint8[B, H, W, 3] labelled with moves f32[B, C] and choice
  probabilities f32[B, Σn]; `key` turns `symmetry_fraction` of the frames."""
  cfg, batch = state.cfg, frames.shape[0]
  choice_weight = jnp.ones((batch,), jnp.float32)
  if cfg.symmetry_fraction:
    labels = idm_training.ActionLabels(moves[:, None], jnp.zeros((batch, 1, 0), jnp.int32),
                                       jnp.ones((batch, 1), bool), jnp.ones((batch, 1), bool))
    clips, labels = idm_training.random_symmetry(key, frames[:, None], labels,
                                                 cfg.symmetry_fraction, cfg.rotations_only)
    frames, moves = clips[:, 0], labels.continuous[:, 0]
    choice_weight = labels.discrete_valid[:, 0].astype(jnp.float32)
  (value, metrics), grads = jax.value_and_grad(loss, has_aux=True)(
      state.params, cfg, state.spec, frames, moves, choice_probs, choice_weight)
  updates, opt_state = make_optimizer(cfg).update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = dict(metrics, loss=value, grad_norm=optax.tree.norm(grads))
  return state.replace(params=params, opt_state=opt_state, step=state.step + 1), metrics


def act(params, cfg: BCConfig, spec: HybridActionSpec, frames: jax.Array, mask: jax.Array,
        key: jax.Array) -> HybridAction:
  """Actions for frames uint8[N, H, W, 3] under mask bool[N, Σn]: a move-grid cell's centre
  and each branch's choice, sampled from their (masked) softmaxes."""
  chex.assert_rank(frames, 4)
  move_logits, logits = BCPolicyNet(cfg, spec).apply(params, frames)
  return _sample(cfg, spec, move_logits, logits, mask, key)


def act_on_features(params, cfg: BCConfig, spec: HybridActionSpec, hidden: jax.Array,
                    mask: jax.Array, key: jax.Array) -> HybridAction:
  """`act` from the hidden layer f32[N, hidden] that `features` returns (the heads alone):
  the cloned policy's actions on stored features, e.g. an offline world model's
  observations."""
  chex.assert_shape(hidden, (None, cfg.hidden))
  heads = params["params"]
  move_logits = nn.Dense(cfg.move_bins ** spec.continuous_dim).apply(
      {"params": heads["move"]}, hidden)
  logits = nn.Dense(spec.mask_size).apply({"params": heads["choices"]}, hidden)
  return _sample(cfg, spec, move_logits, logits, mask, key)


def _sample(cfg: BCConfig, spec: HybridActionSpec, move_logits, logits, mask, key):
  chex.assert_shape(mask, (move_logits.shape[0], spec.mask_size))
  move_key, key = jax.random.split(key)
  if cfg.move_temperature > 0:
    cell = jax.random.categorical(move_key, move_logits / cfg.move_temperature)
  else:
    cell = jnp.argmax(move_logits, -1)
  move = move_centres(cfg.move_bins, spec.continuous_dim)[cell]
  logits = mask_logits(logits, mask)
  keys = jax.random.split(key, max(spec.num_branches, 1))
  choices = [jax.random.categorical(k, logits[:, o:o + n])
             for k, o, n in zip(keys, spec.branch_offsets, spec.branches)]
  discrete = (jnp.stack(choices, -1) if choices
              else jnp.zeros((move_logits.shape[0], 0), jnp.int32)).astype(jnp.int32)
  return HybridAction(move, discrete)


def features(params, cfg: BCConfig, spec: HybridActionSpec, frames: jax.Array) -> jax.Array:
  """f32[N, hidden]: what the policy's heads read of frames uint8[N, H, W, 3] — with the
  locator, also the player's surroundings (an offline world model's observation)."""
  chex.assert_rank(frames, 4)
  return BCPolicyNet(cfg, spec).apply(params, frames, features_only=True)


def policy_fn(params, cfg: BCConfig, spec: HybridActionSpec,
              obs_fn: Callable[[jax.Array], jax.Array] = lambda frame: frame):
  """A single-env `policy_fn(key, obs, mask) -> HybridAction` (what
  `mbjax.envs.bonk_arena.rollout` plays); `obs_fn` turns the env's observation into a frame
  like the video's (uint8[H, W, 3])."""

  def policy(key, obs, mask):
    action = act(params, cfg, spec, obs_fn(obs)[None], mask[None], key)
    return jax.tree.map(lambda x: x[0], action)

  return policy


def sample_batch(rng: np.random.Generator, num_frames: int, rare: np.ndarray, batch: int,
                 rare_fraction: float) -> np.ndarray:
  """i64[B] frame indices into the concatenated episodes: round(B · rare_fraction) among the
  `rare` frames (none when there are none), the rest uniform over all frames."""
  rare_ids = np.flatnonzero(rare)
  count = int(round(batch * rare_fraction)) if len(rare_ids) else 0
  return np.concatenate([rng.choice(rare_ids, size=count),
                         rng.integers(0, num_frames, size=batch - count)]).astype(np.int64)


def fit(state: BCState, frames: Sequence[np.ndarray], actions: Sequence[np.ndarray],
        num_steps: int, rng: np.random.Generator, batch: int = 64,
        log_fn: Callable[[int, dict], None] | None = None, log_every: int = 50,
        data_sharding: NamedSharding | None = None):
  """`num_steps` updates on in-memory episodes: frames uint8[T, H, W, 3] and the chunk
  layout's actions f32[T, C + Σn] (moves, then each branch's probabilities) per episode;
  returns (state, last metrics as floats)."""
  spec = state.spec
  if len(frames) != len(actions) or not frames:
    raise ValueError(f"need one actions array per frames array, got {len(frames)} frames, "
                     f"{len(actions)} actions")
  all_frames = np.concatenate(frames)
  all_actions = np.concatenate(actions).astype(np.float32)
  if all_actions.shape != (len(all_frames), spec.continuous_dim + spec.mask_size):
    raise ValueError(f"actions must be f32[T, {spec.continuous_dim + spec.mask_size}] "
                     f"beside frames [T={len(all_frames)}], got {all_actions.shape}")
  moves = np.clip(all_actions[:, :spec.continuous_dim], -1.0, 1.0)
  choice_probs = all_actions[:, spec.continuous_dim:]
  choices = np.stack([choice_probs[:, o:o + n].argmax(-1)
                      for o, n in zip(spec.branch_offsets, spec.branches)], -1) \
      if spec.branches else np.zeros((len(all_frames), 0), np.int64)
  rare = rare_choices(choices)
  if data_sharding is not None:
    state = jax.device_put(state, NamedSharding(data_sharding.mesh, P()))
  metrics, key = {}, jax.random.PRNGKey(int(rng.integers(2 ** 31)))
  for step in range(num_steps):
    index = sample_batch(rng, len(all_frames), rare, batch, state.cfg.rare_fraction)
    state, metrics = update(state, *(jax.device_put(x, data_sharding) for x in (
        all_frames[index], moves[index], choice_probs[index])), jax.random.fold_in(key, step))
    if log_fn is not None and (step + 1) % log_every == 0:
      log_fn(step + 1, jax.tree.map(float, metrics))
  return state, jax.tree.map(float, metrics)
