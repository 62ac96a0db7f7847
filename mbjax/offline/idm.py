"""Inverse dynamics model (IDM): the network that labels every frame of a video with the
hybrid action taken on it, from a non-causal window of frames around it (VPT, Baker et al.
2022), and its hyperparameters. Training it is `mbjax.offline.idm_training`; labelling videos
with it and scoring the labels, `mbjax.offline.idm_labelling`.

Architecture. A window of W = `cfg.window` frames (odd, centred on t: (W−1)/2 before and
after) predicts the action chosen on frame t, whose effect shows in frame t+1.
  * Per frame, once: space-to-depth by `stem` (each stem×stem patch becomes one vector, so
    the first layer is a stem×stem / stride-stem convolution done as one matmul; uint8 →
    float happens inside the jit) → the stem map. `FrameEncoder` continues with 3×3
    stride-2 convolutions, flatten and dense → a frame embedding (where things are: the
    menu, its cards, the HUD).
  * Per pair of consecutive frames, once: `MotionEncoder` compares the two frames' stem
    maps (`motion_input="stem"`, the default) or raw patch vectors ("patches": 6× the
    first-layer cost) and their difference with a 1×1 layer, then 3×3 stride-2
    convolutions, mean and max pooled over space → a motion vector that is translation
    invariant (a displacement reads the same wherever it happens). With
    `motion_input="cost_volume"` the 1×1 layer also reads a parameter-free cost volume
    computed from the full-resolution frames before any striding (`cost_volume`: squared
    luma differences for every displacement up to ± `motion_radius` pixels of a grid
    pooled to `cost_grid` pixels a side — half resolution by default — averaged per stem
    cell), and the encoder adds `flow_heads` soft-arg-min flow estimates pooled by learned
    attention over the cells (see `MotionEncoder`). On BonkArena the stem map loses the
    player's ~1.6 px per frame in its patches; the cost volume reads it, once the attention
    starts from where something changed (uniform attention averages the one moving sprite
    away), and best at full resolution (BENCHMARKS.md "Offline video pipeline";
    docs/experiments/2026-11-26-offline-idm-and-reward-model.md).
  * Per window: `TemporalHead` reads the W embeddings and W−1 motion vectors; the
    continuous head reads only the motion vectors (`continuous_from_motion`, default), so
    it cannot fit the move from where things are in the frame — with a few thousand
    labelled frames a head that could, did, and did not generalise — and the branch heads
    read everything.
Labelling a chunk of T frames therefore costs T frame passes, T pair passes and T small
window heads (`idm_labelling.label` encodes the edge-padded chunk once and slides the window
over the results). Upstream MetaBonk instead encoded each window's 7 frames anew and
concatenated 7×36,864 features into a 66M-parameter dense layer.

`IDMConfig` (which also holds the training hyperparameters) and the `HybridActionSpec` are
hashable, so they are static jit arguments; all shapes are static.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mbjax.envs.spaces import HybridActionSpec


MOTION_INPUTS = ("stem", "patches", "cost_volume")


@dataclasses.dataclass(frozen=True)
class IDMConfig:
  """IDM hyperparameters (hashable: a static jit argument)."""

  window: int = 7  # frames per window, odd, centred on the labelled frame
  stem: int = 8  # space-to-depth block: the first layer sees stem × stem patches
  channels: tuple[int, ...] = (32, 64, 64)  # stem width, then one 3×3/2 conv per entry
  embed_dim: int = 256  # per-frame embedding
  motion_channels: tuple[int, ...] = (32, 64, 64)  # motion encoder: 1×1 mix, then 3×3/2 convs
  motion_input: str = "stem"  # what the motion encoder compares: "stem" maps, raw "patches",
  #                             or stem maps plus a full-resolution "cost_volume"
  motion_radius: int = 3  # "cost_volume": displacements up to ± this many matching-grid
  #                         pixels per axis
  cost_grid: int = 0  # "cost_volume": side of the matching grid in pixels; frames are
  #                     mean-pooled by round(frame side / cost_grid) before matching, so a
  #                     move spans the same grid distance, and the radius covers the same
  #                     moves, at any frame size (0: half resolution at every size)
  flow_heads: int = 4  # "cost_volume": attention-pooled flow estimates per frame pair
  hidden: int = 256  # temporal head width
  continuous_from_motion: bool = True  # the continuous head reads only the motion vectors
  shift: int = 4  # training augmentation: each clip rolled by up to ± shift pixels (0: off)
  symmetry_fraction: float = 0.0  # training clips mirrored/transposed (`random_symmetry`)
  motion_fraction: float = 0.0  # share of each training batch placed on frames with a
  #                               visible move (continuous_valid), see `fit`
  lr: float = 1e-3
  lr_decay_steps: int = 0  # > 0: cosine decay of lr to 0 over this many updates (set it to
  #                          the number of training steps; the last iterate is then stable)
  weight_decay: float = 1e-4
  max_grad_norm: float = 1.0
  discrete_weight: float = 1.0  # weight of the summed branch cross-entropies
  label_batch: int = 32  # frames per jitted labelling piece (fastest of 32/64/128 here)

  def __post_init__(self):
    if self.window < 3 or self.window % 2 == 0:
      raise ValueError(f"IDMConfig.window must be odd and >= 3 (motion needs two frames), "
                       f"got {self.window}")
    if self.stem < 1 or not self.channels:
      raise ValueError(f"IDMConfig.stem must be >= 1 and channels non-empty, got "
                       f"stem={self.stem}, channels={self.channels}")
    object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
    object.__setattr__(self, "motion_channels", tuple(int(c) for c in self.motion_channels))
    if self.motion_input not in MOTION_INPUTS:
      raise ValueError(f"IDMConfig.motion_input must be one of {MOTION_INPUTS}, got "
                       f"{self.motion_input!r}")

  @property
  def context(self) -> int:
    """Frames on each side of the centre."""
    return self.window // 2


# -- networks ---------------------------------------------------------------------------


def space_to_depth(x: jax.Array, block: int) -> jax.Array:
  """[..., H, W, C] → [..., H/block, W/block, block·block·C] (H, W divisible by block)."""
  *lead, h, w, c = x.shape
  if h % block or w % block:
    raise ValueError(f"frame size {h}x{w} must be divisible by the stem block {block}")
  x = x.reshape(*lead, h // block, block, w // block, block, c)
  x = jnp.swapaxes(x, -4, -3)
  return x.reshape(*lead, h // block, w // block, block * block * c)


def _conv_stack(x: jax.Array, convs) -> jax.Array:
  for conv in convs:
    x = nn.relu(conv(x))
  return x


def in_pieces(fn: Callable[[np.ndarray], Any], frames, piece: int):
  """`fn` (jitted, per-frame outputs) over video frames uint8[T, H, W, 3] in pieces of
  `piece` frames — one shape to compile, the last piece padded by repeating its last frame
  — and its outputs (a pytree of [T, ...] arrays) gathered on the host."""
  frames = np.asarray(frames)
  if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or not len(frames):
    raise ValueError(f"frames must be uint8[T >= 1, H, W, 3], got {frames.dtype}"
                     f"{list(frames.shape)}")
  pieces = []
  for start in range(0, len(frames), piece):
    chunk = frames[start:start + piece]
    n = len(chunk)
    if n < piece:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], piece - n, 0)])
    pieces.append(jax.tree.map(lambda x, n=n: np.asarray(x)[:n], fn(chunk)))
  return jax.tree.map(lambda *xs: np.concatenate(xs), *pieces)


class FrameEncoder(nn.Module):
  """uint8 frames [N, H, W, 3] → f32 [N, embed_dim]; `stem_map` gives the first layer's
  feature map [N, H/stem, W/stem, channels[0]].

  The first layer is a stem×stem, stride-stem convolution done as space-to-depth + dense;
  the uint8 → float conversion happens after that shuffle, inside the jit. Then one 3×3
  stride-2 convolution per further entry of `channels`, and `pool`: "flatten" keeps where
  things are, "mean" averages over space (position-invariant).
  """

  stem: int
  channels: Sequence[int]
  embed_dim: int
  pool: str = "flatten"

  def setup(self):
    if self.pool not in ("flatten", "mean"):
      raise ValueError(f"FrameEncoder.pool must be 'flatten' or 'mean', got {self.pool!r}")
    self.stem_dense = nn.Dense(self.channels[0])
    self.convs = [nn.Conv(c, (3, 3), (2, 2)) for c in self.channels[1:]]
    self.embed = nn.Dense(self.embed_dim)
    self.norm = nn.LayerNorm()

  def patches(self, frames: jax.Array) -> jax.Array:
    """uint8 [N, H, W, 3] → f32 [N, H/stem, W/stem, stem·stem·3] in [0, 1]."""
    chex.assert_rank(frames, 4)
    return space_to_depth(frames, self.stem).astype(jnp.float32) * (1.0 / 255.0)

  def stem_map(self, patches: jax.Array) -> jax.Array:
    return nn.relu(self.stem_dense(patches))

  def embed_map(self, x: jax.Array) -> jax.Array:
    x = _conv_stack(x, self.convs)
    x = x.mean(axis=(1, 2)) if self.pool == "mean" else x.reshape(x.shape[0], -1)
    return self.norm(self.embed(x))

  def __call__(self, frames: jax.Array) -> jax.Array:
    return self.embed_map(self.stem_map(self.patches(frames)))


class MotionEncoder(nn.Module):
  """Two consecutive maps [N, h, w, c] (stem maps or patch vectors), optionally with their
  matching costs [N, h, w, D] (`cost_volume`) → a motion vector f32[N, M].

  A 1×1 layer over (a, b, b − a[, costs]) and 3×3 stride-2 convolutions see local changes
  anywhere in the frame; mean and max pooling over space make the result translation
  invariant (a sprite's displacement reads the same wherever it happens), which is what
  lets a few thousand labelled frames generalise: M = 2·channels[-1].

  With costs, each cell also gets a flow estimate, the soft arg-min of its costs (the
  expected displacement under softmax(−β·cost / mean cost), β learned from 8; Kendall et
  al. 2017; the normalisation makes it independent of the cell's contrast, a flat cell
  reads 0), and `flow_heads` attention maps over the cells (softmax over space of a 1×1
  layer on the same inputs plus the log of the cell's cost of not moving, so attention
  starts where something changed) pool it into one (dx, dy) each: M = 2·channels[-1] +
  2·flow_heads. Which cells to trust (the player's sprite, or the scrolling floor of a
  following camera) is all that is left to learn; the displacement itself is measured.
  """

  channels: Sequence[int]
  flow_heads: int = 4

  @nn.compact
  def __call__(self, a: jax.Array, b: jax.Array, costs: jax.Array | None = None) -> jax.Array:
    pair = jnp.concatenate([a, b, b - a] + ([] if costs is None else [costs]), -1)
    x = nn.relu(nn.Dense(self.channels[0], name="mix")(pair))
    x = _conv_stack(x, [nn.Conv(c, (3, 3), (2, 2), name=f"conv_{i}")
                        for i, c in enumerate(self.channels[1:])])
    out = [x.mean(axis=(1, 2)), x.max(axis=(1, 2))]
    if costs is not None:
      n, h, w, d = costs.shape
      r = (int(round(d ** 0.5)) - 1) // 2
      steps = np.arange(-r, r + 1, dtype=np.float32)
      grid = np.stack(np.meshgrid(steps, steps, indexing="ij"), -1).reshape(-1, 2)[:, ::-1]
      log_beta = self.param("log_beta", nn.initializers.constant(np.log(8.0)), ())
      relative = costs / (costs.mean(axis=-1, keepdims=True) + 1e-4)
      flow = jax.nn.softmax(-jnp.exp(log_beta) * relative, axis=-1) @ grid  # [N, h, w, 2]
      # Start from attending where something changed (the cost of d = 0 above the best):
      # a moving sprite among static cells is found at once, the rest is learned.
      change = jnp.log(costs[..., (d - 1) // 2] + 1e-3)[..., None]
      attention = (nn.Dense(self.flow_heads, name="attention")(pair) + change).reshape(
          n, h * w, -1)
      attention = jax.nn.softmax(attention, axis=1)
      out.append(jnp.einsum("npk,npc->nkc", attention, flow.reshape(n, h * w, 2))
                 .reshape(n, -1))
    return jnp.concatenate(out, -1)


def matching_pool(cfg: IDMConfig, side: int) -> int:
  """The mean-pooling factor of `cost_volume` for frames `side` pixels high (`cfg.cost_grid`)."""
  return 2 if cfg.cost_grid == 0 else max(1, round(side / cfg.cost_grid))


def matching_map(frames: jax.Array, pool: int) -> jax.Array:
  """f32[N, H, W, 3] in [0, 1] → the luma of each frame, pool × pool mean-pooled:
  f32[N, H / pool, W / pool] (what `cost_volume` compares)."""
  n, h, w, _ = frames.shape
  luma = jnp.asarray([0.299, 0.587, 0.114], frames.dtype)
  return jnp.dot(frames, luma).reshape(n, h // pool, pool, w // pool, pool).mean(axis=(2, 4))


def cost_volume(a: jax.Array, b: jax.Array, radius: int, cell: int, pool: int = 2
                ) -> jax.Array:
  """Matching costs of frame `b` against frame `a` (f32[N, H, W, 3] in [0, 1]) for every
  displacement d in [−radius, radius]² on a grid pooled by `pool`: both frames are turned
  to luma and pool × pool mean-pooled, then the mean of (a(x) − b(x + d))² over each cell
  of `cell` × `cell` full-resolution pixels, minus the cell's lowest cost →
  f32[N, H/cell, W/cell, (2·radius + 1)²] (dy-major; d in pooled pixels).

  A thing that moved by d between the frames matches at d (FlowNetC's correlation layer,
  Dosovitskiy et al. 2015, with squared differences); with anti-aliased frames the costs
  around the best integer d also encode the sub-pixel part. No parameters: every cell sees
  the same comparison, and the network only learns to read it. Pooling and luma keep it
  cheap on a CPU (the (2r + 1)² shifted copies dominate); `b` is edge-padded.
  """
  _check_cells(a.shape[1], a.shape[2], cell, pool)
  return map_cost_volume(matching_map(a, pool), matching_map(b, pool), radius, cell // pool)


def _check_cells(h: int, w: int, cell: int, pool: int) -> None:
  if h % cell or w % cell or cell % pool:
    raise ValueError(f"cost_volume: frame {h}x{w} must divide into cells of {cell}, and the "
                     f"cells into pools of {pool}")


def map_cost_volume(a: jax.Array, b: jax.Array, radius: int, cell: int) -> jax.Array:
  """`cost_volume` of two `matching_map`s f32[N, h, w], with cells of `cell` map pixels.
  Sequences map each frame once and compare neighbours (`IDMNet`), rather than mapping
  every frame twice, once per pair it is in. Pairs are compared one at a time (`lax.map`):
  the shifted copies of one pair stay in cache, 1.5x faster here than all pairs at once.
  The costs are the same; XLA fuses the program around them differently, so labels move
  by float rounding (≤ 1e-7 at 128² and 224²)."""
  return jax.lax.map(lambda pair: _costs(pair[0][None], pair[1][None], radius, cell)[0],
                     (a, b))


def _costs(a: jax.Array, b: jax.Array, radius: int, cell: int) -> jax.Array:
  n, h, w = a.shape
  r = radius
  padded = jnp.pad(b, ((0, 0), (r, r), (r, r)), mode="edge")
  costs = []
  for dy in range(-r, r + 1):  # one row shift at a time: all dx of it in one fused op
    rows = padded[:, r + dy:r + dy + h]
    shifted = jnp.stack([rows[:, :, r + dx:r + dx + w] for dx in range(-r, r + 1)], 1)
    sq = jnp.square(shifted - a[:, None])
    # Cell sums by a windowed reduction: 1.3x faster here than reshaping to cells and
    # taking the mean over two strided axes, and the same sums.
    cell_sums = jax.lax.reduce_window(sq, 0.0, jax.lax.add, (1, 1, cell, cell),
                                      (1, 1, cell, cell), "VALID")
    costs.append(cell_sums / (cell * cell))
  volume = jnp.concatenate(costs, 1).transpose(0, 2, 3, 1)
  return volume - volume.min(axis=-1, keepdims=True)


class TemporalHead(nn.Module):
  """A window of W frame embeddings [N, W, D] and the W − 1 motion vectors between them
  [N, W − 1, M] → (continuous f32[N, C], one logit vector per branch)."""

  spec: HybridActionSpec
  hidden: int
  continuous_from_motion: bool = True

  @nn.compact
  def __call__(self, frame_emb: jax.Array, motion: jax.Array):
    chex.assert_rank([frame_emb, motion], 3)
    n = frame_emb.shape[0]
    x = jnp.concatenate([frame_emb.reshape(n, -1), motion.reshape(n, -1)], -1)
    for i in range(2):
      x = nn.relu(nn.Dense(self.hidden, name=f"mix_{i}")(x))
    if self.continuous_from_motion:
      y = motion.reshape(n, -1)
      for i in range(2):
        y = nn.relu(nn.Dense(self.hidden, name=f"move_{i}")(y))
    else:
      y = x
    continuous = nn.Dense(self.spec.continuous_dim, name="continuous")(y)
    logits = tuple(nn.Dense(n, name=f"branch_{i}")(x) for i, n in enumerate(self.spec.branches))
    return continuous, logits


class IDMNet(nn.Module):
  """`encode` (per frame: embedding, and the motion to the next frame) and `heads` (per
  window); `__call__` runs both on clips."""

  cfg: IDMConfig
  spec: HybridActionSpec

  def setup(self):
    cfg = self.cfg
    self.encoder = FrameEncoder(cfg.stem, cfg.channels, cfg.embed_dim)
    self.motion = MotionEncoder(cfg.motion_channels, cfg.flow_heads)
    self.head = TemporalHead(self.spec, cfg.hidden, cfg.continuous_from_motion)

  def _encode_sequences(self, frames: jax.Array):
    """uint8 [B, L, H, W, 3] → (embeddings [B, L, D], motion [B, L − 1, M])."""
    b, length = frames.shape[:2]
    patches = self.encoder.patches(frames.reshape((b * length,) + frames.shape[2:]))
    stem = self.encoder.stem_map(patches)
    emb = self.encoder.embed_map(stem).reshape(b, length, -1)
    def pairs(x):  # [B·L, ...] → (frames 0..L−2, frames 1..L−1) of every clip, flattened
      x = x.reshape((b, length) + x.shape[1:])
      return x[:, :-1].reshape((-1,) + x.shape[2:]), x[:, 1:].reshape((-1,) + x.shape[2:])

    costs = None
    if self.cfg.motion_input == "cost_volume":
      full = frames.reshape((b * length,) + frames.shape[2:]).astype(jnp.float32) / 255.0
      pool = matching_pool(self.cfg, frames.shape[2])
      _check_cells(full.shape[1], full.shape[2], self.cfg.stem, pool)
      costs = map_cost_volume(*pairs(matching_map(full, pool)), self.cfg.motion_radius,
                              self.cfg.stem // pool)
    motion = self.motion(*pairs(patches if self.cfg.motion_input == "patches" else stem),
                         costs)
    return emb, motion.reshape(b, length - 1, -1)

  def encode(self, frames: jax.Array):
    """uint8 [N + 1, H, W, 3] consecutive frames → (embeddings [N, D], motion [N, M]) of
    frames 0..N−1; motion i is from frame i to frame i + 1."""
    emb, motion = self._encode_sequences(frames[None])
    return emb[0, :-1], motion[0]

  def heads(self, frame_emb: jax.Array, motion: jax.Array):
    return self.head(frame_emb, motion)

  def __call__(self, clips: jax.Array):
    """uint8 [B, L, H, W, 3] → predictions for the L − W + 1 full windows, [B, L − W + 1]."""
    b = clips.shape[0]
    emb, motion = self._encode_sequences(clips)
    w = self.cfg.window
    emb_w = sliding_windows(emb, w)  # [B, n, W, D]
    motion_w = sliding_windows(motion, w - 1)  # [B, n, W − 1, M]
    n = emb_w.shape[1]
    continuous, logits = self.head(emb_w.reshape((b * n,) + emb_w.shape[2:]),
                                   motion_w.reshape((b * n,) + motion_w.shape[2:]))
    return continuous.reshape(b, n, -1), tuple(l.reshape(b, n, -1) for l in logits)


def sliding_windows(x: jax.Array, window: int) -> jax.Array:
  """[B, L, ...] → [B, L − window + 1, window, ...] (window i covers steps i .. i + window − 1)."""
  n = x.shape[1] - window + 1
  if n < 1:
    raise ValueError(f"a sequence of {x.shape[1]} steps is shorter than the window {window}")
  index = np.arange(n)[:, None] + np.arange(window)[None, :]
  return x[:, index]

