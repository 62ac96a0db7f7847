"""CPQE: a consistency policy over action chunks with a Q-ensemble for uncertainty-aware
selection (the fast System-1 motor head).

Three learners on one state pytree, all pure functions:
* **Teacher**: an EDM denoiser (Karras et al. 2022) over action chunks [H, A] conditioned on
  the observation: D(x, σ) = c_skip x + c_out F(c_in x, c_noise(σ), obs) with c_skip =
  σ_d²/(σ²+σ_d²), c_out = σσ_d/√(σ²+σ_d²), c_in = 1/√(σ²+σ_d²), c_noise = ¼ ln σ; trained with
  ln σ ~ N(P_mean, P_std²) and weight (σ²+σ_d²)/(σσ_d)²; sampled with EDM's deterministic
  Heun solver on the ρ-schedule (`teacher_steps` levels, two network calls each).
* **Student**: consistency distillation (Song et al. 2023, Alg. 2). On the ascending
  schedule σ_min = t_1 < … < t_N = σ_max, draw n, x_{n+1} = a + t_{n+1} z, take one teacher
  Heun step down to x̂_n, and regress the online f_θ(x_{n+1}, t_{n+1}) toward the EMA target
  f_θ⁻(x̂_n, t_n): the target is on the *lower*-noise side. f uses the boundary
  parameterisation c_skip = σ_d²/((t−σ_min)²+σ_d²), c_out = σ_d(t−σ_min)/√(σ_d²+t²), so
  f(x, σ_min) = x exactly. One network call samples a chunk; `student_steps` > 1 chains
  re-noising and denoising (multistep consistency sampling).
* **Q-ensemble**: `num_q` MLPs over [obs, flattened chunk] vectorised with `nn.vmap`; each
  member regresses its own TD target r + γ(1−d) Q̄_i(s', a') with its own Polyak target net,
  a' drawn from the student at s'.

`select_action` draws K chunks from the student, scores them with mean − β·std of the
ensemble, and returns the best chunk and its first action, clipped to [−1, 1];
`deterministic=True` draws the candidates from a fixed key, so an observation always maps to
the same action.

Inside a learner (upstream `METABONK_TRAIN_CPQE`; `config.cpqe.enabled`, wired in
`mbjax.agents.apex`), `rollout_chunks` turns a time-major rollout into per-step transitions
and `learner_update` takes one step of all three learners on a sample of them. Acting is
receding-horizon (execute a chunk's first action, then choose again), so a transition is one
env step — (o_t, the H actions taken from t, r_t, o_{t+1}) — and Q bootstraps one step
ahead. Teacher and student learn only from chunks inside one episode; Q from every step
whose successor is real (not a truncation's reset observation).

Differs from upstream MetaBonk (`src/learner/consistency_policy.py`, notes §4): the
consistency target is on the correct side of the schedule and comes from a teacher ODE step
(real distillation, not consistency training on teacher samples); boundary-form f; the EMA
decay is a config value (0.95 as in the paper's CD runs, not a frozen 0.9999); the EMA
network has no dropout; Q members have independent targets and target networks; the
deterministic mode works; actions are clipped; the observation is one vector (no T_o = 2
context averaging); the networks are MLPs rather than upstream's embedding stacks.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import chex
import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax

from mbjax.agents.collectives import pmean


def default_config() -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict()
  cfg.horizon = 8  # action-chunk length (upstream METABONK_CPQE_HORIZON)
  cfg.sigma_min = 0.002
  cfg.sigma_max = 80.0
  cfg.sigma_data = 0.5
  cfg.rho = 7.0
  cfg.p_mean = -1.2  # ln σ ~ N(p_mean, p_std²) for teacher training (EDM)
  cfg.p_std = 1.2
  cfg.teacher_steps = 18  # Heun levels of teacher sampling
  cfg.distill_levels = 18  # N, the discretisation used for consistency distillation
  cfg.student_steps = 1  # 1: one-step sampling; more: chained consistency sampling
  cfg.ema_decay = 0.95  # student target network
  cfg.hidden = 256
  cfg.layers = 3
  cfg.lr = 3e-4
  cfg.max_grad_norm = 1.0
  cfg.num_q = 5
  cfg.q_hidden = 256
  cfg.q_lr = 3e-4
  cfg.gamma = 0.99
  cfg.q_target_rate = 0.005  # Polyak rate of the Q target networks
  cfg.num_samples = 8  # K candidates scored per observation
  cfg.beta = 1.0  # pessimism: score = mean − β·std
  cfg.batch_size = 256  # transitions per learner per `learner_update`
  return cfg


def _fourier(log_sigma, features: int = 32):
  freqs = jnp.exp(jnp.linspace(0.0, jnp.log(1000.0), features // 2))
  angles = log_sigma[..., None] * freqs
  return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


class ChunkNet(nn.Module):
  """F(x_in, c_noise, obs) for chunks x [B, H, A]: an MLP on [x, noise features, obs]."""

  hidden: int
  layers: int

  @nn.compact
  def __call__(self, x, c_noise, obs):
    batch, horizon, action_dim = x.shape
    h = jnp.concatenate([x.reshape(batch, -1), _fourier(c_noise), obs], axis=-1)
    for _ in range(self.layers):
      h = nn.silu(nn.LayerNorm()(nn.Dense(self.hidden)(h)))
    out = nn.Dense(horizon * action_dim, kernel_init=nn.initializers.zeros)(h)
    return out.reshape(batch, horizon, action_dim)


class QMember(nn.Module):
  hidden: int

  @nn.compact
  def __call__(self, obs, chunk):
    h = jnp.concatenate([obs, chunk.reshape(chunk.shape[0], -1)], axis=-1)
    for _ in range(2):
      h = nn.relu(nn.Dense(self.hidden)(h))
    return nn.Dense(1)(h)[..., 0]


class QEnsemble(nn.Module):
  """`num` independent Q members, vectorised: (obs [B, O], chunk [B, H, A]) → [num, B]."""

  num: int
  hidden: int

  @nn.compact
  def __call__(self, obs, chunk):
    members = nn.vmap(QMember, variable_axes={"params": 0}, split_rngs={"params": True},
                      in_axes=None, out_axes=0, axis_size=self.num)
    return members(self.hidden, name="members")(obs, chunk)


@flax.struct.dataclass
class CPQEState:
  teacher: Any
  teacher_opt: Any
  student: Any
  student_target: Any  # EMA of the student: the consistency target network θ⁻
  student_opt: Any
  q: Any
  q_target: Any
  q_opt: Any


class Transitions(NamedTuple):
  """On-policy chunk transitions [B, ...]: the chunk taken at obs, its reward, what followed."""

  obs: jax.Array
  chunk: jax.Array  # [B, H, A]
  reward: jax.Array
  next_obs: jax.Array
  done: jax.Array


def _networks(cfg):
  return ChunkNet(cfg.hidden, cfg.layers), QEnsemble(cfg.num_q, cfg.q_hidden)


def _optimizer(cfg, lr):
  return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), optax.adamw(lr))


def init(key: jax.Array, cfg: ml_collections.ConfigDict, obs_dim: int,
         action_dim: int) -> CPQEState:
  net, q_net = _networks(cfg)
  k_net, k_q = jax.random.split(key)
  chunk = jnp.zeros((1, cfg.horizon, action_dim))
  obs = jnp.zeros((1, obs_dim))
  teacher = net.init(k_net, chunk, jnp.zeros((1,)), obs)
  q = q_net.init(k_q, obs, chunk)
  opt, q_opt = _optimizer(cfg, cfg.lr), _optimizer(cfg, cfg.q_lr)
  # The student starts from the teacher's weights, as in Song et al. 2023.
  return CPQEState(teacher, opt.init(teacher), teacher, teacher, opt.init(teacher), q, q,
                   q_opt.init(q))


def karras_sigmas(cfg, levels: int) -> jax.Array:
  """The ρ-schedule, descending from σ_max to σ_min (`levels` values)."""
  ramp = jnp.linspace(0.0, 1.0, levels)
  lo, hi = cfg.sigma_min ** (1 / cfg.rho), cfg.sigma_max ** (1 / cfg.rho)
  return (hi + ramp * (lo - hi)) ** cfg.rho


def denoise(params, cfg, x, sigma, obs):
  """The EDM teacher D(x, σ): x [B, H, A], σ [B], obs [B, O]."""
  net, _ = _networks(cfg)
  s = sigma[:, None, None]
  sd2 = cfg.sigma_data ** 2
  c_skip = sd2 / (s ** 2 + sd2)
  c_out = s * cfg.sigma_data / jnp.sqrt(s ** 2 + sd2)
  c_in = 1.0 / jnp.sqrt(s ** 2 + sd2)
  return c_skip * x + c_out * net.apply(params, c_in * x, 0.25 * jnp.log(sigma), obs)


def consistency(params, cfg, x, sigma, obs):
  """The student f(x, σ) with the boundary form: f(x, σ_min) = x exactly."""
  net, _ = _networks(cfg)
  s = sigma[:, None, None]
  sd2 = cfg.sigma_data ** 2
  c_skip = sd2 / ((s - cfg.sigma_min) ** 2 + sd2)
  c_out = cfg.sigma_data * (s - cfg.sigma_min) / jnp.sqrt(sd2 + s ** 2)
  c_in = 1.0 / jnp.sqrt(s ** 2 + sd2)
  return c_skip * x + c_out * net.apply(params, c_in * x, 0.25 * jnp.log(sigma), obs)


def _heun_step(params, cfg, x, sigma, sigma_next, obs):
  """One step of EDM's deterministic sampler (Alg. 1) from σ to σ_next (Euler if σ_next = 0)."""
  d = (x - denoise(params, cfg, x, sigma, obs)) / sigma[:, None, None]
  x_euler = x + (sigma_next - sigma)[:, None, None] * d
  safe_next = jnp.maximum(sigma_next, cfg.sigma_min)
  d_next = (x_euler - denoise(params, cfg, x_euler, safe_next, obs)) / safe_next[:, None, None]
  corrected = x + (sigma_next - sigma)[:, None, None] * 0.5 * (d + d_next)
  return jnp.where((sigma_next > 0)[:, None, None], corrected, x_euler)


