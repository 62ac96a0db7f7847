#!/usr/bin/env bash
# Installs the accelerator build and prints the check table (experiments/accelerator_check.py).
#   launch/accelerator_check.sh cuda12|tpu [--quick] [flags of experiments/accelerator_check.py]
#   launch/accelerator_check.sh cpu --quick      # no install: the existing CPU .venv
#   launch/accelerator_check.sh preinstalled [flags]
#       a host without internet whose python (PYTHON=..., default python3) already holds an
#       accelerator build of JAX, flax and optax (a cluster image): the packages it lacks are
#       installed from the wheels in WHEELS=dir into SITE (default /tmp/mbjax-site), which
#       goes first on PYTHONPATH; the host's own packages are left as they are.
#   launch/accelerator_check.sh wheels DIR PYTHON_VERSION PACKAGE...
#       on a connected machine: downloads the pinned (constraints.txt) wheels of PACKAGE...
#       for that host's Python (e.g. 3.12, manylinux x86-64) into DIR, dependencies not
#       included: name each package the host lacks.
# Accelerator builds go to their own venv (.venv-cuda12, .venv-tpu; VENV=... to choose) from
# the pinned set: constraints.txt pins jax 0.10.2, whose cuda12/tpu extras pin the plugin
# (jax-cuda12-plugin 0.10.2) and libtpu (0.0.42.*).
set -euo pipefail
cd "$(dirname "$0")/.."
kind=${1:?usage: launch/accelerator_check.sh cuda12|tpu|cpu|preinstalled [flags] | wheels DIR PYTHON_VERSION PACKAGE...}
shift
python=${PYTHON:-python3}
case $kind in
  cuda12|tpu)
    venv=${VENV:-.venv-$kind}
    [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip
    "$venv/bin/python" -m pip install -q -c constraints.txt -e ".[envs,$kind]"
    python=$venv/bin/python
    ;;
  cpu) python=${VENV:-.venv}/bin/python ;;
  preinstalled)
    if [ -n "${WHEELS:-}" ]; then
      site=${SITE:-/tmp/mbjax-site}
      "$python" -m pip install -q --no-index --no-deps --no-cache-dir --upgrade \
        --target "$site" "$WHEELS"/*.whl
      export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    fi
    ;;
  wheels)
    dir=${1:?wheels: a target folder}
    version=${2:?wheels: the host Python version, e.g. 3.12}
    shift 2
    [ $# -gt 0 ] || { echo "wheels: name the packages the host lacks" >&2; exit 2; }
    platforms=()
    for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 \
             manylinux_2_17_x86_64 manylinux2014_x86_64; do
      platforms+=(--platform "$p")
    done
    exec "$python" -m pip download -q --no-deps --only-binary=:all: -c constraints.txt \
      --python-version "$version" --implementation cp "${platforms[@]}" -d "$dir" "$@"
    ;;
  *) echo "launch/accelerator_check.sh: unknown kind '$kind' (cuda12, tpu, cpu, preinstalled or wheels)" >&2
     exit 2 ;;
esac
"$python" -m experiments.accelerator_check "$@"
