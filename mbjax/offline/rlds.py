"""RLDS datasets (tensorflow-datasets, `array_record` files) ↔ our `.npz` episodes.

RLDS (Ramos et al. 2021, "RLDS: an Ecosystem to Generate, Share and Use Datasets in
Reinforcement Learning") stores a dataset of episodes; each episode has `steps` (a nested
dataset with observation, action, reward, discount, is_first, is_last, is_terminal per step)
and `episode_metadata`. Our `.npz` episodes (`mbjax.offline.episodes`) use the same step
field names, so both directions are a change of container:

Export (`export_rlds`, `experiments/export_rlds.py`): a directory of `.npz` episodes →
`<out_dir>/<name>/<version>/`, a TFDS dataset with one `train` split in `array_record` files,
written by a `GeneratorBasedBuilder` without TensorFlow. Steps carry every field of the
episodes (frames as PNG `Image` features, embeddings and actions as `Tensor`s, the optional
`action_discrete` and labels as they are); `episode_metadata` has `file_path` (the `.npz`
name), `observation_kind` and `json` (our metadata string, verbatim). Anyone reads it with
`tfds.builder_from_directory(dir).as_data_source()` (no TensorFlow) or `tfds.load` / the
`rlds` library (with TensorFlow). Every episode must have the first readable one's fields,
dtypes and per-step shapes; an episode that does not, or does not read, is skipped and named
in the result. TFDS writes into a temporary directory and renames it when done.

Import (`read_episodes`): an RLDS dataset directory (any producer's) → our episode dicts.
`fields` maps our step field names to paths in the dataset's steps (`observation/image`
for a nested feature); unmapped names map to themselves. The seven RLDS step fields are
required — a missing one is an error naming it and listing what the steps have, before any
episode is read; `action_discrete` and the labels (progress_score, skill_token, audio_token)
are taken when present. Observations: uint8 [H, W, 3] → frames, a float vector → embeddings
(float32). Actions: a float vector → `action`; an integer action (e.g. Atari's) →
`action_discrete` with an empty `action`. Episode metadata: ours (`json`) verbatim; another
producer's scalar metadata fields as JSON, plus where the episode came from.

The working format stays `.npz` (BUILD.md, "RLDS", has the measurements): per-episode atomic,
resumable writes, and a faster read than decoding RLDS steps one at a time.

tensorflow-datasets is imported on first use (it takes seconds), from the `rlds` extra.
"""
from __future__ import annotations

import io
import json
import os
import tempfile
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from mbjax.offline import episodes as episodes_lib

DATASET_NAME = "mbjax_episodes"
VERSION = "1.0.0"
SPLIT = "train"
# The RLDS step fields every dataset has and our episodes need.
REQUIRED_FIELDS = ("observation", "action", "reward", "discount", *episodes_lib.STEP_FLAGS)
# Ours, taken when the dataset has them.
OPTIONAL_FIELDS = ("action_discrete", *episodes_lib.LABEL_DTYPES)
_STEP_DTYPES = {"action": np.float32, "action_discrete": np.int32, "reward": np.float32,
                "discount": np.float32, **{f: np.bool_ for f in episodes_lib.STEP_FLAGS},
                **episodes_lib.LABEL_DTYPES}


def _tfds():
  try:
    import tensorflow_datasets as tfds
  except ImportError:
    raise ImportError("RLDS datasets need tensorflow-datasets and array_record: "
                      "pip install -c constraints.txt -e '.[rlds]'") from None
  return tfds


# -- export ------------------------------------------------------------------------------------


def _signature(episode: Mapping[str, np.ndarray]) -> dict[str, tuple[str, tuple[int, ...]]]:
  """field → (dtype name, per-step shape) of an episode's step arrays."""
  return {key: (value.dtype.name, value.shape[1:]) for key, value in episode.items()
          if key != "episode_metadata"}


