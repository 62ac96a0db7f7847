"""mbjax against other people's reference implementations, on fixed inputs.

The references that need torch (ncps's CfC, state-spaces/mamba's `selective_scan_ref` and
`Mamba` mixer, the TIES authors' merge, mergekit's) were run once by
`tools/parity/make_parity_data.py`, whose inputs, weights and outputs are the small files in
`tests/parity_data/` (each names its repository and commit in `source`), so CI needs no torch.
distrax, a dependency already, is called directly. Every comparison is to float32 rounding;
where mbjax's default deliberately differs (the TIES tie rules) the test pins that too.
"""
import functools
import os

import distrax
import jax
import jax.numpy as jnp
import numpy as np

from mbjax.envs.spaces import HybridAction, HybridActionSpec
from mbjax.nets import mamba, ssm
from mbjax.nets.cfc import CfCCell
from mbjax.nets.hybrid import HybridDistribution
from mbjax.population import merge

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "parity_data")
CFC_MODES = ("default", "no_gate", "pure")


def _load(name: str) -> dict[str, np.ndarray]:
  with np.load(os.path.join(DATA, name + ".npz"), allow_pickle=False) as data:
    return {key: data[key] for key in data.files}


def _dense(weight, bias=None):
  """A torch Linear's weight [out, in] (and bias) as flax Dense parameters."""
  params = {"kernel": jnp.asarray(weight.T)}
  if bias is not None:
    params["bias"] = jnp.asarray(bias)
  return params


# --- CfC against ncps ----------------------------------------------------------------------


def _cfc_params(ref, mode):
  layer = lambda name: _dense(ref[f"{mode}.{name}.weight"], ref[f"{mode}.{name}.bias"])  # noqa
  params = {"backbone": layer("backbone.0"), "ff1": layer("ff1")}
  if mode == "pure":
    params.update(w_tau=jnp.asarray(ref["pure.w_tau"][0]), A=jnp.asarray(ref["pure.A"][0]))
  else:
    params.update(ff2=layer("ff2"), time_a=layer("time_a"), time_b=layer("time_b"))
  return {"params": params}


def test_cfc_matches_ncps_in_every_mode_with_irregular_dt():
  ref = _load("cfc")
  hidden, units = ref["h0"].shape[1], ref["default.backbone.0.weight"].shape[0]

  @jax.jit
  def run(params_by_mode, x, dt, h0):
    outputs = {}
    for mode, params in params_by_mode.items():
      cell = CfCCell(hidden, backbone_size=units, mode=mode)
      step = lambda h, xs, cell=cell, params=params: cell.apply(  # noqa: E731
          params, h, xs[0], jnp.zeros(xs[0].shape[:1], bool), xs[1])
      outputs[mode] = jax.lax.scan(step, h0, (x, dt))[1]
    return outputs

  outputs = run({mode: _cfc_params(ref, mode) for mode in CFC_MODES}, ref["x"], ref["dt"],
                ref["h0"])
  for mode in CFC_MODES:
    np.testing.assert_allclose(outputs[mode], ref[f"{mode}.out"], rtol=1e-5, atol=2e-6,
                               err_msg=mode)
  # Δt is irregular (0.05–3.05) and changes the answer: the reference is not Δt = 1 alone.
  assert ref["dt"].min() < 0.5 and ref["dt"].max() > 2.0


# --- selective scan and Mamba stack against state-spaces/mamba -----------------------------


