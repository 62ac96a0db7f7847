"""config.validate: every numeric field has a range, values outside it and unknown keys are
refused with the key named (and the closest key suggested); pure Python, no JAX work."""
import math

import ml_collections
import pytest

from mbjax.train import config as config_lib


def _set(cfg, key, value):
  *sections, name = key.split(".")
  for section in sections:
    cfg = cfg[section]
  cfg[name] = value


@pytest.mark.parametrize("key, value, expected", [
    ("ppo.lr", float("nan"), "a finite number > 0"),
    ("ppo.lr", 0.0, "a finite number > 0"),
    ("ppo.lr", float("inf"), "a finite number > 0"),
    ("ppo.gamma", 0.0, "a finite number in (0, 1]"),
    ("ppo.gamma", 1.01, "a finite number in (0, 1]"),
    ("ppo.gae_lambda", -0.1, "a finite number in [0, 1]"),
    ("ppo.clip_eps", 0.0, "a finite number > 0"),
    ("ppo.ent_coef", -0.01, "a finite number >= 0"),
    ("ppo.vf_coef", float("nan"), "a finite number >= 0"),
    ("ppo.max_grad_norm", 0.0, "a finite number > 0"),
    ("num_envs", 0, "an integer >= 1"),
    ("world_model.unimix", 1.5, "a finite number in [0, 1]"),
    ("world_model.rssm_layers", -1, "an integer >= 0"),
    ("dream.hidden_sizes", (64, 0), "an integer >= 1 (each element)"),
    ("efe.return_scale_decay", 1.0, "a finite number in [0, 1)"),
    ("efe.target_update_rate", 0.0, "a finite number in (0, 1]"),
    ("cpqe.distill_levels", 1, "an integer >= 2"),
    ("run.actor_device", -2, "an integer >= -1"),
    ("bridge.base_port", 70000, "an integer in [0, 65535]"),
    ("bridge.distance_reward", float("-inf"), "a finite number"),
    ("env.reset_fraction", 0.0, "a finite number in (0, 1]"),
])
def test_values_outside_their_range_are_refused(key, value, expected):
  cfg = config_lib.base_config()
  _set(cfg, key, value)
  with pytest.raises(config_lib.ConfigError) as info:
    config_lib.validate(cfg)
  assert str(info.value) == f"config.{key}={value!r}: expected {expected}"


@pytest.mark.parametrize("key, value", [
    ("ppo.gamma", 1.0), ("ppo.gae_lambda", 0.0), ("ppo.gae_lambda", 1.0),
    ("ppo.ent_coef", 0.0), ("bridge.frame_hz", 0.0), ("run.actor_device", -1),
    ("world_model.classes", 0), ("efe.return_scale_decay", 0.0), ("seed", -3),
])
def test_values_on_the_edge_of_their_range_pass(key, value):
  cfg = config_lib.base_config()
  _set(cfg, key, value)
  config_lib.validate(cfg)


def _numeric_fields(cfg) -> list[str]:
  return [key for key, value in config_lib.flatten(cfg).items()
          if not isinstance(value, bool) and (
              isinstance(value, (int, float))
              or (isinstance(value, list) and any(isinstance(v, (int, float)) for v in value)))]


def test_every_numeric_field_has_a_range():
  cfg = config_lib.base_config()
  cfg.world_model.entity_slots = ((16, 5, 8, 3),)  # tuples of numbers when set
  cfg.world_model.agent_position = (0, 2.0)
  missing = [key for key in _numeric_fields(cfg)
             if key not in config_lib.RANGES and key not in config_lib.STRUCTURED_FIELDS]
  assert not missing, f"numeric fields without a range in config.RANGES: {missing}"
  assert set(config_lib.RANGES) <= set(config_lib.flatten(cfg))  # no stale entries


@pytest.mark.parametrize("key", sorted(config_lib.RANGES))
def test_every_range_is_enforced(key):
  """Below the lower bound (or NaN where there is none) is refused, for every field."""
  rule = config_lib.RANGES[key]
  if rule.low is None:
    bad = float("nan")
  elif rule.integer:
    bad = int(rule.low) - 1
  else:
    bad = rule.low if rule.low_open else rule.low - 1.0
  cfg = config_lib.base_config()
  value = config_lib.flatten(cfg)[key]
  if isinstance(value, list):
    bad = tuple(value[:-1]) + (bad,) if value else (bad,)
  elif rule.integer and isinstance(bad, float):  # NaN cannot go into an int field
    return
  _set(cfg, key, bad)
  with pytest.raises(config_lib.ConfigError, match=f"^config.{key}="):
    config_lib.validate(cfg)


def test_base_config_and_debug_configs_pass():
  config_lib.validate(config_lib.base_config())
  assert not math.isnan(config_lib.base_config().ppo.lr)


@pytest.mark.parametrize("key, value, message", [
    ("ppo.lrr", 1e-3, "config.ppo.lrr: unknown key; did you mean config.ppo.lr?"),
    ("num_env", 8, "config.num_env: unknown key; did you mean config.num_envs?"),
    ("world_model.zzz", 1, "config.world_model.zzz: unknown key; expected one of the keys"),
])
def test_unknown_keys_are_refused_with_the_closest_key(key, value, message):
  cfg = config_lib.base_config()
  _set(cfg, key, value)
  with pytest.raises(config_lib.ConfigError, match=message.replace(".", r"\.")):
    config_lib.validate(cfg)


def test_extension_sections_and_env_kwargs_are_free():
  cfg = config_lib.base_config()
  cfg.population = ml_collections.ConfigDict({"roles": ("scout",), "members_per_role": 2})
  cfg.env.kwargs.observation = "vector"
  config_lib.validate(cfg)


def test_cross_field_rules_name_both_keys():
  cfg = config_lib.base_config()
  cfg.cpqe.sigma_min = 100.0
  with pytest.raises(config_lib.ConfigError, match="cpqe.sigma_min=100.0 must be below "
                                                   r"config\.cpqe\.sigma_max=80\.0"):
    config_lib.validate(cfg)
