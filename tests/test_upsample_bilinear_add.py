"""upsample_bilinear_add: every fused backend against the float64 reference.

Forward and both gradients, every dtype, NCHW / channels_last / non-contiguous inputs,
align_corners True and False, up-, down- and same-size, 1x1 and odd non-square sizes;
gradcheck, opcheck, determinism, saved tensors, torch.compile.
"""

from __future__ import annotations

import pytest
import torch
from _tolerance import assert_matches
from conftest import CPU_FUSED, require_backend

from resattn_fast import ops
from resattn_fast.reference import ops as ref

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# (h, w) -> (H, W): up, down, same, 1x1 in and out, odd and non-square, mixed up/down.
SIZES = [
    ((4, 4), (8, 8)),
    ((7, 7), (14, 14)),
    ((3, 5), (7, 9)),
    ((1, 1), (5, 3)),
    ((1, 1), (1, 1)),
    ((6, 6), (6, 6)),
    ((9, 6), (4, 3)),
    ((2, 7), (11, 2)),
    ((5, 1), (1, 4)),
]
LAYOUTS = ["nchw", "channels_last", "strided"]


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # non-contiguous in both spatial dims and channels
        big = torch.zeros(t.shape[0], t.shape[1] * 2, t.shape[2] * 2, t.shape[3] + 3, dtype=t.dtype)
        big[:, ::2, ::2, 1 : t.shape[3] + 1] = t
        view = big[:, ::2, ::2, 1 : t.shape[3] + 1]
        assert not view.is_contiguous() and not view.is_contiguous(memory_format=torch.channels_last)
        return view
    return t.contiguous()


def _inputs(n, c, hw, HW, dtype, layout, with_skip=True):
    x64 = torch.randn(n, c, *hw, dtype=torch.float64)
    s64 = torch.randn(n, c, *HW, dtype=torch.float64) if with_skip else None
    g64 = torch.randn(n, c, *HW, dtype=torch.float64)
    # Round through the dtype so the float64 reference sees exactly the kernel's inputs.
    x64, g64 = x64.to(dtype).double(), g64.to(dtype).double()
    s64 = s64.to(dtype).double() if s64 is not None else None
    x = _layout(x64.to(dtype), layout)
    s = _layout(s64.to(dtype), layout) if s64 is not None else None
    return x64, s64, g64, x, s


def _run(fn, x, s, g, size, align_corners):
    x = x.detach().requires_grad_(True)
    s = s.detach().requires_grad_(True) if s is not None else None
    out = fn(x, s, size=size, align_corners=align_corners)
    out.backward(g.to(out.dtype))
    return out.detach(), x.grad, (s.grad if s is not None else None)


def _check(backend, hw, HW, dtype, layout, align_corners, with_skip=True):
    require_backend(backend)
    x64, s64, g64, x, s = _inputs(2, 3, hw, HW, dtype, layout, with_skip)
    size = None if with_skip else HW

    def fused(a, b, **kw):
        return ops.upsample_bilinear_add(a, b, backend=backend, **kw)

    out, gx, gs = _run(fused, x, s, g64, size if size else HW, align_corners)
    eout, egx, egs = _run(ref.upsample_bilinear_add, x64, s64, g64, HW, align_corners)
    half = dtype in (torch.float16, torch.bfloat16)
    h_out = h_gx = None
    if half:  # eager PyTorch in the same dtype, for the 2x-error rule
        h_out, h_gx, _ = _run(ref.upsample_bilinear_add, x64.to(dtype), s64.to(dtype) if s64 is not None else None,
                              g64.to(dtype), HW, align_corners)
    tag = f"{backend} {dtype} {layout} {hw}->{HW} ac={align_corners}"
    assert_matches(out, eout, dtype, h_out, f"forward {tag}")
    assert_matches(gx, egx, dtype, h_gx, f"grad_x {tag}")
    if with_skip:
        torch.testing.assert_close(gs.double(), g64, atol=0, rtol=0)  # grad_skip is grad itself
    # Memory format: the output follows skip (x without skip).
    follow = s if with_skip else x
    if layout == "channels_last" or (follow.dim() == 4 and follow.is_contiguous(memory_format=torch.channels_last)
                                     and not follow.is_contiguous()):
        assert out.is_contiguous(memory_format=torch.channels_last), f"{tag}: output not channels_last"
    elif layout == "nchw":
        assert out.is_contiguous(), f"{tag}: output not contiguous"


