"""Inverse dynamics model (IDM): labels every frame of a video with the hybrid action taken
on it, from a non-causal window of frames around it (VPT, Baker et al. 2022).

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
window heads (`label` encodes the edge-padded chunk once and slides the window over the
results). Upstream MetaBonk instead encoded each window's 7 frames anew and concatenated
7×36,864 features into a 66M-parameter dense layer.

Training: masked MSE on the continuous dims, class-weighted masked cross-entropy per branch,
AdamW. Each clip is rolled by a random shift of up to `cfg.shift` pixels (the same for all
its frames, so displacements are unchanged), so motion is not tied to where a sprite sits
on the patch grid; it matters when labelled frames are few and not with more. A
`motion_fraction` of each batch is placed on frames whose move is visible (BonkArena's
labelled clips of the trained agent were mostly paused menu frames, which teach the move
nothing). A
`symmetry_fraction` of the clips is mirrored or transposed with the move transformed to
match (`random_symmetry`; top-down games only); `:arena` uses it with a 3-frame window and
a 128-px matching grid.

API (all shapes static; `IDMConfig` and the `HybridActionSpec` are hashable, so they are
static jit arguments, carried as static fields of `IDMState`):
  init(key, cfg, frame_shape, spec, class_weights=None) -> IDMState
  update(state, frames u8[B, L, H, W, 3], labels: ActionLabels [B, L]) -> (state, metrics)
      L ≥ W consecutive frames per clip; the L − W + 1 centres whose whole window lies in
      the clip are trained (labels outside that range are ignored).
  label(params, cfg, spec, frames u8[T, H, W, 3]) -> IDMLabels [T]
      edges padded by repeating the first/last frame; jitted in fixed pieces of
      `cfg.label_batch` frames, so chunks of any length reuse one compilation.
  sample_clips / gather_clips / fit: host-side random clips from in-memory episodes and a
      plain training loop over `update`.
  evaluate_labels: discrete accuracy per branch and movement R² per group of frames.

Ground truth (BonkArena, `mbjax/envs/bonk_arena`):
  * The game clips the move to [−1, 1] per axis and then its norm to 1; what the frames
    show is that applied move, so train and score against `norm_clipped(move)`, not the raw
    policy output (a random policy's diagonals exceed norm 1).
  * While the level-up menu is open the game is paused: the move has no visible effect,
    so those frames carry no movement label (`continuous_valid` False when the menu flag
    is known) and are not scored for it (`evaluate_labels(move_visible=...)`). A move
    into a wall is likewise invisible; it stays labelled (no flag; such frames are rare).
  * The card choice is visible only on menu frames (next frame: menu closed, and, with the
    renderer's upgrade HUD strip, which count went up). On gameplay frames the cards are
    masked and the label is always the no-op, so overall accuracy is dominated by them:
    report it on menu frames and on gameplay frames separately (`evaluate_labels` groups).
    Menu frames are rare (one per level-up for a decisive policy): weight the discrete
    loss by `class_weights_from_labels` and oversample them (`sample_clips(focus=...)`).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Sequence

import chex
import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

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


class ActionLabels(NamedTuple):
  """Per-frame training targets; every field has the same leading shape [...]."""

  continuous: jax.Array  # f32[..., C], the applied move (see `norm_clipped`)
  discrete: jax.Array  # i32[..., num_branches]
  continuous_valid: jax.Array  # bool[...], False where the move is unknown or invisible
  discrete_valid: jax.Array  # bool[...], False where the choice is unknown


class IDMLabels(NamedTuple):
  """What `label` returns for a chunk of T frames."""

  continuous: jax.Array  # f32[T, C], clipped to [-1, 1]
  discrete: jax.Array  # i32[T, num_branches], arg-max per branch
  probs: tuple[jax.Array, ...]  # one f32[T, n_i] per branch


def norm_clipped(move: np.ndarray | jax.Array):
  """The move BonkArena applies: clip each axis to [−1, 1], then the norm to 1."""
  xp = jnp if isinstance(move, jax.Array) else np
  move = xp.clip(move, -1.0, 1.0)
  return move / xp.maximum(1.0, xp.linalg.norm(move, axis=-1, keepdims=True))


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


# -- training -----------------------------------------------------------------------------


@flax.struct.dataclass
class IDMState:
  params: Any
  opt_state: Any
  step: jax.Array  # i32[]
  key: jax.Array  # for the augmentation
  class_weights: tuple[jax.Array, ...]  # one f32[n_i] per branch
  cfg: IDMConfig = flax.struct.field(pytree_node=False)
  spec: HybridActionSpec = flax.struct.field(pytree_node=False)


def make_optimizer(cfg: IDMConfig) -> optax.GradientTransformation:
  lr = optax.cosine_decay_schedule(cfg.lr, cfg.lr_decay_steps) if cfg.lr_decay_steps else cfg.lr
  return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm),
                     optax.adamw(lr, weight_decay=cfg.weight_decay))


def init(key: jax.Array, cfg: IDMConfig, frame_shape: tuple[int, int, int],
         spec: HybridActionSpec, class_weights: Sequence[np.ndarray] | None = None) -> IDMState:
  """Fresh parameters for frames of `frame_shape` (H, W, 3); uniform class weights unless
  given (see `class_weights_from_labels`)."""
  if len(frame_shape) != 3 or frame_shape[-1] != 3:
    raise ValueError(f"frame_shape must be (H, W, 3), got {frame_shape}")
  net = IDMNet(cfg, spec)
  key, init_key = jax.random.split(key)
  params = net.init(init_key, jnp.zeros((1, cfg.window) + tuple(frame_shape), jnp.uint8))
  if class_weights is None:
    class_weights = [np.ones(n, np.float32) for n in spec.branches]
  class_weights = tuple(jnp.asarray(w, jnp.float32) for w in class_weights)
  for w, n in zip(class_weights, spec.branches, strict=True):
    chex.assert_shape(w, (n,))
  return IDMState(params, make_optimizer(cfg).init(params), jnp.zeros((), jnp.int32), key,
                  class_weights, cfg, spec)


def class_weights_from_labels(discrete: np.ndarray, spec: HybridActionSpec,
                              power: float = 0.5, valid: np.ndarray | None = None):
  """Per-branch class weights ∝ frequency^−power (0: uniform, 1: fully balanced), scaled so
  the labelled frames' mean weight is 1; classes never seen get the largest seen weight."""
  discrete = np.asarray(discrete).reshape(-1, spec.num_branches)
  if valid is not None:
    discrete = discrete[np.asarray(valid).reshape(-1)]
  weights = []
  for i, n in enumerate(spec.branches):
    counts = np.bincount(discrete[:, i], minlength=n)[:n].astype(np.float64)
    seen = counts > 0
    if not seen.any():
      weights.append(np.ones(n, np.float32))
      continue
    w = np.zeros(n)
    w[seen] = counts[seen] ** -power
    w[~seen] = w[seen].max()
    w /= (w * counts).sum() / counts.sum()
    weights.append(w.astype(np.float32))
  return weights


