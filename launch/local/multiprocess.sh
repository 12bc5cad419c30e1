#!/usr/bin/env bash
# Run the trainer as N cooperating JAX processes on this one machine, each with its own fake
# CPU devices, joined by jax.distributed over localhost. This is the real multi-host code path
# (process-local batches, global arrays, per-process data shards, every process writing its
# checkpoint shards) without a cluster.
#
#   launch/local/multiprocess.sh --processes=2 --devices=4 -- \
#       --config=configs/demo_classification.py:smoke --workdir=runs/mp_demo
#
# Everything after `--` (or any argument this script does not know) goes to
# `python -m crate_jax.main`. Every process gets the same arguments, plus
#   JAX_PLATFORMS=cpu
#   XLA_FLAGS="<your XLA_FLAGS> --xla_force_host_platform_device_count=K"
#   JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT JAX_NUM_PROCESSES=N JAX_PROCESS_ID=i
# (crate_jax.parallel.maybe_initialize_distributed reads the last three).
#
# Waits for every process; exits 0 only when all of them exit 0. When one fails, the others
# are stopped (they would otherwise wait for it at the next collective). Ctrl-C or SIGTERM to
# this script sends SIGTERM to every process: they agree on a step, save a checkpoint there and
# exit; the same command then resumes.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/local/multiprocess.sh [options] [--] [crate_jax.main arguments...]

Options (environment variable in brackets):
  --processes=N     number of processes                               [CRATE_PROCESSES, 2]
  --devices=K       fake CPU devices per process                      [CRATE_DEVICES_PER_PROCESS, 4]
  --port=P          coordinator port on 127.0.0.1 (default: a free one) [CRATE_PORT]
  --logdir=DIR      per-process logs DIR/process_<i>.log (appended to: a resumed run adds on)
                    (default: WORKDIR/logs for a local --workdir, else runs/multiprocess_logs)
                                                                      [CRATE_LOGDIR]
  --timeout=S       stop every process after S seconds, exit 124 (0: none) [CRATE_TIMEOUT, 0]
  --module=M        python module to run                              [CRATE_MODULE, crate_jax.main]
  --python=PY       python interpreter                                [PYTHON, python3]
  --no-follow       do not copy process 0's output to this terminal
  --dry-run         print the commands instead of running them
  -h, --help        this text

Example (a 2 x 4 = 8-device run of the CPU demo, then the same command resumes it):
  launch/local/multiprocess.sh --processes=2 --devices=4 -- \
      --config=configs/demo_classification.py:smoke --workdir=runs/mp_demo
EOF
}

processes="${CRATE_PROCESSES:-2}"
devices="${CRATE_DEVICES_PER_PROCESS:-4}"
port="${CRATE_PORT:-}"
logdir="${CRATE_LOGDIR:-}"
timeout_s="${CRATE_TIMEOUT:-0}"
module="${CRATE_MODULE:-crate_jax.main}"
python="${PYTHON:-python3}"
follow=1
dry_run=0
args=()

while (($#)); do
  case "$1" in
    --processes=*) processes="${1#*=}" ;;
    --devices=*) devices="${1#*=}" ;;
    --port=*) port="${1#*=}" ;;
    --logdir=*) logdir="${1#*=}" ;;
    --timeout=*) timeout_s="${1#*=}" ;;
    --module=*) module="${1#*=}" ;;
    --python=*) python="${1#*=}" ;;
    --no-follow) follow=0 ;;
    --dry-run) dry_run=1 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; args+=("$@"); break ;;
    *) args+=("$1") ;;
  esac
  shift
done

die() { echo "multiprocess.sh: $*" >&2; exit 2; }
is_uint() { [[ "$1" =~ ^[0-9]+$ ]]; }
is_positive() { [[ "$1" =~ ^[1-9][0-9]*$ ]]; }
is_positive "$processes" || die "--processes (CRATE_PROCESSES) must be a positive integer, got '$processes'"
is_positive "$devices" || die "--devices (CRATE_DEVICES_PER_PROCESS) must be a positive integer, got '$devices'"
is_uint "$timeout_s" || die "--timeout (CRATE_TIMEOUT) must be a whole number of seconds, got '$timeout_s'"
[[ -z "$port" ]] || is_uint "$port" || die "--port (CRATE_PORT) must be a port number, got '$port'"

if [[ -z "$port" ]]; then
  port="$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')" \
    || die "could not find a free port with $python; pass --port="
fi

