"""Behaviour cloning from labelled video (mbjax/offline/bc.py): the move grid and its targets
by hand, the loss at a uniform policy by hand (jitted and not), batch sampling, and a small
learning test where the demonstrator's move from one kind of frame is either of two
opposite directions — the cloned policy must take each at full speed, not stand still."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mbjax.envs.spaces import HybridActionSpec, rare_choices
from mbjax.offline import bc

SPEC = HybridActionSpec(continuous_dim=2, branches=(4,))
TINY = bc.BCConfig(stem=4, channels=(8, 16), embed_dim=32, hidden=32, move_bins=3)


def test_move_grid_and_bilinear_targets_by_hand():
  np.testing.assert_array_equal(np.asarray(bc.move_centres(3, 2)), [
      [-1, -1], [-1, 0], [-1, 1], [0, -1], [0, 0], [0, 1], [1, -1], [1, 0], [1, 1]])
  # x = 0.5 lies halfway between the centres 0 and 1; y = −1 is the first centre; (1, 1) and
  # anything beyond is the last cell.
  targets = np.asarray(bc.move_targets(jnp.asarray([[0.5, -1.0], [1.0, 1.0], [3.0, 2.0]]), 3))
  expected = np.zeros((3, 9))
  expected[0, [3, 6]] = 0.5
  expected[1, 8] = expected[2, 8] = 1.0
  np.testing.assert_allclose(targets, expected, atol=1e-7)
  # The targets' mean cell centre is the (clipped) move, for any move.
  moves = jax.random.uniform(jax.random.PRNGKey(0), (64, 2), minval=-1.0, maxval=1.0)
  for bins in (2, 5, 11):
    targets = bc.move_targets(moves, bins)
    np.testing.assert_allclose(np.asarray(targets.sum(-1)), 1.0, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(targets @ bc.move_centres(bins, 2)), np.asarray(moves),
                               atol=1e-6)


def _uniform_params(state):
  """The state's parameters with the output layers zeroed: every softmax is uniform."""
  params = jax.tree.map(lambda x: x, state.params)
  for head in ("move", "choices"):
    params["params"][head] = jax.tree.map(jnp.zeros_like, params["params"][head])
  return params


@pytest.mark.parametrize("jit", [False, True])
def test_loss_of_a_uniform_policy_by_hand(jit):
  state = bc.init(jax.random.PRNGKey(0), TINY, SPEC, (16, 16, 3))
  params = _uniform_params(state)
  frames = jnp.zeros((4, 16, 16, 3), jnp.uint8)
  moves = jnp.asarray([[0.5, -1.0], [1.0, 1.0], [0.0, 0.0], [-0.2, 0.7]])
  choices = jax.nn.one_hot(jnp.asarray([3, 0, 3, 1]), 4)
  weight = jnp.asarray([1.0, 1.0, 0.0, 1.0])
  loss_fn = lambda *args: bc.loss(params, TINY, SPEC, *args)
  loss_fn = jax.jit(loss_fn) if jit else loss_fn
  value, metrics = loss_fn(frames, moves, choices, weight)
  # Targets sum to 1 against log-probabilities log(1/9): the move loss is log 9; each
  # weighted choice costs log 4; the total is their sum.
  np.testing.assert_allclose(float(metrics["move_loss"]), np.log(9.0), rtol=1e-6)
  np.testing.assert_allclose(float(metrics["choice_loss"]), np.log(4.0), rtol=1e-6)
  np.testing.assert_allclose(float(value), np.log(9.0) + np.log(4.0), rtol=1e-6)


def test_rare_choices_and_batch_sampling():
  labels = np.array([[3], [3], [0], [3], [2], [3]])
  np.testing.assert_array_equal(rare_choices(labels), [0, 0, 1, 0, 1, 0])
  np.testing.assert_array_equal(rare_choices(np.zeros((3, 0), np.int64)), [0, 0, 0])
  rng = np.random.default_rng(0)
  index = bc.sample_batch(rng, 6, rare_choices(labels), 8, 0.25)
  assert len(index) == 8 and set(index[:2]) <= {2, 4} and index.max() < 6
  index = bc.sample_batch(rng, 6, np.zeros(6, bool), 8, 0.25)  # no rare frame: all uniform
  assert len(index) == 8 and index.max() < 6


def _dot_frames(sides):
  """16×16 frames with a lit 4×4 block on the left (0), the right (1) or in the middle (2)."""
  frames = np.zeros((len(sides), 16, 16, 3), np.uint8)
  for i, side in enumerate(sides):
    x = (0, 12, 6)[side]
    frames[i, 6:10, x:x + 4] = 255
  return frames


