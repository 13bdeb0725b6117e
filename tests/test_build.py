"""What the build produced, checked without a GPU (runs in CI).

- When the extension was built with the CUDA kernels (RESATTN_BUILD_CUDA=1 or auto with
  nvcc), the dispatcher has a CUDA kernel for all four ops.
- ``resattn info`` runs and reports the extension.
- CMakeLists.txt configures (CPU-only and, where nvcc is installed, with CUDA).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from packaging.version import Version

import resattn_fast

ROOT = Path(__file__).resolve().parents[1]
OPS = ("upsample_bilinear_add", "upsample_bilinear_add_backward", "attention_residual",
       "attention_residual_backward")


def _info() -> dict:
    info = resattn_fast.build_info()
    if not info["loaded"]:
        pytest.skip(f"resattn_fast._C is not loaded ({info['error']})")
    return info


def test_build_info_keys():
    info = _info()
    for key in ("built_with_cuda", "cuda_archs", "cuda_version", "torch_version", "cpu_kernels",
                "cuda_kernels"):
        assert key in info, key
    # The extension must run with the torch it was compiled against.
    assert Version(info["torch_version"]).release[:2] == Version(torch.__version__).release[:2]


def test_cuda_kernels_registered_when_built_with_cuda():
    info = _info()
    if not info["built_with_cuda"]:
        pytest.skip("the extension was built without CUDA kernels (RESATTN_BUILD_CUDA=0, or auto "
                    "without nvcc); rebuild with RESATTN_BUILD_CUDA=1 to check them")
    missing = [op for op in OPS
               if not torch._C._dispatch_has_kernel_for_dispatch_key(f"resattn_fast::{op}", "CUDA")]
    assert not missing, f"built with CUDA but no CUDA kernel registered for {missing}"
    assert info["cuda_kernels"]
    assert info["cuda_archs"], "built with CUDA but no architecture recorded"
    for arch in re.split(r"[;\s]+", info["cuda_archs"].strip()):
        assert re.fullmatch(r"\d+\.\d+a?(\+PTX)?", arch), f"odd architecture {arch!r} in {info}"


def test_resattn_info_runs():
    proc = subprocess.run([sys.executable, "-m", "resattn_fast", "info"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"resattn_fast {resattn_fast.__version__}" in proc.stdout
    if resattn_fast.build_info()["loaded"]:
        assert "extension    resattn_fast._C loaded" in proc.stdout
        assert "cuda kernels" in proc.stdout


def test_setup_and_cmake_compile_the_same_sources():
    """setup.py and CMakeLists.txt glob the same source sets (a new file goes into both)."""
    setup_py = (ROOT / "setup.py").read_text()
    cmake = (ROOT / "CMakeLists.txt").read_text()
    for pattern in ("csrc/*.cpp", "csrc/cpu/*.cpp", "kernels/*.cu"):
        assert f'"{pattern}"' in setup_py, f"setup.py does not compile {pattern}"
        assert f'${{PROJECT_SOURCE_DIR}}/{pattern}"' in cmake, f"CMakeLists.txt does not compile {pattern}"


def _cmake() -> str:
    cmake = shutil.which("cmake")
    if cmake is None or shutil.which("ninja") is None:
        pytest.skip("cmake and ninja are needed (pip install 'cmake>=3.30' ninja)")
    out = subprocess.run([cmake, "--version"], capture_output=True, text=True).stdout
    version = Version(out.split()[2])
    if version < Version("3.26"):
        pytest.skip(f"CMakeLists.txt needs CMake >= 3.26, found {version}")
    return cmake


def _configure(tmp_path: Path, *flags: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RESATTN_BUILD_CUDA"}
    return subprocess.run(
        [_cmake(), "-S", str(ROOT), "-B", str(tmp_path / "build-cmake"), "-G", "Ninja",
         f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
         f"-DPython3_EXECUTABLE={sys.executable}", *flags],
        capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.slow
def test_cmake_configures_cpu_only(tmp_path):
    proc = _configure(tmp_path, "-DRESATTN_WITH_CUDA=OFF")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resattn_fast: CUDA kernels OFF" in proc.stdout


@pytest.mark.slow
def test_cmake_configures_with_cuda(tmp_path):
    nvcc = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc"
    if torch.version.cuda is None or not nvcc.exists():
        pytest.skip("needs nvcc and a CUDA build of torch")
    proc = _configure(tmp_path, "-DRESATTN_WITH_CUDA=ON")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resattn_fast: CUDA kernels ON" in proc.stdout
