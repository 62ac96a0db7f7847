"""The offline learners data-parallel over a device mesh: two updates of the IDM, the
behaviour-cloned policy (frames turned), the death classifier, the reward model (both
objectives, progress with death pairs), the skills VQ-VAE and the offline world model +
dream actor-critic with the global batch split over 4 simulated CPU devices (conftest) equal the plain single-device updates,
and batch sizes that do not divide the device count fail naming their config key.

Tolerance: the 4-device run sums the batch gradient per device and then across devices,
a different order of the same float32 sums; after two Adam steps every parameter agrees
to rtol 1e-5 / atol 1e-6 (measured 2026-11-26: largest difference 3e-8, at most 7e-7 of the
leaf's largest entry).

Every update is compiled at XLA backend optimisation level 0, which halves the compile
time on CPU; the SPMD partitioning that splits the batch and inserts the all-reduce runs
before the backend and is unaffected.
"""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mbjax.envs.spaces import HybridActionSpec
from mbjax.offline import bc, deaths, idm, idm_training, pipeline, reward_model, skills
from mbjax.train import config as config_lib
from mbjax.train import offline, sharding

DEVICES = 4
SPEC = HybridActionSpec(continuous_dim=2, branches=(3,))
SIZE = 8  # frame side


def jitted_init(module, *static):
  """`module.init(key, *static)`, compiled once (op by op it costs several times more)."""
  init = jax.jit(module.init, static_argnums=tuple(range(1, 1 + len(static))))
  return lambda: init(jax.random.PRNGKey(0), *static)


@pytest.fixture(scope="module")
def mesh():
  assert jax.device_count() >= DEVICES, "tests/conftest.py simulates 4 CPU devices"
  return sharding.make_mesh(DEVICES)


def assert_same(sharded, plain):
  """Equal leaves within the stated tolerance; the mesh results replicated on every device."""
  for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(plain), strict=True):
    assert a.sharding.is_fully_replicated and len(a.sharding.device_set) == DEVICES
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def frames(rng, length):
  return rng.integers(0, 256, (length, SIZE, SIZE, 3), dtype=np.uint8)


def test_idm_fit_on_four_devices_equals_one(mesh):
  rng = np.random.default_rng(0)
  episodes = []
  for _ in range(2):
    labels = idm_training.ActionLabels(rng.uniform(-1, 1, (24, 2)).astype(np.float32),
                                       rng.integers(0, 3, (24, 1)).astype(np.int32),
                                       rng.random(24) < 0.8, np.ones(24, bool))
    episodes.append(idm_training.Episode(frames(rng, 24), labels))
  cfg = idm.IDMConfig(window=3, stem=4, channels=(8, 8), embed_dim=8, motion_channels=(8,),
                      hidden=8, shift=2)
  init = jitted_init(idm_training, cfg, (SIZE, SIZE, 3), SPEC)
  run = lambda data_sharding: idm_training.fit(init(), episodes, 2, np.random.default_rng(1),
                                              batch=8, clip_length=5,
                                              data_sharding=data_sharding)
  plain, plain_metrics = run(None)
  sharded, sharded_metrics = run(sharding.batch_sharding(mesh, 8, "idm.batch"))
  assert_same(sharded.params, plain.params)
  assert int(sharded.step) == 2
  assert sharded_metrics == pytest.approx(plain_metrics, rel=1e-5)


def test_behaviour_cloning_fit_on_four_devices_equals_one(mesh):
  rng = np.random.default_rng(0)
  videos = [frames(rng, 12), frames(rng, 20)]
  actions = [np.concatenate([rng.uniform(-1, 1, (len(v), 2)), np.eye(3)[rng.integers(0, 3, len(v))]],
                            -1).astype(np.float32) for v in videos]
  cfg = bc.BCConfig(stem=4, channels=(8,), embed_dim=8, hidden=8, move_bins=3,
                    symmetry_fraction=0.5)
  init = jitted_init(bc, cfg, SPEC, (SIZE, SIZE, 3))
  run = lambda data_sharding: bc.fit(init(), videos, actions, 2, np.random.default_rng(1),
                                     batch=8, data_sharding=data_sharding)
  plain, plain_metrics = run(None)
  sharded, sharded_metrics = run(sharding.batch_sharding(mesh, 8, "bc.batch"))
  assert_same(sharded.params, plain.params)
  assert sharded_metrics == pytest.approx(plain_metrics, rel=1e-5)


def test_death_classifier_fit_on_four_devices_equals_one(mesh):
  rng = np.random.default_rng(0)
  videos = [frames(rng, 12), frames(rng, 20)]
  cfg = deaths.DeathConfig(stem=4, channels=(8,), embed_dim=8)
  init = jitted_init(deaths, cfg, (SIZE, SIZE, 3))
  run = lambda data_sharding: deaths.fit(init(), videos, 2, np.random.default_rng(1), batch=8,
                                         data_sharding=data_sharding)
  plain, plain_metrics = run(None)
  sharded, sharded_metrics = run(sharding.batch_sharding(mesh, 8, "death.batch"))
  assert_same(sharded.params, plain.params)
  assert sharded_metrics == pytest.approx(plain_metrics, rel=1e-5)


