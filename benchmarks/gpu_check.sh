#!/usr/bin/env bash
# Everything a GPU machine should run, in one command, most valuable results first:
#
#   benchmarks/gpu_check.sh OUTDIR
#
#   1. build: pip install --no-build-isolation --no-deps -e . for the visible GPU's
#      architecture (CUDA kernels when nvcc exists; otherwise the Triton half alone is
#      checked and the summary says so)                                -> build.log
#   2. info: resattn info, and the CUDA kernels are registered            -> info.txt
#   3. correctness: every kernel of both GPU backends against the float64 reference at the
#      headline (stage-1) shapes, forward and backward, plus opcheck/torch.compile
#                                                       -> correctness.log, correctness.xml
#   4. headline benchmarks: run.py --suite ops --quick   -> headline/results.csv, report.md
#   5. the rest of the GPU tests (pytest -m gpu)           -> tests.log, junit.xml
#   6. the full benchmark suite: run.py --suite all     -> results.csv, report.md, *.png
#   7. roofline calibration against the measured suite   -> roofline/ (never fails the check)
#
# Each step gets what is left of the budget (minus a reserve for the steps still to come)
# and reports what it did not reach; pytest is stopped with SIGINT so it still writes its
# counts, the benchmark suite gets --budget-* so it records the rows it skips. Prints a
# short summary as its last lines (also OUTDIR/summary.txt). Needs no network: torch,
# Triton and (for the CUDA kernels) nvcc preinstalled; runs the first of $PYTHON, python3,
# python. Autotune results are cached on disk (TRITON_CACHE_AUTOTUNING=1) and kernels by
# Triton, so each step reuses what an earlier one compiled and tuned.
#
# Exit status and last line ("result: ..."), three outcomes told apart:
#   0  PASS        every step ran to its end and passed
#   1  FAIL        a step failed (build, info, a test, a benchmark run; the roofline never
#                  fails the check), whatever else was or was not run
#   3  INCOMPLETE  nothing failed, but something was not run: a step not reached or stopped
#                  by the budget, benchmark rows left out for time (the line names them)
#   2  usage errors, or no GPU visible.
# Budget: 9 minutes (GPU_CHECK_BUDGET=530 s for all steps; each *_TIMEOUT caps its step).
set -uo pipefail

