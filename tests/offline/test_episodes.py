"""Episodes with RLDS field names: build/write/read round trips (frames and embeddings),
export from labelled chunks (resumable, bad chunks skipped), and upstream `.pt` import."""
import json
import os
import sys

import numpy as np
import pytest

from mbjax.offline import chunks, episodes


def labelled_chunk(length=5, seed=0, **extra):
  rng = np.random.default_rng(seed)
  dones = np.zeros(length, bool)
  dones[-1] = True
  return {
      "observations": rng.integers(0, 256, (length, 4, 6, 3), dtype=np.uint8),
      "dones": dones,
      "meta": chunks.encode_meta({"episode_id": "v_1234abcd", "chunk_index": 3,
                                  "last_chunk": True}),
      "actions": rng.uniform(-1, 1, (length, 6)).astype(np.float32),
      "rewards": np.arange(length, dtype=np.float32) / 10,
      "progress_scores": np.arange(length, dtype=np.float32),
      "skill_tokens": np.array([7] * (length - 1) + [-1], np.int32),
      **extra,
  }


def test_make_write_read_round_trip_with_rlds_fields(tmp_path):
  obs = np.zeros((3, 4, 4, 3), np.uint8)
  ep = episodes.make_episode(obs, np.ones((3, 2)), reward=[1.0, 2.0, 3.0],
                             action_discrete=[[3], [0], [3]], is_terminal=[False, False, True],
                             metadata={"policy": "scripted"})
  assert ep["is_first"].tolist() == [True, False, False]
  assert ep["is_last"].tolist() == [False, False, True]
  assert ep["discount"].tolist() == [1.0, 1.0, 0.0]
  assert ep["action"].dtype == np.float32 and ep["action_discrete"].dtype == np.int32
  path = str(tmp_path / "ep.npz")
  episodes.write_episode(path, ep)
  back = episodes.read_episode(path)
  assert sorted(back) == sorted(ep)
  for key in ep:
    np.testing.assert_array_equal(back[key], ep[key])
  assert episodes.metadata(back) == {"policy": "scripted", "observation_kind": "frames"}
  emb = episodes.make_episode(np.ones((2, 8)), np.zeros((2, 6)))
  assert emb["observation"].dtype == np.float32
  assert episodes.metadata(emb)["observation_kind"] == "embeddings"
  assert emb["reward"].tolist() == [0.0, 0.0]  # unlabelled: zeros, as upstream defaulted


def test_invalid_episodes_name_the_input():
  with pytest.raises(episodes.EpisodeError,
                     match=r"ep7: 'reward' must be .* 3 rows, got float32\[2\]"):
    episodes.make_episode(np.ones((3, 8)), np.zeros((3, 2)), reward=[1.0, 2.0], name="ep7")
  with pytest.raises(episodes.EpisodeError, match="ep8.*non-finite"):
    episodes.make_episode(np.ones((2, 8)), [[0.0], [np.nan]], name="ep8")
  with pytest.raises(episodes.EpisodeError, match="at least one step"):
    episodes.make_episode(np.ones((0, 8)), np.zeros((0, 2)))


def test_episode_from_chunk_keeps_labels_and_embeds_on_request():
  chunk = labelled_chunk()
  ep = episodes.episode_from_chunk(chunk, name="dir/demo_v_chunk0003.npz")
  np.testing.assert_array_equal(ep["observation"], chunk["observations"])
  np.testing.assert_array_equal(ep["action"], chunk["actions"])
  np.testing.assert_array_equal(ep["reward"], chunk["rewards"])
  np.testing.assert_array_equal(ep["progress_score"], chunk["progress_scores"])
  np.testing.assert_array_equal(ep["skill_token"], chunk["skill_tokens"])
  assert not ep["is_terminal"].any()  # a video's end is not a terminal state by default
  meta = episodes.metadata(ep)
  assert meta["source_chunk"] == "demo_v_chunk0003.npz" and meta["chunk_index"] == 3
  emb = episodes.episode_from_chunk(chunk, "embeddings",
                                    embed_fn=lambda f: f.reshape(len(f), -1, 3).mean(1))
  np.testing.assert_allclose(emb["observation"][2], chunk["observations"][2].reshape(-1, 3).mean(0),
                             rtol=1e-6)
  assert emb["observation"].shape == (5, 3)
  with pytest.raises(episodes.EpisodeError, match="c.npz: has no 'actions'"):
    episodes.episode_from_chunk({k: v for k, v in chunk.items() if k != "actions"}, name="c.npz")
  with pytest.raises(ValueError, match="embed_fn"):
    episodes.episode_from_chunk(chunk, "embeddings")
  train = episodes.training_dict(episodes.episode_from_chunk(chunk), "e")
  assert train["action_discrete"].shape == (5, 0) and train["obs"].shape == (5, 4, 6, 3)


