"""Fixtures of the latent-learner tests: their action space, a factory of small experiment
configs, and one initialised world model per latent kind, built once per test process."""
import jax
import jax.numpy as jnp
import pytest

from mbjax.agents import world_model as wm_lib
from mbjax.envs.spaces import HybridActionSpec
from mbjax.train import config as config_lib


@pytest.fixture(scope="session")
def spec():
  return HybridActionSpec(continuous_dim=2, branches=(3,))


@pytest.fixture(scope="session")
def small_config():
  """`small_config(classes=4)`: the base config with a small world model (`classes` 0 for
  Gaussian latents) and small dream and EFE actor-critics; a fresh config per call."""

  def make(classes=4):
    cfg = config_lib.base_config()
    cfg.world_model.update(deter=32, stoch=4, classes=classes, hidden=32, seq_len=8)
    for section in (cfg.dream, cfg.efe):
      section.update(hidden_sizes=(32,), horizon=5, num_starts=16)
    return cfg

  return make


@pytest.fixture(scope="session", params=[4, 0], ids=["categorical", "gaussian"])
def model_and_params(request, small_config, spec):
  cfg = small_config(classes=request.param)
  model = wm_lib.make_world_model(cfg.world_model, (5,))
  state = wm_lib.init(jax.random.PRNGKey(0), model, wm_lib.make_optimizer(cfg.world_model),
                      (5,), jnp.float32, wm_lib.action_vector_size(spec))
  return cfg, model, state.params
