"""Pure-PyTorch building blocks of the Residual Attention Network (see PAPER.md).

The fast modules in :mod:`resattn_fast.nn` subclass these and override only their hooks
(the BN-ReLU pair, and the two soft-mask ops), so both share one constructor, one
parameter layout and one state_dict.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as tnn

from . import ops as ref_ops

__all__ = ["ResidualUnit", "AttentionModule", "mask_sizes"]


class ResidualUnit(tnn.Module):
    """Full pre-activation bottleneck unit (He et al. 2016), no conv bias.

    ``y = shortcut(x) + conv1x1(relu(bn(conv3x3(relu(bn(conv1x1(relu(bn(x)))))))))`` with
    bottleneck width ``out_channels // 4``. When the channels or the stride change, the
    shortcut is a 1x1 conv (stride ``stride``) applied to ``relu(bn1(x))``; the stride sits
    on the 3x3 conv.

    Shapes: (N, in_channels, H, W) -> (N, out_channels, ceil(H / stride), ceil(W / stride)).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        if out_channels % 4:
            raise ValueError(f"ResidualUnit: out_channels must be a multiple of 4, got {out_channels}")
        mid = out_channels // 4
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        self.bn1 = tnn.BatchNorm2d(in_channels)
        self.conv1 = tnn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn2 = tnn.BatchNorm2d(mid)
        self.conv2 = tnn.Conv2d(mid, mid, 3, stride=stride, padding=1, bias=False)
        self.bn3 = tnn.BatchNorm2d(mid)
        self.conv3 = tnn.Conv2d(mid, out_channels, 1, bias=False)
        self.relu = tnn.ReLU(inplace=True)
        self.shortcut: Optional[tnn.Conv2d] = None
        if in_channels != out_channels or stride != 1:
            self.shortcut = tnn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)

    # The BN-ReLU pair; resattn_fast.nn.ResidualUnit overrides it with the fused op.
    def bn_relu(self, bn: tnn.Module, x: torch.Tensor, identity: bool = False
                ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """``relu(bn(x))``; with ``identity`` also ``x``, the identity shortcut (the fast
        unit adds that shortcut's gradient inside the pair's backward)."""
        out = self.relu(bn(x))
        return (out, x) if identity else out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shortcut is None:
            pre, identity = self.bn_relu(self.bn1, x, identity=True)
        else:
            pre = self.bn_relu(self.bn1, x)
            identity = self.shortcut(pre)
        out = self.conv1(pre)
        out = self.conv2(self.bn_relu(self.bn2, out))
        out = self.conv3(self.bn_relu(self.bn3, out))
        return out + identity


def _units(channels: int, n: int) -> tnn.Sequential:
    return tnn.Sequential(*[ResidualUnit(channels, channels) for _ in range(n)])


def mask_sizes(size: Tuple[int, int], mask_depth: int) -> List[Tuple[int, int]]:
    """Spatial sizes of the soft-mask levels below ``size`` (3x3/2 ceil-mode max-pools,
    ``ceil((s - 3) / 2) + 1``); each level must be at least 3 pixels to be pooled."""
    h, w = size
    out = []
    for _ in range(mask_depth):
        h, w = (h - 2) // 2 + 1, (w - 2) // 2 + 1
        out.append((h, w))
    return out


class AttentionModule(tnn.Module):
    """Attention module with attention residual learning, ``H = (1 + M(x)) * F(x)``.

    Args:
        channels: input and output channels.
        mask_depth: number of max-pools in the soft-mask hourglass (3, 2, 1 in the
            ImageNet stages, giving a 7x7 lowest level at 224 input).
        p: residual units before the split and after the product.
        t: residual units in the trunk branch.
        r: residual units between adjacent pooling / upsampling steps of the mask branch.

    Shapes: (N, channels, H, W) -> (N, channels, H, W); every mask level must be at
    least 3x3 before its max-pool (H, W >= 3 * 2**(mask_depth - 1) suffices).
    """

    def __init__(self, channels: int, mask_depth: int, *, p: int = 1, t: int = 2, r: int = 1) -> None:
        super().__init__()
        if mask_depth < 1:
            raise ValueError(f"AttentionModule: mask_depth must be >= 1, got {mask_depth}")
        self.channels, self.mask_depth, self.p, self.t, self.r = channels, mask_depth, p, t, r
        self.pre = _units(channels, p)
        self.trunk = _units(channels, t)
        self.pool = tnn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True)
        # down[i]: the units after the (i+1)-th max-pool; the lowest level has 2r.
        self.down = tnn.ModuleList(
            _units(channels, 2 * r if i == mask_depth - 1 else r) for i in range(mask_depth)
        )
        # skips[i]: one unit on the down-path feature of level i (all but the lowest).
        self.skips = tnn.ModuleList(ResidualUnit(channels, channels) for _ in range(mask_depth - 1))
        # up[i]: the units after adding skip i to the upsampled coarser level.
        self.up = tnn.ModuleList(_units(channels, r) for _ in range(mask_depth - 1))
        self.mask_head = tnn.Sequential(
            tnn.BatchNorm2d(channels),
            tnn.ReLU(inplace=True),
            tnn.Conv2d(channels, channels, 1, bias=False),
            tnn.BatchNorm2d(channels),
            tnn.ReLU(inplace=True),
            tnn.Conv2d(channels, channels, 1, bias=False),
        )
        self.post = _units(channels, p)

    # The two soft-mask ops; resattn_fast.nn.AttentionModule overrides them with fused kernels.
    def upsample_add(self, x: torch.Tensor, skip: Optional[torch.Tensor],
                     size: Sequence[int]) -> torch.Tensor:
        return ref_ops.upsample_bilinear_add(x, skip, size=size, align_corners=True)

    def attend(self, mask_logits: torch.Tensor, trunk: torch.Tensor) -> torch.Tensor:
        return ref_ops.attention_residual(mask_logits, trunk)

    # The mask head's BN-ReLU pairs; the fast module fuses them.
    def bn_relu(self, bn: tnn.Module, x: torch.Tensor) -> torch.Tensor:
        return tnn.functional.relu(bn(x), inplace=True)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """The mask head: BN, ReLU, 1x1 conv, BN, ReLU, 1x1 conv -> logits."""
        h = self.mask_head
        return h[5](self.bn_relu(h[3], h[2](self.bn_relu(h[0], x))))

    def mask_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Soft-mask branch up to (not including) the sigmoid: (N, C, H, W) logits."""
        skips = []
        out = x
        for i in range(self.mask_depth):
            out = self.down[i](self.pool(out))
            if i < self.mask_depth - 1:
                skips.append(self.skips[i](out))
        for i in reversed(range(self.mask_depth - 1)):
            out = self.up[i](self.upsample_add(out, skips[i], skips[i].shape[-2:]))
        out = self.upsample_add(out, None, x.shape[-2:])
        return self.head(out)

    def forward_with_mask(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Like forward, also returning the soft mask M(x) in (0, 1), (N, C, H, W)."""
        x = self.pre(x)
        logits = self.mask_logits(x)
        out = self.post(self.attend(logits, self.trunk(x)))
        return out, torch.sigmoid(logits.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pre(x)
        return self.post(self.attend(self.mask_logits(x), self.trunk(x)))

    def extra_repr(self) -> str:
        return f"channels={self.channels}, mask_depth={self.mask_depth}, p={self.p}, t={self.t}, r={self.r}"
