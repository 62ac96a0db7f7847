"""The edge the experiments/ binaries share: a user's mistake ends the program in one line.

`cli.run(main)` stands in for `absl.app.run(main)`. What a person can fix — an unknown
config override (`--config.ppo.lrr`: the message names the full path and the closest key,
`config.ppo.lr`), a value the config schema refuses (`ConfigError`), a workdir without a
run or a checkpoint, an unreadable or incompatible checkpoint (`CheckpointError`), an
`app.UsageError` — is printed as `error: <message>` on stderr with exit status 1, instead of
a traceback or absl's page of flag help. So is a training run that stopped early for a
reason the operator acts on (`RunStopped`: a busy workdir, non-finite updates, Ctrl-C), with
the exit status it carries (130 for Ctrl-C). Anything else still raises with its traceback.
"""
from __future__ import annotations

import re
import sys
from typing import Callable

from absl import app, flags
from ml_collections import config_dict
from ml_collections.config_flags import config_flags

EXIT_USER_ERROR = 1  # as absl's flag errors
# Exception types that are a user's to fix, by module; looked up only in modules already
# imported (none of them can have raised otherwise), so a binary that needs no JAX loads none.
_USER_ERRORS = {"mbjax.train.config": "ConfigError", "mbjax.train.checkpoint": "CheckpointError",
                "mbjax.train.loop": "RunStopped"}

_OVERRIDE = re.compile(r"^--?([A-Za-z_]\w*)\.([\w.]+)(?:=|$)")


def run(main: Callable[[list[str]], None]) -> None:
  """`app.run(main)`, with user errors reported in one line (see the module docstring)."""
  app.run(reporting_user_errors(main), flags_parser=parse_flags)


def reporting_user_errors(main: Callable[[list[str]], None]) -> Callable[[list[str]], None]:
  def main_reporting(argv):
    try:
      return main(argv)
    except Exception as e:
      if not isinstance(e, user_errors()):
        raise
      fail(str(e), getattr(e, "exit_code", EXIT_USER_ERROR))
  return main_reporting


def user_errors() -> tuple[type[Exception], ...]:
  return (app.UsageError, *(getattr(sys.modules[module], name)
                            for module, name in _USER_ERRORS.items() if module in sys.modules))


def fail(message: str, exit_code: int = EXIT_USER_ERROR) -> None:
  sys.stderr.write(f"error: {message}\n")
  sys.exit(exit_code)


def parse_flags(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
  """Parses `argv` into `flag_values` as absl does; an override of a config key that does
  not exist ends the program naming it and the closest key."""
  try:
    return flag_values(argv)
  except flags.Error as e:
    fail(f"flag parsing error: {e}")
  except (AttributeError, KeyError) as e:  # ml_collections' error for an unknown key
    message = unknown_override(argv, flag_values)
    if message is None:
      raise e
    fail(message)


def unknown_override(argv: list[str], flag_values: flags.FlagValues) -> str | None:
  """The message for the first `--<config flag>.<path>=...` in `argv` whose path is not a
  key of the config, or None when every override names a key."""
  for arg in argv[1:]:
    match = _OVERRIDE.match(arg)
    if not match or match.group(1) not in flag_values:
      continue
    name, path = match.groups()
    parser = flag_values[name].parser
    if not isinstance(parser, config_flags.ConfigFileFlagParser):
      continue
    argument = _config_argument(argv, name)
    if argument is None:  # not on the command line: the default (a path or a loaded config)
      argument = flag_values[name].default
    config = parser.parse(argument) if isinstance(argument, str) else argument
    if not isinstance(config, config_dict.ConfigDict):
      continue
    missing = _first_missing(config, path.split("."))
    if missing is None:
      continue
    from mbjax.train import config as config_lib

    message = f"--{name}.{path}: the config has no key {path}"
    suggestion = config_lib.closest_key(path, config_lib.flatten(config))
    if suggestion:
      return f"{message}; did you mean --{name}.{suggestion}?"
    prefix, part, siblings = missing
    sibling = config_lib.closest_key(part, siblings)
    return message + (f" ({prefix}{part} is not a key; closest: {prefix}{sibling})"
                      if sibling else "")
  return None


def _config_argument(argv: list[str], name: str) -> str | None:
  for i, arg in enumerate(argv[1:], 1):
    if re.match(rf"^--?{re.escape(name)}=", arg):
      return arg.split("=", 1)[1]
    if re.match(rf"^--?{re.escape(name)}$", arg) and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _first_missing(config, parts: list[str]) -> tuple[str, str, list[str]] | None:
  """(dotted prefix, the first part of `parts` the config lacks, the keys it has there), or
  None when the whole path exists."""
  for i, part in enumerate(parts):
    keys = list(config.keys()) if isinstance(config, (config_dict.ConfigDict, dict)) else []
    if part not in keys:
      return "".join(f"{p}." for p in parts[:i]), part, keys
    config = config[part]
  return None
