"""Mamba and CfC cores: stepping == whole sequence (conv state included), exact resets,
hand-checked CfC cases in ncps's three modes with variable Δt, the PPO integration (unroll's
sequence path == per-step scan, in values and gradients, Δt included), and the memory-task
learning test against a feed-forward baseline."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import memory_ppo
from mbjax.agents import ppo
from mbjax.envs import registry
from mbjax.envs.spaces import HybridAction, HybridActionSpec
from mbjax.nets import cores, mamba
from mbjax.nets.cfc import CfCCell
from mbjax.train import anakin
from mbjax.train import config as config_lib

L, BATCH, D_MODEL, LAYERS, N = 23, 3, 8, 2, 4


def _mamba_setup(scan_path="chunked"):
  stack = mamba.MambaStack(D_MODEL, LAYERS, N, scan_path=scan_path, chunk_size=5)
  k = jax.random.split(jax.random.PRNGKey(0), 4)
  u = jax.random.normal(k[0], (L, BATCH, D_MODEL))
  is_first = jnp.zeros((L, BATCH), bool).at[7, 0].set(True).at[1, 1].set(True).at[0, 2].set(
      True)
  carry = stack.initial_carry(BATCH)
  params = stack.init(k[1], carry, u[0], is_first[0])
  # A non-zero starting carry: the conv history and SSM state must both be used correctly.
  leaves, tree = jax.tree.flatten(carry)
  keys = jax.random.split(k[2], len(leaves))
  carry = jax.tree.unflatten(tree, [jax.random.normal(kk, x.shape) for kk, x in zip(keys, leaves)])
  return stack, params, carry, u, is_first


@functools.partial(jax.jit, static_argnums=0)
def _sequence_and_steps(stack, params, carry, u, is_first):
  seq_carry, seq_out = stack.apply(params, carry, u, is_first, method=stack.sequence)

  def step(c, inputs):
    c, out = stack.apply(params, c, *inputs)
    return c, (out, c)

  step_carry, (step_out, carries) = jax.lax.scan(step, carry, (u, is_first))
  return seq_carry, seq_out, step_carry, step_out, carries


@pytest.mark.parametrize("scan_path", ["sequential", "chunked"])
def test_mamba_stepping_reproduces_the_sequence(scan_path):
  stack, params, carry, u, is_first = _mamba_setup(scan_path)
  seq_carry, seq_out, step_carry, step_out, carries = _sequence_and_steps(
      stack, params, carry, u, is_first)
  np.testing.assert_allclose(step_out, seq_out, rtol=1e-5, atol=1e-5)  # every position
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-5),
               step_carry, seq_carry)  # conv state and SSM state of every layer
  # Cutting the sequence anywhere and resuming from the carried state changes nothing.
  cut = 12
  first_carry, first = stack.apply(params, carry, u[:cut], is_first[:cut], method=stack.sequence)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-5),
               first_carry, jax.tree.map(lambda c: c[cut - 1], carries))
  _, second = stack.apply(params, first_carry, u[cut:], is_first[cut:], method=stack.sequence)
  np.testing.assert_allclose(jnp.concatenate([first, second]), seq_out, rtol=1e-5, atol=1e-5)


def test_mamba_reset_forgets_conv_and_ssm_state_exactly():
  stack, params, carry, u, is_first = _mamba_setup("sequential")
  t = 7  # batch 0 starts a new episode here
  huge = jax.tree.map(lambda c: 100.0 * c, carry)  # any leak past the reset would show
  _, out = stack.apply(params, huge, u, is_first, method=stack.sequence)
  _, fresh = stack.apply(params, stack.initial_carry(BATCH), u[t:], is_first[t:],
                         method=stack.sequence)
  # Equal up to the rounding of differently shaped matmuls (~5e-7), not bit for bit.
  np.testing.assert_allclose(out[t:, 0], fresh[:, 0], rtol=1e-5, atol=1e-5)
  # Before the reset the starting carry does matter (the comparison is not vacuous).
  _, from_zero = stack.apply(params, stack.initial_carry(BATCH), u, is_first,
                             method=stack.sequence)
  assert np.abs(out[:t, 0] - from_zero[:t, 0]).max() > 1e-3
  # Step mode: a reset token with any history equals a reset token with none.
  state, out_step = stack.apply(params, carry, u[0], jnp.ones((BATCH,), bool))
  zero_state, zero_step = stack.apply(params, stack.initial_carry(BATCH), u[0],
                                      jnp.ones((BATCH,), bool))
  np.testing.assert_array_equal(out_step, zero_step)
  jax.tree.map(np.testing.assert_array_equal, state, zero_state)


def test_mamba_step_jitted_equals_unjitted():
  stack, params, carry, u, is_first = _mamba_setup("sequential")
  jitted = jax.jit(stack.apply)(params, carry, u[0], is_first[0])
  with jax.disable_jit():
    eager = stack.apply(params, carry, u[0], is_first[0])
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-6), jitted,
               eager)


@pytest.mark.parametrize("projection_dtype, tolerance", [(jnp.float32, 1e-5),
                                                         (jnp.bfloat16, 3e-2)])
def test_fast_step_equals_the_module_step(projection_dtype, tolerance):
  """System 1's pure step on `step_weights` == `MambaStack` stepped, outputs and carries at
  every position, resets included: to float rounding with f32 projections, to bf16 rounding
  with the default bf16 ones (which must then differ, or the cast did not happen)."""
  stack, params, carry, u, is_first = _mamba_setup("sequential")
  weights = mamba.step_weights(params, projection_dtype)
  assert len(weights.layers) == LAYERS
  assert weights.layers[0].in_proj.dtype == projection_dtype

  @jax.jit
  def both(carry):
    def step(carries, inputs):
      module_carry, fast_carry = carries
      module_carry, module_out = stack.apply(params, module_carry, *inputs)
      fast_carry, fast_out = mamba.fast_step(weights, fast_carry, *inputs)
      return (module_carry, fast_carry), (module_out, fast_out, module_carry, fast_carry)
    return jax.lax.scan(step, (carry, carry), (u, is_first))[1]

  module_out, fast_out, module_carries, fast_carries = both(carry)
  assert np.abs(np.asarray(module_out)).max() > 0.1  # not a vacuous comparison
  assert fast_out.dtype == jnp.float32
  np.testing.assert_allclose(fast_out, module_out, rtol=tolerance, atol=tolerance)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=tolerance, atol=tolerance),
               fast_carries, module_carries)
  if projection_dtype == jnp.bfloat16:
    assert np.abs(np.asarray(fast_out) - np.asarray(module_out)).max() > 1e-5


def test_pilot_roles_default_to_a_cfc_core():
  """`config.role` containing "pilot" (upstream: a liquid net for any policy named *pilot*)
  makes CfC the core unless `network.core` is set, in either order."""
  cfg = config_lib.base_config()
  assert (cfg.role, cfg.network.core) == ("", "none")
  cfg.role = "pilot"
  assert cfg.network.core == "cfc" and cfg.to_dict()["network"]["core"] == "cfc"
  network = ppo.make_network(cfg.network, HybridActionSpec(2, (3,)))
  assert network.core == "cfc" and network.initial_carry(5).shape == (5, cfg.network.core_size)
  cfg.role = "Pilot_2"
  assert cfg.network.core == "cfc"
  cfg.role = "scout"
  assert cfg.network.core == "none"
  explicit = config_lib.base_config()
  explicit.network.core = "none"  # set explicitly: the role no longer decides
  explicit.role = "pilot"
  assert explicit.network.core == "none"
  memory = memory_ppo.get_config("mamba")  # a config file that names its core
  memory.role = "pilot"
  assert memory.network.core == "mamba"


# Per-unit biases with zero kernels: the backbone is lecun_tanh(0) = 0, so every head is its
# bias: ff1 = tanh(b₁) (b₁ itself in "pure"), ff2 = tanh(b₂), t_a = b_a, t_b = b_tb.
CFC_B1, CFC_B2 = np.array([0.3, -0.6, 1.2]), np.array([-0.8, 0.4, 0.1])
CFC_TA, CFC_TB = np.array([0.5, -1.0, 2.0]), np.array([0.3, 0.0, -1.0])
CFC_W_TAU, CFC_A = np.array([0.2, -0.5, 0.0]), np.array([1.5, 1.0, -0.7])


def _cfc_with_known_weights(mode, size=3, in_dim=2):
  cell = CfCCell(size, mode=mode)
  params = cell.init(jax.random.PRNGKey(0), jnp.zeros((1, size)), jnp.zeros((1, in_dim)),
                     jnp.zeros((1,), bool))
  params = jax.tree.map(jnp.zeros_like, params)
  p = params["params"]
  p["ff1"]["bias"] = jnp.asarray(CFC_B1, jnp.float32)
  if mode == "pure":
    p["w_tau"], p["A"] = jnp.asarray(CFC_W_TAU, jnp.float32), jnp.asarray(CFC_A, jnp.float32)
  else:
    p["ff2"]["bias"] = jnp.asarray(CFC_B2, jnp.float32)
    p["time_a"]["bias"] = jnp.asarray(CFC_TA, jnp.float32)
    p["time_b"]["bias"] = jnp.asarray(CFC_TB, jnp.float32)
  return cell, params


@pytest.mark.parametrize("mode", ["default", "no_gate", "pure"])
def test_cfc_hand_checked_time_dependence(mode):
  """ncps's three modes at Δt = 0, 1, 2.5 and 10⁴ in one batch, against the formulas."""
  cell, params = _cfc_with_known_weights(mode)
  x, carry = jnp.ones((4, 2)), jnp.zeros((4, 3))
  dt = np.array([0.0, 1.0, 2.5, 1e4])
  out, _ = jax.jit(cell.apply)(params, carry, x, jnp.zeros((4,), bool), jnp.asarray(dt))
  ff1, ff2, t = np.tanh(CFC_B1), np.tanh(CFC_B2), dt[:, None]
  gate = 1.0 / (1.0 + np.exp(-(CFC_TA * t + CFC_TB)))
  if mode == "default":
    expected = ff1 * (1.0 - gate) + gate * ff2
    # Δt = 0 is set by t_b alone; a long Δt reaches ff2 where t_a > 0 and ff1 where t_a < 0.
    np.testing.assert_allclose(out[3], [ff2[0], ff1[1], ff2[2]], rtol=1e-6)
  elif mode == "no_gate":
    expected = ff1 + gate * ff2
  else:
    expected = -CFC_A * np.exp(-t * (np.abs(CFC_W_TAU) + np.abs(CFC_B1))) * CFC_B1 + CFC_A
    np.testing.assert_allclose(out[3], CFC_A, rtol=1e-6)  # the state relaxes to A
  np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-7)
  default, _ = cell.apply(params, carry, x, jnp.zeros((4,), bool))
  np.testing.assert_allclose(default, out[1:2].repeat(4, 0), rtol=1e-6)  # no Δt means Δt = 1


