"""Motor-policy benchmarks: `python -m experiments.bench_motor`.

Prints (1) selective-scan forward+backward time per path for each `--lengths` (batch 8,
64 channels, N 16: the shape at which a sequential scan beat `lax.associative_scan`
2.5–4× on this machine kind), compile time apart, with
and without the per-block checkpointing of the sequential and chunked paths;
(2) the latency of one System-1 Mamba step (batch 1, upstream's default size: d_model 512,
6 layers, N 16, d_inner 1024) measured in windows at several sequence positions, to show it
is flat in position (target ≤ 2 ms), for the flax module and for `mamba.fast_step`
(bf16 and f32 projections);
(3) the same for the PPO-default Mamba core and a CfC cell; (4) CPQE one-step student vs EDM teacher sampling (target ≥ 10× faster).
Latencies include dispatch and `block_until_ready`, as an actor would see them.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_enable_concurrency_optimized_scheduler=false")

import platform  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from experiments import throughput  # noqa: E402
from mbjax.agents import cpqe  # noqa: E402
from mbjax.nets import mamba  # noqa: E402
from mbjax.nets.cfc import CfCCell  # noqa: E402

_LENGTHS = flags.DEFINE_list("lengths", ["256", "1024", "4096"], "Scan lengths L.")
_CHUNK = flags.DEFINE_integer("chunk", 2, "Chunk size of the chunked path.")
_BLOCK = flags.DEFINE_integer("block", 32, "Checkpointed block length of the sequential path.")
_REPEATS = flags.DEFINE_integer("repeats", 7,
                                "Timed calls per scan variant, in turns (best is shown).")
_POSITIONS = flags.DEFINE_list("positions", ["0", "1000", "4000"],
                               "Sequence positions at which step latency is measured.")
_WINDOW = flags.DEFINE_integer("window", 200, "Steps timed at each position.")
_SKIP_SCAN = flags.DEFINE_bool("skip_scan", False, "Only the step latencies.")


def bench_scan():
  print(f"\n== selective scan fwd+bwd (batch 8, channels 64, N 16, resets at 1%; best of "
        f"{_REPEATS.value}), load average {_load()} ==")
  # chunk: the sequential path's checkpointed block, the chunked path's associative chunk.
  print(f"{'L':>6} {'path':>12} {'chunk':>6} {'checkpoint':>10} {'compile s':>10} "
        f"{'fwd+bwd ms':>11} {'vs sequential':>14}")
  variants = [("sequential", _BLOCK.value, True), ("sequential", _BLOCK.value, False),
              ("associative", 0, False), ("chunked", _CHUNK.value, True),
              ("chunked", _CHUNK.value, False), ("chunked", 4 * _CHUNK.value, True)]
  for length in map(int, _LENGTHS.value):
    inputs = throughput.scan_inputs(length)
    compiled = []
    for path, chunk, checkpoint in variants:
      sizes = ({"block_size": chunk} if path == "sequential" else
               {"chunk_size": chunk} if path == "chunked" else {})
      fn, compile_seconds = throughput.compile_scan_gradient(inputs, path,
                                                             checkpoint=checkpoint, **sizes)
      jax.block_until_ready(fn(*inputs))
      compiled.append((fn, compile_seconds))
    # The variants take turns, so that they see the same load on this shared CPU.
    best = [float("inf")] * len(compiled)
    for _ in range(_REPEATS.value):
      for i, (fn, _) in enumerate(compiled):
        best[i] = min(best[i], throughput.call_times(lambda: fn(*inputs), 1)[0])
    for (path, chunk, checkpoint), (_, compile_seconds), seconds in zip(variants, compiled,
                                                                      best):
      print(f"{length:>6} {path:>12} {chunk or '-':>6} {'yes' if checkpoint else 'no':>10} "
            f"{compile_seconds:>10.2f} {1e3 * seconds:>11.2f} {seconds / best[0]:>13.2f}×")


def _load() -> str:
  return "/".join(f"{x:.1f}" for x in os.getloadavg())


def _step_latency(name, steps: dict, carry, make_input):
  """Steps each variant of `steps` ({label: jitted step(carry, x) -> (carry, out)})
  continuously through the sequence; at each position, the median and p90 of `--window`
  step times per variant. The variants take turns in 10 slices of the window, so they see
  the same machine load (this CPU is shared)."""
  carries = {}
  for label, step in steps.items():
    start = time.perf_counter()
    carries[label], _ = jax.block_until_ready(step(carry, make_input(0)))
    print(f"\n== {name}, {label}: first call (compile) {time.perf_counter() - start:.2f} s ==")
    carry = jax.tree.map(jnp.copy, carries[label])  # the next variant's own (donated) carry
  print(f"load average before timing: {_load()}")
  slices = 10
  t, rows = 1, []
  for position in sorted(map(int, _POSITIONS.value)):
    times = {label: [] for label in steps}
    for label, step in steps.items():
      for k in range(t, position):  # advance through the sequence at full speed
        carries[label], out = step(carries[label], make_input(k))
      jax.block_until_ready(carries[label])
    t = max(t, position)
    for _ in range(slices):
      for label, step in steps.items():
        for k in range(t, t + _WINDOW.value // slices):
          start = time.perf_counter()
          carries[label], _ = jax.block_until_ready(step(carries[label], make_input(k)))
          times[label].append(time.perf_counter() - start)
      t += _WINDOW.value // slices
    rows.append((position, {label: 1e3 * np.asarray(x) for label, x in times.items()}))
  print(f"load average after timing: {_load()}")
  for position, times in rows:
    print(f"position {position:>6}: " + " | ".join(
        f"{label} median {np.median(x):.3f} ms, p90 {np.percentile(x, 90):.3f} ms"
        for label, x in times.items()))


def bench_mamba_step(d_model, layers, state, label, system1=False):
  stack = mamba.MambaStack(d_model, layers, state)
  carry = stack.initial_carry(1)
  inputs = jax.random.normal(jax.random.PRNGKey(1), (64, 1, d_model))
  not_first = jnp.zeros((1,), bool)
  params = stack.init(jax.random.PRNGKey(0), carry, inputs[0], not_first)
  num_params = sum(x.size for x in jax.tree.leaves(params))

  name = (f"Mamba step, {label} (d_model {d_model}, {layers} layers, N {state}, "
          f"{num_params / 1e6:.2f}M params, batch 1)")
  # Parameters as a jit argument (an actor whose weights change every update); the carry is
  # donated, so its buffers are updated in place.
  module_step = jax.jit(lambda params, carry, x: stack.apply(params, carry, x, not_first),
                        donate_argnums=1)
  steps = {"flax module": lambda carry, x: module_step(params, carry, x)}
  if system1:
    # The System-1 path: plain-array weights prepared once per weight update, with the
    # projections in bf16 (the default) and in f32.
    fast = jax.jit(lambda weights, carry, x: mamba.fast_step(weights, carry, x, not_first),
                   donate_argnums=1)
    for dtype in (jnp.bfloat16, jnp.float32):
      weights = mamba.step_weights(params, dtype)
      steps[f"fast_step {jnp.dtype(dtype).name}"] = (
          lambda carry, x, weights=weights: fast(weights, carry, x))
  _step_latency(name, steps, carry, lambda t: inputs[t % 64])


def bench_cfc_step(size, in_dim):
  cell = CfCCell(size)
  inputs = jax.random.normal(jax.random.PRNGKey(1), (64, 1, in_dim))
  not_first = jnp.zeros((1,), bool)
  carry = jnp.zeros((1, size))
  params = cell.init(jax.random.PRNGKey(0), carry, inputs[0], not_first)

  dt = jnp.full((1,), 1 / 60)  # a 60 Hz control step
  step = jax.jit(lambda params, carry, x: cell.apply(params, carry, x, not_first, dt),
                 donate_argnums=1)
  _step_latency(f"CfC step (size {size}, input {in_dim}, batch 1)",
                {"params as argument": lambda carry, x: step(params, carry, x)}, carry,
                lambda t: inputs[t % 64])


def _latency_ms(fn, *args, repeats=200):
  jax.block_until_ready(fn(*args))
  return 1e3 * throughput.time_calls(lambda: fn(*args), repeats)


def bench_cpqe(obs_dim=256, action_dim=2):
  cfg = cpqe.default_config()
  state = cpqe.init(jax.random.PRNGKey(0), cfg, obs_dim, action_dim)
  obs = jnp.ones((cfg.num_samples, obs_dim))  # K candidates for one observation
  key = jax.random.PRNGKey(1)
  teacher = jax.jit(lambda p, o, k: cpqe.sample_teacher(p, cfg, o, k, action_dim))
  student = jax.jit(lambda p, o, k: cpqe.sample_student(p, cfg, o, k, action_dim))
  select = jax.jit(lambda s, o, k: cpqe.select_action(s, cfg, o, k, action_dim))
  t_teacher = _latency_ms(teacher, state.teacher, obs, key, repeats=50)
  t_student = _latency_ms(student, state.student, obs, key)
  t_select = _latency_ms(select, state, obs[:1], key)
  print(f"\n== CPQE sampling, {cfg.num_samples} chunks of {cfg.horizon}×{action_dim} for one "
        f"obs[{obs_dim}] (MLP {cfg.layers}×{cfg.hidden}), median ==")
  print(f"teacher EDM Heun, {cfg.teacher_steps} levels ({2 * cfg.teacher_steps} network "
        f"calls): {t_teacher:.3f} ms")
  print(f"student one-step: {t_student:.3f} ms ({t_teacher / t_student:.1f}× faster)")
  print(f"select_action (one-step K={cfg.num_samples} + {cfg.num_q}-member Q scoring): "
        f"{t_select:.3f} ms")


def main(argv):
  del argv
  print(f"host: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"jax {jax.__version__} on {jax.devices()[0].platform}")
  if not _SKIP_SCAN.value:
    bench_scan()
  bench_mamba_step(512, 6, 16, "System-1 default (upstream MambaConfig)", system1=True)
  bench_mamba_step(128, 2, 16, "PPO core default (config.network)")
  bench_cfc_step(128, 128)
  bench_cpqe()


if __name__ == "__main__":
  app.run(main)
