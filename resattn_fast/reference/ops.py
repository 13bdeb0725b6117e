"""The two soft-mask ops written with plain torch ops: the ground truth for every kernel.

Both accept the same arguments as their fused counterparts in :mod:`resattn_fast.ops`
(minus ``backend``) and autograd differentiates them the ordinary way.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .._format import memory_format_of

__all__ = ["upsample_bilinear_add", "attention_residual"]


def upsample_bilinear_add(
    x: torch.Tensor,
    skip: Optional[torch.Tensor],
    *,
    size: Optional[Sequence[int]] = None,
    align_corners: bool = True,
) -> torch.Tensor:
    """``F.interpolate(x, size=(H, W), mode="bilinear", align_corners=...) + skip``.

    Args:
        x: (N, C, h, w) floating tensor.
        skip: (N, C, H, W) tensor of x's dtype and device, or None for a plain upsample.
        size: (H, W); defaults to skip's spatial size, required when skip is None.
        align_corners: PyTorch's (and Caffe's Interp layer's, when True) corner convention.

    Returns:
        (N, C, H, W) tensor in skip's memory format (x's when skip is None).
    """
    if size is None:
        if skip is None:
            raise ValueError("upsample_bilinear_add: give size=(H, W) when skip is None")
        size = skip.shape[-2:]
    out = F.interpolate(x, size=tuple(int(s) for s in size), mode="bilinear",
                        align_corners=align_corners)
    if skip is not None:
        out = out + skip
        return out.contiguous(memory_format=memory_format_of(skip))
    return out.contiguous(memory_format=memory_format_of(x))


def attention_residual(mask_logits: torch.Tensor, trunk: torch.Tensor) -> torch.Tensor:
    """Attention residual learning, ``(1 + sigmoid(mask_logits)) * trunk``.

    Args:
        mask_logits: soft-mask logits, any shape; trunk: the trunk output F(x), same shape,
            dtype and device.

    Returns:
        A tensor of trunk's shape, dtype and memory format.
    """
    return (1 + torch.sigmoid(mask_logits)) * trunk
