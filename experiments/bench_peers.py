"""mbjax against its peers, side by side in one run: `python -m experiments.bench_peers
--row=ROW --checkouts=DIR --venvs=DIR [--rounds=5]`.

Each side of a row is a worker process (`experiments/peers/protocol.py`): mbjax's in this
Python (`experiments/peers/mbjax_side.py`), the peer's in its own virtualenv under `--venvs`
with its code imported from a checkout under `--checkouts` (set up as BUILD.md, "Peers",
says; no peer code is in this repository). mbjax's worker compiles first, then the peer's;
then rounds alternate, mbjax then peer, each side idle while the other runs. Printed per
rate: each side's median and range over the rounds, the ratio mbjax / peer of every round
(how many times faster mbjax is), its median and range, the load average (1 minute) read
before each side's round, and a Markdown row for BENCHMARKS.md.

Rows (peer, its venv, what is timed):
  ppo_cartpole   PureJaxRL `purejaxrl/ppo.py` (venv purejaxrl) vs configs/cartpole_ppo.py:
                 5e5 env steps, env-steps/s and the final return; round i is seed i
  world_model    upstream MetaBonk's torch RSSM update (venv metabonk), B16 × T64, obs 204,
                 vs mbjax's world model at upstream's sizes with mbjax's layers
  world_model_upstream_layers   the same, mbjax with upstream's layer counts
  ppo_learner    upstream's PPO learner update (rollout 2048, 3 epochs × 256, continuous 2
                 + branch 33, obs 204) vs `ppo.update` at that shape (`--equal_params`:
                 mbjax's network narrowed to at most upstream's parameter count)
  idm            upstream's IDM labelling at 224² vs the `:arena` IDM (`idm_labelling.label`)
  reward         upstream's reward model scoring at 224² vs `:arena`'s (`reward_model.score`)
  video          upstream's `process_video` vs `video.convert_many` on one 640×360 H.264
                 clip (`--clip=textured|arena`) → 224² `.npz` chunks; bytes/frame printed
  replay         flashbax item buffer (venv flashbax) vs `mbjax.data.replay`: add 128,
                 sample 256 of 500k uint8[32, 32, 3]
  dreamer        DreamerV3 `--configs size1m` (venv dreamerv3, CPU float32) world model +
                 imagination train step vs mbjax's world model + dream step
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_enable_concurrency_optimized_scheduler=false")

import dataclasses  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

from absl import app, flags  # noqa: E402

from experiments.peers import protocol  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Row:
  venv: str  # the peer's virtualenv under --venvs
  peer_module: str  # its worker, under experiments/peers
  checkout: str | None  # its checkout under --checkouts (None: installed in the venv)
  peer_args: tuple[str, ...] = ()  # formatted with the mbjax worker's ready info
  mbjax_args: tuple[str, ...] = ()
  unit: str = ""  # what one rate counts, per second
  extras: tuple[str, ...] = ()  # per-round `extra` fields printed beside the rates


ROWS = {
    "ppo_cartpole": Row("purejaxrl", "purejaxrl_side", "purejaxrl", unit="env steps",
                        extras=("final_return",)),
    "world_model": Row("metabonk", "metabonk_side", "MetaBonk",
                       ("--row=world_model", "--action_dim={action_dim}"),
                       unit="transitions", extras=("ms",)),
    "world_model_upstream_layers": Row("metabonk", "metabonk_side", "MetaBonk",
                                       ("--row=world_model", "--action_dim={action_dim}"),
                                       unit="transitions", extras=("ms",)),
    "ppo_learner": Row("metabonk", "metabonk_side", "MetaBonk", ("--row=ppo_learner",),
                       unit="transitions", extras=("ms",)),
    "idm": Row("metabonk", "metabonk_side", "MetaBonk", ("--row=idm",), unit="frames"),
    "reward": Row("metabonk", "metabonk_side", "MetaBonk", ("--row=reward",), unit="frames"),
    "video": Row("metabonk", "metabonk_side", "MetaBonk", ("--row=video", "--clip={clip}"),
                 ("--clip={clip}",), unit="frames", extras=("bytes_per_frame",)),
    "replay": Row("flashbax", "flashbax_side", None, ("--steps=2000",), ("--steps=2000",),
                  unit="calls", extras=("add_ms", "sample_ms")),
    "dreamer": Row("dreamerv3", "dreamerv3_side", "dreamerv3", ("--steps=2",), ("--steps=2",),
                   unit="replayed steps", extras=("ms",)),
}

_ROW = flags.DEFINE_enum("row", None, list(ROWS), "Which comparison to run.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Alternating rounds (each side once per round).")
_CHECKOUTS = flags.DEFINE_string("checkouts", "", "Folder holding the peers' checkouts: "
                                 "purejaxrl, MetaBonk, dreamerv3 (BUILD.md, 'Peers').")
_VENVS = flags.DEFINE_string("venvs", "", "Folder holding the peers' virtualenvs: purejaxrl, "
                             "metabonk, flashbax, dreamerv3 (BUILD.md, 'Peers').")
_EQUAL_PARAMS = flags.DEFINE_bool("equal_params", False, "ppo_learner: narrow mbjax's network "
                                  "to at most upstream's parameter count.")
_CLIP = flags.DEFINE_enum("clip", "textured", ["textured", "arena"], "video: source content.")
_CLIP_FRAMES = flags.DEFINE_integer("clip_frames", 900, "video: frames of the 30 fps clip.")
_COMPRESSION = flags.DEFINE_string("compression", "auto", "video: mbjax's chunk compression.")
_JSON_OUT = flags.DEFINE_string("json_out", "", "Append the row's full result (one JSON line).")


def _python(venv: str) -> str:
  python = os.path.join(_VENVS.value, venv, "bin", "python")
  if not _VENVS.value or not os.path.exists(python):
    raise app.UsageError(f"no {python!r}: --venvs must hold the peers' virtualenvs "
                         f"(BUILD.md, 'Peers'); got --venvs={_VENVS.value!r}")
  return python


def _checkout(name: str) -> str:
  path = os.path.join(_CHECKOUTS.value, name)
  if not _CHECKOUTS.value or not os.path.isdir(path):
    raise app.UsageError(f"no checkout {path!r}: --checkouts must hold {name}/ (BUILD.md, "
                         f"'Peers'); got --checkouts={_CHECKOUTS.value!r}")
  return path


def _make_clip(work: str) -> str:
  from experiments import video_clips
  path = os.path.join(work, f"{_CLIP.value}_640x360.mp4")
  video_clips.CLIPS[_CLIP.value](path, _CLIP_FRAMES.value, 640, 360)
  return path


def fmt(x: float) -> str:
  """Whole numbers with thousands separators from 100 up, else 3 significant digits."""
  return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def markdown_row(name: str, summary: dict, extras: dict, date: str, host: str) -> str:
  """| date | machine | load | row | rate | peer | mbjax | ratio (range) | CPU-s ratio |
  extras |."""
  lines = []
  low, high = summary["load_range"]
  for rate, s in summary["rates"].items():
    lines.append(
        f"| {date} | {host} | {low:.1f}–{high:.1f} | {name} | {rate}/s | "
        f"{fmt(s['b_median'])} | {fmt(s['a_median'])} | **{s['ratio_median']:.2f}×** "
        f"({s['ratio_range'][0]:.2f}–{s['ratio_range'][1]:.2f}) | "
        f"{summary['cpu_ratio_median']:.2f}× | "
        + "; ".join(f"{k} {v}" for k, v in extras.items()) + " |")
  return "\n".join(lines)


def _median_extras(rounds: list[dict], names: tuple[str, ...]) -> dict:
  import statistics
  out = {}
  for name in names:
    for side, label in (("b", "peer"), ("a", "mbjax")):
      values = [r[side]["extra"][name] for r in rounds if name in r[side]["extra"]]
      if values:
        out[f"{label} {name}"] = fmt(statistics.median(values)) + (
            f" (min {fmt(min(values))})" if name == "final_return" else "")
  return out


def main(argv):
  del argv
  name, row = _ROW.value, ROWS[_ROW.value]
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
  work = tempfile.mkdtemp(prefix=f"bench_peers-{name}-")
  values = {"clip": _make_clip(work) if name == "video" else ""}
  mbjax_cmd = [sys.executable, "-m", "experiments.peers.mbjax_side", f"--row={name}",
               *(a.format(**values) for a in row.mbjax_args)]
  if name == "ppo_learner" and _EQUAL_PARAMS.value:
    mbjax_cmd.append("--equal_params")
  if name == "video":
    mbjax_cmd.append(f"--compression={_COMPRESSION.value}")
  peer_python = _python(row.venv)
  checkout_args = [f"--checkout={_checkout(row.checkout)}"] if row.checkout else []
  print(f"{name}: {_ROUNDS.value} rounds, mbjax then {row.venv}, alternating; logs in {work}",
        flush=True)
  mbjax = protocol.Worker("mbjax", mbjax_cmd, repo, env, os.path.join(work, "mbjax.log"))
  peer = None
  try:
    print(f"mbjax ready: setup {mbjax.ready['setup_s']:.1f} s, {mbjax.ready['info']}",
          flush=True)
    values.update(mbjax.ready["info"])
    try:
      peer_args = [a.format(**values) for a in row.peer_args]
    except KeyError as missing:
      raise SystemExit(f"{name}: the peer's arguments {row.peer_args} need {missing}, which "
                       f"mbjax's worker did not report (it reported {sorted(values)})")
    peer_cmd = [peer_python, "-m", f"experiments.peers.{row.peer_module}", *checkout_args,
                *peer_args]
    peer = protocol.Worker(row.venv, peer_cmd, repo, env, os.path.join(work, "peer.log"))
    print(f"{row.venv} ready: setup {peer.ready['setup_s']:.1f} s, {peer.ready['info']}",
          flush=True)
    rounds = protocol.alternate(mbjax, peer, _ROUNDS.value)
  finally:
    mbjax.close()
    if peer is not None:
      peer.close()
  summary = protocol.summarise(rounds)
  for index, r in enumerate(rounds):
    cells = [f"round {index}: load {r['load_a']:.1f}/{r['load_b']:.1f}",
             f"CPU-s mbjax {r['a']['cpu_s']:.2f} peer {r['b']['cpu_s']:.2f}"]
    for rate in summary["rates"]:
      cells.append(f"{rate} mbjax {fmt(r['a']['rates'][rate])}/s peer "
                   f"{fmt(r['b']['rates'][rate])}/s ratio "
                   f"{summary['rates'][rate]['ratios'][index]:.2f}")
    for extra in row.extras:
      a, b = (r[side]["extra"].get(extra) for side in ("a", "b"))
      cells.append(f"{extra} mbjax {'-' if a is None else fmt(a)} peer "
                   f"{'-' if b is None else fmt(b)}")
    print(" | ".join(str(c) for c in cells), flush=True)
  for rate, s in summary["rates"].items():
    print(f"{name} {rate} ({row.unit} per s): mbjax median {fmt(s['a_median'])} "
          f"(range {fmt(s['a_range'][0])}–{fmt(s['a_range'][1])}), peer median "
          f"{fmt(s['b_median'])} (range {fmt(s['b_range'][0])}–{fmt(s['b_range'][1])}); "
          f"ratio median {s['ratio_median']:.2f}× (range {s['ratio_range'][0]:.2f}–"
          f"{s['ratio_range'][1]:.2f}); CPU seconds peer / mbjax median "
          f"{summary['cpu_ratio_median']:.2f}× (range {min(summary['cpu_ratios']):.2f}–"
          f"{max(summary['cpu_ratios']):.2f}); load {summary['load_range'][0]:.1f}–"
          f"{summary['load_range'][1]:.1f}")
  date = datetime.date.today().isoformat()
  host = f"{platform.machine()} {os.cpu_count()}-core"
  extras = _median_extras(rounds, row.extras)
  print(markdown_row(name, summary, extras, date, host))
  if _JSON_OUT.value:
    with open(_JSON_OUT.value, "a") as f:
      f.write(json.dumps({"row": name, "date": date, "host": host, "mbjax": mbjax.ready,
                          "peer": peer.ready, "rounds": rounds, "summary": summary,
                          "equal_params": _EQUAL_PARAMS.value, "clip": _CLIP.value}) + "\n")


if __name__ == "__main__":
  flags.mark_flag_as_required("row")
  app.run(main)
