#!/usr/bin/env bash
# Start N local processes of one multi-process JAX run (docs/scaling.md, "Several processes").
#
#   scripts/launch_local.sh N -- command [args...]
#
# Each process runs `command args...` with JAXLIN_COORDINATOR=127.0.0.1:PORT (a free port),
# JAXLIN_NUM_PROCESSES=N and JAXLIN_PROCESS_ID=I in its environment, which jaxlin.distributed.initialize()
# reads. Every output line (stdout and stderr) is prefixed with [pI]. When one process fails, the others are
# stopped (SIGTERM, then SIGKILL after 10 s) and the launcher exits with that process's status; it exits 0 when
# every process succeeded. Descendants of a process are stopped with it. All processes stay in the launcher's
# process group, so killing that group (or Ctrl-C) stops them all. PYTHON names the interpreter used to find a free port (default: python3).
set -uo pipefail

if [[ $# -lt 3 || ! $1 =~ ^[1-9][0-9]*$ || $2 != "--" ]]; then
  echo "usage: $0 N -- command [args...]   (N ≥ 1 processes, e.g. $0 2 -- python my_script.py)" >&2
  exit 2
fi
n=$1
shift 2
port=$("${PYTHON:-python3}" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])') || {
  echo "[launch] cannot find a free port (is ${PYTHON:-python3} on PATH? set PYTHON=)" >&2
  exit 2
}

declare -A alive=()  # pid -> process id

tree() {  # a pid and all its descendants
  local child
  echo "$1"
  for child in $(ps -o pid= --ppid "$1" 2>/dev/null); do tree "$child"; done
}

stop_all() {
  ((${#alive[@]})) || return 0
  local pids=() pid
  for pid in "${!alive[@]}"; do mapfile -t -O "${#pids[@]}" pids < <(tree "$pid"); done
  kill -s TERM "${pids[@]}" 2>/dev/null
  for _ in $(seq 50); do
    local running=0
    for pid in "${pids[@]}"; do
      if kill -0 "$pid" 2>/dev/null && [[ $(ps -o stat= -p "$pid" 2>/dev/null) != Z* ]]; then running=1; fi
    done
    ((running)) || break
    sleep 0.2
  done
  kill -s KILL "${pids[@]}" 2>/dev/null
  wait "${!alive[@]}" 2>/dev/null
  alive=()
}
trap stop_all EXIT
trap 'stop_all; exit 130' INT
trap 'stop_all; exit 143' TERM

for ((i = 0; i < n; i++)); do
  JAXLIN_COORDINATOR="127.0.0.1:$port" JAXLIN_NUM_PROCESSES="$n" JAXLIN_PROCESS_ID="$i" \
    "$@" > >(sed -u "s/^/[p$i] /") 2>&1 &
  alive[$!]=$i
done

status=0
while ((${#alive[@]})); do
  finished=""
  wait -n -p finished "${!alive[@]}"
  rc=$?
  [[ -n $finished ]] || break
  i=${alive[$finished]}
  unset "alive[$finished]"
  if ((rc != 0)); then
    echo "[launch] process $i exited with status $rc; stopping the other ${#alive[@]}" >&2
    status=$rc
    stop_all
  fi
done
wait  # let the output prefixers flush
exit "$status"
