"""Reference LLM server: a loopback HTTP backend speaking both chat protocols, for tests and demos.

The stand-in for Ollama / an OpenAI-compatible server, as `mbjax/bridge/server.py` stands in
for the game plugin. `POST /api/chat` answers in Ollama's non-streaming shape
(`{"model", "message": {"role": "assistant", "content"}, "done": true}`); `POST
/chat/completions` and `POST /v1/chat/completions` answer in OpenAI's
(`{"object": "chat.completion", "choices": [{"message": {...}, "finish_reason": "stop"}]}`).

What to answer is the `responder`'s job: it gets the parsed request body and returns
`(http_status, reply_text)`. For status 200 the text becomes the assistant message's content
inside the protocol's envelope; for any other status it is sent as the raw error body (so a test
can serve a 500, or a 200 whose content is not JSON). `delay_s` sleeps before answering
(a slow model); each request is handled on its own thread, so a slow answer does not hold up
the next request. `.requests` keeps every received body and `.headers` its HTTP headers, in
order, for tests to inspect.

The default responder, `schema_responder`, needs no model: it answers with the simplest value
that satisfies the JSON schema the client sent (Ollama `format`, OpenAI
`response_format.json_schema.schema`) — first enum value, midpoint of a numeric range,
required keys filled recursively — or `{}` when the request carries no schema.

Run: `python -m mbjax.runtime.reference_llm_server --delay_s=2 [--port=11434]`. Prints
`LLM SERVER READY <url>` once listening on 127.0.0.1; exits on SIGTERM/SIGINT. Point a client
at it with `BackendConfig(protocol="ollama" or "openai", base_url=<url>)`.
"""
from __future__ import annotations

import argparse
import http.server
import json
import math
import signal
import sys
import threading
import time
from typing import Any, Callable

Responder = Callable[[dict], tuple[int, str]]
OLLAMA_PATHS = ("/api/chat",)
OPENAI_PATHS = ("/chat/completions", "/v1/chat/completions")
MAX_REQUEST_BYTES = 32 * 1024 * 1024


def request_schema(body: dict) -> dict | None:
  """The JSON schema a client asked the reply to follow, in either protocol; None if none."""
  fmt = body.get("format")
  if isinstance(fmt, dict):
    return fmt
  response_format = body.get("response_format")
  if isinstance(response_format, dict):
    schema = (response_format.get("json_schema") or {}).get("schema")
    if isinstance(schema, dict):
      return schema
  return None


def last_user_text(body: dict) -> str:
  """Text of the last user message in either protocol ("" when there is none)."""
  for message in reversed(body.get("messages", [])):
    if message.get("role") != "user":
      continue
    content = message.get("content", "")
    if isinstance(content, list):  # OpenAI multi-part content
      return "".join(p.get("text", "") for p in content if p.get("type") == "text")
    return str(content)
  return ""


def request_images(body: dict) -> list[str]:
  """Base64 image payloads of every message, in order, in either protocol."""
  images = []
  for message in body.get("messages", []):
    images.extend(message.get("images", []))
    content = message.get("content")
    if isinstance(content, list):
      for part in content:
        if part.get("type") == "image_url":
          images.append(part["image_url"]["url"].split(",", 1)[-1])
  return images


def example_value(schema: dict) -> Any:
  """The simplest value satisfying `schema` (the subset `mbjax.runtime.llm` validates)."""
  if "anyOf" in schema:
    return example_value(schema["anyOf"][0])
  if "enum" in schema:
    return schema["enum"][0]
  kind = schema.get("type", "object")
  kind = kind[0] if isinstance(kind, list) else kind
  if kind == "object":
    properties = schema.get("properties", {})
    return {k: example_value(properties.get(k, {"type": "null"}))
            for k in list(properties) + [k for k in schema.get("required", [])
                                         if k not in properties]}
  if kind == "array":
    return [example_value(schema.get("items", {"type": "null"}))
            for _ in range(schema.get("minItems", 0))]
  if kind in ("number", "integer"):
    lo, hi = schema.get("minimum"), schema.get("maximum")
    if lo is not None and hi is not None:
      value = (lo + hi) / 2
    else:
      value = lo if lo is not None else hi if hi is not None else 0
    if kind == "integer":  # round towards the inside of the range
      value = math.ceil(value) if lo is not None else math.floor(value)
    return value
  if kind == "string":
    return "x" * schema.get("minLength", 0) or "reference reply"
  if kind == "boolean":
    return False
  return None


