#!/usr/bin/env bash
# Fit every stage-2 head the paper's tables and figures need on every stage-1 cache, then write the report.
#
#   ./run_all.sh [--cache-root DIR] [--out DIR] [--quick] [--python PY] [--extract-missing [--time-limit D]]
#                [--data-root DATASET=DIR ...] [--per-fit-processes]
#
# The fits and the report run from one Python start (`pipeline report --fit`, which forks one fitting worker
# per CPU core): Python and torch start once, not once per fit.
# Never retrains stage 1 unless --extract-missing is given.  Rerunnable: a second run appends new fit
# rows to each results.csv, and the report takes the latest row per configuration, so the tables are
# identical (fits are deterministic on CPU for a given seed).
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: run_all.sh [options]

  --cache-root DIR        caches to use: DIR/<run>/features.h5 (default: cache)
  --out DIR               report folder (default: reports)
  --quick                 only ncm and learned-ncm (tau 0 and 1/8): a smoke test, not the paper's tables
                          (the fits come from `pipeline report --list-fits [--quick]`)
  --python PY             run the toolkit as "PY -m pipeline.cli" (default: $PYTHON if set, else
                          `pipeline` on PATH, else "python3 -m pipeline.cli")
  --extract-missing       first run `pipeline extract` (stage-1 training, hours per CIFAR run on CPU) for the
                          configurations the tables need that have no cache yet
  --time-limit D          with --extract-missing: advance the missing runs in turn within D (2h30m, 90m,
                          45s); a run that does not finish pauses with its checkpoint written (re-run
                          to continue), and the report is rebuilt from what has finished
  --data-root DATASET=DIR data root for --extract-missing and for the commands printed in the report
                          (repeatable; cifar10-lt defaults to ../shared/data/cifar10-jpeg)
  --no-figures            pass --no-figures to `pipeline report`
  --force                 pass --force to `pipeline report`: replace a report in --out that has more filled
                          cells or figures than the new one (e.g. with --no-figures or fewer caches)
  --per-fit-processes     one `pipeline fit-head` process per fit, as before `report --fit` existed (slower;
                          benchmarks/run_all_speed.py compares the two)
  -h, --help              this help
EOF
}

CACHE_ROOT=cache
OUT=reports
QUICK=0
PY_ARG="${PYTHON:-}"
EXTRACT=0
TIME_LIMIT=""
PER_FIT=0
FIG_FLAG=()
FORCE_FLAG=()
DATA_ROOTS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --cache-root) CACHE_ROOT="${2:?--cache-root needs a value}"; shift 2 ;;
    --out) OUT="${2:?--out needs a value}"; shift 2 ;;
    --quick) QUICK=1; shift ;;
    --python) PY_ARG="${2:?--python needs a value}"; shift 2 ;;
    --extract-missing) EXTRACT=1; shift ;;
    --time-limit) TIME_LIMIT="${2:?--time-limit needs a value}"; shift 2 ;;
    --data-root) DATA_ROOTS+=(--data-root "${2:?--data-root needs DATASET=DIR}"); shift 2 ;;
    --no-figures) FIG_FLAG=(--no-figures); shift ;;
    --force) FORCE_FLAG=(--force); shift ;;
    --per-fit-processes) PER_FIT=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "run_all.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
  esac
done

# ---- how to call the toolkit -------------------------------------------------------------------------
can_import() { "$1" -c 'import pipeline.cache' >/dev/null 2>&1; }
if [[ -n "$PY_ARG" ]]; then
  PY="$PY_ARG"
  can_import "$PY" || { echo "run_all.sh: $PY cannot import the pipeline package" >&2; exit 2; }
  PIPE=("$PY" -m pipeline.cli)