def test_export_chunks_is_resumable_and_skips_bad_chunks(tmp_path):
  src, out = tmp_path / "chunks", tmp_path / "episodes"
  src.mkdir()
  chunks.write_chunk(str(src / "demo_a_chunk0000.npz"), labelled_chunk(seed=1))
  chunks.write_chunk(str(src / "demo_a_chunk0001.npz"), labelled_chunk(seed=2))
  unlabelled = {k: v for k, v in labelled_chunk().items() if k != "actions"}
  chunks.write_chunk(str(src / "demo_b_chunk0000.npz"), unlabelled)
  bad = labelled_chunk()
  bad["actions"][1, 0] = np.inf
  chunks.write_chunk(str(src / "demo_c_chunk0000.npz"), bad)
  (src / "demo_d_chunk0000.npz").write_bytes(b"garbage")
  manifest = episodes.export_chunks(str(src), str(out))
  status = {k: v["status"] for k, v in manifest["sources"].items()}
  assert status == {"demo_a_chunk0000.npz": "done", "demo_a_chunk0001.npz": "done",
                    "demo_b_chunk0000.npz": "skipped", "demo_c_chunk0000.npz": "skipped",
                    "demo_d_chunk0000.npz": "skipped"}
  assert "non-finite" in manifest["sources"]["demo_c_chunk0000.npz"]["reason"]
  assert "demo_d_chunk0000.npz" in manifest["sources"]["demo_d_chunk0000.npz"]["reason"]
  assert [os.path.basename(p) for p in episodes.list_episodes(str(out))] == [
      "demo_a_chunk0000.npz", "demo_a_chunk0001.npz"]
  stamp = os.stat(out / "demo_a_chunk0000.npz").st_mtime_ns
  messages = []
  episodes.export_chunks(str(src), str(out), progress=messages.append)
  assert os.stat(out / "demo_a_chunk0000.npz").st_mtime_ns == stamp
  assert all("demo_a" not in m for m in messages)  # finished episodes are not redone
  ep = episodes.read_episode(str(out / "demo_a_chunk0001.npz"))
  np.testing.assert_array_equal(ep["action"], labelled_chunk(seed=2)["actions"])
  # Other features (another encoder's id) are exported again, every chunk of them.
  messages = []
  embed = lambda frames: np.ones((len(frames), 3), np.float32)
  episodes.export_chunks(str(src), str(out), "embeddings", embed, progress=messages.append)
  assert sum("demo_a" in m for m in messages) == 2
  messages = []
  episodes.export_chunks(str(src), str(out), "embeddings", embed, progress=messages.append,
                         encoder="reward:1234")
  assert sum("demo_a" in m for m in messages) == 2
  ep = episodes.read_episode(str(out / "demo_a_chunk0001.npz"))
  np.testing.assert_array_equal(ep["observation"], np.ones((len(ep["reward"]), 3)))


def test_deaths_become_terminals_and_a_death_inside_a_chunk_splits_its_lives(tmp_path):
  src, out = tmp_path / "chunks", tmp_path / "episodes"
  src.mkdir()
  terminals = np.zeros(7, bool)
  terminals[[2, 6]] = True  # a death on step 2, another on the chunk's last step
  chunks.write_chunk(str(src / "demo_a_chunk0000.npz"), labelled_chunk(7, terminals=terminals))
  ending = np.zeros(5, bool)
  ending[-1] = True
  chunks.write_chunk(str(src / "demo_b_chunk0000.npz"), labelled_chunk(5, terminals=ending))
  manifest = episodes.export_chunks(str(src), str(out))
  assert manifest["sources"]["demo_a_chunk0000.npz"]["episodes"] == [
      "demo_a_chunk0000_life0.npz", "demo_a_chunk0000_life1.npz"]
  life0, life1 = (episodes.read_episode(str(out / f"demo_a_chunk0000_life{k}.npz"))
                  for k in (0, 1))
  chunk = labelled_chunk(7)
  np.testing.assert_array_equal(life0["observation"], chunk["observations"][:3])
  np.testing.assert_array_equal(life1["reward"], chunk["rewards"][3:])
  np.testing.assert_array_equal(life0["is_terminal"], [False, False, True])
  np.testing.assert_array_equal(life1["is_terminal"], [False, False, False, True])
  np.testing.assert_array_equal(life1["discount"], [1, 1, 1, 0])
  np.testing.assert_array_equal(life1["is_first"], [True, False, False, False])
  assert [episodes.metadata(e)["life"] for e in (life0, life1)] == [0, 1]
  # A death on the last step ends the one episode in a terminal state.
  whole = episodes.read_episode(str(out / "demo_b_chunk0000.npz"))
  np.testing.assert_array_equal(whole["is_terminal"], ending)
  # Rerun: both are done, the split one included.
  messages = []
  episodes.export_chunks(str(src), str(out), progress=messages.append)
  assert messages == []
  # A relabelled chunk (new rewards, one death fewer) is exported again; its old lives go.
  relabelled = labelled_chunk(7, terminals=np.zeros(7, bool))
  relabelled["rewards"] = relabelled["rewards"] + 1.0
  chunks.update_chunk(str(src / "demo_a_chunk0000.npz"),
                      {"rewards": relabelled["rewards"], "terminals": relabelled["terminals"]})
  manifest = episodes.export_chunks(str(src), str(out))
  assert manifest["sources"]["demo_a_chunk0000.npz"]["episodes"] == ["demo_a_chunk0000.npz"]
  assert sorted(os.listdir(out)) == ["demo_a_chunk0000.npz", "demo_b_chunk0000.npz",
                                     "manifest.json"]
  np.testing.assert_array_equal(
      episodes.read_episode(str(out / "demo_a_chunk0000.npz"))["reward"], relabelled["rewards"])
  with pytest.raises(episodes.EpisodeError, match="c.npz: terminals must be bool"):
    episodes.episode_from_chunk(labelled_chunk(5, terminals=np.zeros(4, bool)), name="c.npz")


