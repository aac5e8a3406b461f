#!/usr/bin/env bash
# One-shot GPU session (issue 16): everything a first, ~10-minute CUDA shot should measure, in one command,
# and the same command end to end on a CPU at tiny budgets (tests/test_gpu_shot.py).
#
# Usage (from anywhere; it runs from the repo root with PYTHONPATH=<repo>):
#   benchmarks/gpu_shot.sh CIFAR10_TGZ            # or SHOT_DATA_TGZ=... benchmarks/gpu_shot.sh
# CIFAR10_TGZ is ONE tar.gz of the whole CIFAR-10 JPEG ImageFolder (a folder with train/<class>/ and
# test/<class>/ at its top or one level down), e.g. made beside the data with
#   tar -czf cifar10-jpeg.tgz -C ../shared/data cifar10-jpeg
# (the whole folder: a partial copy would silently change the long-tailed subset; step 2 checks its
# data_hash against the shipped cache's provenance).  Results go to $OUT (default ./gpu-shot-out).
#
# Steps, in order:
#   1. environment: nvidia-smi, versions, float32 matmul precision, TF32 flags  -> logs/env.txt
#   2. unpack the tar.gz into $SHOT_WORK, data_hash vs the shipped cache        -> logs/datahash.txt
#   3. ~$CHECK_SECONDS s of CUDA-vs-CPU checks (AutoAugment ops, host vs device batches, fp32 vs TF32
#      argmins, every head); skipped without CUDA                               -> logs/checks.txt
#   4. beta=$PROBE_BETA probe: $PROBE_FLAGS with --compile on/off ($PROBE_COMPILE), s/step printed
#   5. the betas $BETAS at once, one process each, in a fresh --cache-dir under `timeout $RUN_TIMEOUT`,
#      with --time-limit $TIME_LIMIT (pause = checkpoint + exit 3; rerun to continue)
#   6. if $BENCH=1 and time remains: benchmarks/stage1_throughput.py and stage2_speed.py
#   7. pack into $OUT: b<beta>-features.h5 (or b<beta>-checkpoint.pt when paused) per beta + logs.tar.gz,
#      each < 16 MiB, at most 8 files
#
# Every budget is a variable (defaults: the GPU shot; tests/test_gpu_shot.py sets tiny ones):
#   PYTHON=python  DEVICE=auto  BETAS="200 100 10"  PROBE_BETA=100  PROBE_FLAGS="--iterations 300"
#   PROBE_COMPILE="on off"  EXTRA_FLAGS=""  CHECK_SECONDS=60  TIME_LIMIT=6m  RUN_TIMEOUT=420
#   BENCH=0  SHIPPED_CACHE=cache/cifar10-lt-b200-resnet32-paper-s0/features.h5  SHOT_WORK=$(mktemp -d)
# A CPU run at tiny budgets:
#   DEVICE=cpu EXTRA_FLAGS="--epochs 1 --train-limit 20 --test-limit 5" PROBE_FLAGS="--epochs 1 --train-limit 20
#   --test-limit 5" PROBE_COMPILE=off TIME_LIMIT=10m RUN_TIMEOUT=240 OUT=/tmp/o benchmarks/gpu_shot.sh tiny.tgz
# Exit status: 0 when everything ran and was packed (a beta that paused or timed out still packs its
# checkpoint and is reported in logs/summary.txt), 1 on a data_hash mismatch or a packing failure.
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

DATA_TGZ="${1:-${SHOT_DATA_TGZ:-}}"
PYTHON="${PYTHON:-python}"
DEVICE="${DEVICE:-auto}"
BETAS="${BETAS:-200 100 10}"
PROBE_BETA="${PROBE_BETA:-100}"
PROBE_FLAGS="${PROBE_FLAGS:---iterations 300}"
PROBE_COMPILE="${PROBE_COMPILE:-on off}"
EXTRA_FLAGS="${EXTRA_FLAGS:-}"
CHECK_SECONDS="${CHECK_SECONDS:-60}"
TIME_LIMIT="${TIME_LIMIT:-6m}"
RUN_TIMEOUT="${RUN_TIMEOUT:-420}"
BENCH="${BENCH:-0}"
SHIPPED_CACHE="${SHIPPED_CACHE:-cache/cifar10-lt-b200-resnet32-paper-s0/features.h5}"
OUT="${OUT:-$ROOT/gpu-shot-out}"
SHOT_WORK="${SHOT_WORK:-$(mktemp -d)}"

if [ -z "$DATA_TGZ" ] || [ ! -f "$DATA_TGZ" ]; then
  echo "usage: benchmarks/gpu_shot.sh CIFAR10_TGZ   (or SHOT_DATA_TGZ=...); see the header" >&2
  exit 2
