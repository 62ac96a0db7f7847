"""Record BonkArena episodes as MP4 + ground-truth `.npz`:
`python -m experiments.record_arena --policy=scripted --episodes=2 --out_dir=runs/arena_videos`

Writes `<out_dir>/<policy>_<i>.mp4` and `<out_dir>/<policy>_<i>.npz` per episode (format in
`mbjax/envs/bonk_arena/recording.py`). A trained agent plugs in through `make_policy`: any
`policy_fn(key, obs, mask) -> HybridAction` over this env's observations works.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_enable_concurrency_optimized_scheduler=false")

import jax  # noqa: E402
from absl import app, flags  # noqa: E402

from experiments import cli  # noqa: E402
from mbjax.envs.bonk_arena import BonkArena, make_scripted_policy, random_policy  # noqa: E402
from mbjax.envs.bonk_arena import recording  # noqa: E402
from mbjax.train import evaluate  # noqa: E402
from mbjax.train import run as run_lib  # noqa: E402

_POLICY = flags.DEFINE_enum("policy", "scripted", ["scripted", "random", "checkpoint"],
                            "Who plays.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None,
                                  "Workdir of a training run, for --policy=checkpoint.")
_EPISODES = flags.DEFINE_integer("episodes", 2, "Episodes to record.", lower_bound=1)
_OUT_DIR = flags.DEFINE_string("out_dir", "runs/arena_videos", "Where videos and .npz go.")
_SEED = flags.DEFINE_integer("seed", 0, "Episode i uses fold_in(PRNGKey(seed), i).")
_PIXEL_SIZE = flags.DEFINE_integer("pixel_size", 128, "Video frame side (even).")
_OBSERVATION = flags.DEFINE_enum("observation", "vector", ["vector", "pixels"],
                                 "What the policy sees (the scripted policy needs vector).")
_FPS = flags.DEFINE_integer("fps", 30, "Video frame rate (one frame per env step).",
                           lower_bound=1)
_ROLE = flags.DEFINE_string("role", "balanced", "Reward weighting recorded in `rewards`.")


def make_policy(name: str, env: BonkArena, checkpoint: str | None):
  """The extension point: returns `policy_fn(key, obs, mask) -> HybridAction`."""
  if name == "scripted":
    return make_scripted_policy(env)
  if name == "random":
    return random_policy
  if not checkpoint:
    raise app.UsageError("--policy=checkpoint needs --checkpoint=<a train workdir>")
  trainer, runner = run_lib.restore_trained(checkpoint)
  if trainer.cfg.env.name != "bonk_arena":
    raise app.UsageError(f"{checkpoint} trained on {trainer.cfg.env.name!r}, not bonk_arena")
  return evaluate.stateless_policy(trainer, jax.device_get(runner.agent))


def main(argv):
  del argv
  env = BonkArena(observation=_OBSERVATION.value, pixel_size=_PIXEL_SIZE.value)
  params = env.default_params().for_role(_ROLE.value)
  policy_fn = make_policy(_POLICY.value, env, _CHECKPOINT.value)
  episode_fn = recording.make_episode_fn(env, params, policy_fn)
  os.makedirs(_OUT_DIR.value, exist_ok=True)
  for i in range(_EPISODES.value):
    path = os.path.join(_OUT_DIR.value, f"{_POLICY.value}_{i:03d}.mp4")
    key = jax.random.fold_in(jax.random.PRNGKey(_SEED.value), i)
    summary = recording.record_episode(episode_fn, key, path, _FPS.value)
    print(f"{path}: {summary['length']} steps, return {summary['return']:.2f}, "
          f"{'died' if summary['terminated'] else 'survived'}")


if __name__ == "__main__":
  cli.run(main)
