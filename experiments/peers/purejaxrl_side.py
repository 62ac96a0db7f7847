"""PureJaxRL's side of the `ppo_cartpole` row: its unmodified `purejaxrl/ppo.py` from a
checkout (`--checkout`), in a venv with its own gymnax (BUILD.md, "Peers").

The run's settings are the `config` dict of ppo.py's `__main__` block, read from the file
(so they are whatever the checkout publishes), with DEBUG off: its per-episode print
callback is a logging choice, not part of the training. `make_train(config)` is jitted and
compiled once; round i trains seed i (`PRNGKey(i)`) and reports env-steps/s and the mean
return of the episodes that ended in the last 10 updates (the measure mbjax's side reports).
"""
from __future__ import annotations

import argparse
import ast
import importlib.metadata
import os
import sys
import time

from experiments.peers import protocol


def published_config(ppo_path: str) -> dict:
  """The literal `config = {...}` assigned under `if __name__ == "__main__":` in ppo.py."""
  with open(ppo_path) as f:
    tree = ast.parse(f.read(), ppo_path)
  for node in tree.body:
    if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
      for statement in node.body:
        if (isinstance(statement, ast.Assign) and len(statement.targets) == 1
            and getattr(statement.targets[0], "id", None) == "config"):
          return ast.literal_eval(statement.value)
  raise ValueError(f"{ppo_path}: no `config = {{...}}` literal in its __main__ block")


def final_return(metrics, last_updates: int = 10) -> float:
  """Mean return of the episodes that ended in the last `last_updates` updates."""
  import numpy as np
  ended = np.asarray(metrics["returned_episode"][-last_updates:])
  returns = np.asarray(metrics["returned_episode_returns"][-last_updates:])
  return float(returns[ended].mean()) if ended.any() else float("nan")


def setup(checkout: str):
  import jax

  source = os.path.join(os.path.abspath(checkout), "purejaxrl")
  if not os.path.exists(os.path.join(source, "ppo.py")):
    raise FileNotFoundError(f"--checkout={checkout!r}: expected PureJaxRL's checkout "
                            "(with purejaxrl/ppo.py)")
  sys.path.insert(0, source)
  import ppo  # the checkout's purejaxrl/ppo.py (it imports its sibling wrappers.py)

  config = dict(published_config(os.path.join(source, "ppo.py")), DEBUG=False)
  train = jax.jit(ppo.make_train(config))
  compiled = train.lower(jax.random.PRNGKey(0)).compile()
  jax.block_until_ready(compiled(jax.random.PRNGKey(0)))
  steps = config["NUM_UPDATES"] * config["NUM_STEPS"] * config["NUM_ENVS"]

  def run(index):
    start = time.perf_counter()
    out = jax.block_until_ready(compiled(jax.random.PRNGKey(index)))
    seconds = time.perf_counter() - start
    return {"rates": {"env_steps": steps / seconds},
            "extra": {"final_return": final_return(out["metrics"])}}


  return run, {"env_steps": steps, "jax": jax.__version__,
               "gymnax": importlib.metadata.version("gymnax"), "config": config}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--checkout", required=True, help="PureJaxRL's checkout.")
  args = parser.parse_args()
  protocol.serve(lambda: setup(args.checkout))


if __name__ == "__main__":
  main()
