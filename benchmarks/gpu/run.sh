#!/usr/bin/env bash
# The GPU device check in one command: install the travelling wheels, run the CUDA-marked
# tests, time PGD against its floor (and ART, torchattacks), time one whole `medaudit run`,
# and write $OUT/gpu-check.json and $OUT/gpu-check.log.
#
#   bash benchmarks/gpu/run.sh [--device cuda|cpu] [--small]
#
# Default: CUDA, full sizes, within 9 minutes on one H100/H200 (GPU_CHECK_BUDGET_S, 500 s:
# every step's time cap is cut to what is left, so the whole cannot run over). --device cpu
# --small is the smoke run of the same steps (tests/test_gpu_check.py). One step failing
# does not stop the others; each one's status, seconds and numbers go into the JSON.
# $PYTHON picks the interpreter (default python3); .whl/ comes from fetch_wheels.sh.
set -u

device=cuda
small=0
while [ $# -gt 0 ]; do
  case "$1" in
    --device) device="$2"; shift 2 ;;
    --device=*) device="${1#*=}"; shift ;;
    --small) small=1; shift ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done

root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root" || exit 2
PY="${PYTHON:-python3}"
if [ -z "${OUT:-}" ]; then
  OUT="$(mktemp -d)"
  echo "OUT is not set: writing to $OUT"
fi
mkdir -p "$OUT/steps"
budget="${GPU_CHECK_BUDGET_S:-500}"
start=$(date +%s)
small_flag=""
[ "$small" = 1 ] && small_flag=--small
# The CPU smoke run uses one thread: on a busy machine two OpenMP threads can wait on each
# other for a scheduler slice per operation (seconds per step instead of milliseconds).
if [ "$small" = 1 ] && [ "$device" = cpu ]; then
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi

# Record a step that did not run, and why.
skip() {  # name reason
  "$PY" -c 'import json, sys; json.dump({"skipped": sys.argv[2]}, open(sys.argv[1], "w"))' \
    "$OUT/steps/$1.status.json" "$2"
  echo "== $1: skipped ($2)"
}

# Run one step under `timeout`: cap = min(its own cap, what is left of the budget less a
# reserve for the summary); its exit code and seconds go to steps/<name>.status.json.
step() {  # name cap command...
  local name="$1" cap="$2"
  shift 2
  local left=$(( budget - ($(date +%s) - start) - 20 ))
  [ "$left" -lt "$cap" ] && cap="$left"
  if [ "$cap" -lt 10 ]; then
    skip "$name" "no time left in the ${budget} s budget"
    return
  fi
  echo "== $name (cap ${cap} s): $*"
  local t0 t1 rc
  t0=$(date +%s%N)
  timeout --kill-after=5 "$cap" "$@"
  rc=$?
  t1=$(date +%s%N)
  "$PY" -c 'import json, sys; json.dump({"rc": int(sys.argv[2]), "seconds": round(int(sys.argv[3]) / 1e9, 2), "cap_s": int(sys.argv[4])}, open(sys.argv[1], "w"))' \
    "$OUT/steps/$name.status.json" "$rc" "$((t1 - t0))" "$cap"
  echo "== $name: exit code $rc"
}

main() {
  echo "gpu check: device $device, small $small, budget ${budget} s, python $("$PY" -c 'import sys; print(sys.version.split()[0])')"
  # a. the wheels the machine lacks, into a private folder first on the path
  site="${GPU_CHECK_SITE:-/tmp/site}"
  if [ "$small" = 1 ] && [ "$device" = cpu ]; then
    skip install "cpu smoke run: this environment has every package"
  elif [ -d .whl ]; then
    step install 60 "$PY" benchmarks/gpu/install_wheels.py .whl "$site" --json "$OUT/steps/install.json"
    export PYTHONPATH="$site:$root${PYTHONPATH:+:$PYTHONPATH}"
  else
    skip install "no .whl/ folder (benchmarks/gpu/fetch_wheels.sh makes it)"
  fi
  export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"

  # b. the CUDA-marked tests (skipped on a machine without CUDA)
  step pytest 120 "$PY" -m pytest -m cuda -q -p no:cacheprovider --junitxml="$OUT/steps/pytest.xml"

  # c. PGD against its floor; rounds stop at --budget-s, the cap is the backstop
  if [ "$small" = 1 ]; then pgd_budget=30; else pgd_budget=150; fi
  step pgd 190 "$PY" benchmarks/gpu/pgd_floor.py --device "$device" $small_flag \
    --budget-s "$pgd_budget" --json "$OUT/steps/pgd.json"

  # d. one whole audit; the script stops the run itself first, so the timeline is read back
  left=$(( budget - ($(date +%s) - start) - 40 ))
  e2e_timeout=$(( left < 175 ? left : 175 ))
  [ "$e2e_timeout" -lt 10 ] && e2e_timeout=10
  step e2e 190 "$PY" benchmarks/gpu/e2e.py --device "$device" $small_flag \
    --timeout-s "$e2e_timeout" --json "$OUT/steps/e2e.json"

  # e. one JSON for everything
  "$PY" benchmarks/gpu/collect.py "$OUT" --device "$device" $small_flag \
    --seconds "$(( $(date +%s) - start ))"
}

main 2>&1 | tee -a "$OUT/gpu-check.log"
rc=${PIPESTATUS[0]}
echo "gpu check: $OUT/gpu-check.json"
exit "$rc"
