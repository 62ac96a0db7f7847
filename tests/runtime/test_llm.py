"""The shared chat client and the reference LLM server, on loopback.

Covers both protocols end to end (request shape, images, schema forwarding, reply envelope),
every failure class (HTTP 500, invalid JSON, schema violation, timeout, connection refused,
missing API key), the schema validator on hand-made cases, and that AsyncChat never blocks.
"""
import base64
import io
import json
import os
import subprocess
import sys
import time

import ml_collections
import numpy as np
import pytest

from mbjax.runtime import llm
from mbjax.runtime.reference_llm_server import (ReferenceLLMServer, example_value,
                                                last_user_text, request_images)

CARD_SCHEMA = {
    "type": "object",
    "properties": {"action": {"type": "string", "enum": ["click", "noop"]},
                   "card": {"type": "integer", "minimum": 0, "maximum": 2}},
    "required": ["action"],
    "additionalProperties": False,
}


def _client(server, protocol="ollama", **kw):
  return llm.ChatClient(llm.BackendConfig(protocol=protocol, base_url=server.url,
                                          model="test-model", **kw))


def _fixed(status, text):
  return lambda body: (status, text)


# -- config --------------------------------------------------------------------------------

def test_backend_config_checks_and_from_config():
  cfg = llm.BackendConfig.from_config(ml_collections.ConfigDict(
      {"protocol": "openai", "base_url": "http://127.0.0.1:8000/v1/", "model": "m",
       "timeout_s": 2.5}))
  assert cfg.endpoint == "http://127.0.0.1:8000/v1/chat/completions"
  assert cfg.timeout_s == 2.5 and cfg.api_key_env == ""
  assert llm.BackendConfig().endpoint == "http://127.0.0.1:11434/api/chat"
  with pytest.raises(ValueError, match="protocol"):
    llm.BackendConfig(protocol="grpc")
  with pytest.raises(ValueError, match="NAME of an environment variable"):
    llm.BackendConfig(api_key_env="sk-123-secret")
  with pytest.raises(ValueError, match="timeout_s"):
    llm.BackendConfig(timeout_s=0)
  with pytest.raises(ValueError, match="unknown keys .'modle'"):
    llm.BackendConfig.from_config({"modle": "x"})


# -- schema validation and parsing ----------------------------------------------------------

@pytest.mark.parametrize("value, message", [
    ({"action": "click", "card": 1}, None),
    ({"action": "noop"}, None),
    ({"action": "click", "card": 2.0}, None),  # an integral float is a JSON integer
    ({"card": 1}, r"\$ lacks the required keys \['action'\]"),
    ({"action": "jump"}, r"\$.action = 'jump': expected one of"),
    ({"action": "click", "card": 3}, r"\$.card = 3 is above the maximum 2"),
    ({"action": "click", "card": -1}, r"\$.card = -1 is below the minimum 0"),
    ({"action": "click", "card": 1.5}, r"\$.card = 1.5 is float: expected integer"),
    ({"action": "click", "card": True}, r"\$.card = true is bool: expected integer"),
    ({"action": "click", "x": 0.1}, r"unexpected key 'x'"),
    ([1], r"\$ = \[1\] is list: expected object"),
])
def test_validate_hand_cases(value, message):
  if message is None:
    llm.validate(value, CARD_SCHEMA)
  else:
    with pytest.raises(ValueError, match=message):
      llm.validate(value, CARD_SCHEMA)


def test_validate_arrays_any_of_and_unsupported_keywords():
  schema = {"type": "array", "minItems": 2, "maxItems": 3,
            "items": {"anyOf": [{"type": "string", "maxLength": 3}, {"type": "null"}]}}
  llm.validate(["ab", None], schema)
  with pytest.raises(ValueError, match="has 1 items: expected at least 2"):
    llm.validate(["ab"], schema)
  with pytest.raises(ValueError, match=r"\$\[1\] matches none of the 2 alternatives"):
    llm.validate(["ab", "abcd"], schema)
  with pytest.raises(ValueError, match="unsupported keywords \\['pattern'\\]"):
    llm.check_schema({"type": "string", "pattern": "^a"})
  with pytest.raises(ValueError, match="type 'float'"):
    llm.check_schema({"type": "object", "properties": {"x": {"type": "float"}}})


