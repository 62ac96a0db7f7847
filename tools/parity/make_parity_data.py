"""Writes the reference outputs that `tests/test_parity.py` compares mbjax against.

The references need torch, which mbjax does not, so this runs in a venv of its own and its
outputs are committed as small .npz files (fixed float32 inputs, the reference's weights
and outputs, and `source`: the repository and commit they came from):

  python3 -m venv /tmp/parity-venv
  /tmp/parity-venv/bin/pip install torch==2.13.0 numpy einops
  git clone https://github.com/mlech26l/ncps /tmp/refs/ncps   # and state-spaces/mamba,
  # prateeky2806/ties-merging, arcee-ai/mergekit likewise
  /tmp/parity-venv/bin/python tools/parity/make_parity_data.py --ncps=/tmp/refs/ncps \
      --mamba=/tmp/refs/mamba --ties=/tmp/refs/ties-merging --mergekit=/tmp/refs/mergekit \
      --out=tests/parity_data

Each reference is read from its checkout: only the named functions and classes are taken
from a source file (parsed with `ast`, then executed with the names they use), so importing
a reference never pulls in its package's CUDA kernels, triton or transformers. References
left out are skipped.

- cfc.npz: `ncps.torch.CfCCell` in its three modes, stepped over a sequence with irregular Δt.
- mamba.npz: `selective_scan_ref` (outputs, final state and gradients) and two `Mamba`
  mixers (slow path, with `selective_scan_ref`) composed as upstream's `MixerModel`:
  x ← x + mixer(LayerNorm(x)) per layer, then a final LayerNorm, both with ε = 1e-5
  (its `norm_epsilon`).
- ties.npz: the TIES authors' `topk_values_mask`, `resolve_sign` and `disjoint_merge` on
  three task vectors flattened to one (their pipeline), with zero-sum coordinates.
- mergekit.npz: mergekit's `sparsify.magnitude` per tensor and `get_mask` (sum and count
  consensus), mixed as its `GeneralizedTaskArithmeticMerge.execute` does with unit weights,
  with threshold ties.
"""
from __future__ import annotations

import argparse
import ast
import enum
import math
import os
import subprocess
import tempfile
import typing

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812


def load_definitions(path: str, names: list[str], namespace: dict) -> list:
  """The top-level functions or classes `names` of the file at `path`, executed in
  `namespace` (which must hold every name they use)."""
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  nodes = [n for n in tree.body
           if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name in names]
  missing = sorted(set(names) - {n.name for n in nodes})
  if missing:
    raise SystemExit(f"{path}: no top-level definition of {missing}")
  exec(compile(ast.Module(body=nodes, type_ignores=[]), path, "exec"), namespace)  # noqa: S102
  return [namespace[name] for name in names]


def source_label(root: str, repository: str) -> str:
  try:
    commit = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], check=True,
                            capture_output=True, text=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    commit = "unknown commit"
  return f"{repository} {commit}"


def to_numpy(arrays: dict) -> dict:
  out = {}
  for key, value in arrays.items():
    if isinstance(value, torch.Tensor):
      value = value.detach().numpy()
    out[key] = value.astype(np.float32) if isinstance(value, np.ndarray) else np.asarray(value)
  return out


def save(out_dir: str, name: str, arrays: dict) -> None:
  """Writes `name`.npz atomically (a temporary file, then a rename)."""
  os.makedirs(out_dir, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".tmp-", suffix=".npz")
  with os.fdopen(fd, "wb") as f:
    np.savez_compressed(f, **to_numpy(arrays))
  os.chmod(tmp, 0o644)
  os.replace(tmp, os.path.join(out_dir, name + ".npz"))
  print(f"wrote {os.path.join(out_dir, name + '.npz')}")


def cfc_data(root: str) -> dict:
  namespace = {"torch": torch, "nn": torch.nn, "F": F, "np": np,
               "Optional": typing.Optional, "Union": typing.Union}
  _, cfc_cell = load_definitions(os.path.join(root, "ncps/torch/cfc_cell.py"),
                                 ["LeCun", "CfCCell"], namespace)
  torch.manual_seed(0)
  steps, batch, inputs, hidden, units = 6, 3, 3, 4, 5
  x = torch.randn(steps, batch, inputs)
  dt = 0.05 + 3.0 * torch.rand(steps, batch)
  h0 = torch.randn(batch, hidden)
  arrays = {"source": source_label(root, "mlech26l/ncps"), "x": x, "dt": dt, "h0": h0}
  for mode in ("default", "no_gate", "pure"):
    cell = cfc_cell(inputs, hidden, mode=mode, backbone_units=units)
    with torch.no_grad():
      for parameter in cell.parameters():  # moves pure's w_tau = 0, A = 1 off their init too
        parameter.add_(0.3 * torch.randn_like(parameter))
      h, outputs = h0, []
      for t in range(steps):
        output, h = cell(x[t], h, dt[t][:, None])  # ts [batch, 1]: one Δt per sample
        outputs.append(output)
    arrays[f"{mode}.out"] = torch.stack(outputs)
    arrays.update({f"{mode}.{name}": p for name, p in cell.named_parameters()})
  return arrays


