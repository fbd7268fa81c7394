#!/usr/bin/env bash
# The one device call, rehearsed on a CPU: benchmarks/device_check.sh end to end with --quick and every item, in
# a Python 3.12 venv that holds only what the device image is taken to have (torch 2.11.0, torchvision 0.26.0,
# numpy, matplotlib, seaborn, pandas, tqdm, pillow, opencv-python-headless, scipy, pyyaml, packaging, filelock: of its
# package list), the carried wheels installed as the device installs them (pip --no-index --no-deps --target).
#   bash benchmarks/device_rehearsal.sh [flags for benchmarks.gpu_check, e.g. --items resnet9,nb04]
# Environment: PY312 (a Python 3.12 to make the venv with; default: pyenv's 3.12, else python3.12), VENV
# (/tmp/venv312; made if missing, from PyPI), OUT (/tmp/rehearsal-out), WORK (/tmp/rehearsal-work).
# It prints what travels (the tree plus .device: must stay under 64 MiB) and the check's SUMMARY.md; its exit
# status is device_check.sh's. What it cannot show: CUDA (items run on the CPU, airbench94 is skipped there).
set -uo pipefail
cd "$(dirname "$0")/.."
venv=${VENV:-/tmp/venv312}
py=${PY312:-$( (pyenv prefix 3.12 2>/dev/null || true) | sed 's|$|/bin/python3.12|')}
[ -x "$py" ] || py=$(command -v python3.12 || true)
if [ ! -x "$venv/bin/python3" ]; then
  [ -x "$py" ] || { echo "error: no Python 3.12 found: set PY312=/path/to/python3.12"; exit 2; }
  "$py" -m venv "$venv" && "$venv/bin/pip" install -q torch==2.11.0 torchvision==0.26.0 numpy matplotlib seaborn tqdm \
    pandas pillow opencv-python-headless scipy pyyaml packaging filelock || exit 2
fi
"$venv/bin/python3" -c 'import sys, torch; print("rehearsal Python", sys.version.split()[0], "torch", torch.__version__)'
tree=$(git ls-files -z | du -cb --files0-from=- | tail -1 | cut -f1)
carry=$(du -sb .device | cut -f1)
echo "travels: tree $(( tree / 1048576 )) MiB + .device $(( carry / 1048576 )) MiB = $(( (tree + carry) / 1048576 )) MiB (limit 64)"
[ $(( tree + carry )) -lt $(( 64 * 1048576 )) ] || echo "warning: over 64 MiB: the call would be refused"
export OUT=${OUT:-/tmp/rehearsal-out} WORK=${WORK:-/tmp/rehearsal-work} SITE=${SITE:-/tmp/rehearsal-site}
export DATA=${DATA:-/tmp/rehearsal-cifar} BUDGET=${BUDGET:-3000} PATH="$venv/bin:$PATH"
rm -rf "$OUT" "$SITE"
bash benchmarks/device_check.sh --quick --device cpu "$@"