@pytest.mark.parametrize("backend", CPU_FUSED)
@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("hw,HW", SIZES, ids=[f"{a[0]}x{a[1]}-{b[0]}x{b[1]}" for a, b in SIZES])
def test_sizes_float32(backend, hw, HW, align_corners):
    _check(backend, hw, HW, torch.float32, "nchw", align_corners)


@pytest.mark.parametrize("backend", CPU_FUSED)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("align_corners", [True, False])
def test_dtypes_layouts(backend, dtype, layout, align_corners):
    _check(backend, (5, 7), (9, 13), dtype, layout, align_corners)
    _check(backend, (7, 4), (3, 4), dtype, layout, align_corners)  # down-sampling


@pytest.mark.parametrize("backend", CPU_FUSED)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_no_skip(backend, dtype, layout):
    """skip=None, size=(H, W): the last upsample of the mask branch."""
    _check(backend, (4, 3), (9, 8), dtype, layout, True, with_skip=False)


@pytest.mark.parametrize("backend", CPU_FUSED)
def test_mixed_layouts(backend):
    """x channels_last, skip NCHW (and the reverse): output follows skip."""
    require_backend(backend)
    x = torch.randn(2, 8, 5, 6)
    s = torch.randn(2, 8, 10, 11)
    want = ref.upsample_bilinear_add(x.double(), s.double(), align_corners=True)
    for xl, sl in [(torch.channels_last, torch.contiguous_format), (torch.contiguous_format, torch.channels_last)]:
        out = ops.upsample_bilinear_add(x.contiguous(memory_format=xl), s.contiguous(memory_format=sl),
                                        backend=backend)
        torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
        assert out.is_contiguous(memory_format=sl)


