"""World-model benchmarks on the path imagination uses:
`python -m experiments.bench_world_model --checkpoint=runs/arena_apex`.

1. Usefulness (`--checkpoint`, a run with the world model on): held-out episodes are played
   by the run's served policy from episode keys the run never used (`--seed`), and the
   world model is scored on them as imagination uses it:
   - open-loop error: from the posterior at step t the prior is rolled forward with the
     real actions a_t … a_{t+k−1} and decoded; its error on o_{t+k} against copying o_t,
     for k = 1 … 15 (mean squared error over every observation dimension in the decoder's
     target space, symlog for vectors; only starts whose k steps stay in one episode);
   - reward: the reward head along those rollouts against the real rewards — Pearson per
     step and over the 15-step sums;
   - cloned states: from every `--clone_every`-th step the served actor plays 15 steps
     twice over — in the env from the recorded (cloned) game state and in the model from
     the posterior — `--clones` times each; Spearman between the two mean 15-step returns
     across start states.
2. Fit (`--fit`): the world model alone, without an agent, on fixed play — BonkArena vector
   observations from the scripted policy with a `--fit_random` share of random actions
   (`--fit_envs` × `--fit_length` steps) — with `configs/arena_apex.py`'s model, trained on
   uniformly sampled windows of its replay shape for `--fit_updates` updates. Every
   `--fit_every` updates: the posterior's reconstruction error beside the data's variance
   (what predicting the mean gives), and on held-out play of the same policy (`--episodes` ×
   `--length`, key `--seed`) the open-loop ratios to copy-last at k = 1, 5, 15 and the reward
   Pearson of (1). It separates the model's learning from the agent's data, in minutes.
3. Throughput (`--throughput`): replayed steps per second of one model update (world model,
   then dream imagining 15 steps from every posterior; `experiments.throughput.
   model_update`) at DreamerV3's size1m shape (GRU 512 in 8 blocks, MLPs of 64, 32 × 4
   latents, CNN depth 16, 16 × 64 windows) on 64 × 64 frames and on 96-d vectors, and at
   `configs/arena_apex.py`'s size. DreamerV3's own number comes from the side-by-side
   harness (`experiments/bench_peers.py --row=dreamer`).
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_enable_concurrency_optimized_scheduler=false")

import time  # noqa: E402
from typing import Callable, NamedTuple  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import scipy.stats  # noqa: E402
from absl import app, flags  # noqa: E402

from configs import arena_apex  # noqa: E402
from experiments import cli  # noqa: E402
from experiments import throughput as throughput_lib  # noqa: E402
from mbjax.agents import apex, dream  # noqa: E402
from mbjax.agents import world_model as wm_lib  # noqa: E402
from mbjax.data import replay as replay_lib  # noqa: E402
from mbjax.envs import registry  # noqa: E402
from mbjax.envs.bonk_arena import make_scripted_policy, random_policy  # noqa: E402
from mbjax.envs.spaces import HybridActionSpec  # noqa: E402
from mbjax.nets.hybrid import to_env_action  # noqa: E402
from mbjax.train import evaluate  # noqa: E402
from mbjax.train import metrics as metrics_lib  # noqa: E402
from mbjax.train import run as run_lib  # noqa: E402

_CHECKPOINT = flags.DEFINE_string("checkpoint", "", "Workdir of a run with a world model.")
_EPISODES = flags.DEFINE_integer("episodes", 16, "Held-out envs played.", lower_bound=1)
_LENGTH = flags.DEFINE_integer("length", 512, "Steps recorded per env.", lower_bound=32)
_SEED = flags.DEFINE_integer("seed", 1000, "Key of the held-out episodes.")
_CLONE_EVERY = flags.DEFINE_integer("clone_every", 16, "Steps between cloned start states.",
                                    lower_bound=1)
_CLONES = flags.DEFINE_integer("clones", 8, "Rollouts per cloned start, in env and model.",
                               lower_bound=1)
_THROUGHPUT = flags.DEFINE_bool("throughput", False, "Time the model update instead.")
_FIT = flags.DEFINE_bool("fit", False, "Fit the world model alone on fixed scripted play.")
_FIT_UPDATES = flags.DEFINE_integer("fit_updates", 600, "Updates of --fit.", lower_bound=1)
_FIT_EVERY = flags.DEFINE_integer("fit_every", 150, "Updates between --fit reports.",
                                  lower_bound=1)
_FIT_ENVS = flags.DEFINE_integer("fit_envs", 32, "Envs of --fit's training play.",
                                 lower_bound=1)
_FIT_LENGTH = flags.DEFINE_integer("fit_length", 2048, "Steps per env of --fit's training "
                                   "play.", lower_bound=128)
_FIT_RANDOM = flags.DEFINE_float("fit_random", 0.2, "Share of random actions in --fit's play.",
                                 lower_bound=0.0, upper_bound=1.0)
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed updates per throughput row.",
                                lower_bound=1)

HORIZON = 15


def play(env, env_params, spec, policy, num_envs: int, length: int, key):
  """[T, E] play of `policy` (`initial_carry(n)`, `step(carry, obs, is_first, mask, key)`):
  observations, model action vectors, rewards, flags, masks, the env states (for cloning)
  and the policy's carry before each step."""
  reset_key, key = jax.random.split(key)
  obs, state = jax.vmap(env.reset, in_axes=(0, None))(jax.random.split(reset_key, num_envs),
                                                      env_params)

  def step(carry, key):
    obs, state, policy_carry, is_first = carry
    act_key, env_key, reset_key = jax.random.split(key, 3)
    mask = jax.vmap(env.action_mask, in_axes=(0, None))(state, env_params)
    new_carry, action = policy.step(policy_carry, obs, is_first, mask, act_key)
    next_obs, next_state, reward, terminated, truncated, _ = jax.vmap(
        env.step, in_axes=(0, 0, 0, None))(jax.random.split(env_key, num_envs), state, action,
                                           env_params)
    done = terminated | truncated
    fresh_obs, fresh_state = jax.vmap(env.reset, in_axes=(0, None))(
        jax.random.split(reset_key, num_envs), env_params)
    pick = lambda a, b: jnp.where(done.reshape(done.shape + (1,) * (a.ndim - 1)), a, b)
    out = dict(obs=obs, action=wm_lib.action_vector(action, spec), reward=reward,
               terminated=terminated, truncated=truncated, is_first=is_first, mask=mask,
               state=state, carry=policy_carry)
    carry = (pick(fresh_obs, next_obs), jax.tree.map(pick, fresh_state, next_state), new_carry,
             done)
    return carry, out

  carry = (obs, state, policy.initial_carry(num_envs), jnp.ones((num_envs,), bool))
  return jax.lax.scan(step, carry, jax.random.split(key, length))[1]


