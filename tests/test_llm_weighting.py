"""LLM-assisted merge weights and skill scales: pure parts by hand, the async edge on loopback.

A valid reply changes the weights and the merged parameters; invalid JSON, a timeout and an
HTTP 500 (and a refused connection, an all-zero reply) each fall back with a logged reason; a
jitted loop whose step takes the weights in use as an input never waits for the backend and
trains on exactly the weights it was given: the reply's once it arrives, else the fallback.

At run time AsyncWeights is read once, offline, by experiments/merge.py (`wait`), and nothing
composes skills (`compose_skills`) inside a loop yet: the loop here stands in for one.
"""
import logging
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mbjax.population import llm_weighting as lw
from mbjax.population import merge as merge_lib
from mbjax.runtime import llm
from mbjax.runtime.reference_llm_server import ReferenceLLMServer, last_user_text
from mbjax.runtime.weighting import AsyncWeights

NAMES = ("scout", "tank")


def _fixed(status, text):
  return lambda body: (status, text)


def _weights(server, timeout_s=2.0, request=None):
  cfg = llm.BackendConfig(protocol="openai", base_url=server.url, model="m",
                          timeout_s=timeout_s)
  return AsyncWeights(request or lw.merge_request(NAMES), llm.AsyncChat(llm.ChatClient(cfg)))


def _wait(weights, seconds=3.0):
  """Polls until a reply (valid or not) has been taken in, or `seconds` pass."""
  deadline = time.monotonic() + seconds
  while time.monotonic() < deadline:
    before = (weights.replies, weights.failures)
    weights.current()
    if (weights.replies, weights.failures) != before:
      return
    time.sleep(0.005)
  raise AssertionError("no reply within the wait")


def _jit_merge(vectors, method, shares=None, **kwargs):
  """`weighted_merge` (or the unweighted `merge.merge` when shares is None) under one jit:
  a single compile is ~3x cheaper here than the many small eager ones."""
  if shares is None:
    return jax.jit(lambda v: merge_lib.merge(v, method, **kwargs))(vectors)
  return jax.jit(lambda v: lw.weighted_merge(v, method, shares, **kwargs))(vectors)


# -- pure parts -----------------------------------------------------------------------------

def test_parse_weights_normalises_and_rejects():
  reply = {"weights": {"scout": 0.6, "tank": 0.2}, "rationale": "scout is better"}
  np.testing.assert_allclose(lw.parse_weights(reply, NAMES, 0, 1, True), [0.75, 0.25])
  np.testing.assert_allclose(lw.parse_weights(reply, NAMES, 0, 2, False), [0.6, 0.2])
  with pytest.raises(ValueError, match="all weights are zero"):
    lw.parse_weights({"weights": {"scout": 0, "tank": 0.0}}, NAMES, 0, 1, True)
  with pytest.raises(ValueError, match=r"lack \['tank'\]"):
    lw.parse_weights({"weights": {"scout": 1}}, NAMES, 0, 1, True)
  with pytest.raises(ValueError, match=r"expected within \[0, 1\]"):
    lw.parse_weights({"weights": {"scout": 1.5, "tank": 0}}, NAMES, 0, 1, True)
  # The schema says the same to the client: all names required, no others, range enforced.
  schema = lw.weights_schema(NAMES, 0, 1)
  llm.validate(reply, schema)
  with pytest.raises(ValueError, match="unexpected key 'killer'"):
    llm.validate({"weights": {"scout": 1, "tank": 1, "killer": 1}}, schema)


def test_fallback_merge_weights_by_hand():
  np.testing.assert_allclose(lw.fallback_merge_weights(4), [0.25] * 4)
  # Role 0 standardises to (−1, +1); role 1 is constant and contributes 0 → scores (−½, ½).
  returns = np.array([[1.0, 10.0], [3.0, 10.0]])
  low = 1 / (1 + np.e)
  np.testing.assert_allclose(lw.fallback_merge_weights(2, returns), [low, 1 - low], rtol=1e-6)
  np.testing.assert_allclose(lw.fallback_merge_weights(2, returns, temperature=0.5),
                             [1 / (1 + np.e ** 2), 1 - 1 / (1 + np.e ** 2)], rtol=1e-6)


