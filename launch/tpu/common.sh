# shellcheck shell=bash disable=SC2034  # the settings are read by the scripts sourcing this
# Shared by launch/tpu/*.sh: settings from flags or CRATE_* environment variables, --dry-run,
# and the gcloud steps (state, create, setup, delete) that several scripts use.
#
# Every setting is a flag or an environment variable (the flag wins); nothing is hard-coded.
# `usage_common` below lists them.

set -euo pipefail
exec 3>&1  # the terminal's stdout: commands are shown there even from inside $(...)

PROJECT="${CRATE_PROJECT:-}"
ZONE="${CRATE_ZONE:-}"
ACCELERATOR="${CRATE_ACCELERATOR:-}"
NAME="${CRATE_NAME:-}"
WORKDIR="${CRATE_WORKDIR:-}"
CONFIG="${CRATE_CONFIG:-}"
RUNTIME_VERSION="${CRATE_RUNTIME_VERSION:-}"
SPOT="${CRATE_SPOT:-0}"
QUEUED="${CRATE_QUEUED:-0}"
REPO="${CRATE_REPO:-}"
REF="${CRATE_REF:-}"
TARBALL="${CRATE_TARBALL:-}"
REMOTE_DIR="${CRATE_REMOTE_DIR:-crate_jax}"
VENV="${CRATE_VENV:-crate_venv}"
REMOTE_PYTHON="${CRATE_PYTHON:-python3.11}"
SESSION="${CRATE_SESSION:-crate}"
WORKER="${CRATE_WORKER:-all}"
DRY_RUN="${CRATE_DRY_RUN:-0}"
YES="${CRATE_YES:-0}"
RECREATE=0
RESTART=0
FORCE=0
WAIT=1
FOLLOW=1
LINES=100
EXTRA_ARGS=()

usage_common() {
  cat <<'EOF'
Settings: a flag, or its environment variable (the flag wins). None has a built-in value
unless one is shown.
  --project=ID            CRATE_PROJECT          Google Cloud project
  --zone=ZONE             CRATE_ZONE             zone of the slice (v4: us-central2-b)
  --accelerator=TYPE      CRATE_ACCELERATOR      slice type: v4-8 ... v4-4096, v5litepod-N,
                                                 v5p-N, v6e-N (N counts TensorCores on v4 and
                                                 v5p, two per chip; chips on v5e and v6e)
  --name=NAME             CRATE_NAME             TPU VM (slice) name; with --queued also the
                                                 queued resource's name
  --workdir=gs://B/DIR    CRATE_WORKDIR          run directory in a bucket every worker can
                                                 write: checkpoints, metrics, logs
  --config=PATH[:ARG]     CRATE_CONFIG           config file, relative to the repository root
  --runtime-version=V     CRATE_RUNTIME_VERSION  TPU software version; default per generation:
                                                 v4 tpu-ubuntu2204-base, v5e v2-alpha-tpuv5-lite,
                                                 v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e
  --spot                  CRATE_SPOT=1           Spot capacity: cheaper, can be preempted
  --queued                CRATE_QUEUED=1         request the slice as a queued resource (waits
                                                 for capacity instead of failing at once)
  --repo=GIT_URL          CRATE_REPO             setup: clone the code from this URL ...
  --ref=BRANCH|TAG|SHA    CRATE_REF              ... at this revision (default: latest default
                                                 branch)
  --tarball=gs://B/F.tgz  CRATE_TARBALL          setup: or unpack this tarball of the repository
                                                 (git archive --format=tar.gz -o F.tgz HEAD;
                                                 gcloud storage cp F.tgz gs://B/)
  --remote-dir=DIR        CRATE_REMOTE_DIR       code on each worker, under ~ (crate_jax)
  --venv=DIR              CRATE_VENV             virtual environment on each worker, under ~
                                                 (crate_venv)
  --python=EXE            CRATE_PYTHON           Python for the venv (python3.11; installed with
                                                 apt when the image lacks it)
  --session=NAME          CRATE_SESSION          tmux session and log file name (crate)
  --yes                   CRATE_YES=1            delete without asking
  --dry-run               CRATE_DRY_RUN=1        print the commands (shell-quoted, after '+ '),
                                                 run none of them
  -h, --help                                     this text
EOF
}

die() {
  echo "$(basename "$0"): $*" >&2
  exit 2
}

# parse_args "$@": fills the settings above. `--config.KEY=VALUE` and anything after `--` go to
# EXTRA_ARGS (run.sh passes them to the trainer).
parse_args() {
  while (($#)); do
    case "$1" in
      --project=*) PROJECT="${1#*=}" ;;
      --zone=*) ZONE="${1#*=}" ;;
      --accelerator=*) ACCELERATOR="${1#*=}" ;;
      --name=*) NAME="${1#*=}" ;;
      --workdir=*) WORKDIR="${1#*=}" ;;
      --config=*) CONFIG="${1#*=}" ;;
      --config.*=*) EXTRA_ARGS+=("$1") ;;
      --runtime-version=*) RUNTIME_VERSION="${1#*=}" ;;
      --spot) SPOT=1 ;;
      --queued) QUEUED=1 ;;
      --repo=*) REPO="${1#*=}" ;;
      --ref=*) REF="${1#*=}" ;;
      --tarball=*) TARBALL="${1#*=}" ;;
      --remote-dir=*) REMOTE_DIR="${1#*=}" ;;
      --venv=*) VENV="${1#*=}" ;;
      --python=*) REMOTE_PYTHON="${1#*=}" ;;
      --session=*) SESSION="${1#*=}" ;;
      --worker=*) WORKER="${1#*=}" ;;
      --lines=*) LINES="${1#*=}" ;;
      --recreate) RECREATE=1 ;;
      --restart) RESTART=1 ;;
      --force) FORCE=1 ;;
      --no-wait) WAIT=0 ;;
      --no-follow) FOLLOW=0 ;;
      --yes) YES=1 ;;
      --dry-run) DRY_RUN=1 ;;
      -h | --help) usage; exit 0 ;;
      --) shift; EXTRA_ARGS+=("$@"); break ;;
      *) die "unknown argument '$1' (see --help)" ;;
    esac
    shift
  done
  check_settings
}

