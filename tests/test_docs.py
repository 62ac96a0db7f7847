"""The documents travel with a clone: their links and file references resolve inside the
repository, the README lists every experiment binary, BENCHMARKS.md stays a results
document, and no file carries numbered work-log labels. Pure Python, no JAX."""
import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Markdown links [text](target); targets with a scheme or a bare #anchor are not files.
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# Backticked repository paths such as `mbjax/train/run.py` or `configs/arena_ppo.py:debug`.
_PATH = re.compile(r"`((?:mbjax|experiments|configs|tests|launch|docs|third_party)/"
                   r"[\w./-]*\.(?:py|md|sh|sbatch|txt|cfg|toml))(?:[:][\w,.:]*)?`")
_OUTSIDE = ("../shared", "shared/notes", "shared/DESIGN", "shared/reference")
_ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth",
             "ninth", "tenth", "eleventh", "twelfth", "thirteenth", "fourteenth", "fifteenth",
             "sixteenth", "seventeenth", "eighteenth", "nineteenth", "twentieth")
_WORK_LOG = re.compile(r"\b(?:%s)[\s-]+sessions?\b|\bsession\s+\d+\b" % "|".join(_ORDINALS),
                       re.IGNORECASE)
_TEXT_SUFFIXES = (".py", ".md", ".cfg", ".toml", ".txt", ".sh", ".sbatch", ".json", ".yml",
                  ".yaml", ".ini")
_SKIP_DIRS = {".git", "runs", "__pycache__", "node_modules"}
BENCHMARKS_MAX_BYTES = 32 * 1024  # a results document, not a notebook: history goes to docs/


def _documents():
  docs = ["README.md", "BUILD.md", "BENCHMARKS.md"]
  for folder, _, files in os.walk(os.path.join(ROOT, "docs")):
    docs += [os.path.relpath(os.path.join(folder, f), ROOT) for f in sorted(files)
             if f.endswith(".md")]
  return docs


def _tracked_text_files():
  """Tracked files by git when the checkout has it, else every file outside build outputs."""
  try:
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                            check=True).stdout.decode().split("\0")
    paths = [p for p in listed if p]
  except (OSError, subprocess.CalledProcessError):
    paths = []
    for folder, dirs, files in os.walk(ROOT):
      dirs[:] = [d for d in dirs if d not in _SKIP_DIRS and not d.startswith(".venv")
                 and not d.endswith(".egg-info")]
      paths += [os.path.relpath(os.path.join(folder, f), ROOT) for f in files]
  return [p for p in paths if p.endswith(_TEXT_SUFFIXES) or os.path.basename(p) == "Makefile"]


def _read(relative):
  with open(os.path.join(ROOT, relative), encoding="utf-8") as f:
    return f.read()


def test_the_documents_are_found():
  docs = _documents()
  assert "docs/DESIGN.md" in docs
  assert any(d.startswith("docs/experiments/") for d in docs)


@pytest.mark.parametrize("document", _documents())
def test_links_and_file_references_resolve_inside_the_repository(document):
  text = _read(document)
  base = os.path.dirname(os.path.join(ROOT, document))
  broken = []
  for target in _LINK.findall(text):
    if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
      continue
    path = os.path.normpath(os.path.join(base, target.split("#")[0]))
    if not path.startswith(ROOT + os.sep) or not os.path.exists(path):
      broken.append(f"link {target}")
  for reference in _PATH.findall(text):
    if not os.path.exists(os.path.join(ROOT, reference)):
      broken.append(f"file `{reference}`")
  broken += [f"mentions {outside}" for outside in _OUTSIDE if outside in text]
  assert not broken, f"{document}: " + "; ".join(broken)


def test_the_readme_layout_names_every_experiment_binary():
  readme = _read("README.md")
  folder = os.path.join(ROOT, "experiments")
  binaries = sorted(name[:-3] for name in os.listdir(folder) if name.endswith(".py")
                    and '__name__ == "__main__"' in _read(os.path.join("experiments", name)))
  assert "train" in binaries and "bench_ppo" in binaries
  missing = [name for name in binaries
             if not re.search(rf"(?m)^\s+{re.escape(name)}\s{{2,}}\S", readme)]
  assert not missing, f"README.md's layout does not describe experiments/: {missing}"


def test_benchmarks_stays_a_results_document():
  size = os.path.getsize(os.path.join(ROOT, "BENCHMARKS.md"))
  assert size <= BENCHMARKS_MAX_BYTES, (
      f"BENCHMARKS.md is {size} bytes (limit {BENCHMARKS_MAX_BYTES}): keep the current table "
      "per benchmark and move how a result was reached to a dated note in docs/experiments/")


def test_no_numbered_work_log_labels():
  files = _tracked_text_files()
  assert "README.md" in files
  hits = []
  for relative in files:
    if relative == "tests/test_docs.py":  # its own examples of labels, below
      continue
    try:
      text = _read(relative)
    except (UnicodeDecodeError, FileNotFoundError):
      continue
    for number, line in enumerate(text.splitlines(), 1):
      match = _WORK_LOG.search(line)
      if match:
        hits.append(f"{relative}:{number}: {match.group(0)!r}")
  assert not hits, "numbered work-log labels (say what the result is, not when):\n" + \
      "\n".join(hits)


def test_the_work_log_pattern_matches_labels_and_not_ordinary_prose():
  for label in ("Thirteenth session (2026-11-28)", "(fifth session)", "the tenth session's",
                "third-session rows", "session 12"):
    assert _WORK_LOG.search(label), label
  for prose in ("A second run skips both", "a session of play", "runs once per session",
                "the third run's seed"):
    assert not _WORK_LOG.search(prose), prose