def test_cfc_rejects_unknown_mode():
  with pytest.raises(ValueError, match="CfC mode"):
    CfCCell(3, mode="liquid").init(jax.random.PRNGKey(0), jnp.zeros((1, 3)),
                                   jnp.zeros((1, 2)), jnp.zeros((1,), bool))


def test_cfc_carries_state_and_resets_exactly():
  cell = CfCCell(6)
  k = jax.random.split(jax.random.PRNGKey(1), 3)
  x = jax.random.normal(k[0], (2, 4))
  params = cell.init(k[1], jnp.zeros((2, 6)), x, jnp.zeros((2,), bool))
  carry = jax.random.normal(k[2], (2, 6))
  kept, _ = cell.apply(params, carry, x, jnp.zeros((2,), bool))
  reset, _ = cell.apply(params, carry, x, jnp.ones((2,), bool))
  fresh, _ = cell.apply(params, jnp.zeros((2, 6)), x, jnp.zeros((2,), bool))
  np.testing.assert_array_equal(reset, fresh)
  assert np.abs(kept - fresh).max() > 1e-3  # the carry reaches the output
  with jax.disable_jit():
    eager, _ = cell.apply(params, carry, x, jnp.zeros((2,), bool))
  np.testing.assert_allclose(jax.jit(cell.apply)(params, carry, x, jnp.zeros((2,), bool))[0],
                             eager, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("core", ["mamba", "cfc"])
def test_ppo_unroll_equals_stepping_in_values_and_gradients(core):
  """`ppo.unroll` (Mamba: the parallel sequence path) == the network stepped token by token,
  for the outputs and for the gradient of a PPO-like objective; CfC with irregular Δt."""
  cfg = memory_ppo.get_config(f"{core},debug")
  cfg.network.scan_path = "associative"
  env, env_params = registry.make(cfg.env.name)
  network = ppo.make_network(cfg.network, env.action_spec(env_params))
  k = jax.random.split(jax.random.PRNGKey(2), 4)
  length, batch = 12, 4
  obs = jax.random.normal(k[0], (length, batch) + env.observation_shape(env_params))
  is_first = jax.random.bernoulli(k[1], 0.2, (length, batch)).at[0].set(True)
  mask = jnp.ones((length, batch, 2), bool)
  action = HybridAction(jnp.zeros((length, batch, 0)),
                        jax.random.randint(k[2], (length, batch, 1), 0, 2))
  params = network.init(k[3], network.initial_carry(batch), obs[0], is_first[0], mask[0])
  carry = network.initial_carry(batch)
  dt = jax.random.uniform(jax.random.PRNGKey(3), (length, batch), minval=0.1, maxval=4.0)

  def objective(params, by_steps, dt):
    if by_steps:
      def step(c, inputs):
        c, dist, value = network.apply(params, c, *inputs)
        return c, (dist, value)
      _, (dist, value) = jax.lax.scan(step, carry, (obs, is_first, mask, dt))
    else:
      dist, value = ppo.unroll(network, params, carry, obs, is_first, mask, dt)
    return jnp.sum(dist.log_prob(action)) + jnp.sum(value ** 2), value

  @jax.jit
  def both(params):
    grad = jax.grad(objective, has_aux=True)
    return grad(params, False, dt), grad(params, True, dt), objective(params, False, None)[1]

  (g_seq, v_seq), (g_step, v_step), v_unit_steps = both(params)
  np.testing.assert_allclose(v_seq, v_step, rtol=1e-5, atol=1e-5)
  if core == "cfc":  # Δt reaches the CfC core; Mamba has a fixed step and ignores it
    assert np.abs(v_seq - v_unit_steps).max() > 1e-4
  else:
    np.testing.assert_allclose(v_seq, v_unit_steps, rtol=1e-6, atol=1e-6)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-5), g_seq,
               g_step)


