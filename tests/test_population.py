"""Task vectors, merges, gating and PBT against hand-computed values; the merge binary end to
end on tiny CartPole checkpoints."""
import functools
import json
import os
import shutil
import subprocess
import sys

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from mbjax.population import merge, pbt

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tree(**leaves):
  return {name: jnp.asarray(value, jnp.float32) for name, value in leaves.items()}


def _close(actual, expected):
  chex.assert_trees_all_close(actual, _tree(**expected), atol=1e-6)


# ---------------------------------------------------------------------------------------
# Task vectors and linear merges


def test_task_vector_round_trip():
  base = _tree(w=[1.0, 2.0], b=[[0.5]])
  tuned = _tree(w=[1.5, 1.0], b=[[0.0]])
  tau = merge.task_vector(tuned, base)
  _close(tau, dict(w=[0.5, -1.0], b=[[-0.5]]))
  chex.assert_trees_all_close(merge.apply_task_vector(base, tau), tuned)
  _close(merge.apply_task_vector(base, tau, scale=2.0), dict(w=[2.0, 0.0], b=[[-0.5]]))


def test_mean_and_task_arithmetic():
  a = _tree(w=[1.0, 2.0], b=[[3.0]])
  b = _tree(w=[3.0, -2.0], b=[[1.0]])
  _close(merge.mean_merge([a, b]), dict(w=[2.0, 0.0], b=[[2.0]]))
  # (1·a + 3·b) / 4
  _close(merge.mean_merge([a, b], weights=[1.0, 3.0]), dict(w=[2.5, -1.0], b=[[1.5]]))
  # λ (a + b), the sum
  _close(merge.task_arithmetic([a, b], lam=0.5), dict(w=[2.0, 0.0], b=[[2.0]]))
  _close(merge.task_arithmetic([a, b], lam=1.0, weights=[2.0, 0.0]),
         dict(w=[2.0, 4.0], b=[[6.0]]))


# ---------------------------------------------------------------------------------------
# Trim


def test_trim_keeps_top_fraction_and_ties_at_threshold():
  # m = ⌈0.4·5⌉ = 2; the 2nd largest magnitude is 3 (twice).
  _close(merge.trim(_tree(x=[3.0, -3.0, 1.0, 2.0, 0.5]), 0.4), dict(x=[3, -3, 0, 0, 0]))
  # m = 1 but three entries tie at the threshold 2: all three are kept.
  _close(merge.trim(_tree(x=[2.0, -2.0, 2.0, 1.0]), 0.25), dict(x=[2, -2, 2, 0]))
  # At least one entry survives however small k is.
  _close(merge.trim(_tree(x=[1.0, 5.0, -2.0]), 0.01), dict(x=[0, 5, 0]))
  _close(merge.trim(_tree(x=[1.0, 5.0, -2.0]), 1.0), dict(x=[1, 5, -2]))


@pytest.mark.parametrize("rule,whole,whole_float,non_whole,tied,tiny", [
    # k·n = 2 (whole), 0.3·10 = 3 (whole, 3.0000000000000004 in float), 0.5·5 = 2.5, a
    # threshold shared by three entries, k·n = 0.03.
    ("ceil", [3, -3, 0, 0, 0], 3, [5, -4, 3, 0, 0], [0, 2, -2, 2, 0], [0, 5, 0]),
    ("floor_plus_one", [3, -3, 0, 2, 0], 4, [5, -4, 3, 0, 0], [0, 2, -2, 2, 0], [0, 5, 0]),
    ("floor_first", [3, -3, 0, 0, 0], 3, [5, -4, 0, 0, 0], [0, 2, -2, 0, 0], [0, 5, 0]),
])
def test_trim_rules(rule, whole, whole_float, non_whole, tied, tiny):
  _close(merge.trim(_tree(x=[3.0, -3.0, 1.0, 2.0, 0.5]), 0.4, trim_rule=rule), dict(x=whole))
  ten = merge.trim(_tree(x=np.arange(1.0, 11.0)), 0.3, trim_rule=rule)
  _close(ten, dict(x=[0.0] * (10 - whole_float) + list(range(11 - whole_float, 11))))
  _close(merge.trim(_tree(x=[5.0, -4.0, 3.0, 2.0, 1.0]), 0.5, trim_rule=rule),
         dict(x=non_whole))
  # ⌈0.4·5⌉ = 2 and ⌊0.4·5⌋ + 1 = 3 both reach the tied 2s and keep all of them;
  # floor_first keeps exactly 2, the first two in index order.
  _close(merge.trim(_tree(x=[1.0, 2.0, -2.0, 2.0, 0.5]), 0.4, trim_rule=rule), dict(x=tied))
  _close(merge.trim(_tree(x=[1.0, 5.0, -2.0]), 0.01, trim_rule=rule), dict(x=tiny))


