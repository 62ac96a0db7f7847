"""Marks chunks of a video as human-labelled, from a recording of the same video with the
actions that were played (the labelled subset `idm_train` and `reward_train` learn from):

  python -m experiments.label_chunks --config=configs/video_pretrain.py \
      --chunks=runs/video/chunks --recording=videos/play_000.npz

`--chunks`: chunk files or directories (the pipeline's `<workdir>/chunks`); of these, the
chunks cut from the recording's video get its actions. The video is the file beside the
recording with the same name (`record_arena` writes `<name>.mp4` and `<name>.npz`), or
`--video`. The recording's fields: `mbjax/offline/recorded_actions.py`. Each labelled chunk
gets `actions`, `actions_valid`, `game_rewards` when the recording has `rewards`, and meta
`action_labeling` "human", written atomically; nothing is written unless every matching
chunk fits the recording.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_enable_concurrency_optimized_scheduler=false")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from experiments import cli  # noqa: E402
from mbjax.offline import chunks as chunks_lib  # noqa: E402
from mbjax.offline import recorded_actions  # noqa: E402
from mbjax.offline.pipeline import config as pipeline_config  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "The pipeline config (its `action` "
                                          "spec and chunk compression).", lock_config=True)
_CHUNKS = flags.DEFINE_list("chunks", None, "Chunk files or directories of chunks.")
_RECORDING = flags.DEFINE_string("recording", None, "The `.npz` with the video's actions.")
_VIDEO = flags.DEFINE_string("video", None, "The recorded video; default: the file beside "
                             "--recording with the same name.")
flags.mark_flags_as_required(["config", "chunks", "recording"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cfg = _CONFIG.value
  try:
    paths = recorded_actions.label_chunks(
        _CHUNKS.value, _RECORDING.value, pipeline_config.action_spec(cfg), _VIDEO.value,
        cfg.convert.compression)
  except (chunks_lib.ChunkError, FileNotFoundError) as e:
    raise app.UsageError(str(e)) from None
  for path in paths:
    print(f"{path}: labelled from {_RECORDING.value}")


if __name__ == "__main__":
  cli.run(main)
