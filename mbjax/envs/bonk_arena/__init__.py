"""BonkArena: a pure-JAX, survivors-like stand-in for MegaBonk (see DESIGN.md).

Modules: `game` (state, params, mechanics), `observation` (vector obs), `render` (pixels),
`rewards` (terms, upstream weights, roles), `policies` (scripted and random baselines),
`env` (the `Environment` API). Game rules are in `game`'s docstring.

Actions: `HybridAction(continuous=f32[2], discrete=i32[1])`. The continuous dims are the
move direction (x right, y down) in [-1, 1], scaled by the move speed (norm clipped to 1).
The one discrete branch is the level-up menu: 0, 1, 2 choose a card, 3 is the no-op. The
mask (`action_mask`) allows the cards only while the menu is open; the no-op always. An
upstream-style 33-way UI-click branch maps onto it with `menu_choice_from_ui_click`: clicks
0, 1, 2 are the three cards (left to right), 3..31 click empty screen and 32 is "no click",
all of which are the no-op; `ui_click_mask` gives the matching 33-way mask.

Vector observation (f32, defaults num_obs_enemies K_e=5 and num_obs_gems K_g=3 → 96 floats;
`BonkArena.vector_layout` has the slices for any K):

| index    | block          | contents                                                      |
|----------|----------------|---------------------------------------------------------------|
| 0:2      | player_pos     | position / arena_size * 2 - 1, in [-1, 1]                     |
| 2:4      | player_vel     | last displacement / move speed                                |
| 4        | health_frac    | health / max health                                           |
| 5        | max_health     | max health / base max health                                  |
| 6        | xp_frac        | XP / XP needed for the next level                             |
| 7        | level          | level / 10                                                    |
| 8        | attack_timer   | ticks to the next auto-attack / cooldown                      |
| 9:16     | upgrades       | cards taken per kind (`game.CARDS` order) / 5                 |
| 16:56    | enemies        | K_e nearest enemies, nearest first, 8 each: present, dx, dy,  |
|          |                | dist (relative to the player, / arena_size), health fraction, |
|          |                | is_fast, is_tough, is_boss; absent slots are all zeros        |
| 56:59    | enemy_summary  | alive enemies / max_enemies, tanh(sum of unit directions to   |
|          |                | every enemy / (1 + distance)) (x, y)                          |
| 59:71    | gems           | K_g nearest gems, 4 each: present, dx, dy, dist               |
| 71       | menu_open      | 1 while the level-up menu is open                             |
| 72:93    | menu_cards     | 3 x one-hot(7) of the offered cards (zeros when closed)       |
| 93:96    | time           | game_time / time_limit, consecutive menu steps /              |
|          |                | menu_dwell_limit, fraction of the boss interval left until    |
|          |                | the next boss                                                 |

Pixel observation: uint8[S, S, 3] from `render.Renderer` (layout in `render.py`).

Reward: `dot(params.reward_weights, info["reward_terms"])`; term order, upstream weights and
the role table (Scout, Speedrunner, Killer, Tank) in `rewards.py`; `params.for_role(name)`.
"""
from mbjax.envs.bonk_arena.env import (BonkArena, menu_choice_from_ui_click,
                                       ui_click_from_menu_choice, ui_click_mask)
from mbjax.envs.bonk_arena.game import CARDS, EnvParams, EnvState
from mbjax.envs.bonk_arena.policies import (idle_menu_policy, make_scripted_policy, random_policy,
                                            scripted_policy)
from mbjax.envs.bonk_arena.rewards import REWARD_TERMS, ROLES, role_weights

__all__ = [
    "BonkArena", "EnvParams", "EnvState", "CARDS", "REWARD_TERMS", "ROLES", "role_weights",
    "idle_menu_policy", "make_scripted_policy", "random_policy", "scripted_policy", "menu_choice_from_ui_click",
    "ui_click_from_menu_choice", "ui_click_mask",
]