def test_trim_per_tensor_versus_global():
  tau = _tree(a=[10.0, 9.0, 8.0], b=[1.0, 0.5])
  # Per tensor: a keeps ⌈1.2⌉ = 2, b keeps ⌈0.8⌉ = 1.
  _close(merge.trim(tau, 0.4, "tensor"), dict(a=[10, 9, 0], b=[1, 0]))
  # Globally: ⌈0.4·5⌉ = 2 entries of the whole vector, both in a.
  _close(merge.trim(tau, 0.4, "global"), dict(a=[10, 9, 0], b=[0, 0]))
  # A threshold tie across tensors: ceil keeps both 2s, floor_first the first in tree
  # order (a before b).
  tied = _tree(a=[1.0, 2.0], b=[-2.0, 0.5])
  _close(merge.trim(tied, 0.25, "global"), dict(a=[0, 2], b=[-2, 0]))
  _close(merge.trim(tied, 0.25, "global", "floor_first"), dict(a=[0, 2], b=[0, 0]))


def test_trim_rejects_bad_arguments():
  with pytest.raises(ValueError, match="trim fraction k"):
    merge.trim(_tree(x=[1.0]), 0.0)
  with pytest.raises(ValueError, match="trim_rule"):
    merge.trim(_tree(x=[1.0]), 0.5, trim_rule="round")
  with pytest.raises(ValueError, match="sign_tie"):
    merge.ties_merge([_tree(x=[1.0]), _tree(x=[2.0])], k=1.0, sign_tie="negative")


# ---------------------------------------------------------------------------------------
# TIES


def test_ties_sign_election_mass_versus_count_without_trim():
  t1 = _tree(w=[0.1, 1.0, 0.5, -0.3])
  t2 = _tree(w=[0.1, -1.0, 0.0, 0.3])
  t3 = _tree(w=[-1.0, 0.0, 0.2, 0.0])
  # coord 0: mass 0.1+0.1−1.0 < 0 → −, only t3 agrees → −1.0; count 2 vs 1 → +, mean 0.1.
  # coord 1: mass 0 and count 0 → no sign → 0.
  # coord 2: + either way; t2's zero does not vote in the mean: (0.5+0.2)/2.
  # coord 3: −0.3+0.3 = 0 (a tie in magnitude) → 0; count 1 vs 1 → 0.
  _close(merge.ties_merge([t1, t2, t3], k=1.0, vote="mass"), dict(w=[-1.0, 0, 0.35, 0]))
  _close(merge.ties_merge([t1, t2, t3], k=1.0, vote="count"), dict(w=[0.1, 0, 0.35, 0]))
  _close(merge.ties_merge([t1, t2, t3], k=1.0, lam=2.0), dict(w=[-2.0, 0, 0.7, 0]))


# Leaf a holds the zero-sum coordinates; leaf b decides the whole vector's majority (−).
_TIE_VECTORS = (_tree(a=[1.0, -0.5, 0.0], b=[-2.0, -1.0]),
                _tree(a=[-1.0, 0.3, 0.0], b=[-1.0, -1.0]))


