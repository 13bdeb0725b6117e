"""What the sanitizer runs of the emulated CUDA kernels share (test_cuda_emulation_asan.py,
test_cuda_emulation_tsan.py): finding the compiler's runtime library to preload, the
environment of the child Python that loads the sanitizer build, and running it."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, Sequence

import pytest

ROOT = Path(__file__).resolve().parents[1]


def runtime(name: str) -> str:
    """The path of a compiler runtime library (e.g. libasan.so), or "" if not found."""
    for cc in ("g++", "gcc", "c++", "cc"):
        if shutil.which(cc):
            path = subprocess.run([cc, f"-print-file-name={name}"], capture_output=True,
                                  text=True).stdout.strip()
            if os.path.isabs(path) and os.path.exists(path):
                return path
    return ""


def child_env(kind: str, libraries: Sequence[str], extra: Dict[str, str]) -> Dict[str, str]:
    """The environment of a child Python that runs the emulated kernels of the ``kind``
    ("asan" or "tsan") build with ``libraries`` preloaded, plus ``extra``. Skips when the
    build or a library is missing; fails instead under RESATTN_REQUIRE_<KIND>=1."""
    flag = kind.upper()
    paths = [runtime(lib) for lib in libraries]
    why = None
    if importlib.util.find_spec(f"resattn_fast._C_cuda_emulated_{kind}") is None:
        why = (f"the {kind} build of the emulated CUDA kernels is missing (build with "
               f"RESATTN_BUILD_CUDA_EMULATION=1 RESATTN_BUILD_CUDA_EMULATION_{flag}=1)")
    elif not all(paths):
        why = f"{' or '.join(libraries)} was not found (g++ -print-file-name=...)"
    if why:
        if os.environ.get(f"RESATTN_REQUIRE_{flag}") == "1":
            pytest.fail(f"RESATTN_REQUIRE_{flag}=1 but {why}")
        pytest.skip(why)
    env = dict(os.environ)
    env.update({
        "LD_PRELOAD": " ".join(paths),
        "RESATTN_CUDA_EMULATION": kind,
        "RESATTN_REQUIRE_BACKENDS": "cuda",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
    })
    env.update(extra)
    return env


def python(code: str, env: Dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``code`` in a child Python with ``env`` from the repository root."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)
