"""One chat client for every LLM/VLM consumer: schema-validated JSON replies, sync or async.

Speaks two wire protocols over plain HTTP (stdlib `urllib`, no SDKs):
- `protocol="openai"`: `POST {base_url}/chat/completions` (OpenAI-compatible servers: vLLM,
  llama.cpp, LM Studio, the OpenAI API; `base_url` usually ends in `/v1`). Images travel as
  `image_url` parts holding `data:` URLs; the reply text is `choices[0].message.content`.
- `protocol="ollama"`: `POST {base_url}/api/chat` with `stream: false`. Images travel as bare
  base64 strings in the message's `images` list; the reply text is `message.content`.

`ChatClient.chat_json(messages, schema, images)` is the blocking call: it attaches the frames to
the last user message, asks for JSON (`structured_output`: "schema" sends the schema itself —
OpenAI `response_format={"type": "json_schema", ...}`, Ollama `format=<schema>`; "json" asks
only for some JSON object; "none" sends neither), also states the schema in a system message
unless `schema_in_prompt=False` (for backends that ignore the format field), parses the reply
text as one JSON value (tolerating a ```json fence or prose around one object) and validates
it with `validate` against a small JSON-schema subset (`SCHEMA_KEYWORDS`). Every failure is an
`LLMError` subclass whose message names the endpoint and what was wrong:

  LLMError ─┬─ LLMUnavailable   connection refused / unreachable host / bad API-key variable
            ├─ LLMTimeout       a socket wait exceeded `timeout_s`
            ├─ LLMHTTPError     a non-2xx status (`.status`, body excerpt in the message)
            └─ LLMInvalidReply  no envelope, not JSON, or JSON that fails the schema

`timeout_s` bounds each socket wait (connecting, and each read), as `urlopen` does; a server
that keeps trickling bytes could take longer in total, which is why consumers that need a hard
deadline (the menu navigator) keep their own clock on top of `AsyncChat`.

`AsyncChat` wraps a client for control and training loops that must never wait: one daemon
worker thread, at most one request in flight. `submit` returns False (and queues nothing)
while a request is in flight; `poll` returns the finished `Reply` once (value or error, and
the latency) and None while pending or idle. A reply not yet polled when the next one finishes
is replaced by the newer one. `close` does not wait for an in-flight request: its thread is a
daemon and its reply is dropped.

Images are uint8[H, W, 3] RGB frames, sent as PNG (a stdlib zlib encoder, lossless: menu card
colours arrive exact) or JPEG (Pillow, imported only then), downscaled by an integer stride so
that neither side exceeds `max_image_side`.

Differs from upstream MetaBonk (`build_llm_fn` / `CognitiveClient`, `upstream_runtime.md` §4):
no backend SDK (the `ollama` package missing used to crash imports), no blocking call inside
the control loop, replies validated instead of "first `{...}` block, else a default", and the
API key read from the environment variable *named* in the config, never stored in it.
"""
from __future__ import annotations

import base64
import dataclasses
import http.client
import json
import math
import os
import queue
import re
import socket
import struct
import threading
import time
import urllib.error
import urllib.request
import zlib
from typing import Any, Sequence

import numpy as np

PROTOCOLS = ("openai", "ollama")
STRUCTURED_OUTPUT = ("schema", "json", "none")
IMAGE_FORMATS = ("png", "jpeg")
MAX_REPLY_BYTES = 4 * 1024 * 1024  # a chat reply larger than this is refused, not buffered

# Keywords `validate` understands; any other keyword in a schema is an error, so a schema
# never looks stricter than what is checked. Annotations are accepted and ignored.
SCHEMA_KEYWORDS = frozenset({
    "type", "properties", "required", "additionalProperties", "enum", "minimum", "maximum",
    "items", "minItems", "maxItems", "minLength", "maxLength", "anyOf"})
SCHEMA_ANNOTATIONS = frozenset({"description", "title", "$schema"})