@pytest.mark.parametrize("vote,sign_tie,expected_a", [
    # mass: a₀ sums to 0, a₁ to −0.2 (−), a₂ is all zeros; elected b is (−, −).
    ("mass", "zero", [0.0, -0.5, 0.0]),
    ("mass", "positive", [1.0, -0.5, 0.0]),  # a₀ → +: mean of {1}; a₂: nothing agrees
    ("mass", "majority", [-1.0, -0.5, 0.0]),  # elected signs sum to −3 → a₀ → −
    # count: a₀ and a₁ are 1–1 ties, a₂ has no votes.
    ("count", "zero", [0.0, 0.0, 0.0]),
    ("count", "positive", [1.0, 0.3, 0.0]),
    ("count", "majority", [-1.0, -0.5, 0.0]),  # elected signs sum to −2
])
def test_ties_sign_tie_rules(vote, sign_tie, expected_a):
  merged = merge.ties_merge(list(_TIE_VECTORS), k=1.0, vote=vote, sign_tie=sign_tie)
  _close(merged, dict(a=expected_a, b=[-1.5, -1.0]))


def test_ties_majority_tie_with_no_majority_stays_zero():
  # Elected signs (0, +, −) sum to 0: the zero-sum coordinate keeps no sign.
  merged = merge.ties_merge([_tree(x=[1.0, 1.0, -1.0]), _tree(x=[-1.0, 1.0, -1.0])], k=1.0,
                            sign_tie="majority")
  _close(merged, dict(x=[0.0, 1.0, -1.0]))


def test_ties_with_trim():
  t1 = _tree(w=[4.0, 1.0, -1.0, 0.5])  # k=0.5: threshold 1, tied 1 and −1 both kept
  t2 = _tree(w=[-3.0, 2.0, 0.5, -0.2])  # k=0.5: threshold 2 → [−3, 2, 0, 0]
  # mass: coord 0: 4−3 > 0 → 4; coord 1: mean(1, 2); coord 2: −1 alone; coord 3: nothing.
  _close(merge.ties_merge([t1, t2], k=0.5), dict(w=[4.0, 1.5, -1.0, 0.0]))
  # count: coord 0 is a 1–1 tie → 0.
  _close(merge.ties_merge([t1, t2], k=0.5, vote="count"), dict(w=[0.0, 1.5, -1.0, 0.0]))


def test_ties_count_vote_matches_upstream_locked_example():
  # Upstream tests/test_testing_spec_hive_mind.py: [1,−1,0.5] ⊕ [2,−0.5,−0.2], topk 1.0.
  a, b = _tree(w=[1.0, -1.0, 0.5]), _tree(w=[2.0, -0.5, -0.2])
  _close(merge.merge([a, b], "ties_count", k=1.0), dict(w=[1.5, -0.75, 0.0]))
  # The paper's mass vote keeps the third coordinate: 0.5 − 0.2 > 0.
  _close(merge.merge([a, b], "ties", k=1.0), dict(w=[1.5, -0.75, 0.5]))


def test_merges_jitted_equal_unjitted():
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  vectors = [{"a": jax.random.normal(k, (4, 5)), "b": jax.random.normal(k, (7,)) * 0.1}
             for k in keys]
  # Trim and tie rules matter to the TIES methods only; one of each keeps the compile count
  # low.
  for method, scope, rule, tie in (("mean", "tensor", "ceil", "zero"),
                                   ("task_arithmetic", "tensor", "ceil", "zero"),
                                   ("ties", "global", "floor_plus_one", "majority"),
                                   ("ties_count", "tensor", "floor_first", "positive")):
    fn = lambda vs, m=method, s=scope, r=rule, t=tie: merge.merge(  # noqa
        vs, m, lam=0.7, k=0.3, scope=s, trim_rule=r, sign_tie=t)
    chex.assert_trees_all_close(jax.jit(fn)(vectors), fn(vectors), atol=1e-6)
  chex.assert_trees_all_close(jax.jit(merge.pair_statistics)(vectors),
                              merge.pair_statistics(vectors), atol=1e-6)


# ---------------------------------------------------------------------------------------
# Gating