def loss(params, cfg: IDMConfig, spec: HybridActionSpec, class_weights, frames: jax.Array,
         labels: ActionLabels):
  """Masked MSE (continuous) + weighted masked cross-entropy (branches) on a clip batch."""
  b, length = frames.shape[:2]
  chex.assert_shape(labels.continuous, (b, length, spec.continuous_dim))
  chex.assert_shape(labels.discrete, (b, length, spec.num_branches))
  chex.assert_shape([labels.continuous_valid, labels.discrete_valid], (b, length))
  continuous, logits = IDMNet(cfg, spec).apply(params, frames)
  c = cfg.context
  centre = slice(c, length - c)
  target = labels.continuous[:, centre].astype(jnp.float32)
  cont_mask = labels.continuous_valid[:, centre].astype(jnp.float32)
  disc_mask = labels.discrete_valid[:, centre].astype(jnp.float32)

  sq_error = jnp.sum(jnp.square(continuous - target), axis=-1)
  continuous_mse = jnp.sum(sq_error * cont_mask) / jnp.maximum(cont_mask.sum(), 1.0)
  metrics = {"continuous_mse": continuous_mse}
  discrete_ce = jnp.zeros((), jnp.float32)
  for i, branch_logits in enumerate(logits):
    target_i = labels.discrete[:, centre, i]
    weight = class_weights[i][target_i] * disc_mask
    ce = optax.softmax_cross_entropy_with_integer_labels(branch_logits, target_i)
    discrete_ce += jnp.sum(ce * weight) / jnp.maximum(weight.sum(), 1e-6)
    correct = (jnp.argmax(branch_logits, -1) == target_i).astype(jnp.float32)
    metrics[f"accuracy_{i}"] = jnp.sum(correct * disc_mask) / jnp.maximum(disc_mask.sum(), 1.0)
  metrics["discrete_ce"] = discrete_ce
  total = continuous_mse + cfg.discrete_weight * discrete_ce
  return total, metrics


