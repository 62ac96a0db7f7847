"""Episodes in an open format: one `.npz` per episode with the RLDS step field names.

Layout (T steps; step t is observation t, the action taken on it and that action's
outcome, as in RLDS):

| key             | dtype / shape                 | meaning                                    |
|-----------------|-------------------------------|--------------------------------------------|
| observation     | uint8 [T, H, W, 3] (frames)   | what was seen; `episode_metadata`          |
|                 | or float32 [T, D] (embeddings)| ["observation_kind"] says which            |
| action          | float32 [T, A]                | continuous action vector (upstream: move x, |
|                 |                               | y and 4 button probabilities; BonkArena:   |
|                 |                               | move x, y)                                 |
| action_discrete | int32 [T, K], optional        | discrete branches (BonkArena: menu choice) |
| reward          | float32 [T]                   | reward of action t (zeros when unlabelled) |
| discount        | float32 [T]                   | 1 − is_terminal                            |
| is_first        | bool [T]                      | True at t = 0 only                         |
| is_last         | bool [T]                      | True at t = T − 1 only                     |
| is_terminal     | bool [T]                      | the episode ended in a terminal state at t |
| progress_score, | float32 [T] / int32 [T] /     | optional per-step labels carried over from |
| skill_token,    | int32 [T]                     | the chunk (progress_scores, skill_tokens,  |
| audio_token     |                               | audio_tokens)                              |
| episode_metadata| 0-d unicode JSON              | observation_kind, source chunk, ...         |

Why `.npz` rather than an RLDS dataset through tensorflow-datasets. We checked (2026-11-26,
tensorflow-datasets 4.9.10 with array_record 0.8.6, TensorFlow not installed) that RLDS
*can* be written and read without TensorFlow: a `GeneratorBasedBuilder` with
`file_format="array_record"` writes it and `builder.as_data_source()` reads it back. We
still write `.npz` because (1) that route adds tensorflow-datasets and ~25 packages
(pyarrow, protobuf, etils, ...; ~300 MB) to an otherwise small install; (2) a builder
writes a whole dataset in one `download_and_prepare` call, where the export phase needs
per-episode atomic, resumable writes; (3) the usual RLDS readers (`tfds.load`, the `rlds`
transformations) need TensorFlow anyway; (4) every consumer here (offline world model,
skills) reads NumPy. The field names above are the RLDS ones, so a builder yielding these
files' arrays as `steps` is a short adapter if an RLDS dataset is ever wanted.

A video's episode is one chunk (as upstream exported one `.pt` per chunk); chunk metadata
(episode_id, chunk_index, last_chunk) is kept so consumers can stitch chunks back together.
`is_terminal` is the chunk's `terminals` (the deaths `mbjax.offline.deaths` finds; all False
without them). A chunk boundary is not a terminal: an episode that stops without one was cut
(truncated), and consumers bootstrap there. A chunk with a death before its last frame is
exported as one episode per life, cut after the death (`split_lives`), named
`<chunk stem>_life<k>.npz`.

Upstream `.pt` episodes (`torch.save` of a dict: observations f32 [T, D], actions f32
[T, 6], optional rewards f32 [T], dones bool [T], audio_tokens i32 [T], meta dict) import
with `import_upstream_pt` when PyTorch is installed (read with `weights_only=True`, which
refuses arbitrary pickled objects); PyTorch is not a dependency of mbjax.
"""
from __future__ import annotations

import json
import os
import zipfile
from typing import Callable, Mapping

import numpy as np

from mbjax.offline import chunks

OBSERVATION_KINDS = ("frames", "embeddings")
STEP_FLAGS = ("is_first", "is_last", "is_terminal")
# chunk key -> episode key, for the optional per-step labels carried over.
CHUNK_LABELS = {"progress_scores": "progress_score", "skill_tokens": "skill_token",
                "audio_tokens": "audio_token"}
LABEL_DTYPES = {"progress_score": np.float32, "skill_token": np.int32,
                 "audio_token": np.int32}


class EpisodeError(ValueError):
  """An episode (or its source) does not have the expected layout; names the input."""


