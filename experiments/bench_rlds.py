"""Episodes on disk: our `.npz` against an RLDS dataset (tensorflow-datasets, array_record):

  python -m experiments.bench_rlds [--episodes=8] [--steps=250] [--repeats=3]

Two sets of `--episodes` BonkArena episodes of `--steps` steps (scripted play, made first, not
timed): 64² frames (the world model's frame size) and 256-d float embeddings (what the
pipeline exports by default; random values stand in for the reward model's features).
Each set is timed (best of --repeats) as:
  npz write   `episodes.write_episode` of every episode (default compression "auto");
  npz read    `episodes.read_episode` of every file;
  rlds export `rlds.export_rlds` from the `.npz` directory (it reads the files too);
  rlds read   `rlds.read_episodes`, the pipeline's import (decoding every step).
Prints steps/s of wall time, MB on disk and the load average (the machine is shared).
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_enable_concurrency_optimized_scheduler=false")

import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from mbjax.offline import episodes, rlds  # noqa: E402

_EPISODES = flags.DEFINE_integer("episodes", 8, "Episodes per set.")
_STEPS = flags.DEFINE_integer("steps", 250, "Steps per episode (the pipeline's chunk length).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per case (best is reported).")


def arena_episodes(num: int, steps: int) -> dict[str, list[dict]]:
  """{"frames": [...], "embeddings": [...]} episodes of scripted BonkArena play."""
  import jax

  from mbjax.envs.bonk_arena import BonkArena, make_scripted_policy, rollout

  env = BonkArena(pixel_size=64, camera="follow")  # vector observations, drawn frames
  params = env.default_params()
  play = jax.jit(jax.vmap(lambda key: rollout.play_episode(
      env, params, make_scripted_policy(env), key, with_frames=True, num_steps=steps)))
  played = jax.device_get(play(jax.random.split(jax.random.PRNGKey(0), num)))
  rng = np.random.default_rng(0)
  sets = {"frames": [], "embeddings": []}
  for i in range(num):
    card = np.eye(4, dtype=np.float32)[played.actions_discrete[i, :, 0]]
    action = np.concatenate([played.actions_continuous[i], card], -1)
    for kind, obs in (("frames", played.frames[i]),
                      ("embeddings", rng.normal(size=(steps, 256)).astype(np.float32))):
      sets[kind].append(episodes.make_episode(obs, action, played.rewards[i],
                                              metadata={"episode_id": f"arena_{i}"}))
  return sets


def _best(call, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    started = time.perf_counter()
    call()
    times.append(time.perf_counter() - started)
  return min(times)


def _megabytes(path: str) -> float:
  return sum(os.path.getsize(os.path.join(folder, f)) for folder, _, files in os.walk(path)
             for f in files) / 2 ** 20


def bench_set(episode_list: list[dict], root: str, repeats: int) -> dict:
  npz_dir, rlds_dir = os.path.join(root, "npz"), os.path.join(root, "rlds")
  os.makedirs(npz_dir)
  write = lambda: [episodes.write_episode(os.path.join(npz_dir, f"ep{i:03d}.npz"), e)
                   for i, e in enumerate(episode_list)]
  seconds = {"npz write": _best(write, repeats)}
  seconds["npz read"] = _best(lambda: [episodes.read_episode(p)
                                       for p in episodes.list_episodes(npz_dir)], repeats)

  def export():
    shutil.rmtree(rlds_dir, ignore_errors=True)
    return rlds.export_rlds(npz_dir, rlds_dir)

  seconds["rlds export"] = _best(export, repeats)
  dataset_dir = export()["dataset_dir"]
  seconds["rlds read"] = _best(lambda: list(rlds.read_episodes(dataset_dir)), repeats)
  return {"seconds": seconds, "npz MB": _megabytes(npz_dir), "rlds MB": _megabytes(dataset_dir)}


def main(argv):
  del argv
  sets = arena_episodes(_EPISODES.value, _STEPS.value)
  steps = _EPISODES.value * _STEPS.value
  print(f"{_EPISODES.value} episodes × {_STEPS.value} steps, best of {_REPEATS.value}")
  print(f"{'set':<11} {'case':<12} {'steps/s':>9} {'s':>7}   on disk")
  for kind, episode_list in sets.items():
    with tempfile.TemporaryDirectory() as root:
      result = bench_set(episode_list, root, _REPEATS.value)
    for case, seconds in result["seconds"].items():
      size = result["npz MB"] if case.startswith("npz") else result["rlds MB"]
      print(f"{kind:<11} {case:<12} {steps / seconds:>9,.0f} {seconds:>7.3f}   {size:.2f} MB")
  print(f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
  app.run(main)