class LLMError(Exception):
  """A chat request that produced no usable value; the message names the endpoint."""


class LLMUnavailable(LLMError):
  """The backend could not be reached (connection refused, unknown host, missing API key)."""


class LLMTimeout(LLMError):
  """A socket wait took longer than `BackendConfig.timeout_s`."""


class LLMHTTPError(LLMError):
  """The backend answered with a non-2xx HTTP status."""

  def __init__(self, message: str, status: int):
    super().__init__(message)
    self.status = status


class LLMInvalidReply(LLMError):
  """The reply had no text, was not JSON, or did not satisfy the schema."""


@dataclasses.dataclass(frozen=True)
class BackendConfig:
  """Where and how to ask. Loopback Ollama by default."""

  protocol: str = "ollama"  # "openai" or "ollama" (see the module docstring)
  base_url: str = "http://127.0.0.1:11434"  # openai servers: usually ".../v1"
  model: str = "llava:7b"
  timeout_s: float = 10.0  # per socket wait
  api_key_env: str = ""  # NAME of the env var holding a bearer token; "" sends none
  temperature: float = 0.0
  max_tokens: int = 512
  structured_output: str = "schema"  # "schema" | "json" | "none"
  schema_in_prompt: bool = True  # also state the schema in a system message
  image_format: str = "png"  # "png" (stdlib, lossless) or "jpeg" (Pillow)
  max_image_side: int = 512  # frames are strided down until both sides fit

  def __post_init__(self):
    if self.protocol not in PROTOCOLS:
      raise ValueError(f"BackendConfig.protocol={self.protocol!r}: expected one of {PROTOCOLS}")
    if not re.match(r"^https?://[^/\s]+", self.base_url):
      raise ValueError(f"BackendConfig.base_url={self.base_url!r}: expected http(s)://host[:port]"
                       "[/path]")
    if not self.model:
      raise ValueError("BackendConfig.model is empty: expected a model name")
    if not self.timeout_s > 0:
      raise ValueError(f"BackendConfig.timeout_s={self.timeout_s}: expected > 0")
    if self.api_key_env and not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", self.api_key_env):
      raise ValueError(f"BackendConfig.api_key_env={self.api_key_env!r}: expected the NAME of an "
                       "environment variable (the key itself must not go into a config)")
    if self.structured_output not in STRUCTURED_OUTPUT:
      raise ValueError(f"BackendConfig.structured_output={self.structured_output!r}: expected one "
                       f"of {STRUCTURED_OUTPUT}")
    if self.image_format not in IMAGE_FORMATS:
      raise ValueError(f"BackendConfig.image_format={self.image_format!r}: expected one of "
                       f"{IMAGE_FORMATS}")
    if self.max_tokens < 1 or self.max_image_side < 1:
      raise ValueError(f"BackendConfig max_tokens={self.max_tokens}, max_image_side="
                       f"{self.max_image_side}: expected both >= 1")

  @classmethod
  def from_config(cls, cfg) -> "BackendConfig":
    """From a ConfigDict (or any mapping) holding some of the field names; the rest default.
    Unknown keys are an error, so a misspelt field is not silently ignored."""
    values = dict(cfg.items()) if hasattr(cfg, "items") else dict(cfg)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
      raise ValueError(f"backend config has unknown keys {unknown}: expected some of "
                       f"{sorted(names)}")
    return cls(**values)

  @property
  def endpoint(self) -> str:
    base = self.base_url.rstrip("/")
    return base + ("/chat/completions" if self.protocol == "openai" else "/api/chat")


# -- schema validation ---------------------------------------------------------------------

_TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")


