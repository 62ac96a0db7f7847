"""mbjax's side of each row of the peer harness (`experiments/bench_peers.py`): one worker of
`experiments/peers/protocol.py`, run in mbjax's own venv.

  python -m experiments.peers.mbjax_side --row=ppo_learner [--rounds=5]

Without the harness (`--rounds`), it times that many rounds itself and prints one JSON line
each: a benchmark of mbjax alone (e.g. the learner-only PPO update at upstream's shape).
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_enable_concurrency_optimized_scheduler=false")

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from experiments.peers import protocol  # noqa: E402

ROWS = ("ppo_cartpole", "world_model", "world_model_upstream_layers", "ppo_learner", "idm",
        "reward", "video", "replay", "dreamer")
# Upstream MetaBonk's PPO learner (src/learner/ppo.py, PPOConfig): observation 204, a shared
# 256-256 ReLU trunk, continuous 2 + one discrete branch of 33, rollout 2048, 3 epochs of
# minibatches of 256.
UPSTREAM_PPO = dict(obs_dim=204, hidden=256, continuous=2, branches=(33,), rollout=2048,
                    epochs=3, minibatch=256)


def upstream_ppo_parameter_count(obs_dim: int, hidden: int, continuous: int,
                                 branches: tuple[int, ...]) -> int:
  """Parameters of upstream's ActorCritic: trunk obs→h→h, heads μ, log σ, logits, value."""
  trunk = (obs_dim + 1) * hidden + (hidden + 1) * hidden
  heads = (hidden + 1) * continuous + continuous + sum((hidden + 1) * n for n in branches)
  return trunk + heads + hidden + 1


def _ppo_cartpole(args):
  from configs import cartpole_ppo
  from mbjax.envs import registry
  from mbjax.train import anakin

  cfg = cartpole_ppo.get_config()
  env, env_params = registry.make(cfg.env.name, **cfg.env.kwargs.to_dict())
  trainer = anakin.make_train(cfg, env, env_params)
  steps = trainer.num_updates * trainer.env_steps_per_update
  train = jax.jit(trainer.train).lower(jax.random.PRNGKey(0)).compile()
  jax.block_until_ready(train(jax.random.PRNGKey(0)))

  def run(index):
    start = time.perf_counter()
    _, metrics = jax.block_until_ready(train(jax.random.PRNGKey(index)))
    seconds = time.perf_counter() - start
    final = float(anakin.final_episode_return(metrics, 10))
    return {"rates": {"env_steps": steps / seconds}, "extra": {"final_return": final}}

  return run, {"env_steps": steps, "jax": jax.__version__}


def _world_model(args, upstream_layers: bool):
  import jax.numpy as jnp

  from experiments import throughput
  from mbjax.agents import world_model as wm_lib
  from mbjax.envs.bonk_arena import BonkArena

  env = BonkArena()
  spec = env.action_spec(env.default_params())
  cfg = throughput.upstream_world_model_config(upstream_layers)  # the world model alone
  call, compile_s, transitions = throughput.compile_model_update(
      cfg, (throughput.UPSTREAM_OBS_DIM,), jnp.float32, spec, 16, shard=False)
  jax.block_until_ready(call())
  run = protocol.steps_round(lambda: jax.block_until_ready(call()), args.steps, transitions,
                             "transitions")
  # The peer's model takes the same action vectors (`--action_dim`).
  return run, {"obs_dim": throughput.UPSTREAM_OBS_DIM, "batch": 16, "length": 64,
               "action_dim": wm_lib.action_vector_size(spec), "compile_s": compile_s}