def test_weighted_merge_uniform_is_unweighted_and_shares_change_it():
  rng = np.random.default_rng(0)
  vectors = [{"w": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)} for _ in range(3)]
  uniform = lw.fallback_merge_weights(3)
  for method in ("mean", "ties"):  # the weights path and the vector-scaling path
    np.testing.assert_array_equal(_jit_merge(vectors, method, uniform, k=0.5)["w"],
                                  _jit_merge(vectors, method, k=0.5)["w"], err_msg=method)
  # Hand values: τ1 = [1, 0, −1], τ2 = [0, 1, 1], shares (0.8, 0.2) → N·w = (1.6, 0.4).
  t1, t2 = {"w": jnp.array([1.0, 0.0, -1.0])}, {"w": jnp.array([0.0, 1.0, 1.0])}
  shares = np.array([0.8, 0.2], np.float32)
  np.testing.assert_allclose(_jit_merge([t1, t2], "mean", shares)["w"],
                             [0.8, 0.2, -0.6], rtol=1e-6)
  np.testing.assert_allclose(_jit_merge([t1, t2], "task_arithmetic", shares, lam=0.5)["w"],
                             [0.8, 0.2, -0.6], rtol=1e-6)
  # TIES (k = 1): coordinate 2 has −1.6 against +0.4 → mass vote elects −, keeps −1.6.
  np.testing.assert_allclose(_jit_merge([t1, t2], "ties", shares, k=1.0)["w"],
                             [1.6, 0.4, -1.6], rtol=1e-6)
  with pytest.raises(ValueError, match="summing to 1"):
    lw.weighted_merge([t1, t2], "mean", np.array([0.5, 0.6]))


def test_compose_skills_by_hand():
  base = {"w": jnp.array([1.0, 1.0])}
  vectors = [{"w": jnp.array([1.0, 0.0])}, {"w": jnp.array([0.0, 2.0])}]
  np.testing.assert_allclose(lw.compose_skills(base, vectors, np.array([0.5, 2.0]))["w"],
                             [1.5, 5.0])


def test_merge_request_prompt_carries_the_evidence():
  # Statistics of τ = [1, 0] and [1, −1]: cosine 1/√2, no sign conflict on the one shared entry.
  stats = merge_lib.PairStatistics(cosine=np.array([[1.0, 0.5 ** 0.5], [0.5 ** 0.5, 1.0]]),
                                   sign_conflict=np.zeros((2, 2)),
                                   co_nonzero=np.array([[1, 1], [1, 2]]))
  request = lw.merge_request(NAMES, role_names=("scout", "tank"),
                             returns=np.array([[2.0, 1.0], [0.5, 3.0]]),
                             base_returns=np.array([1.0, 1.0]), stats=stats, norms=[1.0, 1.4142])
  text = request.messages[-1]["content"]
  assert "scout | 2.000 | 1.000" in text and "(base) | 1.000 | 1.000" in text
  assert "scout × tank | +0.707 | 0.000" in text
  assert request.normalise and request.schema["properties"]["weights"]["required"] == ["scout",
                                                                                        "tank"]
  # Fallback from the returns: z = (+1, −1) and (−1, +1) → mean 0 each → uniform.
  np.testing.assert_allclose(request.fallback, [0.5, 0.5])
  skill = lw.skill_request(NAMES, "a boss is near", descriptions=["roam", "survive"])
  assert "- tank: survive" in skill.messages[-1]["content"]
  np.testing.assert_array_equal(skill.fallback, [1.0, 1.0])
  assert (skill.low, skill.high, skill.normalise) == (0.0, 2.0, False)


# -- the async edge on loopback ----------------------------------------------------------

def test_valid_reply_changes_weights_and_merged_parameters():
  base = {"w": jnp.zeros((2,))}
  vectors = [{"w": jnp.array([1.0, 0.0])}, {"w": jnp.array([0.0, 1.0])}]
  reply = '{"weights": {"scout": 0.9, "tank": 0.3}, "rationale": "scout generalises"}'
  with ReferenceLLMServer(_fixed(200, reply)) as server:
    weights = _weights(server)
    before = weights.current()
    np.testing.assert_allclose(before, [0.5, 0.5])
    assert weights.source == "fallback"
    assert weights.ask()
    _wait(weights)
  assert "scout" in last_user_text(server.requests[0])
  np.testing.assert_allclose(weights.weights, [0.75, 0.25])
  assert weights.source == "llm" and weights.rationale == "scout generalises"
  merged = {s: jax.jit(lambda b, v, w=w: merge_lib.apply_task_vector(
      b, lw.weighted_merge(v, "mean", w)))(base, vectors)["w"]
            for s, w in (("fallback", before), ("llm", weights.weights))}
  np.testing.assert_allclose(merged["fallback"], [0.5, 0.5])
  np.testing.assert_allclose(merged["llm"], [0.75, 0.25])
  ties = _jit_merge(vectors, "ties", weights.weights, k=1.0)["w"]
  np.testing.assert_allclose(ties, [1.5, 0.5])  # N·w = (1.5, 0.5), no conflicts