def upstream_pt_dict(length=4):
  rng = np.random.default_rng(3)
  return {
      "observations": rng.normal(size=(length, 256)).astype(np.float32),
      "actions": rng.uniform(-1, 1, (length, 6)).astype(np.float32),
      "rewards": rng.normal(size=length).astype(np.float32),
      "dones": np.array([False] * (length - 1) + [True]),
      "audio_tokens": np.array([5, -1, 7, 7], np.int32),
      "meta": {"source_npz": "demo_x_chunk0000.npz", "frame_size": (224, 224),
               "embed_dim": 256, "obs_dim": 256, "action_dim": 6},
  }


def test_upstream_pt_dict_maps_to_rlds_fields():
  data = upstream_pt_dict()
  ep = episodes.from_upstream_pt(data, "rollouts/video_rollouts/demo_x_chunk0000.pt")
  np.testing.assert_array_equal(ep["observation"], data["observations"])
  np.testing.assert_array_equal(ep["action"], data["actions"])
  np.testing.assert_array_equal(ep["reward"], data["rewards"])
  assert ep["is_terminal"].tolist() == [False, False, False, True]
  assert ep["discount"].tolist() == [1.0, 1.0, 1.0, 0.0]
  assert ep["audio_token"].tolist() == [5, -1, 7, 7]
  meta = episodes.metadata(ep)
  assert meta["frame_size"] == [224, 224] and meta["imported_from"] == "demo_x_chunk0000.pt"
  minimal = episodes.from_upstream_pt({"observations": data["observations"],
                                       "actions": data["actions"]}, "m.pt")
  assert minimal["reward"].tolist() == [0.0] * 4 and not minimal["is_terminal"].any()
  with pytest.raises(episodes.EpisodeError, match="m.pt.*'actions'"):
    episodes.from_upstream_pt({"observations": data["observations"]}, "m.pt")


def test_upstream_pt_import_without_torch_says_so(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
  with pytest.raises(ImportError, match="ep.pt: reading upstream .pt episodes needs PyTorch"):
    episodes.import_upstream_pt(str(tmp_path / "ep.pt"))


@pytest.mark.torch
def test_upstream_pt_file_round_trip(tmp_path):
  """The `.pt` file itself: torch.save, then import_upstream_pt's torch.load(weights_only=
  True), which must refuse a pickled object. Runs only with the optional torch extra; without
  it, the tests above cover the dict → episode mapping and the missing-torch message, and
  reading a real `.pt` file is not covered."""
  torch = pytest.importorskip(
      "torch", reason="torch is not installed (pip install -e '.[torch]'): reading upstream "
      ".pt files (torch.load, weights_only=True) is not covered by this run")
  data = upstream_pt_dict()
  path = str(tmp_path / "demo_x_chunk0000.pt")
  torch.save({k: (torch.from_numpy(v) if isinstance(v, np.ndarray) else v)
              for k, v in data.items()}, path)
  ep = episodes.import_upstream_pt(path)
  np.testing.assert_array_equal(ep["observation"], data["observations"])
  np.testing.assert_array_equal(ep["action"], data["actions"])
  assert json.loads(str(ep["episode_metadata"]))["action_dim"] == 6
  torch.save({"observations": torch.zeros(2, 3), "actions": torch.zeros(2, 6),
              "evil": object()}, str(tmp_path / "bad.pt"))
  with pytest.raises(episodes.EpisodeError, match="bad.pt"):  # weights_only refuses objects
    episodes.import_upstream_pt(str(tmp_path / "bad.pt"))
