"""World-model benchmarks: `python -m experiments.bench_world_model [--learn_steps=N]`.

1. Throughput: one world-model step plus one dream (imagination, horizon 15) step on a batch
   of 16 windows × 64 steps of BonkArena vector observations at the default size
   (deterministic state 512), and the world-model step alone at upstream MetaBonk's size
   (observation 204, embedding 256, deterministic 256, Gaussian stochastic 64), once with
   mbjax's layers and once with upstream's (`rssm_layers=0`: linear maps around the GRU;
   `head_layers=1`; the continue and std heads remain). Compile
   and steady-state times are printed apart (upstream's PyTorch update beside these:
   `experiments/bench_peers.py --row=world_model`). `--nothroughput` skips it.
2. Learning: trains the world model of `--config` (default `configs/arena_apex.py`) on
   BonkArena vector trajectories (64 envs × 512 steps of scripted play with Gaussian action
   noise 0.5) and every `--eval_every` updates prints the one-step prediction error on
   held-out trajectories (another seed; every window once) against copying the last
   observation (target: 10× below it). Both errors are the same mean squared error over
   all 96 dimensions in the decoder's target space (symlog), over the steps whose next
   observation belongs to the same episode. Each evaluation also prints, per observation
   block, the model's error over copy-last's and [that block's share of copy-last's], and
   the same split by what happens to the five enemy slots between the two observations:
   the same enemies in the same slots, the same enemies re-sorted by distance, or a
   different set (a kill, a spawn, or an unseen enemy coming nearer than the fifth), and the
   error on the last 100 training batches (against the held-out error: overfitting). Once,
   before training, it prints the full-state floor: the error of E[o_{t+1} | game state,
   a_t], estimated over `--floor_keys` env keys per held-out step, which bounds what any
   one-step predictor can reach (the game's randomness: spawn points, kinds, card deals).
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_enable_concurrency_optimized_scheduler=false")

import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from experiments import throughput as throughput_lib  # noqa: E402
from mbjax.agents import world_model as wm_lib  # noqa: E402
from mbjax.envs.bonk_arena import BonkArena, make_scripted_policy  # noqa: E402
from mbjax.envs.bonk_arena.observation import visible_enemies  # noqa: E402
from mbjax.envs.spaces import HybridAction  # noqa: E402
from mbjax.envs.wrappers import VecEnv  # noqa: E402
from mbjax.train import config as config_lib  # noqa: E402

_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed steps per throughput measurement.")
_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/arena_apex.py", "Config whose world_model section is trained in the "
    "learning half.", lock_config=True)
_LEARN_STEPS = flags.DEFINE_integer("learn_steps", 2000, "World-model updates (0: skip).")
_THROUGHPUT = flags.DEFINE_bool("throughput", True, "Run the throughput half.")
_EVAL_EVERY = flags.DEFINE_integer("eval_every", 200, "Updates between held-out evaluations.")
_LEARN_ENVS = flags.DEFINE_integer("learn_envs", 64, "Envs recorded for the learning data.")
_LEARN_LENGTH = flags.DEFINE_integer("learn_length", 512, "Steps recorded per env.")
_TRAIN_WINDOWS = flags.DEFINE_integer("train_windows", 16, "Windows per training batch.")
_TRAIN_WINDOW_LENGTH = flags.DEFINE_integer(
    "train_window_length", 64, "Steps per training window (held-out windows stay 64 long).")
_FLOOR_KEYS = flags.DEFINE_integer("floor_keys", 16, "Env keys per held-out step for the "
                                   "full-state floor of the one-step error.")

BATCH, LENGTH = 16, 64


def throughput(cfg, obs_dim: int, spec, with_dream: bool, label: str) -> float:
  """Prints and returns the seconds of one world-model step (plus one dream step from every
  posterior with `with_dream`) on 16 windows × 64 steps of random vector observations."""
  result = throughput_lib.world_model_update(
      cfg, obs_dim, wm_lib.action_vector_size(spec), BATCH, LENGTH, 1, _REPEATS.value,
      dream_spec=spec if with_dream else None, shard=False)
  print(f"{label}: compile {result['compile_s']:.1f} s | step {result['update_s'] * 1e3:.1f} "
        f"ms | {result['transitions_per_s']:,.0f} transitions/s")
  return result["update_s"]


def collect(env, params, num_envs, length, key, floor_keys: int = 0):
  """Scripted play with Gaussian action noise: [T, E] obs, actions, rewards, flags, and
  i32[T, E, K] which enemies the observation's K enemy slots show. With `floor_keys`, also
  the full-state floor's per-dimension squared error [T, E, D] (`_floor_squared_error`)."""
  vec_env = VecEnv(env)
  scripted = make_scripted_policy(env)
  spec = env.action_spec(params)

  def step(carry, key):
    obs, state, is_first = carry
    policy_key, noise_key, env_key = jax.random.split(key, 3)
    mask = vec_env.action_mask(state, params)
    shown = jax.vmap(lambda s: visible_enemies(s, env.num_obs_enemies))(state)  # o_t's slots
    action = jax.vmap(scripted)(jax.random.split(policy_key, num_envs), obs, mask)
    noise = 0.5 * jax.random.normal(noise_key, action.continuous.shape)
    action = HybridAction(jnp.clip(action.continuous + noise, -1, 1), action.discrete)
    step_env = lambda key: vec_env.step(jax.random.split(key, num_envs), state, action, params)
    next_obs, next_state, reward, terminated, truncated, _ = step_env(env_key)
    out = wm_lib.Sequence(obs, wm_lib.action_vector(action, spec), reward, terminated, is_first)
    extras = (shown,)
    if floor_keys:
      others = jax.vmap(lambda k: step_env(k)[0])(
          jax.random.split(jax.random.fold_in(env_key, 1), floor_keys))
      extras += (_floor_squared_error(others, next_obs),)
    return (next_obs, next_state, terminated | truncated), (out,) + extras

  reset_key, key = jax.random.split(key)
  obs, state = vec_env.reset(jax.random.split(reset_key, num_envs), params)
  carry = (obs, state, jnp.ones((num_envs,), bool))
  _, data = jax.lax.scan(step, carry, jax.random.split(key, length))
  return data


