"""The fast ResidualUnit: the reference unit with its BN-ReLU pairs fused."""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn as tnn

from ..reference.modules import ResidualUnit as _RefResidualUnit
from .batch_norm import bn_relu

__all__ = ["ResidualUnit"]


class ResidualUnit(_RefResidualUnit):
    """Drop-in replacement for :class:`resattn_fast.reference.ResidualUnit`.

    Same constructor (plus ``backend``), parameters, state_dict keys and numbers. Each of
    the three BN-ReLU pairs runs ``ops.batch_norm_relu`` (one pass forward after the
    statistics, backward from the pair's input and statistics); with an identity shortcut,
    the shortcut's gradient is added inside the first pair's backward pass.

    Shapes: (N, in_channels, H, W) -> (N, out_channels, ceil(H / stride), ceil(W / stride)).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, *,
                 backend: Optional[str] = None) -> None:
        super().__init__(in_channels, out_channels, stride)
        self.backend = backend

    def bn_relu(self, bn: tnn.Module, x: torch.Tensor, identity: bool = False
                ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        return bn_relu(bn, x, identity=identity, backend=self.backend)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"
