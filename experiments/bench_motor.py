"""Motor-policy benchmarks: `python -m experiments.bench_motor`.

Prints (1) selective-scan forward+backward time per path for each `--lengths` (batch 8,
64 channels, N 16: the shape of the anchor in shared/notes/environment.md, where a
sequential scan beat `lax.associative_scan` 2.5–4× on this CPU), compile time apart, with
and without the per-block checkpointing of the sequential and chunked paths;
(2) the latency of one System-1 Mamba step (batch 1, upstream's default size: d_model 512,
6 layers, N 16, d_inner 1024) measured in windows at several sequence positions, to show it
is flat in position (target ≤ 2 ms), for the flax module and for `mamba.fast_step`; (3) the same for the PPO-default Mamba core and a CfC
cell; (4) CPQE one-step student vs EDM teacher sampling (target ≥ 10× faster).
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

from mbjax.agents import cpqe  # noqa: E402
from mbjax.nets import mamba, ssm  # noqa: E402
from mbjax.nets.cfc import CfCCell  # noqa: E402

_LENGTHS = flags.DEFINE_list("lengths", ["256", "1024", "4096"], "Scan lengths L.")
_CHUNK = flags.DEFINE_integer("chunk", 4, "Chunk size of the chunked path.")
_BLOCK = flags.DEFINE_integer("block", 32, "Checkpointed block length of the sequential path.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per scan measurement (best is shown).")
_POSITIONS = flags.DEFINE_list("positions", ["0", "1000", "4000"],
                               "Sequence positions at which step latency is measured.")
_WINDOW = flags.DEFINE_integer("window", 200, "Steps timed at each position.")
_SKIP_SCAN = flags.DEFINE_bool("skip_scan", False, "Only the step latencies.")


def _scan_inputs(length, batch=8, channels=64, state=16):
  k = jax.random.split(jax.random.PRNGKey(0), 6)
  return (jax.random.normal(k[0], (length, batch, channels)),
          jax.nn.softplus(jax.random.normal(k[1], (length, batch, channels))),
          -jnp.exp(jax.random.normal(k[2], (channels, state))),
          jax.random.normal(k[3], (length, batch, state)),
          jax.random.normal(k[4], (length, batch, state)),
          jnp.zeros((batch, channels, state)),
          jax.random.bernoulli(k[5], 0.01, (length, batch)))


def bench_scan():
  print(f"\n== selective scan fwd+bwd (batch 8, channels 64, N 16, resets at 1%; best of "
        f"{_REPEATS.value}), load average {_load()} ==")
  # chunk: the sequential path's checkpointed block, the chunked path's associative chunk.
  print(f"{'L':>6} {'path':>12} {'chunk':>6} {'checkpoint':>10} {'compile s':>10} "
        f"{'fwd+bwd ms':>11} {'vs sequential':>14}")
  variants = [("sequential", _BLOCK.value, True), ("sequential", _BLOCK.value, False),
              ("associative", 0, False), ("chunked", _CHUNK.value, True),
              ("chunked", _CHUNK.value, False)]
  for length in map(int, _LENGTHS.value):
    inputs = _scan_inputs(length)
    sequential_ms = None
    for path, chunk, checkpoint in variants:
      def loss(x, delta, A, B, C, h0, reset, path=path, chunk=chunk, checkpoint=checkpoint):
        sizes = ({"block_size": chunk} if path == "sequential" else
                 {"chunk_size": chunk} if path == "chunked" else {})
        y, h = ssm.selective_scan(x, delta, A, B, C, h0, reset, path=path,
                                  checkpoint=checkpoint, **sizes)
        return jnp.sum(y) + jnp.sum(h)

      fn = jax.grad(loss, argnums=(0, 1, 2, 3, 4))
      start = time.perf_counter()
      compiled = jax.jit(fn).lower(*inputs).compile()
      compile_s = time.perf_counter() - start
      jax.block_until_ready(compiled(*inputs))
      times = []
      for _ in range(_REPEATS.value):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*inputs))
        times.append(time.perf_counter() - start)
      ms = 1e3 * min(times)
      sequential_ms = sequential_ms or ms
      print(f"{length:>6} {path:>12} {chunk or '-':>6} {'yes' if checkpoint else 'no':>10} "
            f"{compile_s:>10.2f} {ms:>11.2f} {ms / sequential_ms:>13.2f}×")


def _load() -> str:
  return "/".join(f"{x:.1f}" for x in os.getloadavg())


def _step_latency(name, step, carry, make_input):
  """Steps continuously; at each position, the median and p90 of `--window` step times.
  `step(carry, x) -> (carry, out)` is already jitted, so its first call includes compiling."""
  compiled = step
  start = time.perf_counter()
  carry, out = jax.block_until_ready(compiled(carry, make_input(0)))
  print(f"\n== {name}: first call (compile) {time.perf_counter() - start:.2f} s, load average "
        f"{_load()} ==")
  positions = sorted(map(int, _POSITIONS.value))
  t, rows = 1, []
  for position in positions:
    while t < position:  # advance through the sequence at full speed
      carry, out = compiled(carry, make_input(t))
      t += 1
    jax.block_until_ready(out)
    times = []
    for _ in range(_WINDOW.value):
      start = time.perf_counter()
      carry, out = jax.block_until_ready(compiled(carry, make_input(t)))
      times.append(time.perf_counter() - start)
      t += 1
    times = 1e3 * np.asarray(times)
    rows.append((position, np.median(times), np.percentile(times, 90)))
  for position, median, p90 in rows:
    print(f"position {position:>6}: median {median:.3f} ms | p90 {p90:.3f} ms")


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
  _step_latency(name + ", flax module step", lambda carry, x: module_step(params, carry, x),
                carry, lambda t: inputs[t % 64])
  if not system1:
    return
  # The System-1 path: plain-array weights prepared once per weight update.
  weights = mamba.step_weights(params)
  fast = jax.jit(lambda weights, carry, x: mamba.fast_step(weights, carry, x, not_first),
                 donate_argnums=1)
  _step_latency(name + ", fast_step", lambda carry, x: fast(weights, carry, x),
                stack.initial_carry(1), lambda t: inputs[t % 64])


def bench_cfc_step(size, in_dim):
  cell = CfCCell(size)
  inputs = jax.random.normal(jax.random.PRNGKey(1), (64, 1, in_dim))
  not_first = jnp.zeros((1,), bool)
  carry = jnp.zeros((1, size))
  params = cell.init(jax.random.PRNGKey(0), carry, inputs[0], not_first)

  dt = jnp.full((1,), 1 / 60)  # a 60 Hz control step
  step = jax.jit(lambda params, carry, x: cell.apply(params, carry, x, not_first, dt),
                 donate_argnums=1)
  _step_latency(f"CfC step (size {size}, input {in_dim}, batch 1), params as argument",
                lambda carry, x: step(params, carry, x), carry, lambda t: inputs[t % 64])


def _latency_ms(fn, *args, repeats=200):
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * np.median(times)


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