def mamba_data(root: str) -> dict:
  import einops  # noqa: PLC0415 (the mamba sources need it; nothing else here does)

  namespace = {"torch": torch, "F": F, "rearrange": einops.rearrange,
               "repeat": einops.repeat}
  selective_scan_ref, = load_definitions(
      os.path.join(root, "mamba_ssm/ops/selective_scan_interface.py"), ["selective_scan_ref"],
      namespace)
  namespace.update(
      math=math, nn=torch.nn, Tensor=torch.Tensor, Optional=typing.Optional,
      selective_scan_fn=selective_scan_ref, mamba_inner_fn=None, causal_conv1d_fn=None,
      causal_conv1d_update=None, selective_state_update=None, RMSNorm=None,
      layer_norm_fn=None, rms_norm_fn=None)
  mamba, = load_definitions(os.path.join(root, "mamba_ssm/modules/mamba_simple.py"),
                            ["Mamba"], namespace)
  arrays = {"source": source_label(root, "state-spaces/mamba")}

  torch.manual_seed(0)
  batch, dim, state, length = 2, 4, 3, 7
  scan_inputs = {
      "u": torch.randn(batch, dim, length),
      "delta": 0.05 + 0.6 * torch.rand(batch, dim, length),
      "A": -torch.exp(0.5 * torch.randn(dim, state)),
      "B": torch.randn(batch, state, length),
      "C": torch.randn(batch, state, length),
  }
  for tensor in scan_inputs.values():
    tensor.requires_grad_(True)
  out, last = selective_scan_ref(*scan_inputs.values(), return_last_state=True)
  out_cotangent, last_cotangent = torch.randn_like(out), torch.randn_like(last)
  ((out * out_cotangent).sum() + (last * last_cotangent).sum()).backward()
  arrays.update({f"scan.{k}": v for k, v in scan_inputs.items()})
  arrays.update({f"scan.grad_{k}": v.grad for k, v in scan_inputs.items()})
  arrays.update({"scan.out": out, "scan.last_state": last, "scan.out_cotangent": out_cotangent,
                 "scan.last_cotangent": last_cotangent})

  torch.manual_seed(1)
  d_model, layers = 8, 2
  norms = [torch.nn.LayerNorm(d_model, eps=1e-5) for _ in range(layers + 1)]
  mixers = [mamba(d_model, d_state=4, d_conv=4, expand=2, use_fast_path=False)
            for _ in range(layers)]
  with torch.no_grad():
    for module in [*norms, *mixers]:  # off their constant inits (LayerNorm 1/0, D = 1)
      for name, parameter in module.named_parameters():
        if name in ("weight", "bias", "D", "conv1d.bias"):
          parameter.add_(0.2 * torch.randn_like(parameter))
    # A small spread across features, so the LayerNorm's ε visibly matters.
    x = 0.02 + 0.05 * torch.randn(batch, 9, d_model)
    arrays["stack.u"] = x
    for norm, mixer in zip(norms, mixers):
      x = x + mixer(norm(x))
    arrays["stack.out"] = norms[-1](x)
  for i, (norm, mixer) in enumerate(zip(norms, mixers)):
    arrays.update({f"stack.norm{i}.{k}": v for k, v in norm.named_parameters()})
    arrays.update({f"stack.mixer{i}.{k}": v for k, v in mixer.named_parameters()})
  arrays.update({f"stack.norm_f.{k}": v for k, v in norms[-1].named_parameters()})
  return arrays


def _task_vectors(seed: int) -> list[dict]:
  """Three task vectors of two tensors, a [4, 5] and b [10], float32."""
  rng = np.random.default_rng(seed)
  return [{"a": rng.normal(0.0, 0.3, (4, 5)).astype(np.float32),
           "b": rng.normal(0.0, 0.3, (10,)).astype(np.float32)} for _ in range(3)]


