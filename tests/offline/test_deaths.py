"""Episode ends from video: batch sampling and run-to-terminal rules by hand, matching against
true deaths by hand, and the classifier learning a death it was never told about from where
synthetic videos end."""
import jax
import numpy as np
import pytest

from mbjax.offline import deaths
from mbjax.offline.deaths import augment_colours

TINY = deaths.DeathConfig(stem=4, channels=(8, 16), embed_dim=16, end_frames=3, lr=1e-3,
                          score_batch=8)


def test_sample_batch_draws_end_frames_and_the_rest_where_expected():
  rng = np.random.default_rng(0)
  # Video 0: 10 frames, ends (frames 7–9 are end frames); video 1: 6 frames, only cut.
  video, frame, target = deaths.sample_batch(rng, [10, 6], 4000, end_frames=3,
                                             positive_fraction=0.25, ends=[True, False])
  positive = target == 1.0
  assert positive.sum() == 1000
  assert np.all(video[positive] == 0) and set(frame[positive]) == {7, 8, 9}
  # Negatives: frames 0–6 of video 0 and all 6 of video 1, uniform over those 13 frames.
  negatives = list(zip(video[~positive], frame[~positive]))
  assert set(negatives) == {(0, f) for f in range(7)} | {(1, f) for f in range(6)}
  assert np.mean(video[~positive] == 1) == pytest.approx(6 / 13, abs=0.03)
  with pytest.raises(ValueError, match="need end frames"):
    deaths.sample_batch(rng, [10], 8, 3, 0.25, ends=[False])


def test_terminals_mark_the_last_frame_of_each_run_above_the_threshold():
  probs = np.array([0.1, 0.6, 0.7, 0.2, 0.5, 0.4, 0.9])
  np.testing.assert_array_equal(deaths.terminals_from_probs(probs, 0.5),
                                [0, 0, 1, 0, 1, 0, 1])
  assert not deaths.terminals_from_probs(probs, 0.95).any()


def test_match_terminals_by_hand():
  true = np.zeros(40, bool)
  true[[10, 39]] = True
  predicted = np.zeros(40, bool)
  predicted[[4, 14, 25]] = True  # 14 finds 10 (4 frames late); 4 and 25 are too far
  assert deaths.match_terminals(predicted, true, tolerance=5) == {
      "deaths": 2, "detected": 1, "false_terminals": 2, "predicted": 3}
  assert deaths.match_terminals(np.zeros(40, bool), true, 5)["detected"] == 0
  assert deaths.match_terminals(predicted, np.zeros(40, bool), 5)["false_terminals"] == 3


def synthetic_video(rng: np.random.Generator, length: int, dies: bool) -> np.ndarray:
  """Noise frames with a bar in the top rows whose length is the health; a dying video's
  health falls to almost nothing over its last frames, a cut one stops at any health."""
  frames = rng.integers(0, 60, (length, 16, 16, 3), dtype=np.uint8)
  health = rng.integers(8, 17, length)
  if dies:
    health[-3:] = [2, 1, 0]
  for t in range(length):
    frames[t, :2, :health[t], 1] = 220
  return frames


def test_the_classifier_learns_deaths_from_video_ends_alone():
  rng = np.random.default_rng(0)
  train = [synthetic_video(rng, 50, dies=i % 2 == 0) for i in range(8)]
  state = deaths.init(jax.random.PRNGKey(0), TINY, (16, 16, 3))
  state, metrics = deaths.fit(state, train, 600, np.random.default_rng(1), batch=16)
  # Held out: a death at the end, and a cut video whose last frames look like any other.
  dying, cut = synthetic_video(rng, 40, True), synthetic_video(rng, 40, False)
  p_dying = deaths.probabilities(state.params, TINY, dying)
  p_cut = deaths.probabilities(state.params, TINY, cut)
  assert p_dying.shape == (40,) and p_dying.dtype == np.float32
  # Measured over seeds 0–2: P ≥ 0.54 on two of the last three frames, ≤ 0.32 before them
  # and ≤ 0.09 on the cut video (untrained: 0.15–0.50, the death missed, the cut video
  # given a terminal at frame 25).
  terminals = deaths.terminals_from_probs(p_dying, TINY.threshold)
  assert deaths.match_terminals(terminals, np.arange(40) == 39, 2) == {
      "deaths": 1, "detected": 1, "false_terminals": 0, "predicted": 1}, (p_dying, metrics)
  assert not deaths.terminals_from_probs(p_cut, TINY.threshold).any(), p_cut


def test_probabilities_in_pieces_equal_one_pass():
  frames = np.random.default_rng(2).integers(0, 256, (13, 16, 16, 3), dtype=np.uint8)
  state = deaths.init(jax.random.PRNGKey(3), TINY, (16, 16, 3))
  expected = jax.nn.sigmoid(deaths.EndOfLifeNet(TINY).apply(state.params, frames))
  np.testing.assert_allclose(deaths.probabilities(state.params, TINY, frames), expected,
                             rtol=1e-5, atol=1e-6)


def test_colour_augmentation_permutes_channels_and_scales_brightness():
  frames = np.broadcast_to(np.array([40, 80, 120], np.uint8), (64, 2, 2, 3)).copy()
  out = augment_colours(np.random.default_rng(0), frames).astype(np.float64)
  assert out.shape == frames.shape and np.all(out == out[:, :1, :1])  # one change per frame
  pixel = out[:, 0, 0]
  ratio = np.sort(pixel, axis=1) / np.array([40.0, 80.0, 120.0])
  np.testing.assert_allclose(ratio, ratio[:, :1] * np.ones(3), atol=1 / 40)  # one scale
  assert np.all((ratio[:, 0] > 0.69) & (ratio[:, 0] < 1.31))
  orders = {tuple(np.argsort(p)) for p in pixel}
  assert len(orders) == 6  # every channel order occurs over 64 frames


def test_bad_config_and_frames_are_refused():
  with pytest.raises(ValueError, match="end_frames"):
    deaths.DeathConfig(end_frames=0)
  with pytest.raises(ValueError, match="threshold"):
    deaths.DeathConfig(threshold=1.0)
  state = deaths.init(jax.random.PRNGKey(0), TINY, (16, 16, 3))
  with pytest.raises(ValueError, match="uint8"):
    deaths.probabilities(state.params, TINY, np.zeros((4, 16, 16, 3), np.float32))
