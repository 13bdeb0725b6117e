"""The 32/64-bit index decision of both GPU backends, at its boundary, without a GPU.

The kernels do their index math in int32 (cheaper divisions) unless an element count or
an element offset can pass 2**31 - 1: ``needs_int64`` decides it for the Triton kernels
(resattn_fast/ops/triton/_common.py), ``fits_int32`` for the CUDA kernels
(kernels/cuda_common.cuh, exposed by the emulated module). The GPU tests reach the int64
paths only with tensors over 2**31 elements; here the decision itself is checked on meta
and expanded tensors (no memory) at 2**31 - 1 and 2**31, in element count and in storage
span (a view with gaps addresses more than it holds)."""

from __future__ import annotations

from typing import Callable, List, Tuple

import pytest
import torch
from conftest import require_backend

LIMIT = 2**31 - 1


def _meta(size, stride=None) -> torch.Tensor:
    if stride is None:
        return torch.empty(size, device="meta")
    return torch.empty_strided(size, stride, device="meta")


# (what, tensor, needs 64-bit offsets)
CASES: List[Tuple[str, Callable[[], torch.Tensor], bool]] = [
    # element count: a dense tensor's span equals its count
    ("count 2^31-1", lambda: _meta((LIMIT,)), False),
    ("count 2^31", lambda: _meta((LIMIT + 1,)), True),
    ("count 2^31-1 NCHW", lambda: _meta((1, 1, 1, LIMIT)), False),  # 2^31 - 1 is prime
    ("count 2^31 NCHW", lambda: _meta((2, 64, 4096, 4096)), True),
    ("count 2^31 channels_last", lambda: _meta((2, 64, 4096, 4096)).contiguous(memory_format=torch.channels_last),
     True),
    # an expanded tensor: 2^31 elements, one stored
    ("count 2^31-1 expanded", lambda: torch.zeros(1).expand(LIMIT), False),
    ("count 2^31 expanded", lambda: torch.zeros(1).expand(LIMIT + 1), True),
    ("count 2^31 expanded 4-d", lambda: torch.zeros(1, 1, 1, 1).expand(2, 64, 4096, 4096), True),
    # storage span: few elements, far apart (the last one at offset 2^31 - 2 or 2^31 - 1)
    ("span 2^31-1", lambda: _meta((2,), (LIMIT - 1,)), False),
    ("span 2^31", lambda: _meta((2,), (LIMIT,)), True),
    # a slice of a wider tensor: (1, 1, 2, 3) rows of a 2^30-wide row buffer
    ("span 2^31-1 sliced rows", lambda: _meta((1, 1, 2, 3), (2 * (LIMIT - 2), LIMIT - 3, LIMIT - 3, 1)), False),
    ("span 2^31 sliced rows", lambda: _meta((1, 1, 2, 3), (2 * (LIMIT - 1), LIMIT - 2, LIMIT - 2, 1)), True),
    # size-1 dimensions never move an offset, whatever their stride
    ("size-1 dims with huge strides", lambda: _meta((1, 3, 1, 5), (2**40, 5, 2**40, 1)), False),
    ("empty", lambda: _meta((0, 3, 2**20, 2**20)), False),
]


def _span(t: torch.Tensor) -> int:
    return 1 + sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride()))


def test_cases_sit_on_the_boundary() -> None:
    """The cases are what their names say (guards the table against typos)."""
    for what, make, _ in CASES:
        t = make()
        n = max(t.numel(), _span(t)) if t.numel() else 0
        if "2^31-1" in what:
            assert n == LIMIT, (what, n)
        elif "2^31" in what:
            assert n == LIMIT + 1, (what, n)


@pytest.mark.parametrize("what,make,wide", CASES, ids=[c[0] for c in CASES])
def test_triton_needs_int64(what: str, make: Callable[[], torch.Tensor], wide: bool) -> None:
    common = pytest.importorskip("resattn_fast.ops.triton._common")
    t = make()
    assert common.needs_int64(t) is wide, what
    small = _meta((2, 3))
    assert common.needs_int64(small, t) is wide and common.needs_int64(t, small) is wide, what


@pytest.mark.parametrize("what,make,wide", CASES, ids=[c[0] for c in CASES])
def test_cuda_fits_int32(what: str, make: Callable[[], torch.Tensor], wide: bool) -> None:
    require_backend("cuda", "cpu")
    from resattn_fast import _ext

    emu = _ext.EMULATED
    t = make()
    assert emu.fits_int32(t) is (not wide), what
    before = emu.get_options()
    emu.set_options({"force_int64_index": True})  # the emulation's test switch wins
    try:
        assert emu.fits_int32(t) is False, what
    finally:
        emu.set_options(before)