if [[ $# -ne 1 || "$1" == -* ]]; then
  echo "usage: benchmarks/gpu_check.sh OUTDIR" >&2
  exit 2
fi
mkdir -p "$1" || exit 2
OUT=$(cd "$1" && pwd)
cd "$(dirname "$0")/.." || exit 2
ROOT=$(pwd)

PY=${PYTHON:-}
if [[ -z "$PY" ]]; then
  for cand in python3 python; do
    if command -v "$cand" > /dev/null 2>&1; then PY=$cand; break; fi
  done
fi
if [[ -z "$PY" ]] || ! command -v "$PY" > /dev/null 2>&1; then
  echo "gpu_check: no Python interpreter found (tried \$PYTHON, python3, python)" >&2
  exit 2
fi

START=$(date +%s)
TOTAL_BUDGET=${GPU_CHECK_BUDGET:-530}      # seconds for all steps together (9 min = 540)
BUILD_TIMEOUT=${BUILD_TIMEOUT:-170}
CORRECT_TIMEOUT=${CORRECT_TIMEOUT:-110}
HEADLINE_TIMEOUT=${HEADLINE_TIMEOUT:-80}
TESTS_TIMEOUT=${TESTS_TIMEOUT:-150}
ROOFLINE_TIMEOUT=${ROOFLINE_TIMEOUT:-60}

elapsed() { echo $(( $(date +%s) - START )); }
log() { echo "[gpu_check $(elapsed)s] $*"; }
left() { echo $(( TOTAL_BUDGET - $(elapsed) )); }
# Seconds for a step: min(cap, what is left minus a reserve for the later steps it must
# not crowd out), never below 0. The essential steps (build, correctness, headline) reserve
# only for each other; the later ones for what follows them.
slot() { local cap=$1 reserve=$2 l; l=$(( $(left) - reserve )); l=$(( l < cap ? l : cap )); echo $(( l > 0 ? l : 0 )); }

failed=0
failures=()     # "step" for each step that failed
not_run=()      # "step: what did not run" for each step cut short or never started
fail() { failed=1; failures+=("$1"); }
incomplete() { not_run+=("$1"); }
build_status="not reached"; info_status="not reached"; correct_status="not reached"
headline_status="not reached"; tests_status="not reached"; bench_status="not reached"
roofline_status="not reached"

gpu_ok=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>&1)
if [[ "$gpu_ok" != "1" ]]; then
  echo "gpu_check: no CUDA GPU visible to $PY (torch.cuda.is_available() is not True): $gpu_ok" >&2
  exit 2
fi
GPU_NAME=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0))")
GPU_ARCH=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))")
VERSIONS=$("$PY" -c "
import sys, torch
try:
    import triton; t = triton.__version__
except Exception:
    t = 'missing'
print(f'Python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), triton {t}')")
log "GPU: $GPU_NAME (sm_${GPU_ARCH/./}); $VERSIONS; $PY; output in $OUT"
export TRITON_CACHE_AUTOTUNING=1

# pytest under a deadline: SIGINT first (pytest then still reports and writes its junit
# file), SIGKILL 20 s later. Prints "<rc> <passed> <failed> <skipped>" from the junit file.
run_pytest() {  # run_pytest SECONDS JUNIT LOG pytest-args...
  local secs=$1 junit=$2 logf=$3; shift 3
  timeout -s INT -k 20 "$secs" "$PY" -m pytest -q -p no:cacheprovider \
    --junitxml="$junit" -o junit_family=xunit2 "$@" > "$logf" 2>&1
  local rc=$?
  tail -n 15 "$logf" >&2
  local counts
  counts=$("$PY" - "$junit" <<'PY' 2>/dev/null
import sys
import xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
print(n["tests"] - n["failures"] - n["errors"] - n["skipped"], n["failures"] + n["errors"], n["skipped"])
PY
)
  echo "$rc ${counts:-0 0 0}"
}

# ------------------------------------------------------------------------ 1. build
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$GPU_ARCH}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
if [[ -z "${CUDA_HOME:-}" && -x /usr/local/cuda/bin/nvcc ]]; then
  export CUDA_HOME=/usr/local/cuda   # never the directory of an nvcc wrapper script
fi
if [[ -n "${CUDA_HOME:-}" && -x "$CUDA_HOME/bin/nvcc" ]] || command -v nvcc > /dev/null 2>&1; then
  export RESATTN_BUILD_CUDA=${RESATTN_BUILD_CUDA:-1}
  with_cuda=1
else
  export RESATTN_BUILD_CUDA=0
  with_cuda=0
  log "no nvcc here (CUDA_HOME, /usr/local/cuda, PATH): CPU kernels only; the Triton half is checked alone"
fi
t=$(slot "$BUILD_TIMEOUT" 100)
log "building (RESATTN_BUILD_CUDA=$RESATTN_BUILD_CUDA, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS; ${t}s)"
t0=$(date +%s)
if (( t < 10 )); then
  echo "not started: ${t}s of the budget left" > "$OUT/build.log"
  rc=124
else
  timeout "$t" "$PY" -m pip install -v --no-index --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1
  rc=$?
fi
if [[ $rc -ne 0 && $rc -ne 124 ]]; then
  # pip itself can fail for reasons outside this package on an offline machine (e.g. an
  # old setuptools without bdist_wheel): build the same extension in place instead, which
  # the tests and benchmarks import from the checkout.
  log "pip install failed (exit $rc); trying: $PY setup.py build_ext --inplace"
  echo "=== fallback: $PY setup.py build_ext --inplace ===" >> "$OUT/build.log"
  timeout "$(slot "$BUILD_TIMEOUT" 100)" "$PY" setup.py build_ext --inplace >> "$OUT/build.log" 2>&1
  rc=$?
fi
build_time=$(( $(date +%s) - t0 ))
if [[ $rc -eq 0 ]]; then
  build_status="ok (${build_time}s$([[ $with_cuda -eq 0 ]] && echo '; CPU kernels only: no nvcc'))"
else
  build_status="FAILED (exit $rc$([[ $rc -eq 124 ]] && echo ': timed out'), ${build_time}s; see build.log)"
  fail build
  tail -n 30 "$OUT/build.log"
fi
log "build: $build_status"

# ------------------------------------------------------------------------- 2. info
PYBIN=$("$PY" -c "import os, sys; print(os.path.dirname(sys.executable))")
if [[ -x "$PYBIN/resattn" ]]; then
  "$PYBIN/resattn" info > "$OUT/info.txt" 2>&1
