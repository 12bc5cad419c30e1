#!/usr/bin/env bash
# Install the project on every worker of a slice: the code (git clone or a gs:// tarball), a
# virtual environment, requirements.txt and the TPU build of jax; then check that the TPU
# runtime comes up across all hosts.
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF2'
Usage: launch/tpu/setup.sh --project=P --zone=Z --name=NAME (--repo=GIT_URL [--ref=REV] | --tarball=gs://B/F.tgz)
                           [--python=python3.11] [--remote-dir=crate_jax] [--venv=crate_venv] [--dry-run]

On every worker (gcloud ... ssh --worker=all): fetch the code into ~/REMOTE_DIR, create
~/VENV with PYTHON (apt-installed when missing, with tmux), pip install -r requirements.txt and
the TPU jax (jax[tpu] in the range requirements.txt pins), then print each process's devices.
Safe to run again: it updates the code and the packages (do it between runs, not during one).

EOF2
  usage_common
}

parse_args "$@"
tpu_setup
