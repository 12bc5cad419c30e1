#!/usr/bin/env bash
# Delete the slice (or its queued resource, with the TPU VM it holds). The bucket workdir, its
# checkpoints and logs stay.
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF2'
Usage: launch/tpu/delete.sh --project=P --zone=Z --name=NAME [--yes] [--dry-run]

Deletes the queued resource NAME (with --force, which deletes its TPU VM too) when there is
one, otherwise the TPU VM NAME. gcloud asks for confirmation unless --yes.

EOF2
  usage_common
}

parse_args "$@"
require PROJECT ZONE NAME
tpu_delete
