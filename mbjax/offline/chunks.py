"""The `.npz` chunk: one contiguous piece of one video, and every label added to it later.

Layout (the upstream MetaBonk keys and dtypes, so upstream tools read our chunks and
`import_upstream_chunk` reads theirs; T = frames in the chunk):

| key             | dtype / shape        | written by                                          |
|-----------------|----------------------|-----------------------------------------------------|
| observations    | uint8 [T, H, W, 3]   | video → chunks (RGB)                                |
| dones           | bool [T]             | video → chunks: True on the chunk's last frame only |
| meta            | 0-d unicode (JSON)   | video → chunks (fields below)                       |
| video_source    | 0-d unicode          | video → chunks: the source file                     |
| audio           | int16 [T, spf]       | video → chunks, optional: mono PCM, frame t's slice |
| proxy_actions   | float32 [T, A]       | upstream optical-flow proxy (import only)           |
| actions         | float32 [T, A]       | IDM labelling                                       |
| rewards         | float32 [T]          | reward labelling: (s[t+1] − s[t]) · scale           |
| game_rewards    | float32 [T]          | the game's own reward, where a recording carried it |
| progress_scores | float32 [T]          | reward labelling: s[t]                              |
| skill_tokens    | int32 [T]            | skill labelling (−1 = not covered)                  |
| audio_tokens    | int32 [T]            | upstream audio labelling (import only)              |

Other keys are kept as they are (any non-object dtype). No key may hold pickled objects:
every read is `np.load(..., allow_pickle=False)`, and `meta` is a JSON *string*.

`meta` fields written by `video.convert_video`: episode_id (`{stem}_{hash8}`, shared by all
chunks of one source), chunk_index, last_chunk (whether the video really ended here: as
upstream, `dones[-1]` is True in *every* chunk, so this is how a consumer tells a cut from
an end), start_frame and start_time_s (of frame 0 in the output timeline), fps, frame_size
[H, W], source_fps, timeline_start_s (the conversion's start_s: frame j is at time
timeline_start_s + (start_frame + j) / fps; `video.source_frame_indices` maps it to a
source frame, e.g. to index a ground-truth recording), action_labeling / reward_labeling
("none" until labelled), and the upstream audio fields (audio_sample_rate,
audio_samples_per_frame, audio_channels).

File names: `demo_{episode_id}_chunk{NNNN}.npz`, so sorting the names groups the chunks of
one source in order. Every write goes to a hidden temporary file in the same directory and
is moved into place with `os.replace`: a crash never leaves a half-written chunk under its
final name, and `list_chunks` ignores the temporaries.

Compression: chunks are written as a zip of `.npy` members (what `np.savez` writes and
`np.load` reads, whatever the member compression: stored or raw deflate, readable by
upstream's `np.load` and any unzip). `write_chunk(compression=...)` picks "none" (stored, as
`np.savez`), "fast" (deflate level 1), "rle" (deflate level 1 with zlib's Z_RLE strategy:
run lengths and Huffman codes, no match search), "deflate" (level 6, as
`np.savez_compressed`, where upstream spent most of its conversion time) or "auto" (the
default), chosen per chunk from a sample of the frames (4, evenly spaced), so that chunks
are about as small as `np.savez_compressed`'s at a fraction of its time: stored when level
1 saves less than `AUTO_STORE_SAVING` of the sample (random bytes); "deflate" when level 1
already shrinks it below `AUTO_FLAT_RATIO` (flat-coloured game frames: level 6 makes them
another 20-30% smaller for about 2.5x level 1's time, which is small beside decoding
them); else "rle" when its sample is at most `AUTO_RLE_SLACK` larger than level 1's
(detailed, textured frames: the match search finds next to nothing there, and skipping it
deflates 2.4x faster); else "fast". Large members are
deflated in blocks on every core at once (each block primed with the previous block's last
32 KiB, ends byte-aligned, as pigz does; zlib releases the GIL), which is why chunks are
zipped here rather than through `zipfile`. Measured by `experiments/bench_video.py` and
against upstream by `experiments/bench_peers.py --row=video` (BENCHMARKS.md, "Video →
chunks"). The key layout is the same for every choice.

`manifest.json` (one per output directory, written atomically by `save_manifest`) records
per source: status ("done" or "skipped"), reason (for skipped), chunks, frames, fps and the
settings used, so a rerun skips finished sources and retries the rest.
"""
from __future__ import annotations

