"""Checkpointer failures are loud and recoverable: a declined save raises, an unreadable
latest checkpoint gives way to the newest one that restores (named in a warning, moved aside
for a run that saves again), a config mismatch is not mistaken for damage. Small pytrees,
no training."""
import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import logging as absl_logging

from mbjax.train import checkpoint as checkpoint_lib
from mbjax.train import config as config_lib

LIKE = {"w": jax.ShapeDtypeStruct((2, 3), jnp.float32),
        "step": jax.ShapeDtypeStruct((), jnp.int32)}


def state_at(step: int) -> dict:
  return {"w": jnp.full((2, 3), float(step)), "step": jnp.int32(step)}


def write_steps(workdir, steps, cfg=None):
  cfg = cfg or config_lib.base_config()
  checkpointer = checkpoint_lib.Checkpointer(str(workdir), keep=5)
  for step in steps:
    checkpointer.save(step, state_at(step), cfg)
  checkpointer.close()
  return cfg


def truncate(path):
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[:len(data) // 2])


def garble(path):
  with open(path, "rb") as f:
    data = bytearray(f.read())
  data[::7] = bytes(b ^ 0x5A for b in data[::7])
  with open(path, "wb") as f:
    f.write(bytes(data))


CORRUPTIONS = {
    "truncated state/_METADATA": lambda d: truncate(f"{d}/state/_METADATA"),
    "truncated config/metadata": lambda d: truncate(f"{d}/config/metadata"),
    "garbled array store": lambda d: [garble(p) for p in glob.glob(f"{d}/state/d/*")],
    "truncated OCDBT manifest": lambda d: truncate(f"{d}/state/manifest.ocdbt"),
}


@pytest.fixture
def warnings_logged(monkeypatch):
  messages = []
  monkeypatch.setattr(absl_logging, "warning",
                      lambda msg, *args: messages.append(msg % args))
  return messages


def test_a_declined_save_raises(tmp_path):
  cfg = write_steps(tmp_path, [20])
  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), keep=5)
  for step in (20, 10):  # orbax writes nothing for a step not newer than the latest
    with pytest.raises(checkpoint_lib.CheckpointNotSavedError, match="holds step 20"):
      checkpointer.save(step, state_at(step), cfg)
  checkpointer.close()
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["20"]


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_unreadable_latest_falls_back_to_the_newest_readable(tmp_path, corruption,
                                                             warnings_logged):
  cfg = write_steps(tmp_path, [10, 20, 30])
  CORRUPTIONS[corruption](tmp_path / "checkpoints" / "30")
  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), keep=5)
  step, state = checkpointer.restore_latest(LIKE, cfg)
  assert step == 20
  np.testing.assert_array_equal(state["w"], np.full((2, 3), 20.0))
  assert int(state["step"]) == 20
  assert any(f"{tmp_path}/checkpoints/30 is unreadable" in m for m in warnings_logged)
  # Read-only use leaves the directory as it was.
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["10", "20", "30"]
  checkpointer.close()


def test_a_resuming_run_sets_the_unreadable_aside_and_saves_its_steps_again(tmp_path):
  cfg = write_steps(tmp_path, [10, 20, 30])
  truncate(tmp_path / "checkpoints" / "30" / "state" / "_METADATA")
  truncate(tmp_path / "checkpoints" / "20" / "config" / "metadata")
  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), keep=5)
  step, _ = checkpointer.restore_latest(LIKE, cfg, set_aside=True)
  assert step == 10 and checkpointer.latest_step() == 10
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["10"]
  assert sorted(os.listdir(tmp_path / checkpoint_lib.UNREADABLE_DIRNAME)) == ["20", "30"]
  checkpointer.save(20, state_at(21), cfg)  # the resumed run writes step 20 again
  checkpointer.close()
  restored = checkpoint_lib.Checkpointer(str(tmp_path), keep=5)
  step, state = restored.restore_latest(LIKE, cfg)
  restored.close()
  assert step == 20 and int(state["step"]) == 21


def test_none_readable_raises_naming_each_and_moves_nothing(tmp_path):
  cfg = write_steps(tmp_path, [10, 20])
  for step in ("10", "20"):
    truncate(tmp_path / "checkpoints" / step / "state" / "_METADATA")
  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), keep=5)
  with pytest.raises(checkpoint_lib.UnreadableCheckpointError,
                     match=r"(?s)restores:\n  20: JSONDecodeError.*\n  10: JSONDecodeError"):
    checkpointer.restore_latest(LIKE, cfg, set_aside=True)
  checkpointer.close()
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["10", "20"]
  assert not (tmp_path / checkpoint_lib.UNREADABLE_DIRNAME).exists()


def test_a_config_mismatch_is_not_taken_for_damage(tmp_path):
  cfg = write_steps(tmp_path, [10, 20])
  other = config_lib.base_config()
  other.ppo.lr = 1e-3
  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), keep=5)
  with pytest.raises(checkpoint_lib.IncompatibleCheckpointError, match="ppo.lr"):
    checkpointer.restore_latest(LIKE, other, set_aside=True)
  assert checkpointer.restore_latest(LIKE, cfg)[0] == 20
  checkpointer.close()
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["10", "20"]


def test_empty_directory_and_missing_run_config(tmp_path):
  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), keep=2)
  assert checkpointer.restore_latest(LIKE, config_lib.base_config()) == (None, None)
  checkpointer.close()
  with pytest.raises(checkpoint_lib.RunNotFoundError, match="config.json not found"):
    checkpoint_lib.read_run_config(str(tmp_path / "nowhere"))
  (tmp_path / "config.json").write_text('{"seed": ')
  with pytest.raises(checkpoint_lib.RunNotFoundError, match="not valid JSON"):
    checkpoint_lib.read_run_config(str(tmp_path))


def test_a_state_of_another_layout_is_incompatible_not_damage(tmp_path):
  """A checkpoint whose pytree differs from the one this code builds (a field added to the
  runner state since it was written) raises the incompatibility, naming the step, and is not
  skipped or set aside as damage."""
  cfg = write_steps(tmp_path, [10])
  grown = {**LIKE, "latent": jax.ShapeDtypeStruct((4,), jnp.float32)}
  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), keep=5)
  with pytest.raises(checkpoint_lib.IncompatibleCheckpointError, match=r"/10 holds a state of "
                     r"another layout"):
    checkpointer.restore_latest(grown, cfg, set_aside=True)
  checkpointer.close()
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["10"]


def test_a_run_config_written_before_a_field_existed_reads_with_its_default(tmp_path):
  """config.json of an older run lacks fields added since (and keeps sections of its own):
  read back, the missing fields hold their base_config() defaults, which keep the earlier
  behaviour."""
  saved = config_lib.base_config().to_dict()
  del saved["served"]["policy"]
  del saved["replay"]
  saved["population"] = {"size": 4}
  (tmp_path / "config.json").write_text(__import__("json").dumps(saved))
  cfg = checkpoint_lib.read_run_config(str(tmp_path))
  assert cfg.served.policy == config_lib.base_config().served.policy
  assert cfg.replay.to_dict() == config_lib.base_config().replay.to_dict()
  assert cfg.population.size == 4
