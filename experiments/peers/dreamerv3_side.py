"""DreamerV3's side of the `dreamer` row: its own agent from a checkout (`--checkout`), in a
venv with its requirements for the CPU (BUILD.md, "Peers").

The agent is built as its `dreamerv3/main.py` builds it, from `configs.yaml`'s `defaults`
updated with `size1m`, then `jax.platform=cpu`, `jax.compute_dtype=float32` and
`replay_context=0` (windows start from a zero state, as mbjax's do). Spaces: a 96-float
vector observation (BonkArena's size) with reward and episode flags, actions 2 continuous
in [-1, 1] and one categorical of 4 (BonkArena's). One round times `--steps` calls of
`Agent.train` on a fixed device-resident batch of 16 × 64 random steps: the world-model
update and the imagination actor-critic update (horizon 15 from every posterior), one jitted
step.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

from experiments.peers import protocol

BATCH, LENGTH, OBS_DIM = 16, 64, 96


def setup(checkout: str, steps: int):
  checkout = os.path.abspath(checkout)
  if not os.path.exists(os.path.join(checkout, "dreamerv3", "configs.yaml")):
    raise FileNotFoundError(f"--checkout={checkout!r}: expected DreamerV3's checkout "
                            "(with dreamerv3/configs.yaml)")
  sys.path.insert(0, checkout)
  import elements
  import jax
  import numpy as np
  import ruamel.yaml as yaml
  from dreamerv3.agent import Agent
  from embodied.jax import internal

  configs = yaml.YAML(typ="safe").load(
      elements.Path(os.path.join(checkout, "dreamerv3", "configs.yaml")).read())
  config = elements.Config(configs["defaults"]).update(configs["size1m"])
  config = config.update({"jax.platform": "cpu", "jax.compute_dtype": "float32",
                          "jax.prealloc": False, "replay_context": 0,
                          "batch_size": BATCH, "batch_length": LENGTH,
                          "logdir": tempfile.mkdtemp(prefix="peers-dreamerv3-")})
  obs_space = {"vector": elements.Space(np.float32, (OBS_DIM,)),
               "reward": elements.Space(np.float32), "is_first": elements.Space(bool),
               "is_last": elements.Space(bool), "is_terminal": elements.Space(bool)}
  act_space = {"move": elements.Space(np.float32, (2,), -1.0, 1.0),
               "card": elements.Space(np.int32, (), 0, 4)}
  agent = Agent(obs_space, act_space, elements.Config(
      **config.agent, logdir=config.logdir, seed=config.seed, jax=config.jax,
      batch_size=config.batch_size, batch_length=config.batch_length,
      replay_context=config.replay_context, report_length=config.report_length,
      replica=config.replica, replicas=config.replicas))

  rng = np.random.default_rng(0)
  data = {"vector": rng.normal(size=(BATCH, LENGTH, OBS_DIM)).astype(np.float32),
          "reward": np.zeros((BATCH, LENGTH), np.float32),
          "is_first": np.zeros((BATCH, LENGTH), bool),
          "is_last": np.zeros((BATCH, LENGTH), bool),
          "is_terminal": np.zeros((BATCH, LENGTH), bool),
          "move": rng.uniform(-1, 1, (BATCH, LENGTH, 2)).astype(np.float32),
          "card": rng.integers(0, 4, (BATCH, LENGTH)).astype(np.int32),
          "consec": np.zeros((BATCH, LENGTH), np.int32),
          "stepid": np.zeros((BATCH, LENGTH, 20), np.uint8)}
  data["is_first"][:, 0] = True
  data = internal.device_put(data, agent.train_sharded)  # as its replay stream puts batches
  carry = {"carry": agent.init_train(BATCH)}
  counter = {"n": 0}

  def train_step():
    batch = {**data, "seed": agent._seeds(counter["n"], agent.train_mirrored)}
    counter["n"] += 1
    carry["carry"], _, _ = agent.train(carry["carry"], batch)
    jax.block_until_ready(carry["carry"])

  start = time.perf_counter()
  train_step()
  compile_s = time.perf_counter() - start

  run = protocol.steps_round(train_step, steps, BATCH * LENGTH, "replayed_steps")
  return run, {"jax": jax.__version__, "compile_s": compile_s, "config": "size1m",
               "batch": BATCH, "length": LENGTH}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--checkout", required=True, help="DreamerV3's checkout.")
  parser.add_argument("--steps", type=int, default=2, help="Train steps per round.")
  args = parser.parse_args()
  protocol.serve(lambda: setup(args.checkout, args.steps))


if __name__ == "__main__":
  main()