def schema_responder(body: dict) -> tuple[int, str]:
  """Default responder: a schema-satisfying JSON reply, or `{}` without a schema."""
  schema = request_schema(body)
  return 200, json.dumps(example_value(schema) if schema is not None else {})


class ReferenceLLMServer:
  """Context manager: serves on 127.0.0.1:`port` (0 = ephemeral) in a background thread."""

  def __init__(self, responder: Responder = schema_responder, delay_s: float = 0.0,
               port: int = 0, model: str = "reference"):
    if delay_s < 0:
      raise ValueError(f"delay_s={delay_s}: expected >= 0")
    self.responder, self.delay_s, self.model = responder, delay_s, model
    self.requests: list[dict] = []
    self.headers: list[dict[str, str]] = []  # HTTP headers of each request, same order
    self._lock = threading.Lock()
    self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), self._handler_class())
    self._httpd.daemon_threads = True  # a sleeping handler must not block shutdown
    self._httpd.block_on_close = False
    self.port = self._httpd.server_address[1]
    self.url = f"http://127.0.0.1:{self.port}"
    self._thread: threading.Thread | None = None

  def _handler_class(self):
    server = self

    class Handler(http.server.BaseHTTPRequestHandler):
      protocol_version = "HTTP/1.1"

      def log_message(self, *args):  # quiet: tests assert on behaviour, not stderr
        pass

      def _send(self, status: int, payload: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Connection", "close")
        self.end_headers()
        try:
          self.wfile.write(payload)
        except OSError:  # the client gave up (timed out) while we slept
          pass

      def do_POST(self):
        path = self.path.split("?", 1)[0]
        if path not in OLLAMA_PATHS + OPENAI_PATHS:
          self._send(404, json.dumps({"error": f"no route {path}"}).encode())
          return
        length = int(self.headers.get("Content-Length") or 0)
        if not 0 < length <= MAX_REQUEST_BYTES:
          self._send(400, json.dumps({"error": f"Content-Length {length}"}).encode())
          return
        try:
          body = json.loads(self.rfile.read(length))
        except ValueError:
          self._send(400, json.dumps({"error": "request body is not JSON"}).encode())
          return
        with server._lock:
          server.requests.append(body)
          server.headers.append(dict(self.headers.items()))
        if server.delay_s:
          time.sleep(server.delay_s)
        status, text = server.responder(body)
        if status != 200:
          self._send(status, text.encode())
          return
        message = {"role": "assistant", "content": text}
        if path in OLLAMA_PATHS:
          envelope = {"model": body.get("model", server.model), "message": message,
                      "done": True, "done_reason": "stop"}
        else:
          envelope = {"id": f"chatcmpl-{len(server.requests)}", "object": "chat.completion",
                      "created": int(time.time()), "model": body.get("model", server.model),
                      "choices": [{"index": 0, "message": message, "finish_reason": "stop"}]}
        self._send(200, json.dumps(envelope).encode())

    return Handler

  def start(self) -> "ReferenceLLMServer":
    # A short poll interval: `stop` waits up to one interval for the serving loop to notice.
    self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.02,),
                                    name="reference-llm", daemon=True)
    self._thread.start()
    return self

  def stop(self) -> None:
    if self._thread is not None:
      self._httpd.shutdown()
      self._thread.join()
      self._thread = None
    self._httpd.server_close()

  def __enter__(self):
    return self.start()

  def __exit__(self, *exc):
    self.stop()


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
  parser.add_argument("--delay_s", type=float, default=0.0, help="sleep before each answer")
  parser.add_argument("--reply", default=None,
                      help="answer every request with this text instead of a schema example")
  args = parser.parse_args(argv)
  responder = (schema_responder if args.reply is None
               else lambda body: (200, args.reply))
  server = ReferenceLLMServer(responder, delay_s=args.delay_s, port=args.port).start()
  stop = threading.Event()
  signal.signal(signal.SIGTERM, lambda *_: stop.set())
  signal.signal(signal.SIGINT, lambda *_: stop.set())
  print(f"LLM SERVER READY {server.url}", flush=True)
  stop.wait()
  server.stop()
  sys.exit(0)


if __name__ == "__main__":
  main()
