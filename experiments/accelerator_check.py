"""GPU/TPU check: `python -m experiments.accelerator_check [--quick]` prints one table.

Run it through `launch/accelerator_check.sh cuda12|tpu`, which installs the accelerator
build first (BUILD.md). Rows, each with its compile time apart:
* PPO env-steps/s (acting + learning, as `experiments/train.py` runs an update) for each
  config in `--ppo_configs` with 4 and with 2048 envs, on one device;
* selective-scan forward+backward per path at L = 1k, 16k and 64k (batch 8, 64 channels,
  N 16: the motor-policy benchmark's shape; `mbjax.nets.ssm`);
* one world-model optimiser step on 16 windows × 64 steps at the default size, and at
  upstream MetaBonk's size and layers (the peer harness, `experiments/bench_peers.py`, times
  upstream's PyTorch update beside it).
`--rows=world_model` (or `ppo`, `scan`; repeatable) runs only those rows. `--quick` shrinks
everything (a few envs, short rollouts and scans, a tiny world model) so
that the whole check runs in about a minute on a CPU; that is how it is exercised where no
accelerator is available.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_enable_concurrency_optimized_scheduler=false")

import platform  # noqa: E402

import jax  # noqa: E402
from absl import app, flags  # noqa: E402

from configs import load_config  # noqa: E402
from experiments import throughput  # noqa: E402
from mbjax.agents import world_model as wm_lib  # noqa: E402
from mbjax.envs.bonk_arena import BonkArena  # noqa: E402
from mbjax.nets import ssm  # noqa: E402
from mbjax.train import config as config_lib  # noqa: E402

_QUICK = flags.DEFINE_bool("quick", False, "Tiny sizes: a smoke test of the check itself.")
_PPO_CONFIGS = flags.DEFINE_list("ppo_configs",
                                 ["configs/cartpole_ppo.py", "configs/arena_ppo.py"],
                                 "Configs whose PPO update is timed.")
_ENVS = flags.DEFINE_list("envs", ["4", "2048"], "Env counts for the PPO rows.")
_LENGTHS = flags.DEFINE_list("scan_lengths", ["1024", "16384", "65536"], "Scan lengths L.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per measurement.")
_ROWS = flags.DEFINE_multi_enum("rows", ["ppo", "scan", "world_model"],
                                ["ppo", "scan", "world_model"], "Which groups of rows to run.")

# --quick: what replaces the full sizes.
_QUICK_ENVS, _QUICK_STEPS, _QUICK_LENGTHS = (4, 16), 16, (64, 256)
_UPDATES_PER_CALL = 10  # PPO updates per timed call: small updates are dispatch-bound


def _ppo_rows(repeats: int):
  envs = _QUICK_ENVS if _QUICK.value else tuple(int(n) for n in _ENVS.value)
  paths = _PPO_CONFIGS.value[:1] if _QUICK.value else _PPO_CONFIGS.value
  for path in paths:
    for num_envs in envs:
      cfg = load_config(path)
      cfg.num_envs = num_envs
      if _QUICK.value:
        cfg.ppo.num_steps = _QUICK_STEPS
        cfg.ppo.num_minibatches = 1
      cfg.total_env_steps = 1_000 * num_envs * cfg.ppo.num_steps  # only sets the lr schedule
      result = throughput.ppo_update(cfg, 1, repeats, _UPDATES_PER_CALL)
      yield (f"PPO {cfg.env.name}, {num_envs} envs × {cfg.ppo.num_steps} steps",
             f"{result['env_steps_per_s']:,.0f} env-steps/s", result["compile_s"])


def _scan_rows(repeats: int):
  lengths = _QUICK_LENGTHS if _QUICK.value else tuple(int(n) for n in _LENGTHS.value)
  for length in lengths:
    inputs = throughput.scan_inputs(length)
    for path in ssm.SCAN_PATHS:
      result = throughput.scan_forward_backward(inputs, path, repeats)
      yield (f"selective scan fwd+bwd, L {length:,}, {path}",
             f"{1e3 * result['best_s']:.2f} ms", result["compile_s"])


def _world_model_rows(repeats: int):
  """One world-model step on 16 windows × 64 steps at the default size (BonkArena vectors),
  then at upstream MetaBonk's size and layers (its PyTorch update is timed beside this one by
  `experiments/bench_peers.py --row=world_model_upstream_layers`)."""
  env = BonkArena()
  params = env.default_params()
  action_size = wm_lib.action_vector_size(env.action_spec(params))
  batch, length = (4, 16) if _QUICK.value else (16, 64)
  for cfg, obs_dim, upstream in (
      (config_lib.base_config(), env.observation_shape(params)[0], False),
      (throughput.upstream_world_model_config(), throughput.UPSTREAM_OBS_DIM, True)):
    if _QUICK.value:
      cfg.world_model.update(deter=32, hidden=32, stoch=4,
                             classes=4 if cfg.world_model.classes else 0)
    result = throughput.world_model_update(cfg, obs_dim, action_size, batch, length, 1,
                                           repeats, shard=False)
    wm = cfg.world_model
    latents = f"{wm.stoch}×{wm.classes}" if wm.classes else f"Gaussian {wm.stoch}"
    name = (f"world-model step, {batch} × {length}, obs {obs_dim}, deter {wm.deter}, "
            f"{latents}" + (", upstream's layers" if upstream else ""))
    yield name, f"{1e3 * result['update_s']:.1f} ms", result["compile_s"]


def main(argv):
  del argv
  devices = jax.devices()
  print(f"jax {jax.__version__}, backend {jax.default_backend()}: {len(devices)} × "
        f"{devices[0].device_kind}; host {platform.machine()} with {os.cpu_count()} cores"
        f"{' (--quick: tiny sizes)' if _QUICK.value else ''}")
  if not _QUICK.value and jax.default_backend() == "cpu":
    print("warning: no accelerator found; the full sizes take a long time on a CPU")
  repeats = 2 if _QUICK.value else _REPEATS.value
  print(f"{'measurement':<80} {'result':>30} {'compile s':>10}")
  groups = {"ppo": _ppo_rows, "scan": _scan_rows, "world_model": _world_model_rows}
  for rows in (groups[name] for name in groups if name in _ROWS.value):
    for name, value, compile_seconds in rows(repeats):
      print(f"{name:<80} {value:>30} {compile_seconds:>10.1f}", flush=True)


if __name__ == "__main__":
  app.run(main)
