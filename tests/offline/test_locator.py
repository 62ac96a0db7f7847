"""The player locator (mbjax/offline/locator.py): the crop and the training windows by hand,
the loss's closed-form fit by hand (jitted and not), a learning test on drawn frames where
the only sprite that moves as the moves say must be found among one that wanders and one
that stands, and the behaviour-cloning policy's frozen locator."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mbjax.envs.spaces import HybridActionSpec
from mbjax.offline import bc, locator

SPEC = HybridActionSpec(continuous_dim=2, branches=(4,))
SIZE = 24


def test_crop_by_hand():
  frames = np.zeros((2, 8, 8, 3), np.uint8)
  frames[0, 2, 5] = 255
  frames[1] = 100
  # Pixel (2, 5) is at (−1 + 2·2/7, −1 + 2·5/7); half the side around it, resampled to 8 × 8:
  # the output's middle four pixels straddle it (each 0.25 px away on both axes).
  centres = jnp.asarray([[-1 + 4 / 7, -1 + 10 / 7], [1.0, 1.0]])
  cut = np.asarray(locator.crop(jnp.asarray(frames), centres, 0.5))
  expected = np.zeros((8, 8))
  expected[3:5, 3:5] = 255 * 0.75 * 0.75
  expected[2, 3:5] = expected[5, 3:5] = expected[3:5, 2] = expected[3:5, 5] = 255 * 0.25 * 0.75
  expected[2, 2] = expected[2, 5] = expected[5, 2] = expected[5, 5] = 255 * 0.25 * 0.25
  np.testing.assert_array_equal(cut[0, ..., 0], np.round(expected))
  # Centred on the bottom-right pixel (7, 7): rows and columns 5.25, 5.75, …, 8.75 are
  # sampled; 7.25 and 7.75 lie between the last pixel and the black beyond it.
  inside = np.array([1, 1, 1, 1, 0.75, 0.25, 0, 0])
  np.testing.assert_array_equal(cut[1, ..., 0], np.round(100 * np.outer(inside, inside)))
  with pytest.raises(ValueError, match="fraction"):
    locator.crop(jnp.asarray(frames), centres, 0.0)


def test_windows_skip_invalid_moves():
  valid = [np.array([1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1], bool), np.ones(3, bool)]
  moves = [np.zeros((12, 2)), np.zeros((3, 2))]
  # Starts 0–2 end before the invalid frame 5; 6–8 start after it; the last frame of a window
  # must exist (start + gap ≤ 11). The 3-frame video has no window of 3.
  np.testing.assert_array_equal(locator.windows(moves, valid, 3),
                                [[0, 0], [0, 1], [0, 2], [0, 6], [0, 7], [0, 8]])
  with pytest.raises(ValueError, match="video 1: 2 valid flags"):
    locator.windows(moves, [valid[0], np.ones(2, bool)], 3)


@pytest.mark.parametrize("jit", [False, True])
def test_loss_is_the_unexplained_share_of_the_moves(jit, monkeypatch):
  cfg = locator.LocatorConfig(ridge=0.0)
  # A stand-in net that reads the location off the first pixel's red and green, and the
  # map's entropy off its blue.
  monkeypatch.setattr(locator, "locate", lambda params, cfg, frames, soft: (
      frames[:, 0, 0, :2].astype(jnp.float32), frames[:, 0, 0, 2].astype(jnp.float32)))
  first = np.zeros((4, 2, 2, 3), np.float32)
  last = first.copy()
  last[:, 0, 0, :2] = [[1, 0], [0, 1], [1, 1], [2, 0]]  # the location changes
  # Moves that are 2 × (row change) and −1 × (column change), plus (0, 0, 0, 1) on dim 0
  # that no linear map explains: the fit leaves its projection off the changes' span.
  moves = np.stack([2 * last[:, 0, 0, 0], -last[:, 0, 0, 1]], -1) + [[0, 0], [0, 0], [0, 0],
                                                                     [1, 0]]
  loss_fn = lambda *args: locator.loss(None, cfg, *args)
  loss_fn = jax.jit(loss_fn) if jit else loss_fn
  value, metrics = loss_fn(jnp.asarray(first), jnp.asarray(last), jnp.asarray(moves))
  changes = last[:, 0, 0, :2]
  fitted = changes @ np.linalg.lstsq(changes, moves, rcond=None)[0]
  expected = np.sum((moves - fitted) ** 2) / np.sum((moves - moves.mean(0)) ** 2)
  assert expected > 0.01
  first[:, 0, 0, 2], last[:, 0, 0, 2] = 0.2, 0.4  # entropies: 0.3 on average
  value, metrics = loss_fn(jnp.asarray(first), jnp.asarray(last), jnp.asarray(moves))
  np.testing.assert_allclose(float(value), expected + 0.3 * cfg.entropy_weight, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["explained"]), 1 - expected, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["entropy"]), 0.3, rtol=1e-5)


def _drawn_videos(rng, count=4, length=40):
  """Frames with a white 2×2 player that moves as its moves say (1.5 px a unit), a red
  sprite that wanders on its own and a grey one that stands: the videos, moves, and the
  player's true (row, column) per frame in [−1, 1]."""
  videos, moves, places = [], [], []
  for _ in range(count):
    player, wanderer = rng.uniform(4, SIZE - 6, 2), rng.uniform(4, SIZE - 6, 2)
    stand = rng.integers(2, SIZE - 3, 2)
    frames, video_moves, video_places = [], [], []
    for _ in range(length):
      frame = np.full((SIZE, SIZE, 3), 20, np.uint8)
      frame[stand[0]:stand[0] + 2, stand[1]:stand[1] + 2] = 120
      w = np.round(wanderer).astype(int)
      frame[w[0]:w[0] + 2, w[1]:w[1] + 2] = [220, 30, 30]
      p = np.round(player).astype(int)
      frame[p[0]:p[0] + 2, p[1]:p[1] + 2] = 255
      frames.append(frame)
      video_places.append((player + 0.5) / (SIZE - 1) * 2 - 1)
      move = rng.uniform(-1, 1, 2)
      move = np.where((player + 1.5 * move < 1) | (player + 1.5 * move > SIZE - 3), -move, move)
      player = player + 1.5 * move
      wanderer = np.clip(wanderer + rng.uniform(-1.5, 1.5, 2), 1, SIZE - 3)
      video_moves.append(move)
    videos.append(np.stack(frames))
    moves.append(np.asarray(video_moves, np.float32))
    places.append(np.stack(video_places))
  return videos, moves, places


