"""Episode ends from video: a per-frame end-of-life classifier that needs no labels.

A gameplay video stops for one of two reasons: the player died, or the recording stopped
(a time limit, a cut). A game shows a death: a death screen (BonkArena draws the state the
killing hit leaves as one, `mbjax.envs.bonk_arena.render`, and its recordings end on that
frame), while the frames before a cut look like any other frame. So a classifier trained
to tell "one of the last `end_frames` frames of its video" from every other frame learns
what a death looks like, and stays unsure where a video was only cut: nothing tells those
last frames from the frames before them. No death labels are needed, only whole videos (or
chunks whose `last_chunk` says the video ended there). `end_frames` is the number of frames
a death is shown for at the end of a video (1 for BonkArena's recordings; without a death
screen, the last few frames before a death share at most an empty health bar and an enemy
on the player, docs/experiments/2026-12-06-deaths-and-video-reward.md).

Net: the IDM's `FrameEncoder` (mean pooling by default: a death screen covers the frame, and
a position-invariant net cannot learn where the few dying training videos' other sprites
were; "flatten" reads a HUD element where it is drawn) → dense → logit. Training batches
hold `positive_fraction` end frames (they are rare: 1 of ~1,000 per video), the rest drawn
uniformly from the other frames; the loss is the sigmoid cross-entropy. With a few dozen
dying videos the classifier readily keys on what else those frames share (a palette, an
early-game look), so training frames get their colour channels shuffled and their brightness
scaled (`augment`). `terminals_from_probs` turns per-frame probabilities into terminal
flags: each run of frames at or above `threshold` ends a life at its last frame, so a death
shown for several frames is marked once, at the last frame of the life's video (BonkArena:
the death screen, one frame after the step whose action ended the episode, `terminated[t]`
in the recordings' layout).

API (`DeathConfig` is hashable and a static field of `DeathState`):
  init(key, cfg, frame_shape) -> DeathState
  update(state, frames u8[B, H, W, 3], targets f32[B]) -> (state, metrics)
  probabilities(params, cfg, frames u8[T, H, W, 3]) -> f32[T]   (fixed jitted pieces)
  terminals_from_probs(probs f32[T], threshold) -> bool[T]
  sample_batch / augment_colours / fit: host-side sampling, augmentation, a training loop.
  match_terminals(predicted, true, tolerance): detected / missed deaths and false terminals.
What was tried and measured: docs/experiments/2026-12-06-deaths-and-video-reward.md.
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

from mbjax.offline.idm import FrameEncoder, in_pieces


@dataclasses.dataclass(frozen=True)
class DeathConfig:
  """End-of-life classifier hyperparameters (hashable: a static jit argument)."""

  stem: int = 8  # space-to-depth block of the first layer
  channels: tuple[int, ...] = (32, 64, 64)  # stem width, then one 3×3/2 conv per entry
  embed_dim: int = 128
  pool: str = "mean"  # "flatten" if where something is drawn matters
  end_frames: int = 1  # the last frames of a video that count as its end (its death screen)
  positive_fraction: float = 0.25  # share of each training batch drawn from end frames
  threshold: float = 0.9  # probability at which a frame ends a life
  # Training frames get their colour channels shuffled and their brightness scaled, so that
  # colour (a palette, a level's look) cannot stand in for what a death looks like.
  augment: bool = True
  lr: float = 3e-4
  weight_decay: float = 1e-4
  max_grad_norm: float = 1.0
  score_batch: int = 64  # frames per jitted scoring piece

  def __post_init__(self):
    if self.end_frames < 1:
      raise ValueError(f"DeathConfig.end_frames must be >= 1, got {self.end_frames}")
    if not 0.0 < self.positive_fraction < 1.0:
      raise ValueError(f"DeathConfig.positive_fraction must be in (0, 1), got "
                       f"{self.positive_fraction}")
    if not 0.0 < self.threshold < 1.0:
      raise ValueError(f"DeathConfig.threshold must be in (0, 1), got {self.threshold}")
    object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))


class EndOfLifeNet(nn.Module):
  cfg: DeathConfig

  @nn.compact
  def __call__(self, frames: jax.Array) -> jax.Array:
    """uint8 [N, H, W, 3] → logit f32[N] of "this frame ends a life"."""
    cfg = self.cfg
    z = FrameEncoder(cfg.stem, cfg.channels, cfg.embed_dim, cfg.pool, name="encoder")(frames)
    return nn.Dense(1, name="logit")(nn.relu(z))[:, 0]


@flax.struct.dataclass
class DeathState:
  params: Any
  opt_state: Any
  step: jax.Array  # i32[]
  cfg: DeathConfig = flax.struct.field(pytree_node=False)


def make_optimizer(cfg: DeathConfig) -> optax.GradientTransformation:
  return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm),
                     optax.adamw(cfg.lr, weight_decay=cfg.weight_decay))


def init(key: jax.Array, cfg: DeathConfig, frame_shape: tuple[int, int, int]) -> DeathState:
  if len(frame_shape) != 3 or frame_shape[-1] != 3:
    raise ValueError(f"frame_shape must be (H, W, 3), got {frame_shape}")
  params = EndOfLifeNet(cfg).init(key, jnp.zeros((1,) + tuple(frame_shape), jnp.uint8))
  return DeathState(params, make_optimizer(cfg).init(params), jnp.zeros((), jnp.int32), cfg)


def loss(params, cfg: DeathConfig, frames: jax.Array, targets: jax.Array):
  chex.assert_rank(frames, 4)
  chex.assert_shape(targets, (frames.shape[0],))
  logits = EndOfLifeNet(cfg).apply(params, frames)
  value = jnp.mean(optax.sigmoid_binary_cross_entropy(logits, targets))
  predicted = logits > 0
  positive = targets > 0.5
  recall = jnp.sum(predicted & positive) / jnp.maximum(jnp.sum(positive), 1)
  false_rate = jnp.sum(predicted & ~positive) / jnp.maximum(jnp.sum(~positive), 1)
  return value, {"recall": recall, "false_positive_rate": false_rate}


@functools.partial(jax.jit, donate_argnums=0)
def update(state: DeathState, frames: jax.Array, targets: jax.Array):
  """One AdamW step on frames uint8[B, H, W, 3] with targets f32[B] (1: a video's end)."""
  (value, metrics), grads = jax.value_and_grad(loss, has_aux=True)(state.params, state.cfg,
                                                                   frames, targets)
  updates, opt_state = make_optimizer(state.cfg).update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = dict(metrics, loss=value, grad_norm=optax.tree.norm(grads))
  return state.replace(params=params, opt_state=opt_state, step=state.step + 1), metrics


@functools.partial(jax.jit, static_argnums=1)
def _probabilities_piece(params, cfg: DeathConfig, frames):
  return jax.nn.sigmoid(EndOfLifeNet(cfg).apply(params, frames))


def probabilities(params, cfg: DeathConfig, frames) -> np.ndarray:
  """P(frame ends a life) f32[T] of uint8[T, H, W, 3], jitted in fixed pieces of
  `cfg.score_batch` frames (the last piece padded by repeating its last frame)."""
  return in_pieces(lambda chunk: _probabilities_piece(params, cfg, chunk), frames,
                   cfg.score_batch)


def terminals_from_probs(probs, threshold: float) -> np.ndarray:
  """bool[T]: True at the last frame of every run of frames with probs ≥ threshold."""
  probs = np.asarray(probs)
  if probs.ndim != 1:
    raise ValueError(f"probs must be f32[T], got shape {probs.shape}")
  above = probs >= threshold
  next_above = np.append(above[1:], False)
  return above & ~next_above


def sample_batch(rng: np.random.Generator, lengths: Sequence[int], batch: int,
                 end_frames: int, positive_fraction: float, ends: Sequence[bool] | None = None):
  """(video i64[B], frame i64[B], target f32[B]): round(B · positive_fraction) frames among
  the last `end_frames` of the videos whose `ends` is True (all by default; a video cut
  short of its end has none), target 1, the rest uniform over every other frame, target 0."""
  lengths = np.asarray(lengths, np.int64)
  ends = np.ones(len(lengths), bool) if ends is None else np.asarray(ends, bool)
  if ends.shape != lengths.shape:
    raise ValueError(f"ends must have one entry per video ({len(lengths)}), got {ends.shape}")
  tail = np.where(ends, np.minimum(lengths, end_frames), 0)
  body = lengths - tail
  if tail.sum() == 0 or body.sum() == 0:
    raise ValueError(f"need end frames and other frames; lengths {lengths.tolist()}, "
                     f"video ends {ends.tolist()}, end_frames {end_frames}")
  positives = int(round(batch * positive_fraction))
  videos, frames = [], []
  for count, weights, first in ((positives, tail, body), (batch - positives, body, 0 * body)):
    v = rng.choice(len(lengths), size=count, p=weights / weights.sum())
    videos.append(v)
    frames.append(first[v] + (rng.random(count) * weights[v]).astype(np.int64))
  targets = np.concatenate([np.ones(positives, np.float32),
                            np.zeros(batch - positives, np.float32)])
  return np.concatenate(videos), np.concatenate(frames), targets


def augment_colours(rng: np.random.Generator, frames: np.ndarray) -> np.ndarray:
  """uint8[B, ..., 3] (frames [B, H, W, 3], or groups of frames such as pairs
  [B, 2, H, W, 3]) with each item's channels permuted and scaled by one factor in [0.7, 1.3]
  (clipped), the same for every frame of an item."""
  items = (len(frames),) + (1,) * (frames.ndim - 2)
  order = np.argsort(rng.random((len(frames), 3)), axis=1).reshape(items + (3,))
  shuffled = np.take_along_axis(frames, order, axis=-1)
  scale = rng.uniform(0.7, 1.3, items + (1,))
  return np.clip(shuffled * scale, 0, 255).astype(np.uint8)


def fit(state: DeathState, videos: Sequence[np.ndarray], num_steps: int,
        rng: np.random.Generator, batch: int = 64, ends: Sequence[bool] | None = None,
        log_fn: Callable[[int, dict], None] | None = None, log_every: int = 50,
        data_sharding: NamedSharding | None = None):
  """`num_steps` updates on frames of in-memory videos (uint8[T, H, W, 3] each; `ends`: which
  of them really end where they stop); returns (state, last metrics as floats)."""
  if data_sharding is not None:
    state = jax.device_put(state, NamedSharding(data_sharding.mesh, P()))
  lengths = [len(v) for v in videos]
  cfg, metrics = state.cfg, {}
  for step in range(num_steps):
    ids, index, targets = sample_batch(rng, lengths, batch, cfg.end_frames,
                                       cfg.positive_fraction, ends)
    frames = np.stack([videos[v][i] for v, i in zip(ids, index)])
    if cfg.augment:
      frames = augment_colours(rng, frames)
    state, metrics = update(state, jax.device_put(frames, data_sharding),
                            jax.device_put(targets, data_sharding))
    if log_fn is not None and (step + 1) % log_every == 0:
      log_fn(step + 1, jax.tree.map(float, metrics))
  return state, jax.tree.map(float, metrics)


def match_terminals(predicted, true, tolerance: int) -> dict:
  """Scores predicted terminal flags bool[T] against true ones: a true death at t counts as
  detected when a predicted terminal lies in [t − tolerance, t + tolerance]; a predicted
  terminal farther than that from every true death is a false terminal."""
  predicted, true = np.flatnonzero(predicted), np.flatnonzero(true)
  near = lambda a, b: (np.abs(a[:, None] - b[None, :]) <= tolerance).any(axis=1)
  detected = near(true, predicted) if len(predicted) else np.zeros(len(true), bool)
  false = ~near(predicted, true) if len(true) else np.ones(len(predicted), bool)
  return {"deaths": int(len(true)), "detected": int(detected.sum()),
          "false_terminals": int(false.sum()), "predicted": int(len(predicted))}
