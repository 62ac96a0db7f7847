"""IDM labelling and reward-model scoring throughput on this CPU:

  python -m experiments.bench_offline_models [--frames=512] [--repeats=3]

Times `idm.label` and `reward_model.score` over one chunk of `--frames` frames, end to end
from a uint8 numpy chunk (edge padding, fixed-size jitted pieces, results back in numpy),
for each piece size in `--batches`; compilation is excluded (one warm-up run), the best of
`--repeats` is kept. The IDM is timed as `--config` (default
`configs/video_pretrain.py:arena`, the configuration whose accuracy BENCHMARKS.md reports)
sets it, at that config's chunk size (`convert.size`) and at each of `--idm_sizes`, and,
for comparison, the default `IDMConfig` at `--size`² (`--parts=idm`: only the IDM).
Throughput does not depend on the weights, so freshly initialised models are timed.

Anchors at the same load: the upstream MetaBonk architectures in JAX, timed the same way —
the IDM that encodes all 7 frames of every window with a Nature CNN and feeds the
7×36,864 concatenation to a 256-unit dense layer, and the 4-convolution reward model.
Upstream on this CPU (PyTorch): IDM labelling 38–40 frames/s, reward scoring ~230 frames/s.
The reward part times the `:arena` pipeline's reward model (`--parts=reward`: only it) at
each of `--reward_sizes` (96²: that pipeline's chunks until 2026-11-26, now 128²; 224²:
upstream's), each size with the upstream-style reward anchor.
Prints frames/s of wall time, frames per CPU-second of this process, and the load average.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_enable_concurrency_optimized_scheduler=false")

import dataclasses  # noqa: E402
import time  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from configs import video_pretrain  # noqa: E402
from mbjax.envs.spaces import HybridActionSpec  # noqa: E402
from mbjax.offline import idm, pipeline, reward_model  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/video_pretrain.py:arena",
                                          "Pipeline config whose IDM is timed.")
_SIZE = flags.DEFINE_integer("size", 224, "Frame side (reward model, default IDM, anchors).")
_IDM_SIZES = flags.DEFINE_list("idm_sizes", ["224"], "Further frame sides for the config's "
                               "IDM (its own chunk size is always timed).")
_FRAMES = flags.DEFINE_integer("frames", 512, "Frames in the timed chunk.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per case (best is reported).")
_BATCHES = flags.DEFINE_list("batches", ["16", "32", "64", "128"], "Piece sizes to try.")
_ANCHOR_FRAMES = flags.DEFINE_integer("anchor_frames", 128,
                                      "Frames for the (slow) upstream-style anchors; 0: skip.")
_PARTS = flags.DEFINE_list("parts", ["reward", "idm"], "What to time: reward and/or idm.")
_REWARD_SIZES = flags.DEFINE_list(
    "reward_sizes", ["96", "128", "224"], "Frame sides for the reward model: 96, the "
    "chunks BENCHMARKS.md's reward Spearman was measured on; 128, :arena's now; 224, "
    "upstream's.")

SPEC = HybridActionSpec(continuous_dim=2, branches=(4,))  # BonkArena's action space


class UpstreamIDM(nn.Module):
  """Upstream's `InverseDynamicsModel`: a Nature CNN on each frame of the window, the
  features concatenated, two 256-unit layers, tanh move and button logits."""

  @nn.compact
  def __call__(self, windows):  # uint8 [N, 7, H, W, 3]
    n, w = windows.shape[:2]
    x = windows.reshape((n * w,) + windows.shape[2:]).astype(jnp.float32) / 255.0
    for channels, kernel, stride in ((32, 8, 4), (64, 4, 2), (64, 3, 1)):
      x = nn.relu(nn.Conv(channels, (kernel, kernel), (stride, stride), padding="VALID")(x))
    x = x.reshape(n, -1)
    x = nn.relu(nn.Dense(256)(nn.relu(nn.Dense(256)(x))))
    return jnp.tanh(nn.Dense(2)(x)), nn.Dense(4)(x)


class UpstreamReward(nn.Module):
  """Upstream's `TemporalRankRewardModel`: 4 strided convolutions (224→56→28→14→7),
  global average pool, a 256-d embedding and a linear score of its tanh."""

  @nn.compact
  def __call__(self, frames):
    x = frames.astype(jnp.float32) / 255.0
    x = nn.relu(nn.Conv(32, (8, 8), (4, 4), padding=((2, 2), (2, 2)))(x))
    for channels in (64, 128, 256):
      x = nn.relu(nn.Conv(channels, (4, 4), (2, 2), padding=((1, 1), (1, 1)))(x))
    z = nn.Dense(256)(x.mean(axis=(1, 2)))
    return nn.Dense(1)(jnp.tanh(z))[:, 0]


def best_of(repeats, fn):
  """(best wall seconds, CPU seconds of that run) of `fn()`, after one warm-up call."""
  fn()
  runs = []
  for _ in range(repeats):
    start, cpu = time.perf_counter(), time.process_time()
    fn()
    runs.append((time.perf_counter() - start, time.process_time() - cpu))
  return min(runs)


def report(name, batch, frames, wall, cpu):
  print(f"{name:<34} | {batch:>5} | {frames / wall:>9.0f} | {frames / cpu:>12.0f} | "
        f"{os.getloadavg()[0]:.2f}", flush=True)


def upstream_idm_label(params, frames, batch):
  """Upstream's labelling: every window's 7 frames gathered and encoded anew."""
  apply = jax.jit(UpstreamIDM().apply)
  padded = np.concatenate([frames[:1].repeat(3, 0), frames, frames[-1:].repeat(3, 0)])
  out = []
  for start in range(0, len(frames), batch):
    centres = np.arange(start, min(start + batch, len(frames)))
    windows = padded[np.minimum(centres, len(frames) - 1)[:, None] + np.arange(7)]
    if len(windows) < batch:
      windows = np.concatenate([windows, windows[-1:].repeat(batch - len(windows), 0)])
    out.append(np.asarray(apply(params, windows)[0])[:len(centres)])
  return np.concatenate(out)


def upstream_score(params, frames, batch):
  apply = jax.jit(UpstreamReward().apply)
  out = []
  for start in range(0, len(frames), batch):
    piece = frames[start:start + batch]
    if len(piece) < batch:
      piece = np.concatenate([piece, piece[-1:].repeat(batch - len(piece), 0)])
    out.append(np.asarray(apply(params, piece))[:min(batch, len(frames) - start)])
  return np.concatenate(out)


def rng_frames(count, side):
  return np.random.default_rng(0).integers(0, 256, (count, side, side, 3), dtype=np.uint8)


def time_reward(key, count, batches):
  """`reward_model.score` with the `:arena` pipeline's reward model (`reward.*` of
  configs/video_pretrain.py:arena) at each of `--reward_sizes`, every piece size, then
  the upstream-style reward model at the same sizes (piece 64)."""
  base = pipeline.config.reward_config(video_pretrain.get_config("arena"))
  for side in (int(s) for s in _REWARD_SIZES.value):
    frames = rng_frames(count, side)
    for batch in batches:
      cfg = dataclasses.replace(base, score_batch=batch)
      state = reward_model.init(key, cfg, (side, side, 3))
      wall, cpu = best_of(_REPEATS.value,
                          lambda: reward_model.score(state.params, cfg, frames))
      report(f"reward score {side}²", batch, count, wall, cpu)
    anchor = frames[:_ANCHOR_FRAMES.value]
    if len(anchor):
      params = UpstreamReward().init(key, anchor[:1])
      wall, cpu = best_of(_REPEATS.value, lambda: upstream_score(params, anchor, 64))
      report(f"upstream-style reward {side}²", 64, len(anchor), wall, cpu)


def main(argv):
  del argv
  size, count = _SIZE.value, _FRAMES.value
  frames = rng_frames(count, size)
  batches = [int(b) for b in _BATCHES.value]
  print(f"{count} random uint8 frames per case, best of {_REPEATS.value}; "
        f"load average before: {os.getloadavg()}")
  print(f"{'model':<34} | {'batch':>5} | {'frames/s':>9} | {'frames/CPU-s':>12} | load")
  key = jax.random.PRNGKey(0)
  if "reward" in _PARTS.value:
    time_reward(key, count, batches)
  if "idm" not in _PARTS.value:
    print(f"load average after: {os.getloadavg()}")
    return
  arena = pipeline.config.idm_config(_CONFIG.value)  # what the pipeline trains and labels with
  cases = [(f"config IDM {s}²", arena, s) for s in dict.fromkeys(
      [_CONFIG.value.convert.size] + [int(s) for s in _IDM_SIZES.value])]
  cases.append((f"default IDM {size}²", idm.IDMConfig(), size))
  for name, base, side in cases:
    chunk = frames if side == size else rng_frames(count, side)
    for batch in batches:
      cfg = dataclasses.replace(base, label_batch=batch)
      state = idm.init(key, cfg, (side, side, 3), SPEC)
      wall, cpu = best_of(_REPEATS.value, lambda: idm.label(state.params, cfg, SPEC, chunk))
      report(f"{name} (window {cfg.window})", batch, count, wall, cpu)
  anchor = frames[:_ANCHOR_FRAMES.value]
  if len(anchor):
    params = UpstreamIDM().init(key, anchor[:1, None].repeat(7, 1))
    wall, cpu = best_of(_REPEATS.value, lambda: upstream_idm_label(params, anchor, 32))
    report("upstream-style IDM label", 32, len(anchor), wall, cpu)
  print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
  app.run(main)
