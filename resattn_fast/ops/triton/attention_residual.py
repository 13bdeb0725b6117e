"""Triton kernels of ``attention_residual``: ``(1 + sigmoid(m)) * trunk`` and its backward.

Registered as ``torch.ops.resattn_fast.attention_residual_triton`` and
``torch.ops.resattn_fast.attention_residual_backward_triton`` with
``torch.library.triton_op`` (kernels launched through ``wrap_triton``, so torch.compile
traces into them); autograd comes from ``resattn_fast.ops._registry`` and saves only the
two inputs.

The op is elementwise over any shape. The output is allocated like ``trunk``
(``preserve_format``: NCHW, channels_last or any other dense layout); operands laid out
differently (mixed formats, non-dense views, expanded gradients) are copied into that
layout first, so the kernels always walk one flat, dense offset.
"""

from typing import Tuple

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .. import _registry
from ._common import (
    acc,
    configs,
    dense_like,
    device_guard,
    flat_grid,
    needs_fake,
    needs_int64,
    same_layout,
    size_class,
    triton_op_kwargs,
)

__all__ = ["attention_residual", "attention_residual_backward"]

_FLOATING = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

# (BLOCK, num_warps): memory-bound elementwise kernels.
_CONFIGS = configs([(1024, 4), (2048, 8), (4096, 8)], interpreted_block=4096)


@triton.jit
def _sigmoid(m):
    # 1 / (1 + exp(-m)) saturates to exactly 0 or 1 for large |m| (exp overflows to
    # inf, 1 / inf = 0) and never gives NaN for finite m (same formula as kernels/sigmoid.h).
    return 1.0 / (1.0 + tl.exp(-m))