def test_pair_statistics_by_hand():
  a = _tree(w=[1.0, 0.0], b=[2.0, -1.0])
  b = _tree(w=[2.0, 1.0], b=[-1.0, -1.0])
  zero = _tree(w=[0.0, 0.0], b=[0.0, 0.0])
  stats = merge.pair_statistics([a, b, zero])
  # ⟨a,b⟩ = 2+0−2+1 = 1, ‖a‖² = 6, ‖b‖² = 7.
  np.testing.assert_allclose(stats.cosine[0, 1], 1 / np.sqrt(42), rtol=1e-6)
  np.testing.assert_allclose(stats.cosine[1, 0], 1 / np.sqrt(42), rtol=1e-6)
  # Both non-zero at w[0], b[0], b[1]; only b[0] (2 vs −1) conflicts.
  assert int(stats.co_nonzero[0, 1]) == 3
  np.testing.assert_allclose(stats.sign_conflict[0, 1], 1 / 3, rtol=1e-6)
  np.testing.assert_allclose(stats.cosine[0, 0], 1.0, rtol=1e-6)
  assert float(stats.sign_conflict[0, 0]) == 0.0
  # An all-zero vector: cosine 0, no co-non-zero entries, conflict 0.
  assert float(stats.cosine[0, 2]) == 0.0 and int(stats.co_nonzero[0, 2]) == 0
  assert float(stats.sign_conflict[1, 2]) == 0.0


def test_gating_rule():
  cosine = jnp.asarray([[1.0, 0.9, -0.5], [0.9, 1.0, 0.8], [-0.5, 0.8, 1.0]])
  stats = merge.PairStatistics(cosine=cosine, sign_conflict=jnp.full((3, 3), 0.1),
                               co_nonzero=jnp.full((3, 3), 10))
  # Compatible pairs (0,1) and (1,2): 1 has most partners, then 0; 2 clashes with 0.
  greedy = merge.GatingRule(min_cosine=0.5, max_sign_conflict=0.3)
  np.testing.assert_array_equal(merge.gate(stats, greedy), [True, True, False])
  everyone = merge.GatingRule(min_cosine=0.5, max_sign_conflict=0.3, mode="all")
  np.testing.assert_array_equal(merge.gate(stats, everyone), [False, False, False])
  np.testing.assert_array_equal(merge.gate(stats, merge.GatingRule(-1.0, 1.0, "all")),
                                [True, True, True])
  # Conflict above the threshold everywhere: no group of two → nothing merges.
  np.testing.assert_array_equal(merge.gate(stats, merge.GatingRule(-1.0, 0.05)),
                                [False, False, False])


# ---------------------------------------------------------------------------------------
# PBT


@functools.cache
def _population(size: int):
  """A stacked population: MLP-shaped params and Adam state after one distinct step each."""
  optimizer = optax.adam(1e-2)

  def member(key):
    k1, k2 = jax.random.split(key)
    params = {"w": jax.random.normal(k1, (3, 2)), "b": jnp.zeros((2,))}
    opt_state = optimizer.init(params)
    grads = jax.tree.map(lambda p: jax.random.normal(k2, p.shape), params)
    _, opt_state = optimizer.update(grads, opt_state, params)
    return {"params": params, "opt_state": opt_state}

  # On the host: the per-member comparisons below are then numpy, not eager jax, slices.
  return jax.device_get(
      jax.jit(jax.vmap(member))(jax.random.split(jax.random.PRNGKey(1), size)))


def _member(tree, i):
  return jax.tree.map(lambda x: x[i], tree)


def test_exploit_copies_params_and_optimizer_state_exactly():
  population = _population(5)
  # Means over 3 episodes: [−33.3, 1, 0, 2, 3]. Member 0 has the single best episode but
  # the worst mean, so it is the one replaced; member 4 (best mean) is the only donor.
  returns = jnp.asarray([[100.0, -100.0, -100.0], [1, 1, 1], [0, 0, 0], [2, 2, 2],
                         [0, 0, 9]])
  new, source, replaced = jax.device_get(
      pbt.exploit(jax.random.PRNGKey(0), population, returns, 0.2))
  np.testing.assert_array_equal(source, [4, 1, 2, 3, 4])
  np.testing.assert_array_equal(replaced, [True, False, False, False, False])
  chex.assert_trees_all_equal(_member(new, 0), _member(population, 4))
  assert int(_member(new, 0)["opt_state"][0].count) == 1
  for i in range(1, 5):
    chex.assert_trees_all_equal(_member(new, i), _member(population, i))
  jitted = jax.jit(pbt.exploit, static_argnums=3)(jax.random.PRNGKey(0), population,
                                                   returns, 0.2)
  chex.assert_trees_all_equal(jax.device_get(jitted), (new, source, replaced))


