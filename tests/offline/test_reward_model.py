"""Reward from video: the Bradley–Terry and return losses by hand, ranking learns a monotone
synthetic progress, the returns objective learns the potential of a synthetic HUD from a
labelled subset, and the sampling/augmentation/scoring/Spearman helpers match hand-computed
values."""
import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mbjax.offline import deaths
from mbjax.offline import reward_model as rm

TINY = rm.RewardConfig(objective="progress", stem=4, channels=(8, 16), embed_dim=16,
                       min_gap=4, score_batch=8, augment=False)


def test_bradley_terry_loss_by_hand():
  # −log σ(1 − 0) = log(1 + e^−1) = 0.313262; −log σ(0 − 1) = log(1 + e) = 1.313262.
  loss = rm.bradley_terry_loss(jnp.array([0.0, 1.0]), jnp.array([1.0, 0.0]))
  assert float(loss) == pytest.approx((0.3132617 + 1.3132617) / 2, rel=1e-6)


def test_return_loss_by_hand():
  # Huber, δ = 1: |0 − 0.5| = 0.5 → 0.5 · 0.5² = 0.125; |3 − 0| = 3 → 1 · (3 − 0.5) = 2.5.
  loss = rm.return_loss(jnp.array([0.0, 3.0]), jnp.array([0.5, 0.0]), delta=1.0)
  assert float(loss) == pytest.approx((0.125 + 2.5) / 2, rel=1e-6)


@pytest.mark.parametrize("jit", [False, True])
def test_double_sampled_return_loss_by_hand(jit):
  # Pair 0: errors 1 + (0.5, 1.5) − 1 = (0.5, 1.5), slopes ψ = (0.5, 1) → ½(1·0.5 + 0.5·1.5)
  # = 0.625. Pair 1: errors (−3, 0), slopes (−1, 0) → ½(0·(−3) + (−1)·0) = 0.
  fn = jax.jit(rm.double_sampled_return_loss, static_argnums=3) if jit else \
      rm.double_sampled_return_loss
  margin, sums, returns = jnp.array([1.0, 0.0]), jnp.array([[0.5, 1.5], [-3.0, 0.0]]), \
      jnp.array([1.0, 0.0])
  assert float(fn(margin, sums, returns, 1.0)) == pytest.approx(0.3125)
  # Each estimate's gradient is scaled by the other's slope: ∂/∂sums = ½ (1, 0.5), ½ (0, −1),
  # over 2 pairs; ∂/∂margin = ½ (1.5, −1) / 2.
  d_margin, d_sums = jax.grad(fn, argnums=(0, 1))(margin, sums, returns, 1.0)
  np.testing.assert_allclose(d_sums, [[0.25, 0.125], [0.0, -0.25]])
  np.testing.assert_allclose(d_margin, [0.375, -0.25])
  # Two equal estimates: the Huber loss's own gradient.
  same = jnp.array([[0.5, 0.5], [-3.0, -3.0]])
  np.testing.assert_allclose(
      jax.grad(fn)(margin, same, returns, 1.0),
      jax.grad(lambda m: rm.return_loss(m + same[:, 0], returns, 1.0))(margin))


def hud_episode(rng: np.random.Generator, length: int):
  """(frames, rewards): a HUD bar (top rows, channel 0) whose width is the game's potential
  — it grows by 2 px on a pickup and shrinks by 3 px on a hit, at random steps — over
  per-frame noise; rewards[t] = (width[t+1] − width[t]) / 8, the outcome of step t."""
  events = rng.choice([0, 2, -3], size=length, p=[0.8, 0.12, 0.08])
  width = np.clip(8 + np.concatenate([[0], np.cumsum(events[:-1])]), 0, 16)
  frames = rng.integers(0, 60, (length, 16, 16, 3), dtype=np.uint8)
  for t in range(length):
    frames[t, :4, :width[t], 0] = 220
  rewards = np.append(np.diff(width), 0).astype(np.float32) / 8
  return frames, rewards


