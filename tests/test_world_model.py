"""World model, dream and Active-Inference learners: closed forms against hand-computed
values, λ-returns against a loop, observe/imagine shapes and resets, gradient isolation in
the apex step, and a small learning check."""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mbjax.agents import apex, dream, efe, ppo
from mbjax.agents import world_model as wm_lib
from mbjax.agents.kl import categorical_kl, gaussian_kl
from mbjax.agents.returns import lambda_returns
from mbjax.agents.world_model import resort_and_shift
from mbjax.envs.spaces import HybridActionSpec
from mbjax.nets.hybrid import HybridDistribution
from mbjax.train import config as config_lib

SPEC = HybridActionSpec(continuous_dim=2, branches=(3,))


def _config(classes=4):
  cfg = config_lib.base_config()
  cfg.world_model.update(deter=32, stoch=4, classes=classes, hidden=32, seq_len=8)
  for section in (cfg.dream, cfg.efe):
    section.update(hidden_sizes=(32,), horizon=5, num_starts=16)
  return cfg


@pytest.mark.parametrize("jit", [False, True])
def test_gaussian_kl_hand_computed(jit):
  fn = jax.jit(gaussian_kl) if jit else gaussian_kl
  # KL(N(0,1) ‖ N(1,2²)) = log 2 + (1 + 1)/8 − ½ ; KL(N(1,1) ‖ N(1,1)) = 0.
  value = fn(jnp.array([0.0, 1.0]), jnp.array([1.0, 1.0]), jnp.array([1.0, 1.0]),
             jnp.array([2.0, 1.0]))
  np.testing.assert_allclose(value, math.log(2) + 0.25 - 0.5, rtol=1e-6)


@pytest.mark.parametrize("jit", [False, True])
def test_categorical_kl_hand_computed(jit):
  fn = jax.jit(categorical_kl) if jit else categorical_kl
  q = jnp.log(jnp.array([[[0.5, 0.5], [0.9, 0.1]]]))
  p = jnp.log(jnp.array([[[0.25, 0.75], [0.9, 0.1]]]))
  expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)  # second latent: 0
  np.testing.assert_allclose(fn(q, p), [expected], rtol=1e-6)


def test_hybrid_kl_divergence_hand_computed():
  spec = HybridActionSpec(1, (2,))
  mask = jnp.array([[True, True]])
  a = HybridDistribution.create(spec, jnp.array([[0.0]]), jnp.array([0.0]),
                                (jnp.log(jnp.array([[0.5, 0.5]])),), mask)
  b = HybridDistribution.create(spec, jnp.array([[1.0]]), jnp.array([math.log(2.0)]),
                                (jnp.log(jnp.array([[0.25, 0.75]])),), mask)
  expected = (math.log(2) + 0.25 - 0.5) + (0.5 * math.log(2) + 0.5 * math.log(0.5 / 0.75))
  np.testing.assert_allclose(a.kl_divergence(b), [expected], rtol=1e-5)