# require VAR...: every named setting must be set; the error names its flag and variable.
require() {
  local missing=() var flag
  for var in "$@"; do
    if [[ -z "${!var}" ]]; then
      flag="$(tr '[:upper:]_' '[:lower:]-' <<<"$var")"
      missing+=("--${flag}=... (or CRATE_${var})")
    fi
  done
  ((${#missing[@]} == 0)) || die "missing setting: ${missing[*]}; see --help"
}

check_settings() {
  if [[ -n "$ACCELERATOR" ]] && ! [[ "$ACCELERATOR" =~ ^(v2|v3|v4|v5p|v5litepod|v6e)-[0-9]+$ ]]; then
    die "--accelerator=$ACCELERATOR (CRATE_ACCELERATOR): expected a type such as v4-64, v5litepod-64, v5p-128 or v6e-256"
  fi
  if [[ -n "$WORKDIR" && "$WORKDIR" != gs://* ]]; then
    die "--workdir=$WORKDIR (CRATE_WORKDIR): must be a gs:// path; every worker writes its checkpoint shards there"
  fi
  if [[ -n "$TARBALL" && "$TARBALL" != gs://* ]]; then
    die "--tarball=$TARBALL (CRATE_TARBALL): must be a gs:// path"
  fi
  [[ "$LINES" =~ ^[0-9]+$ ]] || die "--lines=$LINES: a number of lines"
  [[ "$WORKER" == all || "$WORKER" =~ ^[0-9]+$ ]] || die "--worker=$WORKER (CRATE_WORKER): a worker number or 'all'"
  for flag in SPOT QUEUED DRY_RUN YES; do
    [[ "${!flag}" == 0 || "${!flag}" == 1 ]] || die "CRATE_${flag}=${!flag}: 0 or 1"
  done
}

default_runtime_version() {
  case "$ACCELERATOR" in
    v6e-*) echo v2-alpha-tpuv6e ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v5litepod-*) echo v2-alpha-tpuv5-lite ;;
    *) echo tpu-ubuntu2204-base ;; # v4 and older
  esac
}

# show CMD...: print it shell-quoted after '+ ', always to the terminal's stdout.
# run CMD...: show it, then run it unless --dry-run.
show() {
  {
    printf '+'
    printf ' %q' "$@"
    printf '\n'
  } >&3
}
run() {
  show "$@"
  ((DRY_RUN)) || "$@"
}

# tpu_state: READY, CREATING, PREEMPTED, STOPPED, ... or NOT_FOUND. Under --dry-run the query
# is printed and READY assumed.
tpu_state() {
  local state
  show gcloud compute tpus tpu-vm describe "$NAME" --project="$PROJECT" --zone="$ZONE" \
    --format='value(state)'
  if ((DRY_RUN)); then
    echo READY
  elif state="$(gcloud compute tpus tpu-vm describe "$NAME" --project="$PROJECT" \
      --zone="$ZONE" --format='value(state)' 2>/dev/null)" && [[ -n "$state" ]]; then
    echo "$state"
  else
    echo NOT_FOUND
  fi
}

queued_resource_exists() {  # under --dry-run the query is printed and "none" assumed
  if ((DRY_RUN)); then
    show gcloud compute tpus queued-resources describe "$NAME" --project="$PROJECT" \
      --zone="$ZONE" --format='value(name)'
    return 1
  fi
  gcloud compute tpus queued-resources describe "$NAME" --project="$PROJECT" --zone="$ZONE" \
    --format='value(name)' >/dev/null 2>&1
}

tpu_create() {
  require PROJECT ZONE NAME ACCELERATOR
  local version="${RUNTIME_VERSION:-$(default_runtime_version)}"
  local spot=()
  ((SPOT)) && spot=(--spot)
  if ((!QUEUED)); then
    run gcloud compute tpus tpu-vm create "$NAME" --project="$PROJECT" --zone="$ZONE" \
      --accelerator-type="$ACCELERATOR" --version="$version" "${spot[@]}"
    return
  fi
  run gcloud compute tpus queued-resources create "$NAME" --project="$PROJECT" --zone="$ZONE" \
    --node-id="$NAME" --accelerator-type="$ACCELERATOR" --runtime-version="$version" "${spot[@]}"
  ((WAIT)) || return 0
  echo "# waiting for queued resource $NAME to become ACTIVE (polls every 60 s):" >&3
  show gcloud compute tpus queued-resources describe "$NAME" --project="$PROJECT" \
    --zone="$ZONE" --format='value(state.state)'
  ((DRY_RUN)) && return 0
  local state
  while true; do
    state="$(gcloud compute tpus queued-resources describe "$NAME" --project="$PROJECT" \
      --zone="$ZONE" --format='value(state.state)')"
    echo "$(date -u +%H:%M:%S) queued resource $NAME: $state" >&2
    case "$state" in
      ACTIVE) return 0 ;;
      FAILED | SUSPENDED) die "queued resource $NAME is $state; delete.sh removes it" ;;
    esac
    sleep 60
  done
}

tpu_delete() {
  require PROJECT ZONE NAME
  local quiet=()
  ((YES)) && quiet=(--quiet)
  if ((QUEUED)) || queued_resource_exists; then
    # --force also deletes the TPU VM the queued resource holds.
    run gcloud compute tpus queued-resources delete "$NAME" --project="$PROJECT" --zone="$ZONE" \
      --force "${quiet[@]}"
  else
    run gcloud compute tpus tpu-vm delete "$NAME" --project="$PROJECT" --zone="$ZONE" "${quiet[@]}"
  fi
}

# ssh_workers WORKER COMMAND: run a bash command on one worker or on all of them (in parallel).
ssh_workers() {
  run gcloud compute tpus tpu-vm ssh "$NAME" --project="$PROJECT" --zone="$ZONE" \
    --worker="$1" --command="$2"
}

# remote_path P: P quoted for the remote shell, relative paths under the remote $HOME.
remote_path() {
  # shellcheck disable=SC2016  # $HOME is for the remote shell to expand
  if [[ "$1" == /* ]]; then printf '%q' "$1"; else printf '"$HOME"/%q' "$1"; fi
}

# The variables every remote script starts with.
remote_preamble() {
  cat <<EOF
# shellcheck disable=SC2034  # not every remote script uses every setting
set -euo pipefail
CRATE_DIR=$(remote_path "$REMOTE_DIR")
CRATE_VENV=$(remote_path "$VENV")
CRATE_SESSION=$(printf '%q' "$SESSION")
CRATE_LOGS="\$HOME/crate_logs"
EOF
}

# The script each worker runs to install the project.
setup_script() {
  remote_preamble
  if [[ -n "$TARBALL" ]]; then
    cat <<EOF
rm -rf "\$CRATE_DIR" && mkdir -p "\$CRATE_DIR"
gcloud storage cp $(printf '%q' "$TARBALL") /tmp/crate_jax_code.tar.gz
tar -xzf /tmp/crate_jax_code.tar.gz -C "\$CRATE_DIR"
EOF
  else
    cat <<EOF
if [ -d "\$CRATE_DIR/.git" ]; then git -C "\$CRATE_DIR" fetch -q --tags origin
else git clone -q $(printf '%q' "$REPO") "\$CRATE_DIR"; fi
ref=$(printf '%q' "$REF")
if [ -n "\$ref" ]; then git -C "\$CRATE_DIR" checkout -q --detach "origin/\$ref" 2>/dev/null \
  || git -C "\$CRATE_DIR" checkout -q --detach "\$ref"
else git -C "\$CRATE_DIR" checkout -q --detach origin/HEAD; fi
EOF
  fi
  cat <<EOF
python=$(printf '%q' "$REMOTE_PYTHON")
if ! command -v "\$python" >/dev/null || ! command -v tmux >/dev/null; then
  sudo apt-get update -qq
  sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "\$python" "\$python-venv" tmux
fi
[ -x "\$CRATE_VENV/bin/python" ] || "\$python" -m venv "\$CRATE_VENV"
cd "\$CRATE_DIR"
"\$CRATE_VENV/bin/pip" install -q -U pip
"\$CRATE_VENV/bin/pip" install -q -r requirements.txt
# the TPU build of jax, within the range requirements.txt allows
jax_spec="\$(grep -E '^jax[<>=]' requirements.txt | head -n 1 | sed 's/^jax/jax[tpu]/')"
"\$CRATE_VENV/bin/pip" install -q -U "\${jax_spec:-jax[tpu]}"
echo "\$(hostname): \$("\$CRATE_VENV/bin/python" -c 'import jax, crate_jax; print("jax", jax.__version__)')"
EOF
}

# A check that the slice's TPU runtime comes up with every host (all workers at once).
check_script() {
  remote_preamble
  cat <<'EOF'
cd "$CRATE_DIR"
timeout 600 "$CRATE_VENV/bin/python" -c 'import jax; print(f"process {jax.process_index()}: {jax.local_device_count()} local of {jax.device_count()} devices ({jax.devices()[0].device_kind})")'
EOF
}

print_script() {  # print_script TITLE SCRIPT: under --dry-run, show a remote script readably
  if ((DRY_RUN)); then
    echo "# $1:"
    # shellcheck disable=SC2001
    sed 's/^/#   /' <<<"$2"
  fi
}

tpu_setup() {
  require PROJECT ZONE NAME
  [[ -n "$REPO" || -n "$TARBALL" ]] || die "missing setting: --repo=GIT_URL (or CRATE_REPO) or --tarball=gs://... (or CRATE_TARBALL): where the workers get the code"
  local script
  script="$(setup_script)"
  print_script "setup, on every worker" "$script"
  ssh_workers all "$script"
  script="$(check_script)"
  print_script "check, on every worker" "$script"
  ssh_workers all "$script"
}
