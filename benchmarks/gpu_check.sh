#!/usr/bin/env bash
# Everything a GPU machine should run, in one command:
#
#   benchmarks/gpu_check.sh OUTDIR
#
# 1. builds the extension for the visible GPU (pip install --no-build-isolation --no-deps
#    -e ., RESATTN_BUILD_CUDA=1, TORCH_CUDA_ARCH_LIST = the GPU's)   -> OUTDIR/build.log
# 2. resattn info (and checks the CUDA kernels are registered)       -> OUTDIR/info.txt
# 3. python -m pytest -m gpu                                  -> OUTDIR/tests.log, junit.xml
# 4. python benchmarks/run.py --suite all --device cuda --out OUTDIR
#                                      -> OUTDIR/results.csv, report.md, *.png, bench.log
# and prints a short summary as its last lines (GPU, tests passed/failed, headline
# speedups from OUTDIR/results.csv), also written to OUTDIR/summary.txt. Needs no network (torch and Triton preinstalled).
# Exit status: 0 if every step passed; 1 if a test failed or the build, the kernel
# registration or the benchmark failed; 2 on usage errors or when no GPU is visible.
# Budget: under 9 minutes on one H100 (each step is time-bounded; see the *_TIMEOUT
# variables, in seconds).
set -uo pipefail

if [[ $# -ne 1 || "$1" == -* ]]; then
  echo "usage: benchmarks/gpu_check.sh OUTDIR" >&2
  exit 2
fi
mkdir -p "$1" || exit 2
OUT=$(cd "$1" && pwd)
cd "$(dirname "$0")/.." || exit 2
ROOT=$(pwd)
PY=${PYTHON:-python}
START=$(date +%s)
TOTAL_BUDGET=${GPU_CHECK_BUDGET:-530}   # seconds for all steps together (9 min = 540)
BUILD_TIMEOUT=${BUILD_TIMEOUT:-200}
TESTS_TIMEOUT=${TESTS_TIMEOUT:-300}

elapsed() { echo $(( $(date +%s) - START )); }
log() { echo "[gpu_check $(elapsed)s] $*"; }
left() { echo $(( TOTAL_BUDGET - $(elapsed) )); }

build_status="not run"; info_status="not run"; tests_status="not run"; bench_status="not run"
tests_summary=""
failed=0

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: no CUDA GPU visible to $PY (torch.cuda.is_available() is False)" >&2
  exit 2
fi
GPU_NAME=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0))")
GPU_ARCH=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))")
VERSIONS=$("$PY" -c "
import torch
try:
    import triton; t = triton.__version__
except Exception as e:
    t = 'missing'
print(f'torch {torch.__version__} (CUDA {torch.version.cuda}), triton {t}')")
log "GPU: $GPU_NAME (sm_${GPU_ARCH/./}); $VERSIONS; output in $OUT"

# ------------------------------------------------------------------------ 1. build
export RESATTN_BUILD_CUDA=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$GPU_ARCH}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
if [[ -z "${CUDA_HOME:-}" && -x /usr/local/cuda/bin/nvcc ]]; then
  export CUDA_HOME=/usr/local/cuda   # never the directory of an nvcc wrapper script
fi
log "building (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS, CUDA_HOME=${CUDA_HOME:-unset})"
t0=$(date +%s)
timeout "$BUILD_TIMEOUT" "$PY" -m pip install -v --no-index --no-build-isolation --no-deps -e . \
  > "$OUT/build.log" 2>&1
rc=$?
build_time=$(( $(date +%s) - t0 ))
if [[ $rc -eq 0 ]]; then
  build_status="ok (${build_time}s)"
else
  # pip itself can fail for reasons outside this package on an offline machine (e.g. an
  # old setuptools without bdist_wheel and no `wheel` package to fetch): then build the
  # same extension in place, which tests and benchmarks import from the checkout.
  tail -n 30 "$OUT/build.log"
  log "pip install failed (exit $rc); trying: python setup.py build_ext --inplace"
  echo "=== fallback: $PY setup.py build_ext --inplace ===" >> "$OUT/build.log"
  timeout "$BUILD_TIMEOUT" "$PY" setup.py build_ext --inplace >> "$OUT/build.log" 2>&1
  rc2=$?
  build_time=$(( $(date +%s) - t0 ))
  if [[ $rc2 -eq 0 ]]; then
    build_status="ok via setup.py build_ext --inplace (${build_time}s; pip install -e failed with exit $rc, see build.log)"
  else
    build_status="FAILED (pip exit $rc, build_ext --inplace exit $rc2, ${build_time}s; see build.log)"
    failed=1
    tail -n 30 "$OUT/build.log"
  fi