def test_exploit_donors_from_top_fraction_and_episode_mask():
  population = _population(6)
  returns = jnp.arange(6, dtype=jnp.float32)[:, None] * jnp.ones((1, 4))
  exploit = jax.jit(pbt.exploit, static_argnums=3)
  for seed in range(5):
    new, source, replaced = jax.device_get(
        exploit(jax.random.PRNGKey(seed), population, returns, 0.3))
    np.testing.assert_array_equal(replaced, [True, True, False, False, False, False])
    assert set(np.asarray(source[:2]).tolist()) <= {4, 5}
    for i in range(6):
      chex.assert_trees_all_equal(_member(new, i), _member(population, int(source[i])))
  # The mask drops member 5's bad episodes, lifting it to the top; member 0 stays bottom.
  returns = jnp.asarray([[0.0, 0.0], [1, 1], [2, 2], [3, 3], [-50, 10]])
  mask = jnp.asarray([[True, True]] * 4 + [[False, True]])
  np.testing.assert_allclose(pbt.member_scores(returns, mask), [0, 1, 2, 3, 10])
  _, source, _ = pbt.exploit(jax.random.PRNGKey(0), _population(5), returns, 0.2, mask)
  np.testing.assert_array_equal(source, [4, 1, 2, 3, 4])


def test_exploit_ranking_ties_replace_the_lower_index():
  returns = jnp.ones((5, 2))
  _, source, replaced = pbt.exploit(jax.random.PRNGKey(0), _population(5), returns, 0.2)
  np.testing.assert_array_equal(replaced, [True, False, False, False, False])
  assert int(source[0]) == 4


SPECS = {
    "lr": pbt.HParam("float", 1e-5, 1e-2),
    "epochs": pbt.HParam("int", 1, 10),
    "core": pbt.HParam("categorical", choices=("none", "gru", "mamba")),
}


@hypothesis.settings(max_examples=8, deadline=None, derandomize=True)
@hypothesis.given(
    size=st.integers(2, 5), seed=st.integers(0, 2**31 - 1),
    lr=st.floats(1e-5, 1e-2), epochs=st.integers(1, 10),
    core=st.sampled_from(SPECS["core"].choices),
    factors=st.lists(st.floats(0.1, 5.0), min_size=1, max_size=3))
def test_explore_keeps_types_and_ranges(size, seed, lr, epochs, core, factors):
  members = [{"lr": lr, "epochs": epochs, "core": core}] * size
  hparams = pbt.stack_hparams(members, SPECS)
  mask = jnp.arange(size) % 2 == 0
  new = pbt.explore(jax.random.PRNGKey(seed), hparams, SPECS, mask, factors, 0.5)
  for name in SPECS:
    assert new[name].dtype == hparams[name].dtype and new[name].shape == (size,)
    # Members outside the mask are untouched.
    np.testing.assert_array_equal(new[name][~mask], hparams[name][~mask])
  lr_new = np.asarray(new["lr"], np.float64)
  assert np.all(lr_new >= np.float32(1e-5)) and np.all(lr_new <= np.float32(1e-2))
  assert np.all((new["epochs"] >= 1) & (new["epochs"] <= 10))
  assert np.all((new["core"] >= 0) & (new["core"] < 3))
  # Each explored float is the old one times a factor, or clamped to a bound.
  allowed = [np.clip(np.float32(lr) * np.float32(f), np.float32(1e-5), np.float32(1e-2))
             for f in factors]
  for value in lr_new[np.asarray(mask)]:
    assert min(abs(value - a) for a in allowed) <= 1e-6 * max(1.0, value)
  for i in range(size):
    values = pbt.member_hparams(new, SPECS, i)
    assert type(values["epochs"]) is int and type(values["lr"]) is float
    assert values["core"] in SPECS["core"].choices