def sample_teacher(teacher_params, cfg, obs, key, action_dim: int) -> jax.Array:
  """Chunks [B, H, A] from the teacher's probability-flow ODE (2·teacher_steps calls)."""
  batch = obs.shape[0]
  sigmas = jnp.append(karras_sigmas(cfg, cfg.teacher_steps), 0.0)
  x = cfg.sigma_max * jax.random.normal(key, (batch, cfg.horizon, action_dim))

  def step(x, pair):
    sigma, sigma_next = (jnp.full((batch,), s) for s in pair)
    return _heun_step(teacher_params, cfg, x, sigma, sigma_next, obs), None

  x, _ = jax.lax.scan(step, x, (sigmas[:-1], sigmas[1:]))
  return x


def sample_student(student_params, cfg, obs, key, action_dim: int,
                   num_steps: int | None = None) -> jax.Array:
  """Chunks [B, H, A] in one network call (or `num_steps` chained calls)."""
  batch = obs.shape[0]
  num_steps = num_steps or cfg.student_steps
  keys = jax.random.split(key, num_steps)
  x = cfg.sigma_max * jax.random.normal(keys[0], (batch, cfg.horizon, action_dim))
  x = consistency(student_params, cfg, x, jnp.full((batch,), cfg.sigma_max), obs)
  # Chained sampling: re-noise to decreasing levels and map back (Song et al. 2023, Alg. 1).
  levels = karras_sigmas(cfg, num_steps + 1)[1:-1]
  for sigma, k in zip(levels, keys[1:]):
    noisy = x + jnp.sqrt(sigma ** 2 - cfg.sigma_min ** 2) * jax.random.normal(k, x.shape)
    x = consistency(student_params, cfg, noisy, jnp.full((batch,), sigma), obs)
  return x


