"""Reward from video: a per-frame score f(x) whose change is the reward,
`rewards[t] = (f(x[t+1]) − f(x[t])) · scale`, trained with one of two objectives
(`RewardConfig.objective`):

- "returns" (the default): where some videos carry the game's own per-step reward (a
  labelled subset, as the IDM's actions: recordings made through the bridge or with
  `experiments/label_chunks.py`, the ground truth's `attach_labels`; the chunk key
  `game_rewards`), f is regressed so that f(x[t+k]) − f(x[t]) equals the game's return over
  those k steps, k uniform in 1…`return_gap` (Huber loss). f is a potential of what the
  frames show (a HUD's health, XP, level): the reward it gives has no drift, a video's
  return is f(end) − f(start), and the labelled 10% teaches it what the other 90% shows.
  Pairs get the same colour shuffle and brightness (`augment`) so a palette cannot stand in
  for the HUD.
  A potential cannot charge for time spent in a state whose frames repeat (holding a move
  into a wall, idling in a menu: f(x[t+k]) − f(x[t]) = 0 there). With `rate`, a second head
  g(x) pays a rate per frame: rewards[t] = f(x[t+1]) − f(x[t]) + g(x[t]), and a pair's
  predicted return is f(end) − f(start) + Σ g over its k steps. The sum is estimated from
  one frame drawn inside the pair, k·g(x_u), and a squared error of a noisy estimate would
  also penalise g's spread inside the window (E[(e + noise)²] = e² + var), smearing g
  toward the window's mean; so each pair draws two frames u, v and the loss is the
  double-sampling surrogate ½[ψ(sg e_v)·e_u + ψ(sg e_u)·e_v], e = predicted − true return,
  ψ the Huber gradient (Baird 1995): its gradient is the Huber loss's on the exact sum
  wherever the residuals are within `huber_delta`, and unbiased there.
- "progress" (upstream MetaBonk's, label-free): Bradley–Terry ranking,
  P(better ranks above worse) = σ(f(x_better) − f(x_worse)) (Bradley & Terry 1952), over
  - progress pairs, "later is better": frames i < j of one life (an episode, chunk or the
    part of one between deaths), at least `min_gap` frames apart, uniform over such pairs;
  - death pairs (`death_window` > 0, `death_fraction` of each batch): in a life that ended
    in a death (`mbjax.offline.deaths` finds them in video), a frame among its last
    `death_window` ranks *below* an earlier frame of the same life, and progress pairs
    never reach into that window.
  Progress alone is a clock: whatever drifts with time is paid for, health lost and walls
  reached included; with the death pairs a life that ends in a death ends at its lowest
  score, but neither orders windows or episodes by the game's reward (BonkArena, held out:
  Spearman −0.02 over 15-step windows, 0.21 per episode; BENCHMARKS.md).

Network: the IDM's `FrameEncoder` (space-to-depth stem, strided 3×3 convolutions, dense,
layer norm) → embedding z (the observation embedding the episode export may use) → score =
dense(tanh(z)), upstream's head. uint8 frames are converted inside the jit.

API (`RewardConfig` is hashable and a static field of `RewardState`):
  init(key, cfg, frame_shape) -> RewardState
  update(state, pairs u8[B, 2 | 4, H, W, 3], returns f32[B] | None, gaps f32[B] | None)
    -> (state, metrics). progress: [:, 0] ranks below [:, 1]; returns: the game's return
    from [:, 0] to [:, 1], `gaps` steps apart; with `rate`, [:, 2:4] are two frames drawn
    from the pair's steps (the rate samples)
  score(params, cfg, frames u8[T, H, W, 3]) -> progress f32[T]   (fixed jitted pieces)
  embed(params, cfg, frames) -> (z f32[T, D], progress f32[T], rate f32[T])
  video_rewards(params, cfg, frames, scale) -> (progress f32[T], rewards f32[T])
  rewards_from_progress(progress, scale, rate=None) -> rewards f32[T]
  sample_pairs / sample_death_pairs / sample_training_pairs / sample_return_pairs / fit:
    host-side pair sampling and a training loop (pairs augmented by
    `deaths.augment_colours`).
  spearman(a, b): rank correlation, for evaluating progress against the truth.

Reward alignment: `rewards[t] = (progress[t+1] − progress[t] + rate[t]) · scale` and the
last reward is 0 — reward t is the outcome of the action chosen on frame t, as in the
environment's recordings and the chunk layout (`mbjax/offline/chunks.py`), and as upstream
labels it.
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

from mbjax.offline import deaths as deaths_lib
from mbjax.offline.idm import FrameEncoder, in_pieces


OBJECTIVES = ("returns", "progress")


@dataclasses.dataclass(frozen=True)
class RewardConfig:
  """Reward-model hyperparameters (hashable: a static jit argument)."""

  objective: str = "returns"  # "returns" (the game's reward, labelled subset) | "progress"
  stem: int = 8  # space-to-depth block of the first layer
  channels: tuple[int, ...] = (32, 64, 64)  # stem width, then one 3×3/2 conv per entry
  embed_dim: int = 256
  pool: str = "mean"  # "mean" (position-invariant) or "flatten"
  return_gap: int = 16  # returns: the frames of a pair are 1…return_gap apart
  huber_delta: float = 1.0  # returns: Huber loss threshold, in reward units
  rate: bool = False  # returns: a per-frame rate g(x) beside the potential (see above)
  # Both frames of a pair get one channel permutation and one brightness factor.
  augment: bool = True
  min_gap: int = 1  # frames between the two frames of a progress pair, at least
  death_window: int = 0  # last frames of a life ended by death that rank below its past
  death_fraction: float = 0.5  # share of each batch that is death pairs (when any died)
  lr: float = 3e-4
  lr_decay_steps: int = 0  # > 0: cosine decay of lr to 0 over this many updates
  weight_decay: float = 1e-4
  max_grad_norm: float = 1.0
  score_batch: int = 32  # frames per jitted scoring piece (fastest of 32/64/128 here)

  def __post_init__(self):
    if self.objective not in OBJECTIVES:
      raise ValueError(f"RewardConfig.objective must be one of {OBJECTIVES}, got "
                       f"{self.objective!r}")
    if self.return_gap < 1 or self.huber_delta <= 0:
      raise ValueError(f"RewardConfig: return_gap must be >= 1 and huber_delta > 0, got "
                       f"{self.return_gap}, {self.huber_delta}")
    if self.rate and self.objective != "returns":
      raise ValueError("RewardConfig.rate is a term of the returns objective; got "
                       f"objective={self.objective!r}")
    if self.min_gap < 1:
      raise ValueError(f"RewardConfig.min_gap must be >= 1, got {self.min_gap}")
    if self.death_window < 0 or not 0.0 <= self.death_fraction < 1.0:
      raise ValueError(f"RewardConfig: death_window must be >= 0 and death_fraction in "
                       f"[0, 1), got {self.death_window}, {self.death_fraction}")
    object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))


class ProgressNet(nn.Module):
  cfg: RewardConfig

  @nn.compact
  def __call__(self, frames: jax.Array):
    """uint8 [N, H, W, 3] → (embedding z f32[N, D], score f32[N], rate f32[N]); the rate is
    0 without `cfg.rate`."""
    cfg = self.cfg
    z = FrameEncoder(cfg.stem, cfg.channels, cfg.embed_dim, cfg.pool, name="encoder")(frames)
    features = jnp.tanh(z)
    score = nn.Dense(1, name="score")(features)[:, 0]
    # Starts at 0: a rate is paid every frame, so an untrained one would drift the returns.
    rate = (nn.Dense(1, kernel_init=nn.initializers.zeros, name="rate")(features)[:, 0]
            if cfg.rate else jnp.zeros_like(score))
    return z, score, rate


@flax.struct.dataclass
class RewardState:
  params: Any
  opt_state: Any
  step: jax.Array  # i32[]
  cfg: RewardConfig = flax.struct.field(pytree_node=False)


def make_optimizer(cfg: RewardConfig) -> optax.GradientTransformation:
  lr = optax.cosine_decay_schedule(cfg.lr, cfg.lr_decay_steps) if cfg.lr_decay_steps else cfg.lr
  return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm),
                     optax.adamw(lr, weight_decay=cfg.weight_decay))


def init(key: jax.Array, cfg: RewardConfig, frame_shape: tuple[int, int, int]) -> RewardState:
  if len(frame_shape) != 3 or frame_shape[-1] != 3:
    raise ValueError(f"frame_shape must be (H, W, 3), got {frame_shape}")
  params = ProgressNet(cfg).init(key, jnp.zeros((1,) + tuple(frame_shape), jnp.uint8))
  return RewardState(params, make_optimizer(cfg).init(params), jnp.zeros((), jnp.int32), cfg)


def bradley_terry_loss(earlier: jax.Array, later: jax.Array) -> jax.Array:
  """Mean −log σ(f_later − f_earlier) over the pairs (softplus form, stable)."""
  return jnp.mean(jax.nn.softplus(earlier - later))


def return_loss(predicted: jax.Array, returns: jax.Array, delta: float) -> jax.Array:
  """Mean Huber loss of predicted against true returns (quadratic within `delta`)."""
  return jnp.mean(optax.huber_loss(predicted, returns, delta=delta))


def double_sampled_return_loss(margin: jax.Array, rate_sums: jax.Array, returns: jax.Array,
                               delta: float) -> jax.Array:
  """Mean ½[ψ(sg e_v)·e_u + ψ(sg e_u)·e_v] with e = margin + rate_sums[:, i] − returns for
  the two independent estimates i = u, v of the rate's sum (f32[B, 2]), ψ = clip(·, ±delta),
  the Huber loss's gradient: a surrogate whose gradient is unbiased where |e| ≤ delta."""
  errors = margin[:, None] + rate_sums - returns[:, None]
  slopes = jax.lax.stop_gradient(jnp.clip(errors, -delta, delta))
  return jnp.mean(0.5 * (slopes[:, 1] * errors[:, 0] + slopes[:, 0] * errors[:, 1]))


