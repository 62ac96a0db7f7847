"""Runs the dual-system controller: `python -m experiments.run_dual_system
--config=configs/dual_system.py[:llm,bridge,push] --config.motor.checkpoint=<workdir>`.

Prints the loop summary (achieved rate, step-latency percentiles, directive sources,
System 2 calls and fallbacks, load average) as JSON. A real backend that wants a key takes it
from the environment, named by `--config.llm.api_key_env` (as experiments/merge.py's
`--llm_api_key_env`):

  OPENAI_API_KEY=... python -m experiments.run_dual_system --config=configs/dual_system.py:llm \
      --config.llm.protocol=openai --config.llm.base_url=https://host/v1 \
      --config.llm.model=<model> --config.llm.api_key_env=OPENAI_API_KEY
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_enable_concurrency_optimized_scheduler=false")

import json  # noqa: E402

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from experiments import cli  # noqa: E402
from mbjax.runtime import dual_system  # noqa: E402

# No default: a default config is loaded, overrides and all, when the flag is defined, before
# an unknown override could be reported in one line.
_CONFIG = config_flags.DEFINE_config_file("config", None, "Runtime config file "
                                          "(configs/dual_system.py[:variants]).",
                                          lock_config=True)
flags.mark_flag_as_required("config")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  print(json.dumps(dual_system.run(_CONFIG.value), indent=2))


if __name__ == "__main__":
  cli.run(main)
