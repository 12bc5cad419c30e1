#!/usr/bin/env bash
# Create a Cloud TPU VM slice (directly, or as a queued resource that waits for capacity).
#
#   launch/tpu/create.sh --project=P --zone=us-central2-b --accelerator=v4-64 --name=crate [--spot] [--queued]
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF2'
Usage: launch/tpu/create.sh --project=P --zone=Z --accelerator=TYPE --name=NAME [--spot] [--queued]
                            [--runtime-version=V] [--no-wait] [--dry-run]

Creates the TPU VM slice NAME. With --queued the request goes through a queued resource of the
same name and the script waits until it is ACTIVE (--no-wait: return at once). Then run
launch/tpu/setup.sh to install the project on every worker.

EOF2
  usage_common
}

parse_args "$@"
require PROJECT ZONE NAME ACCELERATOR
tpu_create