class _Stateless(NamedTuple):
  """A `policy_fn(key, obs, mask)` of one env as `play`'s batched, carry-less policy."""

  policy_fn: Callable

  def initial_carry(self, num_envs):
    return ()

  def step(self, carry, obs, is_first, mask, key):
    keys = jax.random.split(key, obs.shape[0])
    return carry, jax.vmap(self.policy_fn)(keys, obs, mask)


def open_loop(learners, wm_params, data, key):
  """Per start t and horizon k: decoded open-loop prediction errors, copy-last errors,
  predicted and real rewards, and whether t … t+k stay in one episode ([T−H, E, H] each)."""
  model = learners.world_model
  posts, _ = wm_lib.observe(model, wm_params, data["obs"], wm_lib.previous_actions(
      data["action"]), data["is_first"], key)
  length = data["reward"].shape[0]
  starts = length - HORIZON
  target = wm_lib.observation_target(data["obs"])
  offsets = jnp.arange(HORIZON)

  def from_start(t):
    start = jax.tree.map(lambda x: x[t], posts)
    actions = jax.lax.dynamic_slice_in_dim(data["action"], t, HORIZON)

    def step(state, inputs):
      action, step_key = inputs
      state = wm_lib.img_step(model, wm_params, state, action, step_key)
      return state, state.features

    _, features = jax.lax.scan(step, start, (actions, jax.random.split(
        jax.random.fold_in(key, t), HORIZON)))
    decoded, _ = model.apply(wm_params, features, method=wm_lib.WorldModel.decode)
    future = jax.lax.dynamic_slice_in_dim(target, t + 1, HORIZON)
    axes = tuple(range(2, target.ndim))
    model_error = jnp.square(decoded - future).mean(axes)
    copy_error = jnp.square(target[t][None] - future).mean(axes)
    predicted = model.apply(wm_params, features, method=wm_lib.WorldModel.reward)
    real = jax.lax.dynamic_slice_in_dim(data["reward"], t, HORIZON)
    ended = jax.lax.dynamic_slice_in_dim(data["is_first"], t + 1, HORIZON)
    inside = jnp.cumsum(ended, 0) == 0  # o_{t+k} in o_t's episode
    return model_error, copy_error, predicted, real, inside

  outs = jax.vmap(from_start)(jnp.arange(starts))  # leaves [starts, H, E]
  return jax.tree.map(lambda x: jnp.moveaxis(x, 1, 2), outs)  # [starts, E, H]


