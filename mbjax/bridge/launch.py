"""Starting and stopping reference game servers as child processes.

A separate process keeps the game's Python and JAX work off the actor's GIL, and it can be
killed and restarted to exercise the client's reconnect path. The child announces
`BONKLINK READY <ports>` on stdout; `start` waits for that line with a timeout.
"""
from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import time


class ServerProcess:
  """`python -m mbjax.bridge.server` as a managed child process."""

  def __init__(self, num_instances: int = 1, base_port: int = 0, ports: list[int] | None = None,
               **server_options):
    self.num_instances = num_instances
    self.base_port = base_port
    self.ports = list(ports) if ports else None
    self.options = server_options
    self.process: subprocess.Popen | None = None

  def start(self, timeout: float = 120.0) -> list[int]:
    """Starts the server (reusing `self.ports` after a first start); returns its ports."""
    cmd = [sys.executable, "-m", "mbjax.bridge.server",
           f"--num_instances={self.num_instances}", f"--base_port={self.base_port}"]
    if self.ports:
      cmd.append("--ports=" + ",".join(map(str, self.ports)))
    cmd += [f"--{k}={v}" for k, v in self.options.items() if v is not None]
    env = dict(os.environ)
    # One simulated device and the deadlock-free scheduler, whatever the parent uses.
    env["XLA_FLAGS"] = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
    env.setdefault("JAX_PLATFORMS", "cpu")
    self.process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    env=env, text=True)
    selector = selectors.DefaultSelector()
    selector.register(self.process.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    try:
      while time.monotonic() < deadline:
        if self.process.poll() is not None:
          raise RuntimeError(f"reference server exited with {self.process.returncode}: "
                             f"{self.process.stderr.read()[-2000:]}")
        if selector.select(timeout=0.5):
          line = self.process.stdout.readline()
          if line.startswith("BONKLINK READY "):
            self.ports = [int(p) for p in line.split()[2].split(",")]
            return self.ports
    finally:
      selector.close()
    self.kill()
    raise TimeoutError(f"reference server did not report ready within {timeout} s")

  def kill(self) -> None:
    """SIGKILL, as a crashing game would die."""
    if self.process is not None and self.process.poll() is None:
      self.process.kill()
      self.process.wait(10)

  def stop(self, timeout: float = 10.0) -> None:
    if self.process is not None and self.process.poll() is None:
      self.process.send_signal(signal.SIGTERM)
      try:
        self.process.wait(timeout)
      except subprocess.TimeoutExpired:
        self.kill()
    if self.process is not None:
      for stream in (self.process.stdout, self.process.stderr):
        if stream:
          stream.close()

  def __enter__(self):
    self.start()
    return self

  def __exit__(self, *exc):
    self.stop()