def loss(params, cfg: RewardConfig, pairs: jax.Array, returns: jax.Array | None = None,
         gaps: jax.Array | None = None):
  b, frames_per_item = pairs.shape[:2]
  chex.assert_shape(pairs, (b, 4 if cfg.rate else 2, None, None, 3))
  _, scores, rates = ProgressNet(cfg).apply(
      params, pairs.reshape((b * frames_per_item,) + pairs.shape[2:]))
  scores, rates = scores.reshape(b, -1), rates.reshape(b, -1)
  margin = scores[:, 1] - scores[:, 0]
  if cfg.objective == "returns":
    chex.assert_shape(returns, (b,))
    if not cfg.rate:
      return return_loss(margin, returns, cfg.huber_delta), {
          "return_error": jnp.mean(jnp.abs(margin - returns)),
          "return_mean": jnp.mean(returns),
      }
    chex.assert_shape(gaps, (b,))
    rate_sums = gaps[:, None] * rates[:, 2:4]
    predicted = margin + jnp.mean(rate_sums, axis=1)
    return double_sampled_return_loss(margin, rate_sums, returns, cfg.huber_delta), {
        "return_error": jnp.mean(jnp.abs(predicted - returns)),
        "return_mean": jnp.mean(returns),
        "rate_mean": jnp.mean(rates[:, 2:4]),
        "rate_share": jnp.mean(jnp.abs(rate_sums)) / (jnp.mean(jnp.abs(margin)) + 1e-6),
    }
  return bradley_terry_loss(scores[:, 0], scores[:, 1]), {
      "pair_accuracy": jnp.mean((margin > 0).astype(jnp.float32)),
      "margin": jnp.mean(margin),
  }