def make_episode(observation: np.ndarray, action: np.ndarray, reward: np.ndarray | None = None,
                 action_discrete: np.ndarray | None = None,
                 is_terminal: np.ndarray | None = None, labels: Mapping | None = None,
                 metadata: Mapping | None = None, name: str = "episode") -> dict:
  """The episode arrays of the module layout, validated. `labels`: optional per-step
  progress_score / skill_token / audio_token."""
  observation = np.asarray(observation)
  length = len(observation)
  kind = "frames" if observation.dtype == np.uint8 else "embeddings"
  if kind == "embeddings":
    observation = observation.astype(np.float32)
  terminal = (np.zeros(length, bool) if is_terminal is None
              else np.asarray(is_terminal, bool))
  flags = np.zeros((2, length), bool)
  if length:
    flags[0, 0] = flags[1, -1] = True
  episode = {
      "observation": observation,
      "action": np.asarray(action, np.float32),
      "reward": (np.zeros(length, np.float32) if reward is None
                 else np.asarray(reward, np.float32)),
      "discount": (1.0 - terminal).astype(np.float32),
      "is_first": flags[0], "is_last": flags[1], "is_terminal": terminal,
      "episode_metadata": np.asarray(json.dumps(
          {**(metadata or {}), "observation_kind": kind}, sort_keys=True)),
  }
  if action_discrete is not None:
    episode["action_discrete"] = np.asarray(action_discrete, np.int32)
  for key, value in (labels or {}).items():
    if key not in LABEL_DTYPES:
      raise EpisodeError(f"{name}: unknown label {key!r}; expected one of {sorted(LABEL_DTYPES)}")
    episode[key] = np.asarray(value, LABEL_DTYPES[key])
  validate_episode(episode, name)
  return episode


def metadata(episode: Mapping[str, np.ndarray]) -> dict:
  return json.loads(str(episode["episode_metadata"]))


def validate_episode(episode: Mapping[str, np.ndarray], name: str = "episode") -> int:
  """Checks the layout (keys, dtypes, lengths, flags, finiteness); returns T."""
  required = ("observation", "action", "reward", "discount", *STEP_FLAGS, "episode_metadata")
  missing = [k for k in required if k not in episode]
  if missing:
    raise EpisodeError(f"{name}: missing key(s) {missing}")
  obs = episode["observation"]
  length = len(obs)
  if length == 0:
    raise EpisodeError(f"{name}: an episode needs at least one step")
  try:
    kind = metadata(episode).get("observation_kind")
  except (json.JSONDecodeError, AttributeError):
    raise EpisodeError(f"{name}: episode_metadata must be a JSON object string") from None
  if kind == "frames" and not (obs.dtype == np.uint8 and obs.ndim == 4 and obs.shape[-1] == 3):
    raise EpisodeError(f"{name}: frame observations must be uint8 [T, H, W, 3], got "
                       f"{obs.dtype}{list(obs.shape)}")
  if kind == "embeddings" and not (obs.dtype == np.float32 and obs.ndim == 2):
    raise EpisodeError(f"{name}: embedding observations must be float32 [T, D], got "
                       f"{obs.dtype}{list(obs.shape)}")
  if kind not in OBSERVATION_KINDS:
    raise EpisodeError(f"{name}: observation_kind must be one of {OBSERVATION_KINDS}, got {kind!r}")
  expected = {"action": (np.float32, 2), "reward": (np.float32, 1),
              "discount": (np.float32, 1), "action_discrete": (np.int32, 2),
              **{f: (np.bool_, 1) for f in STEP_FLAGS},
              **{k: (d, 1) for k, d in LABEL_DTYPES.items()}}
  for key, (dtype, rank) in expected.items():
    if key not in episode:
      continue
    value = episode[key]
    if value.dtype != dtype or value.ndim != rank or len(value) != length:
      raise EpisodeError(f"{name}: {key!r} must be {np.dtype(dtype)} with {rank} axes and "
                         f"{length} rows, got {value.dtype}{list(value.shape)}")
  for key in ("action", "reward", "observation"):
    if episode[key].dtype.kind == "f" and not np.all(np.isfinite(episode[key])):
      raise EpisodeError(f"{name}: {key!r} has non-finite values")
  if not (episode["is_first"][0] and episode["is_first"].sum() == 1 and episode["is_last"][-1]
          and episode["is_last"].sum() == 1):
    raise EpisodeError(f"{name}: is_first/is_last must mark exactly the first/last step")
  return length


def write_episode(path: str, episode: Mapping[str, np.ndarray],
                  compression: str = chunks.DEFAULT_COMPRESSION) -> None:
  """Validates and writes an episode atomically (temporary file, then `os.replace`)."""
  validate_episode(episode, path)
  chunks.write_npz(path, episode, chunks.compression_codec(compression, episode))