# Autotuned once per size class (size_class(numel), in the key; unused by the kernel).
@triton.autotune(configs=_CONFIGS, key=["size_cls", "INT64"])
@triton.jit(do_not_specialize=["size_cls"])
def _attention_residual_fwd_kernel(
    m_ptr, f_ptr, out_ptr, numel, size_cls,
    IS_FP64: tl.constexpr, INT64: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    if INT64:
        pid = pid.to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    m = acc(tl.load(m_ptr + offs, mask=mask, other=0.0), IS_FP64)
    f = acc(tl.load(f_ptr + offs, mask=mask, other=0.0), IS_FP64)
    out = (1.0 + _sigmoid(m)) * f
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.autotune(configs=_CONFIGS, key=["size_cls", "INT64"])
@triton.jit(do_not_specialize=["size_cls"])
def _attention_residual_bwd_kernel(
    g_ptr, m_ptr, f_ptr, gm_ptr, gf_ptr, numel, size_cls,
    IS_FP64: tl.constexpr, INT64: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    if INT64:
        pid = pid.to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    g = acc(tl.load(g_ptr + offs, mask=mask, other=0.0), IS_FP64)
    m = acc(tl.load(m_ptr + offs, mask=mask, other=0.0), IS_FP64)
    f = acc(tl.load(f_ptr + offs, mask=mask, other=0.0), IS_FP64)
    s = _sigmoid(m)
    grad_f = g * (1.0 + s)
    grad_m = g * f * s * (1.0 - s)
    tl.store(gm_ptr + offs, grad_m.to(gm_ptr.dtype.element_ty), mask=mask)
    tl.store(gf_ptr + offs, grad_f.to(gf_ptr.dtype.element_ty), mask=mask)


def _check(mask_logits: torch.Tensor, trunk: torch.Tensor, what: str) -> None:
    """The C++ op's checks (csrc/checks.h), for direct ``torch.ops`` calls."""
    if mask_logits.dtype not in _FLOATING:
        raise RuntimeError(f"resattn_fast: {what} must be float32, float64, float16 or "
                           f"bfloat16, got {mask_logits.dtype}")
    if mask_logits.device != trunk.device:
        raise RuntimeError(f"resattn_fast: {what} and trunk must be on the same device, "
                           f"got {mask_logits.device} and {trunk.device}")
    if mask_logits.dtype != trunk.dtype:
        raise RuntimeError(f"resattn_fast: {what} and trunk must have the same dtype, "
                           f"got {mask_logits.dtype} and {trunk.dtype}")
    if mask_logits.shape != trunk.shape:
        raise RuntimeError(f"resattn_fast: {what} and trunk must have the same shape, "
                           f"got {tuple(mask_logits.shape)} and {tuple(trunk.shape)}")


@torch.library.triton_op(
    "resattn_fast::attention_residual_triton",
    **triton_op_kwargs("(Tensor mask_logits, Tensor trunk) -> Tensor"),
)
def attention_residual_triton(mask_logits: torch.Tensor, trunk: torch.Tensor) -> torch.Tensor:
    """``(1 + sigmoid(mask_logits)) * trunk``: any shape, float32/float64/float16/bfloat16,
    output laid out like ``trunk``. Also the op's fake kernel (only torch ops and
    ``wrap_triton`` launches, which do nothing on fake tensors)."""
    _check(mask_logits, trunk, "mask_logits")
    out = torch.empty_like(trunk, memory_format=torch.preserve_format)
    numel = out.numel()
    if numel == 0:
        return out
    m = dense_like(mask_logits, out)
    f = dense_like(trunk, out)
    with device_guard(out):
        wrap_triton(_attention_residual_fwd_kernel)[flat_grid(numel)](
            m, f, out, numel, size_class(numel),
            IS_FP64=out.dtype == torch.float64, INT64=needs_int64(out),
        )
    return out


@torch.library.triton_op(
    "resattn_fast::attention_residual_backward_triton",
    **triton_op_kwargs("(Tensor grad, Tensor mask_logits, Tensor trunk) -> (Tensor, Tensor)"),
)
def attention_residual_backward_triton(
    grad: torch.Tensor, mask_logits: torch.Tensor, trunk: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(grad_mask_logits, grad_trunk) = (g * trunk * s * (1 - s), g * (1 + s)), s = sigmoid(m).

    Each gradient is laid out like its input. Both are computed in trunk's layout; when
    mask_logits is laid out differently its gradient is copied once into that layout.
    """
    _check(mask_logits, trunk, "mask_logits")
    _check(grad, trunk, "grad")
    grad_f = torch.empty_like(trunk, memory_format=torch.preserve_format)
    grad_m = torch.empty_like(mask_logits, memory_format=torch.preserve_format)
    numel = grad_f.numel()
    if numel == 0:
        return grad_m, grad_f
    g = dense_like(grad, grad_f)
    m = dense_like(mask_logits, grad_f)
    f = dense_like(trunk, grad_f)
    direct = same_layout(grad_m, grad_f)
    gm = grad_m if direct else torch.empty_like(grad_f)
    with device_guard(grad_f):
        wrap_triton(_attention_residual_bwd_kernel)[flat_grid(numel)](
            g, m, f, gm, grad_f, numel, size_class(numel),
            IS_FP64=grad_f.dtype == torch.float64, INT64=needs_int64(grad_f),
        )
    if not direct:
        grad_m.copy_(gm)
    return grad_m, grad_f


_registry.register_attention(attention_residual_triton, attention_residual_backward_triton,
                             fakes=needs_fake(attention_residual_triton))


def attention_residual(mask_logits: torch.Tensor, trunk: torch.Tensor) -> torch.Tensor:
    """Differentiable ``(1 + sigmoid(mask_logits)) * trunk`` on the Triton kernels (inputs
    already validated by ``resattn_fast.ops.attention_residual``)."""
    return attention_residual_triton(mask_logits, trunk)


def attention_residual_backward(grad: torch.Tensor, mask_logits: torch.Tensor,
                                trunk: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(grad_mask_logits, grad_trunk) on the Triton kernels."""
    return attention_residual_backward_triton(grad, mask_logits, trunk)
