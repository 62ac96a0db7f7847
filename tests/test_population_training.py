"""Population training (mbjax/train/population.py) on the tiny `arena_population:debug`
config: per-member hyperparameters reach the vmapped update, PBT exploit copies agents
(parameters, optimiser state) within role groups and explore keeps types and ranges,
ranking uses the mean over several evaluation episodes, a split run resumes to the same
state as an uninterrupted one, and the exported specialists are run workdirs that
restore_trained (and so experiments/merge.py) reads.

One trainer (one compile of each jitted function) is shared by every test in the module; it
runs on all 4 simulated devices (conftest), each member's 8 envs split 2 per device. A
checkpoint it writes restores on 1 device and continues with the same parameters.
"""
import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import arena_population, arena_ppo
from mbjax.envs.bonk_arena import rewards
from mbjax.train import population, sharding
from mbjax.train import checkpoint as checkpoint_lib
from mbjax.train.metrics import read_jsonl
from mbjax.train.run import restore_trained


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """(cfg, trainer, base workdir, base agent). The base is an arena_ppo:debug run workdir
  whose runner is a fresh member's with random parameters (no training needed here)."""
  base_dir = str(tmp_path_factory.mktemp("base"))
  cfg = arena_population.get_config("debug")
  cfg.population.base_workdir = base_dir
  cfg.lock()
  trainer = population.PopulationTrainer(cfg)  # run.num_devices=0: all 4 devices
  assert trainer.mesh.size == 4
  shapes = jax.eval_shape(trainer.template.init, jax.random.PRNGKey(0)).agent
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  runner = population.member(trainer.init(zeros, jax.random.PRNGKey(7)).runners, 0)
  leaves, treedef = jax.tree.flatten(runner.agent.params)
  keys = jax.random.split(jax.random.PRNGKey(8), len(leaves))
  params = treedef.unflatten([0.3 * np.asarray(jax.random.normal(k, x.shape))
                              for k, x in zip(keys, leaves)])
  runner = runner.replace(agent=runner.agent.replace(params=params))
  base_cfg = arena_ppo.get_config("debug")
  checkpointer = checkpoint_lib.Checkpointer(base_dir, 1)
  checkpointer.save(0, runner, base_cfg)
  checkpointer.close()
  with open(os.path.join(base_dir, "config.json"), "w") as f:
    json.dump(base_cfg.to_dict(), f)
  return cfg, trainer, base_dir, runner.agent


def test_members_start_from_the_base_with_their_roles(setup):
  cfg, trainer, _, base = setup
  assert trainer.roles == ("scout", "scout", "tank", "tank")
  np.testing.assert_allclose(trainer.weights[0], np.multiply(rewards.UPSTREAM_WEIGHTS,
                                                             (1, 1.5, 1, 1, 20, 0.5, 2, 1)))
  state = jax.device_get(trainer.init(population.load_base(cfg), jax.random.PRNGKey(0)))
  for m in range(4):
    chex.assert_trees_all_equal(population.member(state.runners.agent.params, m), base.params)
  np.testing.assert_array_equal(state.hparams["lr"], np.full(4, cfg.ppo.lr, np.float32))
  assert state.hparams["lr"].dtype == np.float32
  # Own env streams: members' keys differ.
  assert len({tuple(k) for k in np.asarray(state.runners.key)}) == 4


def test_member_hyperparameters_reach_the_vmapped_update(setup):
  cfg, trainer, _, base = setup
  state = trainer.init(base, jax.random.PRNGKey(0))
  # Every member gets member 0's runner (same envs, keys); within a role, members with
  # equal hyperparameters then stay equal and a changed hyperparameter shows in the update.
  runners = jax.tree.map(lambda x: jnp.broadcast_to(x[0], x.shape), state.runners)
  state = state.replace(runners=runners)
  scaled = {"lr": 2.0, "ent_coef": 3.0, "clip_eps": 0.5}

  def params_after(changes):
    hparams = {n: v.at[m].multiply(scaled[n]) if (m := changes.get(n)) is not None else v
               for n, v in state.hparams.items()}
    new, _ = trainer.chunk(1)(state.replace(hparams=hparams))
    return [population.member(jax.device_get(new.runners.agent.params), m) for m in range(4)]

  def differ(a, b):
    return any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a),
                                                          jax.tree.leaves(b)))

  p = params_after({"lr": 1, "ent_coef": 3})
  assert differ(p[0], p[1]) and differ(p[2], p[3])
  p = params_after({"clip_eps": 1})
  assert differ(p[0], p[1])
  chex.assert_trees_all_equal(p[2], p[3])  # tank members: equal hyperparameters
  assert differ(p[0], p[2])  # the roles' rewards differ