def cloned_returns(trainer, aux, data, starts, num_clones: int, key):
  """Mean 15-step returns of the served actor from recorded start states [N] (env, from the
  cloned game state; model, from its posterior) over `num_clones` rollouts each."""
  env, params, learners = trainer.env, trainer.env_params, trainer.learners
  model, wm_params = learners.world_model, aux.world_model.params
  nets, source = learners.serving
  actor_state = getattr(aux, source)
  t_index, e_index = starts
  take = lambda x: x[t_index, e_index]
  states, carries, obs = (jax.tree.map(take, data["state"]), jax.tree.map(take, data["carry"]),
                          take(data["obs"]))
  is_first = take(data["is_first"])

  def env_return(key):
    def one(state, carry, obs, first, key):
      def step(c, k):
        state, carry, obs, first, total, alive = c
        act_key, env_key = jax.random.split(k)
        mask = env.action_mask(state, params)[None]
        carry, raw = apex.act(aux, carry, obs[None], first[None], mask, act_key,
                              learners=learners)
        action = jax.tree.map(lambda x: x[0], to_env_action(raw, learners.squash))
        obs, state, reward, terminated, truncated, _ = env.step(env_key, state, action, params)
        total = total + jnp.where(alive, reward, 0.0)
        return (state, carry, obs, jnp.zeros((), bool), total,
                alive & ~(terminated | truncated)), None
      batch1 = jax.tree.map(lambda x: x[None], carry)
      init = (state, batch1, obs, first, jnp.float32(0.0), jnp.bool_(True))
      return jax.lax.scan(step, init, jax.random.split(key, HORIZON))[0][4]
    keys = jax.random.split(key, len(t_index))
    return jax.vmap(one)(states, carries, obs, is_first, keys)

  def model_return(key):
    filter_key, imagine_key = jax.random.split(key)
    prev = jnp.where(is_first[:, None], 0.0, carries.prev_action)
    post = wm_lib.filter_step(model, wm_params, carries.state, prev, obs, is_first, filter_key)
    states_h, _, _ = dream.imagine_actor(nets, actor_state.actor_params, model, wm_params,
                                         post, HORIZON, imagine_key)
    features = states_h.features[1:]
    rewards = model.apply(wm_params, features, method=wm_lib.WorldModel.reward)
    continues = jax.nn.sigmoid(model.apply(wm_params, features,
                                           method=wm_lib.WorldModel.continue_logit))
    alive = jnp.cumprod(jnp.concatenate([jnp.ones_like(continues[:1]), continues[:-1]]), 0)
    return (rewards * alive).sum(0)

  keys = jax.random.split(key, num_clones)
  env_mean = jax.lax.map(env_return, keys).mean(0)
  model_mean = jax.lax.map(model_return, keys).mean(0)
  return env_mean, model_mean


