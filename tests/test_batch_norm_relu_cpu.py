"""batch_norm_relu on the cpu backend: the three registered ops against float64 PyTorch.

torch.ops.resattn_fast.batch_norm_relu / batch_norm_relu_backward / batch_norm_update_stats
on CPU tensors, compared with F.relu(F.batch_norm(...)) in float64 with autograd: forward,
statistics and every gradient, float32/float64/float16/bfloat16 (half x with float32 or
x-dtype parameters), NCHW / channels_last / sliced views / mixed layouts, odd sizes,
training and eval, weight/bias None, grad_residual; sizes that split into several reduction
units and take the streaming-store path; bit-identical results run to run and for any
thread count; opcheck on the three ops.
"""

from __future__ import annotations

from typing import Optional, Tuple

import pytest
import torch
import torch.nn.functional as F
from _tolerance import assert_matches

import resattn_fast  # noqa: F401  (loads the extension)
from resattn_fast import _ext

pytestmark = pytest.mark.skipif(_ext.C is None, reason="the C++ extension is not built")

OPS = torch.ops.resattn_fast
EPS = 1e-5
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# C = 1, 3, 17; H = W = 1 with N > 1; N = 1; C a multiple of the vector chunk; C >= one
# chunk but not a multiple (the overlapping last chunk of a channels_last row).
SHAPES = [(4, 17, 5, 7), (2, 1, 3, 3), (3, 3, 4, 4), (5, 8, 1, 1), (1, 17, 6, 5), (2, 64, 9, 9),
          (2, 48, 7, 7)]
HALF = (torch.float16, torch.bfloat16)


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """t with the same values, laid out as asked ("sliced": a strided view of a larger tensor)."""
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "sliced":
        n, c, h, w = t.shape
        big = torch.zeros(n, 2 * c, h, w + 3, dtype=t.dtype)
        view = big[:, ::2, :, 2:-1]
        view.copy_(t)
        return view
    return t.contiguous()


def _params(c: int, dtype: torch.dtype, affine: bool) -> Tuple[Optional[torch.Tensor], ...]:
    """(weight, bias, running_mean, running_var) in dtype, values exact in every dtype."""
    w = (torch.rand(c, dtype=torch.float64) + 0.5).to(dtype) if affine else None
    b = (torch.randn(c, dtype=torch.float64) * 0.5).to(dtype) if affine else None
    rm = (torch.randn(c, dtype=torch.float64) * 0.5).to(dtype)
    rv = (torch.rand(c, dtype=torch.float64) + 0.5).to(dtype)
    return w, b, rm, rv


def _eager(x, w, b, rm, rv, training, g, gr):
    """PyTorch's relu(batch_norm) with autograd in the dtype of its inputs: (out, gx, gw, gb)."""
    c = x.shape[1]
    x = x.detach().clone().requires_grad_(True)
    w = (torch.ones(c, dtype=rm.dtype) if w is None else w.detach().clone()).requires_grad_(True)
    b = (torch.zeros(c, dtype=rm.dtype) if b is None else b.detach().clone()).requires_grad_(True)
    out = F.relu(F.batch_norm(x, None if training else rm, None if training else rv, w, b, training, 0.0, EPS))
    gx, gw, gb = torch.autograd.grad(out, (x, w, b), g)
    if gr is not None:
        gx = gx + gr
    return out.detach(), gx, gw, gb


