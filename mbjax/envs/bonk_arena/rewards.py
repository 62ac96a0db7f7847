"""BonkArena reward terms, the upstream curriculum weights and the role re-weightings.

The environment computes a raw per-term vector every step (`info["reward_terms"]`, f32[7]
in the order of `REWARD_TERMS`) and returns `reward = dot(params.reward_weights, terms)`.
Keeping the raw terms in `info` lets a learner re-weight a recorded trajectory for another
role without re-simulating it.

| idx | term        | raw value per step                                  | upstream weight |
|-----|-------------|-----------------------------------------------------|-----------------|
| 0   | `survival`  | 1 on every unpaused step the player is alive         | 0.001           |
| 1   | `xp`        | XP collected from gems this step                     | 0.1             |
| 2   | `level_up`  | 1 if a level-up happened this step                   | 1.0             |
| 3   | `boss`      | number of bosses killed this step                    | 5.0             |
| 4   | `velocity`  | player speed as a fraction of its move speed, [0, 1] | 1e-4            |
| 5   | `damage`    | health lost to enemy contact this step (>= 0)        | -1.0            |
| 6   | `wall`      | 1 if the move was clamped by a wall this step        | -0.05           |
| 7   | `menu`      | 1 on a menu step (the level-up menu is open)         | -0.05 (ours)    |

A menu step pauses the game: its only term is `menu`. Upstream has no menu term; ours makes
holding the menu open cost something. Since the time limit counts game ticks (not menu
steps) and a card is forced after `EnvParams.menu_dwell_limit` menu steps (`game.py`),
idling in the menu only delays the game and pays 0.05 a step: it is never better than
choosing a card, which costs one menu step (0.05) per level-up.

Roles are named re-weightings of the same seven terms (multipliers of the upstream weight):

| role         | survival | xp  | level_up | boss | velocity | damage | wall | menu | intent                  |
|--------------|----------|-----|----------|------|----------|--------|------|------|-------------------------|
| balanced     | 1        | 1   | 1        | 1    | 1        | 1      | 1    | 1    | upstream curriculum     |
| scout        | 1        | 1.5 | 1        | 1    | 20       | 0.5    | 2    | 1    | roam, sweep up gems     |
| speedrunner  | 0        | 2   | 2        | 2    | 10       | 0.5    | 1    | 1    | level fast, ignore time |
| killer       | 0.5      | 2   | 1        | 3    | 0        | 0.5    | 1    | 1    | kills (xp) and bosses   |
| tank         | 10       | 0.5 | 0.5      | 1    | 0        | 3      | 1    | 1    | stay alive, avoid hits  |

Every role keeps the menu cost: a role that did not pay it could idle in the menu for free.
"""
from __future__ import annotations

import numpy as np

REWARD_TERMS: tuple[str, ...] = (
    "survival", "xp", "level_up", "boss", "velocity", "damage", "wall", "menu")
NUM_REWARD_TERMS = len(REWARD_TERMS)
MENU = REWARD_TERMS.index("menu")

# Upstream's curriculum weights for its seven terms, and ours for the menu term.
UPSTREAM_WEIGHTS: tuple[float, ...] = (0.001, 0.1, 1.0, 5.0, 1e-4, -1.0, -0.05, -0.05)

# Multipliers of `UPSTREAM_WEIGHTS`, one row per role, columns in `REWARD_TERMS` order.
ROLE_MULTIPLIERS: dict[str, tuple[float, ...]] = {
    "balanced": (1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0),
    "scout": (1.0, 1.5, 1.0, 1.0, 20.0, 0.5, 2.0, 1.0),
    "speedrunner": (0.0, 2.0, 2.0, 2.0, 10.0, 0.5, 1.0, 1.0),
    "killer": (0.5, 2.0, 1.0, 3.0, 0.0, 0.5, 1.0, 1.0),
    "tank": (10.0, 0.5, 0.5, 1.0, 0.0, 3.0, 1.0, 1.0),
}
ROLES: tuple[str, ...] = tuple(ROLE_MULTIPLIERS)


def role_weights(role: str) -> tuple[float, ...]:
  """The absolute reward weights of a role (case-insensitive name)."""
  key = role.lower()
  if key not in ROLE_MULTIPLIERS:
    raise ValueError(f"unknown role {role!r}; expected one of {ROLES}")
  return tuple(float(w) for w in np.asarray(UPSTREAM_WEIGHTS) * np.asarray(ROLE_MULTIPLIERS[key]))
