"""PPO throughput and final return: `python -m experiments.bench_ppo [--config=...]`.

Prints (1) compile time and steady-state env-steps/s (acting + learning) of one seed's whole
run as a single jitted program, best of `--repeats`, and (2) the final return of `--seeds`
seeds trained together under `vmap`. PureJaxRL's `ppo.py` beside it, in the same run:
`experiments/bench_peers.py --row=ppo_cartpole`.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_enable_concurrency_optimized_scheduler=false")

import platform  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from mbjax.envs import registry  # noqa: E402
from mbjax.train import anakin  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/cartpole_ppo.py",
                                          "Experiment config.", lock_config=True)
_SEEDS = flags.DEFINE_integer("seeds", 8, "Seeds for the final-return measurement (0: skip).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs for the throughput measurement.")
_FINAL_UPDATES = flags.DEFINE_integer("final_updates", 10,
                                      "Updates at the end whose episodes give the final return.")


def _timed_compile(fn, *args):
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  return compiled, time.perf_counter() - start


def main(argv):
  del argv
  cfg = _CONFIG.value
  env, env_params = registry.make(cfg.env.name, **cfg.env.kwargs.to_dict())
  trainer = anakin.make_train(cfg, env, env_params)
  total_steps = trainer.num_updates * trainer.env_steps_per_update
  print(f"host: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"jax {jax.__version__} on {jax.devices()[0].platform}")
  print(f"config: {cfg.env.name}, {cfg.num_envs} envs x {cfg.ppo.num_steps} steps, "
        f"{trainer.num_updates} updates = {total_steps:,} env steps")

  key = jax.random.PRNGKey(cfg.seed)
  train, compile_seconds = _timed_compile(trainer.train, key)
  timings = []
  for _ in range(_REPEATS.value):
    start = time.perf_counter()
    jax.block_until_ready(train(key))
    timings.append(time.perf_counter() - start)
  best = min(timings)
  print(f"1 seed : compile {compile_seconds:.1f} s | run {best:.2f} s (best of "
        f"{len(timings)}: {', '.join(f'{t:.2f}' for t in timings)}) | "
        f"{total_steps / best:,.0f} env-steps/s")

  if _SEEDS.value:
    keys = jax.random.split(key, _SEEDS.value)
    train_seeds, compile_seconds = _timed_compile(jax.vmap(trainer.train), keys)
    start = time.perf_counter()
    _, metrics = jax.block_until_ready(train_seeds(keys))
    seconds = time.perf_counter() - start
    finals = np.asarray(anakin.final_episode_return(metrics, _FINAL_UPDATES.value))
    print(f"{_SEEDS.value} seeds: compile {compile_seconds:.1f} s | run {seconds:.2f} s | "
          f"{_SEEDS.value * total_steps / seconds:,.0f} env-steps/s")
    print(f"final return (last {_FINAL_UPDATES.value} updates) per seed: "
          f"{np.array2string(finals, precision=1)}; mean {finals.mean():.1f}")


if __name__ == "__main__":
  app.run(main)
