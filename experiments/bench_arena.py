"""BonkArena throughput: `python -m experiments.bench_arena`.

Random-policy env-steps/s of `--num_envs` envs under `jit(vmap)` (one `lax.scan` of
`--num_steps` steps per call), for vector and pixel observations, with and without in-line
auto-reset (every env computes its reset every step, as `VecEnv(reset_fraction=1)` does).
Observations are summed every step so XLA cannot skip computing them. Compile time is
printed apart from the steady-state rate (best of `--repeats` calls). XLA runs one scan on
one CPU thread, so `--devices=2` splits the envs over 2 simulated CPU devices (`pmap`), one
per core; the default 1 is the single-core figure. Targets on the
project's 2-core CPU: >= 500k steps/s (vector) and >= 20k steps/s (64x64 pixels); anchors:
gymnax CartPole ~3.8M, Craftax-Classic ~5k (written down once, not measured in the same run).
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_enable_concurrency_optimized_scheduler=false")

import platform  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
from absl import app, flags  # noqa: E402

from mbjax.envs.bonk_arena import BonkArena, random_policy  # noqa: E402
from mbjax.envs.bonk_arena.rollout import batched_rollout  # noqa: E402

_NUM_ENVS = flags.DEFINE_integer("num_envs", 1024, "Envs stepped together under vmap.")
_NUM_STEPS = flags.DEFINE_integer("num_steps", 200, "Steps per timed call (one lax.scan).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls after the compile.")
_MODES = flags.DEFINE_list("modes", ["vector", "pixels"], "Observation modes to time.")
_PIXEL_SIZE = flags.DEFINE_integer("pixel_size", 64, "Side of pixel observations.")
_DEVICES = flags.DEFINE_integer("devices", 1, "Simulated CPU devices to split the envs over.")
_TARGETS = {"vector": 500_000, "pixels": 20_000}


def main(argv):
  del argv
  devices = _DEVICES.value
  if devices > 1:  # read when the CPU backend starts, i.e. at the first jax.devices() below
    os.environ["XLA_FLAGS"] += f" --xla_force_host_platform_device_count={devices}"
  print(f"host: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"jax {jax.__version__} on {jax.devices()[0].platform}")
  n, t = _NUM_ENVS.value, _NUM_STEPS.value
  if n % devices:
    raise ValueError(f"--num_envs={n} must be divisible by --devices={devices}")
  print(f"{n} envs x {t} steps per call, random policy, {devices} device(s)")
  for mode in _MODES.value:
    env = BonkArena(observation=mode, pixel_size=_PIXEL_SIZE.value)
    params = env.default_params()
    for auto_reset in (False, True):
      run = batched_rollout(env, params, random_policy, n // devices, t,
                            auto_reset=auto_reset)
      keys = lambda i: jax.random.split(jax.random.PRNGKey(i), devices)
      run = jax.pmap(run) if devices > 1 else jax.jit(lambda k, run=run: run(k[0]))
      start = time.perf_counter()
      run = run.lower(keys(0)).compile()
      compile_s = time.perf_counter() - start
      jax.block_until_ready(run(keys(0)))  # warm-up (allocations)
      timings = []
      for i in range(_REPEATS.value):
        start = time.perf_counter()
        jax.block_until_ready(run(keys(i + 1)))
        timings.append(time.perf_counter() - start)
      rate = n * t / min(timings)
      shape = "x".join(str(d) for d in env.observation_shape(params))
      print(f"{mode:7s} obs {shape:9s} auto_reset={str(auto_reset):5s} | compile "
            f"{compile_s:4.1f} s | {rate:>11,.0f} env-steps/s (best of {len(timings)}: "
            f"{', '.join(f'{s * 1e3:.0f}' for s in timings)} ms) | target "
            f"{_TARGETS.get(mode, 0):,}")


if __name__ == "__main__":
  app.run(main)
