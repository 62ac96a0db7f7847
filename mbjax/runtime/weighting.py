"""Asks an LLM for merge weights or skill scales without ever making the caller wait.

`AsyncWeights` holds the weights a training or control loop should use *now*. They start as
the request's deterministic fallback (`mbjax.population.llm_weighting`); `ask()` sends the
request on an `AsyncChat` (one in flight at most) and returns at once; `current()` polls and
returns the weights — the parsed, normalised reply once a valid one has arrived, the previous
weights otherwise. Every way of not getting weights is logged (absl, WARNING) with its reason:
no backend configured, connection refused, timeout, HTTP error, invalid JSON or schema,
unusable weights (all zero). A failure keeps the weights in use (the last valid reply, else
the fallback) unless `reset_on_error=True`, which goes back to the fallback.

`wait(seconds)` is for offline tools (`experiments/merge.py`), never for a training loop: it
asks and polls until a reply is taken in or the time is up (a fallback, logged like the rest).
"""
from __future__ import annotations

import json
import time

import numpy as np
from absl import logging

from mbjax.population import llm_weighting
from mbjax.runtime import llm


class AsyncWeights:
  """Current weights for one `WeightRequest`; `current()` never blocks."""

  def __init__(self, request: llm_weighting.WeightRequest, chat: llm.AsyncChat | None,
               reset_on_error: bool = False):
    self.request = request
    self.chat = chat
    self.reset_on_error = reset_on_error
    self.weights = np.array(request.fallback, np.float32)
    self.source = "fallback"  # "fallback" or "llm"
    self.rationale = ""
    self.last_error = ""  # the reason of the latest fallback, "" after a valid reply
    self.replies = 0  # valid replies applied
    self.failures = 0  # requests that ended without usable weights

  def _fail(self, reason: str) -> None:
    self.failures += 1
    self.last_error = reason
    if self.reset_on_error:
      self.weights = np.array(self.request.fallback, np.float32)
      self.source = "fallback"
    logging.warning("LLM %s weighting fell back: %s; using %s weights %s", self.request.kind,
                    reason, self.source, self._named(self.weights))

  def _named(self, weights: np.ndarray) -> str:
    return json.dumps({n: round(float(w), 4) for n, w in zip(self.request.names, weights)})

  def ask(self, request: llm_weighting.WeightRequest | None = None) -> bool:
    """Sends the request (or a new one for the same names, e.g. with fresher statistics).
    Returns False when nothing was sent: no backend, or a request already in flight."""
    if request is not None:
      if request.names != self.request.names or request.kind != self.request.kind:
        raise ValueError(f"a new {request.kind} request for {request.names} cannot replace the "
                         f"{self.request.kind} request for {self.request.names}")
      self.request = request
    if self.chat is None:
      self._fail("no LLM backend configured")
      return False
    return self.chat.submit(list(self.request.messages), self.request.schema)

  def current(self) -> np.ndarray:
    """The weights to use now (f32[N], `request.names` order); applies a reply that arrived."""
    reply = self.chat.poll() if self.chat is not None else None
    if reply is not None:
      if reply.error is not None:
        self._fail(f"{type(reply.error).__name__}: {reply.error}")
      else:
        r = self.request
        try:
          weights = llm_weighting.parse_weights(reply.value, r.names, r.low, r.high, r.normalise)
        except ValueError as e:
          self._fail(f"unusable reply from {self.chat.client.cfg.endpoint}: {e}")
        else:
          self.weights, self.source, self.last_error = weights, "llm", ""
          self.rationale = str(reply.value.get("rationale", ""))
          self.replies += 1
          logging.info("LLM %s weighting applied after %.2f s: %s (%s)", r.kind,
                       reply.latency_s, self._named(weights), self.rationale)
    return self.weights

  def wait(self, seconds: float, poll_s: float = 0.02) -> np.ndarray:
    """Asks and polls for at most `seconds`; returns the weights then in use."""
    before = (self.replies, self.failures)
    if not self.ask():
      return self.weights
    deadline = time.monotonic() + seconds
    while (self.replies, self.failures) == before:
      self.current()
      if (self.replies, self.failures) != before:
        break
      if time.monotonic() >= deadline:
        self._fail(f"no reply within {seconds} s")
        break
      time.sleep(poll_s)
    return self.weights

  def summary(self) -> dict:
    """JSON-ready record of the weights in use and where they came from."""
    return {"kind": self.request.kind, "names": list(self.request.names),
            "weights": [float(w) for w in self.weights], "source": self.source,
            "rationale": self.rationale, "fallback_reason": self.last_error,
            "fallback": [float(w) for w in self.request.fallback],
            "endpoint": None if self.chat is None else self.chat.client.cfg.endpoint}