def _dreamer(args):
  """The model-based update at DreamerV3's size1m shape (`throughput.size1m_config`): the
  world-model step and the dream actor-critic imagining 15 steps from every posterior, on
  16 × 64 BonkArena vector steps — DreamerV3's train step at its batch."""
  import jax.numpy as jnp

  from experiments import throughput
  from mbjax.envs.bonk_arena import BonkArena

  env = BonkArena()
  params = env.default_params()
  cfg = throughput.size1m_config()
  call, compile_s, replayed = throughput.compile_model_update(
      cfg, env.observation_shape(params), jnp.float32, env.action_spec(params), 16,
      shard=False)
  jax.block_until_ready(call())
  run = protocol.steps_round(lambda: jax.block_until_ready(call()), args.steps, replayed,
                             "replayed_steps")
  wm = cfg.world_model
  return run, {"deter": wm.deter, "stoch": wm.stoch, "classes": wm.classes,
               "horizon": cfg.dream.horizon, "compile_s": compile_s}


def _ppo_learner(args):
  from experiments import throughput
  from mbjax.envs.spaces import HybridActionSpec

  up = UPSTREAM_PPO
  spec = HybridActionSpec(up["continuous"], up["branches"])
  upstream_params = upstream_ppo_parameter_count(up["obs_dim"], up["hidden"], up["continuous"],
                                                 up["branches"])
  hidden = (throughput.width_for_parameters(up["obs_dim"], spec, upstream_params)
            if args.equal_params else up["hidden"])
  num_envs = args.envs
  call, compile_s, info = throughput.compile_ppo_learner_update(
      up["obs_dim"], spec, hidden, up["rollout"] // num_envs, num_envs, up["epochs"],
      up["minibatch"])
  jax.block_until_ready(call())
  run = protocol.steps_round(lambda: jax.block_until_ready(call()), args.steps,
                             info["transitions"], "transitions")
  return run, {"hidden": hidden, "parameters": info["parameters"],
               "upstream_parameters": upstream_params, "envs": num_envs,
               "compile_s": compile_s}


def _random_frames(count: int, side: int) -> np.ndarray:
  return np.random.default_rng(0).integers(0, 256, (count, side, side, 3), dtype=np.uint8)


def _idm(args):
  from configs import video_pretrain
  from mbjax.envs.spaces import HybridActionSpec
  from mbjax.offline import idm_labelling, idm_training
  from mbjax.offline.pipeline import config as pipeline_config

  cfg = pipeline_config.idm_config(video_pretrain.get_config("arena"))
  spec = HybridActionSpec(continuous_dim=2, branches=(4,))  # BonkArena's
  frames = _random_frames(args.frames, args.size)
  state = idm_training.init(jax.random.PRNGKey(0), cfg, frames.shape[1:], spec)
  idm_labelling.label(state.params, cfg, spec, frames)

  def run(index):
    del index
    return {"rates": {"frames": protocol.timed_rate(
        lambda: idm_labelling.label(state.params, cfg, spec, frames), len(frames))}}

  return run, {"frames": len(frames), "size": args.size, "label_batch": cfg.label_batch,
               "window": cfg.window}


def _reward(args):
  from configs import video_pretrain
  from mbjax.offline import reward_model
  from mbjax.offline.pipeline import config as pipeline_config

  cfg = pipeline_config.reward_config(video_pretrain.get_config("arena"))
  frames = _random_frames(args.frames, args.size)
  state = reward_model.init(jax.random.PRNGKey(0), cfg, frames.shape[1:])
  reward_model.score(state.params, cfg, frames)

  def run(index):
    del index
    return {"rates": {"frames": protocol.timed_rate(
        lambda: reward_model.score(state.params, cfg, frames), len(frames))}}

  return run, {"frames": len(frames), "size": args.size, "score_batch": cfg.score_batch}