def _floor_squared_error(others, next_obs):
  """Squared error of E[symlog o_{t+1} | full game state s_t, a_t], estimated over the env
  keys of `others` [K, E, D] (spawn points, enemy kinds and card deals are the game's only
  randomness): no predictor can beat it on average, even one that sees the whole state."""
  target = wm_lib.observation_target
  return jnp.square(target(others).mean(0) - target(next_obs))


def learning(cfg):
  """Trains `cfg`'s world model on recorded play; prints held-out one-step errors."""
  env = BonkArena()
  params = env.default_params()
  spec = env.action_spec(params)
  obs_dim = env.observation_shape(params)[0]
  collect_fn = jax.jit(lambda k, envs, floor_keys: collect(env, params, envs,
                                                         _LEARN_LENGTH.value, k, floor_keys),
                       static_argnums=(1, 2))
  train_data, _ = collect_fn(jax.random.PRNGKey(10), _LEARN_ENVS.value, 0)
  test_data, test_shown, floor_sq = collect_fn(jax.random.PRNGKey(11), _LEARN_ENVS.value,
                                               _FLOOR_KEYS.value)
  # Held-out steps by what happens to the enemy slots between o_t and o_{t+1}: the same
  # enemies in the same slots; the same enemies re-sorted; a different set (kill, spawn, or
  # an unseen enemy coming nearer than the fifth).
  same_order = (test_shown[1:] == test_shown[:-1]).all(-1)
  same_set = (jnp.sort(test_shown[1:], -1) == jnp.sort(test_shown[:-1], -1)).all(-1)
  events = jnp.stack([same_order, same_set & ~same_order, ~same_set], -1)  # [T−1, E, 3]
  # Aligned with the data so windows can slice it: the last step has no successor.
  events = jnp.concatenate([events, jnp.zeros_like(events[:1])]).astype(jnp.float32)
  model = wm_lib.make_world_model(cfg.world_model, (obs_dim,))
  optimizer = wm_lib.make_optimizer(cfg.world_model)
  state = wm_lib.init(jax.random.PRNGKey(0), model, optimizer, (obs_dim,), jnp.float32,
                      wm_lib.action_vector_size(spec))
  num_windows = _LEARN_LENGTH.value // LENGTH
  train_length, train_batch = _TRAIN_WINDOW_LENGTH.value, _TRAIN_WINDOWS.value
  num_train_windows = _LEARN_LENGTH.value // train_length

  def windows(data, key):
    window = jax.random.randint(key, (train_batch,), 0, num_train_windows)
    env_index = jax.random.randint(jax.random.fold_in(key, 1), (train_batch,), 0,
                                   _LEARN_ENVS.value)
    def take(x):
      x = x.reshape((num_train_windows, train_length) + x.shape[1:])  # [W, L, E, ...]
      return jnp.moveaxis(x[window, :, env_index], 0, 1)  # [L, B, ...]
    batch = jax.tree.map(take, data)
    return batch._replace(is_first=batch.is_first.at[0].set(True))

  @jax.jit
  def train(state, key):
    def step(state, key):
      data_key, update_key = jax.random.split(key)
      state, _, metrics = wm_lib.update(state, windows(train_data, data_key), update_key,
                                        cfg.world_model, model=model, optimizer=optimizer)
      return state, metrics["wm/one_step_error"]
    return jax.lax.scan(step, state, jax.random.split(key, _EVAL_EVERY.value))

  def evaluate(params):
    """Per-dimension mean squared errors of the model and of copy-last over every held-out
    window (each o_{t+1} that stays in o_t's episode counts once), and both errors summed
    over dimensions per enemy-slot event class (see `events`)."""
    data = jax.tree.map(lambda x: x.reshape((num_windows, LENGTH) + x.shape[1:]),
                        (test_data, events))

    def one(window, key):
      batch, event = jax.tree.map(lambda x: x[window], data)
      batch = batch._replace(is_first=batch.is_first.at[0].set(True))
      model_sq, copy_sq, inside = wm_lib.one_step_squared_errors(params, model, batch, key)
      weight = inside[..., None]
      by_event = lambda sq: jnp.einsum("tb,tbk->k", sq.sum(-1) * inside, event[:-1])
      return ((model_sq * weight).sum((0, 1)), (copy_sq * weight).sum((0, 1)), inside.sum(),
              by_event(model_sq), by_event(copy_sq))

    keys = jax.random.split(jax.random.PRNGKey(12), num_windows)
    model_sq, copy_sq, count, model_event, copy_event = jax.vmap(one)(
        jnp.arange(num_windows), keys)
    return (model_sq.sum(0) / count.sum(), copy_sq.sum(0) / count.sum(), model_event.sum(0),
            copy_event.sum(0))

  evaluate_jit = jax.jit(evaluate)
  layout = env.vector_layout
  # The floor over every held-out step whose o_{t+1} is in o_t's episode.
  inside = np.asarray(~test_data.is_first[1:])[..., None]
  target = np.asarray(wm_lib.observation_target(test_data.obs))
  floor_error = (np.asarray(floor_sq[:-1]) * inside).sum((0, 1)) / inside.sum()
  copy_error = (np.square(np.diff(target, axis=0)) * inside).sum((0, 1)) / inside.sum()
  print(f"  full-state floor (E[o_(t+1) | game state, a_t] over {_FLOOR_KEYS.value} env "
        f"keys): {floor_error.mean():.5f} vs copy-last {copy_error.mean():.5f} (ratio "
        f"{copy_error.sum() / floor_error.sum():.1f}x); per block, floor / copy-last: " +
        ", ".join(f"{name} {floor_error[part].sum() / copy_error[part].sum():.2f}"
                  for name, part in layout.items()
                  if copy_error[part].sum() > 1e-3 * copy_error.sum()), flush=True)
  start = time.perf_counter()
  key = jax.random.PRNGKey(1)
  for done in range(_EVAL_EVERY.value, _LEARN_STEPS.value + 1, _EVAL_EVERY.value):
    key, train_key = jax.random.split(key)
    state, train_errors = train(state, train_key)
    model_error, copy_error, model_event, copy_event = map(np.asarray,
                                                           evaluate_jit(state.params))
    print(f"  {done:5d} updates ({time.perf_counter() - start:5.0f} s, load "
          f"{os.getloadavg()[0]:4.1f}): held-out one-step error {model_error.mean():.5f} vs "
          f"copy-last {copy_error.mean():.5f} "
          f"(ratio {copy_error.mean() / model_error.mean():.1f}x); "
          f"training batches {np.mean(train_errors[-100:]):.5f}", flush=True)
    # Per block (so a run stopped early still shows it): model / copy-last [share].
    print("    " + ", ".join(
        f"{name} {model_error[part].sum() / max(copy_error[part].sum(), 1e-12):.2f} "
        f"[{copy_error[part].sum() / copy_error.sum():.2f}]" for name, part in layout.items()))
    print("    steps by enemy slots (all dims): " + ", ".join(
        f"{name} {m / c:.2f} [{c / copy_event.sum():.2f}]" for name, m, c in zip(
            ("unchanged", "re-sorted", "set changed"), model_event, copy_event)))