import concurrent.futures
import io
import json
import os
import re
import struct
import zipfile
import zlib
from typing import Iterator, Mapping, NamedTuple

import numpy as np

from mbjax import files

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "mbjax.offline.chunks/1"
REQUIRED_KEYS = ("observations", "dones", "meta")
# key -> (numpy dtype, rank); every array key's leading axis is T.
ARRAY_KEYS: dict[str, tuple[np.dtype, int]] = {
    "observations": (np.dtype(np.uint8), 4),
    "dones": (np.dtype(np.bool_), 1),
    "audio": (np.dtype(np.int16), 2),
    "proxy_actions": (np.dtype(np.float32), 2),
    "actions": (np.dtype(np.float32), 2),
    "rewards": (np.dtype(np.float32), 1),
    "progress_scores": (np.dtype(np.float32), 1),
    "skill_tokens": (np.dtype(np.int32), 1),
    "audio_tokens": (np.dtype(np.int32), 1),
}
STRING_KEYS = ("meta", "video_source")


class Deflate(NamedTuple):
  """Raw deflate of a zip member at zlib `level` with zlib `strategy`."""
  level: int
  strategy: int = zlib.Z_DEFAULT_STRATEGY


# None: stored (np.savez); a Deflate; "auto" is resolved per chunk by `compression_codec`.
COMPRESSION_LEVELS = {"none": None, "fast": Deflate(1), "rle": Deflate(1, zlib.Z_RLE),
                      "deflate": Deflate(6), "auto": "auto"}
DEFAULT_COMPRESSION = "auto"
# "auto" stores a chunk whose frame sample level 1 shrinks by less than this fraction.
AUTO_STORE_SAVING = 0.03
# "auto" takes level 6 when level 1 shrinks the sample below this fraction of its size.
AUTO_FLAT_RATIO = 0.5
# "auto" takes Z_RLE when its sample is at most this much larger than level 1's.
AUTO_RLE_SLACK = 0.05
# Members above this size are deflated in blocks of this size on every core.
DEFLATE_BLOCK = 2 << 20
_WINDOW = 32 << 10  # deflate's window: each block is primed with the previous block's tail


class ChunkError(ValueError):
  """A chunk (or manifest) file is unreadable or does not have the expected layout."""


def chunk_name(episode_id: str, index: int) -> str:
  return f"demo_{episode_id}_chunk{index:04d}.npz"


def encode_meta(meta: Mapping) -> np.ndarray:
  """A 0-d unicode array holding `meta` as JSON (loads without pickle)."""
  return np.asarray(json.dumps(dict(meta), sort_keys=True))


def decode_meta(value: np.ndarray, name: str = "meta") -> dict:
  if value.dtype.kind != "U" or value.ndim != 0:
    raise ChunkError(f"{name}: expected a 0-d unicode JSON string, got "
                     f"{value.dtype}{list(value.shape)}")
  try:
    meta = json.loads(str(value))
  except json.JSONDecodeError as e:
    raise ChunkError(f"{name}: not valid JSON ({e})") from None
  if not isinstance(meta, dict):
    raise ChunkError(f"{name}: expected a JSON object, got {type(meta).__name__}")
  return meta


def validate_chunk(arrays: Mapping[str, np.ndarray], name: str = "chunk") -> int:
  """Checks keys, dtypes and shapes against the layout; returns T. Errors name `name`."""
  missing = [k for k in REQUIRED_KEYS if k not in arrays]
  if missing:
    raise ChunkError(f"{name}: missing key(s) {missing}; a chunk needs {list(REQUIRED_KEYS)}")
  obs = arrays["observations"]
  length = obs.shape[0] if obs.ndim else 0
  for key, value in arrays.items():
    where = f"{name}: key {key!r}"
    if value.dtype.kind == "O":
      raise ChunkError(f"{where} holds Python objects; chunks store plain arrays only")
    if key in STRING_KEYS:
      if value.dtype.kind != "U" or value.ndim != 0:
        raise ChunkError(f"{where}: expected a 0-d unicode string, got "
                         f"{value.dtype}{list(value.shape)}")
      continue
    if key in ARRAY_KEYS:
      dtype, rank = ARRAY_KEYS[key]
      if value.dtype != dtype or value.ndim != rank:
        raise ChunkError(f"{where}: expected {dtype} with {rank} axes, got "
                         f"{value.dtype}{list(value.shape)}")
    if value.ndim and value.shape[0] != length:
      raise ChunkError(f"{where}: {value.shape[0]} rows but observations has {length} frames")
  if obs.shape[-1] != 3 or length == 0:
    raise ChunkError(f"{name}: observations must be uint8 [T>0, H, W, 3] RGB, got "
                     f"{list(obs.shape)}")
  decode_meta(arrays["meta"], f"{name}: meta")
  return length