def teacher_loss(params, cfg, obs, chunk, key):
  """EDM loss: E_σ,n[λ(σ) ‖D(a + σn, σ) − a‖²] with λ = (σ²+σ_d²)/(σσ_d)²."""
  k_sigma, k_noise = jax.random.split(key)
  batch = chunk.shape[0]
  sigma = jnp.exp(cfg.p_mean + cfg.p_std * jax.random.normal(k_sigma, (batch,)))
  noisy = chunk + sigma[:, None, None] * jax.random.normal(k_noise, chunk.shape)
  weight = (sigma ** 2 + cfg.sigma_data ** 2) / (sigma * cfg.sigma_data) ** 2
  error = jnp.square(denoise(params, cfg, noisy, sigma, obs) - chunk).mean((1, 2))
  return (weight * error).mean()


def distill_loss(student, student_target, teacher, cfg, obs, chunk, key):
  """Consistency distillation: ‖f_θ(x_{n+1}, t_{n+1}) − sg f_θ⁻(x̂_n, t_n)‖², x̂_n one teacher
  Heun step below x_{n+1}, so the target sits at the lower noise level."""
  k_n, k_z = jax.random.split(key)
  batch = chunk.shape[0]
  ascending = karras_sigmas(cfg, cfg.distill_levels)[::-1]
  n = jax.random.randint(k_n, (batch,), 0, cfg.distill_levels - 1)
  t_lo, t_hi = ascending[n], ascending[n + 1]
  x_hi = chunk + t_hi[:, None, None] * jax.random.normal(k_z, chunk.shape)
  x_lo = jax.lax.stop_gradient(_heun_step(teacher, cfg, x_hi, t_hi, t_lo, obs))
  target = jax.lax.stop_gradient(consistency(student_target, cfg, x_lo, t_lo, obs))
  return jnp.square(consistency(student, cfg, x_hi, t_hi, obs) - target).mean()