def _video(args):
  from mbjax.offline import chunks, video

  if not args.clip:
    raise ValueError("--row=video needs --clip (a video file; bench_peers makes one)")
  work = tempfile.mkdtemp(prefix="peers-video-")
  cfg = video.ConvertConfig(fps=args.fps, size=(args.size, args.size), audio=False,
                            chunk_frames=args.chunk_frames, compression=args.compression)

  def convert():
    out = os.path.join(work, "chunks")
    shutil.rmtree(out, ignore_errors=True)
    manifest = video.convert_many([(args.clip, os.path.basename(args.clip))], out, cfg)
    entry = manifest["sources"][os.path.basename(args.clip)]
    if entry["status"] != "done":
      raise RuntimeError(f"conversion failed: {entry}")
    size = sum(os.path.getsize(p) for p in chunks.list_chunks(out))
    return entry["frames"], size

  convert()
  return protocol.conversion_round(convert), {"compression": args.compression,
                                              "chunk_frames": args.chunk_frames}


def _replay(args):
  from mbjax.data import replay

  capacity = 500_000
  state = replay.init(jnp.zeros((32, 32, 3), jnp.uint8), capacity)
  batch = jnp.ones((128, 32, 32, 3), jnp.uint8)
  state = jax.block_until_ready(replay.add_jit(state, batch))
  holder = {"state": state}
  sample = jax.jit(replay.sample, static_argnums=2)
  key = jax.random.PRNGKey(0)
  # Sampled as a full buffer (the slots hold zeros or ones: the values do not matter). Made
  # after each round's adds, which donate the buffer it shares.
  full = lambda: holder["state"].replace(size=jnp.int32(capacity))
  jax.block_until_ready(sample(full(), key, 256))

  def add():
    holder["state"] = replay.add_jit(holder["state"], batch)

  def run(index):
    del index
    start = time.perf_counter()
    for _ in range(args.steps):
      add()
    jax.block_until_ready(holder["state"])
    add_s = (time.perf_counter() - start) / args.steps
    start, state, out = time.perf_counter(), full(), None
    for _ in range(args.steps):
      out = sample(state, key, 256)
    jax.block_until_ready(out)
    sample_s = (time.perf_counter() - start) / args.steps
    return {"rates": {"add": 1 / add_s, "sample": 1 / sample_s},
            "extra": {"add_ms": add_s * 1e3, "sample_ms": sample_s * 1e3}}

  return run, {"capacity": capacity, "item": "uint8[32, 32, 3]", "add_batch": 128,
               "sample_batch": 256}


def make_row(args):
  if args.row == "ppo_cartpole":
    return _ppo_cartpole(args)
  if args.row in ("world_model", "world_model_upstream_layers"):
    return _world_model(args, upstream_layers=args.row == "world_model_upstream_layers")
  builders = {"ppo_learner": _ppo_learner, "idm": _idm, "reward": _reward, "video": _video,
              "replay": _replay, "dreamer": _dreamer}
  return builders[args.row](args)


def parse(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--row", choices=ROWS, required=True)
  parser.add_argument("--rounds", type=int, default=0,
                      help="Time this many rounds alone and print them (0: serve the harness).")
  parser.add_argument("--steps", type=int, default=5, help="Updates/calls per round.")
  parser.add_argument("--equal_params", action="store_true",
                      help="ppo_learner: the widest network with at most upstream's parameters.")
  parser.add_argument("--envs", type=int, default=16,
                      help="ppo_learner: envs of the 2048-step rollout (2048 / envs steps each).")
  parser.add_argument("--frames", type=int, default=512, help="idm, reward: frames per round.")
  parser.add_argument("--size", type=int, default=224, help="idm, reward, video: frame side.")
  parser.add_argument("--clip", default="", help="video: the source video.")
  parser.add_argument("--fps", type=float, default=30.0, help="video: output frame rate.")
  parser.add_argument("--chunk_frames", type=int, default=300, help="video: frames per chunk.")
  parser.add_argument("--compression", default="auto", help="video: chunks.COMPRESSION_LEVELS.")
  return parser.parse_args(argv)


def main():
  args = parse()
  if args.rounds:
    run, info = make_row(args)
    print(json.dumps(info))
    for index in range(args.rounds):
      print(json.dumps(run(index)), flush=True)
    return
  protocol.serve(lambda: make_row(args))


if __name__ == "__main__":
  main()