@pytest.mark.parametrize("jit", [False, True])
def test_lambda_returns_match_loop(jit):
  rng = np.random.default_rng(0)
  rewards = rng.normal(size=(6, 3)).astype(np.float32)
  continues = rng.uniform(size=(6, 3)).astype(np.float32)
  continues[2, 1] = 0.0
  next_values = rng.normal(size=(6, 3)).astype(np.float32)
  gamma, lam = 0.9, 0.8
  expected = np.zeros_like(rewards)
  following = next_values[-1]
  for t in reversed(range(6)):
    expected[t] = rewards[t] + gamma * continues[t] * (
        (1 - lam) * next_values[t] + lam * following)
    following = expected[t]
  fn = jax.jit(lambda_returns, static_argnums=(3, 4)) if jit else lambda_returns
  np.testing.assert_allclose(fn(rewards, continues, next_values, gamma, lam), expected,
                             rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module", params=[4, 0], ids=["categorical", "gaussian"])
def model_and_params(request):
  cfg = _config(classes=request.param)
  model = wm_lib.make_world_model(cfg.world_model, (5,))
  state = wm_lib.init(jax.random.PRNGKey(0), model, wm_lib.make_optimizer(cfg.world_model), (5,),
                      jnp.float32, wm_lib.action_vector_size(SPEC))
  return cfg, model, state.params


def test_observe_and_imagine_shapes_and_resets(model_and_params):
  _, model, params = model_and_params
  length, batch = 6, 3
  rng = np.random.default_rng(1)
  obs = rng.normal(size=(length, batch, 5)).astype(np.float32)
  actions = rng.normal(size=(length, batch, 5)).astype(np.float32)
  is_first = np.zeros((length, batch), bool)
  is_first[0] = is_first[3] = True
  observe = jax.jit(lambda o, a, f, k: wm_lib.observe(model, params, o, a, f, k))
  posts, priors = observe(obs, actions, is_first, jax.random.PRNGKey(2))
  rssm = model.rssm
  assert posts.deter.shape == (length, batch, rssm.deter)
  assert posts.stoch.shape == (length, batch, rssm.stoch_size)
  assert priors.features.shape == posts.features.shape
  # A reset at t=3 forgets everything before it: change the history, keep the future.
  other = obs.copy()
  other[:3] += 10.0
  posts_other, _ = observe(other, actions + 1.0 * (np.arange(length) < 3)[:, None, None],
                           is_first, jax.random.PRNGKey(2))
  np.testing.assert_array_equal(posts.features[3:], posts_other.features[3:])
  assert not np.allclose(posts.features[:3], posts_other.features[:3])

  def policy(features, key):
    return jnp.zeros(features.shape[:-1] + (5,)), jnp.zeros(features.shape[:-1])

  start = jax.tree.map(lambda x: x[-1], posts)
  states, raw = wm_lib.imagine(model, params, policy, start, 4, jax.random.PRNGKey(3))
  assert states.features.shape == (5, batch, posts.features.shape[-1])
  np.testing.assert_array_equal(states.features[0], start.features)
  assert raw.shape == (4, batch)


@pytest.mark.parametrize("rssm_layers", [1, 0])
@pytest.mark.parametrize("jit", [False, True])
def test_prior_after_each_action_equals_a_separate_transition(rssm_layers, jit):
  """The reward and continue heads read the prior after (s_t, a_t). The filter's scan
  already computes it as step t+1's prior from the carried state, also where o_{t+1}
  starts a new episode (the terminal transition); it must equal stepping s_t with a_t."""
  cfg = _config(classes=0)
  cfg.world_model.rssm_layers = rssm_layers
  model = wm_lib.make_world_model(cfg.world_model, (5,))
  params = wm_lib.init(jax.random.PRNGKey(0), model, wm_lib.make_optimizer(cfg.world_model), (5,),
                       jnp.float32, wm_lib.action_vector_size(SPEC)).params
  length, batch = 6, 3
  rng = np.random.default_rng(4)
  is_first = np.zeros((length, batch), bool)
  is_first[0] = is_first[3, 1] = True
  sequence = wm_lib.Sequence(rng.normal(size=(length, batch, 5)).astype(np.float32),
                             rng.normal(size=(length, batch, 5)).astype(np.float32),
                             np.zeros((length, batch), np.float32),
                             np.zeros((length, batch), bool), is_first)
  rollforward = lambda p, b, k: wm_lib._rollforward(p, model, b, k)
  out = (jax.jit(rollforward) if jit else rollforward)(params, sequence, jax.random.PRNGKey(1))
  flat = lambda x: x.reshape((-1,) + x.shape[2:])
  expected = wm_lib.img_step(model, params, jax.tree.map(flat, out.posts),
                             flat(sequence.action), jax.random.PRNGKey(2))
  np.testing.assert_allclose(out.next_prior.deter, expected.deter, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out.next_prior.stats, expected.stats, rtol=1e-5, atol=1e-6)
  # ...and it is not the reset prior that the filter itself uses for env 1 at t = 3.
  after_reset = out.priors.deter[3, 1]
  assert not np.allclose(out.next_prior.deter.reshape(length, batch, -1)[2, 1], after_reset)


def test_pixel_embedding_scales_uint8_frames_for_sequences_and_single_steps():
  """observe() embeds [L, B, H, W, 3] frames; they must reach the CNN as pixels / 255,
  exactly like a [B, H, W, 3] batch (a rank test on the input once routed sequences of
  frames through the vector path's symlog)."""
  cfg = _config()
  model = wm_lib.make_world_model(cfg.world_model, (16, 16, 3))
  params = wm_lib.init(jax.random.PRNGKey(0), model, wm_lib.make_optimizer(cfg.world_model), (16, 16, 3),
                       jnp.uint8, wm_lib.action_vector_size(SPEC)).params
  frames = np.random.default_rng(0).integers(0, 256, (2, 3, 16, 16, 3), dtype=np.uint8)
  embed = lambda x: model.apply(params, x, method=wm_lib.WorldModel.embed)
  sequence = embed(frames)
  single = jnp.stack([embed(frames[t]) for t in range(2)])
  np.testing.assert_allclose(sequence, single, rtol=1e-5, atol=1e-6)
  direct = model.apply(params, frames[0].astype(np.float32),
                       method=lambda m, x: m.encoder(x))
  np.testing.assert_allclose(sequence[0], direct, rtol=1e-5, atol=1e-6)


def test_free_energy_terms_hand_computed(model_and_params):
  cfg, model, params = model_and_params
  # Make the decoder's output constant: mean = b_μ, std = exp(b_σ), whatever the state.
  decoder = dict(params["params"]["decoder"])
  b_mean = np.array([0.5, -1.0, 0.0, 2.0, 0.1], np.float32)
  b_log_std = np.array([0.0, np.log(0.5), 0.2, -0.3, 0.0], np.float32)
  decoder["mean"] = {"kernel": jnp.zeros_like(decoder["mean"]["kernel"]), "bias": b_mean}
  decoder["log_std"] = {"kernel": jnp.zeros_like(decoder["log_std"]["kernel"]),
                        "bias": b_log_std}
  params = {"params": {**params["params"], "decoder": decoder}}
  preference = efe.Preference(jnp.array([1.0, 0.0, 0.0, 0.0, 0.0]), jnp.full((5,), 4.0))
  features = jnp.zeros((2, model.rssm.deter + model.rssm.stoch_size))
  risk, ambiguity = jax.jit(lambda f: efe.free_energy_terms(model, params, f, preference))(
      features)
  std = np.exp(b_log_std)
  expected_risk = sum(math.log(2.0 / s) + (s * s + (m - mu) ** 2) / 8.0 - 0.5
                      for m, s, mu in zip(b_mean, std, [1.0, 0, 0, 0, 0]))
  expected_ambiguity = sum(0.5 * math.log(2 * math.pi * math.e * s * s) for s in std)
  np.testing.assert_allclose(risk, [expected_risk] * 2, rtol=1e-5)
  np.testing.assert_allclose(ambiguity, [expected_ambiguity] * 2, rtol=1e-5)


def test_preference_moves_towards_high_reward_observations():
  section = ml_collections.ConfigDict({"preference_quantile": 0.75, "preference_rate": 0.5})
  obs = jnp.array([[0.0], [1.0], [2.0], [3.0]])
  reward = jnp.array([0.0, 0.1, 0.2, 5.0])  # only the last is at or above the quantile
  preference = efe.update_preference(efe.Preference.create(1), obs, reward, section)
  target = math.log1p(3.0)  # symlog of the preferred observation
  np.testing.assert_allclose(preference.mean, [0.5 * target], rtol=1e-6)
  np.testing.assert_allclose(preference.var, [0.5], rtol=1e-6)  # ½·1 + ½·0


def _rollout(rng, length=16, envs=2, obs_dim=5):
  is_first = np.zeros((length, envs), bool)
  is_first[0] = True
  terminated = np.zeros((length, envs), bool)
  terminated[9, 0] = True
  is_first[10, 0] = True
  return ppo.Rollout(
      obs=rng.normal(size=(length, envs, obs_dim)).astype(np.float32), is_first=is_first,
      carry=(), mask=np.ones((length, envs, 3), bool),
      action=SPEC.zeros((length, envs))._replace(
          continuous=rng.normal(size=(length, envs, 2)).astype(np.float32)),
      log_prob=np.full((length, envs), -2.0, np.float32),
      value=np.zeros((length, envs), np.float32),
      reward=rng.normal(size=(length, envs)).astype(np.float32), terminated=terminated,
      truncated=np.zeros((length, envs), bool),
      next_value=np.zeros((length, envs), np.float32))


def test_apex_step_keeps_gradients_apart():
  """PPO's update inside the apex step equals PPO alone: the world model, dream and EFE
  learners never touch the policy unless distillation is switched on."""
  cfg = _config()
  cfg.ppo.num_minibatches = 2
  network = ppo.make_network(cfg.network, SPEC)
  optimizer = ppo.make_optimizer(cfg.ppo, 10)
  learners = apex.make_learners(cfg, SPEC, (5,))
  agent = ppo.init(jax.random.PRNGKey(0), network, optimizer, (5,), jnp.float32)
  aux = apex.init(jax.random.PRNGKey(1), learners, (5,), jnp.float32)
  rollout = _rollout(np.random.default_rng(4))
  key = jax.random.PRNGKey(5)
  step = jax.jit(lambda a, x, r, k: apex.update(a, x, r, k, learners=learners,
                                                network=network, optimizer=optimizer))
  new_agent, new_aux, metrics = step(agent, aux, rollout, key)
  alone, _ = ppo.update(agent, rollout, jax.random.split(key, 7)[0], cfg.ppo, network=network,
                        optimizer=optimizer)
  jax.tree.map(np.testing.assert_array_equal, new_agent.params, alone.params)
  for name in ("world_model", "dream", "efe"):
    before = jax.tree.leaves(getattr(aux, name))
    after = jax.tree.leaves(getattr(new_aux, name))
    assert any(not np.array_equal(a, b) for a, b in zip(before, after)), name
  for key_name in ("wm/recon", "wm/kl", "dream/return", "efe/risk", "efe/ambiguity"):
    assert np.isfinite(metrics[key_name]), key_name

  # With distillation on, the policy moves towards the dream actor; a linear schedule at
  # the end of the run weighs the teacher by 0: PPO alone again. (One compile: `progress`
  # is traced.)
  cfg.served.distill_from, cfg.served.distill_coef = "dream", 1.0
  cfg.served.distill_schedule = "linear"
  distill_step = jax.jit(lambda a, x, r, k, p: apex.update(
      a, x, r, k, learners=learners, network=network, optimizer=optimizer, progress=p))
  distilled, _, metrics = distill_step(agent, aux, rollout, key, 0.0)
  assert metrics["loss/distill"] > 0 and metrics["loss/distill_coef"] == 1.0
  assert not np.array_equal(jax.tree.leaves(distilled.params)[0],
                            jax.tree.leaves(alone.params)[0])
  ended, _, metrics = distill_step(agent, aux, rollout, key, 1.0)
  assert metrics["loss/distill"] > 0 and metrics["loss/distill_coef"] == 0.0
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               ended.params, alone.params)


