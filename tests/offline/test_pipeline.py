"""The offline video pipeline end to end on a tiny recorded BonkArena dataset (every phase,
on CPU), its resumability, bad-input handling, phase names, and the action layout."""
import collections
import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import video_pretrain
from mbjax.envs.spaces import HybridActionSpec
from mbjax.offline import bc as bc_lib
from mbjax.offline import chunks, episodes, pipeline
from mbjax.offline import reward_model as reward_lib
from mbjax.offline.pipeline import config as config_lib
from mbjax.offline.pipeline import models, workspace
from mbjax.offline.pipeline.models import chunk_lives, split_episodes


def test_phase_names_and_aliases():
  cfg = pipeline.base_config()
  assert pipeline.resolve_phases("all", cfg)[0] == "convert"
  assert "ground_truth" not in pipeline.resolve_phases("all", cfg)
  cfg.ground_truth.enabled = True
  assert pipeline.resolve_phases("all", cfg)[:3] == ["ground_truth", "convert", "attach_labels"]
  assert pipeline.resolve_phases("label_rewards,train_idm", cfg) == ["idm_train",
                                                                     "reward_label"]
  assert pipeline.resolve_phases("export_rollouts", cfg) == ["export"]
  with pytest.raises(ValueError, match="unknown phase.*'idm_trian'"):
    pipeline.resolve_phases("idm_trian", cfg)


def test_actions_pack_and_unpack_by_hand():
  spec = HybridActionSpec(continuous_dim=2, branches=(3, 2))
  probs = [np.array([[0.2, 0.5, 0.3], [1.0, 0.0, 0.0]]), np.array([[0.9, 0.1], [0.4, 0.6]])]
  actions = pipeline.pack_actions(np.array([[0.5, -1.0], [0.0, 0.25]]), probs)
  np.testing.assert_allclose(actions, [[0.5, -1.0, 0.2, 0.5, 0.3, 0.9, 0.1],
                                       [0.0, 0.25, 1.0, 0.0, 0.0, 0.4, 0.6]])
  assert actions.dtype == np.float32
  continuous, discrete = pipeline.unpack_actions(actions, spec)
  np.testing.assert_array_equal(continuous, [[0.5, -1.0], [0.0, 0.25]])
  np.testing.assert_array_equal(discrete, [[1, 0], [0, 1]])
  with pytest.raises(chunks.ChunkError, match=r"expected f32\[T, 7\]"):
    pipeline.unpack_actions(actions[:, :6], spec)


def test_reward_holdout_by_source_pattern_then_per_look():
  looks = {"atari_pong_0_ab": "atari_pong", "atari_pong_1_cd": "atari_pong",
           "a1": "fixed", "a2": "fixed", "a3": "fixed", "a4": "fixed", "a5": "fixed",
           "b1": "follow", "b2": "follow", "c1": "lonely"}
  held_out = split_episodes(looks, 0.2, ("atari_*",), seed=0)
  # Both Atari clips by the pattern; of the others per look: ceil(0.2·5) = 1 "fixed",
  # ceil(0.2·2) = 1 "follow", none of the single "lonely" episode.
  assert {"atari_pong_0_ab", "atari_pong_1_cd"} <= held_out
  by_look = collections.Counter(looks[e] for e in held_out)
  assert by_look == {"atari_pong": 2, "fixed": 1, "follow": 1}
  assert split_episodes(dict(reversed(looks.items())), 0.2, ("atari_*",),
                        seed=0) == held_out  # deterministic, order-free
  # Without the pattern the Atari clips are one more look: ceil(0.5·2) = 1 of them.
  by_look = collections.Counter(looks[e] for e in split_episodes(looks, 0.5, (), 0))
  assert by_look == {"atari_pong": 1, "fixed": 3, "follow": 1}  # fixed: ceil(0.5·5) = 3


