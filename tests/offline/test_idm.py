"""IDM: learns a synthetic action from synthetic frames, labels exactly what a per-window
computation gives (jitted or not), and its helpers match hand-computed values."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mbjax.envs.spaces import HybridActionSpec
from mbjax.offline import idm, idm_labelling, idm_training

SIZE, SPRITE, STEP = 32, 4, 2  # frame side, square side, pixels per unit of action
SPEC = HybridActionSpec(continuous_dim=2, branches=(3,))
TINY = idm.IDMConfig(window=5, stem=4, channels=(16, 16), embed_dim=32,
                     motion_channels=(16, 16), hidden=64, shift=2, label_batch=16)


def synthetic_episode(rng: np.random.Generator, length: int):
  """A white square moved by round(action · STEP) pixels per frame (clamped to the frame),
  and a 3-way menu branch: on "menu" frames (a grey bar on top) the choice is 1 or 2, shown
  on the next frame as a red or green corner; elsewhere the choice is 0.

  Returns (frames u8[T, S, S, 3], applied move f32[T, 2], choice i32[T, 1], menu bool[T]).
  """
  frames = np.zeros((length, SIZE, SIZE, 3), np.uint8)
  frames[..., 2] = 40  # a dark blue floor
  pos = rng.integers(0, SIZE - SPRITE, size=2)
  moves = np.zeros((length, 2), np.float32)
  choice = np.zeros((length, 1), np.int32)
  menu = rng.random(length) < 0.15
  for t in range(length):
    y, x = pos
    frames[t, y:y + SPRITE, x:x + SPRITE] = 255
    if menu[t]:
      frames[t, :2, 8:24] = 128
      choice[t, 0] = rng.integers(1, 3)
    if t > 0 and choice[t - 1, 0]:
      frames[t, -3:, -3:] = (220, 30, 30) if choice[t - 1, 0] == 1 else (30, 220, 30)
    wanted = np.rint(rng.uniform(-1, 1, size=2) * STEP).astype(int)
    new = np.clip(pos + wanted, 0, SIZE - SPRITE)
    moves[t] = (new - pos)[::-1] / STEP  # (dx, dy), what the frames show
    pos = new
  return frames, moves, choice, menu


def as_episode(frames, moves, choice, menu):
  valid = np.ones(len(frames), bool)
  return idm_training.Episode(frames, idm_training.ActionLabels(moves, choice, valid, valid))


@pytest.mark.slow
def test_idm_learns_synthetic_moves_and_menu_choices():
  rng = np.random.default_rng(0)
  train = [as_episode(*synthetic_episode(rng, 200)) for _ in range(8)]
  frames, moves, choice, menu = synthetic_episode(rng, 300)
  weights = idm_training.class_weights_from_labels(
      np.concatenate([e.labels.discrete for e in train]), SPEC, power=0.5)
  state = idm_training.init(jax.random.PRNGKey(0), TINY, (SIZE, SIZE, 3), SPEC, weights)
  focus = [np.nonzero(e.labels.discrete[:, 0])[0] for e in train]
  state, _ = idm_training.fit(state, train, 500, np.random.default_rng(1), batch=8,
                              clip_length=12, focus=focus, focus_fraction=0.25)
  labels = idm_labelling.label(state.params, TINY, SPEC, frames)
  # The last frame's move is invisible (no next frame), so score the others.
  metrics = idm_labelling.evaluate_labels(
      jax.tree.map(lambda x: x[:-1], labels), moves[:-1], choice[:-1],
      {"all": np.ones(len(frames) - 1, bool), "menu": menu[:-1]})
  # Measured 0.928–0.965 over four seeds.
  assert metrics["all/move_r2"] > 0.9, metrics
  assert metrics["all/accuracy_0"] > 0.95, metrics
  assert metrics["menu/accuracy_0"] > 0.9, metrics


def per_window_labels(params, cfg, spec, frames):
  """The plain computation: for every t, the padded window of frames through the model."""
  c = cfg.context
  padded = np.concatenate([frames[:1].repeat(c, 0), frames, frames[-1:].repeat(c, 0)])
  net = idm.IDMNet(cfg, spec)
  continuous, probs = [], []
  for t in range(len(frames)):
    cont, logits = net.apply(params, padded[None, t:t + cfg.window])
    continuous.append(np.clip(np.asarray(cont[0, 0]), -1, 1))
    probs.append([np.asarray(jax.nn.softmax(l[0, 0])) for l in logits])
  return np.stack(continuous), [np.stack([p[i] for p in probs]) for i in range(len(probs[0]))]


@pytest.mark.parametrize("length,motion_input", [(6, "stem"), (1, "cost_volume")])
def test_label_equals_per_window_computation_jitted_or_not(length, motion_input):
  cfg = idm.IDMConfig(window=5, stem=4, channels=(8, 8), embed_dim=16, motion_channels=(8, 8),
                      hidden=16, motion_input=motion_input, motion_radius=1,
                      label_batch=4)  # 6 frames: two pieces, the last one padded
  frames = np.random.default_rng(1).integers(0, 256, (length, 16, 16, 3), dtype=np.uint8)
  state = idm_training.init(jax.random.PRNGKey(2), cfg, (16, 16, 3), SPEC)
  expected_cont, expected_probs = per_window_labels(state.params, cfg, SPEC, frames)
  runs = [idm_labelling.label(state.params, cfg, SPEC, frames)]
  if motion_input == "stem":  # the un-jitted pieces and padding do not depend on the encoder
    with jax.disable_jit():
      runs.append(idm_labelling.label(state.params, cfg, SPEC, frames))
  for got in runs:
    assert got.continuous.shape == (length, 2) and got.discrete.shape == (length, 1)
    np.testing.assert_allclose(got.continuous, expected_cont, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got.probs[0], expected_probs[0], rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(got.discrete[:, 0], np.argmax(got.probs[0], -1))


def test_cost_volume_by_hand():
  # 8×8 frames → 4×4 half-resolution luma, cells of 4 px → a 2×2 grid of cells, radius 1.
  # A white 2×2 block (one half-res pixel of luma 1) moves from half-res (1, 1) to (1, 2).
  a = np.zeros((1, 8, 8, 3), np.float32)
  b = np.zeros_like(a)
  a[0, 2:4, 2:4] = 1.0
  b[0, 2:4, 4:6] = 1.0
  got = np.asarray(idm.cost_volume(jnp.asarray(a), jnp.asarray(b), radius=1, cell=4))
  assert got.shape == (1, 2, 2, 9)
  ha, hb = np.zeros((4, 4)), np.zeros((4, 4))
  ha[1, 1] = hb[1, 2] = 1.0
  padded = np.pad(hb, 1, mode="edge")
  for cy in range(2):
    for cx in range(2):
      costs = [np.mean([(ha[y, x] - padded[y + dy + 1, x + dx + 1]) ** 2
                        for y in range(2 * cy, 2 * cy + 2) for x in range(2 * cx, 2 * cx + 2)])
               for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
      np.testing.assert_allclose(got[0, cy, cx], np.asarray(costs) - min(costs), atol=1e-6)
  # The cell the block left matches best at d = (0, +1) (index 5), the only zero cost.
  assert np.flatnonzero(got[0, 0, 0] == 0).tolist() == [5]
  np.testing.assert_allclose(got[0, 0, 0, 4], 0.25, atol=1e-6)  # d = 0: one pixel of four


def test_cost_volume_at_full_resolution_by_hand():
  # pool 1: matching on the 4×4 luma itself, cells of 2 px → a 2×2 grid, radius 1. One
  # white pixel moves from (1, 1) to (1, 2): a one-pixel move, half a pixel at pool 2.
  a = np.zeros((1, 4, 4, 3), np.float32)
  b = np.zeros_like(a)
  a[0, 1, 1] = 1.0
  b[0, 1, 2] = 1.0
  got = np.asarray(idm.cost_volume(jnp.asarray(a), jnp.asarray(b), radius=1, cell=2, pool=1))
  assert got.shape == (1, 2, 2, 9)
  padded = np.pad(b[0, ..., 0], 1, mode="edge")
  for cy in range(2):
    for cx in range(2):
      costs = [np.mean([(a[0, y, x, 0] - padded[y + dy + 1, x + dx + 1]) ** 2
                        for y in range(2 * cy, 2 * cy + 2) for x in range(2 * cx, 2 * cx + 2)])
               for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
      np.testing.assert_allclose(got[0, cy, cx], np.asarray(costs) - min(costs), atol=1e-6)
  # The cell the pixel left matches best at d = (0, +1) (index 5) alone; not moving costs
  # one pixel of its four (the pixel arrived in the neighbouring cell).
  assert np.flatnonzero(got[0, 0, 0] == 0).tolist() == [5]
  np.testing.assert_allclose(got[0, 0, 0, 4], 0.25, atol=1e-6)
  with pytest.raises(ValueError, match="pools of 4"):
    idm.cost_volume(jnp.asarray(a), jnp.asarray(b), radius=1, cell=2, pool=4)


def test_matching_pool_keeps_the_grid_size():
  half = idm.IDMConfig()
  assert [idm.matching_pool(half, side) for side in (64, 128, 224)] == [2, 2, 2]
  grid = idm.IDMConfig(cost_grid=128)
  # 224 / 128 = 1.75 → 2: a 112-px grid, the nearest to 128 that the frame divides into.
  assert [idm.matching_pool(grid, side) for side in (64, 128, 224, 256, 512)] == [1, 1, 2, 2, 4]


def test_random_symmetry_moves_labels_with_the_frames():
  # One lit pixel goes from (y 1, x 2) to (y 1, x 5): move (dx, dy) = (3, 0). After any
  # flip/transpose the pixel's displacement must equal the transformed label.
  clip = np.zeros((1, 2, 8, 8, 3), np.uint8)
  clip[0, 0, 1, 2] = clip[0, 1, 1, 5] = 255
  labels = idm_training.ActionLabels(jnp.asarray([[[3.0, 0.0], [0.0, 0.0]]]),
                                     jnp.zeros((1, 2, 1), jnp.int32), jnp.ones((1, 2), bool),
                                     jnp.ones((1, 2), bool))
  seen = set()
  for seed in range(16):
    frames, moved = idm_training.random_symmetry(jax.random.PRNGKey(seed), jnp.asarray(clip),
                                                 labels, 1.0)
    frames = np.asarray(frames)
    start, end = np.argwhere(frames[0, 0, ..., 0])[0], np.argwhere(frames[0, 1, ..., 0])[0]
    displacement = tuple((end - start)[::-1].tolist())  # (dx, dy)
    assert displacement == tuple(np.asarray(moved.continuous[0, 0]).tolist())
    assert not np.asarray(moved.discrete_valid).any()  # choices dropped on transformed clips
    seen.add(displacement)
  # Every transform keeps |move| = 3 on one axis; all four directions appear.
  assert seen == {(3, 0), (-3, 0), (0, 3), (0, -3)}
  frames, same = idm_training.random_symmetry(jax.random.PRNGKey(0), jnp.asarray(clip), labels,
                                              0.0)
  np.testing.assert_array_equal(np.asarray(frames), clip)
  assert np.asarray(same.discrete_valid).all()


def test_rotations_only_never_mirrors():
  # An L of lit pixels is chiral: each transformed frame must be the L turned by 90°, 180°
  # or 270° (np.rot90), never mirrored, with the move (1, 0) turned the same way.
  clip = np.zeros((1, 1, 6, 6, 3), np.uint8)
  clip[0, 0, 1:4, 1] = clip[0, 0, 3, 2] = 255
  labels = idm_training.ActionLabels(jnp.asarray([[[1.0, 0.0]]]), jnp.zeros((1, 1, 1), jnp.int32),
                                     jnp.ones((1, 1), bool), jnp.ones((1, 1), bool))
  rotations = {k: np.rot90(clip[0, 0], k, axes=(0, 1)) for k in (1, 2, 3)}
  seen = set()
  for seed in range(24):
    frames, moved = idm_training.random_symmetry(jax.random.PRNGKey(seed), jnp.asarray(clip),
                                                 labels, 1.0, rotations_only=True)
    turned = [k for k, r in rotations.items() if np.array_equal(np.asarray(frames[0, 0]), r)]
    assert len(turned) == 1
    seen.add((turned[0], tuple(np.asarray(moved.continuous[0, 0]).tolist())))
  assert len(seen) == 3 and len({move for _, move in seen}) == 3


def test_norm_clipped_is_what_the_game_applies():
  moves = np.array([[2.0, 0.0], [1.0, 1.0], [0.3, -0.4], [-3.0, 3.0]], np.float32)
  expected = [[1, 0], [0.70710678, 0.70710678], [0.3, -0.4], [-0.70710678, 0.70710678]]
  np.testing.assert_allclose(idm_training.norm_clipped(moves), expected, rtol=1e-6)
  np.testing.assert_allclose(idm_training.norm_clipped(jnp.asarray(moves)), expected,
                             rtol=1e-6)


def test_class_weights_by_hand():
  # counts (3, 1, 0); power 1 → 1/3, 1, and the unseen class gets the largest seen (1);
  # the mean over the four labelled frames, (3·1/3 + 1)/4 = 0.5, is scaled to 1.
  discrete = np.array([[0], [0], [0], [1]])
  weights = idm_training.class_weights_from_labels(discrete, SPEC, power=1.0)
  np.testing.assert_allclose(weights[0], [2 / 3, 2, 2], rtol=1e-6)
  uniform = idm_training.class_weights_from_labels(discrete, SPEC, power=0.0)
  np.testing.assert_allclose(uniform[0], [1, 1, 1], rtol=1e-6)


def test_r2_and_grouped_accuracy_by_hand():
  # Truth mean (1, 1): Σ‖y − ȳ‖² = 4; Σ‖y − ŷ‖² = (2 − 1)² · 2 = 2 → R² = 0.5.
  assert idm_labelling.r2_score([[0, 0], [1, 1]], [[0, 0], [2, 2]]) == pytest.approx(0.5)
  # Undefined, not a huge negative number, when the truth does not vary.
  assert np.isnan(idm_labelling.r2_score([[0, 0], [1, 1]], [[0, 0], [0, 0]]))
  pred = idm_labelling.IDMLabels(np.array([[0, 0], [1, 1], [0, 0.]]),
                                 np.array([[0], [2], [1]]), ())
  metrics = idm_labelling.evaluate_labels(
      pred, np.array([[0, 0], [2, 2], [0, 0.]]), np.array([[0], [2], [2]]),
      {"all": np.ones(3, bool), "menu": np.array([0, 1, 1], bool)})
  assert metrics["all/accuracy_0"] == pytest.approx(2 / 3)
  assert metrics["menu/accuracy_0"] == pytest.approx(0.5)
  assert metrics["menu/frames"] == 2
  # Per dim the truth is (0, 2, 0), mean 2/3: Σ (y − ȳ)² = 8/3, so 16/3 over both dims;
  # Σ‖y − ŷ‖² = 2 → R² = 1 − 2 / (16/3) = 0.625.
  assert metrics["all/move_r2"] == pytest.approx(0.625)
  # Movement scored only where it is visible: frames 0 and 1, the first assert's R² 0.5;
  # the menu group keeps one such frame (too few for an R²) but all its frames for accuracy.
  visible = idm_labelling.evaluate_labels(
      pred, np.array([[0, 0], [2, 2], [0, 0.]]), np.array([[0], [2], [2]]),
      {"all": np.ones(3, bool), "menu": np.array([0, 1, 1], bool)},
      move_visible=np.array([1, 1, 0], bool))
  assert visible["all/move_r2"] == pytest.approx(0.5)
  assert visible["all/move_frames"] == 2 and visible["menu/move_frames"] == 1
  assert np.isnan(visible["menu/move_r2"]) and visible["menu/accuracy_0"] == pytest.approx(0.5)


def test_sample_clips_puts_focus_frames_among_the_trained_centres():
  rng = np.random.default_rng(0)
  lengths, length, window = [40, 100], 12, 5
  focus = [np.array([], int), np.array([3, 50])]  # 3: the clip is clamped to the start
  episode, start = idm_training.sample_clips(rng, lengths, 500, length, window, focus, 1.0)
  assert np.all(episode == 1)
  c = window // 2
  assert all(any(s + c <= f <= s + length - 1 - c for f in focus[1]) for s in start)
  assert {0, 1} <= set(start.tolist())  # both clip positions with frame 3 as a centre
  # Without focus, clips cover both episodes in proportion to their clip positions.
  episode, start = idm_training.sample_clips(rng, lengths, 4000, length, window)
  assert np.mean(episode == 0) == pytest.approx(29 / (29 + 89), abs=0.03)
  assert np.all(start + length <= np.asarray(lengths)[episode])


def test_bad_inputs_raise_clear_errors():
  with pytest.raises(ValueError, match="window must be odd"):
    idm.IDMConfig(window=4)
  with pytest.raises(ValueError, match="uint8"):
    idm_labelling.label(None, TINY, SPEC, np.zeros((3, 32, 32, 3), np.float32))
  with pytest.raises(ValueError, match="divisible by the stem"):
    idm_training.init(jax.random.PRNGKey(0), TINY, (30, 30, 3), SPEC)