else
  "$PY" -m resattn_fast info > "$OUT/info.txt" 2>&1
fi
rc=$?
cat "$OUT/info.txt"
if [[ $rc -ne 0 ]]; then
  info_status="FAILED (resattn info exit $rc)"
  fail info
elif "$PY" - "$with_cuda" >> "$OUT/info.txt" 2>&1 <<'PY'
import sys
import resattn_fast
from resattn_fast.ops import available_backends
info = resattn_fast.build_info()
print("build_info:", info, "| backends on cuda:", available_backends("cuda"))
want_cuda = sys.argv[1] == "1"
ok = "triton" in available_backends("cuda") and (not want_cuda or (info.get("loaded") and info.get("cuda_kernels")))
sys.exit(0 if ok else 1)
PY
then
  info_status="ok ($([[ $with_cuda -eq 1 ]] && echo 'CUDA kernels registered' || echo 'no CUDA kernels: no nvcc'); Triton available)"
else
  info_status="FAILED (a GPU backend is missing; see info.txt)"
  fail info
fi
log "info: $info_status"

# ----------------------------------------------------------------- 3. correctness
# Every kernel (upsample fwd/bwd, attention fwd/bwd) of both GPU backends at the stage-1
# shapes in float32/bfloat16, NCHW/channels_last; the registrations (opcheck) and a
# torch.compile(fullgraph) trace of the mask branch.
CORRECT_K="stage1_full_size or opcheck or compile_fullgraph or cuda_kernels_registered"
t=$(slot "$CORRECT_TIMEOUT" 50)
if (( t < 30 )); then
  correct_status="NOT REACHED (${t}s left for it)"
  incomplete "correctness (not reached)"
else
  log "correctness pass at the headline shapes (${t}s)"
  t0=$(date +%s)
  read -r rc np nf ns < <(run_pytest "$t" "$OUT/correctness.xml" "$OUT/correctness.log" -m gpu -k "$CORRECT_K" tests)
  dt=$(( $(date +%s) - t0 ))
  if [[ $rc -eq 0 ]]; then
    correct_status="ok: $np passed, $ns skipped (${dt}s)"
  elif [[ $rc -eq 124 ]]; then
    correct_status="TIMED OUT after ${t}s: $np passed, $nf failed before it; the rest not reached (see correctness.log)"
    if (( nf > 0 )); then fail correctness; else incomplete "correctness (stopped at ${t}s after $np tests)"; fi
  else
    correct_status="FAILED: $np passed, $nf failed, $ns skipped (pytest exit $rc, ${dt}s; see correctness.log)"
    fail correctness
  fi
fi
log "correctness: $correct_status"

# ----------------------------------------------------------- 4. headline benchmarks
t=$(slot "$HEADLINE_TIMEOUT" 0)
if (( t < 30 )); then
  headline_status="NOT REACHED (${t}s left for it)"
  incomplete "headline benchmarks (not reached)"
else
  log "headline benchmarks (${t}s)"
  t0=$(date +%s)
  timeout -k 10 "$t" "$PY" benchmarks/run.py --suite ops --device cuda --quick \
    --budget-ops $(( t - 25 )) --out "$OUT/headline" > "$OUT/headline.log" 2>&1
  rc=$?
  dt=$(( $(date +%s) - t0 ))
  if [[ $rc -eq 0 ]]; then
    headline_status="ok (${dt}s; headline/report.md)"
  elif [[ $rc -eq 124 ]]; then
    headline_status="TIMED OUT after ${t}s (see headline.log)"
    incomplete "headline benchmarks (stopped at ${t}s)"
  else
    headline_status="FAILED (exit $rc after ${dt}s; see headline.log)"
    fail "headline benchmarks"
  fi
  tail -n 10 "$OUT/headline.log"
fi
log "headline benchmarks: $headline_status"

# ------------------------------------------------------------ 5. the other GPU tests
t=$(slot "$TESTS_TIMEOUT" 100)
if (( t < 30 )); then
  tests_status="not reached (${t}s left for it)"
  incomplete "GPU tests (not reached)"
