"""Swap the attention modules of a model between the reference and fast implementations."""

from __future__ import annotations

from typing import Optional

import torch.nn as tnn

from .nn.attention import AttentionModule as FastAttentionModule
from .reference.modules import AttentionModule as RefAttentionModule

__all__ = ["convert"]

IMPLS = ("fast", "reference")


def _swap(module: RefAttentionModule, impl: str, backend: Optional[str]) -> RefAttentionModule:
    # The fast class only adds `backend`: re-classing keeps every parameter, buffer, hook
    # and the training flag, with no copy.
    if impl == "fast":
        module.__class__ = FastAttentionModule
        module.backend = backend
    else:
        module.__class__ = RefAttentionModule
        module.__dict__.pop("backend", None)
    return module


def convert(model: tnn.Module, impl: str = "fast", backend: Optional[str] = None) -> tnn.Module:
    """Make every AttentionModule in ``model`` the ``impl`` ("fast" or "reference") one,
    in place, keeping its weights; returns ``model``.

    ``impl="reference"`` gives a model of plain torch ops (e.g. for ONNX export);
    ``impl="fast"`` one whose soft-mask branches run the fused kernels of ``backend``
    (None: the fastest for the input's device at each call).
    """
    if impl not in IMPLS:
        raise ValueError(f"convert: impl must be one of {IMPLS}, got {impl!r}")
    if backend is not None and impl == "reference":
        raise ValueError("convert: backend= applies to impl='fast' only")
    if isinstance(model, RefAttentionModule):
        return _swap(model, impl, backend)
    for m in model.modules():
        if isinstance(m, RefAttentionModule):
            _swap(m, impl, backend)
    return model
