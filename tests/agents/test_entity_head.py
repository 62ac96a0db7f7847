"""The entity delta head: re-sorting, leaving and arriving by hand, slot-order invariance,
the polar head by hand and against the agent's predicted move, and the validation of its
blocks (in the model and against BonkArena's observation)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mbjax.agents import world_model as wm_lib
from mbjax.agents.world_model import resort_and_shift


@pytest.mark.parametrize("jit", [False, True])
def test_resort_and_shift_hand_computed(jit):
  """Three slots (presence, distance, kind). Batch 0: the first two entities trade places
  and nothing leaves. Batch 1: no re-sort; the nearest leaves with probability 0.25 and
  the second with 0.5, so slot 0 is shifted with probability 0.25, slots 1 and 2 with 0.75;
  the absent third entity's 0.9 counts for nothing."""
  fn = jax.jit(resort_and_shift, static_argnums=3) if jit else resort_and_shift
  entities = jnp.array([[[1.0, 0.4, 7.0], [1.0, 0.3, 8.0], [1.0, 0.5, 9.0]],
                        [[1.0, 0.1, 1.0], [1.0, 0.2, 2.0], [0.0, 0.0, 0.0]]])
  leave = jnp.array([[0.0, 0.0, 0.0], [0.25, 0.5, 0.9]])
  newcomer = jnp.array([[1.0, 0.6, 5.0], [1.0, 0.8, 4.0]])
  out = fn(entities, leave, newcomer, 1)
  np.testing.assert_allclose(out[0], [[1.0, 0.3, 8.0], [1.0, 0.4, 7.0], [1.0, 0.5, 9.0]])
  np.testing.assert_allclose(out[1], [
      [1.0, 0.75 * 0.1 + 0.25 * 0.2, 0.75 * 1.0 + 0.25 * 2.0],
      [0.25, 0.25 * 0.2, 0.25 * 2.0],
      [0.75, 0.75 * 0.8, 0.75 * 4.0]], rtol=1e-6)


@pytest.mark.parametrize("jit", [False, True])
def test_insert_arrival_hand_computed(jit):
  """Slots (presence, distance, kind), the third empty. Batch 0: an arrival at distance
  0.2 with probability 0.5 goes between the two present entities (and pushes the second
  into the empty slot). Batch 1: a full list; an arrival at 0.05 with probability 0.25
  goes first and pushes the last out of view."""
  fn = jax.jit(wm_lib.insert_arrival, static_argnums=3) if jit else wm_lib.insert_arrival
  entities = jnp.array([[[1.0, 0.1, 7.0], [1.0, 0.3, 8.0], [0.0, 0.0, 0.0]],
                        [[1.0, 0.1, 1.0], [1.0, 0.2, 2.0], [1.0, 0.4, 3.0]]])
  arrival = jnp.array([[1.0, 0.2, 5.0], [1.0, 0.05, 4.0]])
  out = fn(entities, jnp.array([0.5, 0.25]), arrival, 1)
  np.testing.assert_allclose(out[0], [[1.0, 0.1, 7.0], [1.0, 0.25, 6.5], [0.5, 0.15, 4.0]])
  np.testing.assert_allclose(out[1], [[1.0, 0.0875, 1.75], [1.0, 0.175, 1.75],
                                      [1.0, 0.35, 2.75]], rtol=1e-6)


@pytest.mark.parametrize("jit", [False, True])
def test_entity_head_ignores_slot_order_and_writes_only_its_block(jit):
  """One MLP serves every slot and the output is re-sorted, so shuffling the input slots
  leaves the output unchanged; dimensions outside the block stay exactly 0; with the
  output layer at its zero initialisation and leaving and arriving made impossible the head
  is exactly copy-last on sorted input (and presence never changes)."""
  head = wm_lib.EntityDeltaHead(((2, 3, 3, 1),), obs_dim=12, width=16, leave_bias=-1e9,
                                arrive_bias=-1e9)
  rng = np.random.default_rng(0)
  context = rng.normal(size=(4, 7)).astype(np.float32)
  action = rng.normal(size=(4, 2)).astype(np.float32)
  obs = rng.normal(size=(4, 12)).astype(np.float32)
  slots = np.stack([np.ones((4, 3)), np.sort(rng.uniform(0, 1, (4, 3)), -1),
                    rng.normal(size=(4, 3))], -1)
  obs[:, 2:11] = slots.reshape(4, 9)
  params = head.init(jax.random.PRNGKey(0), context, obs, action)
  apply = jax.jit(head.apply) if jit else head.apply
  np.testing.assert_array_equal(apply(params, context, obs, action), 0.0)
  params = jax.tree.map(lambda x: x + 0.3 * jnp.asarray(rng.normal(size=x.shape), x.dtype),
                        params)  # moves the zero-initialised output layer too
  delta = np.asarray(apply(params, context, obs, action))
  np.testing.assert_array_equal(delta[:, :2], 0.0)
  np.testing.assert_array_equal(delta[:, 11:], 0.0)
  changes = delta[:, 2:11].reshape(4, 3, 3)
  np.testing.assert_array_equal(changes[..., 0], 0.0)  # presence moves only by leaving
  assert np.abs(changes[..., 1:]).min() > 0.0

  shuffled = obs.copy()
  shuffled[:, 2:11] = slots[:, [2, 0, 1]].reshape(4, 9)
  # The delta is against the observed slots; the prediction itself must not move.
  predicted = lambda o, d: wm_lib.symlog(o[:, 2:11]) + d[:, 2:11]
  shuffled_delta = np.asarray(apply(params, context, shuffled, action))
  np.testing.assert_allclose(predicted(shuffled, shuffled_delta), predicted(obs, delta),
                             rtol=1e-5, atol=1e-6)