_pool: concurrent.futures.ThreadPoolExecutor | None = None


def _deflate_pool() -> concurrent.futures.ThreadPoolExecutor:
  global _pool
  if _pool is None:
    _pool = concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1,
                                                  thread_name_prefix="chunk-deflate")
  return _pool


def _deflate_block(data: memoryview, start: int, end: int, codec: Deflate, last: bool) -> bytes:
  primer = bytes(data[max(0, start - _WINDOW):start])
  compressor = zlib.compressobj(codec.level, zlib.DEFLATED, -15, 8, codec.strategy,
                                **({"zdict": primer} if primer else {}))
  return compressor.compress(data[start:end]) + compressor.flush(
      zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH)


def deflate(segments, codec: Deflate) -> list[bytes]:
  """One raw deflate stream of the concatenated `segments` (buffers), as pieces to be written
  in order. Each segment is cut into blocks of `DEFLATE_BLOCK` bytes, compressed in
  parallel threads; every block but the last ends on a byte boundary (a sync flush), so the
  pieces concatenate into a valid stream."""
  segments = [memoryview(s).cast("B") for s in segments]
  blocks = [(data, start, min(start + DEFLATE_BLOCK, len(data)))
            for data in segments for start in range(0, max(len(data), 1), DEFLATE_BLOCK)]
  last = len(blocks) - 1
  jobs = [(data, start, end, codec, i == last) for i, (data, start, end) in enumerate(blocks)]
  if sum(len(s) for s in segments) <= DEFLATE_BLOCK:
    return [_deflate_block(*job) for job in jobs]
  return list(_deflate_pool().map(lambda job: _deflate_block(*job), jobs))


def _npy_bytes(value: np.ndarray) -> tuple[bytes, memoryview]:
  """(the `.npy` header, the array's bytes) of `value`, without copying its data."""
  if not value.flags.c_contiguous:  # (np.ascontiguousarray would turn 0-d into 1-d)
    value = value.copy(order="C")
  if value.dtype.hasobject:
    raise ChunkError("chunks store plain arrays only, not Python objects")
  header = io.BytesIO()
  np.lib.format.write_array_header_2_0(header, np.lib.format.header_data_from_array_1_0(value))
  return header.getvalue(), memoryview(value.reshape(-1).view(np.uint8))


_ZIP64_EXTRA = struct.Struct("<HHQQ")  # id 1, length 16, uncompressed, compressed size
_LOCAL = struct.Struct("<IHHHHHIIIHH")
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")
_DOS_DATE = (0 << 9) | (1 << 5) | 1  # 1980-01-01, 00:00: chunks do not record a time


def _write_zip(f, members: list[tuple[str, list, int, int, int]]) -> None:
  """Writes (name, payload pieces, method, crc32, uncompressed size) as a zip64 archive."""
  central = []
  for name, pieces, method, crc, size in members:
    offset, packed = f.tell(), sum(len(p) for p in pieces)
    encoded = name.encode()
    f.write(_LOCAL.pack(0x04034B50, 45, 0, method, 0, _DOS_DATE, crc, 0xFFFFFFFF,
                        0xFFFFFFFF, len(encoded), _ZIP64_EXTRA.size))
    f.write(encoded + _ZIP64_EXTRA.pack(1, 16, size, packed))
    for piece in pieces:
      f.write(piece)
    extra = struct.pack("<HHQQQ", 1, 24, size, packed, offset)
    central.append(_CENTRAL.pack(0x02014B50, 45, 45, 0, method, 0, _DOS_DATE, crc, 0xFFFFFFFF,
                                 0xFFFFFFFF, len(encoded), len(extra), 0, 0, 0, 0o644 << 16,
                                 0xFFFFFFFF) + encoded + extra)
  start = f.tell()
  for entry in central:
    f.write(entry)
  end = f.tell()
  f.write(struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, len(central), len(central),
                      end - start, start))
  f.write(struct.pack("<IIQI", 0x07064B50, 0, end, 1))
  f.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF,
                      0))