def random_shift(key: jax.Array, clips: jax.Array, max_shift: int) -> jax.Array:
  """Rolls each clip [B, L, H, W, C] by one random (dy, dx) in [−max_shift, max_shift]²
  (the same for all its frames, so every displacement, and thus every label, is kept)."""
  offsets = jax.random.randint(key, (clips.shape[0], 2), -max_shift, max_shift + 1)
  return jax.vmap(lambda clip, d: jnp.roll(clip, (d[0], d[1]), axis=(1, 2)))(clips, offsets)


def random_symmetry(key: jax.Array, clips: jax.Array, labels: ActionLabels,
                    fraction: float) -> tuple[jax.Array, ActionLabels]:
  """Each square clip [B, L, S, S, C], with probability `fraction`, goes through one of the
  seven non-identity symmetries of the square (uniformly: mirrored left-right and/or upside
  down and/or transposed; the same for all its frames). The move (dx, dy) transforms with
  the frames — (−dx, dy), (dx, −dy), (dy, dx) — so top-down movement labels stay exact; the
  transformed clips' discrete labels are dropped (menu cards and HUD move with the image).
  """
  if labels.continuous.shape[-1] != 2 or clips.shape[2] != clips.shape[3]:
    raise ValueError(f"random_symmetry needs square frames and a 2-d move, got clips "
                     f"{clips.shape} and moves {labels.continuous.shape}")
  apply_key, code_key = jax.random.split(key)
  apply = jax.random.uniform(apply_key, (clips.shape[0],)) < fraction
  code = jax.random.randint(code_key, (clips.shape[0],), 1, 8) * apply  # bits: x, y, swap

  def transform(clip, move, code):
    flip_x, flip_y, swap = (code & 1) > 0, (code & 2) > 0, (code & 4) > 0
    clip = jnp.where(flip_x, clip[:, :, ::-1], clip)
    move = jnp.where(flip_x, move * jnp.asarray([-1.0, 1.0]), move)
    clip = jnp.where(flip_y, clip[:, ::-1], clip)
    move = jnp.where(flip_y, move * jnp.asarray([1.0, -1.0]), move)
    clip = jnp.where(swap, jnp.swapaxes(clip, 1, 2), clip)
    return clip, jnp.where(swap, move[..., ::-1], move)

  clips, moves = jax.vmap(transform)(clips, labels.continuous, code)
  return clips, labels._replace(continuous=moves,
                                discrete_valid=labels.discrete_valid & (code == 0)[:, None])


@functools.partial(jax.jit, donate_argnums=0)
def update(state: IDMState, frames: jax.Array, labels: ActionLabels):
  """One AdamW step on clips uint8[B, L, H, W, 3] with labels [B, L]."""
  chex.assert_rank(frames, 5)
  key, shift_key = jax.random.split(state.key)
  if state.cfg.shift:
    frames = random_shift(shift_key, frames, state.cfg.shift)
  if state.cfg.symmetry_fraction:
    frames, labels = random_symmetry(jax.random.fold_in(shift_key, 1), frames, labels,
                                     state.cfg.symmetry_fraction)
  grad_fn = jax.grad(loss, has_aux=True)
  grads, metrics = grad_fn(state.params, state.cfg, state.spec, state.class_weights, frames,
                           labels)
  updates, opt_state = make_optimizer(state.cfg).update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics["loss"] = metrics["continuous_mse"] + state.cfg.discrete_weight * metrics[
      "discrete_ce"]
  metrics["grad_norm"] = optax.tree.norm(grads)
  return state.replace(params=params, opt_state=opt_state, step=state.step + 1,
                       key=key), metrics


# -- labelling ----------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=(1, 2))
def _encode_piece(params, cfg: IDMConfig, spec: HybridActionSpec, frames):
  return IDMNet(cfg, spec).apply(params, frames, method=IDMNet.encode)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _heads_piece(params, cfg: IDMConfig, spec: HybridActionSpec, emb, motion):
  """Embeddings of P + W − 1 consecutive frames and the P + W − 2 motions between them →
  labels of the P centres."""
  emb_w = sliding_windows(emb[None], cfg.window)[0]
  motion_w = sliding_windows(motion[None], cfg.window - 1)[0]
  continuous, logits = IDMNet(cfg, spec).apply(params, emb_w, motion_w, method=IDMNet.heads)
  probs = tuple(jax.nn.softmax(l, axis=-1) for l in logits)
  discrete = [jnp.argmax(l, axis=-1) for l in logits]
  discrete = (jnp.stack(discrete, -1) if discrete else
              jnp.zeros((continuous.shape[0], 0))).astype(jnp.int32)
  return IDMLabels(jnp.clip(continuous, -1.0, 1.0), discrete, probs)


