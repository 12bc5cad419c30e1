#!/usr/bin/env bash
# Show a run's log: from a worker (tail -F over ssh), or from the copies in the bucket (also
# after the slice is gone).
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF2'
Usage: launch/tpu/logs.sh --project=P --zone=Z --name=NAME [--worker=N|all] [--lines=100] [--no-follow]
       launch/tpu/logs.sh --from-bucket --workdir=gs://B/DIR [--worker=N|all] [--lines=100]

Default: worker 0's ~/crate_logs/SESSION.log, followed (Ctrl-C stops following; the run goes
on). --worker=all prints every worker's (interleaved). --from-bucket reads the copies run.sh
uploads every minute to WORKDIR/logs/SESSION.worker<N>.log.

EOF2
  usage_common
}

FROM_BUCKET=0
args=()
for a in "$@"; do
  if [[ "$a" == --from-bucket ]]; then FROM_BUCKET=1; else args+=("$a"); fi
done
[[ -n "${CRATE_WORKER:-}" ]] || WORKER=0
parse_args "${args[@]}"

if ((FROM_BUCKET)); then
  require WORKDIR
  if [[ "$WORKER" == all ]]; then
    run gcloud storage ls "$WORKDIR/logs/"
    pattern="$WORKDIR/logs/$SESSION.worker*.log"
  else
    pattern="$WORKDIR/logs/$SESSION.worker$WORKER.log"
  fi
  show gcloud storage cat "$pattern" \| tail -n "$LINES"
  ((DRY_RUN)) || gcloud storage cat "$pattern" | tail -n "$LINES"
  exit 0
fi

require PROJECT ZONE NAME
tail_follow=""
((FOLLOW)) && tail_follow="-F"
ssh_workers "$WORKER" "$(remote_preamble)
tail -n $LINES $tail_follow \"\$CRATE_LOGS/\$CRATE_SESSION.log\""
