"""Where the player is in a frame, learnt from labelled video without any position label,
and the player-centred view cut from a frame around it.

In a video whose camera does not follow the player (BonkArena's fixed camera), the player
is a small sprite anywhere on screen, and a policy must read what surrounds it wherever it
is. The player is the one thing on screen that moves as the actions say, so a locator can
be learnt from the moves alone: a small fully-convolutional net scores every cell of the
frame, and it is trained so that the change over `gap` frames of the scores' soft-argmax
L (f32[2], (row, column) in [−1, 1]) is a linear function of the moves made in between:

  loss = ‖M − ΔL·A*‖² / ‖M − mean(M)‖² + entropy_weight · H(map) / log(cells),
  A* = argmin_A ‖M − ΔL·A‖² + ridge·‖A‖²

per batch (M f32[B, C]: the summed moves; ΔL f32[B, 2]; A* in closed form, so the scale
and orientation between screen and move axes need no tuning). Without the entropy term the
fit does not need the map to peak on the player: a flat map with a bump on it, or a dip,
moves with the player, shrunk towards the middle (A* scales it back, flips it for a dip),
and its best cell lies anywhere. With it the map is one peak that follows the player, and
the location used is the best-scoring cell's. Only changes of the location are trained, so
the peak may sit a fixed few pixels off the sprite (within the net's reach): the crop is
centred that far off, the same in every frame. Enemies move too, but towards the player
rather than as the actions say; a still background moves not at all. Videos
whose camera follows the player do not fit this (the player stays put while the background
moves against the actions): `fit` is given the videos whose camera is fixed.

`crop` cuts the square of `fraction` of the frame's side centred on a location and resamples
it to the frame's size (bilinear; outside the frame black, as a follow camera draws outside
the arena), the view a follow camera would have shown.

API (`LocatorConfig` is hashable, a static field of `LocatorState`):
  init(key, cfg, frame_shape) -> LocatorState
  locate(params, cfg, frames u8[N, H, W, 3]) -> f32[N, 2]  (soft=True: (soft-argmax, entropy))
  loss(params, cfg, first u8[B, H, W, 3], last u8[B, H, W, 3], moves f32[B, C]) ->
       (loss, metrics)
  update(state, first, last, moves) -> (state, metrics)
  windows(moves per video, valid per video, gap) -> i64[N, 2] (video, start) pairs
  fit(state, videos, moves, valid, num_steps, rng, batch) -> (state, metrics)
  crop(frames u8[N, H, W, 3], centres f32[N, 2], fraction) -> u8[N, H, W, 3]
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


@dataclasses.dataclass(frozen=True)
class LocatorConfig:
  """Locator hyperparameters (hashable: a static jit argument)."""

  channels: tuple[int, ...] = (16, 16)  # a 2×2/2 stem, then a 3×3 conv per further entry
  gap: int = 8  # frames between the two frames of a training pair
  ridge: float = 1e-4  # on the closed-form map from location change to moves
  # Weight of the score map's entropy (over log of its cells) in the loss: it keeps the map
  # one peak (see the module docstring).
  entropy_weight: float = 0.1
  # The entropy weight rises linearly from 0 over this many updates: a map that peaks before
  # it has learnt to follow the player stays on whatever it peaked on.
  # (On BonkArena's scripted videos without it, the desert palette's map settled on a HUD
  # mark; with 500 of 1,000 updates it follows the player in both palettes.)
  entropy_warmup: int = 500
  sharpness: float = 30.0  # scales the scores: a near-flat map barely feels the entropy
  lr: float = 1e-3

  def __post_init__(self):
    if not self.channels:
      raise ValueError("LocatorConfig.channels must name at least the stem's width")
    if self.gap < 1:
      raise ValueError(f"LocatorConfig.gap must be >= 1, got {self.gap}")
    object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))


class LocatorNet(nn.Module):
  cfg: LocatorConfig

  @nn.compact
  def __call__(self, frames: jax.Array, soft: bool = False):
    """uint8 [N, H, W, 3] → the location f32[N, 2] (row, column) in [−1, 1], the centre of
    the best-scoring cell; or (`soft`, what trains) (the scores' soft-argmax f32[N, 2], the
    score map's entropy over log(cells) f32[N])."""
    chex.assert_rank(frames, 4)
    x = frames.astype(jnp.float32) / 255.0
    x = nn.relu(nn.Conv(self.cfg.channels[0], (2, 2), strides=2, name="stem")(x))
    for i, features in enumerate(self.cfg.channels[1:]):
      x = nn.relu(nn.Conv(features, (3, 3), name=f"conv_{i}")(x))
    scores = self.cfg.sharpness * nn.Conv(1, (1, 1), name="score")(x)[..., 0]  # [N, h, w]
    n, h, w = scores.shape
    weights = jax.nn.softmax(scores.reshape(n, h * w), -1).reshape(n, h, w)
    # Cell centres in the frame's coordinates (its corner pixels' centres at ±1): cell i
    # covers pixels 2i and 2i + 1.
    height, width = frames.shape[1:3]
    rows = -1.0 + 2.0 * (2.0 * jnp.arange(h) + 0.5) / (height - 1)
    columns = -1.0 + 2.0 * (2.0 * jnp.arange(w) + 0.5) / (width - 1)
    if not soft:
      best = jnp.argmax(scores.reshape(n, h * w), -1)
      return jnp.stack([rows[best // w], columns[best % w]], -1)
    log_weights = jax.nn.log_softmax(scores.reshape(n, h * w), -1)
    entropy = -jnp.sum(jnp.exp(log_weights) * log_weights, -1) / jnp.log(h * w)
    return jnp.stack([weights.sum(2) @ rows, weights.sum(1) @ columns], -1), entropy


@flax.struct.dataclass
class LocatorState:
  params: Any
  opt_state: Any
  step: jax.Array  # i32[]
  cfg: LocatorConfig = flax.struct.field(pytree_node=False)


def init(key: jax.Array, cfg: LocatorConfig, frame_shape: tuple[int, int, int]) -> LocatorState:
  if len(frame_shape) != 3 or frame_shape[-1] != 3:
    raise ValueError(f"frame_shape must be (H, W, 3), got {frame_shape}")
  params = LocatorNet(cfg).init(key, jnp.zeros((1,) + tuple(frame_shape), jnp.uint8))
  return LocatorState(params, optax.adam(cfg.lr).init(params), jnp.zeros((), jnp.int32), cfg)


def locate(params, cfg: LocatorConfig, frames: jax.Array, soft: bool = False):
  return LocatorNet(cfg).apply(params, frames, soft)


def loss(params, cfg: LocatorConfig, first: jax.Array, last: jax.Array, moves: jax.Array,
         entropy_weight: jax.Array | float | None = None):
  """The moves' variance left after the best linear map from the location change (first →
  last) to the summed moves f32[B, C], as a fraction of their variance; metrics also carry
  the fitted map's gain (the location change per unit of move, a sanity check on scale)."""
  chex.assert_equal_shape([first, last])
  chex.assert_shape(moves, (first.shape[0], None))
  (end, end_entropy), (start, start_entropy) = (locate(params, cfg, last, soft=True),
                                                locate(params, cfg, first, soft=True))
  change = end - start  # [B, 2]
  gram = change.T @ change + cfg.ridge * jnp.eye(2)
  mapping = jnp.linalg.solve(gram, change.T @ moves)  # [2, C]
  residual = moves - change @ mapping
  spread = jnp.sum(jnp.square(moves - moves.mean(0))) + 1e-6
  unexplained = jnp.sum(jnp.square(residual)) / spread
  entropy = 0.5 * jnp.mean(end_entropy + start_entropy)
  weight = cfg.entropy_weight if entropy_weight is None else entropy_weight
  return unexplained + weight * entropy, {
      "explained": 1.0 - unexplained, "entropy": entropy,
      "mean_change": jnp.mean(jnp.linalg.norm(change, axis=-1))}


@functools.partial(jax.jit, donate_argnums=0)
def update(state: LocatorState, first: jax.Array, last: jax.Array, moves: jax.Array):
  (value, metrics), grads = jax.value_and_grad(loss, has_aux=True)(
      state.params, state.cfg, first, last, moves,
      state.cfg.entropy_weight * jnp.minimum(1.0, state.step / max(state.cfg.entropy_warmup, 1)))
  updates, opt_state = optax.adam(state.cfg.lr).update(grads, state.opt_state, state.params)
  return state.replace(params=optax.apply_updates(state.params, updates), opt_state=opt_state,
                       step=state.step + 1), dict(metrics, loss=value)


def windows(moves: Sequence[np.ndarray], valid: Sequence[np.ndarray] | None,
            gap: int) -> np.ndarray:
  """i64[N, 2] (video index, first frame) of every `gap`-frame window whose moves are all
  valid (the move of frame t is made between frames t and t + 1; `valid` None: all are)."""
  if valid is None:
    valid = [np.ones(len(m), bool) for m in moves]
  found = []
  for v, (video_moves, video_valid) in enumerate(zip(moves, valid)):
    if len(video_valid) != len(video_moves):
      raise ValueError(f"video {v}: {len(video_valid)} valid flags beside "
                       f"{len(video_moves)} moves")
    invalid = np.concatenate([[0], np.cumsum(~np.asarray(video_valid, bool))])
    starts = np.arange(max(len(video_moves) - gap, 0))
    ok = starts[invalid[starts + gap] - invalid[starts] == 0]
    found.append(np.stack([np.full(len(ok), v), ok], -1))
  return np.concatenate(found).astype(np.int64) if found else np.zeros((0, 2), np.int64)


def fit(state: LocatorState, videos: Sequence[np.ndarray], moves: Sequence[np.ndarray],
        valid: Sequence[np.ndarray] | None, num_steps: int, rng: np.random.Generator,
        batch: int = 32, log_fn: Callable[[int, dict], None] | None = None,
        log_every: int = 50):
  """`num_steps` updates on pairs of frames `gap` apart drawn uniformly from the videos'
  valid windows: videos uint8[T, H, W, 3], moves f32[T, C] and valid bool[T] per video
  (`valid` None: every move is);
  returns (state, last metrics as floats)."""
  gap = state.cfg.gap
  found = windows(moves, valid, gap)
  if not len(found):
    raise ValueError(f"no window of {gap} valid moves in {len(videos)} videos")
  summed = [np.concatenate([np.zeros((1, m.shape[1]), np.float64), np.cumsum(m, 0)])
            for m in moves]
  metrics = {}
  for step in range(num_steps):
    chosen = found[rng.integers(0, len(found), size=batch)]
    first = np.stack([videos[v][t] for v, t in chosen])
    last = np.stack([videos[v][t + gap] for v, t in chosen])
    moved = np.stack([summed[v][t + gap] - summed[v][t] for v, t in chosen]).astype(np.float32)
    state, metrics = update(state, first, last, moved)
    if log_fn is not None and (step + 1) % log_every == 0:
      log_fn(step + 1, jax.tree.map(float, metrics))
  return state, jax.tree.map(float, metrics)


def crop(frames: jax.Array, centres: jax.Array, fraction: float) -> jax.Array:
  """uint8 [N, H, W, 3]: the square of `fraction` of each frame's side centred on centres
  f32[N, 2] ((row, column) in [−1, 1], the frame's corners at ±1), resampled to H × W
  bilinearly; what lies outside the frame is black."""
  chex.assert_rank(frames, 4)
  n, height, width, _ = frames.shape
  chex.assert_shape(centres, (n, 2))
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"crop fraction must be in (0, 1], got {fraction}")

  def one(frame, centre):
    # Output pixel i samples the input at centre + fraction · (its offset from the middle),
    # both in pixel coordinates where the corners' pixel centres are 0 and size − 1.
    rows = (centre[0] + 1.0) * 0.5 * (height - 1) + fraction * (
        jnp.arange(height) - 0.5 * (height - 1))
    columns = (centre[1] + 1.0) * 0.5 * (width - 1) + fraction * (
        jnp.arange(width) - 0.5 * (width - 1))
    grid = jnp.meshgrid(rows, columns, indexing="ij")
    channels = [jax.scipy.ndimage.map_coordinates(frame[..., c].astype(jnp.float32), grid,
                                                  order=1, mode="constant", cval=0.0)
                for c in range(frame.shape[-1])]
    return jnp.stack(channels, -1)

  cut = jax.vmap(one)(frames, centres)
  return jnp.clip(jnp.round(cut), 0, 255).astype(jnp.uint8)