def _pad_to(x: np.ndarray, size: int) -> np.ndarray:
  """Pads axis 0 to `size` by repeating the last row."""
  if x.shape[0] == size:
    return x
  return np.concatenate([x, np.repeat(x[-1:], size - x.shape[0], axis=0)])


def encode_frames(params, cfg: IDMConfig, spec: HybridActionSpec, frames):
  """uint8[N, H, W, 3] → (embeddings f32[N, D], motion f32[N − 1, M]), each frame encoded
  once, jitted in pieces of `cfg.label_batch` (+ 1 frame of overlap for the motion)."""
  frames = np.asarray(frames)
  piece, total = cfg.label_batch, frames.shape[0]
  emb, motion = [], []
  for start in range(0, total, piece):
    chunk = frames[start:start + piece + 1]
    e, m = _encode_piece(params, cfg, spec, _pad_to(chunk, piece + 1))
    n = min(piece, total - start)
    emb.append(np.asarray(e)[:n])
    motion.append(np.asarray(m)[:n])
  return np.concatenate(emb), np.concatenate(motion)[:total - 1]


def label(params, cfg: IDMConfig, spec: HybridActionSpec, frames) -> IDMLabels:
  """Labels every frame of a chunk uint8[T, H, W, 3] (any T ≥ 1).

  The chunk is padded by repeating its first and last frame `cfg.context` times, each
  frame is encoded once (`encode_frames`), and the window heads slide over the embeddings;
  both stages are jitted on fixed-size pieces (`cfg.label_batch`), so no length recompiles.
  """
  frames = np.asarray(frames)
  if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or not len(frames):
    raise ValueError(f"label: frames must be uint8[T >= 1, H, W, 3], got {frames.dtype}"
                     f"{list(frames.shape)}")
  length, c, piece = frames.shape[0], cfg.context, cfg.label_batch
  padded = np.concatenate([np.repeat(frames[:1], c, 0), frames,
                           np.repeat(frames[-1:], c, 0)])
  emb, motion = encode_frames(params, cfg, spec, padded)  # [T + 2c, D], [T + 2c − 1, M]
  parts = []
  for start in range(0, length, piece):
    n = min(piece, length - start)
    out = _heads_piece(params, cfg, spec, _pad_to(emb[start:start + n + 2 * c], piece + 2 * c),
                       _pad_to(motion[start:start + n + 2 * c - 1], piece + 2 * c - 1))
    parts.append(jax.tree.map(lambda x, n=n: np.asarray(x)[:n], out))
  return jax.tree.map(lambda *xs: np.concatenate(xs), *parts)


# -- host-side training helpers -------------------------------------------------------------


class Episode(NamedTuple):
  """One labelled episode in memory: frames uint8[T, H, W, 3] and labels [T]."""

  frames: np.ndarray
  labels: ActionLabels


def sample_clips(rng: np.random.Generator, lengths: Sequence[int], batch: int, length: int,
                 window: int, focus: Sequence[np.ndarray] | None = None,
                 focus_fraction: float = 0.0):
  """Random clip positions → (episode index i64[batch], start i64[batch]).

  Episodes are drawn in proportion to their number of clip positions. A `focus_fraction`
  of the clips are instead placed so that a random `focus` frame (per-episode frame
  indices, e.g. the rare menu frames) lies among the clip's trained centres.
  """
  lengths = np.asarray(lengths)
  positions = np.maximum(lengths - length + 1, 0)
  if positions.sum() == 0:
    raise ValueError(f"no episode has the {length} frames a clip needs (lengths {lengths})")
  episode = rng.choice(len(lengths), size=batch, p=positions / positions.sum())
  start = (rng.random(batch) * positions[episode]).astype(np.int64)
  if focus is not None and focus_fraction > 0:
    pool = [(e, f) for e, frames in enumerate(focus) if positions[e] for f in frames]
    if pool:
      c = window // 2
      for b in np.nonzero(rng.random(batch) < focus_fraction)[0]:
        e, f = pool[rng.integers(len(pool))]
        lo, hi = f - (length - 1 - c), f - c  # starts with f among the centres
        start[b] = np.clip(rng.integers(lo, hi + 1), 0, positions[e] - 1)
        episode[b] = e
  return episode, start