@pytest.mark.parametrize("jit", [False, True])
def test_distill_coef_schedules_hand_computed(jit):
  cfg = _config()
  cfg.served.distill_coef = 0.1
  for schedule, end, cases in (
      ("constant", 1.0, ((0.0, 0.1), (0.5, 0.1), (0.999, 0.1))),
      ("constant", 0.25, ((0.0, 0.1), (0.24, 0.1), (0.25, 0.0), (0.6, 0.0))),
      ("linear", 1.0, ((0.0, 0.1), (0.25, 0.075), (1.0, 0.0), (1.5, 0.0))),
      ("linear", 0.5, ((0.0, 0.1), (0.125, 0.075), (0.5, 0.0), (0.9, 0.0)))):
    cfg.served.distill_schedule, cfg.served.distill_end = schedule, end
    coef = lambda progress: apex.distill_coef(cfg.served, progress)
    coef = jax.jit(coef) if jit else coef
    for progress, expected in cases:
      np.testing.assert_allclose(coef(progress), expected, rtol=1e-6, atol=1e-9,
                                 err_msg=f"{schedule} to {end} at {progress}")


def test_distill_end_is_validated():
  cfg = _config()
  cfg.served.distill_end = 0.0
  with pytest.raises(ValueError, match="served.distill_end=0.0"):
    config_lib.validate(cfg)


