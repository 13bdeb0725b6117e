"""Guarded import of the compiled extension resattn_fast._C.

A missing or broken extension never breaks ``import resattn_fast``: the reference backend
still works, and ``resattn info`` reports why the compiled kernels are missing.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

__all__ = ["C", "load_error", "build_info"]

C: Optional[Any]
load_error: Optional[str]
try:
    from . import _C as C  # registers the torch.ops.resattn_fast.* schemas and kernels

    load_error = None
except Exception as exc:  # ImportError, or an undefined symbol from a torch mismatch
    C = None
    load_error = f"{type(exc).__name__}: {exc}"


def build_info() -> Dict[str, Any]:
    """What the compiled extension contains; ``{"loaded": False, "error": ...}`` if absent."""
    if C is None:
        return {"loaded": False, "error": load_error, "cpu_kernels": False, "cuda_kernels": False}
    import torch

    info = dict(C.build_info())
    # Which kernels are in is read from the dispatcher, not assumed from the build flags.
    for key, name in (("CPU", "cpu_kernels"), ("CUDA", "cuda_kernels")):
        info[name] = all(
            torch._C._dispatch_has_kernel_for_dispatch_key(f"resattn_fast::{op}", key)
            for op in ("upsample_bilinear_add", "upsample_bilinear_add_backward",
                       "attention_residual", "attention_residual_backward")
        )
    info["loaded"] = True
    info["error"] = None
    return info
