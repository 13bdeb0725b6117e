"""Triton kernels of ``upsample_bilinear_add``: bilinear upsample of x fused with ``+ skip``,
and its backward as a gather.

Registered as ``torch.ops.resattn_fast.upsample_bilinear_add_triton`` and
``torch.ops.resattn_fast.upsample_bilinear_add_backward_triton`` with
``torch.library.triton_op`` (kernels launched through ``wrap_triton``, so torch.compile
traces into them); autograd comes from ``resattn_fast.ops._registry`` and saves no tensor.

Index and weight math is PyTorch's (kernels/bilinear.h), per axis:
  align_corners=True : src = dst * (in - 1) / (out - 1)          (0 when out == 1)
  align_corners=False: src = max((dst + 0.5) * in / out - 0.5, 0)
  i0 = min(floor(src), in - 1), i1 = min(i0 + 1, in - 1), w1 = src - i0, w0 = 1 - w1,
evaluated in float32 (float64 for float64 tensors). The scale is PyTorch's, bit for bit,
computed on the host as PyTorch computes it (a correctly rounded division) and passed in:
float32 as a float argument, float64 as the int64 bits of the double (Triton passes
Python floats as float32). No division is left in the kernels' exact path: ``/`` compiles
to the approximate ``div.full.f32`` on NVIDIA GPUs, and float64 ``/`` to a subroutine
call whose saved return address counts as a spill.

Layouts: the forward reads x and skip through their strides (any layout, no copy) and
writes a dense output in skip's memory format (x's without skip): NCHW or channels_last.
The backward reads grad through its strides and writes grad_x in grad's memory format.
Each program element owns one output element (forward) or one input element (backward),
numbered in the memory order of the tensor it writes, so stores are coalesced.
"""

import struct
from typing import Any, List, Optional, Tuple

import numpy as np
import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ..._format import memory_format_of
from .. import _registry
from ._common import (
    acc,
    configs,
    device_guard,
    flat_grid,
    needs_fake,
    needs_int64,
    size_class,
    triton_op_kwargs,
)

__all__ = ["upsample_bilinear_add", "upsample_bilinear_add_backward"]

_FLOATING = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

# (BLOCK, num_warps). The forward is memory bound; the backward loops over a small window
# of output pixels per input pixel, so it uses smaller blocks.
_FWD_CONFIGS = configs([(512, 4), (1024, 4), (2048, 8)], interpreted_block=2048)
_BWD_CONFIGS = configs([(128, 4), (256, 4), (512, 8)], interpreted_block=1024)


def _prune_fwd(configs: List[triton.Config], nargs: Any, **kwargs: Any) -> List[triton.Config]:
    """The forward configs a launch may tune over: float64 at most 1024 elements per
    block (with 64-bit offsets, the 2048-element block needs more registers than ptxas
    gives it on sm_80: Triton 3.6 spills there; see benchmarks/gpu_resources.py)."""
    if kwargs.get("IS_FP64"):
        return [c for c in configs if c.kwargs.get("BLOCK", 0) <= 1024] or configs[:1]
    return configs


@triton.jit
def _unravel(offs, C, H, W, CHANNELS_LAST: tl.constexpr, INT64: tl.constexpr):
    """(n, c, y, x) of flat offsets into a dense (N, C, H, W) tensor in NCHW or NHWC order.

    One division per dimension, the remainder by multiply-subtract: a separate ``%``
    would be a second integer division (the costliest instructions here). With 64-bit
    offsets (INT64) only the divisions that need it are 64-bit: one H*W plane (< 2**31
    elements) is split with 32-bit math, which keeps the register count (and spills) of
    the INT64 specialization down."""
    if INT64:
        # tl.cast, not .to: Triton turns integer arguments equal to 1 into constants.
        hw = tl.cast(H, tl.int64) * W
        if CHANNELS_LAST:
            pix = offs // C
            c = offs - pix * C
            n = pix // hw
            r = (pix - n * hw).to(tl.int32)
        else:
            plane = offs // hw
            r = (offs - plane * hw).to(tl.int32)
            n = plane // C
            c = plane - n * C
        y32 = r // W
        y = y32.to(tl.int64)
        x = (r - y32 * W).to(tl.int64)
    elif CHANNELS_LAST:
        rest = offs // C
        c = offs - rest * C
        rest2 = rest // W
        x = rest - rest2 * W
        n = rest2 // H
        y = rest2 - n * H
    else:
        rest = offs // W
        x = offs - rest * W
        rest2 = rest // H
        y = rest - rest2 * H
        n = rest2 // C
        c = rest2 - n * C
    return n, c, y, x