@pytest.mark.slow
def test_world_model_learns_a_linear_system():
  """o_{t+1} = R o_t (a rotation) with a small Gaussian-latent model: after 300 steps the
  one-step error is clearly below that of copying the last observation (measured
  2026-11-26: 0.054 vs 0.094) and far below its starting value (0.56)."""
  cfg = _config(classes=0)
  cfg.world_model.lr = 1e-3
  model = wm_lib.make_world_model(cfg.world_model, (2,))
  optimizer = wm_lib.make_optimizer(cfg.world_model)
  state = wm_lib.init(jax.random.PRNGKey(0), model, optimizer, (2,), jnp.float32, 5)
  angle = 0.5
  rotation = jnp.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])

  def batch(key):
    start = jax.random.normal(key, (16, 2))
    obs = jax.lax.scan(lambda o, _: (o @ rotation.T, o), start, None, 16)[1]
    is_first = jnp.zeros((16, 16), bool).at[0].set(True)
    return wm_lib.Sequence(obs, jnp.zeros((16, 16, 5)), jnp.zeros((16, 16)),
                           jnp.zeros((16, 16), bool), is_first)

  @jax.jit
  def train(state, key):
    def step(state, key):
      data_key, update_key = jax.random.split(key)
      state, _, metrics = wm_lib.update(state, batch(data_key), update_key, cfg.world_model,
                                        model=model, optimizer=optimizer)
      return state, metrics
    return jax.lax.scan(step, state, jax.random.split(key, 300))

  _, metrics = train(state, jax.random.PRNGKey(1))
  final_error = float(metrics["wm/one_step_error"][-10:].mean())
  baseline = float(metrics["wm/copy_last_error"][-10:].mean())
  assert final_error < 0.75 * baseline, (final_error, baseline)
  assert final_error < float(metrics["wm/one_step_error"][:10].mean()) / 5


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