def _with_output_bias(params, head_path, bias):
  """`params` with the zero-initialised output layer of the head at `head_path` (module
  names) giving `bias` (its kernel stays zero, so the head outputs exactly `bias`)."""
  params = jax.tree.map(lambda x: x, params)  # a copy to edit
  layer = params["params"]
  for name in head_path + ("Dense_0",):
    layer = layer[name]
  layer["bias"] = jnp.asarray(bias, layer["bias"].dtype)
  return params


@pytest.mark.parametrize("jit", [False, True])
def test_polar_entity_head_hand_computed(jit):
  """Three entities (presence, dx, dy, distance), sorted by distance, and the agent moving
  by (−0.1, 0). Relative to its next position they sit at (0.15, 0), (0.45, 0), (−0.3, 0).
  A radial step of −0.2 takes the first onto the agent (its distance stops at 0), the second
  to (0.25, 0) and the third to (−0.1, 0), which re-sorts the last two. A turn of π/2 alone
  rotates each relative position a quarter turn anticlockwise."""
  head = wm_lib.EntityDeltaHead(((2, 3, 4, 3),), obs_dim=15, width=8, polar=True,
                                arrive_bias=-1e9)
  obs = np.zeros((1, 15), np.float32)
  obs[0, 2:14] = [1.0, 0.05, 0.0, 0.05, 1.0, 0.35, 0.0, 0.35, 1.0, -0.4, 0.0, 0.4]
  context, action = np.ones((1, 3), np.float32), np.ones((1, 2), np.float32)
  agent_move = np.array([[-0.1, 0.0]], np.float32)
  params = head.init(jax.random.PRNGKey(0), context, obs, action, agent_move)
  apply = jax.jit(head.apply) if jit else head.apply
  no_leaving = [-1e9, 0.0, 0.0, 0.0]  # leave logit, then the additive changes

  def predicted(radial_step, turn):
    biased = _with_output_bias(params, ("entity_0",), no_leaving + [radial_step, turn])
    delta = np.asarray(apply(biased, context, obs, action, agent_move))
    np.testing.assert_array_equal(delta[:, :2], 0.0)
    np.testing.assert_array_equal(delta[:, 14:], 0.0)
    return np.asarray(wm_lib.symexp(wm_lib.symlog(obs[:, 2:14]) + delta[:, 2:14]))

  np.testing.assert_allclose(
      predicted(-0.2, 0.0)[0],
      [1.0, 0.0, 0.0, 0.0, 1.0, -0.1, 0.0, 0.1, 1.0, 0.25, 0.0, 0.25], atol=1e-6)
  np.testing.assert_allclose(
      predicted(0.0, math.pi / 2)[0],
      [1.0, 0.0, 0.15, 0.15, 1.0, 0.0, -0.3, 0.3, 1.0, 0.0, 0.45, 0.45], atol=1e-6)


