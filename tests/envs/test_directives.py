"""Directive-following BonkArena: features, rewards and outcomes by hand-built states,
directive sampling, the blind variant, and the success counter under an oracle policy.

Every step test goes through one module-level jitted `step` (params are an argument), so
the file compiles the env step once.
"""
import jax
import jax.numpy as jnp
import numpy as np

from mbjax.envs.bonk_arena import directives as D
from mbjax.envs.bonk_arena import game
from mbjax.envs.spaces import HybridAction

ENV = D.DirectiveArena()
PARAMS = ENV.default_params()
STEP = jax.jit(ENV.step)
KEY = jax.random.PRNGKey(0)
C = PARAMS.game.arena_size / 2  # 12.0


def act(move=(0.0, 0.0), choice=3):
  return HybridAction(jnp.asarray(move, jnp.float32), jnp.asarray([choice], jnp.int32))


def state_with(directive, target=(0.0, 0.0), has_target=False, card=0, age=0, **game_changes):
  """Reset game, a few ticks in (no wave due), with a given directive."""
  g = game.initial_state(PARAMS.game, ENV.arena.max_enemies, ENV.arena.max_gems)
  g = g.replace(**{"game_time": jnp.int32(7), **game_changes})
  return D.DirectiveState(g, jnp.int32(directive), jnp.asarray(target, jnp.float32),
                          jnp.bool_(has_target), jnp.int32(card), jnp.int32(age),
                          jnp.float32(0.0))


def enemy(g_kwargs, x, y, health=2.0):
  pos = jnp.zeros((2, ENV.arena.max_enemies)).at[:, 0].set(jnp.asarray([x, y]))
  return dict(g_kwargs, enemy_pos=pos,
              enemy_health=jnp.zeros((ENV.arena.max_enemies,)).at[0].set(health),
              enemy_alive=jnp.zeros((ENV.arena.max_enemies,), bool).at[0].set(True))


def test_directive_features_layout():
  block = D.directive_features(jnp.int32(D.GOTO), True, jnp.asarray([14.0, 12.0]), 2,
                               30, jnp.asarray([12.0, 12.0]), 24.0, 120)
  expected = [0, 0, 0, 1, 0,  # one-hot goto
              1, 2 / 24, 0, 2 / 24,  # target present, dx, dy, dist
              0, 0, 0,  # card one-hot only for pick_card
              1 - 30 / 120]
  np.testing.assert_allclose(block, expected, atol=1e-6)
  card = D.directive_features(jnp.int32(D.PICK_CARD), False, jnp.zeros(2), 2, 120,
                              jnp.zeros(2), 24.0, 120)
  np.testing.assert_allclose(card, [0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, 0], atol=1e-6)
  assert D.DIRECTIVE_FEATURES == 13


def test_goto_reached_pays_progress_and_bonus_then_reissues():
  # Target 1.2 to the right; one full-speed step (0.3) gets within the 1.0 radius.
  s = state_with(D.GOTO, (C + 1.2, C), True, age=5, player_pos=jnp.asarray([C, C]))
  obs, new, reward, *_, info = STEP(KEY, s, act((1.0, 0.0)), PARAMS)
  np.testing.assert_allclose(reward, 0.1 * 0.3 / 0.3 + 1.0, atol=1e-5)
  assert int(info["directive"]) == D.GOTO
  assert bool(info["directive_ended"]) and bool(info["directive_success"])
  assert int(new.age) == 0  # a new directive was issued
  assert obs.shape == (96 + 13,)


def test_goto_timeout_fails_without_bonus():
  s = state_with(D.GOTO, (2.0, 2.0), True, age=PARAMS.horizon - 1,
                 player_pos=jnp.asarray([C, C]))
  _, new, reward, *_, info = STEP(KEY, s, act(), PARAMS)
  np.testing.assert_allclose(reward, 0.0, atol=1e-6)
  assert bool(info["directive_ended"]) and not bool(info["directive_success"])
  assert int(new.age) == 0


def test_pick_card_right_and_wrong_slot():
  menu = dict(menu_open=jnp.bool_(True), menu_cards=jnp.asarray([4, 0, 2], jnp.int32))
  s = state_with(D.PICK_CARD, card=1, **menu)
  _, new, reward, *_, info = STEP(KEY, s, act(choice=1), PARAMS)
  np.testing.assert_allclose(reward, 1.0, atol=1e-6)
  assert bool(info["directive_success"]) and int(new.game.upgrades[0]) == 1  # took damage
  _, _, reward, *_, info = STEP(KEY, s, act(choice=2), PARAMS)
  np.testing.assert_allclose(reward, 0.0, atol=1e-6)
  assert bool(info["directive_ended"]) and not bool(info["directive_success"])
  # The no-op keeps the menu open: nothing ends, the directive ages.
  _, new, reward, *_, info = STEP(KEY, s, act(choice=3), PARAMS)
  assert not bool(info["directive_ended"]) and int(new.age) == 1
  assert int(new.directive) == D.PICK_CARD


def test_flee_succeeds_unharmed_at_the_horizon():
  # The enemy is 10 away (beyond the 8.0 cap before and after its step): progress 0.
  s = state_with(D.FLEE, age=PARAMS.horizon - 1, **enemy({}, C + 10.0, C))
  _, _, reward, *_, info = STEP(KEY, s, act(), PARAMS)
  np.testing.assert_allclose(reward, 1.0, atol=1e-6)
  assert bool(info["directive_success"])