def usefulness(workdir: str) -> None:
  trainer, runner = run_lib.restore_trained(workdir)
  learners = trainer.learners
  if not learners.enabled or learners.serving is None:
    raise ValueError(f"{workdir}: the world-model metrics need a run whose served policy is a "
                     f"latent actor (served.policy={trainer.cfg.served.policy!r})")
  agent, aux = jax.device_get((runner.agent, runner.aux))
  key = jax.random.PRNGKey(_SEED.value)
  play_key, loop_key, clone_key = jax.random.split(key, 3)
  start = time.time()
  policy = evaluate.trained_policy(trainer, agent, aux)
  data = jax.jit(lambda k: play(trainer.env, trainer.env_params, learners.spec, policy,
                                _EPISODES.value, _LENGTH.value, k))(play_key)
  model_error, copy_error, predicted, real, inside = jax.device_get(jax.jit(
      lambda d, k: open_loop(learners, aux.world_model.params, d, k))(data, loop_key))
  episode_return = float(np.asarray(data["reward"]).sum() / max(
      1, int(np.asarray(data["terminated"] | data["truncated"]).sum())))
  print(f"{workdir}: update {int(runner.update_step)}, {_EPISODES.value} held-out envs × "
        f"{_LENGTH.value} steps (seed {_SEED.value}), mean return per finished episode "
        f"{episode_return:.2f}")
  print("open-loop error with the real actions (decoder target space) vs copying o_t:")
  print("   k | model error | copy-last | ratio | starts")
  for k in range(HORIZON):
    m = inside[..., k]
    me, ce = model_error[..., k][m].mean(), copy_error[..., k][m].mean()
    print(f"  {k + 1:2d} | {me:11.5f} | {ce:9.5f} | {me / ce:5.2f} | {int(m.sum())}")
  per_step, sums = reward_pearson(predicted, real, inside)
  print(f"imagined vs real reward with the real actions: Pearson {per_step:.3f} per step "
        f"({int(inside.sum())} steps), {sums:.3f} over 15-step sums "
        f"({int(inside[..., -1].sum())})")
  t_index, e_index = np.meshgrid(np.arange(0, _LENGTH.value - HORIZON, _CLONE_EVERY.value),
                                 np.arange(_EPISODES.value), indexing="ij")
  starts = (jnp.asarray(t_index.ravel()), jnp.asarray(e_index.ravel()))
  env_mean, model_mean = jax.device_get(jax.jit(
      lambda d, s, k: cloned_returns(trainer, aux, d, s, _CLONES.value, k))(
          data, starts, clone_key))
  rho = scipy.stats.spearmanr(env_mean, model_mean)[0]
  print(f"cloned states: 15-step returns of the served actor, env vs model, Spearman {rho:.3f} "
        f"over {len(env_mean)} starts × {_CLONES.value} rollouts (env mean "
        f"{env_mean.mean():.3f}, model mean {model_mean.mean():.3f}); {time.time() - start:.0f} s")


def reward_pearson(predicted, real, inside) -> tuple[float, float]:
  """Pearson of imagined and real rewards per step and over whole 15-step sums."""
  whole = inside[..., -1]
  return (scipy.stats.pearsonr(predicted[inside], real[inside])[0],
          scipy.stats.pearsonr(predicted.sum(-1)[whole], real.sum(-1)[whole])[0])


def copy_last_ratios(model_error, copy_error, inside) -> np.ndarray:
  """Open-loop error over copy-last error for k = 1 … 15."""
  return np.array([model_error[..., k][inside[..., k]].mean()
                   / copy_error[..., k][inside[..., k]].mean() for k in range(HORIZON)])


