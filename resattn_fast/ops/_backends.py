"""Which backends can run an op on a device, and which one a call gets.

Order of preference for ``backend=None``: on CUDA tensors ``cuda`` then ``triton`` then
``reference``; on CPU tensors ``cpu`` then ``reference``. Triton on the CPU exists only
under TRITON_INTERPRET=1 (the test interpreter), and ``cuda`` on the CPU only in a build
with RESATTN_BUILD_CUDA_EMULATION=1 (the CUDA kernels under an emulation of CUDA's
execution model); neither is ever picked by default there.
The environment variable RESATTN_BACKEND overrides the default choice.
"""

from __future__ import annotations

import functools
import os
from typing import List, Optional, Tuple, Union

import torch

from .. import _ext

__all__ = ["BACKENDS", "available_backends", "resolve_backend", "BackendUnavailableError"]

BACKENDS = ("reference", "cpu", "cuda", "triton")


class BackendUnavailableError(RuntimeError):
    """A backend was asked for that cannot run here; the message says why and what to do."""


def _dispatch_has(key: str) -> bool:
    if _ext.C is None:
        return False
    # Every op's kernels come from the same build: one op stands for all (a build of an
    # older source tree would lack batch_norm_relu, and then the backend is not usable).
    return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"resattn_fast::{op}", key)
               for op in ("attention_residual", "batch_norm_relu"))


@functools.cache
def _triton_status() -> Tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except Exception as exc:
        return False, f"Triton is not importable ({type(exc).__name__}: {exc}); `pip install triton`"
    return True, ""


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _why_not(backend: str, device_type: str) -> Optional[str]:
    """None if ``backend`` can run on ``device_type``, else the reason and the remedy."""
    if backend == "reference":
        return None
    if backend == "cpu":
        if device_type != "cpu":
            return f"the cpu backend runs on CPU tensors only, these are on {device_type}"
        if not _dispatch_has("CPU"):
            return ("the compiled extension resattn_fast._C is not loaded "
                    f"({_ext.load_error or 'no CPU kernels'}); reinstall with "
                    "`pip install --no-build-isolation -e .` and a C++ compiler")
        return None
    if backend == "cuda":
        if device_type == "cpu" and _ext.EMULATED is not None:
            return None  # the CUDA kernels under the emulation of CUDA's execution model
        if device_type != "cuda":
            return (f"the cuda backend runs on CUDA tensors only, these are on {device_type} "
                    "(on CPU tensors only in a build with RESATTN_BUILD_CUDA_EMULATION=1, for tests)")
        if not _dispatch_has("CUDA"):
            return ("resattn_fast._C was built without CUDA kernels "
                    f"({_ext.load_error or 'RESATTN_BUILD_CUDA=0 or no nvcc at build time'}); "
                    "rebuild with RESATTN_BUILD_CUDA=1 and CUDA_HOME pointing at the toolkit")
        return None
    if backend == "triton":
        ok, why = _triton_status()
        if not ok:
            return why
        if device_type == "cuda":
            return None
        if device_type == "cpu" and triton_interpreted():
            return None
        return (f"Triton kernels run on CUDA tensors (or on the CPU under TRITON_INTERPRET=1, "
                f"set before Triton is imported), these are on {device_type}")
    return f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}"


def available_backends(device: Union[str, torch.device, None] = None) -> List[str]:
    """The backends that can run both ops on ``device`` (default: "cpu"), fastest first."""
    dev = torch.device(device if device is not None else "cpu")
    order = ("cuda", "triton", "reference") if dev.type == "cuda" else ("cpu", "triton", "cuda", "reference")
    return [b for b in order if _why_not(b, dev.type) is None]


def _default(device_type: str) -> str:
    if device_type == "cuda":
        order = ("cuda", "triton", "reference")
    else:
        order = ("cpu", "reference")
    for b in order:
        if _why_not(b, device_type) is None:
            return b
    return "reference"


def resolve_backend(backend: Optional[str], device: torch.device) -> str:
    """The backend a call on ``device`` runs: ``backend``, else $RESATTN_BACKEND, else the
    fastest available. Raises BackendUnavailableError (with the reason) if it cannot run.

    Under torch.compile the choice is made once, at trace time, and baked into the graph
    (the dispatcher queries behind it cannot be traced)."""
    return _resolve(backend, device.type)


@torch.compiler.assume_constant_result
def _resolve(backend: Optional[str], device_type: str) -> str:
    chosen = backend or os.environ.get("RESATTN_BACKEND") or None
    if chosen is None:
        return _default(device_type)
    chosen = chosen.strip().lower()
    why = _why_not(chosen, device_type)
    if why is not None:
        source = "backend=" if backend else "RESATTN_BACKEND="
        raise BackendUnavailableError(f"resattn_fast: {source}{chosen!r} is not available: {why}")
    return chosen
