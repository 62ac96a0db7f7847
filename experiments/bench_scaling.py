"""Weak scaling of the PPO and world-model updates: `python -m experiments.bench_scaling`.

For each device count n in `--devices`, a fresh process (on CPU with
`--xla_force_host_platform_device_count=n`, so n simulated devices) measures, at a fixed
batch per device:
* the PPO training update as `experiments/train.py` runs it — a rollout of `--envs_per_device`
  × n envs × `ppo.num_steps` steps, then the PPO update — in env-steps/s;
* one world-model optimiser step on `--wm_batch_per_device` × n windows of `--wm_length`
  steps, in transitions/s.
and prints the weak-scaling efficiency (throughput_n / n) / throughput_1: 1.0 means n devices
do n times the work in the same time.

On a CPU the simulated devices share the same cores (2 on the project's machines), so the
efficiency there measures the overhead of the sharded program (collectives, per-device
dispatch), not a speed-up: once one device keeps the cores busy, about 1/n is the best
possible (above 1/n only where one device left a core idle). On accelerators the same command
measures real scaling over the local GPUs/TPU cores (no device simulation; `--devices` must
not exceed the local device count), e.g. on an 8-GPU node:
  python -m experiments.bench_scaling --devices=1,2,4,8 --envs_per_device=2048 \
      --wm_batch_per_device=64
"""
import os
import sys

# The parent only starts a process per device count (it never initialises a jax backend);
# each child sees its own number of simulated devices.
if "--worker" not in sys.argv:
  os.environ.setdefault("XLA_FLAGS", "--xla_cpu_enable_concurrency_optimized_scheduler=false")

import json  # noqa: E402
import subprocess  # noqa: E402

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from experiments import throughput as throughput_lib  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/arena_ppo.py", "PPO config (env, network, rollout length).",
    lock_config=True)
_DEVICES = flags.DEFINE_list("devices", ["1", "2", "4"], "Device counts to compare.")
_ENVS = flags.DEFINE_integer("envs_per_device", 64, "PPO envs per device.")
_WM_BATCH = flags.DEFINE_integer("wm_batch_per_device", 8,
                                 "World-model windows per device.")
_WM_LENGTH = flags.DEFINE_integer("wm_length", 64, "World-model window length.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per measurement (median).")
_PLATFORM = flags.DEFINE_string(
    "platform", "", "cpu: simulate the devices; empty: cpu when no accelerator is found.")
_WORKER = flags.DEFINE_integer("worker", 0, "Internal: measure on this many devices.")

CPU_NOTE = ("CPU: the n simulated devices share the host's {cores} cores, so this shows the "
            "sharded program's overheads, not a speed-up: once one device keeps the cores "
            "busy, ~1/n is the best possible.")


def _measure(num_devices: int) -> dict:
  """Runs in a worker process whose jax sees (at least) `num_devices` devices."""
  import jax

  from mbjax.envs import registry

  cfg = _CONFIG.value
  cfg.num_envs = _ENVS.value * num_devices
  cfg.total_env_steps = 1_000 * cfg.num_envs * cfg.ppo.num_steps  # only sets the lr schedule
  cfg.run.num_devices = num_devices
  ppo = throughput_lib.ppo_update(cfg, num_devices, _REPEATS.value)
  env, env_params = registry.make(cfg.env.name, **cfg.env.kwargs.to_dict())
  obs_shape = env.observation_shape(env_params)
  if len(obs_shape) != 1:
    raise ValueError(f"the world-model measurement needs vector observations; "
                     f"{cfg.env.name} has shape {obs_shape}")
  cfg.replay.update(seq_len=_WM_LENGTH.value, burn_in=0)
  wm = throughput_lib.model_update(cfg, obs_shape, env.observation_dtype(env_params),
                                   env.action_spec(env_params), _WM_BATCH.value, num_devices,
                                   _REPEATS.value)
  device = jax.devices()[0]
  return {"devices": num_devices, "platform": device.platform,
          "device_kind": device.device_kind, "ppo": ppo, "wm": wm}


def _run_worker(num_devices: int, simulate: bool) -> dict:
  env = dict(os.environ)
  if simulate:
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        f" --xla_force_host_platform_device_count={num_devices}").strip()
  args = [a for a in sys.argv[1:] if not a.startswith("--worker")]
  out = subprocess.run([sys.executable, "-m", "experiments.bench_scaling", *args,
                        f"--worker={num_devices}"], env=env, capture_output=True, text=True)
  if out.returncode:
    raise RuntimeError(f"the {num_devices}-device measurement failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def _accelerator_present() -> bool:
  """Asks a child process, so that this one never initialises a backend."""
  out = subprocess.run(
      [sys.executable, "-c", "import jax; print(jax.default_backend())"],
      capture_output=True, text=True)
  return out.returncode == 0 and out.stdout.strip().splitlines()[-1] in ("gpu", "tpu")


def _table(results: list[dict]) -> str:
  ppo_eff = throughput_lib.weak_scaling_efficiency(
      {r["devices"]: r["ppo"]["env_steps_per_s"] for r in results})
  wm_eff = throughput_lib.weak_scaling_efficiency(
      {r["devices"]: r["wm"]["replayed_steps_per_s"] for r in results})
  lines = [f"{'devices':>7} {'PPO env-steps/s':>16} {'PPO eff.':>9} {'update s':>9} "
           f"{'compile s':>9} | {'WM replayed/s':>17} {'WM eff.':>8} {'step ms':>8} "
           f"{'compile s':>9}"]
  for r in results:
    n = r["devices"]
    lines.append(
        f"{n:>7} {r['ppo']['env_steps_per_s']:>16,.0f} {ppo_eff[n]:>9.2f} "
        f"{r['ppo']['update_s']:>9.3f} {r['ppo']['compile_s']:>9.1f} | "
        f"{r['wm']['replayed_steps_per_s']:>17,.0f} {wm_eff[n]:>8.2f} "
        f"{1e3 * r['wm']['update_s']:>8.1f} {r['wm']['compile_s']:>9.1f}")
  return "\n".join(lines)


def main(argv):
  del argv
  if _WORKER.value:
    print(json.dumps(_measure(_WORKER.value)))
    return
  simulate = _PLATFORM.value == "cpu" or (not _PLATFORM.value and not _accelerator_present())
  counts = [int(n) for n in _DEVICES.value]
  cfg = _CONFIG.value
  print(f"weak scaling, {cfg.env.name}: PPO {_ENVS.value} envs × {cfg.ppo.num_steps} steps "
        f"per device per update; world model {_WM_BATCH.value} windows × {_WM_LENGTH.value} "
        f"steps per device; median of {_REPEATS.value}; load average "
        f"{'/'.join(f'{x:.1f}' for x in os.getloadavg())}")
  results = [_run_worker(n, simulate) for n in counts]
  print(f"platform: {results[0]['platform']} ({results[0]['device_kind']}), "
        f"{'simulated' if simulate else 'real'} devices")
  print(_table(results))
  print("efficiency = (throughput_n / n) / throughput_1")
  if simulate:
    print(CPU_NOTE.format(cores=os.cpu_count()))


if __name__ == "__main__":
  app.run(main)