def test_explore_int_rounding_and_jit():
  hparams = pbt.stack_hparams([{"lr": 1e-3, "epochs": e, "core": "gru"} for e in (3, 5, 10)],
                              SPECS)
  up = pbt.explore(jax.random.PRNGKey(0), hparams, SPECS, factors=(1.2,), resample_prob=0.0)
  np.testing.assert_array_equal(up["epochs"], [4, 6, 10])  # 3.6→4, 6.0→6, 12→10 (clamped)
  np.testing.assert_array_equal(up["core"], hparams["core"])
  down = pbt.explore(jax.random.PRNGKey(0), hparams, SPECS, factors=(0.8,))
  np.testing.assert_array_equal(down["epochs"], [2, 4, 8])  # 2.4→2, 4.0→4, 8.0→8
  fn = lambda k, h: pbt.explore(k, h, SPECS, factors=(0.8, 1.2))  # noqa: E731
  chex.assert_trees_all_equal(jax.jit(fn)(jax.random.PRNGKey(3), hparams),
                              fn(jax.random.PRNGKey(3), hparams))
  with pytest.raises(TypeError):
    pbt.stack_hparams([{"lr": 1e-3, "epochs": 2.5, "core": "gru"}], SPECS)


def test_step_copies_donor_hyperparameters_then_explores_them():
  population = _population(5)
  hparams = pbt.stack_hparams(
      [{"lr": 1e-3 * (i + 1), "epochs": i + 1, "core": "none"} for i in range(5)], SPECS)
  returns = jnp.asarray([[0.0], [1.0], [2.0], [3.0], [4.0]])
  new, new_h, source, replaced = jax.device_get(pbt.step(
      jax.random.PRNGKey(0), population, hparams, returns, SPECS, 0.2, factors=(1.2,),
      resample_prob=0.0))
  np.testing.assert_array_equal(source, [4, 1, 2, 3, 4])
  chex.assert_trees_all_equal(_member(new, 0), _member(population, 4))
  # Member 0 took member 4's hyperparameters (5e-3, 5 epochs) and perturbed them by 1.2.
  np.testing.assert_allclose(new_h["lr"], [6e-3, 2e-3, 3e-3, 4e-3, 5e-3], rtol=1e-6)
  np.testing.assert_array_equal(new_h["epochs"], [6, 2, 3, 4, 5])


# ---------------------------------------------------------------------------------------
# experiments/merge.py end to end


def _env():
  # Optimisation level 0 for faster compiles, as in conftest.py.
  return {**os.environ, "XLA_FLAGS": "--xla_cpu_enable_concurrency_optimized_scheduler=false "
          "--xla_backend_optimization_level=0", "JAX_PLATFORMS": "cpu"}