def test_chunk_lives_cut_after_each_death():
  frames = np.arange(6)[:, None, None, None] * np.ones((6, 2, 2, 3), np.uint8)
  lives = chunk_lives({"observations": frames,
                       "terminals": np.array([0, 1, 0, 0, 0, 1], bool)})
  assert [(f[:, 0, 0, 0].tolist(), died) for f, died in lives] == [
      ([0, 1], True), ([2, 3, 4, 5], True)]
  lives = chunk_lives({"observations": frames, "terminals": np.array([0, 0, 1, 0, 0, 0], bool)})
  assert [(len(f), died) for f, died in lives] == [(3, True), (3, False)]
  assert [(len(f), died) for f, died in chunk_lives({"observations": frames})] == [(6, False)]


def test_the_returns_objective_trains_on_the_chunks_with_the_game_s_reward(tmp_path):
  frames = np.zeros((5, 8, 8, 3), np.uint8)
  paths = []
  for name, extra in (("a", {"game_rewards": np.arange(5, dtype=np.float32)}), ("b", {})):
    paths.append(str(tmp_path / f"demo_{name}_chunk0000.npz"))
    chunks.write_chunk(paths[-1], {"observations": frames, "dones": np.eye(5, dtype=bool)[4],
                                   "meta": chunks.encode_meta({"episode_id": name}), **extra})
  cfg = video_pretrain.get_config("debug")
  ws = workspace.Workspace(str(tmp_path / "work"), cfg)
  skipped = workspace.Skipped("reward_train")
  data, used = models._reward_training_data(ws, cfg, {"a": paths[:1], "b": paths[1:]}, skipped)
  assert used == {"labelled_chunks": 1, "frames": 5} and not skipped.entries
  np.testing.assert_array_equal(data["rewards"][0], np.arange(5))
  with pytest.raises(ValueError, match="and none of the 1 training chunks .* does; label"):
    models._reward_training_data(ws, cfg, {"b": paths[1:]}, skipped)
  cfg.reward.objective = "progress"
  data, used = models._reward_training_data(ws, cfg, {"a": paths[:1], "b": paths[1:]}, skipped)
  assert used == {"lives": 2, "deaths": 0} and "rewards" not in data


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  """Every phase of `configs/video_pretrain.py:debug`, run once for the module's tests;
  also counts how often each exported episode file is read."""
  workdir = str(tmp_path_factory.mktemp("video"))
  cfg = video_pretrain.get_config("debug")
  reads, read_episode = collections.Counter(), episodes.read_episode

  def counting_read(path, *args, **kwargs):
    reads[os.path.basename(path)] += 1
    return read_episode(path, *args, **kwargs)

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(episodes, "read_episode", counting_read)
    results = pipeline.run(workdir, cfg, "all")
  return workdir, cfg, results, reads


