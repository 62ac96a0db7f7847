"""Merges specialists fine-tuned from one base checkpoint into one policy.

  python -m experiments.merge --base=runs/base --specialists=runs/scout,runs/tank \
      --method=ties --k=0.2 --lam=1.0 --out=runs/merged

TIES trims per tensor or globally (`--scope`) and settles its two tie rules by `--trim_rule`
and `--sign_tie` (`mbjax.population.merge` says which settings reproduce the TIES authors'
code and mergekit).

Reads the latest checkpoint of each workdir written by `experiments/train.py`, takes the
task vectors of the PPO parameters against the base, prints the cosine similarity and
sign-conflict rate of every pair, gates them (`--min_cosine`, `--max_sign_conflict`,
`--gate_mode`; `--nogate` merges everyone), merges the admitted ones with
`mbjax.population.merge` and writes, under --out, a checkpoint of the base's runner state
with the merged parameters (orbax writes it to a temporary directory and renames it), the
base's config.json — so `restore_trained(--out)` and the recorder can load it — and
merge_summary.json. Optimiser state and observation statistics are the base's, as upstream
leaves the optimiser untouched on a merge. Exit status 3 when the gate admits fewer than two.
The three are written into a staging directory beside --out and moved in when complete. An
--out that already holds anything is refused unless `--overwrite` (which replaces those three
and leaves other files alone); an --out that is one of the merged runs is always refused.

LLM-assisted weighting (`--llm_protocol=openai|ollama`, `--llm_base_url`, `--llm_model`,
`--llm_timeout_s`, `--llm_api_key_env`): the admitted specialists' per-role returns
(`--role_returns`, a JSON file `{"roles": [...], "returns": {name: [one per role]}, "base":
[one per role]}` keyed by workdir basename; optional), task-vector norms and pair statistics go
to the backend, which proposes each one's share of the merge
(`mbjax.population.llm_weighting`); the merge uses them (TIES through scaled task vectors). The
request runs on a background thread; the binary waits at most `--llm_wait_s` for it and
otherwise — or on any error, logged — merges with the deterministic fallback: shares from the
role returns when given, else uniform (= the unweighted merge). The shares, their source and
the rationale or fallback reason go into merge_summary.json.

  python -m mbjax.runtime.reference_llm_server &   # or a real Ollama / OpenAI-compatible one
  python -m experiments.merge ... --llm_protocol=ollama --llm_base_url=http://127.0.0.1:PORT
"""
import os

# Avoids a jaxlib 0.10 CPU scheduler deadlock (see BUILD.md); must precede importing jax.
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_enable_concurrency_optimized_scheduler=false")

import json  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from experiments import cli  # noqa: E402
from mbjax import files  # noqa: E402
from mbjax.population import llm_weighting  # noqa: E402
from mbjax.population import merge as merge_lib  # noqa: E402
from mbjax.runtime import llm  # noqa: E402
from mbjax.runtime.weighting import AsyncWeights  # noqa: E402
from mbjax.train import checkpoint as checkpoint_lib  # noqa: E402
from mbjax.train import metrics  # noqa: E402
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
_TRIM_RULE = flags.DEFINE_enum(
    "trim_rule", "ceil", merge_lib.TRIM_RULES, "TIES: entries the trim keeps (ceil: ⌈k·n⌉ and "
    "every threshold tie; floor_plus_one: the TIES authors'; floor_first: mergekit's).")
_SIGN_TIE = flags.DEFINE_enum(
    "sign_tie", "zero", merge_lib.SIGN_TIES, "TIES: sign of a coordinate whose vote sums to 0 "
    "(zero: merges to 0; majority: the TIES authors'; positive: mergekit's). The authors' "
    "code is --scope=global --trim_rule=floor_plus_one --sign_tie=majority.")
