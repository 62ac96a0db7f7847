"""The skill codebook: ours (`mbjax/offline/skills.py`) against haiku's
`hk.nets.VectorQuantizerEMA`, at equal steps on BonkArena action windows:

  PYTHONPATH=<dm-haiku 0.0.17> python -m experiments.bench_vq [--steps=2000] [--seeds=0,1,2]

dm-haiku is not a dependency of mbjax; install it beside the pinned set to run this
(`pip install -c constraints.txt dm-haiku==0.0.17`, which adds jmp and tabulate and changes
no pinned version). BUILD.md ("haiku") has the result and the decision.

Data (made first): scripted and random BonkArena play with a menu dwell (the ground-truth
recordings' policies, `mbjax/offline/ground_truth.py`), cut into `SkillConfig` windows
(16 actions, stride 8); a quarter of the episodes are held out.

Codebooks, each under the same autoencoder, optimiser, minibatches and keys (`skills.loss`,
`skills.make_optimizer`; only the codebook's state and its update differ):
  ours            normal-initialised codes, EMA counts and sums started at the codes,
                  Laplace-smoothed, dead codes restarted at encoder outputs;
  haiku+restarts  haiku's module as the codebook core: its variance-scaling initial codes
                  and zero-debiased EMAs (`hk.ExponentialMovingAverage`), with our restarts
                  applied to its state;
  haiku           haiku's module as it ships (no restarts).
The haiku module is transformed once (`hk.transform_with_state`) and used through pure
`init`/`apply`; its commitment cost is ours × code_dim (it averages over the code's
dimensions, we sum them), so the loss is the same function. Reported after each of
`--checkpoints` steps, on the held-out windows: perplexity exp(H) of the code distribution,
codes used (of `num_codes`), and reconstruction (continuous MSE, branch cross-entropy and
accuracy); the mean over `--seeds`, and the spread (min–max).
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_enable_concurrency_optimized_scheduler=false")

import functools  # noqa: E402
import time  # noqa: E402
from typing import Any, Callable, NamedTuple  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from absl import app, flags  # noqa: E402

from mbjax.envs.bonk_arena import rollout  # noqa: E402
from mbjax.envs.spaces import HybridActionSpec  # noqa: E402
from mbjax.offline import ground_truth, skills  # noqa: E402

_STEPS = flags.DEFINE_integer("steps", 2000, "Updates per run (the pipeline's skills.steps).")
_CHECKPOINTS = flags.DEFINE_list("checkpoints", ["250", "500", "1000", "2000"],
                                 "Steps after which the held-out metrics are taken.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (init, minibatches, restarts).")
_BATCH = flags.DEFINE_integer("batch", 128, "Windows per update (the pipeline's skills.batch).")
_EPISODES = flags.DEFINE_integer("episodes", 32, "BonkArena episodes per policy.")
_EPISODE_STEPS = flags.DEFINE_integer("episode_steps", 1500, "Steps per episode (at most).")

SPEC = HybridActionSpec(continuous_dim=2, branches=(4,))  # BonkArena's action space


def arena_windows(cfg: skills.SkillConfig, episodes: int, steps: int):
  """(train, held-out) windows f32[N, window, A] of scripted and random play."""
  per_episode = []
  for name in ("scripted", "random"):
    env, policy = ground_truth.make_policy(name, None)
    policy = ground_truth.with_menu_dwell(policy, 0.1)
    params = env.default_params()
    play = jax.jit(jax.vmap(lambda key: rollout.play_episode(env, params, policy, key,
                                                             num_steps=steps)))
    ep = jax.device_get(play(jax.random.split(jax.random.PRNGKey(len(name)), episodes)))
    for i in range(episodes):
      n = int(ep.valid[i].sum())
      vectors = skills.action_vectors(ep.actions_continuous[i, :n], ep.actions_discrete[i, :n],
                                      SPEC)
      per_episode.append(skills.training_windows(vectors, cfg.window, cfg.stride))
  order = np.random.default_rng(0).permutation(len(per_episode))
  held = set(order[:len(order) // 4].tolist())
  split = lambda keep: np.concatenate([w for i, w in enumerate(per_episode) if keep(i)])
  return split(lambda i: i not in held), split(lambda i: i in held)


class Core(NamedTuple):
  """A codebook behind pure functions: state in, state out."""

  init: Callable[[jax.Array], Any]
  embedding: Callable[[Any], jax.Array]  # f32[K, D]
  update: Callable[[Any, jax.Array, jax.Array], Any]  # (state, z, codes) → state
  restart: Callable[[jax.Array, Any, jax.Array], tuple[Any, jax.Array]] | None


def ours(cfg: skills.SkillConfig) -> Core:
  return Core(
      init=lambda key: skills.init(key, cfg, SPEC).codebook,
      embedding=lambda book: book.embedding,
      update=lambda book, z, codes: skills.ema_update(book, z, codes, cfg.ema_decay,
                                                      cfg.ema_epsilon),
      restart=lambda key, book, z: skills.restart_dead_codes(key, book, z, cfg.dead_after))


class HaikuBook(NamedTuple):
  state: Any  # haiku's module state
  unused_for: jax.Array  # i32[K], for the restarts
  disagreements: jax.Array  # i32[]: windows the module assigned to another code than ours


@functools.lru_cache(maxsize=None)
def haiku_vq(cfg: skills.SkillConfig):
  """`hk.nets.VectorQuantizerEMA` transformed once per config."""
  try:
    import haiku as hk
  except ImportError:
    raise ImportError("bench_vq needs dm-haiku (pip install -c constraints.txt "
                      "dm-haiku==0.0.17); it is not a dependency of mbjax") from None

  def forward(z, is_training):
    return hk.nets.VectorQuantizerEMA(
        embedding_dim=cfg.code_dim, num_embeddings=cfg.num_codes,
        commitment_cost=cfg.commitment * cfg.code_dim, decay=cfg.ema_decay,
        epsilon=cfg.ema_epsilon, name="vq")(z, is_training)

  return hk.without_apply_rng(hk.transform_with_state(forward))


def haiku(cfg: skills.SkillConfig, restarts: bool) -> Core:
  vq = haiku_vq(cfg)
  decay = cfg.ema_decay

  def init(key):
    _, state = vq.init(jax.random.fold_in(key, 1), jnp.zeros((1, cfg.code_dim)), True)
    return HaikuBook(state, jnp.zeros((cfg.num_codes,), jnp.int32), jnp.int32(0))

  def update(book, z, codes):
    # The module assigns the codes itself, from the same embeddings: ours up to rounding.
    out, state = vq.apply({}, book.state, z, True)
    unused_for = jnp.where(jnp.bincount(codes, length=cfg.num_codes) > 0, 0,
                           book.unused_for + 1)
    return HaikuBook(state, unused_for,
                     book.disagreements + jnp.sum(out["encoding_indices"] != codes))

  def restart(key, book, z):
    """Our restart on haiku's state: embeddings [D, K], debiased EMA averages."""
    s = book.state
    sizes, sums = s["vq/~/ema_cluster_size"], s["vq/~/ema_dw"]
    view = skills.Codebook(s["vq"]["embeddings"].T, sizes["average"], sums["average"].T,
                           book.unused_for)
    new, restarted = skills.restart_dead_codes(key, view, z, cfg.dead_after)
    bias = 1.0 - decay ** sizes["counter"].astype(jnp.float32)  # hidden = average · bias
    state = {"vq": {"embeddings": new.embedding.T},
             "vq/~/ema_cluster_size": {**sizes, "average": new.cluster_size,
                                       "hidden": new.cluster_size * bias},
             "vq/~/ema_dw": {**sums, "average": new.embed_sum.T,
                             "hidden": new.embed_sum.T * bias}}
    return book._replace(state=state, unused_for=new.unused_for), restarted

  return Core(init, lambda book: book.state["vq"]["embeddings"].T, update,
              restart if restarts else None)