def test_locator_finds_the_sprite_that_moves_as_the_actions_say():
  rng = np.random.default_rng(0)
  videos, moves, places = _drawn_videos(rng)
  cfg = locator.LocatorConfig(channels=(8, 8), gap=4, lr=3e-3, entropy_warmup=100)
  state = locator.init(jax.random.PRNGKey(0), cfg, (SIZE, SIZE, 3))
  frames = np.concatenate(videos)
  truth = np.concatenate(places)
  before = np.asarray(locator.locate(state.params, cfg, frames))
  state, metrics = locator.fit(state, videos, moves, [np.ones(len(m), bool) for m in moves],
                               400, rng, batch=32)
  after = np.asarray(locator.locate(state.params, cfg, frames))
  # Only changes of the location are trained, so the peak may sit a fixed few pixels off the
  # sprite (within the net's reach): the located minus the true place, in pixels, must be
  # the same in every frame (spread) and small (offset).
  off = lambda found: (found - truth) * (SIZE - 1) / 2
  spread = lambda found: float(np.max(np.std(off(found), axis=0)))
  assert metrics["explained"] > 0.8, metrics
  assert spread(before) > 3.0, spread(before)
  assert spread(after) < 1.0, spread(after)
  assert np.max(np.abs(np.mean(off(after), axis=0))) < 4.0, np.mean(off(after), axis=0)


def test_bc_policy_keeps_its_fitted_locator_frozen():
  cfg = bc.BCConfig(stem=4, channels=(8, 16), embed_dim=16, hidden=16, move_bins=3,
                    crop_fraction=0.5, locator_channels=(4, 4))
  state = bc.init(jax.random.PRNGKey(0), cfg, SPEC, (16, 16, 3))
  fitted = locator.init(jax.random.PRNGKey(5), cfg.locator, (16, 16, 3)).params
  state = bc.with_locator(state, fitted)
  frames = jax.random.randint(jax.random.PRNGKey(1), (8, 16, 16, 3), 0, 256).astype(jnp.uint8)
  moves = jax.random.uniform(jax.random.PRNGKey(2), (8, 2), minval=-1, maxval=1)
  choices = jax.nn.one_hot(jnp.arange(8) % 4, 4)
  before = jax.tree.map(np.asarray, state.params)
  for step in range(3):
    state, _ = bc.update(state, frames, moves, choices, jax.random.PRNGKey(step))
  jax.tree.map(np.testing.assert_array_equal, state.params["params"]["locator"],
               fitted["params"])
  moved = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - b))),
                       state.params["params"]["view_encoder"],
                       before["params"]["view_encoder"])
  assert max(jax.tree.leaves(moved)) > 0  # the view's encoder trains
  other = locator.init(jax.random.PRNGKey(5), dataclasses.replace(cfg.locator, channels=(4,)),
                       (16, 16, 3)).params
  with pytest.raises(ValueError, match="locator_channels"):
    bc.with_locator(state, other)
  with pytest.raises(ValueError, match="no locator"):
    bc.with_locator(bc.init(jax.random.PRNGKey(0), dataclasses.replace(cfg, crop_fraction=0.0),
                            SPEC, (16, 16, 3)), fitted)