@pytest.mark.parametrize("backend", CPU_FUSED)
@pytest.mark.parametrize("align_corners", [True, False])
def test_gradcheck(backend, align_corners):
    require_backend(backend)
    x = torch.randn(1, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    s = torch.randn(1, 2, 5, 7, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(
        lambda a, b: ops.upsample_bilinear_add(a, b, align_corners=align_corners, backend=backend), (x, s)
    )
    torch.autograd.gradcheck(
        lambda a: ops.upsample_bilinear_add(a, None, size=(4, 2), align_corners=align_corners, backend=backend),
        (x,),
    )


def test_gradgradcheck_cpu():
    require_backend("cpu")
    x = torch.randn(1, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    s = torch.randn(1, 2, 6, 5, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradgradcheck(lambda a, b: ops.upsample_bilinear_add(a, b, backend="cpu"), (x, s))


@pytest.mark.parametrize("backend", CPU_FUSED)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_backward_bit_identical(backend, layout):
    require_backend(backend)
    x = _layout(torch.randn(2, 16, 7, 9), layout)
    s = _layout(torch.randn(2, 16, 13, 17), layout)
    g = _layout(torch.randn(2, 16, 13, 17), layout)
    grads = []
    for _ in range(3):
        xr = x.clone().requires_grad_(True)
        ops.upsample_bilinear_add(xr, s, backend=backend).backward(g)
        grads.append(xr.grad)
    assert all(torch.equal(grads[0], gr) for gr in grads[1:])


@pytest.mark.parametrize("backend", CPU_FUSED)
def test_saves_no_tensor(backend):
    require_backend(backend)
    saved = []
    x = torch.randn(2, 3, 4, 5, requires_grad=True)
    s = torch.randn(2, 3, 8, 9, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = ops.upsample_bilinear_add(x, s, backend=backend)
    assert saved == []
    out.sum().backward()
    assert x.grad is not None and s.grad is not None


def _samples():
    x = torch.randn(2, 3, 4, 5)
    s = torch.randn(2, 3, 7, 9)
    return [
        (x, s, [7, 9], True),
        (x.requires_grad_(True), s.clone().requires_grad_(True), [7, 9], False),
        (x.contiguous(memory_format=torch.channels_last), s.contiguous(memory_format=torch.channels_last), [7, 9], True),
        (x.detach(), None, [6, 11], True),
        (x.detach().requires_grad_(True), None, [3, 2], False),
    ]


def test_opcheck_cpu():
    require_backend("cpu")
    op = torch.ops.resattn_fast.upsample_bilinear_add.default
    for args in _samples():
        torch.library.opcheck(op, args)
    bwd = torch.ops.resattn_fast.upsample_bilinear_add_backward.default
    torch.library.opcheck(bwd, (torch.randn(2, 3, 7, 9), [4, 5], True))
    torch.library.opcheck(bwd, (torch.randn(2, 3, 7, 9).contiguous(memory_format=torch.channels_last), [4, 5], False))


def test_cpp_checks_name_the_argument():
    """Direct torch.ops calls are validated in C++ (TORCH_CHECK), with the argument's name."""
    require_backend("cpu")
    op = torch.ops.resattn_fast.upsample_bilinear_add
    x = torch.randn(2, 3, 4, 5)
    with pytest.raises(RuntimeError, match="x must be a 4-D"):
        op(torch.randn(3, 4, 5), None, [8, 8], True)
    with pytest.raises(RuntimeError, match="skip must have the same batch and channel"):
        op(x, torch.randn(2, 4, 8, 8), [8, 8], True)
    with pytest.raises(RuntimeError, match="size"):
        op(x, None, [0, 8], True)
    with pytest.raises(RuntimeError, match="same dtype"):
        op(x, torch.randn(2, 3, 8, 8, dtype=torch.float64), [8, 8], True)
    with pytest.raises(RuntimeError, match="does not match skip"):
        op(x, torch.randn(2, 3, 8, 8), [8, 9], True)
    with pytest.raises(RuntimeError, match="x must be float"):
        op(x.long(), None, [8, 8], True)


@pytest.mark.parametrize("backend", ("reference",) + CPU_FUSED)
def test_python_checks_name_the_argument(backend):
    require_backend(backend)
    f = ops.upsample_bilinear_add
    x = torch.randn(2, 3, 4, 5)
    with pytest.raises(ValueError, match="x must be a 4-D"):
        f(torch.randn(3, 4, 5), None, size=(8, 8), backend=backend)
    with pytest.raises(ValueError, match="skip must have the same batch and channel"):
        f(x, torch.randn(2, 4, 8, 8), backend=backend)
    with pytest.raises(ValueError, match="size must be two ints >= 1"):
        f(x, None, size=(0, 8), backend=backend)
    with pytest.raises(ValueError, match="give size"):
        f(x, None, backend=backend)
    with pytest.raises(TypeError, match="same dtype"):
        f(x, torch.randn(2, 3, 8, 8, dtype=torch.float64), backend=backend)
    with pytest.raises(ValueError, match="same device"):
        f(x, torch.empty(2, 3, 8, 8, device="meta"), backend=backend)
    with pytest.raises(TypeError, match="x must be float"):
        f(x.long(), None, size=(8, 8), backend=backend)
    with pytest.raises(ValueError, match="non-empty spatial size"):
        f(torch.randn(2, 3, 0, 5), None, size=(8, 8), backend=backend)


@pytest.mark.parametrize("backend", CPU_FUSED)
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("with_skip", [True, False], ids=["skip", "no_skip"])
def test_empty_batch(backend, fmt, with_skip):
    """N = 0: an empty output and empty gradients, forward and backward."""
    require_backend(backend)
    x = torch.randn(0, 3, 4, 5).contiguous(memory_format=fmt).requires_grad_(True)
    s = torch.randn(0, 3, 8, 9).contiguous(memory_format=fmt).requires_grad_(True) if with_skip else None
    out = ops.upsample_bilinear_add(x, s, size=(8, 9), backend=backend)
    assert out.shape == (0, 3, 8, 9) and out.dtype == x.dtype
    out.backward(torch.ones_like(out))
    assert x.grad.shape == x.shape
    if with_skip:
        assert s.grad.shape == s.shape


def test_compile_fullgraph_cpu():
    """torch.compile traces the C++ op (fake kernel + autograd) with no graph break."""
    require_backend("cpu")

    def f(x, s, m):
        up = ops.upsample_bilinear_add(x, s, backend="cpu")
        return ops.attention_residual(m, up, backend="cpu")

    x = torch.randn(2, 4, 5, 6, requires_grad=True)
    s = torch.randn(2, 4, 9, 11, requires_grad=True)
    m = torch.randn(2, 4, 9, 11, requires_grad=True)
    compiled = torch.compile(f, fullgraph=True)
    out = compiled(x, s, m)
    out.sum().backward()
    grads = [t.grad.clone() for t in (x, s, m)]
    for t in (x, s, m):
        t.grad = None
    want = f(x, s, m)
    want.sum().backward()
    torch.testing.assert_close(out, want)
    for gr, t in zip(grads, (x, s, m)):
        torch.testing.assert_close(gr, t.grad)
