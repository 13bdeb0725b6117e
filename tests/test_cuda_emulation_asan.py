"""Memcheck on the CPU: the emulated CUDA kernels built with AddressSanitizer (and the
alignment check of UBSan) run the backend-"cuda" batteries in a subprocess with libasan
preloaded, so any out-of-bounds access of a tensor or of shared memory, and any misaligned
vector access (a fault on a GPU), fails the run; and a kernel planted with an off-by-one
write is reported.

Needs the module built with RESATTN_BUILD_CUDA_EMULATION=1 RESATTN_BUILD_CUDA_EMULATION_ASAN=1
(CI does; skipped otherwise, a failure when RESATTN_REQUIRE_ASAN=1).
"""

from __future__ import annotations

import re
import subprocess
import sys
from typing import Dict

import pytest
from _sanitizer import ROOT, child_env
from _sanitizer import python as _python

# The backend-"cuda" cases of every per-op battery, plus the emulation's own tests.
BATTERIES = ["tests/test_upsample_bilinear_add.py", "tests/test_attention_residual.py",
             "tests/test_batch_norm_relu.py", "tests/test_cuda_emulation_batch_norm.py",
             "tests/test_modules.py", "tests/test_cuda_emulation.py"]
# The backend-"cuda" cases, less the whole-network runs (three float64 SGD steps of a
# network: minutes under the sanitizer; the unit and module parity tests run instead).
SELECT = "cuda and not model_parity and not model_float32"


def _asan_env() -> Dict[str, str]:
    # libstdc++ too: the sanitizer's __cxa_throw interceptor must find the real one at
    # start-up, or the first C++ exception (Triton's import throws one) aborts Python.
    return child_env("asan", ("libasan.so", "libstdc++.so"), {
        "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0:exitcode=97",
        "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
        "RESATTN_EXPECT_EMULATION_SANITIZER": "address",
    })


@pytest.mark.slow
def test_planted_out_of_bounds_write_is_reported():
    env = _asan_env()
    ok = _python("import resattn_fast as r; t = r._ext.EMULATED.selftest_shared_exchange(2, 64, True); "
                 "assert r.build_info()['cuda_emulation_sanitizer'] == 'address'; print('clean', t.sum().item())",
                 env)
    assert ok.returncode == 0 and "clean" in ok.stdout, ok.stderr[-3000:]
    bad = _python("import resattn_fast as r; r._ext.EMULATED.selftest_out_of_bounds_write(1000); "
                  "print('not caught')", env)
    assert bad.returncode == 97, (bad.returncode, bad.stdout, bad.stderr[-3000:])
    assert "not caught" not in bad.stdout
    assert "ERROR: AddressSanitizer: heap-buffer-overflow" in bad.stderr, bad.stderr[-3000:]
    assert "off_by_one_kernel" in bad.stderr, bad.stderr[-3000:]
    assert re.search(r"0 bytes (after|to the right of) 4000-byte region", bad.stderr), bad.stderr[-3000:]


@pytest.mark.slow
def test_planted_misaligned_vector_read_is_reported():
    """A GPU faults on a 128-bit load from an address that is not 16-byte aligned; the CPU
    would not, so the sanitizer build checks alignment."""
    bad = _python("import resattn_fast as r; r._ext.EMULATED.selftest_misaligned_vector_read(64); "
                  "print('not caught')", _asan_env())
    assert bad.returncode != 0 and "not caught" not in bad.stdout, (bad.returncode, bad.stderr[-3000:])
    assert "misaligned address" in bad.stderr and "unchecked_vector_copy_kernel" in bad.stderr, bad.stderr[-3000:]


@pytest.mark.slow
def test_emulated_batteries_clean_under_asan():
    env = _asan_env()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", SELECT, *BATTERIES],
        capture_output=True, text=True, timeout=1200, env=env, cwd=ROOT)
    tail = proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "AddressSanitizer" not in proc.stderr and "runtime error" not in proc.stderr, tail
    assert proc.returncode == 0, tail
    passed = re.search(r"(\d+) passed", proc.stdout)
    assert passed and int(passed.group(1)) >= 100, tail