_GATE = flags.DEFINE_bool("gate", True, "Merge only the specialists the gating rule admits.")
_MIN_COSINE = flags.DEFINE_float("min_cosine", 0.0, "Gate: least pairwise cosine.")
_MAX_CONFLICT = flags.DEFINE_float("max_sign_conflict", 1.0,
                                   "Gate: largest pairwise sign-conflict rate.")
_GATE_MODE = flags.DEFINE_enum("gate_mode", "greedy", ["greedy", "all"],
                               "Gate: largest compatible group, or all-or-nothing.")
_LLM_PROTOCOL = flags.DEFINE_enum("llm_protocol", "", ["", *llm.PROTOCOLS],
                                  "LLM-weighted merge through this protocol; '' = unweighted.")
_LLM_BASE_URL = flags.DEFINE_string("llm_base_url", "http://127.0.0.1:11434",
                                    "LLM backend base URL (openai: usually ending in /v1).")
_LLM_MODEL = flags.DEFINE_string("llm_model", "qwen2.5", "LLM model name.")
_LLM_TIMEOUT = flags.DEFINE_float("llm_timeout_s", 30.0, "LLM socket timeout.")
_LLM_KEY_ENV = flags.DEFINE_string("llm_api_key_env", "",
                                   "Name of the env var holding the API key, if any.")
_LLM_WAIT = flags.DEFINE_float("llm_wait_s", 60.0, "Longest wait for the LLM's weights before "
                               "merging with the fallback.")
_ROLE_RETURNS = flags.DEFINE_string("role_returns", None, "JSON of evaluated per-role returns "
                                    "(see the module docstring), for the LLM and the fallback.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace the checkpoints, config.json and "
                               "merge_summary.json of an --out that already holds them.")
flags.mark_flags_as_required(["base", "specialists", "out"])

# What the merge writes under --out.
_OUTPUTS = ("checkpoints", "config.json", "merge_summary.json")


def llm_shares(names: list[str], stats: merge_lib.PairStatistics, norms: list[float],
               method: str, backend: llm.BackendConfig, wait_s: float,
               role_returns: str | None = None) -> tuple[np.ndarray, dict]:
  """Each named specialist's share of the merge and the summary entry (see the docstring)."""
  roles, returns, base_returns = (), None, None
  if role_returns is not None:
    with open(role_returns) as f:
      roles, returns, base_returns = llm_weighting.role_returns_from_json(json.load(f), names)
  request = llm_weighting.merge_request(names, role_names=roles, returns=returns,
                                        base_returns=base_returns, stats=stats, norms=norms,
                                        method=method)
  with llm.AsyncChat(llm.ChatClient(backend)) as chat:
    weights = AsyncWeights(request, chat)
    shares = weights.wait(wait_s)
  return shares, weights.summary()


def check_output(out: str, inputs: list[str], overwrite: bool) -> None:
  """Raises UsageError for an --out that is one of `inputs`, or that holds anything while
  `overwrite` is off."""
  real = os.path.realpath(out)
  if real in {os.path.realpath(w) for w in inputs}:
    raise app.UsageError(f"--out={out} is one of the merged runs (--base / --specialists): "
                         "choose a new directory")
  if os.path.exists(out) and not os.path.isdir(out):
    raise app.UsageError(f"--out={out} is a file: expected a directory")
  if not overwrite and os.path.isdir(out) and os.listdir(out):
    held = [n for n in _OUTPUTS if os.path.exists(os.path.join(out, n))]
    raise app.UsageError(
        f"--out={out} already holds " + (", ".join(held) if held else "files")
        + ": choose a new directory, or pass --overwrite to replace "
        + ", ".join(_OUTPUTS))


def _publish(staging: str, out: str) -> None:
  """Moves the merge's outputs from `staging` into `out`, replacing those present there."""
  if not os.path.isdir(out):
    os.replace(staging, out)
    return
  replaced = os.path.join(staging, ".replaced")
  os.makedirs(replaced)
  for name in _OUTPUTS:
    if os.path.exists(os.path.join(out, name)):
      os.replace(os.path.join(out, name), os.path.join(replaced, name))
    os.replace(os.path.join(staging, name), os.path.join(out, name))
  shutil.rmtree(staging)