def _check(shape, dtype, layout, training, *, affine=True, residual=False, param_dtype=None,
           grad_layout=None, scale=2.0, shift=1.0, eager_rule=False, grid=False):
    """eager_rule: float32 results are held to the 2x-eager-error rule (inputs whose float32
    statistics are inexact by nature) instead of a fixed tolerance. grid: x on a grid of
    1/8 and each channel's bias chosen so that the ReLU threshold falls half-way between
    grid values: for large sizes, where some pre-activation would otherwise lie within
    float32 rounding of 0 and legitimately take either side of the ReLU."""
    param_dtype = param_dtype or dtype
    x64 = (torch.randn(shape, dtype=torch.float64) * scale + shift).to(dtype).double()
    g64 = torch.randn(shape, dtype=torch.float64).to(dtype).double()
    gr64 = torch.randn(shape, dtype=torch.float64).to(dtype).double() if residual else None
    w, b, rm, rv = _params(shape[1], param_dtype, affine)
    if grid:
        x64 = (x64 * 8).round() / 8
        m64 = x64.mean((0, 2, 3)) if training else rm.double()
        v64 = x64.var((0, 2, 3), unbiased=False) if training else rv.double()
        s64 = w.double() / (v64 + EPS).sqrt()
        threshold = ((m64 * 8).floor() + 0.5) / 8
        b = (s64 * (m64 - threshold)).to(param_dtype)
    x = _layout(x64.to(dtype), layout)
    g = _layout(g64.to(dtype), grad_layout or layout)
    gr = _layout(gr64.to(dtype), grad_layout or layout) if residual else None

    out, mean, var = OPS.batch_norm_relu(x, w, b, rm, rv, training, EPS)
    gx, gw, gb = OPS.batch_norm_relu_backward(g, x, w, b, mean, var, training, EPS, gr, True)

    d = lambda t: None if t is None else t.double()  # noqa: E731
    e_out, e_gx, e_gw, e_gb = _eager(x64, d(w), d(b), d(rm), d(rv), training, g64, gr64)
    h = [None] * 4
    if dtype in HALF or eager_rule:
        h = _eager(x64.to(dtype), w, b, rm, rv, training, g64.to(dtype), None if gr64 is None else gr64.to(dtype))
    tag = f"{dtype} {tuple(shape)} {layout} training={training} affine={affine} residual={residual}"

    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert mean.dtype == acc and var.dtype == acc and mean.shape == (shape[1],), tag
    if training:
        exp_mean, exp_var = x64.mean((0, 2, 3)), x64.var((0, 2, 3), unbiased=False)
        tol = 1e-12 if dtype == torch.float64 else 2e-6
        span = max(1.0, x64.abs().max().item())
        torch.testing.assert_close(mean.double(), exp_mean, atol=tol * span, rtol=tol, msg=lambda m: f"mean {tag}: {m}")
        torch.testing.assert_close(var.double(), exp_var, atol=tol * span**2, rtol=tol, msg=lambda m: f"var {tag}: {m}")
    else:
        assert mean.data_ptr() != rm.data_ptr() and var.data_ptr() != rv.data_ptr(), f"{tag}: aliased"
        torch.testing.assert_close(mean, rm.to(acc), atol=0, rtol=0)
        torch.testing.assert_close(var, rv.to(acc), atol=0, rtol=0)

    assert_matches(out, e_out, dtype, h[0], f"forward {tag}")
    assert_matches(gx, e_gx, dtype, h[1], f"grad_x {tag}")
    pd = acc if w is None else param_dtype
    assert gw.dtype == pd and gb.dtype == pd, f"{tag}: grad dtypes {gw.dtype}, {gb.dtype}"
    # grad_weight / grad_bias: sums over N*H*W, then one rounding to the parameters' dtype.
    rt = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[pd]
    for name, got, exp, eager in (("grad_weight", gw, e_gw, h[2]), ("grad_bias", gb, e_gb, h[3])):
        if eager_rule:
            assert_matches(got, exp, pd, eager, f"{name} {tag}")
            continue
        span = max(1.0, exp.abs().max().item())
        torch.testing.assert_close(got.double(), exp, atol=rt * span, rtol=rt, msg=lambda m, name=name: f"{name} {tag}: {m}")

    want_cl = (layout == "channels_last" and shape[1] > 1 and shape[2] * shape[3] > 1)
    if want_cl:
        assert out.is_contiguous(memory_format=torch.channels_last), f"{tag}: out not channels_last"
        assert gx.is_contiguous(memory_format=torch.channels_last), f"{tag}: grad_x not channels_last"
    elif layout != "channels_last":
        assert out.is_contiguous() and gx.is_contiguous(), f"{tag}: results not contiguous"


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "sliced"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_float64(shape, dtype, layout, training):
    _check(shape, dtype, layout, training)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_no_affine_with_residual(dtype, layout, training):
    _check((3, 17, 6, 5), dtype, layout, training, affine=False, residual=True)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_half_x_float32_params(dtype, layout, training):
    _check((4, 33, 5, 6), dtype, layout, training, residual=True, param_dtype=torch.float32)


