"""Own videos through the pipeline: a folder of `.mp4` files → chunks → a labelled subset from
a recording of one video's actions (`mbjax.offline.recorded_actions`, the library side of
experiments/label_chunks.py) → idm_train; mismatched recordings refused naming the file; the
config's paths checked before any phase."""
import os

import numpy as np
import pytest

from configs import video_pretrain
from mbjax.envs.bonk_arena import recording as recording_lib
from mbjax.offline import chunks, pipeline, recorded_actions
from mbjax.offline.pipeline import config as config_lib
from mbjax.offline.pipeline import workspace
from mbjax.train import config as train_config

FRAMES, FPS, CHUNK = 20, 10, 10


def _videos(directory):
  """Two 20-frame 32² videos: a square moving right on a dark field (one per name)."""
  os.makedirs(directory)
  for name, row in (("play_a", 4), ("play_b", 16)):
    frames = np.full((FRAMES, 32, 32, 3), 20, np.uint8)
    for t in range(FRAMES):
      frames[t, row:row + 8, t:t + 8] = 230
    recording_lib.write_mp4(frames, os.path.join(directory, f"{name}.mp4"), FPS)


def _recording(path, steps=FRAMES, **fields):
  rng = np.random.default_rng(0)
  arrays = {"actions_continuous": rng.uniform(-1.5, 1.5, (steps, 2)).astype(np.float32),
            "actions_discrete": rng.integers(0, 4, (steps, 1)).astype(np.int32),
            "menu_open": np.arange(steps) % 7 == 3, "fps": np.int32(FPS), **fields}
  np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
  return arrays


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  root = tmp_path_factory.mktemp("own_videos")
  _videos(str(root / "videos"))
  cfg = video_pretrain.get_config("debug")
  cfg.source.video_dir = str(root / "videos")
  cfg.convert.update(fps=float(FPS), chunk_frames=CHUNK)
  pipeline.run(str(root / "work"), cfg, "convert")
  return root, cfg


def _labelling(path):
  return chunks.read_meta(path).get("action_labeling")


def test_a_recording_labels_its_videos_chunks_and_idm_train_takes_them(converted):
  root, cfg = converted
  chunk_dir = str(root / "work" / "chunks")
  truth = _recording(str(root / "videos" / "play_a.npz"))
  spec = config_lib.action_spec(cfg)
  labelled = recorded_actions.label_chunks([chunk_dir], str(root / "videos" / "play_a.npz"),
                                           spec, compression="none")
  names = sorted(os.path.basename(p) for p in chunks.list_chunks(chunk_dir))
  assert len(names) == 4 and sorted(map(os.path.basename, labelled)) == [
      n for n in names if n.startswith("demo_play_a_")]
  for k, path in enumerate(sorted(labelled)):
    arrays = chunks.read_chunk(path)
    assert chunks.read_meta(path)["action_labeling"] == "human"
    for j in range(CHUNK):  # output frame j of chunk k is video frame (= step) 10k + j
      step = CHUNK * k + j
      move = np.clip(truth["actions_continuous"][step], -1, 1)
      move = move / max(1.0, float(np.sqrt((move ** 2).sum())))
      card = np.zeros(4, np.float32)
      card[truth["actions_discrete"][step, 0]] = 1
      np.testing.assert_allclose(arrays["actions"][j], np.concatenate([move, card]), atol=1e-6)
      assert arrays["actions_valid"][j].tolist() == [not truth["menu_open"][step], True]
  assert all(_labelling(p) == "none" for p in chunks.list_chunks(chunk_dir)
             if "play_b" in p)
  # Actions without per-step rewards label chunks; they are not ground truth for `eval`.
  assert workspace.truth_for_chunk(chunks.read_chunk(labelled[0]), labelled[0]) is None
  info = pipeline.run(str(root / "work"), cfg, "idm_train")["idm_train"]
  assert info["chunks"] == 2 and info["frames"] == 2 * CHUNK


def test_a_recording_s_rewards_become_its_chunks_game_rewards(converted):
  root, cfg = converted
  path = str(root / "videos" / "play_a.npz")
  _recording(path, rewards=np.arange(FRAMES, dtype=np.float32) / 10)
  labelled = recorded_actions.label_chunks([str(root / "work" / "chunks")], path,
                                           config_lib.action_spec(cfg), compression="none")
  for k, chunk in enumerate(sorted(labelled)):  # chunk k shows steps 10k … 10k + 9
    np.testing.assert_allclose(chunks.read_chunk(chunk)["game_rewards"],
                               (CHUNK * k + np.arange(CHUNK)) / 10)