else
  PY=""
  PIPE=()
  if command -v pipeline >/dev/null 2>&1; then
    PIPE=(pipeline)
    shebang=$(head -n1 "$(command -v pipeline)" 2>/dev/null | sed -n 's/^#![[:space:]]*//p' | awk '{print $1}')
    if [[ -n "$shebang" && -x "$shebang" ]] && can_import "$shebang"; then PY="$shebang"; fi
  fi
  if [[ -z "$PY" ]]; then
    for cand in python3 python; do
      if command -v "$cand" >/dev/null 2>&1 && can_import "$cand"; then PY="$cand"; break; fi
    done
  fi
  [[ -n "$PY" ]] || { echo "run_all.sh: no python that can import the pipeline package; use --python" >&2; exit 2; }
  if [[ ${#PIPE[@]} -eq 0 ]]; then PIPE=("$PY" -m pipeline.cli); fi
fi

if [[ -n "$TIME_LIMIT" && $EXTRACT -eq 0 ]]; then
  echo "run_all.sh: --time-limit limits --extract-missing; add --extract-missing" >&2; exit 2
fi
T0=$(date +%s)
DEADLINE=""
if [[ -n "$TIME_LIMIT" ]]; then
  limit_s=$("$PY" -c 'import sys; from pipeline.stage1.pause import parse_duration as p; print(int(p(sys.argv[1])))' \
            "$TIME_LIMIT" 2>/dev/null) || { echo "run_all.sh: --time-limit must look like 2h30m, 90m or 45s" >&2; exit 2; }
  DEADLINE=$((T0 + limit_s))
fi
NSTEP=0
step() {  # step "<name>" cmd args...: print, run, and stop the script naming the step if it fails
  local name="$1"; shift
  NSTEP=$((NSTEP + 1))
  echo "==> [$NSTEP] $name"
  echo "    \$ $*"
  local t=$(date +%s) rc=0
  "$@" || rc=$?
  if [[ $rc -ne 0 ]]; then
    echo "run_all.sh: FAILED at step $NSTEP ($name), exit status $rc: $*" >&2
    echo "run_all.sh: total time $(( $(date +%s) - T0 )) s" >&2
    exit "$rc"
  fi
  echo "    done in $(( $(date +%s) - t )) s"
}

# ---- stage 1, only when asked -------------------------------------------------------------------------
if [[ $EXTRACT -eq 1 ]]; then
  mkdir -p "$CACHE_ROOT"
  EXTRACT_ROOTS=(${DATA_ROOTS[@]+"${DATA_ROOTS[@]}"})
  # the offline CIFAR-10 copy next to the checkout, as an absolute path so any working directory works
  REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
  if [[ " ${DATA_ROOTS[*]-} " != *" cifar10-lt="* && -d "$REPO_DIR/../shared/data/cifar10-jpeg" ]]; then
    EXTRACT_ROOTS+=(--data-root "cifar10-lt=$(cd "$REPO_DIR/../shared/data/cifar10-jpeg" && pwd)")
  fi
  listing=$("${PIPE[@]}" report --cache-root "$CACHE_ROOT" --list-missing ${EXTRACT_ROOTS[@]+"${EXTRACT_ROOTS[@]}"}) \
    || { echo "run_all.sh: FAILED listing the missing stage-1 runs (pipeline report --list-missing)" >&2; exit 1; }
  EXTRACTS=()
  while IFS= read -r line; do [[ -n "$line" ]] && EXTRACTS+=("$line"); done <<<"$listing"
  if [[ ${#EXTRACTS[@]} -eq 0 ]]; then
    echo "==> every configuration the tables need has a cache; nothing to extract"
  else
    cat >&2 <<EOF
WARNING: --extract-missing will train ${#EXTRACTS[@]} stage-1 model(s) from scratch.
  On a 2-core CPU one 13,000-iteration ResNet-32 CIFAR-LT run (the paper recipe) takes ~3.5 hours with
  native bf16 (AVX512-BF16/AMX) and ~9 hours in fp32 without it; ImageNet-LT is not feasible on CPU. On one GPU a
  CIFAR run should take minutes. Use --time-limit to advance them a session at a time. Commands:
EOF
    printf '    %s\n' "${EXTRACTS[@]}" >&2
    for cmd in "${EXTRACTS[@]}"; do
      if [[ "$cmd" == *"<"*">"* ]]; then
        echo "==> skip (no data root; pass --data-root DATASET=DIR): $cmd" >&2
        continue
      fi
      read -r -a words <<<"$cmd"
      # words[0] is "pipeline": call the toolkit the same way as every other step.  A run begun on a machine
      # with native bf16 continues in fp32 elsewhere (precision is not part of the recipe; the provenance
      # records which epochs trained in which).
      args=("${words[@]:1}" --allow-precision-change)
      if [[ -n "$DEADLINE" ]]; then
        left=$((DEADLINE - $(date +%s)))
        if [[ $left -lt 60 ]]; then echo "==> --time-limit spent: not starting $cmd"; break; fi
        args+=(--time-limit "${left}s")
      fi
      NSTEP=$((NSTEP + 1))
      echo "==> [$NSTEP] extract ${words[*]:2:6}"
      echo "    \$ ${PIPE[*]} ${args[*]}"
      rc=0
      "${PIPE[@]}" "${args[@]}" || rc=$?
      if [[ $rc -eq 3 ]]; then  # paused (time limit or signal): checkpoint written; the rest waits too
        echo "==> paused: re-run the same command to continue; building the report from the finished runs"
        break
      elif [[ $rc -ne 0 ]]; then
        echo "run_all.sh: FAILED at step $NSTEP (extract), exit status $rc" >&2; exit "$rc"
      fi
    done
  fi
fi

# ---- stage 2 + report: every fit the tables and figures need, on every cache, then the report ----------
# The list of fits comes from the report itself (`pipeline report --list-fits`: one "<cache dir><TAB><options>"
# per fit), so this script never re-encodes which heads, tau values or feature variants the tables use.
shopt -s nullglob
CACHES=("$CACHE_ROOT"/*/features.h5)
shopt -u nullglob
if [[ ${#CACHES[@]} -eq 0 ]]; then
  echo "run_all.sh: no caches under $CACHE_ROOT/*/features.h5: nothing to fit, and the report will refuse" >&2
  echo "            (create caches with \`pipeline extract ...\` or rerun with --extract-missing)" >&2
fi
QUICK_FLAG=()
if [[ $QUICK -eq 1 ]]; then QUICK_FLAG=(--quick); fi
REPORT_ARGS=(--cache-root "$CACHE_ROOT" --out "$OUT" ${FIG_FLAG[@]+"${FIG_FLAG[@]}"} ${FORCE_FLAG[@]+"${FORCE_FLAG[@]}"}
             ${DATA_ROOTS[@]+"${DATA_ROOTS[@]}"})

if [[ $PER_FIT -eq 0 ]]; then
  # one Python start: the fits of `--list-fits` (stage 2's fit_head + record_fit, as `pipeline fit-head` runs
  # them; in forked workers on a CPU), then the report
  step "fit every head the tables and figures need, then the report (one Python start)" \
    "${PIPE[@]}" report --fit ${QUICK_FLAG[@]+"${QUICK_FLAG[@]}"} "${REPORT_ARGS[@]}"
else
  fits=$("${PIPE[@]}" report --cache-root "$CACHE_ROOT" --list-fits ${QUICK_FLAG[@]+"${QUICK_FLAG[@]}"}) \
    || { echo "run_all.sh: FAILED listing the fits (pipeline report --list-fits)" >&2; exit 1; }
  FIT_DIRS=()
  FIT_ARGS=()
  while IFS=$'\t' read -r dir args; do
    [[ -n "$dir" ]] || continue
    FIT_DIRS+=("$dir")
    FIT_ARGS+=("$args")
  done <<<"$fits"
  for i in "${!FIT_DIRS[@]}"; do
    read -r -a args <<<"${FIT_ARGS[$i]}"
    step "fit-head $(basename "${FIT_DIRS[$i]}") ${FIT_ARGS[$i]}" "${PIPE[@]}" fit-head --cache "${FIT_DIRS[$i]}" "${args[@]}"
  done
  step "report" "${PIPE[@]}" report "${REPORT_ARGS[@]}"
fi
inflight=""
for ck in "$CACHE_ROOT"/*/checkpoint.pt; do  # a run with a checkpoint and no cache yet is in flight
  if [[ -f "$ck" && ! -f "$(dirname "$ck")/features.h5" ]]; then
    inflight=$("${PIPE[@]}" runs --cache-root "$CACHE_ROOT" 2>/dev/null | grep -v ": finished" || true)
    break
  fi
done
if [[ -n "$inflight" ]]; then
  echo "==> stage-1 runs in flight (not in the report until they finish; re-run their extract to continue):"
  printf '    %s\n' "$inflight"
fi
echo "run_all.sh: $NSTEP steps OK, total time $(( $(date +%s) - T0 )) s; read $OUT/README.md"