@pytest.mark.parametrize("case, server_kw, timeout_s, reason", [
    ("invalid_json", dict(responder=_fixed(200, "scout, mostly")), 2.0,
     "LLMInvalidReply: .*no JSON value"),
    ("out_of_schema", dict(responder=_fixed(200, '{"weights": {"scout": 3, "tank": 1}}')), 2.0,
     r"LLMInvalidReply: .*\$.weights.scout = 3 is above the maximum 1"),
    ("all_zero", dict(responder=_fixed(200, '{"weights": {"scout": 0, "tank": 0}}')), 2.0,
     "unusable reply .*all weights are zero"),
    ("http_500", dict(responder=_fixed(500, "out of memory")), 2.0,
     "LLMHTTPError: .*HTTP 500"),
    ("timeout", dict(responder=_fixed(200, "{}"), delay_s=0.5), 0.15,
     "LLMTimeout: .*timeout_s=0.15"),
])
def test_failures_fall_back_and_are_logged(case, server_kw, timeout_s, reason, caplog):
  with ReferenceLLMServer(**server_kw) as server:
    weights = _weights(server, timeout_s)
    with caplog.at_level(logging.WARNING):
      assert weights.ask()
      _wait(weights)
  np.testing.assert_array_equal(weights.weights, weights.request.fallback)
  assert weights.source == "fallback" and weights.failures == 1, case
  (record,) = [r for r in caplog.records if "weighting fell back" in r.getMessage()]
  assert record.levelno == logging.WARNING
  assert re.search(reason, record.getMessage()), record.getMessage()
  assert server.url in record.getMessage() or case == "all_zero"


def test_refused_connection_and_no_backend_are_logged(caplog):
  with ReferenceLLMServer(_fixed(200, "{}")) as server:
    url = server.url
  cfg = llm.BackendConfig(base_url=url, timeout_s=1.0)
  weights = AsyncWeights(lw.merge_request(NAMES), llm.AsyncChat(llm.ChatClient(cfg)))
  offline = AsyncWeights(lw.skill_request(NAMES, "menu"), None)
  with caplog.at_level(logging.WARNING):
    assert weights.ask()
    _wait(weights)
    assert not offline.ask()
  messages = [r.getMessage() for r in caplog.records if "fell back" in r.getMessage()]
  assert any("LLMUnavailable" in m and url in m for m in messages)
  assert any("no LLM backend configured" in m for m in messages)
  np.testing.assert_array_equal(offline.current(), [1.0, 1.0])


def test_a_failure_keeps_the_last_valid_weights():
  replies = iter([(200, '{"weights": {"scout": 1, "tank": 0}}'), (500, "down")])
  with ReferenceLLMServer(lambda body: next(replies)) as server:
    weights = _weights(server)
    weights.ask()
    _wait(weights)
    weights.ask()
    _wait(weights)
  np.testing.assert_array_equal(weights.weights, [1.0, 0.0])
  assert (weights.source, weights.replies, weights.failures) == ("llm", 1, 1)
  assert "HTTP 500" in weights.last_error


# -- a loop that reads the weights every step ----------------------------------------------

@jax.jit
def _weighted_step(params, weights, batch):
  """One SGD step on Σᵢ wᵢ · MSE(task i): the weights are an input of the jitted step."""
  x, targets = batch  # targets [2, B], one regression target per task

  def loss(p):
    errors = jnp.mean((x @ p["w"] + p["b"] - targets) ** 2, axis=1)
    return jnp.sum(weights * errors)

  grads = jax.grad(loss)(params)
  return jax.tree.map(lambda p, g: p - 0.05 * g, params, grads)