fi
log "build: $build_status"

# ------------------------------------------------------------------------- 2. info
# The console script of this interpreter's environment (pip just installed it), else -m.
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
  failed=1
elif "$PY" - >> "$OUT/info.txt" 2>&1 <<'PY'
import sys
import resattn_fast
info = resattn_fast.build_info()
print("build_info:", info)
sys.exit(0 if info.get("loaded") and info.get("cuda_kernels") else 1)
PY
then
  info_status="ok (CUDA kernels registered)"
else
  info_status="FAILED (the CUDA kernels are not registered; see info.txt)"
  failed=1
fi
log "info: $info_status"

# ------------------------------------------------------------------------ 3. tests
log "running the gpu tests (timeout ${TESTS_TIMEOUT}s)"
t0=$(date +%s)
timeout "$TESTS_TIMEOUT" "$PY" -m pytest -m gpu -q -p no:cacheprovider \
  --junitxml="$OUT/junit.xml" -o junit_family=xunit2 tests 2>&1 | tee "$OUT/tests.log" | tail -n 25
rc=${PIPESTATUS[0]}
tests_time=$(( $(date +%s) - t0 ))
tests_summary=$("$PY" - "$OUT/junit.xml" <<'PY' 2>/dev/null
import sys
import xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
print(f"{passed} passed, {n['failures'] + n['errors']} failed, {n['skipped']} skipped")
PY
)
if [[ $rc -eq 0 ]]; then
  tests_status="ok: ${tests_summary:-see tests.log} (${tests_time}s)"
elif [[ $rc -eq 124 ]]; then
  tests_status="TIMED OUT after ${TESTS_TIMEOUT}s (${tests_summary:-no junit.xml}; see tests.log)"
  failed=1
else
  tests_status="FAILED: ${tests_summary:-pytest exit $rc} (${tests_time}s; see tests.log)"
  failed=1
fi
log "tests: $tests_status"

# ------------------------------------------------------------------------ 4. bench
bench_left=$(left)
if [[ ! -f benchmarks/run.py ]]; then
  bench_status="MISSING (benchmarks/run.py not found)"
  failed=1
elif (( bench_left < 60 )); then
  bench_status="NOT RUN (only ${bench_left}s of the budget left)"
  failed=1
else
  log "running the benchmark suite (timeout ${bench_left}s)"
  t0=$(date +%s)
  timeout "$bench_left" "$PY" benchmarks/run.py --suite all --device cuda --out "$OUT" \
    > "$OUT/bench.log" 2>&1
  rc=$?
  bench_time=$(( $(date +%s) - t0 ))
  if [[ $rc -eq 0 ]]; then
    bench_status="ok (${bench_time}s)"
  elif [[ $rc -eq 124 ]]; then
    bench_status="TIMED OUT after ${bench_left}s (see bench.log)"
    failed=1
  else
    bench_status="FAILED (exit $rc after ${bench_time}s; see bench.log)"
    failed=1
  fi
  tail -n 20 "$OUT/bench.log"
fi
log "bench: $bench_status"

# ---------------------------------------------------------------------- summary
speedups=$("$PY" - "$OUT/results.csv" <<'PY' 2>/dev/null
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
lines = []
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
print("\n".join(lines[:12]) if lines else "  (no fused-op rows in results.csv)")
PY
)
echo
{
  echo "================ gpu_check summary ================"
  echo "GPU:      $GPU_NAME (sm_${GPU_ARCH/./}); $VERSIONS"
  echo "build:    $build_status"
  echo "info:     $info_status"
  echo "tests:    $tests_status"
  echo "bench:    $bench_status"
  echo "speedups:"
  echo "${speedups:-  (could not read $OUT/results.csv)}"
  echo "outputs:  $OUT (summary.txt, build.log, info.txt, tests.log, junit.xml, bench.log, results.csv, report.md, *.png)"
  echo "total:    $(elapsed)s; result: $([[ $failed -eq 0 ]] && echo PASS || echo FAIL)"
} | tee "$OUT/summary.txt"
cd "$ROOT" || true
exit "$failed"