def ties_data(root: str) -> dict:
  topk_values_mask, _, resolve_sign, disjoint_merge = load_definitions(
      os.path.join(root, "src/utils/merge_utils.py"),
      ["topk_values_mask", "resolve_zero_signs", "resolve_sign", "disjoint_merge"],
      {"torch": torch})
  vectors = _task_vectors(1)  # a seed whose elected signs sum to −5 (asserted below)
  # Zero-sum coordinates: ±2 in two vectors survive any trim; the third's 0.01 does not.
  for index in ((0, 1), (2, 3)):
    vectors[0]["a"][index], vectors[1]["a"][index], vectors[2]["a"][index] = 2.0, -2.0, 0.01
  # Negative coordinates that all three keep, so the elected signs' majority is −.
  vectors[0]["b"][:3] = vectors[1]["b"][:3] = vectors[2]["b"][:3] = -1.5
  # Their flattening: state-dict keys sorted ("a" before "b"), each tensor row-major.
  flat = torch.from_numpy(np.stack([np.concatenate([v["a"].ravel(), v["b"]]) for v in vectors]))
  k = 0.2  # k·n = 0.2 · 30 = 6, whole: they keep int(6) + 1 = 7 of each vector
  trimmed, _ = topk_values_mask(flat.clone(), K=k)
  signs = resolve_sign(trimmed, "mass")
  elected = torch.sign(trimmed.sum(0))
  assert (elected == 0).any() and torch.sign(elected.sum()) < 0, "no zero-sum case to test"
  merged = disjoint_merge(trimmed, "dis-mean", signs)
  arrays = {"source": source_label(root, "prateeky2806/ties-merging"), "k": k,
            "merged_flat": merged}
  for i, v in enumerate(vectors):
    arrays.update({f"vector{i}.a": v["a"], f"vector{i}.b": v["b"]})
  return arrays


def mergekit_data(root: str) -> dict:
  _, _, magnitude = load_definitions(
      os.path.join(root, "mergekit/sparsify.py"),
      ["RescaleNorm", "rescaled_masked_tensor", "magnitude"],
      {"torch": torch, "Enum": enum.Enum, "Optional": typing.Optional})
  get_mask, = load_definitions(
      os.path.join(root, "mergekit/merge_methods/generalized_task_arithmetic.py"),
      ["get_mask"], {"torch": torch, "Optional": typing.Optional, "Literal": typing.Literal})
  vectors = _task_vectors(2)
  # Threshold ties: four equal magnitudes where b keeps ⌊0.25 · 10⌋ = 2.
  vectors[0]["b"][[1, 4, 6, 8]] = [1.5, -1.5, 1.5, 1.5]
  magnitudes = torch.from_numpy(np.abs(vectors[0]["b"]))
  # mergekit breaks ties by torch.argsort's order, not promised stable; this torch's is.
  assert torch.equal(torch.argsort(magnitudes, descending=True),
                     torch.from_numpy(np.argsort(-magnitudes.numpy(), kind="stable"))), (
      "torch's descending argsort does not keep index order among ties here")
  k = 0.25  # a: 0.25 · 20 = 5 (whole); b: 0.25 · 10 = 2.5
  arrays = {"source": source_label(root, "arcee-ai/mergekit"), "k": k}
  for name in ("a", "b"):
    deltas = torch.stack([magnitude(torch.from_numpy(v[name]), density=k) for v in vectors])
    for consensus in ("sum", "count"):
      mask = get_mask(deltas, method=consensus)
      # execute() with unit weights, normalize=True and λ = 1.
      divisor = mask.to(deltas.dtype).sum(0)
      divisor[divisor == 0] = 1
      arrays[f"merged_{consensus}.{name}"] = (deltas * mask).sum(0) / divisor
  for i, v in enumerate(vectors):
    arrays.update({f"vector{i}.a": v["a"], f"vector{i}.b": v["b"]})
  return arrays


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--ncps", help="checkout of github.com/mlech26l/ncps")
  parser.add_argument("--mamba", help="checkout of github.com/state-spaces/mamba")
  parser.add_argument("--ties", help="checkout of github.com/prateeky2806/ties-merging")
  parser.add_argument("--mergekit", help="checkout of github.com/arcee-ai/mergekit")
  parser.add_argument("--out", default="tests/parity_data", help="output directory")
  args = parser.parse_args()
  makers = {"cfc": (args.ncps, cfc_data), "mamba": (args.mamba, mamba_data),
            "ties": (args.ties, ties_data), "mergekit": (args.mergekit, mergekit_data)}
  if not any(root for root, _ in makers.values()):
    parser.error("name at least one reference checkout")
  torch.set_num_threads(1)
  for name, (root, make) in makers.items():
    if root:
      save(args.out, name, make(root))


if __name__ == "__main__":
  main()
