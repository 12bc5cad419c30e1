#!/usr/bin/env bash
# Stop a run cleanly: SIGTERM to the trainer on every worker. The processes agree on a step
# (jax's preemption sync point), save a checkpoint there and exit; run.sh resumes from it.
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF2'
Usage: launch/tpu/stop.sh --project=P --zone=Z --name=NAME [--force] [--dry-run]

Sends SIGTERM to the trainer of session SESSION on every worker and waits (up to 10 minutes)
for it to save and exit. --force kills it at once instead (SIGKILL; the run later resumes from
its last periodic checkpoint) and removes the tmux session.

EOF2
  usage_common
}

parse_args "$@"
require PROJECT ZONE NAME
signal=TERM
((FORCE)) && signal=KILL
ssh_workers all "$(remote_preamble)
signal=$signal
pid=\"\$(cat \"\$CRATE_LOGS/\$CRATE_SESSION.pid\" 2>/dev/null || true)\"
if [ -z \"\$pid\" ] || ! kill -0 \"\$pid\" 2>/dev/null; then
  echo \"\$(hostname): no run in session \$CRATE_SESSION\"
  exit 0
fi
kill -s \"\$signal\" \"\$pid\"
for _ in \$(seq 600); do kill -0 \"\$pid\" 2>/dev/null || break; sleep 1; done
if kill -0 \"\$pid\" 2>/dev/null; then
  echo \"\$(hostname): still running after 10 minutes; stop.sh --force kills it\" >&2
  exit 1
fi
[ \"\$signal\" = TERM ] || tmux kill-session -t \"\$CRATE_SESSION\" 2>/dev/null || true
echo \"\$(hostname): stopped; tail: \$(tail -n 2 \"\$CRATE_LOGS/\$CRATE_SESSION.log\" | tr '\\n' ' ')\""