def make_step(core: Core, cfg: skills.SkillConfig):
  """`skills.update` with the codebook swapped for `core`."""
  optimizer = skills.make_optimizer(cfg)

  @jax.jit
  def step(params, opt_state, book, windows, key):
    (_, (metrics, z, codes)), grads = jax.value_and_grad(skills.loss, has_aux=True)(
        params, core.embedding(book), cfg, SPEC, windows)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    book = core.update(book, z, codes)
    if core.restart is not None:
      book, _ = core.restart(key, book, z)
    return params, opt_state, book

  return step


@functools.partial(jax.jit, static_argnums=(2,))
def _held_out(params, embedding, cfg, windows):
  _, (metrics, _, codes) = skills.loss(params, embedding, cfg, SPEC, windows)
  return metrics, codes


def held_out_metrics(params, embedding, cfg: skills.SkillConfig, windows) -> dict:
  metrics, codes = jax.device_get(_held_out(params, embedding, cfg, windows))
  counts = np.bincount(codes, minlength=cfg.num_codes)
  p = counts[counts > 0] / counts.sum()
  return {"perplexity": float(np.exp(-np.sum(p * np.log(p)))),
          "codes_used": int((counts > 0).sum()),
          "recon_mse": float(metrics["recon_mse"]), "recon_ce": float(metrics["recon_ce"]),
          "recon_accuracy": float(metrics["recon_accuracy"])}


