"""Offline entry to the apex learners (`mbjax.train.offline`): window sampling by hand,
episode validation, phase semantics, and a dream policy learned from random CartPole
episodes that beats the policy that recorded them."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mbjax.envs import registry
from mbjax.envs.spaces import HybridAction, HybridActionSpec
from mbjax.train import config as config_lib
from mbjax.train import offline

SPEC = HybridActionSpec(continuous_dim=1, branches=(3,))


def _episode(length, start, name=None):
  steps = np.arange(start, start + length)
  episode = {"obs": steps[:, None].astype(np.float32),
             "action_continuous": (steps[:, None] / 100.0).astype(np.float32),
             "action_discrete": (steps % 3)[:, None], "reward": steps.astype(np.float32),
             "terminated": steps == start + length - 1}
  if name:
    episode["name"] = name
  return episode


@pytest.mark.parametrize("jit", [False, True])
def test_sample_windows_are_consecutive_steps_with_resets(jit):
  data = offline.EpisodeData.concatenate([_episode(5, 0), _episode(7, 5)], SPEC)
  np.testing.assert_array_equal(np.flatnonzero(data.is_first), [0, 5])
  sample = lambda key: offline.sample_windows(data, key, 64, 4, SPEC)
  windows = (jax.jit(sample) if jit else sample)(jax.random.PRNGKey(0))
  assert windows.obs.shape == (4, 64, 1) and windows.action.shape == (4, 64, 1 + 3)
  start = np.asarray(windows.obs[0, :, 0]).astype(int)
  assert start.min() >= 0 and start.max() <= 12 - 4
  for b, s in enumerate(start):
    np.testing.assert_array_equal(windows.obs[:, b, 0], np.arange(s, s + 4))
    np.testing.assert_array_equal(windows.reward[:, b], np.arange(s, s + 4))
    # The action vector: continuous, then the one-hot branch.
    np.testing.assert_allclose(windows.action[:, b, 0], np.arange(s, s + 4) / 100.0, rtol=1e-6)
    np.testing.assert_array_equal(windows.action[:, b, 1:].argmax(-1), np.arange(s, s + 4) % 3)
    expected_first = [t == 0 or s + t == 5 for t in range(4)]
    np.testing.assert_array_equal(windows.is_first[:, b], expected_first)


@pytest.mark.parametrize("jit", [False, True])
def test_rare_windows_hold_a_rare_choice_after_their_burn_in(jit):
  common, rare = _episode(12, 0), _episode(12, 0)
  common["action_discrete"] = np.zeros((12, 1), np.int64)
  rare["action_discrete"] = np.zeros((12, 1), np.int64)
  rare["action_discrete"][[1, 9]] = 2  # rare: not branch 0's most common choice (0)
  data = offline.EpisodeData.concatenate([rare], SPEC)
  np.testing.assert_array_equal(data.rare_index, [1, 9])
  sample = lambda key: offline.sample_windows(data, key, 64, 4, SPEC, rare_fraction=0.5,
                                              burn_in=1)
  starts = np.asarray((jax.jit(sample) if jit else sample)(jax.random.PRNGKey(0)).obs[0, :, 0])
  # Step 9 at window position 1..3: starts 6, 7, 8; step 1 at 1..3 would start at 0 or
  # below, so those windows start at 0 (clipped), which still holds it after the burn-in.
  assert set(starts[:32].astype(int)) == {0, 6, 7, 8}
  assert set(starts[32:].astype(int)) - {0, 6, 7, 8}  # the rest uniform over 0..8
  # No rare step: every window uniform, whatever the fraction.
  data = offline.EpisodeData.concatenate([common], SPEC)
  assert data.rare_index.shape == (0,)
  starts = np.asarray(offline.sample_windows(data, jax.random.PRNGKey(0), 64, 4, SPEC, 0.5,
                                             1).obs[0, :, 0])
  assert len(set(starts.astype(int))) == 9


def test_episode_validation_names_the_episode():
  bad = _episode(4, 0, name="run_07")
  bad["reward"][2] = np.nan
  with pytest.raises(ValueError, match="run_07.*finite"):
    offline.EpisodeData.concatenate([bad], SPEC)
  bad = _episode(4, 0, name="run_08")
  bad["action_discrete"][1] = 3
  with pytest.raises(ValueError, match=r"run_08.*branch 0 outside \[0, 3\)"):
    offline.EpisodeData.concatenate([bad], SPEC)
  with pytest.raises(ValueError, match="no episodes"):
    offline.EpisodeData.concatenate([], SPEC)


def _cartpole_episodes(num_episodes, key):
  """Uniform-random CartPole episodes (what recorded the data the dream policy learns from)."""
  env, params = registry.make("CartPole-v1")

  def episode(key):
    obs, state = env.reset(key, params)

    def step(carry, key):
      obs, state, alive = carry
      action_key, env_key = jax.random.split(key)
      action = HybridAction(jnp.zeros((0,)), jax.random.randint(action_key, (1,), 0, 2))
      next_obs, state, reward, terminated, truncated, _ = env.step(env_key, state, action,
                                                                   params)
      out = {"obs": obs, "action_discrete": action.discrete, "reward": reward,
             "terminated": terminated, "alive": alive}
      return (next_obs, state, alive & ~(terminated | truncated)), out

    _, out = jax.lax.scan(step, (obs, state, jnp.bool_(True)), jax.random.split(key, 200))
    return out

  out = jax.device_get(jax.jit(jax.vmap(episode))(jax.random.split(key, num_episodes)))
  episodes = []
  for i in range(num_episodes):
    n = int(out["alive"][i].sum())
    episodes.append({"obs": out["obs"][i, :n], "action_continuous": np.zeros((n, 0)),
                     "action_discrete": out["action_discrete"][i, :n],
                     "reward": out["reward"][i, :n], "terminated": out["terminated"][i, :n]})
  return env, params, episodes


@pytest.mark.slow
def test_dream_policy_learned_offline_beats_the_recording_policy():
  env, params, episodes = _cartpole_episodes(200, jax.random.PRNGKey(0))
  random_return = np.mean([len(e["reward"]) for e in episodes])
  spec = env.action_spec(params)
  cfg = config_lib.base_config()
  # World-model lr 1e-3 (3e-4 needed ~1200 updates to pass). The return is not monotone in
  # the updates and moves with float rounding: under the suite's XLA level 0 (conftest.py)
  # three (data, init) key pairs gave mean dream returns 26 / 23 / 23 at 200 updates,
  # 58 / 34 / 48 at 400, 25 / 75 / 122 at 600 and 77 / 114 / 83 at 800, against random
  # 20.9 / 23.3 / 21.4 (2026-11-27); hence 800 updates.
  cfg.world_model.update(deter=64, stoch=8, classes=8, hidden=64, lr=1e-3)
  cfg.replay.update(seq_len=12, burn_in=4)
  cfg.dream.update(hidden_sizes=(64,), horizon=10, actor_lr=3e-4, critic_lr=3e-4)
  cfg.efe.enabled = False
  trainer = offline.make_offline_trainer(cfg, (4,), jnp.float32, spec)
  data = jax.device_put(offline.EpisodeData.concatenate(episodes, spec))
  update = jax.jit(trainer.update, static_argnums=(2, 3))
  state = jax.jit(trainer.init)(jax.random.PRNGKey(1))
  for _ in range(16):
    state, metrics = update(state, data, True, 50)
  assert int(state.step) == 800
  # (The dream-only phase, train_world_model=False, leaving the world model bit-identical
  # is checked on the video pipeline's dream phase, tests/offline/test_pipeline.py.)

  play = jax.jit(jax.vmap(lambda key: offline.play_latent_policy(
      env, params, trainer.learners, state.aux, key, 500)))
  dream_return = float(play(jax.random.split(jax.random.PRNGKey(2), 32))["return"].mean())
  print(f"random {random_return:.1f}, offline dream policy {dream_return:.1f}")
  assert dream_return > 2.0 * random_return


@pytest.mark.slow
def test_the_dream_actor_imitates_a_teacher_instead_of_the_recorded_actions():
  """Recorded: uniform-random CartPole play. Teacher: push right exactly when the pole
  turns right (the balancing rule). With the behaviour term dominant, the latent actor follows the
  teacher's rule on recorded states (more often than not: the latent must first learn to
  show the pole's turn), and without the teacher it does not."""
  env, params, episodes = _cartpole_episodes(40, jax.random.PRNGKey(0))
  spec = env.action_spec(params)
  cfg = config_lib.base_config()
  cfg.world_model.update(deter=32, stoch=4, classes=4, hidden=32, lr=1e-3)
  cfg.replay.update(seq_len=8, burn_in=2)
  cfg.dream.update(hidden_sizes=(32,), horizon=3, actor_lr=1e-3, bc_scale=100.0)
  cfg.efe.enabled = False
  rule = lambda obs: (obs[:, 3] > 0).astype(jnp.int32)[:, None]

  def teacher(obs, mask, key):
    del mask, key
    return HybridAction(jnp.zeros((obs.shape[0], 0)), rule(obs))

  data = jax.device_put(offline.EpisodeData.concatenate(episodes, spec))
  obs = jnp.asarray(np.concatenate([e["obs"] for e in episodes[:10]]))
  agreement = {}
  for name, chosen in (("teacher", teacher), ("recorded", None)):
    trainer = offline.make_offline_trainer(cfg, (4,), jnp.float32, spec, teacher=chosen)
    state = jax.jit(trainer.init)(jax.random.PRNGKey(1))
    state, _ = jax.jit(trainer.update, static_argnums=(2, 3))(state, data, True, 300)
    initial_carry, step = offline.latent_policy(trainer.learners, state.aux,
                                                deterministic=True)

    def act(carry, inputs):
      o, first = inputs
      carry, action = step(carry, o[None], first[None], spec.all_valid_mask((1,)),
                           jax.random.PRNGKey(0))
      return carry, action.discrete[0, 0]

    firsts = jnp.zeros(len(obs), bool).at[0].set(True)
    _, actions = jax.jit(lambda: jax.lax.scan(act, initial_carry(1), (obs, firsts)))()
    agreement[name] = float(jnp.mean(actions == rule(obs)[:, 0]))
  # 300 updates of a small model: 0.77 against 0.55 (2026-12-07); chance is 0.5.
  assert agreement["teacher"] > 0.7 and agreement["recorded"] < 0.62, agreement
