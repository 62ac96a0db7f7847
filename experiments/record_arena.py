"""Record BonkArena episodes as MP4 + ground-truth `.npz`:
`python -m experiments.record_arena --policy=scripted --episodes=2 --out_dir=runs/arena_videos`

Writes `<out_dir>/<policy>_<i>.mp4` and `<out_dir>/<policy>_<i>.npz` per episode (format in
`mbjax/envs/bonk_arena/recording.py`). A trained agent plugs in through `make_policy`: any
`policy_fn(key, obs, mask) -> HybridAction` over this env's observations works.

A run trained through the bridge (`configs/bridge_ppo.py`) plays the shim's observations, not
BonkArena's: it is recorded playing a lock-step reference server launched here (its mode
action, a frame with every state), as `<policy>_<i>.mp4` plus `<policy>_<i>.npz` holding
`rewards` f32[T] (the shim's), `actions_continuous` f32[T, 2] and `actions_discrete`
i32[T, 1].
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_enable_concurrency_optimized_scheduler=false")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from experiments import cli  # noqa: E402
from mbjax import files  # noqa: E402
from mbjax.envs.bonk_arena import BonkArena, make_scripted_policy, random_policy  # noqa: E402
from mbjax.envs.bonk_arena import recording  # noqa: E402
from mbjax.train import evaluate  # noqa: E402
from mbjax.train import metrics, sebulba_actor  # noqa: E402
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


def make_policy(name: str, env: BonkArena, trained=None):
  """The extension point: returns `policy_fn(key, obs, mask) -> HybridAction`, or for the
  "checkpoint" policy (`trained`: `restore_trained`'s (trainer, runner)) the run's served
  policy (`mbjax.train.evaluate.Policy`, with a carry)."""
  if name == "scripted":
    return make_scripted_policy(env)
  if name == "random":
    return random_policy
  trainer, runner = trained
  if trainer.cfg.env.name != "bonk_arena":
    raise app.UsageError(f"{_CHECKPOINT.value} trained on {trainer.cfg.env.name!r}, not "
                         "bonk_arena")
  agent, aux = jax.device_get((runner.agent, runner.aux))
  return evaluate.trained_policy(trainer, agent, aux)


def record_bridge_run(policy, state) -> None:
  cfg = policy.cfg
  overrides = dict(mode="lockstep", frame_hz=cfg.bridge.update_hz, frame_format="raw",
                   pixel_size=_PIXEL_SIZE.value)
  agent = jax.device_get(state.agent)
  with sebulba_actor.launched_servers(cfg, 1, **overrides) as ports:
    for i in range(_EPISODES.value):
      episode = sebulba_actor.evaluate(cfg, ports, agent, cfg.bridge.max_episode_steps,
                                       seed=_SEED.value + i, record=True)
      path = os.path.join(_OUT_DIR.value, f"{_POLICY.value}_{i:03d}.mp4")
      recording.write_mp4(episode["frames"], path, _FPS.value)
      with files.atomic_open(os.path.splitext(path)[0] + ".npz", "wb") as f:
        np.savez(f, **{k: episode[k] for k in ("rewards", "actions_continuous",
                                               "actions_discrete")})
      print(f"{path}: {len(episode['frames'])} steps, return {episode['rewards'].sum():.2f}, "
            f"{'died' if episode['deaths'] else 'survived'} (reference server)")


def main(argv):
  del argv
  metrics.quiet_library_logging()
  trained = None
  if _POLICY.value == "checkpoint":
    if not _CHECKPOINT.value:
      raise app.UsageError("--policy=checkpoint needs --checkpoint=<a train workdir>")
    trained = run_lib.restore_trained(_CHECKPOINT.value)
    if trained[0].cfg.bridge.enabled:
      os.makedirs(_OUT_DIR.value, exist_ok=True)
      return record_bridge_run(*trained)
  env = BonkArena(observation=_OBSERVATION.value, pixel_size=_PIXEL_SIZE.value)
  params = env.default_params().for_role(_ROLE.value)
  policy_fn = make_policy(_POLICY.value, env, trained)
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