@pytest.mark.slow
def test_merge_binary_on_trained_checkpoints(tmp_path):
  from mbjax.train import checkpoint as checkpoint_lib
  from mbjax.train.run import restore_trained

  base = tmp_path / "base"
  subprocess.run([sys.executable, "-m", "experiments.train",
                  "--config=configs/cartpole_ppo.py:debug", f"--workdir={base}",
                  "--config.run.video_max_frames=0"],
                 cwd=REPO, env=_env(), check=True, capture_output=True, timeout=300)
  _, runner = restore_trained(str(base))
  base_params = jax.device_get(runner.agent.params)
  # Two "specialists": the base plus known task vectors, written as training would.
  vectors = []
  for i, name in enumerate(("scout", "tank")):
    keys = jax.random.split(jax.random.PRNGKey(i), len(jax.tree.leaves(base_params)))
    leaves = [0.01 * jax.random.normal(k, x.shape)
              for k, x in zip(keys, jax.tree.leaves(base_params))]
    tau = jax.tree.unflatten(jax.tree.structure(base_params), leaves)
    vectors.append(tau)
    workdir = tmp_path / name
    workdir.mkdir()
    shutil.copy(base / "config.json", workdir / "config.json")
    cfg = ml_collections.ConfigDict(json.loads((base / "config.json").read_text()))
    specialist = runner.replace(agent=runner.agent.replace(
        params=merge.apply_task_vector(base_params, tau)))
    checkpointer = checkpoint_lib.Checkpointer(str(workdir), 1)
    checkpointer.save(int(runner.update_step), specialist, cfg)
    checkpointer.close()

  out = tmp_path / "merged"
  result = subprocess.run(
      [sys.executable, "-m", "experiments.merge", f"--base={base}",
       f"--specialists={tmp_path / 'scout'},{tmp_path / 'tank'}", "--method=ties_count",
       "--k=0.3", "--lam=0.8", "--min_cosine=-1", "--trim_rule=floor_first",
       "--sign_tie=positive", f"--out={out}"],
      cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "scout × tank: cosine" in result.stdout
  # The results come without orbax's INFO lines about reading and writing checkpoints.
  assert not [line for line in result.stderr.splitlines()
              if line.startswith("I") and ("orbax" in line or "CheckpointManager" in line)]

  summary = json.loads((out / "merge_summary.json").read_text())
  assert summary["method"] == "ties_count" and len(summary["merged"]) == 2
  assert (summary["trim_rule"], summary["sign_tie"]) == ("floor_first", "positive")
  expected_stats = merge.pair_statistics(vectors)
  np.testing.assert_allclose(summary["cosine"], expected_stats.cosine, atol=1e-5)
  _, merged_runner = restore_trained(str(out))
  expected = merge.apply_task_vector(base_params, merge.ties_merge(
      vectors, 0.3, 0.8, "count", trim_rule="floor_first", sign_tie="positive"))
  chex.assert_trees_all_close(jax.device_get(merged_runner.agent.params), expected, atol=1e-6)
  # Everything but the parameters is the base's.
  chex.assert_trees_all_equal(jax.device_get(merged_runner.agent.opt_state),
                              jax.device_get(runner.agent.opt_state))

  # An --out that holds a run is refused (nothing written), and so is a merged run itself;
  # --overwrite replaces the merge's outputs.
  merged_before = {n: (out / n).read_bytes() for n in ("config.json", "merge_summary.json")}
  for target, message in ((out, "already holds checkpoints, config.json, merge_summary.json"),
                          (base, "is one of the merged runs")):
    refused = subprocess.run(
        [sys.executable, "-m", "experiments.merge", f"--base={base}",
         f"--specialists={tmp_path / 'scout'},{tmp_path / 'tank'}", "--min_cosine=-1",
         "--lam=0.4", f"--out={target}"] + (["--overwrite"] if target == base else []),
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and message in refused.stderr, refused.stderr[-3000:]
  assert {n: (out / n).read_bytes() for n in merged_before} == merged_before
  assert sorted(os.listdir(out / "checkpoints")) == [str(int(runner.update_step))]
  from experiments import merge as merge_binary
  merge_binary.merge_workdirs(str(base), [str(tmp_path / "scout"), str(tmp_path / "tank")],
                              str(out), "ties", lam=0.4, k=0.5, scope="tensor", rule=None,
                              overwrite=True)
  assert json.loads((out / "merge_summary.json").read_text())["lam"] == 0.4
  _, merged_runner = restore_trained(str(out))
  expected = merge.apply_task_vector(base_params, merge.ties_merge(vectors, 0.5, 0.4))
  chex.assert_trees_all_close(jax.device_get(merged_runner.agent.params), expected, atol=1e-6)
  assert sorted(n for n in os.listdir(tmp_path) if n.startswith(".")) == []  # no staging left

  gated = subprocess.run(
      [sys.executable, "-m", "experiments.merge", f"--base={base}",
       f"--specialists={tmp_path / 'scout'},{tmp_path / 'tank'}", "--min_cosine=0.9",
       f"--out={tmp_path / 'gated'}"],
      cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
  assert gated.returncode == 3 and "merge gated" in gated.stdout
  assert not (tmp_path / "gated").exists()