@pytest.mark.slow
def test_cloned_policy_takes_either_way_at_full_speed():
  # The demonstrator moves towards a block on the left or the right, and from a block in the
  # middle goes left or right with equal chance. A regression would learn (0, 0) there and
  # stand still; the move grid must give both directions at full speed.
  rng = np.random.default_rng(0)
  sides = rng.integers(0, 3, 600)
  frames = _dot_frames(sides)
  go = np.where(sides == 2, rng.choice([-1.0, 1.0], len(sides)), np.where(sides == 0, -1.0, 1.0))
  card = np.where(sides == 1, 0, 3)  # the right-hand block also picks card 0
  actions = np.concatenate([np.stack([go, np.zeros_like(go)], -1),
                            np.eye(4)[card]], -1).astype(np.float32)
  cfg = bc.BCConfig(stem=4, channels=(8, 16), embed_dim=32, hidden=32, move_bins=5,
                    rare_fraction=0.25, lr=3e-3)
  state = bc.init(jax.random.PRNGKey(0), cfg, SPEC, (16, 16, 3))
  state, metrics = bc.fit(state, [frames[:300], frames[300:]], [actions[:300], actions[300:]],
                          300, np.random.default_rng(1), batch=32)
  assert metrics["accuracy_0"] > 0.9
  test = jnp.asarray(_dot_frames([0] * 64 + [1] * 64 + [2] * 64))
  mask = jnp.ones((192, 4), bool)
  act = jax.jit(lambda key: bc.act(state.params, cfg, SPEC, test, mask, key))
  action = jax.tree.map(np.asarray, act(jax.random.PRNGKey(2)))
  move_x = action.continuous[:, 0]
  assert (move_x[:64] == -1.0).mean() > 0.9 and (move_x[64:128] == 1.0).mean() > 0.9
  middle = move_x[128:]
  assert (np.abs(middle) == 1.0).mean() > 0.9  # full speed, never a short step between
  assert 0.25 < (middle > 0).mean() < 0.75  # both ways
  assert (action.discrete[64:128, 0] == 0).mean() > 0.9
  assert (action.discrete[:64, 0] == 3).mean() > 0.9
  # At temperature 0 the move is the grid's most likely cell: always the same one per frame.
  greedy = dataclasses.replace(cfg, move_temperature=0.0)
  move_x = np.asarray(bc.act(state.params, greedy, SPEC, test, mask,
                             jax.random.PRNGKey(4)).continuous[:, 0])
  assert (move_x[:64] == -1.0).all() and (move_x[64:128] == 1.0).all()
  assert len(set(move_x[128:].tolist())) == 1
  # The mask is obeyed: with card 0 forbidden nothing picks it.
  masked = bc.act(state.params, cfg, SPEC, test, mask.at[:, 0].set(False), jax.random.PRNGKey(3))
  assert not (np.asarray(masked.discrete) == 0).any()


def test_policy_fn_acts_on_one_observation():
  state = bc.init(jax.random.PRNGKey(0), TINY, SPEC, (16, 16, 3))
  policy = bc.policy_fn(state.params, TINY, SPEC, lambda obs: obs[::2, ::2])
  action = jax.jit(policy)(jax.random.PRNGKey(0), jnp.zeros((32, 32, 3), jnp.uint8),
                           jnp.asarray([False, False, False, True]))
  assert action.continuous.shape == (2,) and action.discrete.shape == (1,)
  assert int(action.discrete[0]) == 3  # the only allowed choice
  assert set(np.asarray(action.continuous).tolist()) <= {-1.0, 0.0, 1.0}  # a grid centre


@pytest.mark.parametrize("jit", [False, True])
def test_features_are_what_both_heads_read(jit):
  cfg = dataclasses.replace(TINY, crop_fraction=0.5, locator_channels=(4,))
  state = bc.init(jax.random.PRNGKey(0), cfg, SPEC, (16, 16, 3))
  frames = jax.random.randint(jax.random.PRNGKey(1), (3, 16, 16, 3), 0, 256).astype(jnp.uint8)
  features_fn = lambda f: bc.features(state.params, cfg, SPEC, f)
  features = np.asarray((jax.jit(features_fn) if jit else features_fn)(frames))
  assert features.shape == (3, cfg.hidden) and (features >= 0).all()  # after the ReLU
  move_logits, choice_logits = bc.BCPolicyNet(cfg, SPEC).apply(state.params, frames)
  for head, logits in (("move", move_logits), ("choices", choice_logits)):
    dense = state.params["params"][head]
    np.testing.assert_allclose(features @ np.asarray(dense["kernel"]) + np.asarray(dense["bias"]),
                               logits, rtol=1e-5, atol=1e-5)
  # Acting on the features draws what acting on the frames draws, key for key.
  mask = np.ones((3, SPEC.mask_size), bool)
  mask[1, :SPEC.branches[0] - 1] = False  # the second frame may only take the last choice
  on_features = lambda h, k: bc.act_on_features(state.params, cfg, SPEC, h, mask, k)
  on_features = jax.jit(on_features) if jit else on_features
  for seed in range(4):
    key = jax.random.PRNGKey(seed)
    expected = bc.act(state.params, cfg, SPEC, frames, mask, key)
    got = on_features(jnp.asarray(features), key)
    np.testing.assert_allclose(got.continuous, expected.continuous, atol=1e-6)
    np.testing.assert_array_equal(got.discrete, expected.discrete)
    assert int(got.discrete[1, 0]) == SPEC.branches[0] - 1


def test_bad_input_is_named():
  with pytest.raises(ValueError, match="move_bins"):
    bc.BCConfig(move_bins=1)
  state = bc.init(jax.random.PRNGKey(0), TINY, SPEC, (16, 16, 3))
  with pytest.raises(ValueError, match="actions must be"):
    bc.fit(state, [np.zeros((4, 16, 16, 3), np.uint8)], [np.zeros((4, 5), np.float32)], 1,
           np.random.default_rng(0))
