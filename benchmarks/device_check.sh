#!/usr/bin/env bash
# The budgeted GPU check in one call of a lent machine (one command of at most 10 minutes, no network, a few files
# back):
#   bash benchmarks/device_check.sh [extra flags for benchmarks.gpu_check]
# From the project's root, with .device/ beside it (carried to the machine):
#   .device/data  cifar-10-batches-py, or a make_cifar10.py that writes it (run here when the folder is missing)
#   .device/whl   the wheels the machine's image lacks (benchmarks/fetch_wheels.sh fetches them), installed into a
#                 side folder ($SITE) on PYTHONPATH: the machine's own torch is left alone
#   .device/COMMIT  the commit the tree is at (the machine's copy of the tree has no .git)
# Then imports every module the items use (`--preflight-only`: a few seconds; what is missing goes into
# $OUT/SUMMARY.md at once), and runs `python -m benchmarks.gpu_check --budget B`, B what is left of DEADLINE seconds (default 585, inside a
# 600 s call) after the setup, less PACK_S for packing, at most MAX_BUDGET (540), and packs into $OUT at most
# 8 files: SUMMARY.md and summary.json (also rewritten there after every item, so a call cut short still returns
# them), device_check.log and gpu-check.tar.gz (logs, JSON, figures, notebooks; no checkpoints), the archive split
# into 15 MiB parts if it is larger (cat gpu-check.tar.gz.* > gpu-check.tar.gz).
# Environment: OUT (default ./device-out), DEVICE_DIR (.device), DATA (where a made copy goes: /tmp/cifar), DATA_NAME,
# SITE (/tmp/site), WORK (/tmp/gpu-check), DEADLINE, PACK_S (20), MAX_BUDGET, BUDGET (overrides all three).
set -uo pipefail
cd "$(dirname "$0")/.."
dev=${DEVICE_DIR:-.device}; out=${OUT:-device-out}; work=${WORK:-/tmp/gpu-check}; site=${SITE:-/tmp/site}
deadline=${DEADLINE:-585}; pack_s=${PACK_S:-20}; max_budget=${MAX_BUDGET:-540}
mkdir -p "$out" "$work"
log=$work/device_check.log
: > "$log"
say() { echo "[device_check $(( SECONDS ))s] $*" | tee -a "$log"; }

# 1. the data: the carried folder, else made from the carried script, else stop
if [ -d "$dev/data/cifar-10-batches-py" ]; then
  data=$dev/data; name=${DATA_NAME:-CIFAR-10}
elif [ -f "$dev/data/make_cifar10.py" ]; then
  data=${DATA:-/tmp/cifar}; name=${DATA_NAME:-CIFAR-10 (JPEG copy)}
  [ -d "$data/cifar-10-batches-py" ] || python3 "$dev/data/make_cifar10.py" "$data" >> "$log" 2>&1 \
    || { say "error: $dev/data/make_cifar10.py failed (see the log)"; cp "$log" "$out/"; exit 2; }
else
  say "error: $dev/data holds neither cifar-10-batches-py nor make_cifar10.py: carry one there"
  cp "$log" "$out/"; exit 2
fi
say "data: $data ($name)"

# 2. the wheels, into a side folder (never over the machine's torch)
shopt -s nullglob
wheels=("$dev"/whl/*.whl)
if [ ${#wheels[@]} -gt 0 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
    "${wheels[@]}" >> "$log" 2>&1 || say "warning: pip could not install every wheel (see the log)"
  export PYTHONPATH=$PWD:$site${PYTHONPATH:+:$PYTHONPATH} PATH=$site/bin:$PATH
  say "installed ${#wheels[@]} wheels into $site"
else
  say "no wheels in $dev/whl: using what the machine has"
fi
export NO_ALBUMENTATIONS_UPDATE=1 TQDM_DISABLE=1 MPLBACKEND=Agg
export GIT_COMMIT=${GIT_COMMIT:-$(cat "$dev/COMMIT" 2>/dev/null || git rev-parse --short HEAD 2>/dev/null || echo)}

# 3. the import preflight (a few seconds): SUMMARY.md in $OUT says what is missing before any item starts
python3 -m benchmarks.gpu_check --preflight-only --data-dir "$data" --data-name "$name" --out "$work/check" \
  --summary-to "$out" >> "$log" 2>&1 || say "warning: the preflight did not run (see the log)"
grep -h "^preflight:" "$log" | tail -1 | sed "s/^/[device_check $(( SECONDS ))s] /"

# 4. the check, its budget what is left of the deadline
left=$(( deadline - SECONDS - pack_s ))
budget=${BUDGET:-$(( left < max_budget ? left : max_budget ))}
say "budget ${budget} s (commit ${GIT_COMMIT:-unknown})"
rm -rf "$work/check"
timeout --signal=TERM --kill-after=20 $(( budget + 15 )) \
  python3 -m benchmarks.gpu_check --budget "$budget" --data-dir "$data" --data-name "$name" --out "$work/check" \
  --summary-to "$out" "$@" >> "$log" 2>&1
rc=$?
say "check exited with $rc"

# 5. pack: at most 8 files in $OUT
tar czf "$work/gpu-check.tar.gz" --exclude='*.pt' --exclude='*.pth' --exclude='*.ckpt' -C "$work" check
if [ "$(stat -c %s "$work/gpu-check.tar.gz")" -gt $(( 15 * 1024 * 1024 )) ]; then
  split -b 15m -d -a 1 "$work/gpu-check.tar.gz" "$out/gpu-check.tar.gz."
  say "archive split: cat gpu-check.tar.gz.* > gpu-check.tar.gz"
else
  cp "$work/gpu-check.tar.gz" "$out/"
fi
for f in SUMMARY.md summary.json; do [ -f "$work/check/$f" ] && cp "$work/check/$f" "$out/"; done
cp "$log" "$out/"
count=$(find "$out" -maxdepth 1 -type f | wc -l)
say "$count files in $out"
[ "$count" -le 8 ] || say "warning: more than 8 files in $out: only 8 come back"
cp "$log" "$out/"
cat "$out/SUMMARY.md" 2>/dev/null
exit $rc
