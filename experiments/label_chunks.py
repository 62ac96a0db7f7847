"""Marks chunks of a video as human-labelled, from a recording of the same video with the
actions that were played (the labelled subset `idm_train` learns from):

  python -m experiments.label_chunks --config=configs/video_pretrain.py \\
      --chunks=runs/video/chunks --recording=videos/play_000.npz

`--chunks`: chunk files or directories (the pipeline's `<workdir>/chunks`); of these, the
chunks cut from the recording's video get its actions. The video is the file beside the
recording with the same name (`record_arena` writes `<name>.mp4` and `<name>.npz`), or
`--video`. The recording's fields: `mbjax/offline/recorded_actions.py`. Each labelled chunk
gets `actions`, `actions_valid` and meta `action_labeling` "human", written atomically;
nothing is written unless every matching chunk fits the recording.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_enable_concurrency_optimized_scheduler=false")

import zipfile  # noqa: E402

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from experiments import cli  # noqa: E402
from mbjax.offline import chunks as chunks_lib  # noqa: E402
from mbjax.offline import recorded_actions  # noqa: E402
from mbjax.offline.pipeline import config as pipeline_config  # noqa: E402
from mbjax.offline.pipeline.workspace import update_meta  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "The pipeline config (its `action` "
                                          "spec and chunk compression).", lock_config=True)
_CHUNKS = flags.DEFINE_list("chunks", None, "Chunk files or directories of chunks.")
_RECORDING = flags.DEFINE_string("recording", None, "The `.npz` with the video's actions.")
_VIDEO = flags.DEFINE_string("video", None, "The recorded video; default: the file beside "
                             "--recording with the same name.")
flags.mark_flags_as_required(["config", "chunks", "recording"])


def read_recording(path: str) -> dict:
  try:
    with np.load(path, allow_pickle=False) as npz:
      return {k: npz[k] for k in npz.files}
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    raise app.UsageError(f"{path}: not a readable .npz recording ({type(e).__name__}: "
                         f"{e})") from None


def matching_chunks(arguments: list[str], video_stem: str) -> list[str]:
  """The chunks of `arguments` cut from the video `video_stem` (its path less extension);
  a chunk file named on its own that was cut from another video is an error."""
  found = []
  for argument in arguments:
    named = not os.path.isdir(argument)
    for path in [argument] if named else chunks_lib.list_chunks(argument):
      source = _video_source(path)
      if source and os.path.splitext(os.path.realpath(source))[0] == video_stem:
        found.append(path)
      elif named:
        raise app.UsageError(f"{path}: cut from {source or 'no video'!r}, not from "
                             f"{video_stem}.*; expected a chunk of the recording's video")
  if not found:
    raise app.UsageError(f"no chunk in {arguments} was cut from {video_stem}.*; convert the "
                         "video first (video_pretrain --phase=convert) or pass --video")
  return found


def _video_source(path: str) -> str:
  """The chunk's `video_source`, or "" for a chunk without one."""
  try:
    with np.load(path, allow_pickle=False) as npz:
      return str(npz["video_source"]) if "video_source" in npz.files else ""
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    raise app.UsageError(f"{path}: not a readable .npz chunk ({type(e).__name__}: {e})") \
        from None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cfg, recording_path = _CONFIG.value, _RECORDING.value
  spec = pipeline_config.action_spec(cfg)
  recording = read_recording(recording_path)
  try:
    steps = recorded_actions.check_recording(recording, spec, recording_path)
    video_stem = os.path.splitext(os.path.realpath(_VIDEO.value or recording_path))[0]
    fps = float(recording["fps"]) if "fps" in recording else None
    updates = {}
    for path in matching_chunks(_CHUNKS.value, video_stem):
      arrays = chunks_lib.read_chunk(path)
      meta = chunks_lib.decode_meta(arrays["meta"], path)
      index = recorded_actions.steps_for_chunk(meta, len(arrays["observations"]), steps, fps,
                                               path, recording_path)
      at_frames = {k: v[index] for k, v in recording.items() if v.ndim and len(v) == steps}
      updates[path] = {**recorded_actions.chunk_labels(at_frames, spec),
                       "meta": update_meta(arrays, path, action_labeling="human",
                                           action_source=os.path.abspath(recording_path))}
  except chunks_lib.ChunkError as e:
    raise app.UsageError(str(e)) from None
  for path, new_arrays in updates.items():  # all checked: now written, each atomically
    chunks_lib.update_chunk(path, new_arrays, cfg.convert.compression)
    print(f"{path}: {len(new_arrays['actions'])} frames labelled from {recording_path}")


if __name__ == "__main__":
  cli.run(main)
