"""Skill tokens: a VQ-VAE over windows of hybrid actions (van den Oord et al. 2017,
"Neural Discrete Representation Learning"), one token per window.

Input: `window` (16) consecutive actions, each flattened to continuous dims + one-hot
branches (`world_model.action_vector`, [window, A]). An MLP encoder maps the window to
z ∈ R^code_dim; z is replaced by its nearest code e_k (L2) of a `num_codes` (256) codebook,
with the straight-through estimator (the decoder's gradient flows to z unchanged); an MLP
decoder reconstructs the continuous dims (MSE) and the branches (cross-entropy).

Loss = reconstruction + commitment · ‖z − sg(e_k)‖². The codebook is not trained by
gradients but by exponential moving averages of the assigned encoder outputs (the paper's
appendix; Razavi et al. 2019): N_k ← γN_k + (1−γ)n_k, m_k ← γm_k + (1−γ)Σ z, e_k = m_k / N̂_k
with Laplace-smoothed counts N̂. Usage is tracked per code (`unused_for`: updates since the
code was last assigned); a code unused for `dead_after` updates is restarted at a random
encoder output of the current batch (pure: the key is an argument), so it competes again.
Metrics: batch perplexity exp(H(p̄)) of the code assignment, the fraction of codes used in
the batch and the fraction alive (assigned within `dead_after` updates).

Differs from upstream MetaBonk (`src/learner/skill_tokens.py`): the EMA is the only codebook
update (upstream also added a gradient codebook loss and then overwrote it with the EMA every
forward pass), dead codes are restarted instead of decaying to 0, discrete branches are
one-hot with a cross-entropy (upstream regressed raw values with tanh), and the encoder is an
MLP over the flattened window (upstream: three strided 1-D convolutions).

Labelling (`skill_tokens`): an episode is cut into consecutive windows starting at 0,
window, 2·window, …, plus one window ending at the last frame when T is not a multiple of
the window; every frame gets the token of the first window that covers it; −1 where nothing
covers it (T < window).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import chex
import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from mbjax.agents.world_model import action_vector, action_vector_size
from mbjax.envs.spaces import HybridAction, HybridActionSpec


@dataclasses.dataclass(frozen=True)
class SkillConfig:
  """VQ-VAE hyperparameters (hashable: a static jit argument)."""

  window: int = 16  # actions per token
  stride: int = 8  # between training windows (labelling uses `window`)
  num_codes: int = 256
  code_dim: int = 64
  hidden: int = 256
  commitment: float = 0.25
  ema_decay: float = 0.99
  ema_epsilon: float = 1e-5  # Laplace smoothing of the EMA cluster sizes
  dead_after: int = 100  # updates a code may stay unassigned before it is restarted
  lr: float = 3e-4
  max_grad_norm: float = 1.0

  def __post_init__(self):
    if self.window < 1 or self.stride < 1 or self.num_codes < 2 or self.dead_after < 1:
      raise ValueError(f"SkillConfig needs window, stride, dead_after >= 1 and num_codes >= 2;"
                       f" got window={self.window}, stride={self.stride}, "
                       f"num_codes={self.num_codes}, dead_after={self.dead_after}")


class SkillAutoencoder(nn.Module):
  """Encoder [N, window, A] → z [N, code_dim]; decoder z → (continuous, branch logits)."""

  cfg: SkillConfig
  spec: HybridActionSpec

  def setup(self):
    cfg, spec = self.cfg, self.spec
    self.enc = [nn.Dense(cfg.hidden), nn.Dense(cfg.hidden)]
    self.enc_out = nn.Dense(cfg.code_dim)
    self.dec = [nn.Dense(cfg.hidden), nn.Dense(cfg.hidden)]
    self.dec_out = nn.Dense(cfg.window * action_vector_size(spec))

  def encode(self, windows: jax.Array) -> jax.Array:
    x = windows.reshape(windows.shape[0], -1)
    for layer in self.enc:
      x = nn.relu(layer(x))
    return self.enc_out(x)

  def decode(self, codes: jax.Array):
    x = codes
    for layer in self.dec:
      x = nn.relu(layer(x))
    out = self.dec_out(x).reshape(codes.shape[0], self.cfg.window, -1)
    c = self.spec.continuous_dim
    logits = tuple(out[..., c + o:c + o + n]
                   for o, n in zip(self.spec.branch_offsets, self.spec.branches))
    return out[..., :c], logits

  def __call__(self, windows):
    return self.decode(self.encode(windows))


@flax.struct.dataclass
class Codebook:
  embedding: jax.Array  # f32[K, D]
  cluster_size: jax.Array  # f32[K], EMA of assignments per update
  embed_sum: jax.Array  # f32[K, D], EMA of the sum of assigned encoder outputs
  unused_for: jax.Array  # i32[K], updates since the code was last assigned


@flax.struct.dataclass
class SkillState:
  params: Any
  opt_state: Any
  codebook: Codebook
  step: jax.Array  # i32[]
  cfg: SkillConfig = flax.struct.field(pytree_node=False)
  spec: HybridActionSpec = flax.struct.field(pytree_node=False)


def make_optimizer(cfg: SkillConfig) -> optax.GradientTransformation:
  return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), optax.adam(cfg.lr))


def init(key: jax.Array, cfg: SkillConfig, spec: HybridActionSpec) -> SkillState:
  net_key, code_key = jax.random.split(key)
  net = SkillAutoencoder(cfg, spec)
  params = net.init(net_key, jnp.zeros((1, cfg.window, action_vector_size(spec))))
  embedding = jax.random.normal(code_key, (cfg.num_codes, cfg.code_dim))
  # embed_sum gets its own buffer: `update` donates the state, and one buffer in two
  # donated leaves is an error.
  codebook = Codebook(embedding, jnp.ones((cfg.num_codes,)), jnp.copy(embedding),
                      jnp.zeros((cfg.num_codes,), jnp.int32))
  return SkillState(params, make_optimizer(cfg).init(params), codebook,
                    jnp.zeros((), jnp.int32), cfg, spec)


# -- vector quantisation ---------------------------------------------------------------------


def nearest_code(z: jax.Array, embedding: jax.Array) -> jax.Array:
  """Index i32[N] of the code nearest (L2) to each row of z [N, D]."""
  distances = (jnp.sum(z * z, -1, keepdims=True) - 2.0 * z @ embedding.T
               + jnp.sum(embedding * embedding, -1)[None])
  return jnp.argmin(distances, axis=-1).astype(jnp.int32)


def straight_through(z: jax.Array, quantized: jax.Array) -> jax.Array:
  """Forward: `quantized`; backward: the identity to z (and no gradient to the codes)."""
  return z + jax.lax.stop_gradient(quantized - z)


def perplexity(codes: jax.Array, num_codes: int) -> jax.Array:
  """exp(entropy) of the empirical code distribution of `codes` i32[N]."""
  p = jnp.bincount(codes, length=num_codes) / codes.shape[0]
  return jnp.exp(-jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)))


def ema_update(codebook: Codebook, z: jax.Array, codes: jax.Array, decay: float,
               epsilon: float) -> Codebook:
  """Moves every assigned code towards the mean of its encoder outputs (see module doc)."""
  k = codebook.embedding.shape[0]
  onehot = jax.nn.one_hot(codes, k, dtype=z.dtype)
  counts = onehot.sum(0)
  cluster_size = decay * codebook.cluster_size + (1 - decay) * counts
  embed_sum = decay * codebook.embed_sum + (1 - decay) * onehot.T @ z
  total = cluster_size.sum()
  smoothed = (cluster_size + epsilon) / (total + k * epsilon) * total
  unused_for = jnp.where(counts > 0, 0, codebook.unused_for + 1)
  return Codebook(embed_sum / smoothed[:, None], cluster_size, embed_sum, unused_for)


def restart_dead_codes(key: jax.Array, codebook: Codebook, z: jax.Array,
                       dead_after: int) -> tuple[Codebook, jax.Array]:
  """Codes unused for ≥ `dead_after` updates → random rows of z [N, D] (one per code),
  with a unit EMA count; returns (codebook, how many were restarted)."""
  dead = codebook.unused_for >= dead_after
  pick = jax.random.randint(key, (codebook.embedding.shape[0],), 0, z.shape[0])
  fresh = z[pick]
  embedding = jnp.where(dead[:, None], fresh, codebook.embedding)
  cluster_size = jnp.where(dead, 1.0, codebook.cluster_size)
  embed_sum = jnp.where(dead[:, None], fresh, codebook.embed_sum)
  unused_for = jnp.where(dead, 0, codebook.unused_for)
  return Codebook(embedding, cluster_size, embed_sum, unused_for), dead.sum()


# -- training ------------------------------------------------------------------------------


def _split_vector(windows: jax.Array, spec: HybridActionSpec):
  """[..., A] action vectors → (continuous [..., C], branch targets i32[..., nb])."""
  c = spec.continuous_dim
  targets = [jnp.argmax(windows[..., c + o:c + o + n], -1)
             for o, n in zip(spec.branch_offsets, spec.branches)]
  return windows[..., :c], targets


def loss(params, embedding, cfg: SkillConfig, spec: HybridActionSpec, windows: jax.Array):
  """Reconstruction + commitment on windows f32[N, window, A]; aux has z and the codes."""
  net = SkillAutoencoder(cfg, spec)
  z = net.apply(params, windows, method=SkillAutoencoder.encode)
  codes = nearest_code(jax.lax.stop_gradient(z), embedding)
  quantized = embedding[codes]
  continuous, logits = net.apply(params, straight_through(z, quantized),
                                 method=SkillAutoencoder.decode)
  target_c, target_d = _split_vector(windows, spec)
  recon_mse = jnp.mean(jnp.sum(jnp.square(continuous - target_c), -1))
  recon_ce = sum((optax.softmax_cross_entropy_with_integer_labels(l, t).mean()
                  for l, t in zip(logits, target_d)), jnp.zeros((), jnp.float32))
  hits = [(jnp.argmax(l, -1) == t).mean() for l, t in zip(logits, target_d)]
  accuracy = jnp.mean(jnp.stack(hits)) if hits else jnp.ones((), jnp.float32)
  commit = jnp.mean(jnp.sum(jnp.square(z - jax.lax.stop_gradient(quantized)), -1))
  total = recon_mse + recon_ce + cfg.commitment * commit
  metrics = {"recon_mse": recon_mse, "recon_ce": recon_ce, "recon_accuracy": accuracy,
             "commitment": commit}
  return total, (metrics, z, codes)


@functools.partial(jax.jit, donate_argnums=0)
def update(state: SkillState, windows: jax.Array, key: jax.Array):
  """One Adam step on the autoencoder, an EMA codebook step, then dead-code restarts."""
  cfg, spec = state.cfg, state.spec
  chex.assert_shape(windows, (None, cfg.window, action_vector_size(spec)))
  (value, (metrics, z, codes)), grads = jax.value_and_grad(loss, has_aux=True)(
      state.params, state.codebook.embedding, cfg, spec, windows)
  updates, opt_state = make_optimizer(cfg).update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  codebook = ema_update(state.codebook, z, codes, cfg.ema_decay, cfg.ema_epsilon)
  codebook, restarted = restart_dead_codes(key, codebook, z, cfg.dead_after)
  counts = jnp.bincount(codes, length=cfg.num_codes)
  metrics = dict(metrics, loss=value, perplexity=perplexity(codes, cfg.num_codes),
                 codes_used=jnp.mean((counts > 0).astype(jnp.float32)),
                 codes_alive=jnp.mean((codebook.unused_for < cfg.dead_after)
                                      .astype(jnp.float32)),
                 restarted=restarted)
  return state.replace(params=params, opt_state=opt_state, codebook=codebook,
                       step=state.step + 1), metrics


def fit(state: SkillState, windows: np.ndarray, num_steps: int, rng: np.random.Generator,
        key: jax.Array, batch: int = 64, log_fn: Callable[[int, dict], None] | None = None,
        log_every: int = 100, data_sharding: NamedSharding | None = None):
  """`num_steps` updates on random minibatches of `windows` f32[N, window, A].

  `data_sharding` (`mbjax.train.sharding.batch_sharding`): each global minibatch is split
  over its mesh and the state replicated there (data-parallel, as `idm_training.fit`); the
  codebook EMA sums over the global batch, so it too is the single-device update."""
  if data_sharding is not None:
    state = jax.device_put(state, NamedSharding(data_sharding.mesh, P()))
  windows = np.asarray(windows, np.float32)
  metrics = {}
  for step in range(num_steps):
    key, step_key = jax.random.split(key)
    idx = rng.integers(0, windows.shape[0], size=batch)
    state, metrics = update(state, jax.device_put(windows[idx], data_sharding), step_key)
    if log_fn is not None and (step + 1) % log_every == 0:
      log_fn(step + 1, jax.tree.map(float, metrics))
  return state, jax.tree.map(float, metrics)


# -- episodes ↔ windows ↔ tokens --------------------------------------------------------------


def action_vectors(continuous, discrete, spec: HybridActionSpec) -> np.ndarray:
  """Per-frame actions (f32[T, C], i32[T, nb]) → flat vectors f32[T, C + Σ n_i]."""
  chex.assert_shape(continuous, (None, spec.continuous_dim))
  chex.assert_shape(discrete, (continuous.shape[0], spec.num_branches))
  return np.asarray(action_vector(HybridAction(jnp.asarray(continuous),
                                               jnp.asarray(discrete)), spec))


def training_windows(vectors: np.ndarray, window: int, stride: int) -> np.ndarray:
  """[T, A] → [N, window, A], windows starting at 0, stride, 2·stride, … (N may be 0)."""
  starts = np.arange(0, vectors.shape[0] - window + 1, stride)
  return vectors[starts[:, None] + np.arange(window)[None]].reshape(-1, window,
                                                                     vectors.shape[-1])


def label_starts(length: int, window: int) -> np.ndarray:
  """Starts of the labelling windows of a T-frame episode (see module doc)."""
  if length < window:
    return np.zeros((0,), np.int64)
  starts = np.arange(0, length - window + 1, window)
  if starts[-1] + window < length:
    starts = np.append(starts, length - window)
  return starts


@functools.partial(jax.jit, static_argnums=(2, 3))
def _encode_windows(params, embedding, cfg: SkillConfig, spec: HybridActionSpec, windows):
  z = SkillAutoencoder(cfg, spec).apply(params, windows, method=SkillAutoencoder.encode)
  return nearest_code(z, embedding)


def encode(params, codebook: Codebook, cfg: SkillConfig, spec: HybridActionSpec,
           continuous, discrete) -> tuple[np.ndarray, np.ndarray]:
  """An episode's actions (f32[T, C], i32[T, nb]) → (tokens i32[num_windows], starts)."""
  vectors = action_vectors(continuous, discrete, spec)
  starts = label_starts(vectors.shape[0], cfg.window)
  if not len(starts):
    return np.zeros((0,), np.int32), starts
  windows = vectors[starts[:, None] + np.arange(cfg.window)[None]]
  return np.asarray(_encode_windows(params, codebook.embedding, cfg, spec, windows)), starts


def tokens_per_frame(tokens: np.ndarray, starts: np.ndarray, length: int,
                     window: int) -> np.ndarray:
  """i32[T]: each frame gets the token of the first window covering it (−1 if none)."""
  out = np.full((length,), -1, np.int32)
  for token, start in zip(tokens[::-1], starts[::-1]):  # earlier windows written last win
    out[start:start + window] = token
  return out
