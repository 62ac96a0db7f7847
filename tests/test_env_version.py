"""Env rules versions: recorded in the resolved config, refused when a checkpoint, a run's
config or a recorded dataset comes from other rules."""
import jax.numpy as jnp
import ml_collections
import pytest

from mbjax.envs import registry
from mbjax.envs.bonk_arena import game
from mbjax.offline import ground_truth
from mbjax.train import checkpoint as checkpoint_lib
from mbjax.train import config as config_lib


def _arena_config():
  cfg = config_lib.base_config()
  cfg.env.name = "bonk_arena"
  return cfg


def test_the_resolved_config_records_the_env_rules_version():
  cfg = _arena_config()
  assert cfg.to_dict()["env"]["version"] == str(game.RULES_VERSION) == "2"
  assert registry.version("bonk_arena_directives") == "2"
  assert config_lib.base_config().to_dict()["env"]["version"] == ""  # CartPole: unversioned
  config_lib.validate(cfg)


def test_a_config_asking_for_other_rules_is_refused_naming_the_key():
  cfg = _arena_config()
  cfg.env.version = "1"
  with pytest.raises(ValueError, match=r"env.version='1'.*implements rules version '2'"):
    config_lib.validate(cfg)
  # A run's config.json from before versions were recorded counts as version 1.
  with pytest.raises(ValueError, match=r"runs/old/config.json: env.version='1'"):
    config_lib.check_env_version({"env": {"name": "bonk_arena"}}, "runs/old/config.json")
  config_lib.check_env_version({"env": {"name": "CartPole-v1"}})  # unversioned: accepted


def test_a_checkpoint_trained_under_other_rules_is_refused(tmp_path):
  old = _arena_config().to_dict()
  del old["env"]["version"]  # written before rules were versioned
  state = {"w": jnp.arange(3.0)}
  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), keep=1)
  checkpointer.save(1, state, ml_collections.ConfigDict(old))
  checkpointer.wait()
  with pytest.raises(checkpoint_lib.IncompatibleCheckpointError,
                     match=r"checkpoint .*/1: env.version='1'"):
    checkpointer.restore(1, state, _arena_config())
  checkpointer.close()


def test_a_dataset_recorded_under_other_rules_or_drawing_is_refused():
  current = {"0000_random": {"source": "bonk_arena", "rules_version": game.RULES_VERSION,
                             "death_screen": True},
             "atari_pong_0": {"source": "atari"}}
  ground_truth.check_rules_version(current, "videos/dataset.json")
  old = dict(current, **{"0001_scripted": {"source": "bonk_arena", "death_screen": True}})
  with pytest.raises(ValueError, match=r"1 episode\(s\) \(e.g. '0001_scripted'\).*version 1"):
    ground_truth.check_rules_version(old, "videos/dataset.json")
  undrawn = dict(current, **{"0002_scripted": {"source": "bonk_arena",
                                               "rules_version": game.RULES_VERSION}})
  with pytest.raises(ValueError, match=r"'0002_scripted'.*before .* death screen"):
    ground_truth.check_rules_version(undrawn, "videos/dataset.json")
