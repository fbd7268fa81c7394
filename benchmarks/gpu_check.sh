#!/usr/bin/env bash
# The GPU check in one command, on a bare CUDA machine (no network needed):
#   bash benchmarks/gpu_check.sh DATA_DIR [OUT] [-- extra flags for benchmarks.gpu_check]
# Installs what the machine lacks from a folder of wheels when WHEELS (default .device/whl) holds them
# (albumentations, grad-cam, torch-lr-finder, torchinfo, airbench, papermill, a Jupyter kernel), else from the
# package index, then runs `python -m benchmarks.gpu_check` (tests, benchmark in every mode, the peak sweep, the
# command line's default run of each model, all five notebooks) and prints OUT/SUMMARY.md. Pass `-- --budget S` for
# the budgeted check; on a machine lent for one call, benchmarks/device_check.sh does all of it (BENCHMARKS.md).
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:?usage: bash benchmarks/gpu_check.sh DATA_DIR [OUT] [-- flags]}
out=${2:-gpu-check}
shift $(( $# >= 2 ? 2 : 1 )); [ "${1:-}" = "--" ] && shift
wheels=${WHEELS:-.device/whl}
if [ -d "$wheels" ]; then  # a bare machine: the wheels its image lacks, as fetched for it, into a side folder
  python -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site "$wheels"/*.whl
  export PYTHONPATH=$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
else
  python -m pip install -q -r requirements.txt papermill ipykernel airbench==0.1.8
fi
export NO_ALBUMENTATIONS_UPDATE=1
python -m benchmarks.gpu_check --data-dir "$data" --out "$out" "$@"
