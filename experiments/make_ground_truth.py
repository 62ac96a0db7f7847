"""Records a ground-truth video dataset for the offline pipeline (what and how:
`mbjax/offline/ground_truth.py`):

  python -m experiments.make_ground_truth --out_dir=runs/ground_truth --episodes=24 \\
      --policies=scripted,random,checkpoint --checkpoint=runs/arena_ppo \\
      --variants=fixed:default,follow:default,fixed:desert,follow:desert --atari_games=pong
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_enable_concurrency_optimized_scheduler=false")

from absl import app, flags, logging  # noqa: E402

from experiments import cli  # noqa: E402
from mbjax.offline import ground_truth  # noqa: E402

_DEFAULTS = ground_truth.Settings()
_OUT_DIR = flags.DEFINE_string("out_dir", "runs/ground_truth", "Where the dataset goes.")
_EPISODES = flags.DEFINE_integer("episodes", _DEFAULTS.episodes, "BonkArena episodes in all.")
_POLICIES = flags.DEFINE_list("policies", list(_DEFAULTS.policies),
                              "Policies, cycled: scripted, random, checkpoint.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Train workdir for the checkpoint policy.")
_VARIANTS = flags.DEFINE_list("variants", list(_DEFAULTS.variants),
                              "camera:palette looks, cycled.")
_PIXEL_SIZE = flags.DEFINE_integer("pixel_size", _DEFAULTS.pixel_size, "Video frame side (even).")
_VIEW_FRACTION = flags.DEFINE_float("view_fraction", _DEFAULTS.view_fraction,
                                    "Follow camera: visible part of the arena side (smaller: "
                                    "more zoom, faster apparent motion).")
_UPGRADE_HUD = flags.DEFINE_bool("upgrade_hud", _DEFAULTS.upgrade_hud,
                                 "Draw the per-card upgrade counts.")
_TIME_LIMIT = flags.DEFINE_integer("time_limit", None, "Cap on episode steps (default: env's).")
_FPS = flags.DEFINE_integer("fps", _DEFAULTS.fps, "Video frame rate (one frame per env step).")
_SEED = flags.DEFINE_integer("seed", _DEFAULTS.seed, "Episode i uses fold_in(PRNGKey(seed), i).")
_MENU_PICK_PROB = flags.DEFINE_float("menu_pick_prob", _DEFAULTS.menu_pick_prob,
                                     "Chance per menu frame that the policy's pick is taken "
                                     "(else no-op); 1 picks at once.")
_ATARI_GAMES = flags.DEFINE_list("atari_games", [], "ale-py ROM ids (e.g. pong, breakout).")
_ATARI_CLIPS = flags.DEFINE_integer("atari_clips", _DEFAULTS.atari_clips, "Clips per Atari game.")
_ATARI_STEPS = flags.DEFINE_integer("atari_steps", _DEFAULTS.atari_steps,
                                    "Recorded frames per Atari clip.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  settings = ground_truth.Settings(
      episodes=_EPISODES.value, policies=tuple(_POLICIES.value), checkpoint=_CHECKPOINT.value,
      variants=tuple(_VARIANTS.value), pixel_size=_PIXEL_SIZE.value,
      view_fraction=_VIEW_FRACTION.value, upgrade_hud=_UPGRADE_HUD.value,
      time_limit=_TIME_LIMIT.value, fps=_FPS.value, seed=_SEED.value,
      menu_pick_prob=_MENU_PICK_PROB.value, atari_games=tuple(_ATARI_GAMES.value),
      atari_clips=_ATARI_CLIPS.value, atari_steps=_ATARI_STEPS.value)
  try:
    index = ground_truth.record_dataset(_OUT_DIR.value, settings, progress=logging.info)
  except (ValueError, ImportError) as e:
    raise app.UsageError(str(e)) from None
  lengths = [e["frames"] for e in index.values()]
  print(f"{len(index)} episodes, {sum(lengths)} frames in {_OUT_DIR.value} "
        f"(index: {os.path.join(_OUT_DIR.value, 'dataset.json')})")


if __name__ == "__main__":
  cli.run(main)
