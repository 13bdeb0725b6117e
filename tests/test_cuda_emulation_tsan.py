"""Racecheck on the CPU: the emulated CUDA kernels built with ThreadSanitizer run the
backend-"cuda" cases in a subprocess with libtsan preloaded. The emulation runs the threads
of a block concurrently and makes every barrier (__syncthreads, the warp exchanges) a
mutex/condition-variable handshake that TSan understands, so two threads of a block that
touch the same shared (or global) memory without a barrier between them are reported as a
data race — the class of bug that compute-sanitizer's racecheck finds on a GPU. A kernel
planted with such a race is reported; the real kernels run clean.

Needs the module built with RESATTN_BUILD_CUDA_EMULATION=1 RESATTN_BUILD_CUDA_EMULATION_TSAN=1
(CI does; skipped otherwise, a failure when RESATTN_REQUIRE_TSAN=1).
"""

from __future__ import annotations

import re
import subprocess
import sys
from typing import Dict, List

import pytest
from _sanitizer import ROOT, child_env, python

# The emulated cases to run under TSan (the -k filter picks backend "cuda" in the batteries).
BATTERIES = ["tests/test_cuda_emulation_batch_norm.py", "tests/test_attention_residual.py",
             "tests/test_upsample_bilinear_add.py"]
TSAN_EXIT = 66


def _tsan_env() -> Dict[str, str]:
    return child_env("tsan", ("libtsan.so",), {
        # Reports only from instrumented code (the emulated kernels and the emulation): torch
        # and Python are not instrumented, so their own synchronisation is invisible to TSan.
        "TSAN_OPTIONS": f"exitcode={TSAN_EXIT}:halt_on_error=0:report_signal_unsafe=0:"
                        "ignore_noninstrumented_modules=1:history_size=4",
        # One intra-op thread: torch's OpenMP workers synchronise through libgomp, which TSan
        # cannot see; the kernels' own threads are the emulation's.
        "OMP_NUM_THREADS": "1",
        "RESATTN_EXPECT_EMULATION_SANITIZER": "thread",
    })


def _python(code: str, env: Dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    return python(code, env, timeout)


def _races(stderr: str) -> List[str]:
    return [kind.strip() for kind in re.findall(r"WARNING: ThreadSanitizer: ([a-z -]+)", stderr)]


@pytest.mark.slow
def test_planted_shared_memory_race_is_reported():
    env = _tsan_env()
    ok = _python("import resattn_fast as r; E = r._ext.EMULATED; "
                 "assert r.build_info()['cuda_emulation_sanitizer'] == 'thread'; "
                 "t = E.selftest_shared_exchange(2, 64, True); E.selftest_warp_shuffle(2, 64); "
                 "print('clean', t.sum().item())", env)
    assert ok.returncode == 0 and "clean" in ok.stdout, ok.stderr[-3000:]
    assert not _races(ok.stderr), ok.stderr[-3000:]
    bad = _python("import resattn_fast as r; r._ext.EMULATED.selftest_shared_exchange(4, 256, False); "
                  "print('ran')", env)
    assert "data race" in _races(bad.stderr), (bad.returncode, bad.stderr[-3000:])
    assert "shared_exchange_kernel" in bad.stderr, bad.stderr[-3000:]
    assert bad.returncode == TSAN_EXIT, (bad.returncode, bad.stderr[-3000:])


@pytest.mark.slow
def test_emulated_kernels_race_free_under_tsan():
    env = _tsan_env()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cuda or emulat",
         *[b for b in BATTERIES if (ROOT / b).exists()]],
        capture_output=True, text=True, timeout=1800, env=env, cwd=ROOT)
    tail = proc.stdout[-4000:] + proc.stderr[-4000:]
    assert not _races(proc.stderr), tail
    assert proc.returncode == 0, tail
    passed = re.search(r"(\d+) passed", proc.stdout)
    assert passed and int(passed.group(1)) >= 40, tail
