"""The offline video pipeline: `python -m experiments.video_pretrain
--config=configs/video_pretrain.py --workdir=runs/video [--phase=all]`.

Phases (and the upstream aliases train_idm, label_actions, train_reward, label_rewards,
export_rollouts, train_skills) are listed in `mbjax.offline.pipeline.REGISTRY`; `--phase` takes
one, a comma-separated list, or `all`. Rerunning resumes: finished models and labels are
kept. The `eval` phase prints the report table and writes `<workdir>/report.json`.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_enable_concurrency_optimized_scheduler=false")

import json  # noqa: E402

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from experiments import cli  # noqa: E402
from mbjax.offline import pipeline  # noqa: E402
from mbjax.train import metrics  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Pipeline config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where chunks, models, episodes and the "
                               "report go.")
_PHASE = flags.DEFINE_string("phase", "all", "all, a phase, an alias, or a comma list.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  metrics.quiet_library_logging()
  try:
    phases = pipeline.resolve_phases(_PHASE.value, _CONFIG.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  results = pipeline.run(_WORKDIR.value, _CONFIG.value, ",".join(phases))
  for name, info in results.items():
    summary = {k: v for k, v in info.items() if k not in ("final", "evaluation")}
    logging.info("%s: %s", name, json.dumps(summary, default=str)[:300])


if __name__ == "__main__":
  cli.run(main)