def test_pbt_round_copies_agents_within_roles_and_keeps_hparam_ranges(setup):
  cfg, trainer, _, base = setup
  state, _ = trainer.chunk(1)(trainer.init(base, jax.random.PRNGKey(3)))
  before = jax.device_get(state)
  after, info = trainer.pbt_round(state)
  after, info = jax.device_get((after, info))

  returns = np.asarray(info["returns"])
  assert returns.shape == (4, cfg.population.eval_episodes)
  # One bottom member per role group of two, replaced by the group's better member.
  source, replaced = np.asarray(info["source"]), np.asarray(info["replaced"])
  assert replaced.sum() == 2
  for group in ((0, 1), (2, 3)):
    mean = returns[list(group)].mean(axis=1)
    # Ties rank the lower index lower (pbt.exploit).
    worse, better = group if mean[0] <= mean[1] else group[::-1]
    assert replaced[worse] and not replaced[better] and source[worse] == better
  for m in range(4):
    src = source[m]
    # Parameters, optimiser state (Adam moments after one update) and statistics: the
    # donor's, bit for bit; envs and RNG stream: the member's own.
    chex.assert_trees_all_equal(population.member(after.runners.agent, m),
                                population.member(before.runners.agent, src))
    chex.assert_trees_all_equal(population.member(after.runners.env_state, m),
                                population.member(before.runners.env_state, m))
    np.testing.assert_array_equal(after.runners.key[m], before.runners.key[m])
    np.testing.assert_allclose(after.scores[m], returns[src].mean(), rtol=1e-6)
    for name, (low, high) in cfg.population.hparams.items():
      value = after.hparams[name][m]
      assert after.hparams[name].dtype == np.float32 and low <= value <= high
      if replaced[m]:  # explored: the donor's value × 0.8 or × 1.2
        donor = before.hparams[name][src]
        assert np.isclose(value, donor * 0.8) or np.isclose(value, donor * 1.2)
      else:
        assert value == before.hparams[name][m]
  # The copied optimiser states are not the all-zero initial ones.
  assert all(any(np.any(x != 0) for x in jax.tree.leaves(population.member(
      before.runners.agent.opt_state, m))) for m in range(4))


def test_ranking_uses_the_mean_over_episodes_not_one_episode(setup):
  _, trainer, _, _ = setup
  agents = {"w": jnp.arange(4.0)}  # stands for the stacked agents: any [P, ...] pytree
  hparams = {n: jnp.full((4,), 0.01, jnp.float32) for n in trainer.specs}
  # Member 0 wins the first episode but has the lower mean (1.5 < 2.0); member 3 the same
  # against member 2. A single-episode ranking would replace members 1 and 2 instead.
  returns = jnp.asarray([[5.0, -2.0], [1.0, 3.0], [0.0, 4.0], [3.0, 0.0]])
  group_step = jax.jit(trainer.group_step)
  new, _, source, replaced = group_step(jax.random.PRNGKey(1), agents, hparams, returns)
  np.testing.assert_array_equal(replaced, [True, False, False, True])
  np.testing.assert_array_equal(source, [1, 1, 2, 2])
  np.testing.assert_array_equal(new["w"], [1.0, 1.0, 2.0, 2.0])
  _, _, source, replaced = group_step(jax.random.PRNGKey(1), agents, hparams,
                                      returns[:, :1])
  np.testing.assert_array_equal(replaced, [False, True, True, False])
  np.testing.assert_array_equal(source, [0, 0, 3, 3])


def test_run_resumes_to_the_uninterrupted_state_and_exports_specialists(setup, tmp_path):
  cfg, trainer, _, _ = setup
  whole = population.run(cfg, str(tmp_path / "whole"), trainer=trainer)
  first = population.run(cfg, str(tmp_path / "split"), max_updates=2, trainer=trainer)
  assert int(first["state"].update_step) == 2 and "specialists" not in first["outputs"]
  resumed = population.run(cfg, str(tmp_path / "split"), trainer=trainer)
  chex.assert_trees_all_equal(jax.device_get(resumed["state"]),
                              jax.device_get(whole["state"]))
  records = read_jsonl(str(tmp_path / "split" / "metrics.jsonl"))
  assert [r["update_step"] for r in records] == [1, 2, 3, 4]
  assert all(f"{n}/pbt/eval_return" in records[-1] for n in trainer.names)

  # The exported specialists are standard run workdirs (what experiments/merge.py and
  # evaluate_arena read through restore_trained): each holds its role's best member.
  paths = whole["outputs"]["specialists"]
  assert sorted(paths) == ["scout", "tank"]
  best = population.best_members(trainer, whole["state"])
  scores = np.asarray(whole["state"].scores)
  assert scores[best["scout"]] == scores[:2].max() and scores[best["tank"]] == scores[2:].max()
  for role, path in paths.items():
    _, runner = restore_trained(path)
    chex.assert_trees_all_equal(jax.device_get(runner.agent),
                                population.member_agent(whole["state"], best[role]))


