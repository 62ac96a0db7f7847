"""The Active-Inference head: risk and ambiguity against hand-computed values, and the
preference prior's update towards high-reward observations."""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mbjax.agents import efe


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