def write_npz(path: str, arrays: Mapping[str, np.ndarray], codec: Deflate | None) -> None:
  """Writes `arrays` as `.npy` members of a zip (np.load-compatible) via a temporary file,
  each member stored (`codec` None) or deflated with `codec`."""
  members = []
  for key, value in arrays.items():
    header, data = _npy_bytes(np.asanyarray(value))
    crc = zlib.crc32(data, zlib.crc32(header))
    if codec is None:
      pieces, method = [header, data], zipfile.ZIP_STORED
    else:
      pieces, method = deflate([header, data], codec), zipfile.ZIP_DEFLATED
    members.append((key + ".npy", pieces, method, crc, len(header) + len(data)))
  with files.atomic_open(path, "wb") as f:
    _write_zip(f, members)


def compression_codec(compression: str, arrays: Mapping[str, np.ndarray]) -> Deflate | None:
  """The member codec (None: stored) that `compression` means for these arrays."""
  if compression not in COMPRESSION_LEVELS:
    raise ValueError(f"compression must be one of {sorted(COMPRESSION_LEVELS)}, "
                     f"got {compression!r}")
  if compression != "auto":
    return COMPRESSION_LEVELS[compression]
  biggest = max(arrays.values(), key=lambda a: a.nbytes)  # the frames, in a chunk
  picks = np.linspace(0, len(biggest) - 1, 4).astype(int) if biggest.ndim else []
  sample = memoryview(np.ascontiguousarray(biggest[picks]).tobytes() if len(picks) else b"")
  fast, rle = COMPRESSION_LEVELS["fast"], COMPRESSION_LEVELS["rle"]
  if len(sample) < 4096:  # too small to matter either way
    return fast
  fast_size = len(_deflate_block(sample, 0, len(sample), fast, True))
  if fast_size > (1 - AUTO_STORE_SAVING) * len(sample):
    return None
  if fast_size < AUTO_FLAT_RATIO * len(sample):
    return COMPRESSION_LEVELS["deflate"]
  rle_size = len(_deflate_block(sample, 0, len(sample), rle, True))
  return rle if rle_size <= (1 + AUTO_RLE_SLACK) * fast_size else fast


def write_chunk(path: str, arrays: Mapping[str, np.ndarray],
                compression: str = DEFAULT_COMPRESSION) -> None:
  """Validates `arrays` and writes them to `path` atomically."""
  codec = compression_codec(compression, arrays)
  validate_chunk(arrays, path)
  write_npz(path, arrays, codec)


def read_chunk(path: str, keys: tuple[str, ...] | None = None, validate: bool = True) -> dict:
  """The arrays of a chunk (all keys, or `keys`), validated unless `validate=False`."""
  try:
    with np.load(path, allow_pickle=False) as npz:
      wanted = npz.files if keys is None else keys
      absent = [k for k in wanted if k not in npz.files]
      if absent:
        raise ChunkError(f"{path}: missing key(s) {absent} (has {sorted(npz.files)})")
      arrays = {key: npz[key] for key in wanted}
  except ChunkError:
    raise
  except (OSError, EOFError, ValueError, zipfile.BadZipFile) as e:
    raise ChunkError(f"{path}: not a readable .npz chunk ({type(e).__name__}: {e})") from None
  if validate and keys is None:
    validate_chunk(arrays, path)
  return arrays


def chunk_keys(path: str) -> tuple[str, ...]:
  """The keys a chunk holds, reading only its zip directory."""
  try:
    with np.load(path, allow_pickle=False) as npz:
      return tuple(npz.files)
  except (OSError, EOFError, ValueError, zipfile.BadZipFile) as e:
    raise ChunkError(f"{path}: not a readable .npz chunk ({type(e).__name__}: {e})") from None


def read_meta(path: str) -> dict:
  """The decoded `meta` of a chunk, reading nothing else."""
  return decode_meta(read_chunk(path, keys=("meta",), validate=False)["meta"], f"{path}: meta")


def update_chunk(path: str, new_arrays: Mapping[str, np.ndarray],
                 compression: str = DEFAULT_COMPRESSION) -> dict:
  """Adds or replaces keys of an existing chunk, keeping every other key; atomic.

  Returns the merged arrays. The new arrays must have the chunk's T rows.
  """
  merged = {**read_chunk(path), **new_arrays}
  write_chunk(path, merged, compression)
  return merged


def list_chunks(directory: str) -> list[str]:
  """Paths of the chunks directly in `directory`, sorted by name (deterministic order)."""
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"chunk directory {directory!r} does not exist")
  names = sorted(n for n in os.listdir(directory)
                 if n.endswith(".npz") and not n.startswith("."))
  return [os.path.join(directory, n) for n in names]


