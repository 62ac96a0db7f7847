"""Every config file builds its default and its `:debug` variant and refuses an unknown
variant naming the file and the valid ones; `configs.load_config` reads a config named as
on the command line the way `config_flags.DEFINE_config_file` does. No compiles."""
import importlib
import pkgutil

import ml_collections
import pytest
from ml_collections.config_flags import config_flags

import configs
from configs import load_config

NAMES = sorted(m.name for m in pkgutil.iter_modules(configs.__path__))


def test_every_config_file_is_listed():
  assert len(NAMES) >= 9 and {"arena_ppo", "dual_system", "video_pretrain"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_default_and_debug_variants(name):
  module = importlib.import_module(f"configs.{name}")
  default, debug = module.get_config(), module.get_config("debug")
  assert isinstance(default, ml_collections.ConfigDict)
  assert isinstance(debug, ml_collections.ConfigDict)
  assert debug.to_dict() != default.to_dict()  # the variant changes something


@pytest.mark.parametrize("name", NAMES)
def test_unknown_variant_names_the_file_and_the_valid_variants(name):
  module = importlib.import_module(f"configs.{name}")
  with pytest.raises(ValueError) as error:
    module.get_config("no_such_variant")
  message = str(error.value)
  assert f"configs/{name}.py" in message and "no_such_variant" in message
  assert "'debug'" in message


@pytest.fixture
def at_repo_root(pytestconfig, monkeypatch):
  monkeypatch.chdir(pytestconfig.rootpath)


def test_load_config_reads_a_package_file_as_its_module(at_repo_root):
  from configs import arena_ppo

  assert load_config("configs/arena_ppo.py:debug").to_dict() == (
      arena_ppo.get_config("debug").to_dict())
  assert load_config("configs/arena_ppo.py").num_envs == 64
  with pytest.raises(ValueError, match=r"configs/arena_ppo\.py: unknown variant 'fast'"):
    load_config("configs/arena_ppo.py:fast")


def test_load_config_splits_the_variant_as_the_flag_does(tmp_path):
  path = tmp_path / "echo.py"
  path.write_text("import ml_collections\n\n\ndef get_config(arg=None):\n"
                  "  return ml_collections.ConfigDict({'arg': arg})\n")
  flag_parser = config_flags.ConfigFileFlagParser("config", lock_config=False)
  for spec, arg in ((f"{path}", None), (f"{path}:a,b", "a,b"), (f"{path}:", ""),
                    (f"{path}:x:y", "x:y")):
    assert load_config(spec).arg == arg
    assert flag_parser.parse(spec).arg == arg


def test_load_config_errors_name_the_spec(tmp_path):
  with pytest.raises(FileNotFoundError, match="no file 'nowhere/x.py'"):
    load_config("nowhere/x.py:debug")
  with pytest.raises(ValueError, match="expected 'path/to/file.py'"):
    load_config("configs.arena_ppo")
  empty = tmp_path / "empty.py"
  empty.write_text("VALUE = 1\n")
  with pytest.raises(ValueError, match="defines no get_config"):
    load_config(str(empty))
