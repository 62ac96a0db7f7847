"""Experiment configs: one module per experiment, each with `get_config(arg=None)`, its variants
chosen by `arg` (`configs/arena_ppo.py:debug`), and a docstring with its command and result.

Code imports a config as a module (`from configs import arena_ppo`); a config named by a
string, as on a binary's command line, is read with `load_config`. Both need the repository
root on `sys.path`, as `python -m experiments.<name>` and the tests have it.
"""
import importlib
import importlib.util
import os

import ml_collections

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def load_config(spec: str) -> ml_collections.ConfigDict:
  """`get_config(variant)` of a config file named as `config_flags.DEFINE_config_file` names
  it: "path/to/file.py" or "path/to/file.py:variant" (everything after the first colon).

  A file of this package is imported as `configs.<name>`, the module the other configs and
  the tests import; any other file is loaded from its path, as the flag loads it.
  """
  path, colon, variant = spec.partition(":")
  args = (variant,) if colon else ()
  if not path.endswith(".py"):
    raise ValueError(f"config {spec!r}: expected 'path/to/file.py' or 'path/to/file.py:variant'")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config {spec!r}: no file {path!r} (relative paths are taken from "
                            f"{os.getcwd()})")
  directory, name = os.path.split(os.path.abspath(path))
  stem = name[:-len(".py")]
  if directory == _PACKAGE_DIR:
    module = importlib.import_module(f"{__name__}.{stem}")
  else:
    loader_spec = importlib.util.spec_from_file_location(f"config_file_{stem}", path)
    module = importlib.util.module_from_spec(loader_spec)
    loader_spec.loader.exec_module(module)
  if not callable(getattr(module, "get_config", None)):
    raise ValueError(f"config {spec!r}: {path} defines no get_config(arg=None)")
  return module.get_config(*args)