@pytest.mark.parametrize("x_layout,grad_layout", [("nchw", "channels_last"), ("channels_last", "sliced")])
def test_mixed_layouts(x_layout, grad_layout):
    _check((2, 40, 5, 5), torch.float32, x_layout, True, residual=True, grad_layout=grad_layout)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_large_mean_small_spread(layout):
    """|mean| = 1000 std: no sum-of-squares cancellation (as accurate as eager float32)."""
    _check((4, 8, 16, 16), torch.float32, layout, True, scale=0.1, shift=100.0, eager_rule=True)
    _check((4, 8, 16, 16), torch.float64, layout, True, scale=1.0, shift=1e4)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", [(1, 2, 200, 200), (2, 32, 256, 256), (4, 17, 30, 30)],
                         ids=["nchw-segments", "streaming", "cl-groups"])
def test_large(shape, layout):
    """Several reduction units per channel, and outputs large enough for streaming stores."""
    _check(shape, torch.float32, layout, True, residual=True, grid=True)
    _check(shape, torch.float32, layout, False, grid=True)


def _run_all(x, g, w, b):
    out, mean, var = OPS.batch_norm_relu(x, w, b, None, None, True, EPS)
    gx, gw, gb = OPS.batch_norm_relu_backward(g, x, w, b, mean, var, True, EPS, None, True)
    return out, mean, var, gx, gw, gb


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_bit_identical_runs_and_thread_counts(layout):
    shape = (3, 40, 70, 60)  # several reduction units per channel in both layouts
    x = _layout(torch.randn(shape) * 3 + 1, layout)
    g = _layout(torch.randn(shape), layout)
    w, b = torch.rand(shape[1]) + 0.5, torch.randn(shape[1])
    first = _run_all(x, g, w, b)
    runs = [_run_all(x, g, w, b)]
    for threads in (1, 3):
        torch.set_num_threads(threads)
        runs.append(_run_all(x, g, w, b))
    for r in runs:
        for a, e in zip(r, first):
            assert torch.equal(a, e)


def test_empty_and_errors():
    x = torch.empty(0, 4, 3, 3)
    out, mean, var = OPS.batch_norm_relu(x, None, None, None, None, True, EPS)
    assert out.shape == x.shape and torch.equal(mean, torch.zeros(4)) and torch.equal(var, torch.zeros(4))
    gx, gw, gb = OPS.batch_norm_relu_backward(x, x, None, None, mean, var, True, EPS, None, True)
    assert gx.shape == x.shape and torch.equal(gw, torch.zeros(4)) and torch.equal(gb, torch.zeros(4))
    gx, gw, gb = OPS.batch_norm_relu_backward(x, x, None, None, mean, var, True, EPS, None, False)
    assert gw.shape == (0,) and gb.shape == (0,)
    with pytest.raises(RuntimeError, match="Expected more than 1 value per channel"):
        OPS.batch_norm_relu(torch.randn(1, 3, 1, 1), None, None, None, None, True, EPS)
    with pytest.raises(RuntimeError, match="running_mean and running_var are required"):
        OPS.batch_norm_relu(torch.randn(2, 3, 2, 2), None, None, None, None, False, EPS)
    with pytest.raises(RuntimeError, match="weight must be a 1-D tensor"):
        OPS.batch_norm_relu(torch.randn(2, 3, 2, 2), torch.ones(4), None, None, None, True, EPS)
    with pytest.raises(RuntimeError, match="grad must have x's shape"):
        OPS.batch_norm_relu_backward(torch.randn(2, 3, 2, 3), torch.randn(2, 3, 2, 2), None, None,
                                     torch.zeros(3), torch.ones(3), True, EPS, None, True)