RETURNS = rm.RewardConfig(stem=4, channels=(8, 16), embed_dim=32, pool="flatten",
                          return_gap=8, score_batch=16, lr=1e-3)


@pytest.mark.slow
def test_returns_objective_learns_the_hud_potential():
  rng = np.random.default_rng(0)
  train = [hud_episode(rng, 60) for _ in range(6)]
  state = rm.init(jax.random.PRNGKey(0), RETURNS, (16, 16, 3))
  state, metrics = rm.fit(state, [f for f, _ in train], 600, np.random.default_rng(1),
                          batch=32, rewards=[r for _, r in train])
  frames, rewards = hud_episode(rng, 90)
  video = rm.rewards_from_progress(rm.score(state.params, RETURNS, frames))
  windows = lambda r: r[:90].reshape(-1, 6).sum(1)
  # Over 6-step windows, seeds 0–2 (of the data and the net): ρ 0.94 / 0.92 / 0.78, mean
  # error per step 0.035–0.037 against 0.25 a pickup; untrained ρ −0.23 to 0.15, error
  # 0.25–0.58.
  assert rm.spearman(windows(video), windows(rewards)) > 0.7, metrics
  assert np.mean(np.abs(video - rewards)) < 0.06, metrics


def stuck_episode(rng: np.random.Generator, length: int):
  """`hud_episode` where the player is also stuck on some steps (runs of 3–12): a mark in
  the bottom-left corner shows it and each stuck step costs 0.1 more, as holding a move into
  a wall does, while the HUD shows nothing of it."""
  frames, rewards = hud_episode(rng, length)
  stuck = np.zeros(length, bool)
  for start in rng.choice(length, size=length // 15, replace=False):
    stuck[start:start + rng.integers(3, 13)] = True
  frames[stuck, -4:, :4, 1] = 220
  return frames, rewards - 0.1 * stuck, stuck


@pytest.mark.slow
def test_the_rate_pays_for_time_in_a_state_the_potential_cannot_see():
  cfg = dataclasses.replace(RETURNS, rate=True)
  rng = np.random.default_rng(0)
  train = [stuck_episode(rng, 60) for _ in range(6)]
  state = rm.init(jax.random.PRNGKey(0), cfg, (16, 16, 3))
  state, metrics = rm.fit(state, [e[0] for e in train], 600, np.random.default_rng(1),
                          batch=32, rewards=[e[1] for e in train])
  frames, rewards, stuck = stuck_episode(rng, 90)
  _, _, rate = rm.embed(state.params, cfg, frames)
  _, video = rm.video_rewards(state.params, cfg, frames)
  # Seeds 0–2 (data and net): rate −0.095 / −0.100 / −0.113 on stuck frames, 0.004 / 0.004 /
  # −0.007 on the others; 6-step windows ρ 0.98 / 0.99 / 0.88; the episode's return off by
  # 0.39 / 0.20 / 0.74 (30–43 stuck steps). Without the rate: ρ 0.58 / 0.64 / 0.57, the
  # return off by 3.7 / 3.9 / 2.5.
  assert np.mean(rate[stuck]) < -0.06 and abs(np.mean(rate[~stuck])) < 0.02, metrics
  windows = lambda r: r[:90].reshape(-1, 6).sum(1)
  assert rm.spearman(windows(video), windows(rewards)) > 0.7, metrics
  assert np.sum(video) == pytest.approx(np.sum(rewards), abs=0.25 + 0.03 * np.sum(stuck))


def test_return_pairs_lie_within_an_episode_and_the_gap():
  rng = np.random.default_rng(0)
  episode, start, end = rm.sample_return_pairs(rng, [2, 30, 6], 4000, max_gap=8)
  lengths = np.array([2, 30, 6])[episode]
  assert np.all((start >= 0) & (end < lengths) & (end - start >= 1) & (end - start <= 8))
  # Episodes drawn by their steps (1 : 29 : 5); a 2-frame episode only has the pair (0, 1).
  np.testing.assert_allclose(np.bincount(episode) / 4000, np.array([1, 29, 5]) / 35, atol=0.02)
  assert set(zip(start[episode == 0], end[episode == 0])) == {(0, 1)}
  assert set(np.unique(end - start)) == set(range(1, 9))
  with pytest.raises(ValueError, match="at least 2 frames"):
    rm.sample_return_pairs(rng, [1, 1], 4, max_gap=8)


def test_augment_pairs_shares_one_colour_change_per_pair():
  rng = np.random.default_rng(0)
  frame = np.zeros((4, 4, 3), np.uint8)
  frame[..., 0], frame[..., 1], frame[..., 2] = 100, 150, 200
  pairs = np.stack([np.stack([frame, frame])] * 64)
  out = deaths.augment_colours(rng, pairs)
  np.testing.assert_array_equal(out[:, 0], out[:, 1])
  # Each pair's pixel is a permutation of (100, 150, 200) times one factor in [0.7, 1.3].
  factors = np.sort(out[:, 0, 0, 0].astype(float), axis=-1) / np.array([100, 150, 200])
  assert np.all(factors.max(-1) - factors.min(-1) < 0.02)
  assert np.all((factors > 0.69) & (factors < 1.31))
  assert len({tuple(np.argsort(p[0, 0, 0])) for p in out}) == 6


def progress_episode(rng: np.random.Generator, length: int) -> np.ndarray:
  """Frames whose filled fraction grows with time (a bar, rows top to bottom), under
  per-frame noise, so progress is visible but no single pixel gives it away exactly."""
  frames = rng.integers(0, 60, (length, 16, 16, 3), dtype=np.uint8)
  for t in range(length):
    rows = int(round(16 * t / (length - 1)))
    frames[t, :rows, :, 1] = 200
  return frames


def test_ranking_learns_monotone_progress():
  rng = np.random.default_rng(0)
  train = [progress_episode(rng, int(n)) for n in rng.integers(40, 80, size=4)]
  state = rm.init(jax.random.PRNGKey(0), TINY, (16, 16, 3))
  state, metrics = rm.fit(state, train, 150, np.random.default_rng(1), batch=32)
  held_out = progress_episode(rng, 64)
  progress = rm.score(state.params, TINY, held_out)
  assert progress.shape == (64,)
  # Measured 0.976–0.985 over three seeds (−0.66 to 0.12 before training).
  assert rm.spearman(progress, np.arange(64)) > 0.9, metrics


def test_score_in_pieces_equals_one_pass():
  frames = np.random.default_rng(2).integers(0, 256, (13, 16, 16, 3), dtype=np.uint8)
  state = rm.init(jax.random.PRNGKey(3), TINY, (16, 16, 3))
  z, progress, rate = rm.embed(state.params, TINY, frames)  # pieces of 8, the last padded
  z_ref, progress_ref, rate_ref = rm.ProgressNet(TINY).apply(state.params, frames)
  np.testing.assert_array_equal(rate, np.zeros(13))  # no rate head without cfg.rate
  np.testing.assert_array_equal(rate_ref, np.zeros(13))
  np.testing.assert_allclose(progress, progress_ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(z, z_ref, rtol=1e-5, atol=1e-6)


def test_rewards_from_progress_by_hand():
  np.testing.assert_allclose(rm.rewards_from_progress([0.0, 1.0, 3.0], scale=2.0), [2, 4, 0])
  # ((1 − 0) + 0.5) · 2 = 3, ((3 − 1) − 1) · 2 = 2; the last frame's rate is not paid.
  np.testing.assert_allclose(
      rm.rewards_from_progress([0.0, 1.0, 3.0], scale=2.0, rate=[0.5, -1.0, 7.0]), [3, 2, 0])
  np.testing.assert_allclose(rm.rewards_from_progress([5.0]), [0])


def test_spearman_by_hand_with_ties():
  # Ranks (0, 1.5, 1.5, 3) and (0, 1, 2, 3): centred (−1.5, 0, 0, 1.5) · (−1.5, −.5, .5, 1.5)
  # = 4.5; norms² 4.5 and 5 → 4.5 / √22.5 = 0.948683.
  assert rm.spearman([1, 2, 2, 3], [10, 20, 30, 40]) == pytest.approx(0.9486833)
  assert rm.spearman([3, 2, 1], [1, 2, 3]) == pytest.approx(-1.0)
  assert np.isnan(rm.spearman([1, 1, 1], [1, 2, 3]))


def test_sample_pairs_is_uniform_over_ordered_pairs_with_the_gap():
  rng = np.random.default_rng(0)
  episode, earlier, later = rm.sample_pairs(rng, [5, 2], 60000, min_gap=2)
  assert np.all(episode == 0)  # the 2-frame episode has no pair 2 apart
  expected = [(i, j) for i, j in itertools.combinations(range(5), 2) if j - i >= 2]
  counts = {pair: 0 for pair in expected}
  for pair in zip(earlier.tolist(), later.tolist()):
    counts[pair] += 1  # a KeyError would be a pair outside the allowed set
  np.testing.assert_allclose(np.array(list(counts.values())) / 60000, 1 / len(expected),
                             atol=0.01)


def test_death_pairs_rank_a_life_s_last_frames_below_its_past():
  rng = np.random.default_rng(0)
  # Life 0 (10 frames) died, life 1 (8 frames) was cut, life 2 (3 frames) died too short.
  life, worse, better = rm.sample_death_pairs(rng, [10, 8, 3], [True, False, True], 4000,
                                              window=3)
  assert np.all(life == 0)
  assert set(worse) == {7, 8, 9} and set(better) == set(range(7))
  cfg = rm.RewardConfig(min_gap=2, death_window=3, death_fraction=0.25)
  life, worse, better = rm.sample_training_pairs(rng, [10, 8, 3], [True, False, True], 4000,
                                                 cfg)
  death = worse > better
  assert death.sum() == 1000 and np.all(life[death] == 0)
  # Progress pairs never reach into life 0's window; life 2 is too short for a death pair
  # but keeps its progress pair (0, 2).
  assert worse[~death & (life == 0)].max() < 7 and better[~death & (life == 0)].max() < 7
  assert set(zip(worse[life == 2], better[life == 2])) == {(0, 2)}
  assert better[~death & (life == 1)].max() == 7
  # Without deaths (or death_window 0) every pair is a progress pair.
  _, worse, better = rm.sample_training_pairs(rng, [10, 8], None, 100, cfg)
  assert np.all(worse < better)
  with pytest.raises(ValueError, match="died must have one entry per life"):
    rm.sample_training_pairs(rng, [10, 8], [True], 8, cfg)


def test_bad_inputs_raise_clear_errors():
  with pytest.raises(ValueError, match="objective must be one of"):
    rm.RewardConfig(objective="clock")
  with pytest.raises(ValueError, match="return_gap must be >= 1"):
    rm.RewardConfig(return_gap=0)
  with pytest.raises(ValueError, match="rate is a term of the returns objective"):
    rm.RewardConfig(objective="progress", rate=True)
  with pytest.raises(ValueError, match="rate must match progress"):
    rm.rewards_from_progress([0.0, 1.0], rate=[0.0])
  state = rm.init(jax.random.PRNGKey(0), RETURNS, (16, 16, 3))
  frames = np.zeros((5, 16, 16, 3), np.uint8)
  with pytest.raises(ValueError, match="needs `rewards`, one f32"):
    rm.fit(state, [frames], 1, np.random.default_rng(0))
  with pytest.raises(ValueError, match="needs `rewards`, one f32"):
    rm.fit(state, [frames], 1, np.random.default_rng(0), rewards=[np.zeros(4, np.float32)])
  with pytest.raises(ValueError, match="min_gap"):
    rm.RewardConfig(min_gap=0)
  with pytest.raises(ValueError, match="death_fraction"):
    rm.RewardConfig(death_fraction=1.0)
  with pytest.raises(ValueError, match="uint8"):
    rm.score(None, TINY, np.zeros((2, 16, 16, 3), np.float32))
  with pytest.raises(ValueError, match="no episode"):
    rm.sample_pairs(np.random.default_rng(0), [3], 4, min_gap=3)
