#!/usr/bin/env bash
# GPU readiness check (issue 23): one table of CSA-/GLMHA-Restormer training speed (images/s, step
# time, MFU, peak memory, data wait) and a 1-GPU `restorch train` job; at most --budget-s seconds.
#   bash benchmarks/gpu_check.sh               # on a GPU
#   bash benchmarks/gpu_check.sh --dry-run     # on the CPU: tiny models, a few steps
# Options: --budget-s S, --peak-tflops T, --skip-compile, --skip-train, --folder DIR (see gpu_check.py).
# With OUT set, the table is also written to $OUT/gpu_check.csv. Installs nothing: it runs the
# project's .venv if there is one, else python3, with this checkout on PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/.."
python=.venv/bin/python
[ -x "$python" ] || python=python3
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# an OOM caught in the largest-batch search leaves less fragmentation behind with growable segments
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
exec "$python" benchmarks/gpu_check.py "$@"