@functools.partial(jax.jit, donate_argnums=0)
def update(state: RewardState, pairs: jax.Array, returns: jax.Array | None = None,
           gaps: jax.Array | None = None):
  """One AdamW step on pairs uint8[B, 2, H, W, 3]: "progress", [:, 0] ranks below [:, 1];
  "returns", `returns` f32[B] is the game's return from frame [:, 0] to frame [:, 1]; with
  `rate`, pairs carry two more frames, [:, 2:4], drawn from the pair's `gaps` f32[B] steps."""
  (value, metrics), grads = jax.value_and_grad(loss, has_aux=True)(state.params, state.cfg,
                                                                   pairs, returns, gaps)
  updates, opt_state = make_optimizer(state.cfg).update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = dict(metrics, loss=value, grad_norm=optax.tree.norm(grads))
  return state.replace(params=params, opt_state=opt_state, step=state.step + 1), metrics


@functools.partial(jax.jit, static_argnums=1)
def _embed_piece(params, cfg: RewardConfig, frames):
  return ProgressNet(cfg).apply(params, frames)


def embed(params, cfg: RewardConfig, frames) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """uint8[T, H, W, 3] → (embeddings z f32[T, D], progress f32[T], rate f32[T]), jitted in
  fixed pieces of `cfg.score_batch` frames (the last piece padded by repeating its last
  frame)."""
  return tuple(in_pieces(lambda chunk: _embed_piece(params, cfg, chunk), frames,
                         cfg.score_batch))


def score(params, cfg: RewardConfig, frames) -> np.ndarray:
  """Progress f32[T] of every frame of uint8[T, H, W, 3]."""
  return embed(params, cfg, frames)[1]


