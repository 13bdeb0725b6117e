"""Fake kernels and autograd for the `resattn_fast` ops, shared by every compiled backend.

The C++ ops (torch.ops.resattn_fast.<op>, kernels from csrc/cpu and kernels/*.cu) and
the Triton ops (torch.ops.resattn_fast.<op>_triton) have the same signatures, so one set
of fake kernels and one autograd formula serves both: ``register_op_pair`` wires a
forward op to its backward op.

What backward keeps (checked by the tests): upsample_bilinear_add keeps no tensor, only
the input size; attention_residual keeps its two inputs and nothing else;
batch_norm_relu keeps x, weight, bias and the per-channel mean and variance (never its
output: the ReLU mask and x_hat are recomputed).
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
    "register_batch_norm_relu",
    "bn_acc_dtype",
    "batch_norm_relu_fake",
    "batch_norm_relu_backward_fake",
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


def bn_acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype batch_norm_relu accumulates and returns its statistics in."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def batch_norm_relu_fake(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                         running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
                         training: bool, eps: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=memory_format_of(x))
    stat = bn_acc_dtype(x.dtype)
    return (out, x.new_empty((x.shape[1],), dtype=stat), x.new_empty((x.shape[1],), dtype=stat))


def batch_norm_relu_backward_fake(grad: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor],
                                  bias: Optional[torch.Tensor], mean: torch.Tensor, var: torch.Tensor,
                                  training: bool, eps: float, grad_residual: Optional[torch.Tensor],
                                  weight_grads: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=memory_format_of(x))
    stat = bn_acc_dtype(x.dtype)
    c = x.shape[1] if weight_grads else 0
    gw = x.new_empty((c,), dtype=weight.dtype if weight is not None else stat)
    gb = x.new_empty((c,), dtype=bias.dtype if bias is not None else stat)
    return grad_x, gw, gb


def batch_norm_update_stats_fake(running_mean: torch.Tensor, running_var: torch.Tensor,
                                 mean: torch.Tensor, var: torch.Tensor, momentum: float,
                                 count: int, num_batches_tracked: Optional[torch.Tensor]) -> None:
    return None


def batch_norm_relu_with_update_fake(x: torch.Tensor, weight: Optional[torch.Tensor],
                                     bias: Optional[torch.Tensor], running_mean: torch.Tensor,
                                     running_var: torch.Tensor, momentum: float, eps: float,
                                     num_batches_tracked: Optional[torch.Tensor],
                                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return batch_norm_relu_fake(x, weight, bias, running_mean, running_var, True, eps)


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


def register_batch_norm_relu(forward: Any, backward: Any, update: Any, with_update: Any, *,
                             fakes: bool = True) -> None:
    """Wire ``forward(x, weight, bias, running_mean, running_var, training, eps)`` ->
    (out, mean, var) to ``backward(grad, x, weight, bias, mean, var, training, eps,
    grad_residual, weight_grads)`` -> (grad_x, grad_weight, grad_bias). Saved: x, weight,
    bias, mean, var (never the output). mean and var are not differentiable (they feed
    the running statistics, ``update``). No double backward. ``with_update`` (training
    forward and running update, a mutating op) gets its fake only: register_autograd
    takes no mutating op, and resattn_fast.ops differentiates it with ``backward`` in an
    autograd.Function."""
    if fakes:
        torch.library.register_fake(forward)(batch_norm_relu_fake)
        torch.library.register_fake(backward)(batch_norm_relu_backward_fake)
        torch.library.register_fake(update)(batch_norm_update_stats_fake)
        torch.library.register_fake(with_update)(batch_norm_relu_with_update_fake)

    def setup_context(ctx: Any, inputs: Tuple[Any, ...], output: Tuple[torch.Tensor, ...]) -> None:
        x, weight, bias, _rm, _rv, training, eps = inputs
        _out, mean, var = output
        ctx.save_for_backward(x, weight, bias, mean, var)
        ctx.training, ctx.eps = bool(training), float(eps)
        ctx.mark_non_differentiable(mean, var)
        # mean and var never receive a gradient: without this autograd would fill two
        # (C,) zero tensors per call (two kernel launches each on a GPU) to pass here.
        ctx.set_materialize_grads(False)

    def backward_fn(ctx: Any, grad: Optional[torch.Tensor], _gm: Any, _gv: Any) -> Tuple[Any, ...]:
        if grad is None:  # the output was not used
            return (None,) * 7
        x, weight, bias, mean, var = ctx.saved_tensors
        need = ctx.needs_input_grad
        weight_grads = bool((weight is not None and need[1]) or (bias is not None and need[2]))
        grad_x, gw, gb = backward(grad, x, weight, bias, mean, var, ctx.training, ctx.eps, None,
                                  weight_grads)
        return (grad_x if need[0] else None,
                gw if weight is not None and need[1] else None,
                gb if bias is not None and need[2] else None,
                None, None, None, None)

    torch.library.register_autograd(forward, backward_fn, setup_context=setup_context)


def register_compiled_ops(namespace: str = "resattn_fast") -> List[str]:
    """Register fakes and autograd for the C++ ops of resattn_fast._C (once, at import), or
    of the emulated CUDA kernels (namespace ``resattn_fast_emulated``)."""
    ops = getattr(torch.ops, namespace)
    register_upsample(ops.upsample_bilinear_add.default, ops.upsample_bilinear_add_backward.default)
    register_attention(ops.attention_residual.default, ops.attention_residual_backward.default)
    register_batch_norm_relu(ops.batch_norm_relu.default, ops.batch_norm_relu_backward.default,
                             ops.batch_norm_update_stats.default,
                             ops.batch_norm_relu_with_update.default)
    return ["upsample_bilinear_add", "attention_residual", "batch_norm_relu"]
