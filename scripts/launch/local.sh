#!/usr/bin/env bash
# N processes of one command on this machine, joined through jax.distributed on 127.0.0.1: multi-host
# training tried on a laptop, exactly as the multi-process tests run it.
#
#   scripts/launch/local.sh N [--logs DIR] -- llm-jax train --config configs/tiny_shakespeare.py --workdir runs/x ...
#
# Each process gets JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT (a free port, or $PORT), JAX_NUM_PROCESSES=N and
# JAX_PROCESS_ID=I, which llm_jax/distributed.py reads (the same as mesh.coordinator_address=...
# mesh.num_processes=N mesh.process_id=I). Process I logs to DIR/process_I.log (default
# logs/local_<time>/); process 0's log is also shown here. Ctrl-C or SIGTERM reaches every process,
# which stop after the same step with one checkpoint. When a process fails, the others are stopped
# too (SIGTERM, then SIGKILL after $GRACE seconds, default 30): they would wait for it forever.
# The exit code is the worst of the processes' codes.
set -uo pipefail

usage() { echo "usage: $0 N [--logs DIR] -- COMMAND [ARGS...]" >&2; exit 2; }
[ $# -ge 1 ] && [[ "$1" =~ ^[1-9][0-9]*$ ]] || usage
num=$1; shift
logs="logs/local_$(date +%Y%m%d_%H%M%S)"
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
  case "$1" in
    --logs) [ $# -ge 2 ] || usage; logs=$2; shift 2 ;;
    *) usage ;;
  esac
done
[ "${1:-}" = "--" ] && [ $# -ge 2 ] || usage
shift

free_port() {  # a port nobody listens on now; the coordinator (process 0) binds it moments later
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' 2>/dev/null ||
    echo $((20000 + RANDOM % 20000))
}
port=${PORT:-$(free_port)}
mkdir -p "$logs"
echo "local.sh: $num processes, coordinator 127.0.0.1:$port, logs in $logs/process_*.log" >&2

pids=()
for ((i = 0; i < num; i++)); do
  JAX_COORDINATOR_ADDRESS="127.0.0.1:$port" JAX_NUM_PROCESSES=$num JAX_PROCESS_ID=$i "$@" >"$logs/process_$i.log" 2>&1 &
  pids+=($!)
done
tail -n +1 -f --pid="${pids[0]}" "$logs/process_0.log" &
tailer=$!

signal_all() { for pid in "${pids[@]}"; do kill "-$1" "$pid" 2>/dev/null; done; }
trap 'signal_all TERM' INT TERM  # the trainers save one checkpoint together and exit 0

worst=0
failed_at=""
running=$num
declare -A done_
while [ "$running" -gt 0 ]; do
  for i in "${!pids[@]}"; do
    [ -n "${done_[$i]:-}" ] && continue
    kill -0 "${pids[$i]}" 2>/dev/null && continue
    wait "${pids[$i]}"; code=$?
    done_[$i]=1; running=$((running - 1))
    [ "$code" -gt "$worst" ] && worst=$code
    if [ "$code" -ne 0 ]; then
      echo "local.sh: process $i exited with $code (log: $logs/process_$i.log)" >&2
      if [ -z "$failed_at" ] && [ "$running" -gt 0 ]; then
        failed_at=$SECONDS
        signal_all TERM
      fi
    fi
  done
  if [ -n "$failed_at" ] && [ $((SECONDS - failed_at)) -ge "${GRACE:-30}" ]; then
    signal_all KILL
  fi
  sleep 0.2
done
wait "$tailer" 2>/dev/null
exit "$worst"
