"""IDM labelling and reward-model scoring throughput on this CPU:

  python -m experiments.bench_offline_models [--frames=512] [--repeats=3]

Times `idm_labelling.label` and `reward_model.score` over one chunk of `--frames` frames, end to end
from a uint8 numpy chunk (edge padding, fixed-size jitted pieces, results back in numpy),
for each piece size in `--batches`; compilation is excluded (one warm-up run), the best of
`--repeats` is kept. The IDM is timed as `--config` (default
`configs/video_pretrain.py:arena`, the configuration whose accuracy BENCHMARKS.md reports)
sets it, at that config's chunk size (`convert.size`) and at each of `--idm_sizes`, and,
for comparison, the default `IDMConfig` at `--size`² (`--parts=idm`: only the IDM).
Throughput does not depend on the weights, so freshly initialised models are timed.

The reward part times the `:arena` pipeline's reward model (`--parts=reward`: only it) at
each of `--reward_sizes` (96²: that pipeline's chunks until 2026-11-26, now 128²; 224²:
upstream's). Upstream's own PyTorch IDM and reward model, in the same run:
`experiments/bench_peers.py --row=idm` and `--row=reward`.
Prints frames/s of wall time, frames per CPU-second of this process, and the load average.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_enable_concurrency_optimized_scheduler=false")

import dataclasses  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from configs import video_pretrain  # noqa: E402
from mbjax.envs.spaces import HybridActionSpec  # noqa: E402
from mbjax.offline import idm, idm_labelling, idm_training, pipeline, reward_model  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/video_pretrain.py:arena",
                                          "Pipeline config whose IDM is timed.")
_SIZE = flags.DEFINE_integer("size", 224, "Frame side (reward model, default IDM).")
_IDM_SIZES = flags.DEFINE_list("idm_sizes", ["224"], "Further frame sides for the config's "
                               "IDM (its own chunk size is always timed).")
_FRAMES = flags.DEFINE_integer("frames", 512, "Frames in the timed chunk.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per case (best is reported).")
_BATCHES = flags.DEFINE_list("batches", ["16", "32", "64", "128"], "Piece sizes to try.")
_PARTS = flags.DEFINE_list("parts", ["reward", "idm"], "What to time: reward and/or idm.")
_REWARD_SIZES = flags.DEFINE_list(
    "reward_sizes", ["96", "128", "224"], "Frame sides for the reward model: 96, the "
    "chunks BENCHMARKS.md's reward Spearman was measured on; 128, :arena's now; 224, "
    "upstream's.")

SPEC = HybridActionSpec(continuous_dim=2, branches=(4,))  # BonkArena's action space


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


def rng_frames(count, side):
  return np.random.default_rng(0).integers(0, 256, (count, side, side, 3), dtype=np.uint8)


def time_reward(key, count, batches):
  """`reward_model.score` with the `:arena` pipeline's reward model (`reward.*` of
  configs/video_pretrain.py:arena) at each of `--reward_sizes`, every piece size."""
  base = pipeline.config.reward_config(video_pretrain.get_config("arena"))
  for side in (int(s) for s in _REWARD_SIZES.value):
    frames = rng_frames(count, side)
    for batch in batches:
      cfg = dataclasses.replace(base, score_batch=batch)
      state = reward_model.init(key, cfg, (side, side, 3))
      wall, cpu = best_of(_REPEATS.value,
                          lambda: reward_model.score(state.params, cfg, frames))
      report(f"reward score {side}²", batch, count, wall, cpu)


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
      state = idm_training.init(key, cfg, (side, side, 3), SPEC)
      wall, cpu = best_of(_REPEATS.value, lambda: idm_labelling.label(state.params, cfg, SPEC,
                                                                   chunk))
      report(f"{name} (window {cfg.window})", batch, count, wall, cpu)
  print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
  app.run(main)