def test_polar_entities_move_against_the_agents_predicted_move():
  """With `agent_position` the entity head takes the agent's move from the plain delta
  head's prediction of the agent's position: with that head outputting a symlog change of
  the position (everything else at zero) and the entity head at zero, each entity's
  relative position moves by −(the agent's move) / scale, and its distance follows."""
  cfg = _config()
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


def test_world_model_lr_decays_to_zero_over_its_updates():
  """Cosine decay over 2 updates: lr, lr/2, then 0. With a constant gradient each Adam
  step is the learning rate itself (bias-corrected m / √v = 1)."""
  cfg = _config()
  cfg.world_model.lr_decay_updates = 2
  optimizer = wm_lib.make_optimizer(cfg.world_model)
  params = {"w": jnp.ones(3)}
  state = optimizer.init(params)
  steps = []
  for _ in range(3):
    updates, state = optimizer.update({"w": jnp.ones(3)}, state, params)
    steps.append(float(jnp.abs(updates["w"]).max()))
  np.testing.assert_allclose(steps, [cfg.world_model.lr, cfg.world_model.lr / 2, 0.0],
                             rtol=1e-4, atol=1e-12)
  cfg.world_model.lr_decay_updates = -1
  with pytest.raises(ValueError, match="lr_decay_updates=-1: expected ≥ 0"):
    wm_lib.make_optimizer(cfg.world_model)


