"""Swap a model's blocks between the reference and fast implementations, in place."""

from __future__ import annotations

from typing import Optional

import torch.nn as tnn

from .nn.attention import AttentionModule as FastAttentionModule
from .nn.residual import ResidualUnit as FastResidualUnit
from .reference.modules import AttentionModule as RefAttentionModule
from .reference.modules import ResidualUnit as RefResidualUnit

__all__ = ["convert"]

IMPLS = ("fast", "reference")


def swap_module(module: tnn.Module, impl: str, backend: Optional[str]) -> tnn.Module:
    """Re-class one AttentionModule or ResidualUnit to ``impl`` (the fast classes only add
    ``backend``: every parameter, buffer, hook and the training flag stay, no copy); a
    ResidualAttentionNet records ``impl`` for its stem and final BN-ReLU. Anything else is
    left alone."""
    if isinstance(module, RefAttentionModule):
        cls = FastAttentionModule if impl == "fast" else RefAttentionModule
    elif isinstance(module, RefResidualUnit):
        cls = FastResidualUnit if impl == "fast" else RefResidualUnit
    else:
        if hasattr(module, "norm_impl"):  # ResidualAttentionNet (not imported: a cycle)
            module.norm_impl = impl
            module.norm_backend = backend if impl == "fast" else None
        return module
    module.__class__ = cls
    if impl == "fast":
        module.backend = backend
    else:
        module.__dict__.pop("backend", None)
    return module


def convert(model: tnn.Module, impl: str = "fast", backend: Optional[str] = None) -> tnn.Module:
    """Make every AttentionModule and ResidualUnit in ``model`` the ``impl`` ("fast" or
    "reference") one, in place, keeping its weights; returns ``model``.

    ``impl="reference"`` gives a model of plain torch ops (e.g. for ONNX export);
    ``impl="fast"`` one whose soft-mask branches and BN-ReLU pairs run the fused kernels
    of ``backend`` (None: the fastest for the input's device at each call). A norm that
    is not a plain ``nn.BatchNorm2d`` (e.g. after ``nn.SyncBatchNorm.convert_sync_batchnorm``)
    keeps running as its own module, followed by ReLU.
    """
    if impl not in IMPLS:
        raise ValueError(f"convert: impl must be one of {IMPLS}, got {impl!r}")
    if backend is not None and impl == "reference":
        raise ValueError("convert: backend= applies to impl='fast' only")
    for m in list(model.modules()):
        swap_module(m, impl, backend)
    return model
