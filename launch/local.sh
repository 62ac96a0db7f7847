#!/usr/bin/env bash
# Runs one training job as N local processes (CPU, gloo collectives), D simulated devices each.
#   launch/local.sh N D --config=configs/cartpole_ppo.py --workdir=runs/cartpole_2x2
# Process 0 prints the output locations; all logs go to <workdir>/process_<i>.log.
set -euo pipefail
num_processes=$1 devices=$2
shift 2
workdir=""
for arg in "$@"; do [[ $arg == --workdir=* ]] && workdir=${arg#--workdir=}; done
[[ -n $workdir ]] || { echo "launch/local.sh: pass --workdir=DIR" >&2; exit 2; }
mkdir -p "$workdir"
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
python=${PYTHON:-.venv/bin/python}
pids=()
for ((i = 0; i < num_processes; i++)); do
  XLA_FLAGS="--xla_cpu_enable_concurrency_optimized_scheduler=false --xla_force_host_platform_device_count=$devices" \
    "$python" -m experiments.train "$@" --coordinator_address="127.0.0.1:$port" \
    --num_processes="$num_processes" --process_id="$i" > "$workdir/process_$i.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
grep -E '^ *(metrics|tensorboard|checkpoints|video):' "$workdir/process_0.log" || true
exit $status
