#!/usr/bin/env bash
# One process driving every GPU of this machine (the mesh spans all local devices).
#
#   launch/gpu/single_node.sh --config=configs/clipa_b16.py --workdir=runs/clipa_b16 [--config.KEY=VALUE ...]
#
# Everything is passed to `python -m crate_jax.main`; running the same command again resumes.
# Environment:
#   PYTHON                   interpreter (default: python3)
#   CUDA_VISIBLE_DEVICES     the GPUs to use (default: all)
#   CRATE_XLA_FLAGS          replaces the performance flags below (XLA_FLAGS of your own are kept
#                            and come last, so they win)
#   XLA_PYTHON_CLIENT_MEM_FRACTION   GPU memory jax preallocates (default here 0.90; jax's 0.75)
#
# The XLA flags (see docs.jax.dev "GPU performance tips" and NVIDIA JAX-Toolbox):
#   --xla_gpu_enable_latency_hiding_scheduler=true
#       schedules the FSDP all-gathers / reduce-scatters to overlap with compute: the main one
#   --xla_gpu_all_gather_combine_threshold_bytes=134217728
#   --xla_gpu_reduce_scatter_combine_threshold_bytes=134217728
#   --xla_gpu_all_reduce_combine_threshold_bytes=134217728
#       combine a layer's many small collectives into fewer large ones (128 MiB buckets)
#   --xla_gpu_enable_highest_priority_async_stream=true
#       collectives on a high-priority stream, so that compute does not starve them
# bf16 compute (model.overrides.dtype / image_overrides.dtype = 'bfloat16', as the big configs
# set) matters more than any flag. Check memory first: python -m crate_jax.plan --config=...
# --mesh=fsdp:<GPUs> --device-memory=80GB.
set -euo pipefail

if [[ "${1:-}" == -h || "${1:-}" == --help ]]; then
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
  exit 0
fi
dry_run=0
if [[ "${1:-}" == --dry-run ]]; then
  dry_run=1
  shift
fi
python="${PYTHON:-python3}"
perf_flags="${CRATE_XLA_FLAGS:---xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_all_gather_combine_threshold_bytes=134217728 --xla_gpu_reduce_scatter_combine_threshold_bytes=134217728 --xla_gpu_all_reduce_combine_threshold_bytes=134217728 --xla_gpu_enable_highest_priority_async_stream=true}"
export XLA_FLAGS="${perf_flags} ${XLA_FLAGS:-}"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}"
export CRATE_DISTRIBUTED=0  # one process, even inside a multi-task SLURM allocation
cmd=("$python" -m crate_jax.main "$@")
printf '+ XLA_FLAGS=%q XLA_PYTHON_CLIENT_MEM_FRACTION=%q CRATE_DISTRIBUTED=0' "$XLA_FLAGS" "$XLA_PYTHON_CLIENT_MEM_FRACTION"
printf ' %q' "${cmd[@]}"
printf '\n'
((dry_run)) || exec "${cmd[@]}"