def _step_features(tfds, signature: Mapping[str, tuple[str, tuple[int, ...]]]):
  features = {}
  for key, (dtype, shape) in signature.items():
    if key == "observation" and dtype == "uint8":
      features[key] = tfds.features.Image(shape=shape, encoding_format="png")
    elif shape:
      features[key] = tfds.features.Tensor(shape=shape, dtype=np.dtype(dtype).type)
    else:
      features[key] = tfds.features.Scalar(dtype=np.dtype(dtype).type)
  return features


def _png(frame: np.ndarray) -> bytes:
  from PIL import Image  # pillow: a dependency of the rlds extra
  buffer = io.BytesIO()
  Image.fromarray(frame).save(buffer, format="PNG")
  return buffer.getvalue()


def _example(episode: Mapping[str, np.ndarray], file_path: str) -> dict:
  steps = {key: value for key, value in episode.items() if key != "episode_metadata"}
  if steps["observation"].dtype == np.uint8:
    steps["observation"] = [_png(frame) for frame in steps["observation"]]
  meta = episodes_lib.metadata(episode)
  return {"steps": steps, "episode_metadata": {
      "file_path": file_path, "observation_kind": meta["observation_kind"],
      "json": str(episode["episode_metadata"])}}


def export_rlds(episode_dir: str, out_dir: str, name: str = DATASET_NAME,
                progress: Callable[[str], None] | None = None) -> dict:
  """Every `.npz` episode of `episode_dir` → the RLDS dataset `<out_dir>/<name>/<VERSION>`.

  Returns {"dataset_dir", "episodes", "steps", "skipped": {file: reason}}. Refuses to
  overwrite an existing dataset directory.
  """
  tfds = _tfds()
  dataset_dir = os.path.join(out_dir, name, VERSION)
  if os.path.exists(dataset_dir):
    raise FileExistsError(f"{dataset_dir} exists; remove it to export again")
  paths = episodes_lib.list_episodes(episode_dir)
  skipped: dict[str, str] = {}
  signature = None
  for path in paths:  # the first readable episode fixes the features
    try:
      signature = _signature(episodes_lib.read_episode(path))
      break
    except episodes_lib.EpisodeError as e:
      skipped[os.path.basename(path)] = str(e)
  if signature is None:
    raise episodes_lib.EpisodeError(f"{episode_dir}: no readable episode .npz to export "
                                    f"({len(paths)} files)")
  counts = {"episodes": 0, "steps": 0}

  def generate():
    for path in paths:
      key = os.path.basename(path)
      try:
        episode = episodes_lib.read_episode(path)
        found = _signature(episode)
        if found != signature:
          diff = sorted(k for k in set(found) | set(signature) if found.get(k) != signature.get(k))
          raise episodes_lib.EpisodeError(
              f"{path}: step fields {diff} differ from the dataset's "
              f"{ {k: signature.get(k) for k in diff} } (got { {k: found.get(k) for k in diff} })")
      except episodes_lib.EpisodeError as e:
        skipped[key] = str(e)
        continue
      counts["episodes"] += 1
      counts["steps"] += len(episode["reward"])
      if progress:
        progress(f"{key}: {len(episode['reward'])} steps")
      yield key, _example(episode, key)

  features = tfds.features.FeaturesDict({
      "steps": tfds.features.Dataset(_step_features(tfds, signature)),
      "episode_metadata": tfds.features.FeaturesDict({
          "file_path": tfds.features.Text(), "observation_kind": tfds.features.Text(),
          "json": tfds.features.Text()})})

  class EpisodesBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version(VERSION)

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self, features=features,
          description=f"mbjax episodes exported from {os.path.abspath(episode_dir)} in the "
                      "RLDS layout (mbjax/offline/rlds.py).")

    def _split_generators(self, dl_manager):
      return {SPLIT: self._generate_examples()}

    def _generate_examples(self):
      yield from generate()

  EpisodesBuilder.name = name
  os.makedirs(out_dir, exist_ok=True)
  builder = EpisodesBuilder(data_dir=out_dir, file_format="array_record")
  with tempfile.TemporaryDirectory(prefix=".tmp-downloads-", dir=out_dir) as downloads:
    builder.download_and_prepare(
        download_dir=downloads,
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return {"dataset_dir": dataset_dir, **counts, "skipped": skipped}


# -- import ------------------------------------------------------------------------------------


def _leaves(feature, prefix: str = "") -> dict[str, Any]:
  """path → leaf feature of a (nested) FeaturesDict."""
  out = {}
  for key, value in feature.items():
    path = f"{prefix}{key}"
    if hasattr(value, "items"):
      out.update(_leaves(value, path + "/"))
    else:
      out[path] = value
  return out


def _plan(dataset_dir: str, steps_feature, fields: Mapping[str, str]) -> dict[str, str]:
  """ours → the dataset's step path for each field read, checked against the features."""
  unknown = sorted(set(fields) - set(REQUIRED_FIELDS) - set(OPTIONAL_FIELDS))
  if unknown:
    raise ValueError(f"rlds fields: unknown field(s) {unknown}; ours are "
                     f"{list(REQUIRED_FIELDS + OPTIONAL_FIELDS)}")
  leaves = _leaves(steps_feature)
  paths = {ours: fields.get(ours, ours) for ours in REQUIRED_FIELDS + OPTIONAL_FIELDS}

  def describe(ours, path):
    if any(leaf.startswith(path + "/") for leaf in leaves):
      return f"{ours!r} (a group: map it to one of its fields)"
    return f"{ours!r}" + (f" (mapped to {path!r})" if path != ours else "")

  # Required fields, and optional ones mapped to another name, must be there.
  missing = [describe(ours, path) for ours, path in paths.items()
             if path not in leaves and (ours in REQUIRED_FIELDS or path != ours)]
  if missing:
    raise episodes_lib.EpisodeError(
        f"{dataset_dir}: the RLDS steps have no field {', '.join(missing)}; they have "
        f"{sorted(leaves)}. Map our field to one of those with fields={{ours: path}} "
        "(video_pretrain: --config.source.rlds_fields.<ours>=<path>)")
  plan = {ours: path for ours, path in paths.items() if path in leaves}
  obs = leaves[plan["observation"]]
  dtype, shape = np.dtype(obs.np_dtype), tuple(obs.shape)
  if not ((dtype == np.uint8 and len(shape) == 3 and shape[-1] == 3)
          or (dtype.kind == "f" and len(shape) == 1)):
    raise episodes_lib.EpisodeError(
        f"{dataset_dir}: step field {plan['observation']!r} (observation) is {dtype.name}"
        f"{list(shape)}; expected uint8 [H, W, 3] frames or a float [D] vector")
  for ours, path in plan.items():
    feature = leaves[path]
    dtype, shape = np.dtype(feature.np_dtype), tuple(feature.shape)
    numeric = dtype.kind in "biuf"
    if ours in ("action", "action_discrete"):
      ok = numeric and len(shape) <= 1 and (ours == "action" or dtype.kind in "iu")
    elif ours != "observation":
      ok = numeric and shape == ()
    else:
      continue
    if not ok:
      raise episodes_lib.EpisodeError(
          f"{dataset_dir}: step field {path!r} ({ours}) is {dtype.name}{list(shape)}; expected "
          + ("a number or a vector of numbers per step" if ours == "action" else
             "an integer or integer vector per step" if ours == "action_discrete" else
             "a number per step"))
  if np.dtype(leaves[plan["action"]].np_dtype).kind in "biu":
    if "action_discrete" in plan:
      raise episodes_lib.EpisodeError(
          f"{dataset_dir}: {plan['action']!r} (action) is an integer, so it would be our "
          f"action_discrete, which {plan['action_discrete']!r} is already; map action to a "
          "float field")
    plan["action_discrete"] = plan.pop("action")
  return plan


def _get(step: Mapping, path: str):
  for key in path.split("/"):
    step = step[key]
  return step


def _metadata(example: Mapping, kind: str, origin: dict) -> str:
  raw = dict(example.get("episode_metadata") or {})
  text = raw.get("json")
  if text is not None:
    text = text.decode() if isinstance(text, bytes) else str(text)
    try:
      meta = json.loads(text)
    except json.JSONDecodeError:
      meta = None
    if isinstance(meta, dict) and meta.get("observation_kind") == kind:
      return text  # ours, verbatim
  meta = {}
  for key, value in raw.items():
    value = value.decode() if isinstance(value, bytes) else value
    if isinstance(value, str) or np.ndim(value) == 0:
      meta[key] = value if isinstance(value, str) else np.asarray(value).item()
  return json.dumps({**meta, **origin, "observation_kind": kind}, sort_keys=True)


def _episode(example: Mapping, plan: Mapping[str, str], name: str, origin: dict) -> dict:
  steps = example["steps"]
  rows = [steps[t] for t in range(len(steps))]
  if not rows:
    raise episodes_lib.EpisodeError(f"{name}: an episode needs at least one step")
  episode = {ours: np.stack([np.asarray(_get(row, path)) for row in rows])
             for ours, path in plan.items()}
  obs = episode["observation"]
  kind = "frames" if obs.dtype == np.uint8 else "embeddings"
  if kind == "embeddings":
    episode["observation"] = obs.astype(np.float32)
  for ours, dtype in _STEP_DTYPES.items():
    if ours in episode:
      episode[ours] = episode[ours].astype(dtype)
  if "action_discrete" in episode:
    episode["action_discrete"] = episode["action_discrete"].reshape(len(rows), -1)
  action = episode.get("action", np.zeros((len(rows), 0), np.float32))
  episode["action"] = action.reshape(len(rows), -1)
  episode["episode_metadata"] = np.asarray(_metadata(example, kind, origin))
  episodes_lib.validate_episode(episode, name)
  return episode


def read_episodes(dataset_dir: str, split: str = SPLIT, fields: Mapping[str, str] | None = None,
                  on_error: Callable[[str, Exception], None] | None = None
                  ) -> Iterator[tuple[str, dict]]:
  """(name, episode) for each episode of the RLDS dataset at `dataset_dir` (the directory
  holding `dataset_info.json`), in the dataset's order; `name` is `<dir>:<split>[i]`.

  The fields are checked before the first episode is read (see the module doc). An episode
  that does not validate raises `EpisodeError`, or, with `on_error(name, error)`, is
  reported there and skipped.
  """
  tfds = _tfds()
  if not os.path.exists(os.path.join(dataset_dir, "dataset_info.json")):
    found = sorted(os.path.relpath(root, dataset_dir)
                   for root, _, files in os.walk(dataset_dir) if "dataset_info.json" in files)
    raise FileNotFoundError(
        f"{dataset_dir}: no dataset_info.json; expected a TFDS dataset directory "
        f"(<data_dir>/<name>/<version>)" + (f"; found below it: {found[:5]}" if found else ""))
  builder = tfds.builder_from_directory(dataset_dir)
  if split not in builder.info.splits:
    raise ValueError(f"{dataset_dir}: no split {split!r}; it has {sorted(builder.info.splits)}")
  features = builder.info.features
  if "steps" not in features or not hasattr(features["steps"], "feature"):
    raise episodes_lib.EpisodeError(f"{dataset_dir}: not an RLDS dataset: its examples have "
                                    f"{sorted(features)}, expected a 'steps' dataset")
  plan = _plan(dataset_dir, features["steps"].feature, dict(fields or {}))
  source = builder.as_data_source(split=split)
  for index in range(len(source)):
    name = f"{dataset_dir}:{split}[{index}]"
    origin = {"rlds_dataset": builder.info.full_name, "rlds_split": split, "rlds_index": index}
    try:
      yield name, _episode(source[index], plan, name, origin)
    except episodes_lib.EpisodeError as e:
      if on_error is None:
        raise
      on_error(name, e)
