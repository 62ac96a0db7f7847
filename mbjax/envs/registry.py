"""Name → environment factory, so configs can say `env.name = "bonk_arena"`."""
from __future__ import annotations

from typing import Any, Callable

from mbjax.envs.base import Environment


def _gymnax(name: str) -> Callable[..., tuple[Environment, Any]]:
  def factory(**kwargs):
    from mbjax.envs.gymnax_adapter import GymnaxEnv

    env = GymnaxEnv.from_name(name, **kwargs)
    return env, env.default_params()

  return factory


def _bonk_arena(**kwargs):
  from mbjax.envs.bonk_arena import BonkArena

  env = BonkArena(**kwargs)
  return env, env.default_params()


def _bonk_arena_directives(**kwargs):
  from mbjax.envs.bonk_arena.directives import DirectiveArena

  env = DirectiveArena(**kwargs)
  return env, env.default_params()


def _remember_cue(**kwargs):
  from mbjax.envs.memory import RememberCue

  env = RememberCue(**kwargs)
  return env, env.default_params()


_FACTORIES: dict[str, Callable[..., tuple[Environment, Any]]] = {
    "CartPole-v1": _gymnax("CartPole-v1"),
    "Acrobot-v1": _gymnax("Acrobot-v1"),
    "Pendulum-v1": _gymnax("Pendulum-v1"),
    "MountainCarContinuous-v0": _gymnax("MountainCarContinuous-v0"),
    "bonk_arena": _bonk_arena,
    "bonk_arena_directives": _bonk_arena_directives,
    "remember_cue": _remember_cue,
}


def _bonk_arena_rules() -> str:
  from mbjax.envs.bonk_arena import game

  return str(game.RULES_VERSION)


# Environments whose rules have a version (returns under other versions are not comparable):
# name → the version this code implements. Others have version "".
_VERSIONS: dict[str, Callable[[], str]] = {
    "bonk_arena": _bonk_arena_rules,
    "bonk_arena_directives": _bonk_arena_rules,
}


def names() -> tuple[str, ...]:
  return tuple(sorted(_FACTORIES))


def version(name: str) -> str:
  """The rules version this code implements for env `name` ("" when it has none)."""
  return _VERSIONS[name]() if name in _VERSIONS else ""


def make(name: str, **kwargs) -> tuple[Environment, Any]:
  """Returns `(env, default_params)` for a registered environment name."""
  if name not in _FACTORIES:
    raise ValueError(f"unknown environment {name!r}; expected one of {names()}")
  return _FACTORIES[name](**kwargs)
