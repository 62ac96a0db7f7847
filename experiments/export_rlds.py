"""`.npz` episodes (the offline pipeline's `export` phase) → an RLDS dataset for tfds users:

  python -m experiments.export_rlds --episodes_dir=runs/video/episodes --out_dir=runs/video/rlds

Writes `<out_dir>/<name>/1.0.0/` (layout in `mbjax/offline/rlds.py`), readable without
TensorFlow as `tfds.builder_from_directory(dir).as_data_source()["train"]`, and trained on by
the pipeline with `--config.source.rlds_dir=<that dir>`. Needs the `rlds` extra. Episodes
that do not read, or whose fields differ from the first one's, are skipped and listed; the
exit status is then 1.
"""
from absl import flags, logging

from experiments import cli
from mbjax.offline import rlds

_EPISODES_DIR = flags.DEFINE_string("episodes_dir", None, "Directory of .npz episodes.",
                                    required=True)
_OUT_DIR = flags.DEFINE_string("out_dir", None, "TFDS data directory to write into.",
                               required=True)
_NAME = flags.DEFINE_string("name", rlds.DATASET_NAME, "Dataset name (a directory level).")


def main(argv):
  del argv
  info = rlds.export_rlds(_EPISODES_DIR.value, _OUT_DIR.value, _NAME.value,
                          progress=logging.info)
  print(f"{info['episodes']} episodes, {info['steps']} steps -> {info['dataset_dir']}")
  for name, reason in sorted(info["skipped"].items()):
    print(f"skipped {name}: {reason}")
  return 1 if info["skipped"] else 0


if __name__ == "__main__":
  cli.run(main)