def q_values(q_params, cfg, obs, chunk) -> jax.Array:
  """[num_q, B] values of chunks [B, H, A] at obs [B, O]."""
  _, q_net = _networks(cfg)
  return q_net.apply(q_params, obs, chunk)


def q_loss(q_params, q_target, student, cfg, batch: Transitions, key):
  """Mean over members of (Q_i(s, a) − [r + γ(1−d) Q̄_i(s', a')])², a' ~ student(s')."""
  next_chunk = jnp.clip(sample_student(student, cfg, batch.next_obs, key,
                                       batch.chunk.shape[-1]), -1.0, 1.0)
  next_q = q_values(q_target, cfg, batch.next_obs, next_chunk)  # [num_q, B]: per member
  target = batch.reward + cfg.gamma * (1.0 - batch.done.astype(jnp.float32)) * next_q
  q = q_values(q_params, cfg, batch.obs, batch.chunk)
  return jnp.square(q - jax.lax.stop_gradient(target)).mean()


# With `axis_name` (under shard_map, each device holding part of the batch) every loss is
# averaged over the devices before differentiation, so replicated parameters take the
# global-batch step on every device.
def update_teacher(state: CPQEState, obs, chunk, key, cfg, axis_name: str | None = None):
  loss, grads = jax.value_and_grad(
      lambda p: pmean(teacher_loss(p, cfg, obs, chunk, key), axis_name))(state.teacher)
  updates, opt = _optimizer(cfg, cfg.lr).update(grads, state.teacher_opt, state.teacher)
  return state.replace(teacher=optax.apply_updates(state.teacher, updates),
                       teacher_opt=opt), {"cpqe/teacher_loss": loss}


def update_student(state: CPQEState, obs, chunk, key, cfg, axis_name: str | None = None):
  loss, grads = jax.value_and_grad(lambda p: pmean(distill_loss(
      p, state.student_target, state.teacher, cfg, obs, chunk, key), axis_name))(state.student)
  updates, opt = _optimizer(cfg, cfg.lr).update(grads, state.student_opt, state.student)
  student = optax.apply_updates(state.student, updates)
  target = optax.incremental_update(student, state.student_target, 1.0 - cfg.ema_decay)
  return state.replace(student=student, student_target=target,
                       student_opt=opt), {"cpqe/distill_loss": loss}


def update_q(state: CPQEState, batch: Transitions, key, cfg, axis_name: str | None = None):
  loss, grads = jax.value_and_grad(lambda p: pmean(q_loss(
      p, state.q_target, state.student, cfg, batch, key), axis_name))(state.q)
  updates, opt = _optimizer(cfg, cfg.q_lr).update(grads, state.q_opt, state.q)
  q = optax.apply_updates(state.q, updates)
  q_target = optax.incremental_update(q, state.q_target, cfg.q_target_rate)
  return state.replace(q=q, q_target=q_target, q_opt=opt), {"cpqe/q_loss": loss}


def update(state: CPQEState, batch: Transitions, key: jax.Array, cfg):
  """One step of all three learners on a batch of on-policy chunk transitions."""
  chex.assert_rank(batch.chunk, 3)
  k_teacher, k_student, k_q = jax.random.split(key, 3)
  state, m_teacher = update_teacher(state, batch.obs, batch.chunk, k_teacher, cfg)
  state, m_student = update_student(state, batch.obs, batch.chunk, k_student, cfg)
  state, m_q = update_q(state, batch, k_q, cfg)
  return state, {**m_teacher, **m_student, **m_q}