def test_parse_json_text_tolerates_fences_and_prose():
  assert llm.parse_json_text(' {"a": 1} ') == {"a": 1}
  assert llm.parse_json_text('Sure!\n```json\n{"a": [1, 2]}\n```\nDone.') == {"a": [1, 2]}
  assert llm.parse_json_text('I pick {"action": "noop"} because.') == {"action": "noop"}
  with pytest.raises(ValueError, match="no JSON value"):
    llm.parse_json_text("click the left card")


def test_encode_png_decodes_to_the_same_pixels():
  image_module = pytest.importorskip("PIL.Image")
  frame = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
  mime, data = llm.encode_image(frame)
  assert mime == "image/png"
  decoded = np.asarray(image_module.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))
  np.testing.assert_array_equal(decoded, frame)
  # Strided down to fit max_side: 7 wide with max 3 → stride 3 → columns 0, 3, 6.
  _, small = llm.encode_image(frame, max_side=3)
  decoded = np.asarray(image_module.open(io.BytesIO(base64.b64decode(small))).convert("RGB"))
  np.testing.assert_array_equal(decoded, frame[::3, ::3])
  with pytest.raises(ValueError, match=r"expected uint8\[H, W, 3\]"):
    llm.encode_image(np.zeros((4, 4), np.uint8))


def test_example_value_satisfies_its_schema():
  assert example_value({"type": "number", "minimum": 0, "maximum": 1}) == 0.5
  assert example_value({"type": "integer", "minimum": 0, "maximum": 2}) == 1
  assert example_value(CARD_SCHEMA) == {"action": "click", "card": 1}
  llm.validate(example_value(CARD_SCHEMA), CARD_SCHEMA)


# -- round trips --------------------------------------------------------------------------

@pytest.mark.parametrize("protocol", ["ollama", "openai"])
def test_round_trip_with_image_and_schema(protocol):
  frame = np.zeros((4, 6, 3), np.uint8)
  frame[1, 2] = (255, 10, 20)
  reply = '```json\n{"action": "click", "card": 2}\n```'
  with ReferenceLLMServer(_fixed(200, reply)) as server:
    value = _client(server, protocol).chat_json(
        [{"role": "user", "content": "Pick a card."}], CARD_SCHEMA, images=[frame])
  assert value == {"action": "click", "card": 2}
  (body,) = server.requests
  assert body["model"] == "test-model" and body["stream"] is False
  assert last_user_text(body) == "Pick a card."
  # The schema is forwarded as the structured-output format and stated in a system message.
  if protocol == "ollama":
    assert body["format"] == CARD_SCHEMA
  else:
    assert body["response_format"]["json_schema"]["schema"] == CARD_SCHEMA
    assert body["messages"][-1]["content"][1]["image_url"]["url"].startswith(
        "data:image/png;base64,")
  assert body["messages"][0]["role"] == "system"
  assert json.dumps(CARD_SCHEMA, sort_keys=True) in body["messages"][0]["content"]
  (image,) = request_images(body)
  assert base64.b64decode(image) == llm.encode_png(frame)


def test_api_key_is_read_from_the_named_variable(monkeypatch):
  with ReferenceLLMServer(_fixed(200, '{"action": "noop"}')) as server:
    client = _client(server, "openai", api_key_env="MBJAX_TEST_LLM_KEY")
    monkeypatch.delenv("MBJAX_TEST_LLM_KEY", raising=False)
    with pytest.raises(llm.LLMUnavailable, match="MBJAX_TEST_LLM_KEY"):
      client.chat_json([{"role": "user", "content": "hi"}], CARD_SCHEMA)
    monkeypatch.setenv("MBJAX_TEST_LLM_KEY", "k123")
    client.chat_json([{"role": "user", "content": "hi"}], CARD_SCHEMA)
  assert len(server.requests) == 1  # nothing was sent without the key
  assert server.headers[0]["Authorization"] == "Bearer k123"


@pytest.mark.parametrize("status, text, error, message", [
    (500, "model crashed", llm.LLMHTTPError, "HTTP 500 .*model crashed"),
    (200, "I would click the first card", llm.LLMInvalidReply, "no JSON value"),
    (200, '{"action": "click", "card": 7}', llm.LLMInvalidReply,
     r"\$.card = 7 is above the maximum 2"),
])
def test_failures_raise_named_errors(status, text, error, message):
  with ReferenceLLMServer(_fixed(status, text)) as server:
    with pytest.raises(error, match=message) as info:
      _client(server).chat_json([{"role": "user", "content": "x"}], CARD_SCHEMA)
  assert server.url in str(info.value)
  if status == 500:
    assert info.value.status == 500