def run(core: Core, cfg: skills.SkillConfig, train, held, seed: int, steps: int,
        checkpoints: list[int], batch: int) -> dict[int, dict]:
  key = jax.random.PRNGKey(seed)
  state = skills.init(key, cfg, SPEC)  # the autoencoder and optimiser: the same for all
  params, opt_state, book = state.params, state.opt_state, core.init(key)
  step_fn, rng = make_step(core, cfg), np.random.default_rng(seed)
  restart_key = jax.random.fold_in(key, 2)
  results = {}
  for done in range(1, steps + 1):
    restart_key, step_key = jax.random.split(restart_key)
    windows = jnp.asarray(train[rng.integers(0, len(train), size=batch)])
    params, opt_state, book = step_fn(params, opt_state, book, windows, step_key)
    if done in checkpoints:
      results[done] = held_out_metrics(params, core.embedding(book), cfg, held)
  if isinstance(book, HaikuBook) and int(book.disagreements):
    print(f"    haiku assigned {int(book.disagreements)} of {steps * batch} windows to "
          "another code than ours (near ties)")
  return results


def check_swap_is_exact(cfg: skills.SkillConfig, train, batch: int) -> None:
  """`make_step` with our codebook reproduces `skills.update` (so only the core differs)."""
  state = skills.init(jax.random.PRNGKey(0), cfg, SPEC)
  step = make_step(ours(cfg), cfg)
  params, opt_state, book = state.params, state.opt_state, state.codebook
  windows, key = jnp.asarray(train[:batch]), jax.random.PRNGKey(5)
  params, opt_state, book = step(params, opt_state, book, windows, key)
  reference, _ = skills.update(state, windows, key)
  for a, b in zip(jax.tree.leaves((params, book)),
                  jax.tree.leaves((reference.params, reference.codebook))):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def main(argv):
  del argv
  cfg = skills.SkillConfig()  # the pipeline's: 256 codes of 64 dims, window 16
  checkpoints = sorted({int(c) for c in _CHECKPOINTS.value if int(c) <= _STEPS.value})
  train, held = arena_windows(cfg, _EPISODES.value, _EPISODE_STEPS.value)
  print(f"{len(train)} training / {len(held)} held-out windows; {cfg.num_codes} codes of "
        f"{cfg.code_dim}; batch {_BATCH.value}; seeds {_SEEDS.value}")
  check_swap_is_exact(cfg, train, _BATCH.value)
  cores = {"ours": ours(cfg), "haiku+restarts": haiku(cfg, True), "haiku": haiku(cfg, False)}
  results = {name: [] for name in cores}
  for seed in [int(s) for s in _SEEDS.value]:
    for name, core in cores.items():
      started = time.time()
      results[name].append(run(core, cfg, train, held, seed, _STEPS.value, checkpoints,
                               _BATCH.value))
      print(f"  seed {seed} {name}: {time.time() - started:.0f} s", flush=True)
  keys = ("perplexity", "codes_used", "recon_mse", "recon_ce", "recon_accuracy")
  print(f"\n{'codebook':<15} {'step':>5} " + " ".join(f"{k:>22}" for k in keys))
  for name, runs in results.items():
    for step in checkpoints:
      cells = []
      for k in keys:
        values = np.array([r[step][k] for r in runs])
        cells.append(f"{values.mean():>9.4g} [{values.min():.3g}–{values.max():.3g}]")
      print(f"{name:<15} {step:>5} " + " ".join(f"{c:>22}" for c in cells))
  print(f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
  app.run(main)