@pytest.mark.parametrize("fields, message", [
    ({"steps": FRAMES - 1}, "19 steps, but {video} has 20 frames (the manifest"),
    ({"steps": FRAMES + 3}, "23 steps, but {video} has 20 frames (the manifest"),
    ({"fps": np.int32(25)}, "recorded at 25 fps, but the video of {chunk} runs at 10 fps"),
    ({"actions_discrete": None}, "missing ['actions_discrete']; a recording needs"),
    ({"actions_discrete": np.full((FRAMES, 1), 4, np.int32)},
     "actions_discrete[:, 0] holds 4...4; branch 0 has choices 0..3"),
    ({"rewards": np.zeros(FRAMES, np.int32)}, "rewards: expected float [20], got int32[20]"),
    ({"rewards": np.where(np.arange(FRAMES) == 3, np.nan, 0).astype(np.float32)},
     "rewards: 1 non-finite values; expected the game's finite reward"),
])
def test_a_mismatched_recording_is_refused_naming_the_file_and_nothing_is_written(
    converted, tmp_path, fields, message):
  root, cfg = converted
  chunk_dir = root / "work" / "chunks"
  play_b = sorted(str(p) for p in chunk_dir.glob("demo_play_b_*.npz"))
  path = str(root / "videos" / "play_b.npz")
  _recording(path, fields.pop("steps", FRAMES), **fields)
  with pytest.raises(chunks.ChunkError) as error:
    recorded_actions.label_chunks(play_b, path, config_lib.action_spec(cfg))
  video = str(root / "videos" / "play_b.mp4")
  assert str(error.value).startswith(path)
  assert message.format(chunk=play_b[0], video=video) in str(error.value)
  assert [_labelling(p) for p in play_b] == ["none", "none"]


def test_steps_for_a_resampled_chunk_and_the_recordings_it_refuses():
  """A 30 fps video cut at 10 fps: output frame j shows video frame 3j; without a manifest,
  the video's last chunk bounds the recording at 12 steps (its last frame covers 9..11)."""
  meta = {"source_fps": 30.0, "fps": 10.0, "start_frame": 0, "timeline_start_s": 0.0,
          "last_chunk": True}
  for steps in (10, 11, 12):
    assert recorded_actions.steps_for_chunk(meta, 4, steps, 30.0, "c", "r").tolist() == [
        0, 3, 6, 9]
  with pytest.raises(chunks.ChunkError, match="^r: 9 steps, but c shows video frames up to 9"):
    recorded_actions.steps_for_chunk(meta, 4, 9, None, "c", "r")
  with pytest.raises(chunks.ChunkError, match="^r: 13 steps, but the video of c ends after "
                     "frame 11"):
    recorded_actions.steps_for_chunk(meta, 4, 13, None, "c", "r")
  # Not the video's last chunk: a longer recording is the rest of the video.
  assert recorded_actions.steps_for_chunk({**meta, "last_chunk": False}, 4, 40, None, "c",
                                          "r")[-1] == 9


def test_a_chunk_of_another_video_is_refused(converted):
  root, cfg = converted
  play_b = sorted(str(p) for p in (root / "work" / "chunks").glob("demo_play_b_*.npz"))
  _recording(str(root / "videos" / "play_a.npz"))  # whichever test runs first
  with pytest.raises(chunks.ChunkError, match="expected a chunk of the recording's video"):
    recorded_actions.label_chunks(play_b[:1], str(root / "videos" / "play_a.npz"),
                                  config_lib.action_spec(cfg))


def test_a_missing_checkpoint_fails_before_recording_naming_the_field(tmp_path):
  cfg = video_pretrain.get_config("arena")
  cfg.ground_truth.checkpoint = str(tmp_path / "no_run")
  with pytest.raises(train_config.ConfigError,
                     match=r"^ground_truth.checkpoint: .*no_run/config.json .*make train"):
    pipeline.run(str(tmp_path / "work"), cfg, "all")
  assert not (tmp_path / "work" / "videos").exists()


def test_relative_paths_resolve_against_the_base_and_are_checked(tmp_path):
  cfg = video_pretrain.get_config("arena")  # checkpoint runs/arena_ppo, relative
  (tmp_path / "runs" / "arena_ppo").mkdir(parents=True)
  (tmp_path / "runs" / "arena_ppo" / "config.json").write_text("{}")
  resolved = config_lib.resolve_paths(cfg, ["ground_truth"], base=str(tmp_path))
  assert resolved.ground_truth.checkpoint == str(tmp_path / "runs" / "arena_ppo")
  assert cfg.ground_truth.checkpoint == "runs/arena_ppo"  # the caller's config is kept
  # Not recording (the videos are there): the checkpoint is not read, so not required.
  config_lib.resolve_paths(cfg, ["convert", "idm_train"], base=str(tmp_path / "elsewhere"))
  with pytest.raises(train_config.ConfigError, match=r"^ground_truth.checkpoint: "):
    config_lib.resolve_paths(cfg, ["eval"], base=str(tmp_path / "elsewhere"))
  cfg.source.video_dir = "my_videos"
  with pytest.raises(train_config.ConfigError,
                     match=rf"^source.video_dir: {tmp_path}/my_videos \(relative paths"):
    config_lib.resolve_paths(cfg, ["convert"], base=str(tmp_path))
