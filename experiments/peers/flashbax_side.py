"""flashbax's side of the `replay` row, in a venv with flashbax from PyPI (BUILD.md, "Peers"):
an item buffer of 500,000 uint8[32, 32, 3] items, adding batches of 128 (jitted, buffer
donated) and sampling batches of 256 (jitted) from a full buffer — the shapes of mbjax's side
(`mbjax.data.replay`).
"""
from __future__ import annotations

import argparse
import importlib.metadata
import time

from experiments.peers import protocol

CAPACITY, ADD_BATCH, SAMPLE_BATCH = 500_000, 128, 256


def setup(steps: int):
  import flashbax
  import jax
  import jax.numpy as jnp

  buffer = flashbax.make_item_buffer(max_length=CAPACITY, min_length=1,
                                     sample_batch_size=SAMPLE_BATCH, add_batches=True)
  state = buffer.init(jnp.zeros((32, 32, 3), jnp.uint8))
  batch = jnp.ones((ADD_BATCH, 32, 32, 3), jnp.uint8)
  add = jax.jit(buffer.add, donate_argnums=0)
  sample = jax.jit(buffer.sample)
  holder = {"state": jax.block_until_ready(add(state, batch))}
  key = jax.random.PRNGKey(0)
  # Sampled as a full buffer (the slots hold zeros or ones: the values do not matter). Made
  # after each round's adds, which donate the buffer it shares.
  full = lambda: holder["state"].replace(is_full=jnp.array(True))
  jax.block_until_ready(sample(full(), key))

  def run(index):
    del index
    start = time.perf_counter()
    for _ in range(steps):
      holder["state"] = add(holder["state"], batch)
    jax.block_until_ready(holder["state"])
    add_s = (time.perf_counter() - start) / steps
    start, state, out = time.perf_counter(), full(), None
    for _ in range(steps):
      out = sample(state, key)
    jax.block_until_ready(out)
    sample_s = (time.perf_counter() - start) / steps
    return {"rates": {"add": 1 / add_s, "sample": 1 / sample_s},
            "extra": {"add_ms": add_s * 1e3, "sample_ms": sample_s * 1e3}}

  return run, {"flashbax": importlib.metadata.version("flashbax"), "jax": jax.__version__}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=2000, help="Adds and samples per round.")
  args = parser.parse_args()
  protocol.serve(lambda: setup(args.steps))


if __name__ == "__main__":
  main()