def read_episode(path: str) -> dict:
  try:
    with np.load(path, allow_pickle=False) as npz:
      episode = {key: npz[key] for key in npz.files}
  except (OSError, EOFError, ValueError, zipfile.BadZipFile) as e:
    raise EpisodeError(f"{path}: not a readable episode .npz ({type(e).__name__}: {e})") from None
  validate_episode(episode, path)
  return episode


def list_episodes(directory: str) -> list[str]:
  """Episode files of a directory in sorted (deterministic) order."""
  return chunks.list_chunks(directory)


def episode_from_chunk(arrays: Mapping[str, np.ndarray], observation: str = "frames",
                       embed_fn: Callable[[np.ndarray], np.ndarray] | None = None,
                       name: str = "chunk") -> dict:
  """A labelled chunk (needs `actions`) → an episode; `is_terminal` from its `terminals`.

  observation: "frames" keeps the uint8 frames; "embeddings" stores `embed_fn(frames)`,
    float [T, D] (e.g. the reward model's embedding, as upstream's export did).
  """
  if observation not in OBSERVATION_KINDS:
    raise ValueError(f"observation must be one of {OBSERVATION_KINDS}, got {observation!r}")
  if "actions" not in arrays:
    raise EpisodeError(f"{name}: has no 'actions'; label it with the IDM before exporting")
  frames = arrays["observations"]
  if observation == "embeddings":
    if embed_fn is None:
      raise ValueError("observation='embeddings' needs an embed_fn(frames) -> [T, D]")
    obs = np.asarray(embed_fn(frames), np.float32)
    if obs.ndim != 2 or len(obs) != len(frames):
      raise EpisodeError(f"{name}: embed_fn returned {list(obs.shape)}, expected "
                         f"[{len(frames)}, D]")
  else:
    obs = frames
  terminal = np.asarray(arrays.get("terminals", np.zeros(len(frames), bool)), bool)
  if terminal.shape != (len(frames),):
    raise EpisodeError(f"{name}: terminals must be bool[{len(frames)}], got "
                       f"{list(terminal.shape)}")
  meta = chunks.decode_meta(arrays["meta"], f"{name}: meta") if "meta" in arrays else {}
  meta["source_chunk"] = os.path.basename(name)
  labels = {ep_key: arrays[key] for key, ep_key in CHUNK_LABELS.items() if key in arrays}
  return make_episode(obs, arrays["actions"], arrays.get("rewards"), is_terminal=terminal,
                      labels=labels, metadata=meta, name=name)


def split_lives(episode: Mapping[str, np.ndarray]) -> list[dict]:
  """An episode cut after every terminal step but its last: one episode per life (each with
  its own is_first/is_last; metadata gains `life`, counted from 0). An episode without an
  inner terminal comes back alone, unchanged."""
  length = len(episode["reward"])
  cuts = [int(t) + 1 for t in np.flatnonzero(episode["is_terminal"]) if t + 1 < length]
  if not cuts:
    return [dict(episode)]
  lives = []
  for life, (lo, hi) in enumerate(zip([0] + cuts, cuts + [length])):
    piece = {k: (v if k == "episode_metadata" else v[lo:hi]) for k, v in episode.items()}
    flags = np.zeros((2, hi - lo), bool)
    flags[0, 0] = flags[1, -1] = True
    piece["is_first"], piece["is_last"] = flags
    piece["episode_metadata"] = np.asarray(json.dumps({**metadata(episode), "life": life},
                                                      sort_keys=True))
    lives.append(piece)
  return lives


