"""Ground-truth gameplay video for validating the offline pipeline: BonkArena episodes
played by several policies and drawn in several looks, each as MP4 + the true per-frame
`.npz`, and optionally Atari clips (ale-py) as an out-of-domain source.

Episode i is played by policy `policies[i % P]` in look `variants[(i // P) % V]` with key
fold_in(PRNGKey(seed), i), so every policy meets every look once N >= P·V. Files:
`<out_dir>/<i:04d>_<policy>_<camera>_<palette>.{mp4,npz}` (npz layout in
`mbjax/envs/bonk_arena/recording.py`; its `meta` names the policy, look and seed), Atari
clips `atari_<game>_<j>.{mp4,npz}`, and `dataset.json` listing every episode with its
length, return and number of menu frames. Rerunning skips the episodes already written.

True progress, what the reward model's scores are ranked against: BonkArena's `xp_total`
(all XP collected so far); an Atari clip's `score`, the game score before each frame
(ale-py's rewards summed from the clip's start: the points the game counts up, in Pong
the player's minus the opponent's). The Atari clips play uniformly random actions.

Looks: `variants` entries are `camera:palette` (camera fixed|follow, palette
default|desert); `pixel_size` sets the video side and `upgrade_hud` draws the per-card
upgrade counts an IDM needs to see which card was chosen.

Menu dwell: the baseline and trained policies pick a card on the first menu frame, so a
1500-step episode has only ~10 menu frames. A player reads the cards first; with
`menu_pick_prob=p` every policy waits (no-op) on each menu frame and picks with
probability p, a geometric dwell of mean 1/p frames (0.1: 10 frames, 1/3 s at 30 fps), so
menu frames are common enough to measure models on.

Used by `experiments/make_ground_truth.py` and the pipeline's `ground_truth` phase.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from mbjax import files
from mbjax.envs.bonk_arena import BonkArena, make_scripted_policy, random_policy
from mbjax.envs.bonk_arena import game, recording, render
from mbjax.envs.spaces import HybridAction
from mbjax.train import evaluate
from mbjax.train import run as run_lib


@dataclasses.dataclass(frozen=True)
class Settings:
  """What to record (defaults: a small two-policy, four-look set)."""

  episodes: int = 12
  policies: tuple[str, ...] = ("scripted", "random")  # cycled: scripted | random | checkpoint
  checkpoint: str | None = None  # train workdir for the checkpoint policy
  variants: tuple[str, ...] = ("fixed:default", "follow:default", "fixed:desert",
                               "follow:desert")  # camera:palette looks, cycled
  pixel_size: int = 128  # video frame side (even)
  view_fraction: float = 0.5  # follow camera: visible part of the arena side
  upgrade_hud: bool = True
  time_limit: int | None = None  # cap on episode steps (None: the env's)
  fps: int = 30  # one frame per env step
  seed: int = 0
  menu_pick_prob: float = 0.1  # chance per menu frame that the pick is taken, else no-op
  atari_games: tuple[str, ...] = ()  # ale-py ROM ids (e.g. pong, breakout)
  atari_clips: int = 2  # clips per Atari game
  atari_steps: int = 900  # recorded frames per Atari clip


def make_policy(name: str, checkpoint: str | None):
  """(env the policy acts in, policy_fn). The env decides the observations only; videos
  are drawn by a separate renderer."""
  if name == "scripted":
    env = BonkArena(observation="vector")
    return env, make_scripted_policy(env)
  if name == "random":
    return BonkArena(observation="vector"), random_policy
  if name != "checkpoint":
    raise ValueError(f"unknown policy {name!r}; use scripted, random or checkpoint")
  if not checkpoint:
    raise ValueError("the checkpoint policy needs a checkpoint (a train workdir)")
  trainer, runner = run_lib.restore_trained(checkpoint)
  if trainer.cfg.env.name != "bonk_arena":
    raise ValueError(f"{checkpoint} trained on {trainer.cfg.env.name!r}, not bonk_arena")
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
    raise ValueError(f"variant {text!r}: expected camera:palette with camera in "
                         f"{render.CAMERAS} and palette in {sorted(render.PALETTES)}")
  return camera, palette


def record_atari_clip(game_name: str, seed: int, steps: int, path: str, fps: int) -> dict:
  """A random-action Atari clip (action repeat 2: 30 fps of the 60 Hz game) to MP4 + `.npz`
  with actions_discrete i32[T, 1] (minimal action set index), rewards f32[T], score f32[T]
  (points before frame t) and lives i32[T]."""
  try:
    import ale_py
  except ImportError:
    raise ImportError("Atari clips need ale-py (pip install -c constraints.txt "
                      "-e '.[envs]')") from None
  ale = ale_py.ALEInterface()
  ale.setLoggerMode(ale_py.LoggerMode.Error)
  ale.setInt("random_seed", seed)
  ale.loadROM(ale_py.roms.get_rom_path(game_name))
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
           "meta": np.asarray(json.dumps({"source": "atari", "game": game_name, "seed": seed,
                                          "action_repeat": 2}))}
  with files.atomic_open(os.path.splitext(path)[0] + ".npz", "wb") as f:
    np.savez(f, **truth)
  return {"length": len(frames), "frames": len(frames), "return": float(rewards.sum()),
          "menu_frames": 0}


def check_rules_version(index: dict, index_path: str) -> None:
  """Raises ValueError if any BonkArena episode of a dataset index was recorded under other
  game rules than this code plays (an entry without `rules_version` predates version 2):
  its rewards and episode ends would be silently compared with the current game's; or
  before its videos showed the death screen (no `death_screen` entry): a death classifier
  trained on both would learn two looks of a death."""
  undrawn = [stem for stem, entry in index.items()
             if entry.get("source") == "bonk_arena" and not entry.get("death_screen")]
  if undrawn:
    raise ValueError(
        f"{index_path}: {len(undrawn)} episode(s) (e.g. {undrawn[0]!r}) were recorded before "
        "BonkArena videos showed the death screen. Record into a new directory (or delete "
        "the old episodes) instead of mixing them.")
  stale = {stem: entry.get("rules_version", 1) for stem, entry in index.items()
           if entry.get("source") == "bonk_arena"
           and entry.get("rules_version", 1) != game.RULES_VERSION}
  if stale:
    stem, version = next(iter(stale.items()))
    raise ValueError(
        f"{index_path}: {len(stale)} episode(s) (e.g. {stem!r}) were recorded under BonkArena "
        f"rules version {version}; this code plays version {game.RULES_VERSION}. Record into "
        "a new directory (or delete the old episodes) instead of mixing rules.")


def record_dataset(out_dir: str, settings: Settings,
                   progress: Callable[[str], None] | None = None) -> dict:
  """Records what `settings` asks for into `out_dir` (skipping what is already there);
  returns the dataset index (also written to `<out_dir>/dataset.json`)."""
  s = settings
  os.makedirs(out_dir, exist_ok=True)
  index_path = os.path.join(out_dir, "dataset.json")
  index = json.load(open(index_path)) if os.path.exists(index_path) else {}
  check_rules_version(index, index_path)
  variants = [parse_variant(v) for v in s.variants]
  policies = {}  # name -> (env, policy_fn), built once
  episode_fns = {}  # (policy, variant) -> jitted episode function
  for i in range(s.episodes):
    name = s.policies[i % len(s.policies)]
    camera, palette = variants[(i // len(s.policies)) % len(variants)]
    stem = f"{i:04d}_{name}_{camera}_{palette}"
    path = os.path.join(out_dir, stem + ".mp4")
    if stem in index and os.path.exists(path):
      continue
    if name not in policies:
      policies[name] = make_policy(name, s.checkpoint)
    env, policy_fn = policies[name]
    params = env.default_params()
    if s.time_limit:
      params = params.replace(time_limit=s.time_limit)
    renderer = render.Renderer(s.pixel_size, camera, palette, s.upgrade_hud, s.view_fraction)
    if (name, camera, palette) not in episode_fns:
      episode_fns[(name, camera, palette)] = recording.make_episode_fn(
          env, params, with_menu_dwell(policy_fn, s.menu_pick_prob), renderer)
    meta = {"source": "bonk_arena", "rules_version": game.RULES_VERSION,
            "policy": name, "checkpoint": s.checkpoint,
            "seed": s.seed, "episode": i, "pixel_size": s.pixel_size,
            "camera": camera, "palette": palette, "upgrade_hud": s.upgrade_hud,
            "view_fraction": renderer.view_fraction, "menu_pick_prob": s.menu_pick_prob,
            "death_screen": True}
    key = jax.random.fold_in(jax.random.PRNGKey(s.seed), i)
    summary = recording.record_episode(episode_fns[(name, camera, palette)], key, path,
                                       s.fps, meta)
    index[stem] = {**meta, **summary}
    files.write_json(index_path, index, indent=1)
    if progress:
      progress(f"{stem}: {summary['length']} steps ({summary['frames']} frames), return "
               f"{summary['return']:.2f}, {summary['menu_frames']} menu frames")
  for game_name in s.atari_games:
    for j in range(s.atari_clips):
      stem = f"atari_{game_name}_{j}"
      path = os.path.join(out_dir, stem + ".mp4")
      if stem in index and os.path.exists(path):
        continue
      summary = record_atari_clip(game_name, s.seed + j, s.atari_steps, path, s.fps)
      index[stem] = {"source": "atari", "game": game_name, "seed": s.seed + j, **summary}
      files.write_json(index_path, index, indent=1)
      if progress:
        progress(f"{stem}: {summary['length']} frames, return {summary['return']:.0f}")
  return index