def merge_workdirs(base: str, specialists: list[str], out: str, method: str, lam: float,
                   k: float, scope: str, rule: merge_lib.GatingRule | None,
                   backend: llm.BackendConfig | None = None, llm_wait_s: float = 60.0,
                   role_returns: str | None = None, trim_rule: str = "ceil",
                   sign_tie: str = "zero", overwrite: bool = False) -> dict:
  """Does the work of the binary; returns the summary (also written to the output). With a
  `backend`, the merge is LLM-weighted (see the module docstring)."""
  check_output(out, [base, *specialists], overwrite)
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
      "trim_rule": trim_rule, "sign_tie": sign_tie,
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

  chosen = [v for v, a in zip(vectors, admitted) if a]
  if backend is None:
    merged_vector = merge_lib.merge(chosen, method, lam=lam, k=k, scope=scope,
                                    trim_rule=trim_rule, sign_tie=sign_tie)
  else:
    shares, summary["llm_weighting"] = llm_shares(
        [n for n, a in zip(names, admitted) if a],
        jax.tree.map(lambda x: np.asarray(x)[np.ix_(admitted, admitted)], stats),
        [w for w, a in zip(summary["task_vector_norms"], admitted) if a], method, backend,
        llm_wait_s, role_returns)
    print(f"merge shares ({summary['llm_weighting']['source']}): " + ", ".join(
        f"{n} {w:.3f}" for n, w in zip(summary["llm_weighting"]["names"], shares)))
    merged_vector = llm_weighting.weighted_merge(chosen, method, shares, lam=lam, k=k,
                                                 scope=scope, trim_rule=trim_rule,
                                                 sign_tie=sign_tie)
  merged_params = merge_lib.apply_task_vector(base_params, merged_vector)
  runner = base_runner.replace(agent=base_runner.agent.replace(params=merged_params))

  cfg = checkpoint_lib.read_run_config(base)
  out = os.path.abspath(out)
  os.makedirs(os.path.dirname(out), exist_ok=True)
  staging = files.staging_directory(out)
  try:
    step = int(base_runner.update_step)
    checkpointer = checkpoint_lib.Checkpointer(staging, cfg.run.keep_checkpoints)
    checkpointer.save(step, runner, cfg)
    checkpointer.close()
    files.write_json(os.path.join(staging, "config.json"), cfg.to_dict())
    summary["checkpoint"] = os.path.join(out, "checkpoints", str(step))
    files.write_json(os.path.join(staging, "merge_summary.json"), summary)
    _publish(staging, out)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return summary


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  metrics.quiet_library_logging()
  rule = (merge_lib.GatingRule(_MIN_COSINE.value, _MAX_CONFLICT.value, _GATE_MODE.value)
          if _GATE.value else None)
  backend = (llm.BackendConfig(protocol=_LLM_PROTOCOL.value, base_url=_LLM_BASE_URL.value,
                               model=_LLM_MODEL.value, timeout_s=_LLM_TIMEOUT.value,
                               api_key_env=_LLM_KEY_ENV.value)
             if _LLM_PROTOCOL.value else None)
  summary = merge_workdirs(_BASE.value, _SPECIALISTS.value, _OUT.value, _METHOD.value,
                           _LAM.value, _K.value, _SCOPE.value, rule, backend, _LLM_WAIT.value,
                           _ROLE_RETURNS.value, _TRIM_RULE.value, _SIGN_TIE.value,
                           _OVERWRITE.value)
  if summary["checkpoint"] is None:
    print("merge gated: fewer than two specialists pass the gating rule; nothing written")
    sys.exit(3)
  print(f"merged {len(summary['merged'])} ({_METHOD.value}) → {summary['checkpoint']}")
  if summary["kept_apart"]:
    print("kept apart:", ", ".join(summary["kept_apart"]))


if __name__ == "__main__":
  cli.run(main)
