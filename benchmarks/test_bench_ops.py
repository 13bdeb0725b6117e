"""``pytest benchmarks/`` (with pytest-benchmark: ``--benchmark-only``, ``--benchmark-json``):
the two fused ops at the stage-1 shape of Attention-56/92 (batch 2 from 28x28 to 56x56,
float32 on the CPU, bfloat16 on a GPU), forward and forward+backward, for eager PyTorch,
torch.compile of the same expression and each fused backend available on the device.

The full comparison (every stage, dtype and layout, bandwidth vs copy, memory, networks,
report and plots) is ``python benchmarks/run.py``; this module is the pytest-driven view.
"""

from __future__ import annotations

from typing import Callable, List

import pytest
import torch

from benchmarks.bench_ops import ATTENTION, UPSAMPLE, OpCase, _impl_fn, _make_inputs
from resattn_fast.ops import available_backends

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
CASES = {
    UPSAMPLE: OpCase(UPSAMPLE, "stage 1", 2, 256, (56, 56), (28, 28), skip=True),
    ATTENTION: OpCase(ATTENTION, "stage 1", 2, 256, (56, 56)),
}
# Triton on the CPU is the interpreter (a correctness tool), not a speed path.
FUSED = [b for b in available_backends(DEVICE) if b not in ("reference",)
         and not (b == "triton" and DEVICE.type == "cpu")]
IMPLS = [("eager", "reference"), ("compile", "inductor")] + [("fused", b) for b in FUSED]


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl,backend", IMPLS, ids=[f"{i}-{b}" for i, b in IMPLS])
@pytest.mark.parametrize("op", [UPSAMPLE, ATTENTION])
def test_op(benchmark: object, op: str, impl: str, backend: str, mode: str) -> None:
    case = CASES[op]
    fn = _impl_fn(case, impl, backend)
    xs: List[torch.Tensor] = _make_inputs(case, DTYPE, "nchw", DEVICE, mode != "fwd")
    if mode == "fwd":
        def run() -> None:
            with torch.no_grad():
                fn(*xs)
            _sync()
    else:
        grad = torch.ones(case.out_shape, device=DEVICE, dtype=DTYPE)

        def run() -> None:
            torch.autograd.grad(fn(*xs), xs, grad)
            _sync()
    call: Callable[[], None] = run
    call()  # compile / first-call costs stay out of the timed rounds
    benchmark.pedantic(call, rounds=10, warmup_rounds=2, iterations=1)  # type: ignore[attr-defined]
