"""Labelling videos with a trained inverse dynamics model (`mbjax.offline.idm`), and
scoring labels against the ground truth.

  label(params, cfg, spec, frames u8[T, H, W, 3]) -> IDMLabels [T]
      edges padded by repeating the first/last frame; each frame encoded once
      (`encode_frames`), then the window heads slid over the results; both stages jitted in
      fixed pieces of `cfg.label_batch` frames, so chunks of any length reuse one compilation.
  evaluate_labels: discrete accuracy per branch and movement R² per group of frames (which
      frames to score for what: `mbjax.offline.idm_training`, "Ground truth").
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mbjax.envs.spaces import HybridActionSpec
from mbjax.offline.idm import IDMConfig, IDMNet, sliding_windows


class IDMLabels(NamedTuple):
  """What `label` returns for a chunk of T frames."""

  continuous: jax.Array  # f32[T, C], clipped to [-1, 1]
  discrete: jax.Array  # i32[T, num_branches], arg-max per branch
  probs: tuple[jax.Array, ...]  # one f32[T, n_i] per branch


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


# -- evaluation ---------------------------------------------------------------------------


def r2_score(pred: np.ndarray, truth: np.ndarray) -> float:
  """1 − Σ‖y − ŷ‖² / Σ‖y − ȳ‖², pooled over the dims; NaN (undefined) for < 2 frames or a
  truth that does not vary (every move the same, e.g. all zero)."""
  pred, truth = np.asarray(pred, np.float64), np.asarray(truth, np.float64)
  if truth.shape[0] < 2:
    return float("nan")
  total = np.sum(np.square(truth - truth.mean(axis=0)))
  if total <= 1e-12:
    return float("nan")
  return float(1.0 - np.sum(np.square(truth - pred)) / total)


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
