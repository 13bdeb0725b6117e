"""The fast AttentionModule: the reference module with its two soft-mask ops fused."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .. import ops
from ..reference.modules import AttentionModule as _RefAttentionModule

__all__ = ["AttentionModule"]


class AttentionModule(_RefAttentionModule):
    """Drop-in replacement for :class:`resattn_fast.reference.AttentionModule`.

    Same constructor (plus ``backend``), same parameters and state_dict keys, same
    numbers. The mask branch's upsample-adds (and its last, skip-less upsample) run
    ``ops.upsample_bilinear_add``; the sigmoid and ``(1 + M) * F`` run
    ``ops.attention_residual``, so the branch runs no PyTorch interpolation or
    unfused elementwise pass.

    Args:
        channels, mask_depth, p, t, r: as the reference module.
        backend: "cpu", "cuda", "triton", "reference" or None (fastest for the input's device).

    Shapes: (N, channels, H, W) -> (N, channels, H, W), any dtype the ops take.
    """

    def __init__(self, channels: int, mask_depth: int, *, p: int = 1, t: int = 2, r: int = 1,
                 backend: Optional[str] = None) -> None:
        super().__init__(channels, mask_depth, p=p, t=t, r=r)
        self.backend = backend

    def upsample_add(self, x: torch.Tensor, skip: Optional[torch.Tensor],
                     size: Sequence[int]) -> torch.Tensor:
        return ops.upsample_bilinear_add(x, skip, size=size, align_corners=True, backend=self.backend)

    def attend(self, mask_logits: torch.Tensor, trunk: torch.Tensor) -> torch.Tensor:
        return ops.attention_residual(mask_logits, trunk, backend=self.backend)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", backend={self.backend!r}"
