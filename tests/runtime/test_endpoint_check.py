"""The endpoint check (experiments/check_llm_endpoint.py) against loopback servers: the rule
responder passes every path, junk and rule-breaking replies are counted as invalid with their
reason, a refused connection is told apart."""
import json

import pytest

from mbjax.runtime import endpoint_check, llm
from mbjax.runtime.reference_llm_server import ReferenceLLMServer, request_images


def _backend(url):
  return llm.BackendConfig(protocol="ollama", base_url=url, model="m", timeout_s=10.0)


def test_the_reference_responder_passes_every_path():
  with ReferenceLLMServer(endpoint_check.reference_responder) as server:
    report = endpoint_check.check_endpoint(_backend(server.url), requests=3, seed=1)
  assert list(report) == list(endpoint_check.PATHS)
  for path, entry in report.items():
    assert (entry["requests"], entry["valid"], entry["rate"]) == (3, 3, 1.0), (path, entry)
  assert len(server.requests) == 9
  with_images = [len(request_images(body)) for body in server.requests]
  assert sorted(with_images) == [0] * 6 + [1] * 3  # the navigator's screenshots
  assert not endpoint_check.unreachable(report)
  table = endpoint_check.format_report(report, "loopback")
  assert "navigator     3/3     100.0%" in table


def test_junk_and_rule_breaking_replies_are_invalid_with_their_reason():
  with ReferenceLLMServer(lambda body: (200, "I'd pick the second card")) as server:
    report = endpoint_check.check_endpoint(_backend(server.url), requests=2,
                                           paths=("planner", "merge"))
  for entry in report.values():
    assert entry["valid"] == 0 and entry["reasons"][0].startswith("LLMInvalidReply")
  # Schema-valid, but the click lands on no card: the navigator's rules refuse it.
  miss = json.dumps({"action": "click_xy", "x": 0.0, "y": 0.0})
  with ReferenceLLMServer(lambda body: (200, miss)) as server:
    report = endpoint_check.check_endpoint(_backend(server.url), requests=2,
                                           paths=("navigator",))
  assert report["navigator"]["valid"] == 0
  assert report["navigator"]["reasons"] == ["ValueError: click_xy at (0.000, 0.000) hits no card"]
  # Equal weights of zero are schema-valid but unusable.
  zeros = json.dumps({"weights": {n: 0.0 for n in ("scout", "tank", "killer")}})
  with ReferenceLLMServer(lambda body: (200, zeros)) as server:
    report = endpoint_check.check_endpoint(_backend(server.url), requests=1, paths=("merge",))
  assert report["merge"]["valid"] == 0 and "zero" in report["merge"]["reasons"][0]


def test_a_refused_connection_is_unreachable():
  with ReferenceLLMServer(endpoint_check.reference_responder) as server:
    url = server.url
  report = endpoint_check.check_endpoint(_backend(url), requests=1, paths=("planner", "merge"))
  assert endpoint_check.unreachable(report)
  with pytest.raises(ValueError, match="paths"):
    endpoint_check.check_endpoint(_backend(url), requests=1, paths=("nope",))