def test_timeout_and_connection_refused():
  with ReferenceLLMServer(_fixed(200, '{"action": "noop"}'), delay_s=0.5) as server:
    start = time.monotonic()
    with pytest.raises(llm.LLMTimeout, match="timeout_s=0.1"):
      _client(server, timeout_s=0.1).chat_json([{"role": "user", "content": "x"}], CARD_SCHEMA)
    assert time.monotonic() - start < 0.4
  closed_url = server.url  # stopped: nothing listens there now
  client = llm.ChatClient(llm.BackendConfig(base_url=closed_url, timeout_s=1.0))
  with pytest.raises(llm.LLMUnavailable, match="unreachable"):
    client.chat_json([{"role": "user", "content": "x"}], CARD_SCHEMA)


def test_bad_arguments_fail_before_sending():
  with ReferenceLLMServer(_fixed(200, "{}")) as server:
    client = _client(server)
    with pytest.raises(ValueError, match="messages\\[0\\]"):
      client.chat_json([{"role": "robot", "content": "x"}], CARD_SCHEMA)
    with pytest.raises(ValueError, match="need a user message"):
      client.chat_json([{"role": "system", "content": "x"}], CARD_SCHEMA,
                       images=[np.zeros((2, 2, 3), np.uint8)])
  assert server.requests == []


# -- async --------------------------------------------------------------------------------

def test_async_chat_never_blocks_and_delivers_each_reply_once():
  messages = [{"role": "user", "content": "x"}]
  with ReferenceLLMServer(_fixed(200, '{"action": "noop"}'), delay_s=0.3) as server:
    chat = llm.AsyncChat(_client(server))
    calls = []
    start = time.monotonic()
    assert chat.submit(messages, CARD_SCHEMA)
    assert chat.in_flight and chat.pending_s() >= 0
    assert not chat.submit(messages, CARD_SCHEMA)  # one in flight: refused, not queued
    calls.append(time.monotonic() - start)
    replies = []
    while time.monotonic() - start < 2.0 and not replies:
      t = time.monotonic()
      reply = chat.poll()
      calls.append(time.monotonic() - t)
      if reply is not None:
        replies.append(reply)
      time.sleep(0.005)
    assert replies and replies[0].value == {"action": "noop"} and replies[0].error is None
    assert 0.3 <= replies[0].latency_s < 1.0
    assert chat.poll() is None and not chat.in_flight and chat.pending_s() is None
    assert max(calls) < 0.05, f"submit/poll took up to {max(calls):.3f} s"
    assert len(server.requests) == 1
    chat.close()
    with pytest.raises(RuntimeError, match="after close"):
      chat.submit(messages, CARD_SCHEMA)


def test_async_chat_reports_errors_as_replies():
  with ReferenceLLMServer(_fixed(500, "down")) as server:
    with llm.AsyncChat(_client(server)) as chat:
      assert chat.submit([{"role": "user", "content": "x"}], CARD_SCHEMA)
      deadline = time.monotonic() + 2.0
      reply = None
      while reply is None and time.monotonic() < deadline:
        reply = chat.poll()
        time.sleep(0.005)
  assert reply is not None and reply.value is None
  assert isinstance(reply.error, llm.LLMHTTPError) and reply.error.status == 500


def test_server_binary_serves_schema_examples():
  proc = subprocess.Popen([sys.executable, "-m", "mbjax.runtime.reference_llm_server"],
                          stdout=subprocess.PIPE, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
  try:
    line = proc.stdout.readline()
    assert line.startswith("LLM SERVER READY http://127.0.0.1:"), line
    cfg = llm.BackendConfig(protocol="openai", base_url=line.split()[-1] + "/v1", model="m")
    value = llm.ChatClient(cfg).chat_json([{"role": "user", "content": "go"}], CARD_SCHEMA)
    assert value == {"action": "click", "card": 1}
  finally:
    proc.terminate()
    assert proc.wait(timeout=10) == 0
