"""Test configuration.

Triton kernels run on the CPU under TRITON_INTERPRET=1, which must be set before Triton is
first imported: it is set here, before any test module imports resattn_fast, when no GPU
is visible (on a GPU machine the real compiler runs them).

RESATTN_REQUIRE_BACKENDS=cpu,triton,cuda (set by .ci/run) turns "backend not available"
from a skip into a failure, so CI cannot pass with a kernel silently missing; it does the
same for the optional packages the tests import with ``require_module`` (onnxruntime,
onnxscript, safetensors: CI installs them with the [test] extra). On CPU
tensors, backend "cuda" is the CUDA kernels under the emulation of CUDA's execution model
(a build with RESATTN_BUILD_CUDA_EMULATION=1).
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from resattn_fast.ops import available_backends  # noqa: E402

REQUIRED = {b.strip() for b in os.environ.get("RESATTN_REQUIRE_BACKENDS", "").split(",") if b.strip()}

# The fused backends that run on CPU tensors here (reference excluded: it is the truth);
# "cuda" is kernels/*.cu under the CUDA emulation.
CPU_FUSED = ("cpu", "triton", "cuda")


def require_backend(backend: str, device: str = "cpu") -> None:
    """Skip (or fail, when CI requires it) if ``backend`` cannot run on ``device``."""
    if backend in available_backends(device):
        return
    from resattn_fast.ops._backends import _why_not

    why = _why_not(backend, torch.device(device).type)
    if backend in REQUIRED:
        pytest.fail(f"backend {backend!r} is required (RESATTN_REQUIRE_BACKENDS) but unavailable: {why}")
    pytest.skip(f"backend {backend!r} unavailable: {why}")


def require_module(name: str) -> ModuleType:
    """``pytest.importorskip(name)``, except that under RESATTN_REQUIRE_BACKENDS (CI) a
    missing optional package fails the test: the checks that need it cannot vanish quietly."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        if REQUIRED:
            pytest.fail(f"{name} is required here (RESATTN_REQUIRE_BACKENDS is set) but cannot be imported: {exc}")
        pytest.skip(f"{name} is not installed: {exc}")


@pytest.fixture
def no_cuda_emulation(monkeypatch: pytest.MonkeyPatch):
    """As in a user's build: backend "cuda" has no kernels for CPU tensors (the emulated
    CUDA kernels, if built, are hidden for the test)."""
    from resattn_fast import _ext
    from resattn_fast.ops import _backends

    monkeypatch.setattr(_ext, "EMULATED", None)
    _backends._why_not.cache_clear()
    yield
    _backends._why_not.cache_clear()


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _keep_threads():
    """The CLI's --threads sets torch's thread count for the process: restore it."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run benchmarks/gpu_check.sh on one)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
