"""Trains an agent: `python -m experiments.train --config=configs/<exp>.py --workdir=<dir>`.

Rerunning the same command with the same --workdir resumes from its latest checkpoint (a
larger `--config.total_env_steps` extends a finished run); Ctrl-C stops after saving one.
Config values are overridden with `--config.<path>=<value>` (e.g. `--config.ppo.lr=1e-4`).
"""
import os

# Avoids a jaxlib 0.10 CPU scheduler deadlock (see BUILD.md); must precede importing jax.
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_enable_concurrency_optimized_scheduler=false")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from experiments import cli  # noqa: E402
from mbjax.train import distributed  # noqa: E402
from mbjax.train import metrics  # noqa: E402
from mbjax.train import run as run_lib  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, videos.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", "", "HOST:PORT of process 0, for multi-process runs.")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", 0, "Processes in this run (0: one, or what SLURM / a TPU pod says).")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "This process's index in [0, N).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  metrics.quiet_library_logging()
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  result = run_lib.run(_CONFIG.value, _WORKDIR.value)
  logging.info("Done. Final metrics: %s", {k: v for k, v in result.items() if k != "outputs"})
  if distributed.is_primary():
    for name, path in result["outputs"].items():
      print(f"{name:>12}: {path}")


if __name__ == "__main__":
  cli.run(main)
