"""Writing output files atomically: every file the project writes goes to a temporary name
in the same directory and is renamed into place, so a reader (or a run killed mid-write)
sees the old file or the new one, never half of one.

`atomic_path` hands out the temporary path (for writers that open files themselves, such as
an MP4 encoder), `atomic_open` a file object, `write_json` writes strict JSON,
`staging_directory` a directory to fill and rename. Files are created like `open()` creates
them (mode 0666 less the umask, usually 0644), not with `tempfile.mkstemp`'s owner-only
0600 (directories 0777 less the umask, not `mkdtemp`'s 0700).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
from typing import Any, Iterator


def _create_beside(path: str, create) -> str:
  """Creates (with `create(name)`) a new hidden temporary name beside `path`; returns it."""
  directory, name = os.path.split(os.path.abspath(path))
  while True:
    tmp = os.path.join(directory, f".{name}.{secrets.token_hex(4)}.tmp")
    try:
      create(tmp)
      return tmp
    except FileExistsError:
      continue


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
  """Yields a fresh temporary path beside `path` (an empty file already exists there);
  renames it to `path` when the block ends without an exception, removes it otherwise."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = _create_beside(
      path, lambda name: os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)))
  try:
    yield tmp
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    raise


def staging_directory(path: str) -> str:
  """A new empty directory beside `path` (mode 0777 less the umask, not `mkdtemp`'s 0700),
  to fill and then rename to `path`."""
  return _create_beside(path, os.mkdir)


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w") -> Iterator[Any]:
  """`open(path, mode)` ("w" or "wb") through a temporary file renamed into place on close."""
  if mode not in ("w", "wb"):
    raise ValueError(f"atomic_open({path!r}, {mode!r}): expected mode 'w' or 'wb'")
  with atomic_path(path) as tmp:
    with open(tmp, mode) as f:
      yield f


def strict(value: Any) -> Any:
  """`value` with numpy scalars and arrays made Python values and every non-finite float
  spelled as a string ("nan", "inf", "-inf"; `float()` reads them back), so that it
  serialises as strict JSON."""
  if isinstance(value, dict):
    return {k: strict(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [strict(v) for v in value]
  if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):  # numpy values
    return strict(value.tolist())
  if isinstance(value, float) and not math.isfinite(value):
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
  return value


def write_json(path: str, payload: Any, indent: int | None = 2) -> None:
  """Writes `payload` as strict JSON (sorted keys; non-finite floats spelled as `strict`
  says) to `path`, atomically."""
  text = json.dumps(strict(payload), indent=indent, sort_keys=True, allow_nan=False)
  with atomic_open(path) as f:
    f.write(text + "\n")