fi
LOGS="$SHOT_WORK/logs"
mkdir -p "$LOGS" "$OUT" "$SHOT_WORK/data"
START=$SECONDS
say() { echo "[gpu_shot +$((SECONDS - START))s] $*" | tee -a "$LOGS/summary.txt"; }
PY=("$PYTHON" benchmarks/gpu_shot.py)

# 1. environment
say "1. environment"
{ date -u; nvidia-smi 2>&1 || echo "nvidia-smi: not available"; "${PY[@]}" env 2>&1; } > "$LOGS/env.txt"

# 2. data
say "2. unpack $DATA_TGZ"
tar -xzf "$DATA_TGZ" -C "$SHOT_WORK/data" || { say "cannot unpack $DATA_TGZ"; exit 1; }
DATA="$(dirname "$(find "$SHOT_WORK/data" -maxdepth 3 -type d -name train -print -quit)")"
if [ ! -d "$DATA/train" ] || [ ! -d "$DATA/test" ]; then
  say "no train/ and test/ folders in $DATA_TGZ"; exit 1
fi
if [ -f "$SHIPPED_CACHE" ]; then
  "${PY[@]}" datahash --data-root "$DATA" --cache "$SHIPPED_CACHE" > "$LOGS/datahash.txt" 2>&1
  rc=$?; cat "$LOGS/datahash.txt"
  [ $rc -eq 0 ] || { say "data_hash mismatch: stopping"; exit 1; }
else
  say "no shipped cache at $SHIPPED_CACHE: data_hash not checked"
fi

# 3. CUDA vs CPU
say "3. CUDA-vs-CPU checks (${CHECK_SECONDS}s)"
"${PY[@]}" checks --seconds "$CHECK_SECONDS" --json "$LOGS/checks.json" > "$LOGS/checks.txt" 2>&1
say "   checks exit $? ($(tail -n 1 "$LOGS/checks.txt" | cut -c1-160))"

# 4. compile probe
extract() { "$PYTHON" -m pipeline.cli extract --dataset cifar10-lt --data-root "$DATA" --device "$DEVICE" "$@"; }
PROBE_DIR="$SHOT_WORK/probe"
for c in $PROBE_COMPILE; do
  say "4. probe beta=$PROBE_BETA compile $c: $PROBE_FLAGS"
  # shellcheck disable=SC2086
  extract --imbalance "$PROBE_BETA" --compile "$c" --cache-dir "$PROBE_DIR" --run-name "probe-compile-$c" \
    $PROBE_FLAGS > "$LOGS/probe-compile-$c.log" 2>&1
  say "   exit $?"
done
"${PY[@]}" probe-report "$PROBE_DIR" 2>&1 | tee -a "$LOGS/summary.txt"

# 5. the betas at once, one process each
CACHE="$SHOT_WORK/cache"
say "5. betas $BETAS in $CACHE (timeout ${RUN_TIMEOUT}s, --time-limit $TIME_LIMIT)"
pids=()
for b in $BETAS; do
  # shellcheck disable=SC2086
  timeout --signal=TERM --kill-after=60 "$RUN_TIMEOUT" \
    "$PYTHON" -m pipeline.cli extract --dataset cifar10-lt --data-root "$DATA" --device "$DEVICE" \
    --imbalance "$b" --cache-dir "$CACHE" --run-name "shot-b$b" --time-limit "$TIME_LIMIT" $EXTRA_FLAGS \
    > "$LOGS/extract-b$b.log" 2>&1 &
  pids+=($!)
done
i=0
for b in $BETAS; do
  wait "${pids[$i]}"; rc=$?
  case $rc in 0) what=finished ;; 3) what="paused (checkpoint written; rerun to continue)" ;;
    124|137) what="timed out" ;; *) what="failed" ;; esac
  say "   beta=$b exit $rc: $what"
  i=$((i + 1))
done

# 6. benchmarks, if asked for and time remains
if [ "$BENCH" = 1 ]; then
  say "6. benchmarks"
  "$PYTHON" benchmarks/stage1_throughput.py --data-root "$DATA" --workers 12 --compile > "$LOGS/bench-stage1.txt" 2>&1
  "$PYTHON" benchmarks/stage2_speed.py --device "$DEVICE" > "$LOGS/bench-stage2.txt" 2>&1
fi

# 7. pack
say "7. pack into $OUT"
cp "$PROBE_DIR"/*/*.log "$LOGS"/ 2>/dev/null || true
"${PY[@]}" pack --cache-dir "$CACHE" --logs "$LOGS" --out "$OUT" --betas "$BETAS" --prefix shot-b
rc=$?
say "done in $((SECONDS - START))s (pack exit $rc)"
exit $rc
