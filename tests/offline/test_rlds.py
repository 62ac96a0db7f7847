"""RLDS both ways (`mbjax/offline/rlds.py`): our `.npz` episodes exported and read back with
plain tensorflow-datasets equal the files field by field; a dataset written by a plain TFDS
builder (another producer's layout) trains the offline world model at debug size; a missing
field is named before any episode is read."""
import os
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import video_pretrain
from mbjax.offline import episodes, pipeline, rlds


def _npz_episodes(directory, rng):
  """Three frame episodes with every optional field, one unreadable file, and one
  embeddings episode (other fields than the first: skipped by the export)."""
  os.makedirs(directory)
  for index, length in enumerate([5, 9, 2]):
    episode = episodes.make_episode(
        rng.integers(0, 256, (length, 6, 4, 3), dtype=np.uint8),
        rng.normal(size=(length, 6)), rng.normal(size=length),
        action_discrete=rng.integers(0, 4, (length, 1)),
        is_terminal=np.arange(length) == length - 1 if index == 1 else None,
        labels={"progress_score": rng.normal(size=length),
                "skill_token": rng.integers(-1, 16, length)},
        metadata={"episode_id": f"e{index}", "chunk_index": index})
    episodes.write_episode(os.path.join(directory, f"ep{index}.npz"), episode)
  with open(os.path.join(directory, "ep3.npz"), "wb") as f:
    f.write(b"not an npz")
  episodes.write_episode(os.path.join(directory, "ep4.npz"), episodes.make_episode(
      rng.normal(size=(4, 8)), rng.normal(size=(4, 6))))


def test_exported_episodes_read_back_with_tfds_equal_the_npz_files(tmp_path):
  source = str(tmp_path / "episodes")
  _npz_episodes(source, np.random.default_rng(0))
  info = rlds.export_rlds(source, str(tmp_path / "rlds"))
  assert info["dataset_dir"] == str(tmp_path / "rlds" / rlds.DATASET_NAME / rlds.VERSION)
  assert (info["episodes"], info["steps"]) == (3, 5 + 9 + 2)
  assert sorted(info["skipped"]) == ["ep3.npz", "ep4.npz"]
  assert "not a readable episode" in info["skipped"]["ep3.npz"]
  assert "'observation'" in info["skipped"]["ep4.npz"]

  # Plain TFDS, no mbjax code: every step field stacked equals the file's array.
  data = tfds.builder_from_directory(info["dataset_dir"]).as_data_source()
  assert list(data) == ["train"] and len(data["train"]) == 3
  seen = set()
  for example in data["train"]:
    meta = example["episode_metadata"]
    name = meta["file_path"].decode()
    expected = episodes.read_episode(os.path.join(source, name))
    steps = [example["steps"][t] for t in range(len(example["steps"]))]
    assert set(steps[0]) == set(expected) - {"episode_metadata"}
    for key in steps[0]:
      stacked = np.stack([step[key] for step in steps])
      assert stacked.dtype == expected[key].dtype, key
      np.testing.assert_array_equal(stacked, expected[key], err_msg=f"{name} {key}")
    assert meta["json"].decode() == str(expected["episode_metadata"])
    assert meta["observation_kind"] == b"frames"
    seen.add(name)
  assert seen == {"ep0.npz", "ep1.npz", "ep2.npz"}
  assert "tensorflow" not in sys.modules

  # Our reader gives back the episode dicts exactly (key set, dtypes, values, metadata).
  read = dict(rlds.read_episodes(info["dataset_dir"]))
  assert len(read) == 3
  for episode in read.values():
    index = episodes.metadata(episode)["chunk_index"]
    expected = episodes.read_episode(os.path.join(source, f"ep{index}.npz"))
    assert set(episode) == set(expected)
    for key, value in expected.items():
      assert episode[key].dtype == value.dtype, key
      np.testing.assert_array_equal(episode[key], value, err_msg=key)
  with pytest.raises(FileExistsError, match="remove it"):
    rlds.export_rlds(source, str(tmp_path / "rlds"))