else
  log "the other GPU tests (${t}s)"
  t0=$(date +%s)
  read -r rc np nf ns < <(run_pytest "$t" "$OUT/junit.xml" "$OUT/tests.log" -m gpu -k "not ($CORRECT_K)" tests)
  dt=$(( $(date +%s) - t0 ))
  if [[ $rc -eq 0 ]]; then
    tests_status="ok: $np passed, $ns skipped (${dt}s)"
  elif [[ $rc -eq 124 ]]; then
    tests_status="INCOMPLETE: stopped at the ${t}s limit with $np passed, $nf failed, $ns skipped; the rest not reached (see tests.log)"
    if (( nf > 0 )); then fail "GPU tests"; fi
    incomplete "GPU tests (stopped at ${t}s after $np passed, $nf failed)"
  else
    tests_status="FAILED: $np passed, $nf failed, $ns skipped (pytest exit $rc, ${dt}s; see tests.log)"
    fail "GPU tests"
  fi
fi
log "tests: $tests_status"

# -------------------------------------------------------- 6. full benchmark suite
t=$(slot 100000 "$(( ROOFLINE_TIMEOUT / 2 ))")
if (( t < 60 )); then
  bench_status="not reached (${t}s left for it)"
  incomplete "benchmark suite (not reached)"
else
  # The suite's own budgets stop it in time and record the rows it skips (skipped.csv).
  ops_b=$(( (t - 30) * 2 / 5 )); models_b=$(( (t - 30) * 3 / 5 ))
  log "full benchmark suite (${t}s: ops ${ops_b}s, models ${models_b}s)"
  t0=$(date +%s)
  timeout -k 10 "$t" "$PY" benchmarks/run.py --suite all --device cuda \
    --budget-ops "$ops_b" --budget-models "$models_b" --out "$OUT" > "$OUT/bench.log" 2>&1
  rc=$?
  dt=$(( $(date +%s) - t0 ))
  nskip=$( [[ -f "$OUT/skipped.csv" ]] && echo $(( $(wc -l < "$OUT/skipped.csv") - 1 )) || echo "?")
  # Rows the suite's budget cut (skipped.csv says "time budget"), unlike rows left out
  # because a backend is not available here or by the run's plan.
  ntime=0
  [[ -f "$OUT/skipped.csv" ]] && ntime=$(grep -c "time budget" "$OUT/skipped.csv")
  if [[ $rc -eq 0 ]]; then
    bench_status="ok (${dt}s; rows left out: $nskip, $ntime of them for time, see skipped.csv)"
    (( ntime > 0 )) && incomplete "benchmark suite ($ntime rows left out for time)"
  elif [[ $rc -eq 124 ]]; then
    bench_status="INCOMPLETE: stopped at the ${t}s limit (see bench.log)"
    incomplete "benchmark suite (stopped at ${t}s)"
  else
    bench_status="FAILED (exit $rc after ${dt}s; see bench.log)"
    fail "benchmark suite"
  fi
  tail -n 10 "$OUT/bench.log"
fi
log "bench: $bench_status"

# ------------------------------------------------------------ 7. roofline calibration
# ---- roofline: calibrate the predicted training step against the measured suite. Only
# ---- when the suite wrote results.csv and time is left; never fails the check.
t=$(slot "$ROOFLINE_TIMEOUT" 0)
if [[ ! -f "$OUT/results.csv" ]]; then
  roofline_status="not reached (no measured results.csv)"
  incomplete "roofline (not reached)"
elif (( t < 20 )); then
  roofline_status="not reached (${t}s left for it)"
  incomplete "roofline (not reached)"
else
  log "roofline calibration (${t}s)"
  t0=$(date +%s)
  timeout -k 10 "$t" "$PY" benchmarks/run.py --suite roofline --gpu auto \
    --measured "$OUT/results.csv" --out "$OUT/roofline" > "$OUT/roofline.log" 2>&1
  rc=$?
  dt=$(( $(date +%s) - t0 ))
  if [[ $rc -eq 0 ]]; then
    roofline_status="ok (${dt}s; roofline/)"
  elif [[ $rc -eq 124 ]]; then
    roofline_status="not finished: stopped at the ${t}s limit (see roofline.log)"
    incomplete "roofline (stopped at ${t}s)"
  else
    roofline_status="failed (exit $rc after ${dt}s; see roofline.log)"
  fi
  tail -n 5 "$OUT/roofline.log"
fi
log "roofline: $roofline_status"
# ---- end roofline

