"""The worker protocol of the peer harness (`experiments/bench_peers.py`); standard library only,
so a peer's own virtualenv can run it.

A worker is one process that measures one side of one row. It sets up (builds, compiles,
warms up with one untimed call), then answers the harness over its stdin/stdout, one JSON
object per line:

  worker → harness  {"event": "ready", "setup_s": s, "info": {...}}
  harness → worker  "round <i>"          (i: the round's index, e.g. a seed)
  worker → harness  {"event": "round", "index": i, "seconds": s, "cpu_s": s,
                     "rates": {name: per-second}, "extra": {...}}
  harness → worker  "quit" (or end of input)

Between rounds a worker only waits on its stdin, so the two sides of a row never run at the
same time: the harness alternates them, A B A B, and compares per round. What the measured
code prints goes to stderr; the protocol has the original stdout to itself.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from typing import Callable, Sequence

# A round: index → {"rates": {name: per-second}, optional "extra": {...}}.
RoundFn = Callable[[int], dict]


def serve(setup: Callable[[], tuple[RoundFn, dict]]) -> None:
  """Worker side: `setup()` returns (round function, info); then answers rounds until quit."""
  channel = os.fdopen(os.dup(1), "w")
  os.dup2(2, 1)  # the measured code's prints go to stderr
  sys.stdout = sys.stderr

  def send(message: dict) -> None:
    channel.write(json.dumps(message) + "\n")
    channel.flush()

  start = time.perf_counter()
  run_round, info = setup()
  send({"event": "ready", "setup_s": time.perf_counter() - start, "info": info})
  for line in sys.stdin:
    command = line.split()
    if not command or command[0] == "quit":
      break
    if command[0] != "round" or len(command) != 2:
      raise ValueError(f"worker: expected 'round <i>' or 'quit', got {line.strip()!r}")
    index = int(command[1])
    wall, cpu = time.perf_counter(), time.process_time()
    result = run_round(index)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if not result.get("rates"):
      raise ValueError(f"worker: round {index} returned no rates: {result}")
    send({"event": "round", "index": index, "seconds": wall, "cpu_s": cpu,
          "rates": result["rates"], "extra": result.get("extra", {})})


def timed_rate(fn: Callable[[], object], units: float, repeats: int = 1) -> float:
  """units × repeats / seconds of `repeats` calls of `fn` (each must finish its work before
  returning)."""
  start = time.perf_counter()
  for _ in range(repeats):
    fn()
  return units * repeats / (time.perf_counter() - start)


def steps_round(step: Callable[[], object], steps: int, units: float, name: str) -> RoundFn:
  """A round of `steps` calls of `step` (each must finish its work before returning): rate
  `name` = units per second, and the milliseconds per call."""
  def run(index: int) -> dict:
    del index
    start = time.perf_counter()
    for _ in range(steps):
      step()
    seconds = (time.perf_counter() - start) / steps
    return {"rates": {name: units / seconds}, "extra": {"ms": seconds * 1e3}}
  return run


def conversion_round(convert: Callable[[], tuple[int, int]]) -> RoundFn:
  """A round of one `convert()` → (frames, bytes written): frames/s and bytes per frame."""
  def run(index: int) -> dict:
    del index
    start = time.perf_counter()
    frames, size = convert()
    return {"rates": {"frames": frames / (time.perf_counter() - start)},
            "extra": {"bytes_per_frame": size / frames, "frames": frames}}
  return run


class WorkerError(RuntimeError):
  """A worker exited or answered out of protocol; the message holds its stderr's tail."""


class Worker:
  """Harness side: one worker process (`command`, run in `cwd` with `env`)."""

  def __init__(self, name: str, command: Sequence[str], cwd: str, env: dict, log_path: str):
    self.name, self.log_path = name, log_path
    self._log = open(log_path, "w")
    self._process = subprocess.Popen(list(command), cwd=cwd, env=env, stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=self._log, text=True)
    self.ready = self._receive("ready")

  def _receive(self, event: str) -> dict:
    line = self._process.stdout.readline()
    if not line:
      self._process.wait()
      raise WorkerError(f"{self.name}: exited ({self._process.returncode}) before "
                        f"'{event}'; end of {self.log_path}:\n{self._tail()}")
    message = json.loads(line)
    if message.get("event") != event:
      raise WorkerError(f"{self.name}: expected '{event}', got {message}")
    return message

  def _tail(self, lines: int = 25) -> str:
    self._log.flush()
    with open(self.log_path) as f:
      return "".join(f.readlines()[-lines:])

  def round(self, index: int) -> dict:
    self._process.stdin.write(f"round {index}\n")
    self._process.stdin.flush()
    return self._receive("round")

  def close(self) -> None:
    if self._process.poll() is None:
      try:
        self._process.stdin.write("quit\n")
        self._process.stdin.close()
      except BrokenPipeError:
        pass
      try:
        self._process.wait(timeout=60)
      except subprocess.TimeoutExpired:
        self._process.kill()
        self._process.wait()
    self._log.close()


def alternate(first: Worker, second: Worker, rounds: int,
              load: Callable[[], float] = lambda: os.getloadavg()[0]) -> list[dict]:
  """Rounds 0..rounds-1, each `first` then `second`; per round both answers and the 1-minute
  load average read before each side."""
  out = []
  for index in range(rounds):
    entry = {}
    for key, worker in (("a", first), ("b", second)):
      entry[f"load_{key}"] = load()
      entry[key] = worker.round(index)
    out.append(entry)
  return out


def summarise(rounds: list[dict]) -> dict:
  """Per rate name: each side's median and (min, max) over rounds, the per-round ratio a / b
  (a's rate over b's, i.e. how many times faster a is) and its median; the per-round ratio of
  CPU seconds b / a (both sides do the same work per round: how many times less CPU time a
  takes, a figure that other jobs on the machine move less than wall time); the load range."""
  names = [n for n in rounds[0]["a"]["rates"] if n in rounds[0]["b"]["rates"]]
  if not names:
    raise ValueError(f"the two sides share no rate: {list(rounds[0]['a']['rates'])} vs "
                     f"{list(rounds[0]['b']['rates'])}")
  out = {}
  for name in names:
    a = [r["a"]["rates"][name] for r in rounds]
    b = [r["b"]["rates"][name] for r in rounds]
    ratios = [x / y for x, y in zip(a, b)]
    out[name] = {"a_median": statistics.median(a), "a_range": (min(a), max(a)),
                 "b_median": statistics.median(b), "b_range": (min(b), max(b)),
                 "ratios": ratios, "ratio_median": statistics.median(ratios),
                 "ratio_range": (min(ratios), max(ratios))}
  loads = [r[k] for r in rounds for k in ("load_a", "load_b")]
  cpu = [r["b"]["cpu_s"] / r["a"]["cpu_s"] for r in rounds]
  return {"rates": out, "load_range": (min(loads), max(loads)), "cpu_ratios": cpu,
          "cpu_ratio_median": statistics.median(cpu)}