def iter_chunks(directory: str, keys: tuple[str, ...] | None = None
                ) -> Iterator[tuple[str, dict]]:
  """(path, arrays) of each chunk of `directory` in `list_chunks` order, read lazily."""
  for path in list_chunks(directory):
    yield path, read_chunk(path, keys)


# -- manifest ---------------------------------------------------------------------------------


def load_manifest(directory: str) -> dict:
  """The directory's manifest, or an empty one if there is none yet."""
  path = os.path.join(directory, MANIFEST)
  if not os.path.exists(path):
    return {"format": MANIFEST_FORMAT, "sources": {}}
  try:
    with open(path) as f:
      manifest = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ChunkError(f"{path}: unreadable manifest ({e}); move it away to start over") from None
  if not isinstance(manifest, dict) or not isinstance(manifest.get("sources"), dict):
    raise ChunkError(f"{path}: expected a JSON object with a 'sources' object")
  return manifest


def save_manifest(directory: str, manifest: Mapping) -> None:
  """Writes `manifest.json` atomically (temporary file, then `os.replace`)."""
  files.write_json(os.path.join(directory, MANIFEST), manifest, indent=1)


# -- upstream import --------------------------------------------------------------------------

_UPSTREAM_CHUNK_INDEX = re.compile(r"_chunk(\d+)$")


def from_upstream(arrays: Mapping[str, np.ndarray], name: str) -> dict:
  """Upstream chunk arrays → this layout.

  Supported upstream layout (`scripts/video_to_trajectory.py` and the labelling phases of
  `scripts/video_pretrain.py`): observations uint8 [T, H, W, 3] (or [T, 3, H, W], which is
  transposed), dones bool-like [T] (synthesised, last True, if absent), meta as a 0-d JSON
  string (or absent), video_source 0-d string, and the optional keys of the table above in
  any numeric dtype of the same kind (cast to the layout's dtype: the upstream float64
  rewards of older files become float32). Other keys are kept. Pickled object arrays are
  refused (`np.load` without pickle cannot read them).
  """
  out = dict(arrays)
  if "observations" not in out:
    raise ChunkError(f"{name}: an upstream chunk needs 'observations' (has {sorted(out)})")
  obs = out["observations"]
  if obs.ndim == 4 and obs.shape[1] == 3 and obs.shape[-1] != 3:
    obs = np.transpose(obs, (0, 2, 3, 1))
  if obs.dtype != np.uint8:
    raise ChunkError(f"{name}: observations must be uint8, got {obs.dtype}")
  out["observations"] = np.ascontiguousarray(obs)
  length = obs.shape[0]
  if "dones" not in out:
    dones = np.zeros(length, bool)
    dones[-1] = True
    out["dones"] = dones
  for key, (dtype, _) in ARRAY_KEYS.items():
    if key in out and out[key].dtype != dtype:
      value = out[key]
      same_kind = (value.dtype.kind in "biu" and dtype.kind in "biu") or (
          value.dtype.kind == dtype.kind)
      if not same_kind and not (key == "dones" and value.dtype.kind in "iuf"):
        raise ChunkError(f"{name}: key {key!r} has dtype {value.dtype}, expected {dtype}")
      out[key] = value.astype(dtype)
  meta = decode_meta(out["meta"], f"{name}: meta") if "meta" in out else {}
  stem = os.path.splitext(os.path.basename(name))[0]
  match = _UPSTREAM_CHUNK_INDEX.search(stem)
  meta.setdefault("chunk_index", int(match.group(1)) if match else 0)
  meta.setdefault("episode_id", stem[:match.start()] if match else stem)
  meta["imported_from"] = os.path.basename(name)
  out["meta"] = encode_meta(meta)
  validate_chunk(out, name)
  return out


def import_upstream_chunk(src: str, dst: str, compression: str = DEFAULT_COMPRESSION) -> dict:
  """Reads an upstream `.npz` chunk, converts it (`from_upstream`) and writes it to `dst`."""
  try:
    with np.load(src, allow_pickle=False) as npz:
      arrays = {key: npz[key] for key in npz.files}
  except ValueError as e:
    raise ChunkError(f"{src}: holds pickled objects, which are not loaded ({e})") from None
  except (OSError, EOFError, zipfile.BadZipFile) as e:
    raise ChunkError(f"{src}: not a readable .npz ({type(e).__name__}: {e})") from None
  converted = from_upstream(arrays, src)
  write_chunk(dst, converted, compression)
  return converted
