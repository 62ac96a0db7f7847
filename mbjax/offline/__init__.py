"""The offline video pipeline: video → `.npz` chunks → labels → episodes (see issue 6).

Import-light on purpose: importing `mbjax.offline` pulls in nothing beyond the standard
library, so a tool that only reads chunks does not load PyAV or JAX. Import the modules:

  `chunks`    the `.npz` chunk layout (upstream keys), validation, atomic writes that keep
              existing keys, deterministic iteration, the per-directory `manifest.json`, and
              the import of upstream chunks.
  `video`     decoding with PyAV at an exact target frame rate (by timestamps), resizing,
              and the resumable video → chunks conversion behind
              `experiments/video_to_trajectory.py`.
  `episodes`  episodes in an open format (`.npz` with RLDS field names) from labelled chunks,
              and the import of upstream `.pt` episodes.
  `rlds`      episodes ↔ RLDS datasets (tensorflow-datasets, `array_record` files, no
              TensorFlow): export for tfds users, import of any producer's dataset.

Chunk lifecycle (the phases of `experiments/video_pretrain.py` add keys to the same file):
`video_to_trajectory` writes observations, dones, meta, video_source [, audio]; IDM
labelling adds `actions`; reward labelling adds `rewards` and `progress_scores`; skill
labelling adds `skill_tokens`. `chunks.update_chunk` is the one way to add keys.
"""
