"""Fake kernels and autograd for the `resattn_fast` ops, shared by every compiled backend.

The C++ ops (torch.ops.resattn_fast.<op>, kernels from csrc/cpu and kernels/*.cu) and
the Triton ops (torch.ops.resattn_fast.<op>_triton) have the same signatures, so one set
of fake kernels and one autograd formula serves both: ``register_op_pair`` wires a
forward op to its backward op.

What backward keeps (checked by the tests): upsample_bilinear_add keeps no tensor, only
the input size; attention_residual keeps its two inputs and nothing else.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import torch

from .._format import memory_format_of

__all__ = [
    "upsample_fake",
    "upsample_backward_fake",
    "attention_fake",
    "attention_backward_fake",
    "register_upsample",
    "register_attention",
]


# Fake kernels: shapes, dtypes and memory formats only --------------------------------
def upsample_fake(x: torch.Tensor, skip: Optional[torch.Tensor], size: Sequence[int],
                  align_corners: bool) -> torch.Tensor:
    fmt = memory_format_of(skip if skip is not None else x)
    return torch.empty((x.shape[0], x.shape[1], size[0], size[1]), dtype=x.dtype,
                       device=x.device, memory_format=fmt)


def upsample_backward_fake(grad: torch.Tensor, input_size: Sequence[int],
                           align_corners: bool) -> torch.Tensor:
    return torch.empty((grad.shape[0], grad.shape[1], input_size[0], input_size[1]),
                       dtype=grad.dtype, device=grad.device, memory_format=memory_format_of(grad))


def attention_fake(mask_logits: torch.Tensor, trunk: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(trunk, memory_format=torch.preserve_format)


def attention_backward_fake(grad: torch.Tensor, mask_logits: torch.Tensor,
                            trunk: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    return (torch.empty_like(mask_logits, memory_format=torch.preserve_format),
            torch.empty_like(trunk, memory_format=torch.preserve_format))


# Autograd ------------------------------------------------------------------------------
def register_upsample(forward: Any, backward: Any, *, fakes: bool = True) -> None:
    """``forward`` and ``backward`` are ops (OpOverload or CustomOpDef), callable. Wire ``forward(x, skip, size, align_corners)`` to ``backward(grad, input_size,
    align_corners)``; the backward is linear in grad, so its own gradient is the forward
    without skip (double backward works)."""
    if fakes:
        torch.library.register_fake(forward)(upsample_fake)
        torch.library.register_fake(backward)(upsample_backward_fake)

    def setup_context(ctx: Any, inputs: Tuple[Any, ...], output: torch.Tensor) -> None:
        x, skip, _size, align_corners = inputs
        ctx.input_size = [int(x.shape[-2]), int(x.shape[-1])]
        ctx.align_corners = bool(align_corners)
        ctx.has_skip = skip is not None

    def backward_fn(ctx: Any, grad: torch.Tensor) -> Tuple[Any, ...]:
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = backward(grad, ctx.input_size, ctx.align_corners)
        grad_skip = grad if ctx.has_skip and ctx.needs_input_grad[1] else None
        return grad_x, grad_skip, None, None

    torch.library.register_autograd(forward, backward_fn, setup_context=setup_context)

    def setup_context_bwd(ctx: Any, inputs: Tuple[Any, ...], output: torch.Tensor) -> None:
        grad, _input_size, align_corners = inputs
        ctx.output_size = [int(grad.shape[-2]), int(grad.shape[-1])]
        ctx.align_corners = bool(align_corners)

    def backward_of_backward(ctx: Any, gg: torch.Tensor) -> Tuple[Any, ...]:
        return forward(gg, None, ctx.output_size, ctx.align_corners), None, None

    torch.library.register_autograd(backward, backward_of_backward, setup_context=setup_context_bwd)


def register_attention(forward: Any, backward: Any, *, fakes: bool = True) -> None:
    """Wire ``forward(mask_logits, trunk)`` to ``backward(grad, mask_logits, trunk)``,
    which returns (grad_mask_logits, grad_trunk). Only the two inputs are saved."""
    if fakes:
        torch.library.register_fake(forward)(attention_fake)
        torch.library.register_fake(backward)(attention_backward_fake)

    def setup_context(ctx: Any, inputs: Tuple[Any, ...], output: torch.Tensor) -> None:
        mask_logits, trunk = inputs
        ctx.save_for_backward(mask_logits, trunk)

    def backward_fn(ctx: Any, grad: torch.Tensor) -> Tuple[Any, ...]:
        mask_logits, trunk = ctx.saved_tensors
        grad_m, grad_f = backward(grad, mask_logits, trunk)
        return (grad_m if ctx.needs_input_grad[0] else None,
                grad_f if ctx.needs_input_grad[1] else None)

    torch.library.register_autograd(forward, backward_fn, setup_context=setup_context)


def register_compiled_ops(namespace: str = "resattn_fast") -> List[str]:
    """Register fakes and autograd for the C++ ops of resattn_fast._C (once, at import), or
    of the emulated CUDA kernels (namespace ``resattn_fast_emulated``)."""
    ops = getattr(torch.ops, namespace)
    register_upsample(ops.upsample_bilinear_add.default, ops.upsample_bilinear_add_backward.default)
    register_attention(ops.attention_residual.default, ops.attention_residual_backward.default)
    return ["upsample_bilinear_add", "attention_residual"]