def test_polar_entities_move_against_the_agents_predicted_move(small_config):
  """With `agent_position` the entity head takes the agent's move from the plain delta
  head's prediction of the agent's position: with that head outputting a symlog change of
  the position (everything else at zero) and the entity head at zero, each entity's
  relative position moves by −(the agent's move) / scale, and its distance follows."""
  cfg = small_config()
  cfg.world_model.predict_delta = True
  cfg.world_model.entity_slots = ((2, 2, 4, 3),)
  cfg.world_model.agent_position = (0, 2.0)
  model = wm_lib.make_world_model(cfg.world_model, (11,))
  params = wm_lib.init(jax.random.PRNGKey(0), model, wm_lib.make_optimizer(cfg.world_model), (11,),
                       jnp.float32, 5).params
  agent = np.array([0.2, -0.5], np.float32)
  moved_agent = np.array([0.6, -0.3], np.float32)
  plain_bias = np.zeros(11, np.float32)
  plain_bias[:2] = wm_lib.symlog(moved_agent) - wm_lib.symlog(agent)
  params = _with_output_bias(params, ("delta_head",), plain_bias)
  never = np.zeros(6, np.float32)
  never[0] = -1e9  # the leave logit (then 3 feature changes, radial step, turn)
  params = _with_output_bias(params, ("entity_head", "entity_0"), never)
  params = _with_output_bias(params, ("entity_head", "arrival_0"), never[:4])  # no arrival
  obs = np.zeros((1, 11), np.float32)
  obs[0, :2] = agent
  obs[0, 2:10] = [1.0, 0.3, 0.0, 0.3, 1.0, 0.0, 0.4, 0.4]
  delta = jax.jit(lambda p, o: model.apply(p, o, jnp.zeros((1, 5)),
                                           method=wm_lib.WorldModel.next_obs_delta))(
      params, jnp.asarray(obs))
  following = np.asarray(wm_lib.symexp(wm_lib.symlog(obs) + delta))[0]
  np.testing.assert_allclose(following[:2], moved_agent, rtol=1e-5)
  # The agent moved by (0.4, 0.2) in its own units, (0.2, 0.1) in the slots' units.
  np.testing.assert_allclose(
      following[2:10], [1.0, 0.1, -0.1, math.hypot(0.1, 0.1), 1.0, -0.2, 0.3,
                        math.hypot(0.2, 0.3)], atol=1e-5)


def test_entity_slots_are_validated(small_config):
  cfg = small_config()
  cfg.world_model.predict_delta = True

  def init():  # the model is built, and so validated, with `cfg` as it is at the call
    wm_lib.init(jax.random.PRNGKey(0), wm_lib.make_world_model(cfg.world_model, (12,)),
                wm_lib.make_optimizer(cfg.world_model), (12,), jnp.float32, 5)

  for slots, message in ((((2, 3, 3),), r"block \(2, 3, 3\): expected"),
                         (((2, 3, 3, 3),), r"block \(2, 3, 3, 3\): expected"),
                         (((2, 3, 3, 0),), r"block \(2, 3, 3, 0\): expected"),
                         (((2, 3, 3, 1),), None),
                         (((0, 2, 2, 1), (3, 1, 2, 1)), "blocks overlap")):
    cfg.world_model.entity_slots = slots
    if message is None:
      init()
    else:
      with pytest.raises(ValueError, match=message):
        init()
  cfg.world_model.entity_slots, cfg.world_model.entity_width = ((2, 3, 3, 1),), 0
  with pytest.raises(ValueError, match=r"world_model.entity_width=0: expected ≥ 1"):
    init()
  cfg.world_model.entity_width = 16
  # agent_position: the agent's two dims outside the blocks, blocks of (presence, dx, dy,
  # distance, ...) sorted by distance.
  for slots, agent_position in ((((2, 2, 4, 3),), (0, 0.0)),  # scale 0
                                (((2, 2, 4, 3),), (1, 2.0)),  # overlaps the block
                                (((2, 2, 4, 3),), (11, 2.0)),  # past the end
                                (((2, 2, 4, 1),), (0, 2.0)),  # sorted by another feature
                                ((), (0, 2.0))):  # no entity blocks
    cfg.world_model.entity_slots = slots
    cfg.world_model.agent_position = agent_position
    with pytest.raises(ValueError, match=r"world_model.agent_position=.*expected"):
      init()
  cfg.world_model.agent_position = ()
  cfg.world_model.entity_slots = ((2, 3, 3, 1),)
  cfg.world_model.predict_delta = False
  with pytest.raises(ValueError, match="entity_slots needs world_model.predict_delta=True"):
    init()


def test_arena_apex_entity_head_must_match_the_envs_observation():
  """configs/arena_apex.py derives the entity head's blocks from BonkArena's layout; the
  trainer refuses a config whose blocks no longer match the env's (changed env kwargs)."""
  from configs import arena_apex
  from mbjax.envs.bonk_arena import BonkArena
  from mbjax.train.anakin import check_world_model_slots

  cfg = arena_apex.get_config("debug")
  assert tuple(cfg.world_model.entity_slots) == ((16, 5, 8, 3), (59, 3, 4, 3))
  assert tuple(cfg.world_model.agent_position) == (0, 2.0)
  check_world_model_slots(cfg, BonkArena())
  for env, expected in ((BonkArena(num_obs_enemies=2), r"\(\(16, 2, 8, 3\), \(35, 3, 4, 3\)\)"),
                        (BonkArena(observation="pixels"), r"expected entity_slots=\(\)")):
    with pytest.raises(ValueError, match=r"entity_slots=.*do not match.*" + expected):
      check_world_model_slots(cfg, env)
  # The head switched off: nothing to check.
  cfg.world_model.entity_slots, cfg.world_model.agent_position = (), ()
  check_world_model_slots(cfg, BonkArena(num_obs_enemies=2))