def test_eval_backward_without_weight_grads():
    x = torch.randn(2, 5, 4, 4)
    g = torch.randn_like(x)
    rm, rv = torch.randn(5), torch.rand(5) + 0.5
    out, mean, var = OPS.batch_norm_relu(x, None, None, rm, rv, False, EPS)
    gx, gw, gb = OPS.batch_norm_relu_backward(g, x, None, None, mean, var, False, EPS, None, False)
    assert gw.shape == (0,) and gb.shape == (0,)
    _, e_gx, _, _ = _eager(x.double(), None, None, rm.double(), rv.double(), False, g.double(), None)
    torch.testing.assert_close(gx.double(), e_gx, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_update_stats(dtype):
    c, count = 7, 50
    rm, rv = torch.randn(c, dtype=torch.float64), torch.rand(c, dtype=torch.float64) + 0.5
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    mean, var = torch.randn(c, dtype=acc), torch.rand(c, dtype=acc) + 0.1
    rm_t, rv_t = rm.to(dtype).clone(), rv.to(dtype).clone()
    OPS.batch_norm_update_stats(rm_t, rv_t, mean, var, 0.1, count, None)
    exp_m = 0.9 * rm.to(dtype).double() + 0.1 * mean.double()
    exp_v = 0.9 * rv.to(dtype).double() + 0.1 * var.double() * count / (count - 1)
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(rm_t.double(), exp_m, atol=tol, rtol=tol)
    torch.testing.assert_close(rv_t.double(), exp_v, atol=tol, rtol=tol)


def test_update_stats_counts_batches():
    """num_batches_tracked, when given, gains one in the same call; the statistics are
    updated as without it; a wrong counter is refused by name."""
    rm, rv, mean, var = torch.zeros(3), torch.ones(3), torch.full((3,), 2.0), torch.full((3,), 4.0)
    n = torch.tensor(41)
    OPS.batch_norm_update_stats(rm, rv, mean, var, 0.5, 5, n)
    assert n.dtype == torch.int64 and n.item() == 42
    torch.testing.assert_close(rm, torch.full((3,), 1.0), atol=0, rtol=0)
    torch.testing.assert_close(rv, torch.full((3,), 0.5 + 0.5 * 4.0 * 5 / 4), atol=0, rtol=0)
    empty = torch.empty(0)
    OPS.batch_norm_update_stats(empty, empty, empty, empty, 0.5, 5, n)  # no channels: still counted
    assert n.item() == 43
    with pytest.raises(RuntimeError, match="num_batches_tracked must hold one int64 value"):
        OPS.batch_norm_update_stats(rm, rv, mean, var, 0.5, 5, torch.tensor(1.0))


def _opcheck(op, args):
    """opcheck with every test when the op has a fake kernel (resattn_fast.ops registers
    them), else the schema test alone."""
    from torch._library.simple_registry import singleton

    has_fake = singleton.find(op._name).fake_impl.kernel is not None
    utils = None if has_fake else ("test_schema",)
    if utils is None:
        torch.library.opcheck(op, args)
    else:
        torch.library.opcheck(op, args, test_utils=utils)


def _sample_args():
    x = torch.randn(2, 6, 3, 4)
    w, b = torch.rand(6) + 0.5, torch.randn(6)
    rm, rv = torch.randn(6), torch.rand(6) + 0.5
    return x, w, b, rm, rv


def test_opcheck_forward():
    x, w, b, rm, rv = _sample_args()
    _opcheck(OPS.batch_norm_relu.default, (x, w, b, rm, rv, True, EPS))
    _opcheck(OPS.batch_norm_relu.default,
                          (x.contiguous(memory_format=torch.channels_last), w, b, rm, rv, False, EPS))
    _opcheck(OPS.batch_norm_relu.default, (x, None, None, None, None, True, EPS))


def test_opcheck_backward():
    x, w, b, rm, rv = _sample_args()
    _, mean, var = OPS.batch_norm_relu(x, w, b, rm, rv, True, EPS)
    g = torch.randn_like(x)
    _opcheck(OPS.batch_norm_relu_backward.default, (g, x, w, b, mean, var, True, EPS, None, True))
    _opcheck(OPS.batch_norm_relu_backward.default,
                          (g, x, None, None, mean, var, False, EPS, torch.randn_like(x), False))


def test_opcheck_update_stats():
    _, _, _, rm, rv = _sample_args()
    _opcheck(OPS.batch_norm_update_stats.default, (rm, rv, torch.randn(6), torch.rand(6), 0.1, 48, None))
    _opcheck(OPS.batch_norm_update_stats.default,
             (rm, rv, torch.randn(6), torch.rand(6), 0.1, 48, torch.tensor(3)))