@pytest.mark.parametrize("objective", ["returns", "progress"])
def test_reward_model_fit_on_four_devices_equals_one(mesh, objective):
  rng = np.random.default_rng(0)
  episodes = [frames(rng, 12), frames(rng, 20)]
  cfg = reward_model.RewardConfig(objective=objective, stem=4, channels=(8,), embed_dim=8,
                                  death_window=3, return_gap=4)
  init = jitted_init(reward_model, cfg, (SIZE, SIZE, 3))
  labels = ({"rewards": [rng.normal(size=len(e)).astype(np.float32) for e in episodes]}
            if objective == "returns" else {"died": [False, True]})
  run = lambda data_sharding: reward_model.fit(init(), episodes, 2, np.random.default_rng(1),
                                              batch=8, data_sharding=data_sharding, **labels)
  plain, plain_metrics = run(None)
  sharded, sharded_metrics = run(sharding.batch_sharding(mesh, 8, "reward.batch"))
  assert_same(sharded.params, plain.params)
  assert sharded_metrics == pytest.approx(plain_metrics, rel=1e-5)


def test_skills_fit_on_four_devices_equals_one(mesh):
  rng = np.random.default_rng(0)
  vectors = skills.action_vectors(rng.uniform(-1, 1, (200, 2)).astype(np.float32),
                                  rng.integers(0, 3, (200, 1)), SPEC)
  windows = skills.training_windows(vectors, 4, 2)
  # dead_after=1: the second update restarts the codes the first left unused, so the
  # restart's gather from the (split) batch is covered too.
  cfg = skills.SkillConfig(window=4, stride=2, num_codes=8, code_dim=4, hidden=8,
                           dead_after=1)
  init = jitted_init(skills, cfg, SPEC)
  run = lambda data_sharding: skills.fit(init(), windows, 2, np.random.default_rng(1),
                                        jax.random.PRNGKey(2), batch=16,
                                        data_sharding=data_sharding)
  plain, plain_metrics = run(None)
  sharded, sharded_metrics = run(sharding.batch_sharding(mesh, 16, "skills.batch"))
  assert plain_metrics["restarted"] > 0
  assert_same((sharded.params, sharded.codebook), (plain.params, plain.codebook))
  assert sharded_metrics == pytest.approx(plain_metrics, rel=1e-5)


def _learner_config() -> ml_collections.ConfigDict:
  cfg = config_lib.base_config()
  cfg.world_model.update(deter=16, blocks=2, stoch=4, classes=4, hidden=16)
  cfg.replay.update(seq_len=4, burn_in=2)
  cfg.dream.update(hidden_sizes=(16,), horizon=3)
  cfg.efe.enabled = False
  cfg.offline.batch_size = 8
  return cfg


def test_offline_world_model_and_dream_on_four_devices_equal_one(mesh):
  rng = np.random.default_rng(0)
  episodes = [{"obs": rng.normal(size=(n, 5)).astype(np.float32),
               "action_continuous": rng.uniform(-1, 1, (n, 2)),
               "action_discrete": rng.integers(0, 3, (n, 1)),
               "reward": rng.normal(size=n), "terminated": np.arange(n) == n - 1}
              for n in (30, 40)]
  data = offline.EpisodeData.concatenate(episodes, SPEC)
  cfg = _learner_config()

  trainer = offline.make_offline_trainer(cfg, (5,), jnp.float32, SPEC)
  start = jax.jit(trainer.init)(jax.random.PRNGKey(0))

  def run(trainer, state, data):
    # train_world_model=True: the world model and the dream actor-critic both update.
    update = jax.jit(trainer.update, static_argnums=(2, 3)).lower(state, data, True, 2).compile()
    return update(state, data), update.as_text()

  (plain, plain_metrics), plain_hlo = run(trainer, start, data)
  (sharded, sharded_metrics), sharded_hlo = run(
      offline.make_offline_trainer(cfg, (5,), jnp.float32, SPEC, mesh),
      *jax.device_put((start, data), sharding.NamedSharding(mesh, sharding.P())))
  # The sampled windows were split: the partitioner summed over devices where the losses
  # mean over the batch (nothing to sum when the whole batch is on every device).
  assert "all-reduce" in sharded_hlo and "all-reduce" not in plain_hlo
  assert_same(sharded.aux.world_model.params, plain.aux.world_model.params)
  assert_same(sharded.aux.dream, plain.aux.dream)
  for name in plain_metrics:
    np.testing.assert_allclose(sharded_metrics[name], plain_metrics[name], rtol=1e-5,
                               atol=1e-6, err_msg=name)


def test_batches_that_do_not_divide_the_devices_name_their_config_key(mesh, tmp_path):
  cfg = pipeline.base_config()
  cfg.idm.batch = 6
  workspace = pipeline.Workspace(str(tmp_path), cfg)
  with pytest.raises(ValueError, match=r"idm\.batch=6 .* the 4 devices"):
    pipeline.models.idm_train(workspace, cfg)
  cfg.skills.batch, cfg.run.num_devices = 12, 8
  with pytest.raises(ValueError, match=r"run\.num_devices=8: .*8 devices, 4 available"):
    pipeline.models.skills_train(workspace, cfg)
  learner = _learner_config()
  learner.offline.batch_size = 6
  with pytest.raises(ValueError, match=r"learner\.offline\.batch_size=6 .* the 4 devices"):
    offline.make_offline_trainer(learner, (5,), jnp.float32, SPEC, mesh, "learner.")


def test_a_model_saved_from_a_mesh_loads_onto_one_device(mesh, tmp_path):
  # A phase trained over a mesh saves replicated arrays; the labelling phases (and a later
  # run with another device count) load them onto the first device.
  params = {"w": np.arange(8, dtype=np.float32).reshape(2, 4)}
  replicated = jax.device_put(params, sharding.NamedSharding(mesh, sharding.P()))
  pipeline.save_model(str(tmp_path / "model"), replicated, {"note": "mesh"})
  loaded, config = pipeline.load_model(str(tmp_path / "model"), jax.eval_shape(lambda: params))
  assert loaded["w"].sharding.device_set == {jax.devices()[0]}
  np.testing.assert_array_equal(loaded["w"], params["w"])
  assert config["note"] == "mesh"