def video_rewards(params, cfg: RewardConfig, frames,
                  scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
  """(progress f32[T], rewards f32[T]) of a video uint8[T, H, W, 3], the rate included."""
  _, progress, rate = embed(params, cfg, frames)
  return progress, rewards_from_progress(progress, scale, rate)


def rewards_from_progress(progress, scale: float = 1.0, rate=None) -> np.ndarray:
  """rewards[t] = (progress[t+1] − progress[t] + rate[t]) · scale, rewards[T−1] = 0
  (f32[T]; no rate: 0)."""
  progress = np.asarray(progress, np.float32)
  if progress.ndim != 1:
    raise ValueError(f"progress must be f32[T], got shape {progress.shape}")
  rate = np.zeros_like(progress) if rate is None else np.asarray(rate, np.float32)
  if rate.shape != progress.shape:
    raise ValueError(f"rate must match progress {progress.shape}, got {rate.shape}")
  rewards = np.zeros_like(progress)
  rewards[:-1] = (np.diff(progress) + rate[:-1]) * np.float32(scale)
  return rewards


def sample_pairs(rng: np.random.Generator, lengths: Sequence[int], batch: int,
                 min_gap: int = 1):
  """Ordered frame pairs within episodes → (episode i64[B], earlier i64[B], later i64[B]).

  Uniform over all pairs (i, j) of one episode with j − i ≥ min_gap; episodes are drawn in
  proportion to their number of such pairs.
  """
  lengths = np.asarray(lengths, np.int64)
  span = np.maximum(lengths - min_gap, 0)  # pairs: sum_{g>=min_gap} (T − g)
  counts = span * (span + 1) // 2
  if counts.sum() == 0:
    raise ValueError(f"no episode is longer than min_gap={min_gap} (lengths {lengths})")
  episode = rng.choice(len(lengths), size=batch, p=counts / counts.sum())
  # A uniform index into the triangle {(i, k): 0 ≤ i ≤ k < span}, decoded row by row
  # (row k starts at k(k+1)/2); the later frame is k + min_gap.
  index = (rng.random(batch) * counts[episode]).astype(np.int64)
  k = ((np.sqrt(8.0 * index + 1.0) - 1.0) // 2).astype(np.int64)
  k = np.where(k * (k + 1) // 2 > index, k - 1, k)  # float rounding, either way
  k = np.where((k + 1) * (k + 2) // 2 <= index, k + 1, k)
  return episode, index - k * (k + 1) // 2, k + min_gap


def sample_death_pairs(rng: np.random.Generator, lengths: Sequence[int], died: Sequence[bool],
                       batch: int, window: int):
  """Pairs of lives that ended in a death → (life i64[B], worse i64[B], better i64[B]): the
  worse frame uniform over the life's last `window` frames, the better one uniform over
  the frames before them. Lives are drawn uniformly among the dead ones longer than
  `window`."""
  lengths = np.asarray(lengths, np.int64)
  candidates = np.flatnonzero(np.asarray(died, bool) & (lengths > window))
  if not len(candidates):
    raise ValueError(f"no life that ended in a death is longer than death_window={window} "
                     f"(lengths {lengths.tolist()})")
  life = rng.choice(candidates, size=batch)
  worse = lengths[life] - 1 - (rng.random(batch) * window).astype(np.int64)
  better = (rng.random(batch) * (lengths[life] - window)).astype(np.int64)
  return life, worse, better


def sample_training_pairs(rng: np.random.Generator, lengths: Sequence[int],
                          died: Sequence[bool] | None, batch: int, cfg: RewardConfig):
  """A batch of (life, worse, better): progress pairs, and death pairs when
  `cfg.death_window` > 0 and some life died (see the module docstring)."""
  lengths = np.asarray(lengths, np.int64)
  died = np.zeros(len(lengths), bool) if died is None else np.asarray(died, bool)
  if died.shape != lengths.shape:
    raise ValueError(f"died must have one entry per life ({len(lengths)}), got {died.shape}")
  dying = died & (lengths > cfg.death_window) if cfg.death_window else np.zeros_like(died)
  deaths = int(round(batch * cfg.death_fraction)) if dying.any() else 0
  # Progress pairs stay out of the death window: there, later is worse.
  before_death = np.where(dying, lengths - cfg.death_window, lengths)
  parts = [sample_pairs(rng, before_death, batch - deaths, cfg.min_gap)]
  if deaths:
    parts.append(sample_death_pairs(rng, lengths, dying, deaths, cfg.death_window))
  return tuple(np.concatenate(column) for column in zip(*parts))


def sample_return_pairs(rng: np.random.Generator, lengths: Sequence[int], batch: int,
                        max_gap: int):
  """Frame pairs for the "returns" objective → (episode i64[B], start i64[B], end i64[B]):
  an episode drawn in proportion to its length − 1, a gap uniform over 1…min(max_gap,
  length − 1), a start uniform over the frames that leave room for it."""
  lengths = np.asarray(lengths, np.int64)
  if not len(lengths) or lengths.max() < 2:
    raise ValueError(f"need an episode of at least 2 frames (lengths {lengths.tolist()})")
  steps = np.maximum(lengths - 1, 0)
  episode = rng.choice(len(lengths), size=batch, p=steps / steps.sum())
  widest = np.minimum(max_gap, steps[episode])
  gap = 1 + (rng.random(batch) * widest).astype(np.int64)
  start = (rng.random(batch) * (lengths[episode] - gap)).astype(np.int64)
  return episode, start, start + gap


def fit(state: RewardState, episodes: Sequence[np.ndarray], num_steps: int,
        rng: np.random.Generator, batch: int = 32, died: Sequence[bool] | None = None,
        rewards: Sequence[np.ndarray] | None = None,
        log_fn: Callable[[int, dict], None] | None = None, log_every: int = 50,
        data_sharding: NamedSharding | None = None):
  """`num_steps` updates on pairs from in-memory episodes (uint8[T, H, W, 3] each); returns
  (state, last metrics as floats). "progress": the episodes are lives and `died` says which
  of them ended in a death (used when `death_window` > 0); "returns": `rewards` f32[T] per
  episode, the game's reward of each frame's step. `data_sharding`
  (`mbjax.train.sharding.batch_sharding`): each global batch of `batch` pairs is split over
  its mesh and the state replicated there (data-parallel, as `idm_training.fit`)."""
  cfg = state.cfg
  lengths = [e.shape[0] for e in episodes]
  if cfg.objective == "returns":
    if rewards is None or [len(r) for r in rewards] != lengths:
      raise ValueError("fit: the returns objective needs `rewards`, one f32[T] per episode "
                       f"of the same length (episodes {lengths}, rewards "
                       f"{None if rewards is None else [len(r) for r in rewards]})")
    # returns[k] = sum of rewards[:k]: a pair's return is one subtraction.
    cumulative = [np.concatenate([[0.0], np.cumsum(r, dtype=np.float64)]) for r in rewards]
  if data_sharding is not None:
    state = jax.device_put(state, NamedSharding(data_sharding.mesh, P()))
  metrics = {}
  for step in range(num_steps):
    returns = gaps = None
    if cfg.objective == "returns":
      ids, first, second = sample_return_pairs(rng, lengths, batch, cfg.return_gap)
      returns = np.array([cumulative[e][j] - cumulative[e][i]
                          for e, i, j in zip(ids, first, second)], np.float32)
      returns = jax.device_put(returns, data_sharding)
    else:
      ids, first, second = sample_training_pairs(rng, lengths, died, batch, cfg)
    indices = [first, second]
    if cfg.rate:  # two frames drawn from each pair's steps first … second − 1
      indices += [first + (rng.random(batch) * (second - first)).astype(np.int64)
                  for _ in range(2)]
      gaps = jax.device_put((second - first).astype(np.float32), data_sharding)
    pairs = np.stack([np.stack([episodes[e][i] for i in item])
                      for e, *item in zip(ids, *indices)])
    if cfg.augment:
      pairs = deaths_lib.augment_colours(rng, pairs)
    state, metrics = update(state, jax.device_put(pairs, data_sharding), returns, gaps)
    if log_fn is not None and (step + 1) % log_every == 0:
      log_fn(step + 1, jax.tree.map(float, metrics))
  return state, jax.tree.map(float, metrics)


def _ranks(x: np.ndarray) -> np.ndarray:
  """Ranks 0..n−1, ties sharing their mean rank."""
  order = np.argsort(x, kind="stable")
  ranks = np.empty(len(x), np.float64)
  ranks[order] = np.arange(len(x))
  _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
  sums = np.bincount(inverse, weights=ranks)
  return (sums / counts)[inverse]


def spearman(a, b) -> float:
  """Spearman rank correlation of two 1-D sequences (NaN when either is constant)."""
  a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
  if a.shape != b.shape:
    raise ValueError(f"spearman: shapes differ, {a.shape} vs {b.shape}")
  ra, rb = _ranks(a), _ranks(b)
  ra, rb = ra - ra.mean(), rb - rb.mean()
  denom = np.sqrt(np.sum(ra * ra) * np.sum(rb * rb))
  return float(np.sum(ra * rb) / denom) if denom > 0 else float("nan")
