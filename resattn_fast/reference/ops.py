"""The fused ops written with plain torch ops: the ground truth for every kernel.

Each accepts the same arguments as their fused counterparts in :mod:`resattn_fast.ops`
(minus ``backend``) and autograd differentiates them the ordinary way.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .._format import memory_format_of

__all__ = ["upsample_bilinear_add", "attention_residual", "batch_norm_relu"]


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


def batch_norm_relu(
    x: torch.Tensor,
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    identity: bool = False,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """``relu(F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum,
    eps))``, updating the running statistics in training exactly as F.batch_norm does.

    Args:
        x: (N, C, H, W) floating tensor.
        running_mean, running_var: (C,) or None (then training must be True).
        weight, bias: (C,) or None.
        identity: also return ``x`` (the identity shortcut of a residual unit), as the
            fused op does.

    Returns:
        The output in x's dtype (and ``x`` when ``identity``).
    """
    out = F.relu(F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps))
    return (out, x) if identity else out


def batch_norm_relu_with_update(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    momentum: float,
    eps: float,
    num_batches_tracked: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The op ``batch_norm_relu_with_update`` in plain PyTorch: training ``relu(F.batch_norm(
    x, ...))``, the running statistics updated in place as F.batch_norm updates them, and
    ``num_batches_tracked += 1`` when given.

    Returns:
        (out, mean, var): out in x's dtype; the batch's mean and biased variance over
        (N, H, W), (C,) in float32 (float64 for float64 x). An empty x leaves the running
        statistics unchanged (its mean and var are zeros).
    """
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    if x.numel() == 0:
        zeros = x.new_zeros((x.shape[1],), dtype=acc)
        return torch.empty_like(x), zeros, zeros.clone()
    xs = x.detach().to(acc)
    mean = xs.mean((0, 2, 3))
    var = xs.var((0, 2, 3), unbiased=False)
    out = F.relu(F.batch_norm(x, running_mean, running_var, weight, bias, True, momentum, eps))
    return out, mean, var
