"""Trains role specialists from a base checkpoint, with PBT:
`python -m experiments.train_population --config=configs/arena_population.py --workdir=<dir>`.

Rerunning the same command with the same --workdir resumes from its latest checkpoint;
`--max_updates=N` stops after update N (checkpointed), so a long run can be done in parts.
At the end each role's best member is written to `<workdir>/specialists/<role>`.
`--config.run.num_devices=N` splits every member's envs over N local devices (0, the
default: all; `num_envs` must divide by N); a run may resume on another device count.
"""
import os

# Avoids a jaxlib 0.10 CPU scheduler deadlock (see BUILD.md); must precede importing jax.
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_enable_concurrency_optimized_scheduler=false")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from experiments import cli  # noqa: E402
from mbjax.train import metrics, population  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Population config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and logs.")
_MAX_UPDATES = flags.DEFINE_integer("max_updates", None, "Stop after this update.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  metrics.quiet_library_logging()
  try:
    population.validate(_CONFIG.value)
  except ValueError as e:  # the config's fault, by validate's contract
    raise app.UsageError(str(e)) from None
  result = population.run(_CONFIG.value, _WORKDIR.value, max_updates=_MAX_UPDATES.value)
  logging.info("Done at update %d.", int(result["state"].update_step))
  for name, path in result["outputs"].items():
    print(f"{name:>12}: {path}")


if __name__ == "__main__":
  cli.run(main)