def export_chunks(chunk_dir: str, out_dir: str, observation: str = "frames",
                  embed_fn: Callable[[np.ndarray], np.ndarray] | None = None,
                  compression: str = chunks.DEFAULT_COMPRESSION,
                  progress: Callable[[str], None] | None = None, encoder: str = "") -> dict:
  """Every chunk of `chunk_dir` → `out_dir/<chunk name>` (one file per life, `split_lives`),
  resumably; returns the manifest. `encoder` names what `embed_fn` computes (its models'
  ids).

  A chunk already exported with the same observation kind and encoder, and not rewritten
  since (its size and modification time: a relabelling phase rewrites the chunk, and its new
  rewards, actions or deaths must reach the episodes), is skipped; a re-exported chunk's old
  episode files are replaced. A chunk that cannot be exported (unreadable, unlabelled, non-finite
  labels) is recorded as skipped with the reason, and the others are still exported.
  """
  os.makedirs(out_dir, exist_ok=True)
  manifest = chunks.load_manifest(out_dir)
  for path in chunks.list_chunks(chunk_dir):
    key = os.path.basename(path)
    entry = manifest["sources"].get(key)
    stat = os.stat(path)
    settings = {"observation": observation, "encoder": encoder,
                "chunk_stamp": [stat.st_size, stat.st_mtime_ns]}
    old_names = entry.get("episodes", [key]) if entry and entry.get("status") == "done" else []
    if (old_names and entry.get("settings") == settings
        and all(os.path.exists(os.path.join(out_dir, name)) for name in old_names)):
      continue
    try:
      episode = episode_from_chunk(chunks.read_chunk(path), observation, embed_fn, name=path)
      lives = split_lives(episode)
      stem = os.path.splitext(key)[0]
      names = [key] if len(lives) == 1 else [f"{stem}_life{k}.npz" for k in range(len(lives))]
      for life_name, life in zip(names, lives):
        write_episode(os.path.join(out_dir, life_name), life, compression)
      entry = {"status": "done", "steps": len(episode["reward"]), "episodes": names}
    except (chunks.ChunkError, EpisodeError) as e:
      entry = {"status": "skipped", "reason": str(e), "steps": 0}
    # Lives of an earlier export that this one no longer has (a death relabelled away).
    for stale in set(old_names) - set(entry.get("episodes", [])):
      if os.path.exists(os.path.join(out_dir, stale)):
        os.remove(os.path.join(out_dir, stale))
    manifest["sources"][key] = {**entry, "settings": settings}
    chunks.save_manifest(out_dir, manifest)
    if progress:
      progress(f"{key}: {entry['status']}")
  return manifest


def training_dict(episode: Mapping[str, np.ndarray], name: str = "episode") -> dict:
  """The dict `mbjax.train.offline.EpisodeData.concatenate` takes."""
  length = len(episode["reward"])
  discrete = episode.get("action_discrete", np.zeros((length, 0), np.int32))
  return {"obs": episode["observation"], "action_continuous": episode["action"],
          "action_discrete": discrete, "reward": episode["reward"],
          "terminated": episode["is_terminal"], "name": name}


# -- upstream .pt episodes ----------------------------------------------------------------------


def from_upstream_pt(data: Mapping, name: str) -> dict:
  """An upstream `.pt` episode dict (tensors or arrays) → an episode.

  observations → observation (embeddings), actions → action, rewards (zeros if absent) →
  reward, dones → is_terminal (upstream's world model treated `dones` as terminal),
  audio_tokens → audio_token, meta → episode_metadata (+ imported_from).
  """
  def array(value):
    return value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)

  missing = [k for k in ("observations", "actions") if k not in data]
  if missing:
    raise EpisodeError(f"{name}: an upstream .pt episode needs {missing} (has {sorted(data)})")
  obs = array(data["observations"])
  if obs.ndim != 2:
    raise EpisodeError(f"{name}: upstream observations must be [T, D], got {list(obs.shape)}")
  labels = {"audio_token": array(data["audio_tokens"])} if "audio_tokens" in data else None
  meta = {str(k): v for k, v in dict(data.get("meta") or {}).items()}
  meta = json.loads(json.dumps(meta, default=lambda v: np.asarray(v).tolist()))
  meta["imported_from"] = os.path.basename(name)
  return make_episode(obs, array(data["actions"]),
                      array(data["rewards"]) if "rewards" in data else None,
                      is_terminal=array(data["dones"]) if "dones" in data else None,
                      labels=labels, metadata=meta, name=name)


def import_upstream_pt(path: str) -> dict:
  """Reads an upstream `.pt` episode (PyTorch, `weights_only=True`) → an episode."""
  try:
    import torch
  except ImportError:
    raise ImportError(f"{path}: reading upstream .pt episodes needs PyTorch, which mbjax does "
                      "not install (pip install torch); convert them where torch is "
                      "available with mbjax.offline.episodes.import_upstream_pt") from None
  try:
    data = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises pickle/zip/runtime errors of many kinds
    raise EpisodeError(f"{path}: not a loadable .pt episode ({type(e).__name__}: {e})") from None
  if not isinstance(data, dict):
    raise EpisodeError(f"{path}: expected a dict, got {type(data).__name__}")
  return from_upstream_pt(data, path)