def test_selective_scan_matches_selective_scan_ref_in_values_and_gradients():
  ref = _load("mamba")
  time_major = lambda x: jnp.asarray(np.moveaxis(x, -1, 0))  # [b, ·, L] → [L, b, ·]  # noqa
  u, delta, B, C = (time_major(ref[f"scan.{k}"]) for k in ("u", "delta", "B", "C"))
  A = jnp.asarray(ref["scan.A"])
  length, batch, dim = u.shape
  h0 = jnp.zeros((batch, dim, A.shape[1]))
  reset = jnp.zeros((length, batch), bool)

  @jax.jit
  def values_and_gradients(u, delta, A, B, C):
    scan = lambda *args: ssm.selective_scan(*args[:3], *args[3:], h0, reset)  # noqa: E731
    (y, last), vjp = jax.vjp(scan, u, delta, A, B, C)
    return y, last, vjp((time_major(ref["scan.out_cotangent"]), ref["scan.last_cotangent"]))

  y, last, grads = values_and_gradients(u, delta, A, B, C)
  np.testing.assert_allclose(y, time_major(ref["scan.out"]), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(last, ref["scan.last_state"], rtol=1e-5, atol=1e-6)
  for name, grad in zip(("u", "delta", "A", "B", "C"), grads):
    expected = ref[f"scan.grad_{name}"]
    np.testing.assert_allclose(grad, expected if name == "A" else time_major(expected),
                               rtol=1e-5, atol=2e-5, err_msg=name)


def _mamba_stack_params(ref, layers):
  params = {}
  for i in range(layers):
    mixer = lambda name: ref[f"stack.mixer{i}.{name}"]  # noqa: E731
    params[f"blocks_{i}"] = {
        "norm": {"scale": ref[f"stack.norm{i}.weight"], "bias": ref[f"stack.norm{i}.bias"]},
        "in_proj": _dense(mixer("in_proj.weight")),
        "conv_kernel": mixer("conv1d.weight")[:, 0, :].T,  # [d_inner, 1, K] → [K, d_inner]
        "conv_bias": mixer("conv1d.bias"),
        "x_proj": _dense(mixer("x_proj.weight")),
        "dt_proj": _dense(mixer("dt_proj.weight"), mixer("dt_proj.bias")),
        "A_log": mixer("A_log"), "D": mixer("D"),
        "out_proj": _dense(mixer("out_proj.weight")),
    }
  params["norm"] = {"scale": ref["stack.norm_f.weight"], "bias": ref["stack.norm_f.bias"]}
  return jax.tree.map(jnp.asarray, {"params": params})


def test_mamba_stack_matches_upstream_mixers_and_layer_norms():
  """Sequence path and token-by-token steps, against upstream's blocks with ε = 1e-5 on an
  input whose small spread makes the LayerNorm ε visible (ε = 1e-6 misses by 7e-3 here)."""
  ref = _load("mamba")
  layers = sum(key.endswith(".A_log") for key in ref)
  d_model = ref["stack.u"].shape[-1]
  d_state = ref["stack.mixer0.A_log"].shape[1]
  stack = mamba.MambaStack(d_model, layers, d_state, conv_size=4, expand=2)
  u = jnp.asarray(np.swapaxes(ref["stack.u"], 0, 1))  # [b, L, d] → [L, b, d]
  is_first = jnp.zeros(u.shape[:2], bool)

  @jax.jit
  def sequence_and_steps(params, u):
    carry = stack.initial_carry(u.shape[1])
    _, sequence = stack.apply(params, carry, u, is_first, method=stack.sequence)
    step = lambda c, x: stack.apply(params, c, x, is_first[0])  # noqa: E731
    return sequence, jax.lax.scan(step, carry, u)[1]

  sequence, steps = sequence_and_steps(_mamba_stack_params(ref, layers), u)
  expected = np.swapaxes(ref["stack.out"], 0, 1)
  np.testing.assert_allclose(sequence, expected, rtol=1e-5, atol=5e-6)
  np.testing.assert_allclose(steps, expected, rtol=1e-5, atol=5e-6)


# --- TIES against the authors' code and mergekit --------------------------------------------


def _vectors(ref):
  return [{"a": jnp.asarray(ref[f"vector{i}.a"]), "b": jnp.asarray(ref[f"vector{i}.b"])}
          for i in range(3)]


def _flat(tree):
  return np.concatenate([np.ravel(tree["a"]), np.ravel(tree["b"])])


def _ties(vectors, k, **rules):
  return jax.jit(functools.partial(merge.ties_merge, k=k, **rules))(vectors)


def test_ties_matches_the_authors_code_with_their_rules():
  ref = _load("ties")
  vectors, k = _vectors(ref), float(ref["k"])
  theirs = _ties(vectors, k, vote="mass", scope="global", trim_rule="floor_plus_one",
                 sign_tie="majority")
  np.testing.assert_allclose(_flat(theirs), ref["merged_flat"], rtol=1e-6, atol=1e-7)
  # The defaults differ on purpose: the zero-sum coordinates (a[0, 1], a[2, 3]) merge to 0
  # instead of to the majority sign's −2, and ⌈k·n⌉ keeps one entry fewer per vector.
  ours = _flat(_ties(vectors, k, vote="mass", scope="global"))
  zero_sum = [1, 13]
  np.testing.assert_array_equal(ours[zero_sum], 0.0)
  np.testing.assert_allclose(ref["merged_flat"][zero_sum], -2.0)
  assert not np.allclose(np.delete(ours, zero_sum), np.delete(ref["merged_flat"], zero_sum))


def test_ties_matches_mergekit_with_its_rules():
  ref = _load("mergekit")
  vectors, k = _vectors(ref), float(ref["k"])
  for consensus, vote in (("sum", "mass"), ("count", "count")):
    expected = {"a": ref[f"merged_{consensus}.a"], "b": ref[f"merged_{consensus}.b"]}
    theirs = _ties(vectors, k, vote=vote, scope="tensor", trim_rule="floor_first",
                   sign_tie="positive")
    np.testing.assert_allclose(_flat(theirs), _flat(expected), rtol=1e-6, atol=1e-7,
                               err_msg=consensus)
    ours = _ties(vectors, k, vote=vote, scope="tensor")
    assert not np.allclose(_flat(ours), _flat(expected)), consensus


# --- the squashed log-prob against distrax ---------------------------------------------------


def test_tanh_log_prob_matches_a_distrax_transformed_normal():
  spec = HybridActionSpec(continuous_dim=3, branches=(4,))
  rng = np.random.default_rng(0)
  mean, log_std = rng.normal(size=(5, 3)), rng.normal(0.0, 0.5, size=(5, 3))
  raw = rng.normal(size=(5, 3))  # |u| < 3: tanh(u) invertible in float32
  logits = rng.normal(size=(5, 4))
  choice = rng.integers(0, 4, size=(5, 1))

  @jax.jit
  def both(mean, log_std, raw, logits, choice):
    dist = HybridDistribution.create(spec, mean, log_std, (logits,), jnp.ones((5, 4), bool),
                                     squash="tanh")
    ours = dist.log_prob(HybridAction(raw, choice))
    squashed = distrax.Transformed(distrax.MultivariateNormalDiag(mean, jnp.exp(log_std)),
                                   distrax.Block(distrax.Tanh(), 1))
    theirs = squashed.log_prob(jnp.tanh(raw)) + distrax.Categorical(logits).log_prob(
        choice[:, 0])
    return ours, theirs

  ours, theirs = both(*(jnp.asarray(x, jnp.float32) for x in (mean, log_std, raw, logits)),
                      jnp.asarray(choice, jnp.int32))
  np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=2e-5)