@pytest.mark.slow
def test_every_phase_runs_and_writes_the_upstream_layout(finished_run):
  workdir, cfg, results, reads = finished_run
  assert list(results) == pipeline.resolve_phases("all", cfg)
  paths = chunks.list_chunks(os.path.join(workdir, "chunks"))
  assert len(paths) == results["convert"]["frames"] // cfg.convert.chunk_frames
  labellings, bonk_arena_idm = [], 0
  for path in paths:
    arrays = chunks.read_chunk(path)
    length = len(arrays["observations"])
    assert arrays["observations"].dtype == np.uint8
    assert arrays["observations"].shape[1:] == (cfg.convert.size, cfg.convert.size, 3)
    assert arrays["actions"].dtype == np.float32 and arrays["actions"].shape == (length, 2 + 4)
    assert arrays["rewards"].dtype == np.float32 and arrays["rewards"].shape == (length,)
    assert arrays["progress_scores"].dtype == np.float32
    assert arrays["skill_tokens"].dtype == np.int32
    assert arrays["terminals"].dtype == np.bool_ and arrays["terminals"].shape == (length,)
    assert arrays["death_probs"].dtype == np.float32 and arrays["death_probs"].shape == (length,)
    meta = chunks.decode_meta(arrays["meta"])
    labellings.append(meta["action_labeling"])
    atari = os.path.basename(str(arrays["video_source"])).startswith("atari_")
    bonk_arena_idm += meta["action_labeling"] == "idm" and not atari
    # The labelled subset carries the game's reward beside its actions; nothing else does.
    if meta["action_labeling"] == "ground_truth":
      truth = workspace.truth_for_chunk(arrays, path)
      np.testing.assert_array_equal(arrays["game_rewards"], truth["rewards"])
    else:
      assert "game_rewards" not in arrays
    if meta["action_labeling"] == "idm":
      # IDM actions: the continuous part clipped, each branch a probability vector.
      assert np.all(np.abs(arrays["actions"][:, :2]) <= 1.0)
      np.testing.assert_allclose(arrays["actions"][:, 2:].sum(-1), 1.0, rtol=1e-5)
  assert labellings.count("ground_truth") == len(results["attach_labels"]["labelled_chunks"])
  assert 0 < labellings.count("ground_truth") < len(paths)
  assert "idm" in labellings

  report = json.load(open(os.path.join(workdir, "report.json")))
  # IDM accuracy is measured where the true actions are BonkArena's (not the Atari clip's).
  # The debug recordings hold no menu frame, so every true card label is the no-op and the
  # labels must say so on every frame (a mis-packed or mis-aligned labelling would miss).
  # At this size the IDM does not learn movement (R² ≈ 0): that it can is
  # tests/offline/test_idm.py's learning test; here R² is only computed on every frame.
  idm_report = report["idm"]
  assert idm_report["all/frames"] == bonk_arena_idm * cfg.convert.chunk_frames
  assert idm_report["menu/frames"] == 0
  assert idm_report["gameplay/accuracy_0"] == idm_report["all/accuracy_0"] == 1.0
  assert idm_report["all/move_frames"] == idm_report["all/frames"]
  assert np.isfinite(idm_report["all/move_r2"])
  # The Atari clip is always held out of reward training, and each BonkArena look (two
  # episodes each) has one held-out episode: one Spearman entry per source look.
  held_out = results["reward_train"]["held_out_episodes"]
  assert sum(e.startswith("atari_space_invaders") for e in held_out) == 1
  assert len(held_out) == 3
  reward = report["reward"]
  assert {look: reward[look]["episodes"] for look in reward if not look.startswith("all")} == {
      "atari_space_invaders": 1, "fixed:default@64": 1, "follow:desert@64": 1}
  assert reward["all_atari"]["episodes"] == 1 and reward["all_bonk_arena"]["episodes"] == 2
  # The reward model learnt from the labelled chunks of the training episodes, and only
  # those (what it learns is tests/offline/test_reward_model.py's).
  labelled_training = [name for name in results["attach_labels"]["labelled_chunks"]
                       if not any(name.startswith(f"demo_{e}_") for e in held_out)]
  assert 0 < results["reward_train"]["labelled_chunks"] == len(labelled_training)
  assert results["reward_train"]["frames"] == len(labelled_training) * cfg.convert.chunk_frames
  # Deaths and the video reward are scored on the held-out BonkArena videos (the Atari clip
  # has no true deaths and is not compared with the game's reward).
  assert report["death"]["all"]["videos"] == 2
  assert report["death"]["all"]["frames"] == 2 * cfg.ground_truth.time_limit
  assert report["video_reward"]["all"]["episodes"] == 2
  assert report["video_reward"]["all"]["windows"] == 2 * (
      cfg.ground_truth.time_limit // cfg.eval.reward_window)
  assert 1.0 <= report["skills"]["perplexity"] <= cfg.skills.num_codes
  # The reward probes: random play and a constant move, one game per look each.
  for policy in ("random", "constant_move"):
    probe = report["reward_probes"][policy]
    assert probe["games"] == len(cfg.ground_truth.variants)
    assert np.isfinite(probe["video_return_mean"]) and probe["wall_term_mean"] <= 0.0
  assert report["reward_probes"]["random"]["wall_term_mean"] > -0.5  # rarely at a wall
  # The behaviour-cloned policy imitated the training videos (every one scripted), and is
  # played against the scripted policy and random play, one game per look.
  played_bc = report["bc"]
  assert played_bc["imitated_policies"] == ["scripted"]
  assert played_bc["imitated_episodes"] == results["bc_train"]["episodes"] == 2
  assert np.isfinite(results["bc_train"]["locator"]["explained"])  # debug: crop_fraction 0.5
  assert played_bc["episodes"] == cfg.eval.bc_episodes
  assert set(played_bc["bc_return_per_look"]) == set(cfg.ground_truth.variants)
  assert np.isfinite(played_bc["demonstrator_fraction"])
  for policy in ("bc", "demonstrator", "random"):
    played = played_bc[policy]
    assert 0 < played["length_mean"] <= cfg.eval.max_steps
    assert sum(played["reward_terms"].values()) == pytest.approx(played["return_mean"],
                                                                 rel=1e-4, abs=1e-4)
  assert report["dream"]["episodes"] == cfg.eval.episodes
  for policy in ("dream", "teacher", "random"):  # debug: dream_teacher "bc"
    played = report["dream"][policy]
    assert np.isfinite(played["return_mean"]) and 0 < played["length_mean"] <= cfg.eval.max_steps
    # The return is the sum of the weighted terms: the terms are summed over the same steps.
    assert sum(played["reward_terms"].values()) == pytest.approx(played["return_mean"],
                                                                 rel=1e-4, abs=1e-4)
  # The saved dream policy is the trained one, trained against a fixed world model: the
  # dream checkpoint holds the world model checkpoint's model bit for bit, another actor.
  assert results["dream"]["final"]["dream/actor_loss"] != 0.0
  saved = {name: ocp.StandardCheckpointer().restore(
      os.path.join(workdir, "models", name, "params")) for name in ("world_model", "dream")}
  jax.tree.map(np.testing.assert_array_equal, saved["world_model"]["aux"]["world_model"],
               saved["dream"]["aux"]["world_model"])
  actors = [jax.tree.leaves(saved[name]["aux"]["dream"]["actor_params"])
            for name in ("world_model", "dream")]
  assert not all(np.array_equal(a, b) for a, b in zip(*actors))
  # Each exported episode was read once by world_model and once by dream (not twice there).
  assert results["export"]["episodes"] == len(reads) and set(reads.values()) == {2}
  # An episode's observation: the reward model's embedding, then the cloned policy's hidden
  # layer (`export.features`), of its chunk's frames.
  exported = lambda path: os.path.join(workdir, "episodes", os.path.basename(path))
  chunk_path = next(path for path in paths if os.path.exists(exported(path)))
  episode = episodes.read_episode(exported(chunk_path))
  frames = chunks.read_chunk(chunk_path)["observations"]
  ws = workspace.Workspace(workdir, cfg)
  reward_params, reward_cfg, _ = models.load_reward(ws, cfg)
  bc_params, _ = models.BC.load(ws, cfg)
  expected = np.concatenate([
      reward_lib.embed(reward_params, reward_cfg, frames)[0],
      bc_lib.features(bc_params, config_lib.bc_config(cfg), config_lib.action_spec(cfg),
                      frames)], -1)
  assert expected.shape[1] == cfg.reward.embed_dim + cfg.bc.hidden
  np.testing.assert_allclose(episode["observation"], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_rerun_resumes_and_skips_a_corrupt_chunk(finished_run, tmp_path):
  workdir, cfg, _, _ = finished_run
  copy = str(tmp_path / "copy")
  shutil.copytree(workdir, copy)
  rerun = pipeline.run(copy, cfg, "idm_train,idm_label,reward_train,skills_label")
  assert rerun["idm_train"]["resumed"] == "already trained"
  assert rerun["idm_label"]["labelled"] == 0
  assert rerun["skills_label"]["labelled"] == 0

  # A chunk turned to garbage is reported by name and skipped; the others keep their labels.
  paths = chunks.list_chunks(os.path.join(copy, "chunks"))
  victim = paths[-1]
  with open(victim, "wb") as f:
    f.write(b"not a zip file at all")
  shutil.rmtree(os.path.join(copy, "models", "idm"))
  before = {p: chunks.read_chunk(p)["actions"] for p in paths[:-1]}
  info = pipeline.run(copy, cfg, "idm_train,idm_label")["idm_label"]
  assert list(info["skipped"]) == [os.path.basename(victim)]
  assert "not a readable .npz chunk" in info["skipped"][os.path.basename(victim)]
  record = json.load(open(os.path.join(copy, "phases.json")))
  assert os.path.basename(victim) in record["idm_label"]["skipped"]
  for path, actions in before.items():
    assert chunks.read_chunk(path)["actions"].shape == actions.shape


def test_unknown_exported_features_and_teachers_are_named_before_any_phase(tmp_path):
  cfg = video_pretrain.get_config("debug")
  cfg.export.features = ("reward", "pixels")
  with pytest.raises(ValueError, match=r"export.features: \('reward', 'pixels'\): expected "
                                       r"distinct names from \('reward', 'bc'\)"):
    models.frame_features(workspace.Workspace(str(tmp_path), cfg), cfg)
  cfg.export.features = ("reward",)
  cfg.dream_teacher = "scripted"
  with pytest.raises(ValueError, match=r"dream_teacher: 'scripted': expected one of "
                                       r"\('recorded', 'bc'\)"):
    pipeline.run(str(tmp_path), cfg, "convert")
  cfg.dream_teacher = "bc"
  with pytest.raises(ValueError, match="dream_teacher='bc' acts on the cloned policy's "
                                       "exported features"):
    pipeline.run(str(tmp_path), cfg, "convert")
  assert not os.listdir(tmp_path)  # nothing ran


def test_a_saved_model_with_other_settings_is_named_not_silently_kept(tmp_path):
  import dataclasses

  from mbjax.offline.pipeline.models import DEATH
  from mbjax.offline.pipeline.workspace import Workspace, save_model

  cfg = video_pretrain.get_config("debug")
  ws = Workspace(str(tmp_path), cfg)
  save_model(ws.model_dir("death"), jax.device_get(DEATH.fresh(cfg)),
             {"death": dataclasses.asdict(config_lib.death_config(cfg))})
  assert DEATH.changed_settings(ws, cfg) == {}
  DEATH.load(ws, cfg)
  cfg.death.pool = "flatten"  # another net: its parameters have other shapes
  assert DEATH.changed_settings(ws, cfg) == {"pool": ("mean", "flatten")}
  assert DEATH.train(ws, cfg, fit=None)["changed_settings"] == {"pool": ("mean", "flatten")}
  with pytest.raises(ValueError, match=r"models/death does not fit .*'pool': \('mean', "
                                       r"'flatten'\).*remove it to retrain"):
    DEATH.load(ws, cfg)


def test_a_learner_trained_before_a_re_export_is_named_not_silently_resumed(tmp_path):
  from mbjax.offline.pipeline import learners
  from mbjax.offline.pipeline.workspace import Workspace, save_model

  cfg = video_pretrain.get_config("debug")
  cfg.dream_teacher = "recorded"  # the cloned policy's model is not made here
  ws = Workspace(str(tmp_path), cfg)
  os.makedirs(ws.episodes)
  entry = {"status": "done", "steps": 5, "episodes": ["a.npz"],
           "settings": {"observation": "frames", "chunk_stamp": [100, 1]}}
  chunks.save_manifest(ws.episodes, {"sources": {"a.npz": entry}})
  digest = learners._episodes_digest(ws, cfg)
  params = {"w": np.zeros(2, np.float32)}
  model_id = save_model(ws.model_dir("world_model"), params, {"episodes_digest": digest})
  save_model(ws.model_dir("dream"), params,
             {"episodes_digest": digest, "world_model_id": model_id})
  assert learners.world_model(ws, cfg)["resumed"] == "already trained"
  # The chunk was relabelled and exported again: its stamp, and so the digest, changed.
  entry["settings"]["chunk_stamp"] = [100, 2]
  chunks.save_manifest(ws.episodes, {"sources": {"a.npz": entry}})
  for phase in (learners.world_model, learners.dream):
    with pytest.raises(ValueError, match=r"models/\w+ was trained before its inputs changed "
                                         r"\(episodes_digest.*remove it to retrain"):
      phase(ws, cfg)