if [[ -z "$logdir" ]]; then
  workdir=""
  for a in "${args[@]}"; do
    [[ "$a" == --workdir=* ]] && workdir="${a#--workdir=}"
  done
  if [[ -n "$workdir" && "$workdir" != *://* ]]; then
    logdir="$workdir/logs"
  else
    logdir="runs/multiprocess_logs"
  fi
fi

# The caller's XLA flags, minus any device count of theirs (ours must win).
xla_flags="$(printf '%s' "${XLA_FLAGS:-}" | sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g')"
xla_flags="${xla_flags} --xla_force_host_platform_device_count=${devices}"
xla_flags="${xla_flags#"${xla_flags%%[![:space:]]*}"}"

if ((dry_run)); then
  for ((i = 0; i < processes; i++)); do
    printf '+ JAX_PLATFORMS=cpu XLA_FLAGS=%q JAX_COORDINATOR_ADDRESS=127.0.0.1:%s JAX_NUM_PROCESSES=%s JAX_PROCESS_ID=%s %q -m %q' \
      "$xla_flags" "$port" "$processes" "$i" "$python" "$module"
    printf ' %q' "${args[@]}"
    printf ' > %q 2>&1 &\n' "$logdir/process_$i.log"
  done
  exit 0
fi

mkdir -p "$logdir"
pids=()
stop_all() {  # stop_all SIGNAL: signal every process still running
  local pid
  for pid in "${pids[@]}"; do
    kill -s "$1" "$pid" 2>/dev/null || true
  done
}
# shellcheck disable=SC2317,SC2329  # called from the traps below
forward() {  # a signal for us: SIGTERM to every process, then keep waiting while they save
  echo "multiprocess.sh: $1 received, sending SIGTERM to ${#pids[@]} processes" >&2
  stop_all TERM
}
trap 'forward TERM' TERM
trap 'forward INT' INT
trap 'stop_all KILL' EXIT
# Background jobs of a script ignore SIGINT (no job control), so Ctrl-C reaches only this
# script, which turns it into the SIGTERM the trainer saves on.

for ((i = 0; i < processes; i++)); do
  log="$logdir/process_$i.log"
  echo "=== multiprocess.sh: process $i of $processes, $(date -u '+%Y-%m-%dT%H:%M:%SZ') ===" >>"$log"
  if ((i == 0 && follow)); then
    JAX_PLATFORMS=cpu XLA_FLAGS="$xla_flags" JAX_COORDINATOR_ADDRESS="127.0.0.1:$port" \
      JAX_NUM_PROCESSES="$processes" JAX_PROCESS_ID="$i" \
      "$python" -m "$module" "${args[@]}" > >(tee -a "$log") 2>&1 &
  else
    JAX_PLATFORMS=cpu XLA_FLAGS="$xla_flags" JAX_COORDINATOR_ADDRESS="127.0.0.1:$port" \
      JAX_NUM_PROCESSES="$processes" JAX_PROCESS_ID="$i" \
      "$python" -m "$module" "${args[@]}" >>"$log" 2>&1 &
  fi
  pids+=("$!")
done
echo "multiprocess.sh: $processes processes x $devices CPU devices, coordinator 127.0.0.1:$port," \
  "logs in $logdir/process_<i>.log, pids ${pids[*]}" >&2

declare -A status=()
failed=""
killer=""
start=$SECONDS
while ((${#status[@]} < processes)); do
  for ((i = 0; i < processes; i++)); do
    [[ -n "${status[$i]:-}" ]] && continue
    if ! kill -0 "${pids[$i]}" 2>/dev/null; then
      rc=0
      wait "${pids[$i]}" || rc=$?
      status[$i]=$rc
      if ((rc != 0)) && [[ -z "$failed" ]]; then
        failed=$i
        echo "multiprocess.sh: process $i exited with $rc; stopping the others" >&2
        stop_all TERM
        ( sleep 10; stop_all KILL ) &
        killer=$!
      fi
    fi
  done
  if ((timeout_s > 0 && SECONDS - start > timeout_s)) && [[ -z "$failed" ]]; then
    failed=timeout
    echo "multiprocess.sh: timeout after ${timeout_s}s; stopping every process" >&2
    stop_all TERM
    ( sleep 10; stop_all KILL ) &
    killer=$!
  fi
  ((${#status[@]} < processes)) && { sleep 0.2 || true; }  # Ctrl-C also hits sleep
done
trap - EXIT
[[ -z "$killer" ]] || kill "$killer" 2>/dev/null || true

rc=0
for ((i = 0; i < processes; i++)); do
  echo "multiprocess.sh: process $i exit ${status[$i]} (log $logdir/process_$i.log)" >&2
  ((status[$i] == 0)) || rc=1
done
if [[ "$failed" == timeout ]]; then
  exit 124
elif [[ -n "$failed" ]]; then
  echo "multiprocess.sh: last lines of process $failed:" >&2
  tail -n 30 "$logdir/process_$failed.log" >&2
fi
exit "$rc"