def check_schema(schema: dict, path: str = "$") -> None:
  """Raises ValueError if `schema` uses a keyword or type `validate` does not implement."""
  if not isinstance(schema, dict):
    raise ValueError(f"schema at {path} is {type(schema).__name__}: expected a dict")
  unknown = set(schema) - SCHEMA_KEYWORDS - SCHEMA_ANNOTATIONS
  if unknown:
    raise ValueError(f"schema at {path} uses unsupported keywords {sorted(unknown)}: "
                     f"supported are {sorted(SCHEMA_KEYWORDS)}")
  types = schema.get("type", [])
  for t in [types] if isinstance(types, str) else types:
    if t not in _TYPES:
      raise ValueError(f"schema at {path} has type {t!r}: expected one of {_TYPES}")
  for name, sub in schema.get("properties", {}).items():
    check_schema(sub, f"{path}.{name}")
  if "items" in schema:
    check_schema(schema["items"], f"{path}[]")
  if isinstance(schema.get("additionalProperties"), dict):
    check_schema(schema["additionalProperties"], f"{path}.*")
  for i, sub in enumerate(schema.get("anyOf", [])):
    check_schema(sub, f"{path}<anyOf {i}>")


def _is_type(value: Any, t: str) -> bool:
  # bool is an int subclass in Python but not a JSON number; integral floats (2.0) are JSON
  # integers (draft 6 on).
  if t == "object":
    return isinstance(value, dict)
  if t == "array":
    return isinstance(value, list)
  if t == "string":
    return isinstance(value, str)
  if t == "boolean":
    return isinstance(value, bool)
  if t == "null":
    return value is None
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    return False
  if t == "number":
    return math.isfinite(value)
  return isinstance(value, int) or (math.isfinite(value) and float(value).is_integer())


def _json_equal(a: Any, b: Any) -> bool:
  """JSON equality: 1 == 1.0, but true ≠ 1 (Python's bool is an int)."""
  if _is_type(a, "number") and _is_type(b, "number"):
    return a == b
  return type(a) is type(b) and a == b


def validate(value: Any, schema: dict, path: str = "$") -> None:
  """Raises ValueError naming the first place where `value` breaks `schema` (subset in
  `SCHEMA_KEYWORDS`; `additionalProperties` defaults to allowed, as in JSON Schema)."""
  if "anyOf" in schema:
    problems = []
    for sub in schema["anyOf"]:
      try:
        validate(value, sub, path)
        break
      except ValueError as e:
        problems.append(str(e))
    else:
      raise ValueError(f"{path} matches none of the {len(problems)} alternatives: "
                       + " | ".join(problems))
  if "type" in schema:
    types = [schema["type"]] if isinstance(schema["type"], str) else schema["type"]
    if not any(_is_type(value, t) for t in types):
      raise ValueError(f"{path} = {_short(value)} is {type(value).__name__}: expected "
                       f"{' or '.join(types)}")
  if "enum" in schema and not any(_json_equal(value, e) for e in schema["enum"]):
    raise ValueError(f"{path} = {_short(value)}: expected one of {schema['enum']}")
  if _is_type(value, "number"):
    if "minimum" in schema and value < schema["minimum"]:
      raise ValueError(f"{path} = {value} is below the minimum {schema['minimum']}")
    if "maximum" in schema and value > schema["maximum"]:
      raise ValueError(f"{path} = {value} is above the maximum {schema['maximum']}")
  if isinstance(value, str):
    if len(value) < schema.get("minLength", 0):
      raise ValueError(f"{path} has {len(value)} characters: expected at least "
                       f"{schema['minLength']}")
    if "maxLength" in schema and len(value) > schema["maxLength"]:
      raise ValueError(f"{path} has {len(value)} characters: expected at most "
                       f"{schema['maxLength']}")
  if isinstance(value, list):
    if len(value) < schema.get("minItems", 0):
      raise ValueError(f"{path} has {len(value)} items: expected at least {schema['minItems']}")
    if "maxItems" in schema and len(value) > schema["maxItems"]:
      raise ValueError(f"{path} has {len(value)} items: expected at most {schema['maxItems']}")
    if "items" in schema:
      for i, item in enumerate(value):
        validate(item, schema["items"], f"{path}[{i}]")
  if isinstance(value, dict):
    missing = [k for k in schema.get("required", []) if k not in value]
    if missing:
      raise ValueError(f"{path} lacks the required keys {missing}")
    properties = schema.get("properties", {})
    extra = schema.get("additionalProperties", True)
    for key, item in value.items():
      if key in properties:
        validate(item, properties[key], f"{path}.{key}")
      elif extra is False:
        raise ValueError(f"{path} has the unexpected key {key!r}: expected only "
                         f"{sorted(properties)}")
      elif isinstance(extra, dict):
        validate(item, extra, f"{path}.{key}")