class RolloutChunks(NamedTuple):
  """Per-step CPQE transitions of a rollout, [n, E, ...] for start steps t = 0..n−1."""

  transitions: Transitions
  chunk_valid: jax.Array  # bool[n, E]: the H actions from t belong to one episode
  td_valid: jax.Array  # bool[n, E]: o_{t+1} is t's real successor (no truncation at t)


def rollout_chunks(obs, actions, reward, terminated, truncated, horizon: int) -> RolloutChunks:
  """Transitions (o_t, a_{t..t+H−1}, r_t, o_{t+1}, terminated_t) of a time-major rollout.

  Args:
    obs: [T, E, ...] observations (flattened to f32[T, E, F]).
    actions: f32[T, E, A] actions in env space ([−1, 1]).
    reward, terminated, truncated: [T, E]; an episode that ends at t auto-resets, so o_{t+1}
      is the next episode's first observation.
    horizon: H, the chunk length.
  """
  length, envs = reward.shape
  chex.assert_shape(actions, (length, envs, None))
  starts = min(length - horizon + 1, length - 1)  # the chunk and o_{t+1} inside the rollout
  if starts < 1:
    raise ValueError(f"a rollout of {length} steps is too short for CPQE chunks of "
                     f"{horizon} (config.cpqe.horizon)")
  flat = obs.reshape((length, envs, -1)).astype(jnp.float32)
  chunk = jnp.stack([actions[k:k + starts] for k in range(horizon)], axis=2)
  done = terminated | truncated
  ends_inside = jnp.zeros((starts, envs), bool)
  for k in range(horizon - 1):  # an episode ending before the chunk's last action
    ends_inside = ends_inside | done[k:k + starts]
  transitions = Transitions(flat[:starts], chunk, reward[:starts], flat[1:starts + 1],
                            terminated[:starts])
  return RolloutChunks(transitions, ~ends_inside, ~truncated[:starts])


def learner_update(state: CPQEState, chunks: RolloutChunks, key: jax.Array, cfg,
                   axis_name: str | None = None):
  """One step of teacher, student and Q-ensemble on `cfg.batch_size` transitions each,
  sampled uniformly from the valid ones of `chunks` (teacher and student: `chunk_valid`;
  Q: `td_valid`). The rollout is data: no gradient reaches whatever produced it."""
  chunks = jax.lax.stop_gradient(chunks)
  flat = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), chunks.transitions)
  k_policy, k_td, k_teacher, k_student, k_q = jax.random.split(key, 5)

  def sample(k, valid):
    # The tiny floor keeps the draw defined when nothing is valid (then it is uniform).
    weight = valid.reshape(-1).astype(jnp.float32) + 1e-12
    index = jax.random.choice(k, weight.shape[0], (cfg.batch_size,), p=weight / weight.sum())
    return jax.tree.map(lambda x: x[index], flat)

  policy_batch = sample(k_policy, chunks.chunk_valid)
  state, m_teacher = update_teacher(state, policy_batch.obs, policy_batch.chunk, k_teacher,
                                    cfg, axis_name)
  state, m_student = update_student(state, policy_batch.obs, policy_batch.chunk, k_student,
                                    cfg, axis_name)
  state, m_q = update_q(state, sample(k_td, chunks.td_valid), k_q, cfg, axis_name)
  return state, {**m_teacher, **m_student, **m_q}


def select_action(state: CPQEState, cfg, obs: jax.Array, key: jax.Array, action_dim: int,
                  deterministic: bool = False):
  """K student candidates per observation scored by mean − β·std of the Q-ensemble.

  Returns (first action [B, A], chosen chunk [B, H, A]), both clipped to [−1, 1].
  """
  chex.assert_rank(obs, 2)
  batch, k = obs.shape[0], cfg.num_samples
  if deterministic:
    key = jax.random.PRNGKey(0)  # same candidates for the same observation, every call
  tiled = jnp.repeat(obs, k, axis=0)
  chunks = jnp.clip(sample_student(state.student, cfg, tiled, key, action_dim), -1.0, 1.0)
  q = q_values(state.q, cfg, tiled, chunks)
  score = (q.mean(0) - cfg.beta * q.std(0)).reshape(batch, k)
  best = jnp.argmax(score, axis=1)
  chosen = chunks.reshape((batch, k) + chunks.shape[1:])[jnp.arange(batch), best]
  return chosen[:, 0], chosen
