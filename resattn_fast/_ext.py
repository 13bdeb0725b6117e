"""Guarded import of the compiled extensions.

- ``resattn_fast._C``: the op schemas, the CPU kernels and (when built) the CUDA kernels.
- ``resattn_fast._C_cuda_emulated`` (only in a build with RESATTN_BUILD_CUDA_EMULATION=1):
  the same CUDA kernels compiled by the host compiler against an emulation of CUDA's
  execution model; they run on CPU tensors as backend ``"cuda"``. With
  ``RESATTN_CUDA_EMULATION=asan`` the AddressSanitizer build
  ``resattn_fast._C_cuda_emulated_asan`` is loaded instead (libasan must be preloaded),
  with ``RESATTN_CUDA_EMULATION=tsan`` the ThreadSanitizer build
  ``resattn_fast._C_cuda_emulated_tsan`` (libtsan must be preloaded);
  ``RESATTN_CUDA_EMULATION=0`` loads none.

A missing or broken extension never breaks ``import resattn_fast``: the reference backend
still works, and ``resattn info`` reports why the compiled kernels are missing.
"""

from __future__ import annotations

import importlib
import os
from typing import Any, Dict, Optional, Tuple

__all__ = ["C", "EMULATED", "load_error", "emulation_error", "build_info"]

C: Optional[Any]
load_error: Optional[str]
try:
    from . import _C as C  # registers the torch.ops.resattn_fast.* schemas and kernels

    load_error = None
except Exception as exc:  # ImportError, or an undefined symbol from a torch mismatch
    C = None
    load_error = f"{type(exc).__name__}: {exc}"


def _load_emulated() -> Tuple[Optional[Any], Optional[str]]:
    choice = os.environ.get("RESATTN_CUDA_EMULATION", "1").strip().lower()
    if choice in ("0", "off", "no", "false"):
        return None, "disabled by RESATTN_CUDA_EMULATION=0"
    sanitized = choice in ("asan", "tsan")
    name = f"_C_cuda_emulated_{choice}" if sanitized else "_C_cuda_emulated"
    try:
        # registers torch.ops.resattn_fast_emulated.* (CPU kernels from kernels/*.cu)
        return importlib.import_module(f"{__package__}.{name}"), None
    except ModuleNotFoundError as exc:
        if sanitized:
            return None, f"{type(exc).__name__}: {exc}"
        return None, "not built (RESATTN_BUILD_CUDA_EMULATION=1 builds it)"
    except Exception as exc:
        return None, f"{type(exc).__name__}: {exc}"


EMULATED, emulation_error = _load_emulated()


def build_info() -> Dict[str, Any]:
    """What the compiled extension contains; ``{"loaded": False, "error": ...}`` if absent.

    ``cuda_emulation`` says whether the emulated CUDA kernels are loaded (backend "cuda" on
    CPU tensors), ``cuda_emulation_sanitizer`` which sanitizer they were built with."""
    emulation = {
        "cuda_emulation": EMULATED is not None,
        "cuda_emulation_sanitizer": EMULATED.build_info()["sanitizer"] if EMULATED else "",
        "cuda_emulation_error": emulation_error,
    }
    if C is None:
        return {"loaded": False, "error": load_error, "cpu_kernels": False, "cuda_kernels": False,
                **emulation}
    import torch

    info = dict(C.build_info())
    # Which kernels are in is read from the dispatcher, not assumed from the build flags.
    for key, name in (("CPU", "cpu_kernels"), ("CUDA", "cuda_kernels")):
        info[name] = all(
            torch._C._dispatch_has_kernel_for_dispatch_key(f"resattn_fast::{op}", key)
            for op in ("upsample_bilinear_add", "upsample_bilinear_add_backward",
                       "attention_residual", "attention_residual_backward",
                       "batch_norm_relu", "batch_norm_relu_backward", "batch_norm_update_stats",
                       "batch_norm_relu_with_update")
        )
    info["loaded"] = True
    info["error"] = None
    info.update(emulation)
    return info