def _plain_rlds_dataset(data_dir, name, step_features, episodes_steps):
  """An RLDS dataset written by a plain TFDS builder, as another producer would."""

  class ForeignRlds(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("0.1.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "steps": tfds.features.Dataset(step_features),
          "episode_metadata": {"recorder": tfds.features.Text(),
                               "seed": tfds.features.Scalar(np.int64)}}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for index, steps in enumerate(episodes_steps):
        yield index, {"steps": steps,
                      "episode_metadata": {"recorder": "robot", "seed": 10 + index}}

  ForeignRlds.name = name
  builder = ForeignRlds(data_dir=str(data_dir), file_format="array_record")
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return str(builder.data_dir)


def _foreign_steps(rng, length):
  done = np.arange(length) == length - 1
  return {"observation": {"state": rng.normal(size=(length, 5)).astype(np.float32),
                          "camera": rng.integers(0, 256, (length, 4, 4, 3), dtype=np.uint8)},
          "action": rng.uniform(-1, 1, (length, 2)).astype(np.float32),
          "card": rng.integers(0, 4, length), "reward": rng.normal(size=length),
          "discount": (1.0 - done).astype(np.float32), "is_first": np.arange(length) == 0,
          "is_last": done, "is_terminal": done}


def _foreign_features():
  vector = lambda n: tfds.features.Tensor(shape=(n,), dtype=np.float32)
  scalar = tfds.features.Scalar
  return {"observation": {"state": vector(5),
                          "camera": tfds.features.Tensor(shape=(4, 4, 3), dtype=np.uint8)},
          "action": vector(2), "card": scalar(np.int64), "reward": scalar(np.float64),
          "discount": scalar(np.float32), "is_first": scalar(np.bool_),
          "is_last": scalar(np.bool_), "is_terminal": scalar(np.bool_)}


def test_a_plain_tfds_rlds_dataset_trains_the_offline_world_model(tmp_path):
  rng = np.random.default_rng(1)
  lengths = (12, 3, 16)  # the 3-step one is under the debug min_length (8) and left out
  steps = [_foreign_steps(rng, n) for n in lengths]
  dataset_dir = _plain_rlds_dataset(tmp_path / "data", "robot_play", _foreign_features(), steps)
  fields = {"observation": "observation/state", "action_discrete": "card"}

  # The mapping by hand: nested observation, the integer card → action_discrete [T, 1].
  read = list(rlds.read_episodes(dataset_dir, fields=fields))
  assert [name for name, _ in read] == [f"{dataset_dir}:train[{i}]" for i in range(3)]
  by_length = {len(e["reward"]): e for _, e in read}
  for source in steps:
    episode = by_length[len(source["reward"])]
    np.testing.assert_array_equal(episode["observation"], source["observation"]["state"])
    np.testing.assert_array_equal(episode["action"], source["action"])
    assert episode["action_discrete"].dtype == np.int32
    np.testing.assert_array_equal(episode["action_discrete"], source["card"][:, None])
    assert episode["reward"].dtype == np.float32
    np.testing.assert_array_equal(episode["reward"], source["reward"].astype(np.float32))
    np.testing.assert_array_equal(episode["is_terminal"], source["is_terminal"])
  metas = [episodes.metadata(e) for _, e in read]
  assert [m["rlds_index"] for m in metas] == [0, 1, 2]
  assert sorted(m["seed"] for m in metas) == [10, 11, 12]
  assert {(m["recorder"], m["observation_kind"], m["rlds_dataset"], m["rlds_split"])
          for m in metas} == {("robot", "embeddings", "robot_play/0.1.0", "train")}

  cfg = video_pretrain.get_config("debug")
  cfg.source.rlds_dir = dataset_dir
  cfg.source.rlds_fields.update(fields)
  cfg.run.num_devices = 1
  cfg.learner.dream.enabled = False  # the world model alone: half the compile
  cfg.dream_teacher = "bc"  # :debug's: the cloned policy reads video features, not these
  with pytest.raises(ValueError, match=r"dream_teacher='bc' .* an RLDS source"):
    pipeline.run(str(tmp_path / "work"), cfg, "world_model")
  cfg.dream_teacher = "recorded"
  info = pipeline.run(str(tmp_path / "work"), cfg, "world_model")["world_model"]
  assert info["data_steps"] == 12 + 16 and info["obs_shape"] == [5]
  assert info["steps"] == cfg.world_model_steps
  assert all(np.isfinite(v) for v in info["final"].values())
  assert os.path.exists(os.path.join(info["model"], "config.json"))


def test_missing_fields_are_named_before_any_episode_is_read(tmp_path):
  features = _foreign_features()
  del features["discount"]
  features["act"] = features.pop("action")
  steps = _foreign_steps(np.random.default_rng(2), 4)
  del steps["discount"]
  steps["act"] = steps.pop("action")
  dataset_dir = _plain_rlds_dataset(tmp_path, "no_discount", features, [steps])
  with pytest.raises(episodes.EpisodeError,
                     match=r"no field 'action', 'discount'; they have \['act', 'card'"):
    next(rlds.read_episodes(dataset_dir, fields={"observation": "observation/state"}))
  with pytest.raises(episodes.EpisodeError,
                     match=r"no field 'discount'; .*rlds_fields.<ours>=<path>"):
    next(rlds.read_episodes(dataset_dir, fields={"observation": "observation/state",
                                                 "action": "act"}))
  # The default observation path is a group, not a field; a bad mapping names the path.
  with pytest.raises(episodes.EpisodeError,
                     match=r"no field 'observation' \(a group: map it to one of its fields\)"):
    next(rlds.read_episodes(dataset_dir, fields={"action": "act"}))
  with pytest.raises(episodes.EpisodeError, match=r"'observation' \(mapped to 'obs'\)"):
    next(rlds.read_episodes(dataset_dir, fields={"observation": "obs", "action": "act"}))
  with pytest.raises(episodes.EpisodeError, match=r"'skill_token' \(mapped to 'skills'\)"):
    next(rlds.read_episodes(dataset_dir, fields={"observation": "observation/state",
                                                 "action": "act", "skill_token": "skills"}))
  with pytest.raises(ValueError, match="unknown field.*'actions'"):
    next(rlds.read_episodes(dataset_dir, fields={"actions": "act"}))
  with pytest.raises(FileNotFoundError, match="no dataset_info.json.*found below it"):
    next(rlds.read_episodes(str(tmp_path)))
