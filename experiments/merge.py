"""Merges specialists fine-tuned from one base checkpoint into one policy.

  python -m experiments.merge --base=runs/base --specialists=runs/scout,runs/tank \
      --method=ties --k=0.2 --lam=1.0 --out=runs/merged

Reads the latest checkpoint of each workdir written by `experiments/train.py`, takes the
task vectors of the PPO parameters against the base, prints the cosine similarity and
sign-conflict rate of every pair, gates them (`--min_cosine`, `--max_sign_conflict`,
`--gate_mode`; `--nogate` merges everyone), merges the admitted ones with
`mbjax.population.merge` and writes, under --out, a checkpoint of the base's runner state
with the merged parameters (orbax writes it to a temporary directory and renames it), the
base's config.json — so `restore_trained(--out)` and the recorder can load it — and
merge_summary.json. Optimiser state and observation statistics are the base's, as upstream
leaves the optimiser untouched on a merge. Exit status 3 when the gate admits fewer than two.
"""
import os

# Avoids a jaxlib 0.10 CPU scheduler deadlock (see BUILD.md); must precede importing jax.
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_enable_concurrency_optimized_scheduler=false")

import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from mbjax.population import merge as merge_lib  # noqa: E402
from mbjax.train import checkpoint as checkpoint_lib  # noqa: E402
from mbjax.train.run import restore_trained  # noqa: E402

_BASE = flags.DEFINE_string("base", None, "Workdir of the base the specialists started from.")
_SPECIALISTS = flags.DEFINE_list("specialists", None, "Workdirs of the specialists.")
_OUT = flags.DEFINE_string("out", None, "Output directory for the merged checkpoint.")
_METHOD = flags.DEFINE_enum("method", "ties", merge_lib.METHODS, "Merge method.")
_LAM = flags.DEFINE_float("lam", 1.0, "λ: scale of the merged task vector (task "
                          "arithmetic, TIES).")
_K = flags.DEFINE_float("k", 0.2, "TIES: fraction of entries kept by magnitude.")
_SCOPE = flags.DEFINE_enum("scope", "tensor", ["tensor", "global"],
                           "TIES: trim per tensor or over the whole task vector.")
_GATE = flags.DEFINE_bool("gate", True, "Merge only the specialists the gating rule admits.")
_MIN_COSINE = flags.DEFINE_float("min_cosine", 0.0, "Gate: least pairwise cosine.")
_MAX_CONFLICT = flags.DEFINE_float("max_sign_conflict", 1.0,
                                   "Gate: largest pairwise sign-conflict rate.")
_GATE_MODE = flags.DEFINE_enum("gate_mode", "greedy", ["greedy", "all"],
                               "Gate: largest compatible group, or all-or-nothing.")
flags.mark_flags_as_required(["base", "specialists", "out"])


def _write_json_atomic(path: str, payload: dict) -> None:
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
  with os.fdopen(fd, "w") as f:
    json.dump(payload, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def merge_workdirs(base: str, specialists: list[str], out: str, method: str, lam: float,
                   k: float, scope: str, rule: merge_lib.GatingRule | None) -> dict:
  """Does the work of the binary; returns the summary (also written to the output)."""
  _, base_runner = restore_trained(base)
  base_params = jax.device_get(base_runner.agent.params)
  vectors = []
  for workdir in specialists:
    _, runner = restore_trained(workdir)
    params = jax.device_get(runner.agent.params)
    if jax.tree.structure(params) != jax.tree.structure(base_params):
      raise ValueError(f"{workdir}: parameter tree differs from the base's")
    vectors.append(merge_lib.task_vector(params, base_params))

  stats = merge_lib.pair_statistics(vectors)
  admitted = (merge_lib.gate(stats, rule) if rule is not None
              else np.ones((len(vectors),), bool))
  names = [os.path.basename(os.path.normpath(w)) for w in specialists]
  for i in range(len(vectors)):
    for j in range(i + 1, len(vectors)):
      print(f"{names[i]} × {names[j]}: cosine {float(stats.cosine[i, j]):+.4f}, sign "
            f"conflict {float(stats.sign_conflict[i, j]):.4f} over "
            f"{int(stats.co_nonzero[i, j])} co-non-zero entries")
  summary = {
      "base": os.path.abspath(base), "method": method, "lam": lam, "k": k, "scope": scope,
      "specialists": [os.path.abspath(w) for w in specialists],
      "gate": None if rule is None else {"min_cosine": rule.min_cosine, "mode": rule.mode,
                                         "max_sign_conflict": rule.max_sign_conflict},
      "merged": [os.path.abspath(w) for w, a in zip(specialists, admitted) if a],
      "kept_apart": [os.path.abspath(w) for w, a in zip(specialists, admitted) if not a],
      "task_vector_norms": [float(np.linalg.norm(np.concatenate(
          [np.ravel(x) for x in jax.tree.leaves(v)]))) for v in vectors],
      "cosine": np.asarray(stats.cosine).tolist(),
      "sign_conflict": np.asarray(stats.sign_conflict).tolist(),
      "co_nonzero": np.asarray(stats.co_nonzero).tolist(),
  }
  if not admitted.any():
    summary["checkpoint"] = None
    return summary

  merged_vector = merge_lib.merge([v for v, a in zip(vectors, admitted) if a], method,
                                  lam=lam, k=k, scope=scope)
  merged_params = merge_lib.apply_task_vector(base_params, merged_vector)
  runner = base_runner.replace(agent=base_runner.agent.replace(params=merged_params))

  with open(os.path.join(base, "config.json")) as f:
    cfg = ml_collections.ConfigDict(json.load(f))
  out = os.path.abspath(out)
  os.makedirs(out, exist_ok=True)
  step = int(base_runner.update_step)
  checkpointer = checkpoint_lib.Checkpointer(out, cfg.run.keep_checkpoints)
  checkpointer.save(step, runner, cfg)
  checkpointer.close()
  _write_json_atomic(os.path.join(out, "config.json"), cfg.to_dict())
  summary["checkpoint"] = os.path.join(checkpointer.directory, str(step))
  _write_json_atomic(os.path.join(out, "merge_summary.json"), summary)
  return summary


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  rule = (merge_lib.GatingRule(_MIN_COSINE.value, _MAX_CONFLICT.value, _GATE_MODE.value)
          if _GATE.value else None)
  summary = merge_workdirs(_BASE.value, _SPECIALISTS.value, _OUT.value, _METHOD.value,
                           _LAM.value, _K.value, _SCOPE.value, rule)
  if summary["checkpoint"] is None:
    print("merge gated: fewer than two specialists pass the gating rule; nothing written")
    sys.exit(3)
  print(f"merged {len(summary['merged'])} ({_METHOD.value}) → {summary['checkpoint']}")
  if summary["kept_apart"]:
    print("kept apart:", ", ".join(summary["kept_apart"]))


if __name__ == "__main__":
  app.run(main)