def gather_clips(episodes: Sequence[Episode], episode_ids, starts, length: int):
  """Stacks clips [B, L, ...] of frames and labels from in-memory episodes."""
  frames = np.stack([episodes[e].frames[s:s + length] for e, s in zip(episode_ids, starts)])
  labels = jax.tree.map(lambda *xs: np.stack(xs), *[
      jax.tree.map(lambda x, s=s: np.asarray(x)[s:s + length], episodes[e].labels)
      for e, s in zip(episode_ids, starts)])
  return frames, labels


def fit(state: IDMState, episodes: Sequence[Episode], num_steps: int,
        rng: np.random.Generator, batch: int = 8, clip_length: int = 16,
        focus: Sequence[np.ndarray] | None = None, focus_fraction: float = 0.0,
        log_fn: Callable[[int, dict], None] | None = None, log_every: int = 50,
        data_sharding: NamedSharding | None = None):
  """`num_steps` updates on random clips; returns (state, last metrics as floats).

  `data_sharding` (`mbjax.train.sharding.batch_sharding`): each global batch of `batch`
  clips is split over its mesh and the state replicated there (data-parallel; the same
  updates as on one device up to the order of the sums)."""
  if data_sharding is not None:
    state = jax.device_put(state, NamedSharding(data_sharding.mesh, P()))
  lengths = [e.frames.shape[0] for e in episodes]
  window, metrics = state.cfg.window, {}
  # `motion_fraction` of each batch: clips centred on frames whose move is visible.
  moving = [np.flatnonzero(np.asarray(e.labels.continuous_valid)) for e in episodes]
  on_moves = int(round(batch * state.cfg.motion_fraction))
  for step in range(num_steps):
    ids, starts = sample_clips(rng, lengths, batch - on_moves, clip_length, window, focus,
                               focus_fraction)
    if on_moves:
      more = sample_clips(rng, lengths, on_moves, clip_length, window, moving, 1.0)
      ids, starts = np.concatenate([ids, more[0]]), np.concatenate([starts, more[1]])
    clips = jax.device_put(gather_clips(episodes, ids, starts, clip_length), data_sharding)
    state, metrics = update(state, *clips)
    if log_fn is not None and (step + 1) % log_every == 0:
      log_fn(step + 1, jax.tree.map(float, metrics))
  return state, jax.tree.map(float, metrics)


# -- evaluation ---------------------------------------------------------------------------


def r2_score(pred: np.ndarray, truth: np.ndarray) -> float:
  """1 − Σ‖y − ŷ‖² / Σ‖y − ȳ‖², pooled over the dims (NaN for < 2 frames)."""
  pred, truth = np.asarray(pred, np.float64), np.asarray(truth, np.float64)
  if truth.shape[0] < 2:
    return float("nan")
  total = np.sum(np.square(truth - truth.mean(axis=0)))
  return float(1.0 - np.sum(np.square(truth - pred)) / max(total, 1e-12))


def evaluate_labels(pred: IDMLabels, continuous: np.ndarray, discrete: np.ndarray,
                    groups: dict[str, np.ndarray],
                    move_visible: np.ndarray | None = None) -> dict[str, float]:
  """Accuracy per branch and movement R²/MSE of `pred` against the truth, per group of
  frames (`groups`: name → bool[T] mask, e.g. "all", "menu", "gameplay").

  `move_visible` (bool[T], default all): the frames whose move the video shows; movement
  is scored on those alone (BonkArena pauses while the level-up menu is open, so a move
  chosen then has no effect any frame could show).

  Keys: `{group}/frames`, `{group}/accuracy_{i}`, `{group}/move_r2`, `{group}/move_mse`
  and `{group}/move_frames` (the frames movement was scored on).
  """
  out = {}
  discrete = np.asarray(discrete).reshape(len(discrete), -1)
  visible = (np.ones(len(discrete), bool) if move_visible is None
             else np.asarray(move_visible, bool))
  for name, mask in groups.items():
    mask = np.asarray(mask, bool)
    out[f"{name}/frames"] = int(mask.sum())
    for i in range(discrete.shape[1]):
      hits = np.asarray(pred.discrete)[mask, i] == discrete[mask, i]
      out[f"{name}/accuracy_{i}"] = float(hits.mean()) if mask.any() else float("nan")
    if np.asarray(continuous).shape[-1]:
      mask = mask & visible
      out[f"{name}/move_frames"] = int(mask.sum())
      p, t = np.asarray(pred.continuous)[mask], np.asarray(continuous)[mask]
      out[f"{name}/move_r2"] = r2_score(p, t)
      out[f"{name}/move_mse"] = float(np.mean(np.sum(np.square(p - t), -1))) if mask.any() \
          else float("nan")
  return out