def test_entity_slots_are_validated():
  cfg = _config()
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


@pytest.mark.parametrize("jit", [False, True])
def test_delta_head_reads_the_action_itself(jit):
  """The one-step head reads o_t and a_t: with o_t held fixed, a different a_t changes the
  predicted delta (once the zero-initialised output layer has moved), in the plain head's
  dimensions and in an entity block's."""
  cfg = _config()
  cfg.world_model.predict_delta = True
  cfg.world_model.entity_slots = ((3, 2, 3, 1),)
  model = wm_lib.make_world_model(cfg.world_model, (9,))
  params = wm_lib.init(jax.random.PRNGKey(0), model, wm_lib.make_optimizer(cfg.world_model), (9,),
                       jnp.float32, 5).params
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda x: x + 0.3 * jnp.asarray(rng.normal(size=x.shape), x.dtype),
                        params)
  obs = jnp.asarray(rng.normal(size=(2, 9)), jnp.float32)
  obs = obs.at[:, (3, 6)].set(1.0).at[:, 4].set(0.2).at[:, 7].set(0.7)  # sorted, present
  delta = lambda action: model.apply(params, obs, action,
                                     method=wm_lib.WorldModel.next_obs_delta)
  delta = jax.jit(delta) if jit else delta
  still, moving = jnp.zeros((2, 5)), jnp.zeros((2, 5)).at[:, 0].set(1.0)
  change = np.abs(np.asarray(delta(moving)) - np.asarray(delta(still)))
  assert change[:, :3].min() > 0.0 and change[:, (4, 5, 7, 8)].min() > 0.0


def test_delta_head_starts_as_copy_last_and_errors_are_per_dimension():
  """With `predict_delta` the one-step prediction is o_t + head(...), and the head's output
  layer starts at zero: at initialisation the model's per-dimension errors equal copying
  o_t, computed here by hand in symlog space, over the steps that stay in an episode."""
  cfg = _config()
  cfg.world_model.predict_delta = True
  model = wm_lib.make_world_model(cfg.world_model, (3,))
  params = wm_lib.init(jax.random.PRNGKey(0), model, wm_lib.make_optimizer(cfg.world_model), (3,),
                       jnp.float32, 5).params
  obs = np.array([[[0.0, 1.0, -2.0]], [[1.0, 1.0, 0.0]], [[3.0, 0.0, 0.0]]], np.float32)
  is_first = np.array([[True], [False], [True]])  # o_2 starts a new episode
  batch = wm_lib.Sequence(obs, np.zeros((3, 1, 5), np.float32), np.zeros((3, 1), np.float32),
                          np.zeros((3, 1), bool), is_first)
  key = jax.random.PRNGKey(1)
  # One compiled program for both: the per-dimension errors and the loss's metrics.
  (model_sq, copy_sq, inside), metrics = jax.jit(lambda p, b: (
      wm_lib.one_step_squared_errors(p, model, b, key),
      wm_lib.loss(p, b, key, cfg.world_model, model=model)[1][1]))(params, batch)
  log2 = math.log(2.0)
  np.testing.assert_allclose(copy_sq[0, 0], [log2 ** 2, 0.0, math.log(3.0) ** 2], rtol=1e-6)
  np.testing.assert_allclose(model_sq, copy_sq, rtol=1e-6)
  np.testing.assert_array_equal(inside, [[True], [False]])
  expected = (log2 ** 2 + math.log(3.0) ** 2) / 3  # mean over dims of the one inside step
  np.testing.assert_allclose(metrics["wm/one_step_error"], expected, rtol=1e-6)
  np.testing.assert_allclose(metrics["wm/copy_last_error"], expected, rtol=1e-6)
  with pytest.raises(ValueError, match="predict_delta=True needs vector observations"):
    wm_lib.make_world_model(cfg.world_model, (8, 8, 3)).init(
        jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3), jnp.uint8), jnp.zeros((1, 5)),
        jnp.ones((1,), bool), jax.random.PRNGKey(0))
