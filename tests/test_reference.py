"""The reference ops against the formulas they stand for (the ground truth is checked too)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from resattn_fast.reference import ops as ref


def _bilinear_by_hand(x: torch.Tensor, H: int, W: int, align_corners: bool) -> torch.Tensor:
    """Independent float64 implementation of PyTorch's bilinear formula, loop by loop."""
    n, c, h, w = x.shape
    out = torch.zeros(n, c, H, W, dtype=torch.float64)

    def taps(dst: int, inp: int, outp: int):
        if align_corners:
            src = dst * (inp - 1) / (outp - 1) if outp > 1 else 0.0
        else:
            src = max((dst + 0.5) * inp / outp - 0.5, 0.0)
        i0 = min(int(math.floor(src)), inp - 1)
        i1 = min(i0 + 1, inp - 1)
        lam = src - i0
        return i0, i1, 1 - lam, lam

    for oy in range(H):
        y0, y1, wy0, wy1 = taps(oy, h, H)
        for ox in range(W):
            x0, x1, wx0, wx1 = taps(ox, w, W)
            out[:, :, oy, ox] = (wy0 * (wx0 * x[:, :, y0, x0] + wx1 * x[:, :, y0, x1])
                                 + wy1 * (wx0 * x[:, :, y1, x0] + wx1 * x[:, :, y1, x1]))
    return out


@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("hw,HW", [((4, 4), (8, 8)), ((3, 5), (7, 2)), ((1, 1), (3, 3)),
                                   ((6, 6), (6, 6)), ((9, 7), (4, 3)), ((7, 7), (14, 14))])
def test_upsample_matches_formula(hw, HW, align_corners):
    x = torch.randn(2, 3, *hw, dtype=torch.float64)
    s = torch.randn(2, 3, *HW, dtype=torch.float64)
    want = _bilinear_by_hand(x, *HW, align_corners)
    torch.testing.assert_close(ref.upsample_bilinear_add(x, s, align_corners=align_corners), want + s)
    torch.testing.assert_close(ref.upsample_bilinear_add(x, None, size=HW, align_corners=align_corners), want)
    torch.testing.assert_close(
        F.interpolate(x, size=HW, mode="bilinear", align_corners=align_corners), want)


def test_upsample_follows_skip_format():
    x = torch.randn(2, 3, 4, 4)
    s = torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    assert ref.upsample_bilinear_add(x, s).is_contiguous(memory_format=torch.channels_last)
    assert ref.upsample_bilinear_add(x, s.contiguous()).is_contiguous()


def test_upsample_needs_size_without_skip():
    with pytest.raises(ValueError, match="size"):
        ref.upsample_bilinear_add(torch.randn(1, 1, 2, 2), None)


def test_attention_residual_formula():
    m = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    f = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    s = 1 / (1 + torch.exp(-m))
    torch.testing.assert_close(ref.attention_residual(m, f), (1 + s) * f)
    m.requires_grad_(True)
    f.requires_grad_(True)
    g = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    ref.attention_residual(m, f).backward(g)
    torch.testing.assert_close(f.grad, g * (1 + s))
    torch.testing.assert_close(m.grad, g * f.detach() * s * (1 - s))
