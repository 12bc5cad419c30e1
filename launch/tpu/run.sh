#!/usr/bin/env bash
# Start (or resume) training on every worker of a slice, in a tmux session, logging to the
# workers and to the bucket.
#
#   launch/tpu/run.sh --project=P --zone=us-central2-b --accelerator=v4-64 --name=crate \
#       --workdir=gs://B/runs/clipa_h14 --config=configs/clipa_h14.py [--recreate] [-- --config.x=y ...]
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF2'
Usage: launch/tpu/run.sh --project=P --zone=Z --name=NAME --workdir=gs://B/DIR --config=PATH[:ARG]
                         [--accelerator=TYPE --recreate [--spot] [--queued] (--repo=URL | --tarball=gs://...)]
                         [--restart] [--dry-run] [--config.KEY=VALUE ...] [-- TRAINER FLAGS...]

1. Checks that the slice NAME exists and is READY. When it is not (preempted, deleted, never
   created) and --recreate is given, deletes what is left, creates it again (create.sh, with
   --accelerator and --spot/--queued) and installs the project (setup.sh); otherwise it stops
   with the slice's state.
2. On every worker, in the tmux session SESSION (default crate), runs
       CRATE_DISTRIBUTED=1 python -m crate_jax.main --config=CONFIG --workdir=WORKDIR [flags]
   CRATE_DISTRIBUTED=1 makes every process call jax.distributed.initialize(), which finds the
   slice's hosts on the metadata server. Each worker logs to ~/crate_logs/SESSION.log, copied
   every minute to WORKDIR/logs/SESSION.worker<N>.log (logs.sh shows either). XLA's
   compilation cache lives in WORKDIR/xla_cache (CRATE_COMPILE_CACHE=DIR elsewhere, =none off),
   so a restarted run skips most of the compile.

Resuming is automatic: the trainer restores the latest complete checkpoint in WORKDIR (state,
optimizer and every process's data position) and continues exactly. After a preemption, run
the same command again (with --recreate for a Spot slice that was taken away). A run still
active in the session is refused; --restart stops it (SIGTERM: it saves a checkpoint) and
starts again.

EOF2
  usage_common
}

parse_args "$@"
require PROJECT ZONE NAME WORKDIR CONFIG
COMPILE_CACHE="${CRATE_COMPILE_CACHE:-$WORKDIR/xla_cache}"

state="$(tpu_state)"
if [[ "$state" != READY ]]; then
  ((RECREATE)) || die "slice $NAME is $state (not READY); run again with --recreate (and --accelerator, --repo or --tarball) to delete it, create it again and set it up; a preempted run then resumes from $WORKDIR"
  echo "# slice $NAME is $state: recreating it" >&2
  require ACCELERATOR
  if [[ "$state" != NOT_FOUND ]]; then
    YES=1 tpu_delete
  fi
  tpu_create
  tpu_setup
elif ((DRY_RUN && RECREATE)); then
  echo "# --recreate: were the slice not READY, these would run first:"
  ( exec 3>&1; YES=1 tpu_delete; tpu_create; tpu_setup ) | sed "s/^/#   /"
fi

# The script each worker runs inside tmux.
trainer=(env CRATE_DISTRIBUTED=1)
[[ "$COMPILE_CACHE" == none ]] || trainer+=("JAX_COMPILATION_CACHE_DIR=$COMPILE_CACHE")
trainer+=(python -m crate_jax.main "--config=$CONFIG" "--workdir=$WORKDIR" "${EXTRA_ARGS[@]}")
job="$(remote_preamble)
worker=\"\$(curl -sf -H 'Metadata-Flavor: Google' \\
  http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number \\
  || hostname)\"
log=\"\$CRATE_LOGS/\$CRATE_SESSION.log\"
bucket_log=$(printf '%q' "$WORKDIR")/logs/\"\$CRATE_SESSION.worker\$worker.log\"
sync_log() { gcloud storage cp \"\$log\" \"\$bucket_log\" >/dev/null 2>&1 || true; }
( while sleep 60; do sync_log; done ) &
syncer=\$!
cd \"\$CRATE_DIR\"
echo \"=== \$(date -u '+%F %T') worker \$worker: start: $(printf '%q ' "${trainer[@]}")\" >>\"\$log\"
PATH=\"\$CRATE_VENV/bin:\$PATH\" $(printf '%q ' "${trainer[@]}") >>\"\$log\" 2>&1 &
pid=\$!
echo \"\$pid\" >\"\$CRATE_LOGS/\$CRATE_SESSION.pid\"
rc=0
wait \"\$pid\" || rc=\$?
echo \"=== \$(date -u '+%F %T') worker \$worker: exit \$rc\" >>\"\$log\"
kill \"\$syncer\" 2>/dev/null || true
sync_log
exit \"\$rc\""

start="$(remote_preamble)
mkdir -p \"\$CRATE_LOGS\"
restart=$RESTART
if tmux has-session -t \"\$CRATE_SESSION\" 2>/dev/null; then
  if [ \"\$restart\" = 1 ]; then
    pid=\"\$(cat \"\$CRATE_LOGS/\$CRATE_SESSION.pid\" 2>/dev/null || true)\"
    [ -z \"\$pid\" ] || kill -TERM \"\$pid\" 2>/dev/null || true
    for _ in \$(seq 300); do
      if [ -z \"\$pid\" ] || ! kill -0 \"\$pid\" 2>/dev/null; then break; fi
      sleep 1
    done
    tmux kill-session -t \"\$CRATE_SESSION\" 2>/dev/null || true
  else
    echo \"\$(hostname): a run is active in tmux session \$CRATE_SESSION; stop.sh stops it, run.sh --restart restarts it\" >&2
    exit 3
  fi
fi
cat >\"\$CRATE_LOGS/\$CRATE_SESSION.sh\" <<'CRATE_JOB'
$job
CRATE_JOB
tmux new-session -d -s \"\$CRATE_SESSION\" bash \"\$CRATE_LOGS/\$CRATE_SESSION.sh\"
echo \"\$(hostname): started in tmux session \$CRATE_SESSION, log \$CRATE_LOGS/\$CRATE_SESSION.log\""

print_script "start, on every worker (writes ~/crate_logs/SESSION.sh and runs it in tmux)" "$start"
ssh_workers all "$start"
echo "# follow: launch/tpu/logs.sh --project=$PROJECT --zone=$ZONE --name=$NAME  (or --from-bucket --workdir=$WORKDIR)" >&2