def check_window_lengths(learn_length: int, train_window_length: int):
  """The recorded steps per env are cut into whole windows: training and held-out ones."""
  for length, name in ((LENGTH, "the held-out windows' length"),
                       (train_window_length, "--train_window_length")):
    if length < 2 or learn_length % length:
      raise app.UsageError(f"--learn_length={learn_length} must be a multiple of {name}, "
                           f"{length}, which must be at least 2 (o_t and o_(t+1))")


def main(argv):
  del argv
  check_window_lengths(_LEARN_LENGTH.value, _TRAIN_WINDOW_LENGTH.value)
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} cores; "
        f"batch {BATCH} x {LENGTH}")
  if _THROUGHPUT.value:
    cfg = config_lib.base_config()
    spec = BonkArena().action_spec(BonkArena().default_params())
    obs_dim = BonkArena().observation_shape(BonkArena().default_params())[0]
    throughput(cfg, obs_dim, spec, with_dream=True,
               label=f"default (deter 512, 32x32 categorical), WM + dream H={cfg.dream.horizon}")
    throughput(cfg, obs_dim, spec, with_dream=False, label="default, WM only")
    for upstream_layers, label in ((False, "mbjax's layers"), (True, "upstream's layers")):
      upstream = throughput_lib.upstream_world_model_config(upstream_layers)
      wm = upstream.world_model
      throughput(upstream, throughput_lib.UPSTREAM_OBS_DIM, spec, with_dream=False,
                 label=f"upstream size (obs {throughput_lib.UPSTREAM_OBS_DIM}, embed "
                 f"{wm.hidden}, deter {wm.deter}, Gaussian {wm.stoch}), {label} "
                 f"(rssm_layers={wm.rssm_layers}, head_layers={wm.head_layers}), WM only")
  if _LEARN_STEPS.value:
    wm = _CONFIG.value.world_model
    print(f"learning on BonkArena ({_LEARN_ENVS.value} envs x {_LEARN_LENGTH.value} steps of "
          "noisy scripted play; held-out trajectories from another seed; errors in the "
          f"decoder's target space, symlog, mean over all 96 dims): deter {wm.deter}, hidden "
          f"{wm.hidden}, stoch {wm.stoch}x{wm.classes or 'Gaussian'}, lr {wm.lr} (cosine decay "
          f"over {wm.lr_decay_updates or 'no'} updates), "
          f"predict_delta {wm.predict_delta}, entity_slots {tuple(wm.entity_slots)}, "
          f"agent_position {tuple(wm.agent_position)}; training "
          f"batches of {_TRAIN_WINDOWS.value} x {_TRAIN_WINDOW_LENGTH.value}")
    learning(_CONFIG.value)


if __name__ == "__main__":
  app.run(main)