def _short(value: Any, limit: int = 80) -> str:
  text = json.dumps(value) if not isinstance(value, str) else repr(value)
  return text if len(text) <= limit else text[:limit] + "…"


_FENCE = re.compile(r"```(?:json|JSON)?\s*\n?(.*?)```", re.DOTALL)


def parse_json_text(text: str) -> Any:
  """The JSON value in a model's reply: the whole text, else the first ```json fence, else the
  span from the first "{" to the last "}". Raises ValueError when none parses."""
  candidates = [text.strip()]
  fence = _FENCE.search(text)
  if fence:
    candidates.append(fence.group(1).strip())
  start, end = text.find("{"), text.rfind("}")
  if 0 <= start < end:
    candidates.append(text[start:end + 1])
  for candidate in candidates:
    try:
      return json.loads(candidate)
    except ValueError:
      continue
  raise ValueError(f"no JSON value in the reply text {_short(text)}")


# -- images --------------------------------------------------------------------------------

def _png_chunk(kind: bytes, data: bytes) -> bytes:
  return (struct.pack(">I", len(data)) + kind + data
          + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def encode_png(frame: np.ndarray) -> bytes:
  """uint8[H, W, 3] → PNG bytes (8-bit RGB, filter 0 on every row, zlib level 6)."""
  h, w, _ = frame.shape
  rows = np.concatenate([np.zeros((h, 1), np.uint8), frame.reshape(h, w * 3)], axis=1)
  header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # depth 8, colour type 2 = RGB
  return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
          + _png_chunk(b"IDAT", zlib.compress(rows.tobytes(), 6)) + _png_chunk(b"IEND", b""))


def encode_image(frame: np.ndarray, image_format: str = "png",
                 max_side: int = 512) -> tuple[str, str]:
  """A frame as (mime type, base64 text), strided down so both sides are ≤ max_side."""
  frame = np.asarray(frame)
  if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
    raise ValueError(f"image is {frame.dtype}{list(frame.shape)}: expected uint8[H, W, 3] RGB")
  stride = max(1, math.ceil(max(frame.shape[:2]) / max_side))
  frame = np.ascontiguousarray(frame[::stride, ::stride])
  if image_format == "png":
    data, mime = encode_png(frame), "image/png"
  elif image_format == "jpeg":
    from mbjax.bridge.codec import encode_jpeg  # Pillow, only when JPEG is asked for

    data, mime = encode_jpeg(frame, quality=85), "image/jpeg"
  else:
    raise ValueError(f"image_format={image_format!r}: expected one of {IMAGE_FORMATS}")
  return mime, base64.b64encode(data).decode("ascii")


# -- the client ----------------------------------------------------------------------------

def _check_messages(messages: Sequence[dict]) -> list[dict]:
  messages = [dict(m) for m in messages]
  for i, m in enumerate(messages):
    if m.get("role") not in ("system", "user", "assistant") or not isinstance(
        m.get("content"), str):
      raise ValueError(f"messages[{i}] = {_short(m)}: expected {{'role': system|user|assistant,"
                       " 'content': str}")
  return messages