def test_flee_progress_is_distance_gained():
  # Enemy 4 away on the right; the player steps 0.3 left, the grunt follows 0.11.
  s = state_with(D.FLEE, player_pos=jnp.asarray([C, C]), **enemy({}, C + 4.0, C))
  _, _, reward, *_, info = STEP(KEY, s, act((-1.0, 0.0)), PARAMS)
  np.testing.assert_allclose(reward, 0.1 * (0.3 - 0.11) / 0.3, atol=1e-5)
  assert not bool(info["directive_ended"])


def test_hunt_kill_is_success():
  # Grunt with 1 health at distance 2 (inside the range 5, not touching): the auto-attack
  # kills it; hunting progress is 0 inside the range.
  s = state_with(D.HUNT, player_pos=jnp.asarray([C, C]), **enemy({}, C + 2.0, C, 1.0))
  _, _, reward, *_, info = STEP(KEY, s, act(), PARAMS)
  np.testing.assert_allclose(reward, 1.0, atol=1e-6)
  assert bool(info["directive_success"])


def test_level_up_interrupts_and_forces_pick_card():
  gem = dict(gem_pos=jnp.zeros((2, ENV.arena.max_gems)).at[:, 0].set(jnp.asarray([C, C])),
             gem_value=jnp.zeros((ENV.arena.max_gems,)).at[0].set(1.0),
             gem_alive=jnp.zeros((ENV.arena.max_gems,), bool).at[0].set(True))
  s = state_with(D.GOTO, (2.0, 2.0), True, player_pos=jnp.asarray([C, C]),
                 xp=jnp.float32(PARAMS.game.xp_base - 0.5), **gem)
  _, new, _, *_, info = STEP(KEY, s, act(), PARAMS)
  assert bool(new.game.menu_open)
  assert not bool(info["directive_ended"])  # interrupted: counted neither way
  assert int(new.directive) == D.PICK_CARD and int(new.age) == 0


def test_sampling_respects_availability():
  g = game.initial_state(PARAMS.game, ENV.arena.max_enemies, ENV.arena.max_gems)
  keys = jax.random.split(KEY, 64)
  sample = jax.jit(jax.vmap(D.sample_directive, in_axes=(0, None, None)))
  directive, target, has_target, _ = sample(keys, g, PARAMS)
  assert set(np.asarray(directive).tolist()) == {D.GOTO}  # no enemy, no gem
  assert bool(jnp.all(has_target))
  lo, hi = PARAMS.goto_margin, PARAMS.game.arena_size - PARAMS.goto_margin
  assert bool(jnp.all((target >= lo) & (target <= hi)))
  directive, *_ = sample(keys, g.replace(menu_open=jnp.bool_(True)), PARAMS)
  assert set(np.asarray(directive).tolist()) == {D.PICK_CARD}
  # Only a gem is added: collect_gem and goto, gem targets on the gem.
  with_gem = g.replace(gem_pos=g.gem_pos.at[:, 3].set(jnp.asarray([5.0, 6.0])),
                       gem_alive=g.gem_alive.at[3].set(True))
  directive, target, _, _ = sample(keys, with_gem, PARAMS)
  d = np.asarray(directive)
  assert set(d.tolist()) == {D.GOTO, D.COLLECT_GEM}
  np.testing.assert_allclose(np.asarray(target)[d == D.COLLECT_GEM], [[5.0, 6.0]] * int(
      (d == D.COLLECT_GEM).sum()))


def test_blind_variant_hides_the_directive():
  blind = D.DirectiveArena(conditioned=False)
  s = state_with(D.GOTO, (C + 6.0, C), True, age=30, player_pos=jnp.asarray([C, C]))
  base = jnp.arange(96, dtype=jnp.float32)
  seen = ENV._observe(base, s, PARAMS)
  hidden = blind._observe(base, s, PARAMS)
  np.testing.assert_array_equal(hidden[:96], base)
  np.testing.assert_array_equal(hidden[96:], np.zeros(13))
  np.testing.assert_allclose(seen[96:], [0, 0, 0, 1, 0, 1, 0.25, 0, 0.25, 0, 0, 0, 0.75],
                             atol=1e-6)
  assert blind.observation_shape() == ENV.observation_shape() == (109,)


def _policy(carry, key, obs, mask, is_first):
  """carry = 1.0: an oracle reading the directive block (walks to the target, takes the
  directed card); carry = 0.0: stands still and takes card 0."""
  del key, is_first
  block = obs[:, 96:]
  move = block[:, 6:8] / (jnp.linalg.norm(block[:, 6:8], axis=-1, keepdims=True) + 1e-6)
  card = jnp.where(carry > 0, jnp.argmax(block[:, 9:12], axis=-1), 0)
  choice = jnp.where(mask[:, 0], card, 3)
  return carry, HybridAction(move * carry, choice[:, None].astype(jnp.int32))


def test_following_rates_counts_an_oracle_above_a_still_policy():
  count = jax.jit(lambda oracle: D.following_rates(ENV, PARAMS, _policy, oracle, KEY, 4, 400))
  oracle, still = count(jnp.float32(1.0)), count(jnp.float32(0.0))
  goto = D.GOTO
  assert int(oracle["ended"][goto]) >= 8
  assert int(oracle["success"][goto]) / int(oracle["ended"][goto]) >= 0.9
  assert int(still["success"][goto]) / max(int(still["ended"][goto]), 1) <= 0.2
  assert bool(jnp.all(oracle["success"] <= oracle["ended"]))
