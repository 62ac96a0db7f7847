"""Training the inverse dynamics model (`mbjax.offline.idm`): its per-frame targets
(`ActionLabels`), the loss, the augmentations, the jitted AdamW step and a plain host-side
training loop over in-memory episodes.

Training: masked MSE on the continuous dims, class-weighted masked cross-entropy per branch,
AdamW. Each clip is rolled by a random shift of up to `cfg.shift` pixels (the same for all
its frames, so displacements are unchanged), so motion is not tied to where a sprite sits
on the patch grid; it matters when labelled frames are few and not with more. A
`motion_fraction` of each batch is placed on frames whose move is visible (BonkArena's
labelled clips of the trained agent were mostly paused menu frames, which teach the move
nothing). A `symmetry_fraction` of the clips is mirrored or transposed with the move
transformed to match (`random_symmetry`; top-down games only); `:arena` uses it with a
3-frame window and a 128-px matching grid.

API (all shapes static; `IDMConfig` and the `HybridActionSpec` are static fields of
`IDMState`):
  init(key, cfg, frame_shape, spec, class_weights=None) -> IDMState
  update(state, frames u8[B, L, H, W, 3], labels: ActionLabels [B, L]) -> (state, metrics)
      L ≥ W consecutive frames per clip; the L − W + 1 centres whose whole window lies in
      the clip are trained (labels outside that range are ignored).
  sample_clips / gather_clips / fit: host-side random clips from in-memory episodes and a
      plain training loop over `update`.

Ground truth (BonkArena, `mbjax/envs/bonk_arena`):
  * The game clips the move to [−1, 1] per axis and then its norm to 1; what the frames
    show is that applied move, so train and score against `norm_clipped(move)`, not the raw
    policy output (a random policy's diagonals exceed norm 1).
  * While the level-up menu is open the game is paused: the move has no visible effect,
    so those frames carry no movement label (`continuous_valid` False when the menu flag
    is known) and are not scored for it (`idm_labelling.evaluate_labels(move_visible=...)`).
    A move into a wall is likewise invisible; it stays labelled (no flag; such frames are
    rare).
  * The card choice is visible only on menu frames (next frame: menu closed, and, with the
    renderer's upgrade HUD strip, which count went up). On gameplay frames the cards are
    masked and the label is always the no-op, so overall accuracy is dominated by them:
    report it on menu frames and on gameplay frames separately
    (`idm_labelling.evaluate_labels` groups).
    Menu frames are rare (one per level-up for a decisive policy): weight the discrete
    loss by `class_weights_from_labels` and oversample them (`sample_clips(focus=...)`).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Sequence

import chex
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from mbjax.envs.spaces import HybridActionSpec
from mbjax.offline.idm import IDMConfig, IDMNet


class ActionLabels(NamedTuple):
  """Per-frame training targets; every field has the same leading shape [...]."""

  continuous: jax.Array  # f32[..., C], the applied move (see `norm_clipped`)
  discrete: jax.Array  # i32[..., num_branches]
  continuous_valid: jax.Array  # bool[...], False where the move is unknown or invisible
  discrete_valid: jax.Array  # bool[...], False where the choice is unknown


def norm_clipped(move: np.ndarray | jax.Array):
  """The move BonkArena applies: clip each axis to [−1, 1], then the norm to 1."""
  xp = jnp if isinstance(move, jax.Array) else np
  move = xp.clip(move, -1.0, 1.0)
  return move / xp.maximum(1.0, xp.linalg.norm(move, axis=-1, keepdims=True))


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
                    fraction: float, rotations_only: bool = False
                    ) -> tuple[jax.Array, ActionLabels]:
  """Each square clip [B, L, S, S, C], with probability `fraction`, goes through one of the
  seven non-identity symmetries of the square (uniformly: mirrored left-right and/or upside
  down and/or transposed; the same for all its frames), or with `rotations_only` one of the
  three rotations (an even number of those reflections: a mirror image turns a player who
  circles clockwise into one who circles the other way). The move (dx, dy) transforms with
  the frames — (−dx, dy), (dx, −dy), (dy, dx) — so top-down movement labels stay exact; the
  transformed clips' discrete labels are dropped (menu cards and HUD move with the image).
  """
  if labels.continuous.shape[-1] != 2 or clips.shape[2] != clips.shape[3]:
    raise ValueError(f"random_symmetry needs square frames and a 2-d move, got clips "
                     f"{clips.shape} and moves {labels.continuous.shape}")
  apply_key, code_key = jax.random.split(key)
  apply = jax.random.uniform(apply_key, (clips.shape[0],)) < fraction
  if rotations_only:  # both flips (180°), or a swap with one flip (±90°)
    code = jnp.asarray([3, 5, 6])[jax.random.randint(code_key, (clips.shape[0],), 0, 3)]
  else:
    code = jax.random.randint(code_key, (clips.shape[0],), 1, 8)
  code = code * apply  # bits: flip x, flip y, swap

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
