"""The fast AttentionModule: the reference module with its soft-mask ops and its mask
head's BN-ReLU pairs fused (its residual units are fast ones once ``convert`` ran)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as tnn

from .. import ops
from ..reference.modules import AttentionModule as _RefAttentionModule
from .batch_norm import bn_relu

__all__ = ["AttentionModule"]


class AttentionModule(_RefAttentionModule):
    """Drop-in replacement for :class:`resattn_fast.reference.AttentionModule`.

    Same constructor (plus ``backend``), same parameters and state_dict keys, same
    numbers. The mask branch's upsample-adds (and its last, skip-less upsample) run
    ``ops.upsample_bilinear_add``; the mask head's two BN-ReLU pairs run
    ``ops.batch_norm_relu``; the sigmoid and ``(1 + M) * F`` run
    ``ops.attention_residual``, so the branch runs no PyTorch interpolation or
    unfused elementwise pass. Its residual units are fast ones (``resattn_fast.nn.ResidualUnit``).

    Args:
        channels, mask_depth, p, t, r: as the reference module.
        backend: "cpu", "cuda", "triton", "reference" or None (fastest for the input's device).

    Shapes: (N, channels, H, W) -> (N, channels, H, W), any dtype the ops take.
    """

    def __init__(self, channels: int, mask_depth: int, *, p: int = 1, t: int = 2, r: int = 1,
                 backend: Optional[str] = None) -> None:
        super().__init__(channels, mask_depth, p=p, t=t, r=r)
        self.backend = backend
        from ..convert import swap_module  # (a cycle at import time)

        for m in self.modules():
            if m is not self:
                swap_module(m, "fast", backend)

    def upsample_add(self, x: torch.Tensor, skip: Optional[torch.Tensor],
                     size: Sequence[int]) -> torch.Tensor:
        return ops.upsample_bilinear_add(x, skip, size=size, align_corners=True, backend=self.backend)

    def attend(self, mask_logits: torch.Tensor, trunk: torch.Tensor) -> torch.Tensor:
        return ops.attention_residual(mask_logits, trunk, backend=self.backend)

    def bn_relu(self, bn: tnn.Module, x: torch.Tensor) -> torch.Tensor:
        return bn_relu(bn, x, backend=self.backend)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", backend={self.backend!r}"