def _scales(in_size: int, out_size: int, align_corners: bool) -> Tuple[float, int]:
    """PyTorch's area_pixel_compute_scale along one axis, as (the float32 scale, the bits
    of the float64 scale as an int64): correctly rounded divisions in each precision, 0
    for align_corners with one output (whose only source index is 0)."""
    if align_corners:
        num, den = in_size - 1, out_size - 1
    else:
        num, den = in_size, out_size
    if den < 1:
        return 0.0, 0
    s32 = float(np.float32(num) / np.float32(den))
    (bits,) = struct.unpack("<q", struct.pack("<d", num / den))
    return s32, bits


@triton.jit
def _scale(scale32, scale64_bits, IS_FP64: tl.constexpr):
    """The source-index step along one axis in the accumulation type, from the host's."""
    if IS_FP64:
        return tl.cast(scale64_bits, tl.int64).to(tl.float64, bitcast=True)
    else:
        # tl.cast: Triton 3.6's interpreter passes a float argument as a Python float.
        return tl.cast(scale32, tl.float32)


@triton.jit
def _tap(dst, in_size, scale, ALIGN: tl.constexpr):
    """The two input indices (i0, i1, of dst's integer type) and weights (w0, w1, of
    scale's type) that output index ``dst`` reads along one axis."""
    d = dst.to(scale.dtype)
    if ALIGN:
        src = scale * d
    else:
        src = tl.maximum(scale * (d + 0.5) - 0.5, 0.0)
    i0 = tl.minimum(src.to(dst.dtype), in_size - 1)  # src >= 0: truncation is floor
    i1 = tl.where(i0 < in_size - 1, i0 + 1, i0)
    w1 = src - i0.to(scale.dtype)
    w0 = 1.0 - w1
    return i0, i1, w0, w1


@triton.jit
def _first_reader(i, in_size, out_size, scale, ALIGN: tl.constexpr):
    """The first output index whose taps include input index ``i`` (i1(dst) >= i), or a
    later index that reads nothing if no output reads ``i``.

    A closed-form guess from the inverse of the source formula, moved down by 2 to absorb
    its rounding, then advanced with the exact forward tap formula, so the backward can
    never disagree with the forward about which pixels touch. The guess is float32 (an
    approximate division suffices) whatever the tensors' type."""
    t = (i - 1).to(tl.float32)
    if ALIGN:
        inv = tl.cast(out_size - 1, tl.float32) / tl.maximum(tl.cast(in_size - 1, tl.float32), 1.0)
        guess = t * inv
    else:
        inv = tl.cast(out_size, tl.float32) / tl.cast(in_size, tl.float32)
        guess = (t + 0.5) * inv - 0.5
    # i <= 1 is read from dst = 0 on: for align_corners=False the clamp at 0 maps the first
    # outputs onto inputs 0 and 1 (the latter with weight 0, still a tap, as in PyTorch).
    guess = tl.where(i <= 1, 0.0, tl.minimum(tl.maximum(guess, 0.0), tl.cast(out_size, tl.float32)))
    start = tl.maximum(tl.floor(guess).to(i.dtype) - 2, 0)
    for _ in tl.static_range(5):
        _i0, i1, _w0, _w1 = _tap(start, in_size, scale, ALIGN)
        start = tl.where((i1 < i) & (start < out_size - 1), start + 1, start)
    return start


# Autotuned once per size class (size_class(total), in the key; unused by the kernel).
@triton.autotune(configs=_FWD_CONFIGS, key=["size_cls", "CHANNELS_LAST", "HAS_SKIP", "INT64"],
                 prune_configs_by={"early_config_prune": _prune_fwd})