def _train(weights_at, steps: int = 40):
  """The loop: before each step, `weights_at(step)` gives the weights to train on (and may
  consult an AsyncWeights); returns final params, per-call times and the weights used."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(32, 4)), jnp.float32)
  targets = jnp.stack([x @ jnp.array([1.0, -2.0, 0.5, 3.0]), x @ jnp.array([-1.0, 0.0, 2.0, 0.0])])
  params = {"w": jnp.zeros((4,)), "b": jnp.zeros(())}
  call_s, used = [], []
  for step in range(steps):
    t = time.perf_counter()
    weights = np.array(weights_at(step), np.float32)
    call_s.append(time.perf_counter() - t)
    used.append(weights)
    params = jax.block_until_ready(_weighted_step(params, jnp.asarray(weights), (x, targets)))
    time.sleep(0.01)  # stands in for the rest of a training step
  return jax.device_get(params), call_s, used


@pytest.mark.parametrize("backend", ["good", "slow", "failing", "timeout"])
def test_the_loop_trains_on_the_weights_in_use_without_waiting(backend, caplog):
  responder = (_fixed(500, "down") if backend == "failing" else
               _fixed(200, '{"weights": {"scout": 0.25, "tank": 0.75}}'))
  delay = {"slow": 2.0, "timeout": 0.5}.get(backend, 0.0)
  with ReferenceLLMServer(responder, delay_s=delay) as server:
    weights = _weights(server, timeout_s=0.1 if backend == "timeout" else 5.0)

    def consult(step):
      if not weights.chat.in_flight and weights.source == "fallback":
        weights.ask()
      return weights.current()

    with caplog.at_level(logging.WARNING):
      params, call_s, used = _train(consult)
    weights.chat.close()
  # Consulting the weighting never waits for the backend (a 2 s reply, a 0.1 s timeout):
  # the bound leaves room for scheduler noise on a loaded 2-core machine, the median is tight.
  assert max(call_s) < 0.1, f"{backend}: a weighting call took {max(call_s) * 1e3:.1f} ms"
  assert np.median(call_s) < 0.002, f"{backend}: median {np.median(call_s) * 1e3:.2f} ms"
  fallback = [0.5, 0.5]
  np.testing.assert_allclose(used[0], fallback)
  on_fallback, _, _ = _train(lambda step: fallback)
  if backend == "good":
    switched = next(i for i, w in enumerate(used) if not np.allclose(w, fallback))
    np.testing.assert_allclose(used[switched:], [[0.25, 0.75]] * (len(used) - switched))
    # Trained on the fallback until the reply came, on the reply after: bit for bit what a
    # loop given that schedule directly computes, and not what the fallback alone gives.
    scheduled, _, _ = _train(lambda step: fallback if step < switched else [0.25, 0.75])
    jax.tree.map(np.testing.assert_array_equal, params, scheduled)
    assert np.abs(params["w"] - on_fallback["w"]).max() > 1e-2
  else:
    np.testing.assert_allclose(used, [fallback] * len(used))
    jax.tree.map(np.testing.assert_array_equal, params, on_fallback)  # bit for bit
  fell_back = any("weighting fell back" in r.getMessage() for r in caplog.records)
  assert fell_back == (backend in ("failing", "timeout")), backend


# -- the offline wait (experiments/merge.py) ----------------------------------------------

def test_wait_takes_the_reply_or_falls_back_after_the_deadline(caplog):
  data = {"roles": ["scout", "tank"], "returns": {"scout": [3.0, 1.0], "tank": [1.0, 1.0]},
          "base": [1.0, 0.5]}
  roles, returns, base = lw.role_returns_from_json(data, NAMES)
  request = lw.merge_request(NAMES, role_names=roles, returns=returns, base_returns=base)
  reply = '{"weights": {"scout": 0.2, "tank": 0.6}, "rationale": "tank is safer"}'
  with ReferenceLLMServer(_fixed(200, reply)) as server:
    weights = _weights(server, request=request)
    np.testing.assert_allclose(weights.wait(3.0), [0.25, 0.75])
  assert weights.summary()["source"] == "llm"
  assert weights.summary()["rationale"] == "tank is safer"
  prompt = last_user_text(server.requests[0])
  assert "scout | 3.000 | 1.000" in prompt and "(base) | 1.000 | 0.500" in prompt
  # Slower than the wait: the fallback from the returns (scout standardises to +½ on
  # average, tank to −½ → softmax(½, −½)), with the reason logged and summarised.
  with ReferenceLLMServer(_fixed(200, reply), delay_s=1.0) as server:
    weights = _weights(server, request=request)
    start = time.monotonic()
    with caplog.at_level(logging.WARNING):
      shares = weights.wait(0.2)
    assert time.monotonic() - start < 0.5
  np.testing.assert_allclose(shares, [1 - 1 / (1 + np.e), 1 / (1 + np.e)], rtol=1e-6)
  assert weights.summary()["fallback_reason"] == "no reply within 0.2 s"
  assert any("no reply within 0.2 s" in r.getMessage() for r in caplog.records)
  with pytest.raises(ValueError, match=r"missing \['tank'\]"):
    lw.role_returns_from_json({"roles": ["scout"], "returns": {"scout": [1.0]}}, NAMES)
