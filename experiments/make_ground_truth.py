"""A ground-truth video dataset for the offline pipeline: BonkArena episodes played by
several policies and drawn in several looks, each as MP4 + the true per-frame `.npz`, and
optionally Atari clips (ale-py) as an out-of-domain source:

  python -m experiments.make_ground_truth --out_dir=runs/ground_truth --episodes=24 \\
      --policies=scripted,random,checkpoint --checkpoint=runs/arena_ppo \\
      --variants=fixed:default,follow:default,fixed:desert,follow:desert --atari_games=pong

Episode i is played by policy `policies[i % P]` in look `variants[(i // P) % V]` with key
fold_in(PRNGKey(seed), i), so every policy meets every look once N >= P·V. Files:
`<out_dir>/<i:04d>_<policy>_<camera>_<palette>.{mp4,npz}` (npz layout in
`mbjax/envs/bonk_arena/recording.py`; its `meta` names the policy, look and seed), Atari
clips `atari_<game>_<j>.{mp4,npz}`, and `dataset.json` listing every episode with its
length, return and number of menu frames. Rerunning skips the episodes already written.

Looks: `--variants` entries are `camera:palette` (camera fixed|follow, palette
default|desert); `--pixel_size` sets the video side (a second resolution is a second run
into another directory) and `--upgrade_hud` (on by default) draws the per-card upgrade
counts the IDM needs to see which card was chosen.

Menu dwell: the baseline and trained policies pick a card on the first menu frame, so a
1500-step episode has only ~10 menu frames. A player reads the cards first; with
`--menu_pick_prob=p` every policy waits (no-op) on each menu frame and picks with
probability p, a geometric dwell of mean 1/p frames (default 0.1: 10 frames, 1/3 s at 30
fps), so menu frames are common enough to measure models on.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_enable_concurrency_optimized_scheduler=false")

import json  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from mbjax.envs.bonk_arena import BonkArena, make_scripted_policy, random_policy  # noqa: E402
from mbjax.envs.bonk_arena import game, recording, render  # noqa: E402
from mbjax.envs.spaces import HybridAction  # noqa: E402
from mbjax.train import evaluate  # noqa: E402
from mbjax.train import run as run_lib  # noqa: E402

_OUT_DIR = flags.DEFINE_string("out_dir", "runs/ground_truth", "Where the dataset goes.")
_EPISODES = flags.DEFINE_integer("episodes", 12, "BonkArena episodes in all.")
_POLICIES = flags.DEFINE_list("policies", ["scripted", "random"],
                              "Policies, cycled: scripted, random, checkpoint.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Train workdir for the checkpoint policy.")
_VARIANTS = flags.DEFINE_list("variants", ["fixed:default", "follow:default", "fixed:desert",
                                           "follow:desert"], "camera:palette looks, cycled.")
_PIXEL_SIZE = flags.DEFINE_integer("pixel_size", 128, "Video frame side (even).")
_VIEW_FRACTION = flags.DEFINE_float("view_fraction", 0.5, "Follow camera: visible part of the "
                                    "arena side (smaller: more zoom, faster apparent motion).")
_UPGRADE_HUD = flags.DEFINE_bool("upgrade_hud", True, "Draw the per-card upgrade counts.")
_TIME_LIMIT = flags.DEFINE_integer("time_limit", None, "Cap on episode steps (default: env's).")
_FPS = flags.DEFINE_integer("fps", 30, "Video frame rate (one frame per env step).")
_SEED = flags.DEFINE_integer("seed", 0, "Episode i uses fold_in(PRNGKey(seed), i).")
_MENU_PICK_PROB = flags.DEFINE_float("menu_pick_prob", 0.1,
                                     "Chance per menu frame that the policy's pick is taken "
                                     "(else no-op); 1 picks at once.")
_ATARI_GAMES = flags.DEFINE_list("atari_games", [], "ale-py ROM ids (e.g. pong, breakout).")
_ATARI_CLIPS = flags.DEFINE_integer("atari_clips", 2, "Clips per Atari game.")
_ATARI_STEPS = flags.DEFINE_integer("atari_steps", 900, "Recorded frames per Atari clip.")


def make_policy(name: str, checkpoint: str | None):
  """(env the policy acts in, policy_fn). The env decides the observations only; videos
  are drawn by a separate renderer."""
  if name == "scripted":
    env = BonkArena(observation="vector")
    return env, make_scripted_policy(env)
  if name == "random":
    return BonkArena(observation="vector"), random_policy
  if name != "checkpoint":
    raise app.UsageError(f"unknown policy {name!r}; use scripted, random or checkpoint")
  if not checkpoint:
    raise app.UsageError("--policies=checkpoint needs --checkpoint=<a train workdir>")
  trainer, runner = run_lib.restore_trained(checkpoint)
  if trainer.cfg.env.name != "bonk_arena":
    raise app.UsageError(f"{checkpoint} trained on {trainer.cfg.env.name!r}, not bonk_arena")
  env = BonkArena(**trainer.cfg.env.kwargs.to_dict())
  return env, evaluate.stateless_policy(trainer, jax.device_get(runner.agent))


def with_menu_dwell(policy_fn, pick_prob: float):
  """`policy_fn` that, on a menu frame, replaces its card pick by the no-op with
  probability 1 − pick_prob (stateless: the dwell is geometric)."""
  if pick_prob >= 1.0:
    return policy_fn

  def policy(key, obs, mask):
    act_key, wait_key = jax.random.split(key)
    action = policy_fn(act_key, obs, mask)
    menu_open = mask[0]  # cards are allowed only while the menu is open
    wait = menu_open & (jax.random.uniform(wait_key) >= pick_prob)
    noop = jnp.full_like(action.discrete, game.CARDS_PER_MENU)
    return HybridAction(action.continuous, jnp.where(wait, noop, action.discrete))

  return policy


def parse_variant(text: str) -> tuple[str, str]:
  camera, _, palette = text.partition(":")
  if camera not in render.CAMERAS or palette not in render.PALETTES:
    raise app.UsageError(f"variant {text!r}: expected camera:palette with camera in "
                         f"{render.CAMERAS} and palette in {sorted(render.PALETTES)}")
  return camera, palette


def _save_json(path: str, payload) -> None:
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
  with os.fdopen(fd, "w") as f:
    json.dump(payload, f, indent=1, sort_keys=True)
  os.replace(tmp, path)


def record_atari_clip(game: str, seed: int, steps: int, path: str, fps: int) -> dict:
  """A random-action Atari clip (action repeat 2: 30 fps of the 60 Hz game) to MP4 + `.npz`
  with actions_discrete i32[T, 1] (minimal action set index), rewards f32[T], score f32[T]
  (points before frame t) and lives i32[T]."""
  try:
    import ale_py
  except ImportError:
    raise app.UsageError("--atari_games needs ale-py (pip install -c constraints.txt "
                         "-e '.[envs]')") from None
  ale = ale_py.ALEInterface()
  ale.setLoggerMode(ale_py.LoggerMode.Error)
  ale.setInt("random_seed", seed)
  ale.loadROM(ale_py.roms.get_rom_path(game))
  actions = ale.getMinimalActionSet()
  rng = np.random.default_rng(seed)
  frames, chosen, rewards, lives = [], [], [], []
  for _ in range(steps):
    if ale.game_over():
      break
    frames.append(ale.getScreenRGB())
    lives.append(ale.lives())
    a = int(rng.integers(len(actions)))
    chosen.append(a)
    rewards.append(sum(ale.act(actions[a]) for _ in range(2)))
  rewards = np.asarray(rewards, np.float32)
  recording.write_mp4(np.stack(frames), path, fps)
  truth = {"actions_discrete": np.asarray(chosen, np.int32)[:, None], "rewards": rewards,
           "score": np.concatenate([[0.0], np.cumsum(rewards)[:-1]]).astype(np.float32),
           "lives": np.asarray(lives, np.int32), "fps": np.int32(fps),
           "meta": np.asarray(json.dumps({"source": "atari", "game": game, "seed": seed,
                                          "action_repeat": 2}))}
  tmp = os.path.splitext(path)[0] + ".npz.tmp"
  with open(tmp, "wb") as f:
    np.savez(f, **truth)
  os.replace(tmp, os.path.splitext(path)[0] + ".npz")
  return {"length": len(frames), "return": float(rewards.sum()), "menu_frames": 0}


def main(argv):
  del argv
  out_dir = _OUT_DIR.value
  os.makedirs(out_dir, exist_ok=True)
  index_path = os.path.join(out_dir, "dataset.json")
  index = json.load(open(index_path)) if os.path.exists(index_path) else {}
  variants = [parse_variant(v) for v in _VARIANTS.value]
  policies = {}  # name -> (env, policy_fn), built once
  episode_fns = {}  # (policy, variant) -> jitted episode function
  for i in range(_EPISODES.value):
    name = _POLICIES.value[i % len(_POLICIES.value)]
    camera, palette = variants[(i // len(_POLICIES.value)) % len(variants)]
    stem = f"{i:04d}_{name}_{camera}_{palette}"
    path = os.path.join(out_dir, stem + ".mp4")
    if stem in index and os.path.exists(path):
      continue
    if name not in policies:
      policies[name] = make_policy(name, _CHECKPOINT.value)
    env, policy_fn = policies[name]
    params = env.default_params()
    if _TIME_LIMIT.value:
      params = params.replace(time_limit=_TIME_LIMIT.value)
    renderer = render.Renderer(_PIXEL_SIZE.value, camera, palette, _UPGRADE_HUD.value,
                               _VIEW_FRACTION.value)
    if (name, camera, palette) not in episode_fns:
      episode_fns[(name, camera, palette)] = recording.make_episode_fn(
          env, params, with_menu_dwell(policy_fn, _MENU_PICK_PROB.value), renderer)
    meta = {"source": "bonk_arena", "policy": name, "checkpoint": _CHECKPOINT.value,
            "seed": _SEED.value, "episode": i, "pixel_size": _PIXEL_SIZE.value,
            "camera": camera, "palette": palette, "upgrade_hud": _UPGRADE_HUD.value,
            "view_fraction": renderer.view_fraction, "menu_pick_prob": _MENU_PICK_PROB.value}
    key = jax.random.fold_in(jax.random.PRNGKey(_SEED.value), i)
    summary = recording.record_episode(episode_fns[(name, camera, palette)], key, path,
                                       _FPS.value, meta)
    index[stem] = {**meta, **summary}
    _save_json(index_path, index)
    logging.info("%s: %d steps, return %.2f, %d menu frames", stem, summary["length"],
                 summary["return"], summary["menu_frames"])
  for game in _ATARI_GAMES.value:
    for j in range(_ATARI_CLIPS.value):
      stem = f"atari_{game}_{j}"
      path = os.path.join(out_dir, stem + ".mp4")
      if stem in index and os.path.exists(path):
        continue
      summary = record_atari_clip(game, _SEED.value + j, _ATARI_STEPS.value, path, _FPS.value)
      index[stem] = {"source": "atari", "game": game, "seed": _SEED.value + j, **summary}
      _save_json(index_path, index)
      logging.info("%s: %d frames, return %.0f", stem, summary["length"], summary["return"])
  lengths = [e["length"] for e in index.values()]
  print(f"{len(index)} episodes, {sum(lengths)} frames in {out_dir} (index: {index_path})")


if __name__ == "__main__":
  app.run(main)