# ---------------------------------------------------------------------- summary
RESULTS="$OUT/results.csv"
[[ -f "$RESULTS" ]] || RESULTS="$OUT/headline/results.csv"
speedups=$("$PY" - "$RESULTS" <<'PY' 2>/dev/null
"""Headline lines from results.csv (long format: suite,name,impl,backend,mode,dtype,
layout,shape,metric,unit,median,...): for each fused op at its largest bfloat16
channels_last shape, the fused GPU backends' time vs eager and vs torch.compile, and the
fraction of copy bandwidth reached."""
import csv
import math
import os
import re
import sys
from collections import defaultdict

path = sys.argv[1]
if not os.path.exists(path):
    print("  (no results.csv)")
    sys.exit(0)
rows = [r for r in csv.DictReader(open(path)) if r.get("suite") == "ops"]
def numel(shape):
    # "NxCxHxW", or "NxCxhxw>HxW[+skip]" for the upsample: the output's element count.
    dims = [int(v) for v in re.findall(r"\d+", shape)]
    if ">" in shape and len(dims) == 6:
        dims = dims[:2] + dims[4:]
    return math.prod(dims) if dims else 0
lines = [f"  (from {path})"]
for op in ("upsample_bilinear_add", "attention_residual"):
    cand = [r for r in rows if r["name"] == op and r["metric"] == "time"]
    pick = [r for r in cand if r["dtype"] == "bfloat16" and r["layout"] == "channels_last"] or cand
    if not pick:
        continue
    shape = max((r["shape"] for r in pick), key=numel)
    t = defaultdict(dict)
    for r in pick:
        if r["shape"] == shape:
            t[r["mode"]][(r["impl"], r["backend"])] = float(r["median"])
    ratio = {(r["mode"], r["backend"]): float(r["median"]) for r in rows
             if r["name"] == op and r["shape"] == shape and r["metric"] == "bw_vs_copy"
             and r["impl"] == "fused" and r["dtype"] == pick[0]["dtype"]
             and r["layout"] == pick[0]["layout"]}
    for mode, times in sorted(t.items()):
        eager = next((v for (i, _b), v in times.items() if i == "eager"), None)
        comp = next((v for (i, _b), v in times.items() if i == "compile"), None)
        for (impl, backend), v in sorted(times.items()):
            if impl != "fused" or v <= 0:
                continue
            parts = [f"{op} {mode} [{backend}] {pick[0]['dtype']} {pick[0]['layout']} {shape}: {v:.3f} ms"]
            if eager:
                parts.append(f"{eager / v:.2f}x eager")
            if comp:
                parts.append(f"{comp / v:.2f}x compile")
            if (mode, backend) in ratio:
                parts.append(f"{100 * ratio[(mode, backend)]:.0f}% of copy bandwidth")
            lines.append("  " + ", ".join(parts))
print("\n".join(lines[:13]) if len(lines) > 1 else "  (no fused-op rows in results.csv)")
PY
)
join() { local IFS=";"; echo "$*" | sed 's/;/; /g'; }
if (( failed )); then
  status=1; verdict="FAIL: $(join "${failures[@]}")"
  (( ${#not_run[@]} )) && verdict+=" (also not run: $(join "${not_run[@]}"))"
elif (( ${#not_run[@]} )); then
  status=3; verdict="INCOMPLETE: not run: $(join "${not_run[@]}")"
else
  status=0; verdict="PASS (every step ran and passed)"
fi
echo
{
  echo "================ gpu_check summary ================"
  echo "GPU:         $GPU_NAME (sm_${GPU_ARCH/./}); $VERSIONS"
  echo "build:       $build_status"
  echo "info:        $info_status"
  echo "correctness: $correct_status"
  echo "headline:    $headline_status"
  echo "tests:       $tests_status"
  echo "bench:       $bench_status"
  echo "roofline:    $roofline_status"
  echo "speedups:"
  echo "${speedups:-  (could not read $RESULTS)}"
  echo "outputs:     $OUT (summary.txt, build.log, info.txt, correctness.log, headline/, tests.log, junit.xml, bench.log, results.csv, report.md, *.png, roofline/)"
  echo "total:       $(elapsed)s of ${TOTAL_BUDGET}s"
  echo "result: $verdict"
} | tee "$OUT/summary.txt"
cd "$ROOT" || true
exit "$status"