def test_a_four_device_checkpoint_restores_on_one_device_and_continues_alike(setup, tmp_path):
  """Written on 4 devices, a checkpoint restores bit for bit on 1, a fresh init is the same
  on both, and the two go on with the same members: env randomness is keyed by global env
  index, so the trajectories are equal, and the 4-device update averages loss and
  statistics over devices, so parameters differ only by float reduction order. Adam
  divides by √v, which magnifies that order's effect where a gradient is nearly zero (an
  input dimension that is rarely non-zero): max |Δθ| was 1.8e-7 in one run and 2.4e-5 (10
  of 12,288 weights of one kernel) in another on a loaded machine. The tolerance, 1e-4, is
  still far below what the two updates move (3.4e-3)."""
  cfg, trainer, _, base = setup
  workdir = str(tmp_path / "four")
  four = population.run(cfg, workdir, max_updates=2, trainer=trainer)["state"]
  assert four.runners.obs.sharding.num_devices == 4
  assert {s.data.shape[1] for s in four.runners.obs.addressable_shards} == {2}
  one_trainer, one = population.restore_population(workdir, num_devices=1)
  assert one_trainer.mesh.size == 1 and one.runners.obs.sharding.num_devices == 1
  chex.assert_trees_all_equal(jax.device_get(one), jax.device_get(four))
  # A fresh start is the same on both too: envs are reset from their global indices.
  chex.assert_trees_all_equal(jax.device_get(one_trainer.init(base, jax.random.PRNGKey(1))),
                              jax.device_get(trainer.init(base, jax.random.PRNGKey(1))))
  start = jax.device_get(four.runners.agent.params)
  for _ in range(2):
    four, _ = trainer.chunk(1)(four)
    one, metrics = one_trainer.chunk(1)(one)
  four, one = jax.device_get((four, one))
  np.testing.assert_array_equal(one.runners.is_first, four.runners.is_first)
  chex.assert_trees_all_close(one.runners.agent.params, four.runners.agent.params, rtol=0,
                              atol=1e-4)
  assert int(one.update_step) == 4 and np.isfinite(metrics["loss/total"]).all()
  moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), start, one.runners.agent.params)
  assert max(jax.tree.leaves(moved)) > 1e-3
  with pytest.raises(ValueError, match=r"config.num_envs=8 \(envs per member\) must be "
                     "divisible by the 3 devices"):
    population.PopulationTrainer(cfg, sharding.make_mesh(3))


def test_evaluated_gate_asks_each_role_to_keep_its_share_of_the_gain():
  # Gains over the base: 2 and 0.5; half of them: 1 and 0.25.
  base, own = [1.0, 2.0], [3.0, 2.5]
  assert population.retains_gains(base, own, [2.0, 2.3], 0.5)  # keeps 1 and 0.3
  assert not population.retains_gains(base, own, [2.0, 2.2], 0.5)  # 0.2 < 0.25
  assert population.retains_gains(base, own, [2.0, 2.2], 0.4)  # 0.2 >= 0.2
  # A specialist below the base (gain clipped to 0): the merge may not fall below the base.
  assert not population.retains_gains([1.0], [0.5], [0.9], 0.5)
  assert population.retains_gains([1.0], [0.5], [1.0], 0.5)


@pytest.mark.parametrize("field, value, message", [
    ("roles", ("scout", "sniper"), "unknown role 'sniper'"),
    ("pbt_every_updates", 3, "multiple of config.run.log_every_updates"),
    ("pbt_fraction", 0.75, "pbt_fraction=0.75"),
    ("hparams.momentum", (0.1, 0.9), "hparams.momentum: not tunable"),
    ("hparams.lr", (1e-3, 1e-2), "config.ppo.lr=0.0003 lies outside"),
])
def test_bad_population_config_names_the_field(field, value, message):
  cfg = arena_population.get_config("debug")
  cfg.run.log_every_updates = 2
  cfg.run.checkpoint_every_updates = 2
  cfg.population.pbt_every_updates = 2
  section, _, name = ("population." + field).rpartition(".")
  target = cfg
  for part in section.split("."):
    target = target[part]
  target[name] = value
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
    population.validate(cfg)