def fit() -> None:
  env, env_params = registry.make("bonk_arena", observation="vector")
  scripted = make_scripted_policy(env)

  def policy_fn(key, obs, mask):
    scripted_key, random_key, choice_key = jax.random.split(key, 3)
    use_random = jax.random.uniform(choice_key) < _FIT_RANDOM.value
    return jax.tree.map(lambda a, b: jnp.where(use_random, b, a),
                        scripted(scripted_key, obs, mask), random_policy(random_key, obs, mask))

  cfg = arena_apex.get_config("ppo")
  cfg.dream.enabled = cfg.efe.enabled = False
  spec = env.action_spec(env_params)
  policy = _Stateless(policy_fn)
  record = jax.jit(lambda e, n, k: play(env, env_params, spec, policy, e, n, k),
                   static_argnums=(0, 1))
  data = record(_FIT_ENVS.value, _FIT_LENGTH.value, jax.random.PRNGKey(0))
  held_out = record(_EPISODES.value, _LENGTH.value, jax.random.PRNGKey(_SEED.value))
  obs_shape = data["obs"].shape[2:]
  learners = apex.make_learners(cfg, spec, obs_shape)
  model, optimizer = learners.world_model, learners.wm_optimizer
  state = wm_lib.init(jax.random.PRNGKey(1), model, optimizer, obs_shape, jnp.float32,
                      wm_lib.action_vector_size(spec))
  window = cfg.replay.burn_in + cfg.replay.seq_len
  # The play as the agent's replay holds it: one stream per env, windows sampled alike.
  steps = wm_lib.Sequence(*(jnp.swapaxes(data[name], 0, 1)
                            for name in wm_lib.Sequence._fields))
  replay = replay_lib.add_streams(
      replay_lib.init_streams(jax.tree.map(lambda x: x[0, 0], steps), _FIT_LENGTH.value,
                              _FIT_ENVS.value), steps)

  def sample(key):
    windows = replay_lib.sample_windows(replay, key, cfg.replay.batch_size, window)
    return windows._replace(is_first=windows.is_first.at[0].set(True))

  @jax.jit
  def train(state, key):
    def step(state, key):
      sample_key, update_key = jax.random.split(key)
      state, _, metrics = wm_lib.update(state, sample(sample_key), update_key, cfg.world_model,
                                        model=model, optimizer=optimizer,
                                        burn_in=cfg.replay.burn_in)
      return state, metrics
    state, metrics = jax.lax.scan(step, state, jax.random.split(key, _FIT_EVERY.value))
    return state, jax.tree.map(jnp.mean, metrics)

  scores = jax.jit(lambda params, key: open_loop(learners, params, held_out, key))
  target = np.asarray(wm_lib.observation_target(data["obs"]))
  variance = float(target.reshape(-1, target.shape[-1]).var(0).mean())
  print(f"world model of configs/arena_apex.py fitted alone on {_FIT_ENVS.value} × "
        f"{_FIT_LENGTH.value} steps of scripted play ({_FIT_RANDOM.value:.0%} random actions);"
        f" held out: {_EPISODES.value} × {_LENGTH.value} (seed {_SEED.value}); data variance "
        f"{variance:.4f} (decoder target space)")
  print("  updates | recon  | open-loop / copy-last k=1, 5, 15 | reward Pearson step, sum "
        "| s")
  key = jax.random.PRNGKey(2)
  for done in range(_FIT_EVERY.value, _FIT_UPDATES.value + 1, _FIT_EVERY.value):
    key, train_key, score_key = jax.random.split(key, 3)
    start = time.time()
    state, metrics = train(state, train_key)
    model_error, copy_error, predicted, real, inside = jax.device_get(
        scores(state.params, score_key))
    ratios = copy_last_ratios(model_error, copy_error, inside)
    step_r, sum_r = reward_pearson(predicted, real, inside)
    print(f"  {done:7d} | {float(metrics['wm/recon']):.4f} | {ratios[0]:5.2f} {ratios[4]:5.2f} "
          f"{ratios[14]:5.2f}{'':16s} | {step_r:5.2f} {sum_r:5.2f}{'':12s} | "
          f"{time.time() - start:.0f}", flush=True)


def throughput() -> None:
  rows = (
      (throughput_lib.size1m_config(), (64, 64, 3), jnp.uint8, HybridActionSpec(0, (6,)),
       "size1m, 64×64 frames, world model + dream"),
      (throughput_lib.size1m_config(), (96,), jnp.float32, HybridActionSpec(2, (4,)),
       "size1m, 96-d vectors, world model + dream"),
      (arena_apex.get_config(), (96,), jnp.float32, HybridActionSpec(2, (4,)),
       "configs/arena_apex.py, 96-d vectors"))
  for cfg, obs_shape, obs_dtype, spec, label in rows:
    result = throughput_lib.model_update(cfg, obs_shape, obs_dtype, spec,
                                         cfg.replay.batch_size, 1, _REPEATS.value, shard=False)
    print(f"{label}: compile {result['compile_s']:.0f} s | update {result['update_s']:.2f} s "
          f"| {result['replayed_steps_per_s']:,.0f} replayed steps/s (load "
          f"{os.getloadavg()[0]:.1f})", flush=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  metrics_lib.quiet_library_logging()
  if _THROUGHPUT.value:
    throughput()
  if _FIT.value:
    fit()
  if _CHECKPOINT.value:
    usefulness(_CHECKPOINT.value)
  if not (_THROUGHPUT.value or _FIT.value or _CHECKPOINT.value):
    raise app.UsageError("give --checkpoint=<workdir>, --fit and/or --throughput")


if __name__ == "__main__":
  cli.run(main)
