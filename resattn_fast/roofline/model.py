"""The roofline model: time of each traced kernel on a GPU, and the memory of a step.

A kernel takes ``max(FLOPs / matrix rate, bytes / bandwidth) + launches * launch
overhead``: it is either compute-bound (convolutions and matrix products, on the tensor
cores at the datasheet's dense rate) or memory-bound (everything else, at the datasheet's
DRAM bandwidth), never both, and caches are ignored (every tensor comes from DRAM once).
Peak rates are not reached in practice, so the times are lower bounds and the shares of
the memory-bound classes are what to read; one GPU run (``--measured``) says how far off.

Memory of a step: parameters + gradients + optimizer state + buffers + the peak of
everything else the step holds at once (activations kept for backward, gradients and
temporaries in flight, recomputation in backward; ``StepTrace.peak_bytes``, followed
storage by storage), within the GPU's usable memory (devices.Gpu.usable_bytes).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, Iterable

from .devices import Gpu
from .step import StepTrace
from .trace import BN_RELU_ADD_CLASSES, CLASSES, SOFT_MASK_CLASSES, KernelRecord

__all__ = ["kernel_seconds", "StepPrediction", "predict_step", "predict_kernels", "max_batch"]


def kernel_seconds(rec: KernelRecord, gpu: Gpu) -> float:
    """Predicted seconds of one record on ``gpu``."""
    compute = rec.flops / gpu.matmul_rate(rec.dtype, rec.op) if rec.matmul and rec.flops else 0.0
    memory = rec.bytes / gpu.bandwidth
    return max(compute, memory) + rec.launches * gpu.launch_s


def predict_kernels(records: Iterable[KernelRecord], gpu: Gpu) -> Dict[str, float]:
    """Totals of a list of kernels: ms, bytes, flops, launches."""
    recs = list(records)
    return {
        "ms": 1e3 * sum(kernel_seconds(r, gpu) for r in recs),
        "bytes": float(sum(r.bytes for r in recs)),
        "flops": float(sum(r.flops for r in recs)),
        "launches": float(sum(r.launches for r in recs)),
    }


@dataclass
class StepPrediction:
    """A step's predicted time, split by op class and phase, and its memory."""

    trace: StepTrace
    gpu: Gpu
    step_ms: float
    class_ms: OrderedDict[str, float]
    class_bytes: OrderedDict[str, float]
    phase_ms: Dict[str, float]
    step_bytes: float
    step_flops: float
    launches: int
    memory_bytes: float  # predicted peak at trace.batch
    max_batch: int
    compute_bound_ms: float  # of step_ms, in kernels where FLOPs / rate exceeds bytes / bandwidth

    @property
    def images_per_s(self) -> float:
        return self.trace.batch / (self.step_ms / 1e3) if self.step_ms else math.nan

    def share(self, cls: str) -> float:
        return self.class_ms.get(cls, 0.0) / self.step_ms if self.step_ms else math.nan

    @property
    def soft_mask_share(self) -> float:
        return sum(self.share(c) for c in SOFT_MASK_CLASSES)

    @property
    def bn_relu_add_share(self) -> float:
        """Batch norm, ReLU, the residual adds and gradient sums, fused or not."""
        return sum(self.share(c) for c in BN_RELU_ADD_CLASSES)


def _static_bytes(tr: StepTrace) -> float:
    return float(tr.param_bytes + tr.grad_bytes + tr.optimizer_state_bytes + tr.buffer_bytes)


def max_batch(tr: StepTrace, gpu: Gpu) -> int:
    """Largest batch whose predicted memory fits: the step's peak grows in proportion to
    the batch; parameters, gradients, optimizer state and buffers do not."""
    per_image = tr.peak_bytes / tr.batch
    room = gpu.usable_bytes() - _static_bytes(tr)
    if per_image <= 0 or room <= 0:
        return 0
    return int(room // per_image)


def predict_step(tr: StepTrace, gpu: Gpu) -> StepPrediction:
    """Predicted time and memory of a traced step on ``gpu``."""
    class_ms: OrderedDict[str, float] = OrderedDict((c, 0.0) for c in CLASSES)
    class_bytes: OrderedDict[str, float] = OrderedDict((c, 0.0) for c in CLASSES)
    phase_ms: Dict[str, float] = {}
    compute_ms = 0.0
    for r in tr.records:
        ms = 1e3 * kernel_seconds(r, gpu)
        class_ms[r.cls] = class_ms.get(r.cls, 0.0) + ms
        class_bytes[r.cls] = class_bytes.get(r.cls, 0.0) + r.bytes
        phase_ms[r.phase] = phase_ms.get(r.phase, 0.0) + ms
        if r.matmul and r.flops / gpu.matmul_rate(r.dtype, r.op) > r.bytes / gpu.bandwidth:
            compute_ms += ms
    memory = _static_bytes(tr) + tr.peak_bytes
    return StepPrediction(
        trace=tr, gpu=gpu, step_ms=sum(class_ms.values()), class_ms=class_ms, class_bytes=class_bytes,
        phase_ms=phase_ms, step_bytes=float(sum(r.bytes for r in tr.records)),
        step_flops=float(sum(r.flops for r in tr.records)), launches=sum(r.launches for r in tr.records),
        memory_bytes=memory, max_batch=max_batch(tr, gpu), compute_bound_ms=compute_ms)