class ChatClient:
  """Blocking JSON chat against one backend (thread-safe: no state between calls)."""

  def __init__(self, cfg: BackendConfig):
    self.cfg = cfg

  def request_body(self, messages: Sequence[dict], schema: dict,
                   images: Sequence[np.ndarray] = ()) -> dict:
    """The JSON body `chat_json` would POST (exposed for tests and logging)."""
    cfg = self.cfg
    check_schema(schema)
    messages = _check_messages(messages)
    if cfg.schema_in_prompt:
      messages.insert(0, {"role": "system", "content": (
          "Answer with one JSON object and nothing else. It must validate against this JSON "
          "schema: " + json.dumps(schema, sort_keys=True))})
    encoded = [encode_image(f, cfg.image_format, cfg.max_image_side) for f in images]
    if encoded:
      users = [i for i, m in enumerate(messages) if m["role"] == "user"]
      if not users:
        raise ValueError("images need a user message to attach to; messages have none")
      last = messages[users[-1]]
      if cfg.protocol == "openai":
        last["content"] = [{"type": "text", "text": last["content"]}] + [
            {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{data}"}}
            for mime, data in encoded]
      else:
        last["images"] = [data for _, data in encoded]
    body = {"model": cfg.model, "messages": messages}
    if cfg.protocol == "openai":
      body.update(temperature=cfg.temperature, max_tokens=cfg.max_tokens, stream=False)
      if cfg.structured_output == "schema":
        body["response_format"] = {"type": "json_schema", "json_schema": {
            "name": "reply", "schema": schema}}
      elif cfg.structured_output == "json":
        body["response_format"] = {"type": "json_object"}
    else:
      body.update(stream=False, options={"temperature": cfg.temperature,
                                         "num_predict": cfg.max_tokens})
      if cfg.structured_output != "none":
        body["format"] = schema if cfg.structured_output == "schema" else "json"
    return body

  def _post(self, body: dict) -> dict:
    cfg, url = self.cfg, self.cfg.endpoint
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if cfg.api_key_env:
      key = os.environ.get(cfg.api_key_env)
      if not key:
        raise LLMUnavailable(f"{url}: api_key_env={cfg.api_key_env!r} names an environment "
                             "variable that is unset or empty")
      headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers,
                                     method="POST")
    try:
      with urllib.request.urlopen(request, timeout=cfg.timeout_s) as response:
        raw = response.read(MAX_REPLY_BYTES + 1)
    except urllib.error.HTTPError as e:
      detail = e.read(500).decode("utf-8", "replace") if e.fp else ""
      raise LLMHTTPError(f"{url}: HTTP {e.code} {e.reason}: {detail.strip()!r}", e.code) from None
    except (TimeoutError, socket.timeout) as e:
      raise LLMTimeout(f"{url}: no answer within timeout_s={cfg.timeout_s} ({e})") from None
    except urllib.error.URLError as e:
      if isinstance(e.reason, (TimeoutError, socket.timeout)):
        raise LLMTimeout(f"{url}: no answer within timeout_s={cfg.timeout_s} "
                         f"({e.reason})") from None
      raise LLMUnavailable(f"{url}: unreachable ({e.reason})") from None
    except (ConnectionError, OSError) as e:  # reset / closed mid-reply
      raise LLMUnavailable(f"{url}: connection failed ({type(e).__name__}: {e})") from None
    except http.client.HTTPException as e:  # a malformed status line, a truncated body
      raise LLMInvalidReply(f"{url}: malformed HTTP response ({type(e).__name__}: {e})") from None
    if len(raw) > MAX_REPLY_BYTES:
      raise LLMInvalidReply(f"{url}: reply larger than {MAX_REPLY_BYTES} bytes")
    try:
      envelope = json.loads(raw)
    except ValueError:
      raise LLMInvalidReply(f"{url}: the response body is not JSON: "
                            f"{_short(raw.decode('utf-8', 'replace'))}") from None
    if not isinstance(envelope, dict):
      raise LLMInvalidReply(f"{url}: the response body is {_short(envelope)}: expected an object")
    return envelope

  def _reply_text(self, envelope: dict) -> str:
    url = self.cfg.endpoint
    try:
      if self.cfg.protocol == "openai":
        text = envelope["choices"][0]["message"]["content"]
      else:
        text = envelope["message"]["content"]
    except (KeyError, IndexError, TypeError):
      where = ("choices[0].message.content" if self.cfg.protocol == "openai"
               else "message.content")
      raise LLMInvalidReply(f"{url}: the response has no {where}: {_short(envelope)}") from None
    if not isinstance(text, str):
      raise LLMInvalidReply(f"{url}: the reply content is {_short(text)}: expected a string")
    return text

  def chat_json(self, messages: Sequence[dict], schema: dict,
                images: Sequence[np.ndarray] = ()) -> Any:
    """Asks, waits, and returns the reply's JSON value once it satisfies `schema`.

    Raises ValueError for bad arguments (schema, messages, images) before sending anything,
    and an `LLMError` subclass for everything that goes wrong after.
    """
    body = self.request_body(messages, schema, images)
    text = self._reply_text(self._post(body))
    try:
      value = parse_json_text(text)
      validate(value, schema)
    except ValueError as e:
      raise LLMInvalidReply(f"{self.cfg.endpoint}: {e}") from None
    return value


