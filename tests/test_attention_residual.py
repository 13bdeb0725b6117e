"""attention_residual: every fused backend against the float64 reference.

(1 + sigmoid(m)) * f, forward and both gradients, every dtype, NCHW / channels_last /
non-contiguous and mixed layouts, odd sizes, large |logits|, an empty batch; gradcheck,
opcheck, saved tensors (only the two inputs). Non-contiguous means both a permuted dense
tensor ("strided": no gaps) and a slice of a wider tensor ("sliced": gaps between rows,
between channels and before the first element).
"""

from __future__ import annotations

import pytest
import torch
from _tolerance import assert_matches
from conftest import CPU_FUSED, require_backend

from resattn_fast import ops
from resattn_fast.reference import ops as ref

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SHAPES = [(2, 3, 5, 7), (1, 1, 1, 1), (3, 16, 9, 4), (1, 37, 3, 3), (2, 64, 8, 8)]


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        return t.transpose(2, 3).contiguous().transpose(2, 3)  # same shape, H and W swapped strides
    if layout == "sliced":  # every other channel, columns 1..W of W + 3: gaps in memory
        n, c, h, w = t.shape
        wide = torch.full((n, 2 * c, h, w + 3), float("nan"), dtype=t.dtype)
        view = wide[:, ::2, :, 1:w + 1]
        view.copy_(t)
        assert not view.is_contiguous() and not view.is_contiguous(memory_format=torch.channels_last)
        return view
    return t.contiguous()


def _run(fn, m, f, g):
    m = m.detach().requires_grad_(True)
    f = f.detach().requires_grad_(True)
    out = fn(m, f)
    out.backward(g.to(out.dtype))
    return out.detach(), m.grad, f.grad


def _check(backend, shape, dtype, m_layout, f_layout, scale=3.0):
    require_backend(backend)
    m64 = (torch.randn(shape, dtype=torch.float64) * scale).to(dtype).double()
    f64 = torch.randn(shape, dtype=torch.float64).to(dtype).double()
    g64 = torch.randn(shape, dtype=torch.float64).to(dtype).double()
    m, f = _layout(m64.to(dtype), m_layout), _layout(f64.to(dtype), f_layout)
    out, gm, gf = _run(lambda a, b: ops.attention_residual(a, b, backend=backend), m, f, g64)
    eout, egm, egf = _run(ref.attention_residual, m64, f64, g64)
    h = [None, None, None]
    if dtype in (torch.float16, torch.bfloat16):
        h = _run(ref.attention_residual, m64.to(dtype), f64.to(dtype), g64.to(dtype))
    tag = f"{backend} {dtype} {shape} m:{m_layout} f:{f_layout}"
    assert_matches(out, eout, dtype, h[0], f"forward {tag}")
    assert_matches(gm, egm, dtype, h[1], f"grad_mask_logits {tag}")
    assert_matches(gf, egf, dtype, h[2], f"grad_trunk {tag}")
    if f_layout == "channels_last" and len(shape) == 4 and shape[1] > 1 and shape[2] * shape[3] > 1:
        assert out.is_contiguous(memory_format=torch.channels_last), f"{tag}: output not channels_last"
    if f_layout == "nchw":
        assert out.is_contiguous(), f"{tag}: output not contiguous"


@pytest.mark.parametrize("backend", CPU_FUSED)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_shapes_float32(backend, shape):
    _check(backend, shape, torch.float32, "nchw", "nchw")


@pytest.mark.parametrize("backend", CPU_FUSED)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layouts", [("nchw", "nchw"), ("channels_last", "channels_last"),
                                     ("strided", "strided"), ("sliced", "sliced"), ("nchw", "channels_last"),
                                     ("channels_last", "nchw"), ("sliced", "channels_last"),
                                     ("nchw", "sliced")], ids="-".join)
def test_dtypes_layouts(backend, dtype, layouts):
    _check(backend, (2, 5, 6, 7), dtype, *layouts)