@triton.jit(do_not_specialize=["size_cls", "scale_h64", "scale_w64"])
def _upsample_bilinear_add_fwd_kernel(
    x_ptr, skip_ptr, out_ptr, total, size_cls,
    C, H, W, h, w, scale_h32, scale_w32, scale_h64, scale_w64,
    sxn, sxc, sxh, sxw,
    ssn, ssc, ssh, ssw,
    ALIGN: tl.constexpr, HAS_SKIP: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    IS_FP64: tl.constexpr, INT64: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    if INT64:
        pid = pid.to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    # offs is the output's own memory order: (n, c, oh, ow) or (n, oh, ow, c).
    n, c, oh, ow = _unravel(offs, C, H, W, CHANNELS_LAST, INT64)

    ih0, ih1, wh0, wh1 = _tap(oh, h, _scale(scale_h32, scale_h64, IS_FP64), ALIGN)
    iw0, iw1, ww0, ww1 = _tap(ow, w, _scale(scale_w32, scale_w64, IS_FP64), ALIGN)
    base = x_ptr + n * sxn + c * sxc
    r0 = base + ih0 * sxh
    r1 = base + ih1 * sxh
    x00 = acc(tl.load(r0 + iw0 * sxw, mask=mask, other=0.0), IS_FP64)
    x01 = acc(tl.load(r0 + iw1 * sxw, mask=mask, other=0.0), IS_FP64)
    x10 = acc(tl.load(r1 + iw0 * sxw, mask=mask, other=0.0), IS_FP64)
    x11 = acc(tl.load(r1 + iw1 * sxw, mask=mask, other=0.0), IS_FP64)
    val = wh0 * (ww0 * x00 + ww1 * x01) + wh1 * (ww0 * x10 + ww1 * x11)
    if HAS_SKIP:
        s_off = n * ssn + c * ssc + oh * ssh + ow * ssw
        val += acc(tl.load(skip_ptr + s_off, mask=mask, other=0.0), IS_FP64)
    tl.store(out_ptr + offs, val.to(out_ptr.dtype.element_ty), mask=mask)


@triton.autotune(configs=_BWD_CONFIGS, key=["size_cls", "KH", "KW", "CHANNELS_LAST", "INT64"])
@triton.jit(do_not_specialize=["size_cls", "scale_h64", "scale_w64"])
def _upsample_bilinear_add_bwd_kernel(
    g_ptr, gx_ptr, total, size_cls,
    C, H, W, h, w, scale_h32, scale_w32, scale_h64, scale_w64,
    sgn, sgc, sgh, sgw,
    KH, KW,
    ALIGN: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    IS_FP64: tl.constexpr, INT64: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    if INT64:
        pid = pid.to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    # offs is grad_x's own memory order: (n, c, ih, iw) or (n, ih, iw, c).
    n, c, ih, iw = _unravel(offs, C, h, w, CHANNELS_LAST, INT64)

    scale_h = _scale(scale_h32, scale_h64, IS_FP64)
    scale_w = _scale(scale_w32, scale_w64, IS_FP64)
    oh_start = _first_reader(ih, h, H, scale_h, ALIGN)
    ow_start = _first_reader(iw, w, W, scale_w, ALIGN)
    base = g_ptr + n * sgn + c * sgc
    total_acc = acc(tl.zeros([BLOCK], dtype=tl.float32), IS_FP64)
    # The outputs that read (ih, iw) are the rectangle [oh_lo, oh_hi) x [ow_lo, ow_hi)
    # starting at (oh_start, ow_start); KH x KW (host bound) covers it. Every candidate is
    # tested with the exact forward taps, and grad is only read where it is used.
    # while loops on the runtime bounds (not range(KH)): Triton 3.6's interpreter cannot
    # turn an integer argument into a Python range bound; compiled, both are the same loop.
    kh = 0
    while kh < KH:
        oh = oh_start + kh
        th0, th1, uh0, uh1 = _tap(oh, h, scale_h, ALIGN)
        hit_h = ((th0 == ih) | (th1 == ih)) & (oh < H) & mask
        wgt_h = tl.where(th0 == ih, uh0, 0.0) + tl.where(th1 == ih, uh1, 0.0)
        row_ptr = base + tl.minimum(oh, H - 1) * sgh
        row = acc(tl.zeros([BLOCK], dtype=tl.float32), IS_FP64)
        kw = 0
        while kw < KW:
            ow = ow_start + kw
            tw0, tw1, uw0, uw1 = _tap(ow, w, scale_w, ALIGN)
            hit = hit_h & ((tw0 == iw) | (tw1 == iw)) & (ow < W)
            wgt_w = tl.where(tw0 == iw, uw0, 0.0) + tl.where(tw1 == iw, uw1, 0.0)
            g = acc(tl.load(row_ptr + tl.minimum(ow, W - 1) * sgw, mask=hit, other=0.0), IS_FP64)
            row += tl.where(hit, wgt_w * g, 0.0)
            kw += 1
        total_acc += tl.where(hit_h, wgt_h * row, 0.0)
        kh += 1
    tl.store(gx_ptr + offs, total_acc.to(gx_ptr.dtype.element_ty), mask=mask)


def _window(in_size: int, out_size: int, align_corners: bool) -> int:
    """An upper bound on how many output indices read one input index along one axis.

    They are the dst whose source lies in [i - 1, i + 1) (a length-2 interval, scaled by
    out/in), widened to 2.5 for align_corners=False where the clamp at 0 maps the first
    outputs onto input 0 (and 1, with weight 0); +2 covers the boundary points and the
    rounding of the float formula. Never more than out_size."""
    if in_size == 1:
        return out_size
    if align_corners:
        bound = (2 * (out_size - 1)) // (in_size - 1)
    else:
        bound = (5 * out_size) // (2 * in_size)
    return min(out_size, bound + 2)


def _check_4d(t: torch.Tensor, name: str) -> None:
    if t.dim() != 4:
        raise RuntimeError(f"resattn_fast: {name} must be a 4-D (N, C, H, W) tensor, got "
                           f"{t.dim()}-D with shape {tuple(t.shape)}")
    if t.dtype not in _FLOATING:
        raise RuntimeError(f"resattn_fast: {name} must be float32, float64, float16 or "
                           f"bfloat16, got {t.dtype}")


def _check_size(size: List[int], name: str) -> None:
    if len(size) != 2 or min(size) < 1:
        raise RuntimeError(f"resattn_fast: {name} must be two ints >= 1, got {list(size)}")


@torch.library.triton_op(
    "resattn_fast::upsample_bilinear_add_triton",
    **triton_op_kwargs("(Tensor x, Tensor? skip, int[] size, bool align_corners) -> Tensor"),
)
def upsample_bilinear_add_triton(x: torch.Tensor, skip: Optional[torch.Tensor], size: List[int],
                                 align_corners: bool) -> torch.Tensor:
    """``F.interpolate(x, size, mode="bilinear", align_corners=...) + skip`` in one pass.

    x: (N, C, h, w); skip: (N, C, H, W) of x's dtype and device, or None; size: [H, W].
    Returns (N, C, H, W) in skip's memory format (x's without skip). Also the op's fake
    kernel (only torch ops and ``wrap_triton`` launches, which do nothing on fake tensors).
    """
    _check_4d(x, "x")
    _check_size(size, "size")
    if x.shape[2] < 1 or x.shape[3] < 1:
        raise RuntimeError(f"resattn_fast: x must have a non-empty spatial size, got {tuple(x.shape)}")
    H, W = int(size[0]), int(size[1])
    if skip is not None:
        _check_4d(skip, "skip")
        if skip.device != x.device or skip.dtype != x.dtype:
            raise RuntimeError("resattn_fast: x and skip must have the same dtype and device, got "
                               f"{x.dtype} on {x.device} and {skip.dtype} on {skip.device}")
        if skip.shape[:2] != x.shape[:2] or tuple(skip.shape[2:]) != (H, W):
            raise RuntimeError(f"resattn_fast: skip must have shape (N, C) + size = "
                               f"{tuple(x.shape[:2]) + (H, W)}, got {tuple(skip.shape)}")
    N, C, h, w = x.shape
    fmt = memory_format_of(skip if skip is not None else x)
    out = torch.empty((N, C, H, W), dtype=x.dtype, device=x.device, memory_format=fmt)
    total = out.numel()
    if total == 0:
        return out
    has_skip = skip is not None
    s = skip if has_skip else out  # never read without skip: any valid pointer will do
    sst = skip.stride() if has_skip else (0, 0, 0, 0)
    sh32, sh64 = _scales(int(h), H, bool(align_corners))
    sw32, sw64 = _scales(int(w), W, bool(align_corners))
    with device_guard(out):
        wrap_triton(_upsample_bilinear_add_fwd_kernel)[flat_grid(total)](
            x, s, out, total, size_class(total),
            C, H, W, h, w, sh32, sw32, sh64, sw64,
            *x.stride(),
            *sst,
            ALIGN=bool(align_corners), HAS_SKIP=has_skip,
            CHANNELS_LAST=fmt == torch.channels_last,
            IS_FP64=x.dtype == torch.float64,
            INT64=needs_int64(x, s, out),
        )
    return out


@torch.library.triton_op(
    "resattn_fast::upsample_bilinear_add_backward_triton",
    **triton_op_kwargs("(Tensor grad, int[] input_size, bool align_corners) -> Tensor"),
)
def upsample_bilinear_add_backward_triton(grad: torch.Tensor, input_size: List[int],
                                          align_corners: bool) -> torch.Tensor:
    """grad_x of the bilinear upsample: the adjoint interpolation of ``grad`` (N, C, H, W)
    back to ``input_size`` = [h, w], as a gather (each input element sums the weighted
    grads of the outputs that read it, in a fixed order, in float32/float64): no atomics,
    bit-identical across runs. Returns (N, C, h, w) in grad's memory format."""
    _check_4d(grad, "grad")
    _check_size(input_size, "input_size")
    if grad.shape[2] < 1 or grad.shape[3] < 1:
        raise RuntimeError(f"resattn_fast: grad must have a non-empty spatial size, got {tuple(grad.shape)}")
    N, C, H, W = grad.shape
    h, w = int(input_size[0]), int(input_size[1])
    fmt = memory_format_of(grad)
    grad_x = torch.empty((N, C, h, w), dtype=grad.dtype, device=grad.device, memory_format=fmt)
    total = grad_x.numel()
    if total == 0:
        return grad_x
    kh = _window(h, int(H), bool(align_corners))
    kw = _window(w, int(W), bool(align_corners))
    sh32, sh64 = _scales(h, int(H), bool(align_corners))
    sw32, sw64 = _scales(w, int(W), bool(align_corners))
    with device_guard(grad_x):
        wrap_triton(_upsample_bilinear_add_bwd_kernel)[flat_grid(total)](
            grad, grad_x, total, size_class(total),
            C, H, W, h, w, sh32, sw32, sh64, sw64,
            *grad.stride(),
            kh, kw,
            ALIGN=bool(align_corners), CHANNELS_LAST=fmt == torch.channels_last,
            IS_FP64=grad.dtype == torch.float64,
            INT64=needs_int64(grad, grad_x),
        )
    return grad_x


_registry.register_upsample(upsample_bilinear_add_triton, upsample_bilinear_add_backward_triton,
                            fakes=needs_fake(upsample_bilinear_add_triton))


def upsample_bilinear_add(x: torch.Tensor, skip: Optional[torch.Tensor], size: List[int],
                          align_corners: bool) -> torch.Tensor:
    """Differentiable upsample + add on the Triton kernels (inputs already validated by
    ``resattn_fast.ops.upsample_bilinear_add``); see upsample_bilinear_add_triton."""
    return upsample_bilinear_add_triton(x, skip, list(size), bool(align_corners))


def upsample_bilinear_add_backward(grad: torch.Tensor, input_size: List[int],
                                   align_corners: bool) -> torch.Tensor:
    """grad_x on the Triton kernels; see upsample_bilinear_add_backward_triton."""
    return upsample_bilinear_add_backward_triton(grad, list(input_size), bool(align_corners))