# -- the non-blocking wrapper --------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Reply:
  """One finished request: exactly one of `value` / `error` is set."""

  value: Any
  error: LLMError | None
  latency_s: float  # from submit to the reply (or error) being ready


class AsyncChat:
  """Never blocks the caller: one daemon worker thread, at most one request in flight."""

  def __init__(self, client: ChatClient):
    self.client = client
    self._lock = threading.Lock()
    self._jobs: queue.SimpleQueue = queue.SimpleQueue()
    self._in_flight = False
    self._submitted_at = 0.0
    self._ready: Reply | None = None
    self._closed = False
    # A daemon thread (not a ThreadPoolExecutor, whose workers are joined at interpreter
    # exit): a request stuck in a socket wait must not hold the process open.
    self._thread = threading.Thread(target=self._work, name="llm-chat", daemon=True)
    self._thread.start()

  def _work(self) -> None:
    while True:
      job = self._jobs.get()
      if job is None:
        return
      messages, schema, images, submitted_at = job
      try:
        value, error = self.client.chat_json(messages, schema, images), None
      except LLMError as e:
        value, error = None, e
      except Exception as e:  # a bug or bad argument must not kill the loop that polls us
        value, error = None, LLMError(f"{self.client.cfg.endpoint}: request failed with "
                                      f"{type(e).__name__}: {e}")
      reply = Reply(value, error, time.monotonic() - submitted_at)
      with self._lock:
        self._ready, self._in_flight = reply, False

  @property
  def in_flight(self) -> bool:
    with self._lock:
      return self._in_flight

  def pending_s(self) -> float | None:
    """Seconds since the in-flight request was submitted; None when nothing is in flight."""
    with self._lock:
      return time.monotonic() - self._submitted_at if self._in_flight else None

  def submit(self, messages: Sequence[dict], schema: dict,
             images: Sequence[np.ndarray] = ()) -> bool:
    """Starts a request unless one is in flight (then returns False and queues nothing).
    Frames are copied here, so the caller may reuse its buffers at once."""
    with self._lock:
      if self._closed:
        raise RuntimeError("AsyncChat.submit after close()")
      if self._in_flight:
        return False
      self._in_flight = True
      self._submitted_at = time.monotonic()
      self._jobs.put((list(messages), schema, [np.array(f, copy=True) for f in images],
                      self._submitted_at))
      return True

  def poll(self) -> Reply | None:
    """The finished reply, once; None while a request is pending or nothing was asked."""
    with self._lock:
      reply, self._ready = self._ready, None
      return reply

  def close(self) -> None:
    """Stops accepting requests; returns at once (an in-flight request is abandoned)."""
    with self._lock:
      if self._closed:
        return
      self._closed = True
    self._jobs.put(None)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