@pytest.mark.parametrize("backend", CPU_FUSED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_saturated_logits(backend, dtype):
    """|m| up to 100: sigmoid saturates without NaN or inf in forward or backward."""
    _check(backend, (2, 3, 4, 5), dtype, "nchw", "nchw", scale=40.0)


@pytest.mark.parametrize("backend", CPU_FUSED)
def test_not_4d(backend):
    """The op is elementwise: 2-D and 5-D inputs work too."""
    _check(backend, (7, 13), torch.float32, "nchw", "nchw")
    _check(backend, (2, 3, 2, 3, 5), torch.float32, "nchw", "nchw")


@pytest.mark.parametrize("backend", CPU_FUSED)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_empty_batch(backend, layout):
    """N = 0: empty output and empty gradients, forward and backward."""
    require_backend(backend)
    m = _layout(torch.randn(0, 3, 4, 5), layout).requires_grad_(True)
    f = _layout(torch.randn(0, 3, 4, 5), layout).requires_grad_(True)
    out = ops.attention_residual(m, f, backend=backend)
    assert out.shape == (0, 3, 4, 5) and out.dtype == f.dtype
    out.backward(torch.ones_like(out))
    assert m.grad.shape == m.shape and f.grad.shape == f.shape


@pytest.mark.parametrize("backend", CPU_FUSED)
def test_gradcheck(backend):
    require_backend(backend)
    m = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    f = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda a, b: ops.attention_residual(a, b, backend=backend), (m, f))


@pytest.mark.parametrize("backend", CPU_FUSED)
def test_saves_only_inputs(backend):
    require_backend(backend)
    saved = []
    m = torch.randn(2, 3, 4, 5, requires_grad=True)
    f = torch.randn(2, 3, 4, 5, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = ops.attention_residual(m, f, backend=backend)
    assert len(saved) == 2
    assert {t.data_ptr() for t in saved} == {m.data_ptr(), f.data_ptr()}
    out.sum().backward()


@pytest.mark.parametrize("backend", CPU_FUSED)
def test_one_input_requires_grad(backend):
    require_backend(backend)
    m = torch.randn(2, 3, 4, 5)
    f = torch.randn(2, 3, 4, 5, requires_grad=True)
    ops.attention_residual(m, f, backend=backend).sum().backward()
    torch.testing.assert_close(f.grad, 1 + torch.sigmoid(m))


def test_opcheck_cpu():
    require_backend("cpu")
    m = torch.randn(2, 3, 4, 5)
    f = torch.randn(2, 3, 4, 5)
    op = torch.ops.resattn_fast.attention_residual.default
    torch.library.opcheck(op, (m, f))
    torch.library.opcheck(op, (m.clone().requires_grad_(True), f.clone().requires_grad_(True)))
    cl = torch.channels_last
    torch.library.opcheck(op, (m.contiguous(memory_format=cl), f.contiguous(memory_format=cl)))
    bwd = torch.ops.resattn_fast.attention_residual_backward.default
    torch.library.opcheck(bwd, (torch.randn(2, 3, 4, 5), m, f))


def test_cpp_checks_name_the_argument():
    require_backend("cpu")
    op = torch.ops.resattn_fast.attention_residual
    with pytest.raises(RuntimeError, match="same shape"):
        op(torch.randn(2, 3), torch.randn(3, 2))
    with pytest.raises(RuntimeError, match="same dtype"):
        op(torch.randn(2, 3), torch.randn(2, 3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="mask_logits must be float"):
        op(torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long))


@pytest.mark.parametrize("backend", ("reference",) + CPU_FUSED)
def test_python_checks_name_the_argument(backend):
    require_backend(backend)
    f = ops.attention_residual
    with pytest.raises(ValueError, match="same shape"):
        f(torch.randn(2, 3), torch.randn(3, 2), backend=backend)
    with pytest.raises(TypeError, match="same dtype"):
        f(torch.randn(2, 3), torch.randn(2, 3, dtype=torch.float16), backend=backend)
    with pytest.raises(ValueError, match="same device"):
        f(torch.randn(2, 3), torch.empty(2, 3, device="meta"), backend=backend)
    with pytest.raises(TypeError, match="trunk must be a torch.Tensor"):
        f(torch.randn(2, 3), [1.0, 2.0], backend=backend)
