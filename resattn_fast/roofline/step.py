"""Trace one training step of a network, or one fused op, on fake tensors.

A step is what the models suite times and the trainer runs: forward under autocast
(bfloat16 AMP) or in float32, cross-entropy, backward, optimizer step. The optimizer is
the project's recipe (SGD, Nesterov momentum 0.9, weight decay 1e-4; ``"nesterov"``) or
the models suite's plain SGD (``"sgd"``, for calibration against its measurements), both
with ``foreach=True`` as PyTorch picks for CUDA parameters. The momentum buffers exist
before the step (a steady-state step, not the first).

Everything runs under ``FakeTensorMode`` on CPU fake tensors: no memory, no compute.
AMP is traced with CPU autocast, whose bfloat16 policy matches CUDA's for every op of
these networks (convolutions and the classifier in bfloat16; batch norm, ReLU, pooling,
upsample and the elementwise ops in their input's dtype; cross-entropy in float32),
except log_softmax of the logits (CUDA: float32; a negligible 64x1000 tensor). The fast
model runs the ``cpu`` backend so that its soft-mask ops are the registered custom ops
``torch.ops.resattn_fast.*``, which dispatch to their fake kernels here; ``trace_step``
checks that they, and no eager upsample or sigmoid, appear.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from .trace import (
    REGION_ATTEND,
    REGION_BN,
    REGION_UPSAMPLE,
    KernelRecord,
    Tracer,
    mark_region,
    region_of_module,
)

__all__ = ["StepTrace", "OpTrace", "trace_step", "trace_op", "fast_backend_problem", "CHECKPOINT_MODES"]

# set_grad_checkpointing's modes: keep everything; recompute the BN-ReLU outputs from the
# unit inputs and statistics (no convolution reruns); recompute each block.
CHECKPOINT_MODES = ("none", "selective", "full")


@dataclass
class StepTrace:
    """One traced training step; bytes are per step, ``fwd_flops`` per image."""

    net: str
    impl: str
    batch: int
    input_size: int
    amp: bool
    channels_last: bool
    optimizer: str
    records: List[KernelRecord]
    fwd_flops_per_image: float  # the forward's records' FLOPs (flop_counter's formulas) / batch
    activation_bytes: int  # alive at the end of the forward pass (kept for backward), with the input batch
    peak_bytes: int  # most alive at once from the forward's start to the backward's end (the same storages)
    param_bytes: int
    grad_bytes: int
    optimizer_state_bytes: int
    buffer_bytes: int
    ops_seen: Dict[str, int] = field(default_factory=dict)
    checkpointing: str = "none"


def fast_backend_problem() -> Optional[str]:
    """None if the registered fused ops can be traced, else why not."""
    from resattn_fast.ops._backends import _why_not

    return _why_not("cpu", "cpu")


def _set_checkpointing(model: torch.nn.Module, mode: str) -> None:
    """``model.set_grad_checkpointing(mode)``, checking that the mode took effect."""
    if mode not in CHECKPOINT_MODES:
        raise ValueError(f"checkpointing must be one of {CHECKPOINT_MODES}, got {mode!r}")
    model.set_grad_checkpointing({"none": False, "full": True}.get(mode, mode))  # type: ignore[operator]
    if mode == "selective" and getattr(model, "checkpoint_mode", None) != "selective":
        raise ValueError("this resattn_fast has no selective checkpointing: set_grad_checkpointing('selective') "
                         "is not one of its modes")


def _to_channels_last(model: torch.nn.Module) -> None:
    # Module.to(memory_format=...) swaps parameters, which fake parameters refuse
    # ("weakref associated"); setting .data keeps the Parameter objects.
    for p in model.parameters():
        if p.dim() == 4:
            p.data = p.data.contiguous(memory_format=torch.channels_last)


def _instrument(model: torch.nn.Module, tracer: Tracer) -> None:
    from resattn_fast.reference.modules import AttentionModule

    for mod in model.modules():
        if isinstance(mod, AttentionModule):
            mod.upsample_add = mark_region(tracer, mod.upsample_add, REGION_UPSAMPLE)  # type: ignore[method-assign]
            mod.attend = mark_region(tracer, mod.attend, REGION_ATTEND)  # type: ignore[method-assign]
        elif isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
            region_of_module(tracer, mod, REGION_BN)


def _check_ops(impl: str, ops_seen: Dict[str, int]) -> None:
    fused = [k for k in ops_seen if k.startswith("resattn_fast.")]
    eager = [k for k in ops_seen if k in ("aten.upsample_bilinear2d", "aten.sigmoid")]
    if impl == "fast" and (len(fused) < 4 or eager):
        raise RuntimeError(f"the fast model's trace does not run the fused ops as expected: fused {fused}, "
                           f"eager soft-mask ops {eager}")
    if impl == "reference" and fused:
        raise RuntimeError(f"the reference model's trace runs fused ops: {fused}")


def trace_step(net: str, impl: str, batch: int, *, amp: bool = True, channels_last: bool = True,
               optimizer: str = "nesterov", checkpointing: str = "none",
               image_size: Optional[int] = None) -> StepTrace:
    """Trace one training step of ``net`` (a create_model name) built with ``impl``
    ("reference" or "fast"), at ``batch`` images of ``image_size`` (default: the
    network's), with ``model.set_grad_checkpointing(checkpointing)``.

    Memory: the storages the step creates are followed from birth to death
    (``LiveStorages``; parameters, buffers, optimizer state and the parameters' gradients
    left out, the input batch counted): ``activation_bytes`` is what is alive when the
    forward pass ends, ``peak_bytes`` the most alive at once until the backward pass ends
    (recomputation included)."""
    import resattn_fast
    from resattn_fast.models import CONFIGS

    size = image_size or CONFIGS[net].input_size
    tracer = Tracer(memory=True)
    mem = tracer.memory
    assert mem is not None
    with FakeTensorMode():
        torch.manual_seed(0)
        model = resattn_fast.create_model(net, impl=impl, backend="cpu" if impl == "fast" else None)
        model.train()
        _set_checkpointing(model, checkpointing)
        if channels_last:
            _to_channels_last(model)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        x = torch.randn(batch, 3, size, size).contiguous(memory_format=fmt)
        y = torch.randint(0, model.num_classes, (batch,))
        params = list(model.parameters())
        if optimizer == "nesterov":
            opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4, foreach=True)
            for p in params:  # steady state: the buffers exist (the first step would clone the grads)
                opt.state[p]["momentum_buffer"] = torch.zeros_like(p)
        elif optimizer == "sgd":
            opt = torch.optim.SGD(params, lr=1e-3, foreach=True)
        else:
            raise ValueError(f"optimizer must be 'nesterov' or 'sgd', got {optimizer!r}")
        _instrument(model, tracer)
        autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if amp else contextlib.nullcontext())
        state = [v for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
        mem.ignore(params + list(model.buffers()) + state + [x, y])

        def step() -> None:
            with autocast:
                loss = F.cross_entropy(model(x), y)
            mem.mark("forward")
            tracer.phase = "backward"
            loss.backward()
            del loss
            mem.mark("backward")
            tracer.phase = "optimizer"
            opt.step()

        with tracer:
            step()
        records = tracer.records
        ops_seen = dict(tracer.ops_seen)
        _check_ops(impl, ops_seen)
        grads = {mem.serial(p.grad) for p in params if p.grad is not None} - {None}
        input_bytes = x.untyped_storage().nbytes()
        param_bytes = sum(p.numel() * p.element_size() for p in params)
        grad_bytes = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
        state_bytes = sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
                          if isinstance(v, torch.Tensor))
        buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
    return StepTrace(
        net=net, impl=impl, batch=batch, input_size=size, amp=amp, channels_last=channels_last,
        optimizer=optimizer, records=records, fwd_flops_per_image=sum(r.flops for r in records if r.phase == "forward") / batch,
        activation_bytes=input_bytes + mem.live_bytes("forward", grads),
        peak_bytes=input_bytes + mem.peak_bytes("backward", grads), param_bytes=param_bytes, grad_bytes=grad_bytes,
        optimizer_state_bytes=state_bytes, buffer_bytes=buffer_bytes, ops_seen=ops_seen, checkpointing=checkpointing)


@dataclass
class OpTrace:
    """One fused op (or its eager expression) traced forward, backward, and both."""

    op: str
    impl: str  # "eager" (resattn_fast.reference.ops) or "fused" (the registered op)
    records: Dict[str, List[KernelRecord]]  # mode ("fwd", "bwd", "fwd+bwd") -> kernels


def trace_op(op: str, impl: str, shapes: Sequence[Tuple[int, ...]], out_hw: Optional[Tuple[int, int]],
             dtype: torch.dtype, channels_last: bool) -> OpTrace:
    """Trace ``op`` ("upsample_bilinear_add", "attention_residual" or "batch_norm_relu") on
    inputs of ``shapes`` (upsample: x[, skip]; attention: mask_logits, trunk; BN-ReLU: x, in
    training, with float32 weight, bias and running statistics) in ``dtype``. Forward alone
    runs without autograd (as the ops suite's "fwd" rows), the backward is
    ``torch.autograd.grad`` of every input (and of the BN-ReLU's weight and bias)."""
    import resattn_fast.ops as fused
    from resattn_fast.reference import ops as ref

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    params: List[torch.Tensor] = []
    stats: List[torch.Tensor] = []

    def fn(*xs: torch.Tensor) -> torch.Tensor:
        if op == "batch_norm_relu":
            f = fused.batch_norm_relu if impl == "fused" else ref.batch_norm_relu
            kw = {"backend": "cpu"} if impl == "fused" else {}
            return f(xs[0], stats[0], stats[1], params[0], params[1], True, 0.1, 1e-5, **kw)  # type: ignore[return-value]
        if op == "upsample_bilinear_add":
            skip = xs[1] if len(xs) > 1 else None
            if impl == "fused":
                return fused.upsample_bilinear_add(xs[0], skip, size=list(out_hw or ()), backend="cpu")
            return ref.upsample_bilinear_add(xs[0], skip, size=list(out_hw or ()))
        if impl == "fused":
            return fused.attention_residual(xs[0], xs[1], backend="cpu")
        return ref.attention_residual(xs[0], xs[1])

    out: Dict[str, List[KernelRecord]] = {}
    with FakeTensorMode():
        xs = [torch.randn(*s, dtype=dtype).contiguous(memory_format=fmt).requires_grad_() for s in shapes]
        if op == "batch_norm_relu":
            c = shapes[0][1]
            params += [torch.ones(c, requires_grad=True), torch.zeros(c, requires_grad=True)]
            stats += [torch.zeros(c), torch.ones(c)]
        tracer = Tracer()
        with tracer, torch.no_grad():
            y = fn(*xs)
        out["fwd"] = tracer.records
        y = fn(*xs)
        g = torch.randn_like(y)
        tracer = Tracer()
        tracer.phase = "backward"
        with tracer:
            torch.autograd.grad(y, xs + params, g)
        out["bwd"] = tracer.records
        tracer = Tracer()
        with tracer:
            y = fn(*xs)
            tracer.phase = "backward"
            torch.autograd.grad(y, xs + params, g)
        out["fwd+bwd"] = tracer.records
    return OpTrace(op=op, impl=impl, records=out)