def test_remember_cue_rewards_only_the_cued_answer():
  env, params = registry.make("remember_cue", delay=2, num_cues=3)
  obs, state = env.reset(jax.random.PRNGKey(0), params)
  cue = int(state.cue)
  np.testing.assert_array_equal(obs, np.eye(3)[cue].tolist() + [0.0])
  act = lambda a: HybridAction(jnp.zeros((0,)), jnp.array([a], jnp.int32))
  for _ in range(3):  # the cue step and two blank steps: no reward, no end
    obs, state, reward, terminated, truncated, _ = env.step(None, state, act(cue), params)
    assert float(reward) == 0.0 and not terminated and not truncated
  np.testing.assert_array_equal(obs, [0.0, 0.0, 0.0, 1.0])  # blank cue, query raised
  _, _, right, terminated, _, _ = env.step(None, state, act(cue), params)
  _, _, wrong, _, _, _ = env.step(None, state, act((cue + 1) % 3), params)
  assert float(right) == 1.0 and float(wrong) == -1.0 and terminated


def _final_return(core: str) -> float:
  cfg = memory_ppo.get_config(f"{core},debug")
  env, env_params = registry.make(cfg.env.name, **cfg.env.kwargs.to_dict())
  trainer = anakin.make_train(cfg, env, env_params)
  _, metrics = jax.jit(trainer.train)(jax.random.PRNGKey(cfg.seed))
  returns, counts = (np.asarray(metrics[k][-10:]) for k in ("episode/return", "episode/count"))
  return float((returns * counts).sum() / counts.sum())


@pytest.mark.slow
def test_mamba_and_cfc_ppo_solve_the_memory_task_feed_forward_cannot():
  """Debug config (16 envs × 24 steps, 150 updates, 1 seed). Measured 2026-11-26 on the 2-core
  CPU: mamba and cfc ≥ 0.99, feed-forward ≈ 0 (its optimum without memory is 0)."""
  finals = {core: _final_return(core) for core in ("none", "mamba", "cfc")}
  print(f"\nRememberCue final return (last 10 updates): feed-forward {finals['none']:.2f} | "
        f"mamba {finals['mamba']:.2f} | cfc {finals['cfc']:.2f}")
  assert finals["mamba"] >= 0.9 and finals["cfc"] >= 0.9, finals
  assert finals["none"] <= 0.5, finals
