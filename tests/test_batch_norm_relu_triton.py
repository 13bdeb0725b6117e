"""The Triton kernels of batch_norm_relu, called through their ops directly.

``torch.ops.resattn_fast.batch_norm_relu_triton`` (+ ``_backward_triton``,
``batch_norm_update_stats_triton``) against ``F.relu(F.batch_norm(...))`` in float64:
the four dtypes, NCHW / channels_last / sliced views, odd sizes, eval, grad_residual,
weight and bias None, float32 parameters with half x (autocast's case); the stage-1 split
and the 64-bit index path forced on small tensors; run-to-run bit identity; opcheck; the
C++ checks' errors. On a CPU-only machine the kernels run under TRITON_INTERPRET=1
(tests/conftest.py), so the shapes are small.
"""

from __future__ import annotations

import importlib
from typing import Optional, Tuple

import pytest
import torch
import torch.nn.functional as F
from conftest import require_backend

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from resattn_fast.ops.triton.batch_norm_relu import _divmod  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
EPS = 1e-5


@pytest.fixture(scope="module")
def bnr():
    """The kernel module (its ops are registered on import)."""
    require_backend("triton", DEVICE)
    return importlib.import_module("resattn_fast.ops.triton.batch_norm_relu")


def _ops():
    return torch.ops.resattn_fast


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """x (N, C, H, W) as NCHW, channels_last, or a non-dense view with the same values."""
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "sliced":
        big = torch.zeros(x.shape[0], x.shape[1], x.shape[2] * 2, x.shape[3] + 3,
                          dtype=x.dtype, device=x.device)
        big[:, :, ::2, 1:1 + x.shape[3]] = x
        view = big[:, :, ::2, 1:1 + x.shape[3]]
        assert not view.is_contiguous() and torch.equal(view, x)
        return view
    return x.contiguous()


def _params(C: int, dtype: torch.dtype, affine: Tuple[bool, bool] = (True, True)):
    w = torch.rand(C, dtype=torch.float64, device=DEVICE) + 0.5 if affine[0] else None
    b = torch.randn(C, dtype=torch.float64, device=DEVICE) * 0.5 if affine[1] else None
    rm = torch.randn(C, dtype=torch.float64, device=DEVICE)
    rv = torch.rand(C, dtype=torch.float64, device=DEVICE) + 0.5
    return tuple(None if t is None else t.to(dtype) for t in (w, b, rm, rv))


def _reference(x, w, b, rm, rv, training, g, gres, dtype=torch.float64):
    """relu(batch_norm) and its gradients in ``dtype`` (PyTorch's own kernels), the
    parameters in float64 for the float64 reference, else in their own dtype."""
    xr = x.detach().to(dtype).requires_grad_(True)
    pdt = torch.float64 if dtype == torch.float64 else rm.dtype
    wr = None if w is None else w.detach().to(pdt).requires_grad_(True)
    br = None if b is None else b.detach().to(pdt).requires_grad_(True)
    rmr, rvr = rm.detach().to(pdt, copy=True), rv.detach().to(pdt, copy=True)
    out = F.relu(F.batch_norm(xr, rmr, rvr, wr, br, training, 0.0, EPS))
    out.backward(g.to(dtype))
    gx = xr.grad + (0 if gres is None else gres.to(dtype))
    return out, gx, (None if wr is None else wr.grad), (None if br is None else br.grad)


def _close(got: torch.Tensor, want64: torch.Tensor, eager: Optional[torch.Tensor], dtype, what: str):
    """float32/float64: close to the float64 reference; half: within 2x the error of
    PyTorch's own computation in that dtype, plus a small atol and one unit in the last
    place of the stored value (Triton 3.6's interpreter truncates float32 to bfloat16
    instead of rounding it: a few-element result such as grad_weight can be a full ulp
    off where PyTorch happens to be close)."""
    got64 = got.detach().to(torch.float64)
    if dtype == torch.float64:
        torch.testing.assert_close(got64, want64, atol=1e-10, rtol=1e-10, msg=what)
    elif dtype == torch.float32:
        torch.testing.assert_close(got64, want64, atol=2e-5, rtol=2e-5, msg=what)
    else:
        err = (got64 - want64).abs()
        err_eager = (eager.detach().to(torch.float64) - want64).abs().max().item()
        atol = 2e-2 if dtype == torch.bfloat16 else 3e-3
        bound = 2 * err_eager + atol + torch.finfo(dtype).eps * want64.abs()
        assert (err <= bound).all(), f"{what}: error {err.max().item()} vs eager {err_eager}"


def _check_case(bnr, x, w, b, rm, rv, training, grad_residual=True, weight_grads=True):
    """Forward and backward of the Triton ops against the float64 reference (and PyTorch
    in x's dtype for half types)."""
    dtype = x.dtype
    accd = torch.float64 if dtype == torch.float64 else torch.float32
    out, mean, var = _ops().batch_norm_relu_triton(x, w, b, rm, rv, training, EPS)
    g = torch.randn(x.shape, dtype=dtype, device=DEVICE)
    gres = torch.randn(x.shape, dtype=dtype, device=DEVICE) if grad_residual else None
    want, gx_want, gw_want, gb_want = _reference(x, w, b, rm, rv, training, g, gres)
    eager = (None,) * 4
    if dtype in (torch.float16, torch.bfloat16):
        eager = _reference(x, w, b, rm, rv, training, g, gres, dtype=dtype)

    assert out.dtype == dtype and out.shape == x.shape
    fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and \
        not x.is_contiguous() else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt)
    assert mean.dtype == accd and var.dtype == accd and mean.shape == (x.shape[1],)
    x64 = x.detach().to(torch.float64)
    if training:
        torch.testing.assert_close(mean.double(), x64.mean((0, 2, 3)),
                                   atol=1e-10 if accd == torch.float64 else 1e-5, rtol=1e-6)
        torch.testing.assert_close(var.double(), x64.var((0, 2, 3), unbiased=False),
                                   atol=1e-10 if accd == torch.float64 else 1e-5, rtol=1e-5)
    else:
        assert torch.equal(mean, rm.to(accd)) and torch.equal(var, rv.to(accd))
        assert mean.data_ptr() != rm.data_ptr() and var.data_ptr() != rv.data_ptr()
    _close(out, want, eager[0], dtype, "out")

    gx, gw, gb = _ops().batch_norm_relu_backward_triton(g, x, w, b, mean, var, training, EPS,
                                                        gres, weight_grads)
    assert gx.dtype == dtype and gx.shape == x.shape and gx.is_contiguous(memory_format=fmt)
    _close(gx, gx_want, eager[1], dtype, "grad_x")
    if not weight_grads:
        assert gw.shape == (0,) and gb.shape == (0,) and gw.dtype == accd and gb.dtype == accd
        return
    assert gw.dtype == (w.dtype if w is not None else accd)
    assert gb.dtype == (b.dtype if b is not None else accd)
    # Without a weight (bias) tensor the reference has no gradient for it: recompute the
    # sums it would have from the float64 reference's x_hat and dy.
    if gw_want is None or gb_want is None:
        xr = x64.clone().requires_grad_(True)
        wr = torch.ones(x.shape[1], dtype=torch.float64, device=DEVICE, requires_grad=True) \
            if w is None else w.detach().double().requires_grad_(True)
        br = torch.zeros(x.shape[1], dtype=torch.float64, device=DEVICE, requires_grad=True) \
            if b is None else b.detach().double().requires_grad_(True)
        F.relu(F.batch_norm(xr, rm.double().clone(), rv.double().clone(), wr, br, training,
                            0.0, EPS)).backward(g.double())
        gw_want, gb_want = wr.grad, br.grad
    _close(gw, gw_want, eager[2], gw.dtype, "grad_weight")
    _close(gb, gb_want, eager[3], gb.dtype, "grad_bias")


# ------------------------------------------------------------------ against the reference
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "sliced"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_matches_reference(bnr, dtype, layout, training):
    x = _layout((torch.randn(4, 5, 9, 9, dtype=torch.float64, device=DEVICE) * 2 + 1).to(dtype),
                layout)
    w, b, rm, rv = _params(5, dtype)
    _check_case(bnr, x, w, b, rm, rv, training)


@pytest.mark.parametrize("shape", [(2, 1, 5, 6), (3, 3, 4, 7), (2, 17, 3, 5), (5, 3, 1, 1),
                                   (7, 17, 1, 1), (1, 3, 2, 1)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_odd_sizes(bnr, shape, layout, training):
    x = _layout(torch.randn(shape, device=DEVICE), layout)
    w, b, rm, rv = _params(shape[1], torch.float32)
    _check_case(bnr, x, w, b, rm, rv, training)


@pytest.mark.parametrize("affine", [(False, False), (True, False), (False, True)],
                         ids=["none", "weight_only", "bias_only"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_weight_bias_none(bnr, affine, training):
    x = torch.randn(3, 4, 5, 6, device=DEVICE)
    w, b, rm, rv = _params(4, torch.float32, affine)
    _check_case(bnr, x, w, b, rm, rv, training)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_float32_params_with_half_x(bnr, dtype, layout):
    """Autocast's case: half x with float32 weight, bias and running statistics."""
    x = _layout(torch.randn(3, 6, 5, 7, device=DEVICE).to(dtype), layout)
    w, b, rm, rv = _params(6, torch.float32)
    for training in (True, False):
        _check_case(bnr, x, w, b, rm, rv, training)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_weight_grads_false(bnr, training):
    x = torch.randn(3, 4, 5, 6, device=DEVICE)
    w, b, rm, rv = _params(4, torch.float32)
    _check_case(bnr, x, w, b, rm, rv, training, weight_grads=False)
    _check_case(bnr, x, w, b, rm, rv, training, grad_residual=False, weight_grads=False)


def test_grad_residual_other_layout(bnr):
    """grad and grad_residual laid out unlike x (NCHW and a view, x channels_last)."""
    x = _layout(torch.randn(2, 5, 4, 6, device=DEVICE), "channels_last")
    w, b, rm, rv = _params(5, torch.float32)
    out, mean, var = _ops().batch_norm_relu_triton(x, w, b, rm, rv, True, EPS)
    g = torch.randn(x.shape, device=DEVICE)
    gres = _layout(torch.randn(x.shape, device=DEVICE), "sliced")
    gx, gw, gb = _ops().batch_norm_relu_backward_triton(g, x, w, b, mean, var, True, EPS,
                                                        gres, True)
    _, gx_want, gw_want, gb_want = _reference(x, w, b, rm, rv, True, g, gres)
    assert gx.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(gx.double(), gx_want, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(gw.double(), gw_want, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(gb.double(), gb_want, atol=2e-5, rtol=2e-5)


def test_strided_parameter_vectors(bnr):
    x = torch.randn(3, 4, 5, 5, device=DEVICE)
    w, b, rm, rv = (t.repeat_interleave(2)[::2] for t in _params(4, torch.float32))
    assert not w.is_contiguous()
    _check_case(bnr, x, w, b, rm, rv, True)
    _check_case(bnr, x, w, b, rm, rv, False)


@pytest.mark.parametrize("target", [1, 3, 100000], ids=["one_chunk", "three", "many"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_stage1_split(bnr, monkeypatch, target, layout):
    """One chunk per channel (every element in one program's loop), a few, or one chunk per
    block: the same statistics and gradients."""
    monkeypatch.setattr(bnr, "_TARGET_PROGRAMS", target)
    x = _layout(torch.randn(3, 3, 11, 13, dtype=torch.float64, device=DEVICE) * 5 + 100, layout)
    chunk, S = bnr._chunks(3, 3 * 11 * 13, layout == "channels_last")
    assert S == 1 or target > 1
    w, b, rm, rv = _params(3, torch.float64)
    _check_case(bnr, x, w, b, rm, rv, True)


def test_statistics_stable_for_large_mean(bnr):
    """float32 statistics of data with a large offset (naive sum of squares would lose
    every digit of the variance)."""
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64, device=DEVICE) + 1e4
    _, mean, var = _ops().batch_norm_relu_triton(x.float(), None, None, None, None, True, EPS)
    x32 = x.float().double()
    torch.testing.assert_close(var.double(), x32.var((0, 2, 3), unbiased=False), rtol=1e-4, atol=0)
    torch.testing.assert_close(mean.double(), x32.mean((0, 2, 3)), rtol=1e-7, atol=0)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_int64_specialization(bnr, monkeypatch, layout):
    """The 64-bit-offset code (on a GPU only past 2**31 elements) forced on small tensors."""
    monkeypatch.setattr(bnr, "needs_int64", lambda *t: True)
    monkeypatch.setattr(bnr, "_TARGET_PROGRAMS", 3)
    x = _layout(torch.randn(3, 5, 7, 9, dtype=torch.float64, device=DEVICE), layout)
    w, b, rm, rv = _params(5, torch.float64)
    _check_case(bnr, x, w, b, rm, rv, True)
    _check_case(bnr, x, w, b, rm, rv, False)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_bit_identical_run_to_run(bnr, layout):
    x = _layout(torch.randn(4, 6, 9, 11, device=DEVICE), layout)
    w, b, rm, rv = _params(6, torch.float32)
    g = torch.randn(x.shape, device=DEVICE)
    runs = []
    for _ in range(2):
        out, mean, var = _ops().batch_norm_relu_triton(x, w, b, rm, rv, True, EPS)
        grads = _ops().batch_norm_relu_backward_triton(g, x, w, b, mean, var, True, EPS, None, True)
        runs.append((out, mean, var) + tuple(grads))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_empty_batch(bnr):
    x = torch.randn(0, 3, 4, 4, device=DEVICE)
    w, b, rm, rv = _params(3, torch.float32)
    out, mean, var = _ops().batch_norm_relu_triton(x, w, b, rm, rv, True, EPS)
    assert out.shape == x.shape and torch.equal(mean, torch.zeros(3, device=DEVICE))
    assert torch.equal(var, torch.zeros(3, device=DEVICE))
    out, mean, var = _ops().batch_norm_relu_triton(x, w, b, rm, rv, False, EPS)
    assert out.shape == x.shape and torch.equal(mean, rm) and torch.equal(var, rv)
    gx, gw, gb = _ops().batch_norm_relu_backward_triton(x, x, w, b, mean, var, True, EPS, None, True)
    assert gx.shape == x.shape and torch.equal(gw, torch.zeros(3, device=DEVICE))
    assert torch.equal(gb, torch.zeros(3, device=DEVICE))


def test_nan_propagates(bnr):
    x = torch.randn(2, 3, 4, 4, device=DEVICE)
    x[1, 2, 3, 3] = float("nan")
    w, b, rm, rv = _params(3, torch.float32)
    out, _, _ = _ops().batch_norm_relu_triton(x, w, b, rm, rv, False, EPS)
    want = F.relu(F.batch_norm(x, rm, rv, w, b, False, 0.0, EPS))
    torch.testing.assert_close(out, want, equal_nan=True)


@triton.jit
def _divmod_kernel(a_ptr, d_ptr, q_ptr, r_ptr):
    i = tl.program_id(0)
    q, r = _divmod(tl.load(a_ptr + i), tl.load(d_ptr + i), True)
    tl.store(q_ptr + i, q)
    tl.store(r_ptr + i, r)


def test_divmod_64bit(bnr):
    """The 64-bit scalar split of the INT64 path (no integer division) is exact."""
    a = torch.tensor([0, 1, 4095, 2**31 + 7, 2**40 + 12345, 2**50 - 1, 3 * 2**49 + 5, 2**52 + 99,
                      2**33, 999_999_999_999], dtype=torch.int64, device=DEVICE)
    d = torch.tensor([1, 3, 4096, 7, 49, 2**31 - 1, 12544, 3, 2**16 + 1, 1_000_003],
                     dtype=torch.int32, device=DEVICE)
    q, r = torch.empty_like(a), torch.empty_like(a)
    _divmod_kernel[(a.numel(),)](a, d, q, r)
    assert torch.equal(q, a // d.long()) and torch.equal(r, a % d.long())


# ---------------------------------------------------------------- running statistics
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16],
                         ids=["float32", "float64", "bfloat16"])
def test_update_stats(bnr, dtype):
    C, count, momentum = 7, 30, 0.1
    rm = torch.randn(C, device=DEVICE).to(dtype)
    rv = (torch.rand(C, device=DEVICE) + 0.5).to(dtype)
    accd = torch.float64 if dtype == torch.float64 else torch.float32
    mean = torch.randn(C, device=DEVICE).to(accd)
    var = torch.rand(C, device=DEVICE).to(accd)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    want_m = (momentum * mean.to(acc) + (1 - momentum) * rm.to(acc)).to(dtype)
    want_v = (momentum * var.to(acc) * count / (count - 1) + (1 - momentum) * rv.to(acc)).to(dtype)
    ptrs = (rm.data_ptr(), rv.data_ptr())
    _ops().batch_norm_update_stats_triton(rm, rv, mean, var, momentum, count, None)
    assert (rm.data_ptr(), rv.data_ptr()) == ptrs
    tol = {"atol": 1e-12, "rtol": 1e-12} if dtype == torch.float64 else {}
    torch.testing.assert_close(rm, want_m, **tol)
    torch.testing.assert_close(rv, want_v, **tol)


def test_update_stats_counts_batches(bnr):
    """num_batches_tracked gains one inside the same launch (program 0), with no channels
    too; a float counter is refused by name."""
    rm, rv = torch.zeros(300, device=DEVICE), torch.ones(300, device=DEVICE)  # > one program
    mean, var = torch.full((300,), 2.0, device=DEVICE), torch.full((300,), 4.0, device=DEVICE)
    n = torch.tensor(41, device=DEVICE)
    _ops().batch_norm_update_stats_triton(rm, rv, mean, var, 0.5, 5, n)
    assert n.item() == 42
    torch.testing.assert_close(rm, torch.full_like(rm, 1.0), atol=0, rtol=0)
    torch.testing.assert_close(rv, torch.full_like(rv, 0.5 + 0.5 * 4.0 * 5 / 4), atol=0, rtol=0)
    empty = torch.empty(0, device=DEVICE)
    _ops().batch_norm_update_stats_triton(empty, empty, empty, empty, 0.5, 5, n)
    assert n.item() == 43
    with pytest.raises(RuntimeError, match="num_batches_tracked must hold one int64 value"):
        _ops().batch_norm_update_stats_triton(rm, rv, mean, var, 0.5, 5, torch.tensor(1.0, device=DEVICE))


def test_update_stats_matches_batch_norm(bnr):
    """One training step of F.batch_norm updates the running statistics as the forward's
    (mean, var) + batch_norm_update_stats do, strided running tensors included."""
    x = torch.randn(3, 4, 5, 6, device=DEVICE)
    rm, rv = torch.randn(8, device=DEVICE)[::2], (torch.rand(8, device=DEVICE) + 0.5)[::2]
    rm_ref, rv_ref = rm.clone(), rv.clone()
    F.batch_norm(x, rm_ref, rv_ref, None, None, True, 0.3, EPS)
    _, mean, var = _ops().batch_norm_relu_triton(x, None, None, rm, rv, True, EPS)
    _ops().batch_norm_update_stats_triton(rm, rv, mean, var, 0.3, 3 * 5 * 6, None)
    torch.testing.assert_close(rm, rm_ref)
    torch.testing.assert_close(rv, rv_ref)


# --------------------------------------------------------------------------- opcheck
def test_opcheck(bnr):
    """Schema, fake kernel, autograd registration and the AOTDispatcher traces (interpreted,
    the ops stay whole in the traced graph: _common.opaque_when_interpreted)."""
    x = torch.randn(2, 3, 4, 5, device=DEVICE)
    xcl = x.contiguous(memory_format=torch.channels_last)
    w, b, rm, rv = _params(3, torch.float32)
    for xi in (x, xcl):
        for training in (True, False):
            torch.library.opcheck(_ops().batch_norm_relu_triton.default,
                                  (xi, w, b, rm, rv, training, EPS))
        out, mean, var = _ops().batch_norm_relu_triton(xi, w, b, rm, rv, True, EPS)
        g = torch.randn_like(xi)
        torch.library.opcheck(_ops().batch_norm_relu_backward_triton.default,
                              (g, xi, w, b, mean, var, True, EPS, g, True))
        torch.library.opcheck(_ops().batch_norm_relu_backward_triton.default,
                              (g, xi, None, None, mean, var, False, EPS, None, False))
    torch.library.opcheck(_ops().batch_norm_update_stats_triton.default,
                          (rm.clone(), rv.clone(), rm + 1, rv + 1, 0.1, 10, None))
    torch.library.opcheck(_ops().batch_norm_update_stats_triton.default,
                          (rm.clone(), rv.clone(), rm + 1, rv + 1, 0.1, 10,
                           torch.tensor(2, device=DEVICE)))
    leaf = [t.clone().requires_grad_(True) for t in (x, w, b)]
    torch.library.opcheck(_ops().batch_norm_relu_triton.default,
                          (*leaf, rm, rv, True, EPS))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_autograd(bnr, training):
    """Gradients through the registered autograd (x, weight, bias)."""
    x = _layout(torch.randn(3, 4, 5, 6, dtype=torch.float64, device=DEVICE), "channels_last")
    w, b, rm, rv = _params(4, torch.float64)
    leaves = [t.clone().requires_grad_(True) for t in (x, w, b)]
    out, mean, var = _ops().batch_norm_relu_triton(*leaves, rm, rv, training, EPS)
    assert not mean.requires_grad and not var.requires_grad
    g = torch.randn(x.shape, dtype=torch.float64, device=DEVICE)
    out.backward(g)
    _, gx, gw, gb = _reference(x, w, b, rm, rv, training, g, None)
    for got, want in zip((leaf.grad for leaf in leaves), (gx, gw, gb)):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


# ------------------------------------------------------------------------------ errors
def _cxx_op(name: str):
    """The C++ op of this name, if the built extension has a kernel for it on DEVICE (else
    None): its errors are the ones the Triton op repeats."""
    key = "CUDA" if DEVICE == "cuda" else "CPU"
    try:
        op = getattr(torch.ops.resattn_fast, name).default
    except (AttributeError, RuntimeError):
        return None
    return op if torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), key) else None


BAD_FORWARD = [
    ("x_3d", lambda x, p: ((x[0],) + p + (True, EPS)), r"x must be a 4-D \(N, C, H, W\) tensor, got 3-D with shape \[3, 4, 5\]"),
    ("x_int", lambda x, p: ((x.long(),) + p + (True, EPS)), "x must be float32, float64, float16 or bfloat16, got Long"),
    ("no_channels", lambda x, p: ((x[:, :0],) + (None,) * 4 + (True, EPS)), r"x must have at least one channel, got \[2, 0, 4, 5\]"),
    ("eps", lambda x, p: ((x,) + p + (True, -1.0)), "eps must be >= 0, got -1"),
    ("weight_shape", lambda x, p: ((x, p[0][:2]) + p[1:] + (True, EPS)), r"weight must be a 1-D tensor of C = 3 values, got shape \[2\]"),
    ("bias_dtype", lambda x, p: ((x, p[0], p[1].double()) + p[2:] + (True, EPS)), r"bias must be float32 or x's dtype \(Float\), got Double"),
    ("one_value", lambda x, p: ((x[:1, :, :1, :1],) + p + (True, EPS)), r"Expected more than 1 value per channel when training, got input size \[1, 3, 1, 1\]"),
    ("eval_no_stats", lambda x, p: ((x,) + p[:2] + (None, None, False, EPS)), "running_mean and running_var are required when training=False"),
]


@pytest.mark.parametrize("case", BAD_FORWARD, ids=[c[0] for c in BAD_FORWARD])
def test_forward_errors(bnr, case):
    _, make, message = case
    x = torch.randn(2, 3, 4, 5, device=DEVICE)
    args = make(x, _params(3, torch.float32))
    with pytest.raises(RuntimeError, match=message):
        _ops().batch_norm_relu_triton(*args)
    cxx = _cxx_op("batch_norm_relu")
    if cxx is not None:
        with pytest.raises(RuntimeError, match=message):
            cxx(*args)


BAD_BACKWARD = [
    ("grad_shape", lambda g, x, m, v: (g[:1], x, None, None, m, v, True, EPS, None, True), r"grad must have x's shape, got \[1, 3, 4, 5\] and \[2, 3, 4, 5\]"),
    ("grad_dtype", lambda g, x, m, v: (g.double(), x, None, None, m, v, True, EPS, None, True), "grad and x must have the same dtype, got Double and Float"),
    ("residual_shape", lambda g, x, m, v: (g, x, None, None, m, v, True, EPS, g[:, :2], True), r"grad_residual must have x's shape, got \[2, 2, 4, 5\] and \[2, 3, 4, 5\]"),
    ("mean_shape", lambda g, x, m, v: (g, x, None, None, m[:1], v, True, EPS, None, True), r"mean must be a 1-D tensor of C = 3 values, got shape \[1\]"),
]


@pytest.mark.parametrize("case", BAD_BACKWARD, ids=[c[0] for c in BAD_BACKWARD])
def test_backward_errors(bnr, case):
    _, make, message = case
    x = torch.randn(2, 3, 4, 5, device=DEVICE)
    args = make(torch.randn_like(x), x, torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE))
    with pytest.raises(RuntimeError, match=message):
        _ops().batch_norm_relu_backward_triton(*args)
    cxx = _cxx_op("batch_norm_relu_backward")
    if cxx is not None:
        with pytest.raises(RuntimeError, match=message):
            cxx(*args)


def test_update_stats_errors(bnr):
    rm, rv = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
    with pytest.raises(RuntimeError, match=r"count must be > 1 \(values per channel\), got 1"):
        _ops().batch_norm_update_stats_triton(rm, rv, rm, rv, 0.1, 1, None)
    with pytest.raises(RuntimeError, match=r"var must be a 1-D tensor of 3 values, got shape \[2\]"):
        _ops().batch_norm_update_stats_triton(rm, rv, rm, rv[:2], 0.1, 4, None)
    with pytest.raises(RuntimeError, match="running_mean and running_var must have the same dtype, got Float and Double"):
        _ops().batch_norm_update_stats_triton(rm, rv.double(), rm, rv, 0.1, 4, None)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_roofline_prices_the_launches_that_run(bnr, monkeypatch, layout):
    """The roofline model prices the Triton twin at the kernels it really launches (each
    reduction finalized in its own launch; a per-channel kernel before an eval pass with
    no reduction), in every mode: the launcher is wrapped to count them."""
    from resattn_fast.roofline.trace import Tracer

    launched = []
    real = bnr._kernel

    def counting(kernel, like):
        launcher = real(kernel, like)

        class _Counted:
            def __getitem__(self, grid):
                run = launcher[grid]

                def go(*args, **kwargs):
                    launched.append(kernel.fn.__name__ if hasattr(kernel, "fn") else str(kernel))
                    return run(*args, **kwargs)
                return go
        return _Counted()

    monkeypatch.setattr(bnr, "_kernel", counting)
    gen = torch.Generator().manual_seed(0)
    x = _layout(torch.randn(2, 6, 5, 5, generator=gen), layout).to(DEVICE)
    g = torch.randn(x.shape, generator=gen).to(DEVICE)
    w, b = torch.rand(6, device=DEVICE) + 0.5, torch.randn(6, device=DEVICE)
    rm, rv = torch.zeros(6, device=DEVICE), torch.ones(6, device=DEVICE)
    ops = _ops()
    _, mean, var = ops.batch_norm_relu_triton(x, w, b, rm, rv, True, 1e-5)
    calls = {
        "forward, training": lambda: ops.batch_norm_relu_triton(x, w, b, rm, rv, True, 1e-5),
        "forward, eval": lambda: ops.batch_norm_relu_triton(x, w, b, rm, rv, False, 1e-5),
        "forward, training, with update": lambda: ops.batch_norm_relu_with_update_triton(
            x, w, b, rm, rv, 0.1, 1e-5, torch.tensor(0, device=DEVICE)),
        "running update": lambda: ops.batch_norm_update_stats_triton(
            rm, rv, mean, var, 0.1, 50, torch.tensor(0, device=DEVICE)),
        "backward, training": lambda: ops.batch_norm_relu_backward_triton(
            g, x, w, b, mean, var, True, 1e-5, g, True),
        "backward, eval": lambda: ops.batch_norm_relu_backward_triton(
            g, x, w, b, mean, var, False, 1e-5, None, False),
        "backward, eval, weight grads": lambda: ops.batch_norm_relu_backward_triton(
            g, x, w, b, mean, var, False, 1e-5, None, True),
    }
    for what, call in calls.items():
        launched.clear()
        tracer = Tracer()
        with tracer:
            call()
        priced = sum(r.launches for r in tracer.records if r.cls == "fused BN-ReLU")
        assert launched and priced == len(launched), (what, [(r.op, r.launches) for r in tracer.records], launched)


def _forward_backward(x, w, b, rm, rv, g, training, with_update):
    ops = _ops()
    rm, rv = rm.clone(), rv.clone()
    nbt = torch.tensor(3, device=DEVICE)
    if with_update:
        out, mean, var = ops.batch_norm_relu_with_update_triton(x, w, b, rm, rv, 0.1, EPS, nbt)
    else:
        out, mean, var = ops.batch_norm_relu_triton(x, w, b, rm, rv, training, EPS)
    grads = ops.batch_norm_relu_backward_triton(g, x, w, b, mean, var, training, EPS, g, True)
    return (out, mean, var, rm, rv, nbt) + tuple(grads)


@pytest.mark.parametrize("target", [1, 3, 100000], ids=["one_chunk", "three", "many"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_finalize_in_the_reduction_launch_equals_its_own_kernel(bnr, monkeypatch, target, layout, dtype):
    """Each reduction's stage 2 run by the last program of its channel tile (eager: two
    launches per pass pair) gives the same bits as the finalize kernels of their own (what
    torch.compile traces): outputs, statistics, running statistics, the count and every
    gradient, training with and without the update, and eval with weight gradients; with
    several channel tiles (C = 37 in channels_last) and one, a few or many chunks."""
    monkeypatch.setattr(bnr, "_TARGET_PROGRAMS", target)
    gen = torch.Generator().manual_seed(0)
    x = _layout((torch.randn(3, 37, 7, 9, generator=gen, dtype=torch.float64) * 3 + 2).to(dtype).to(DEVICE),
                layout)
    g = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE)
    w, b, rm, rv = _params(37, torch.float64 if dtype == torch.float64 else torch.float32)
    assert bnr._finalize_in_kernel(x)
    for training, with_update in ((True, False), (True, True), (False, False)):
        fused = _forward_backward(x, w, b, rm, rv, g, training, with_update)
        monkeypatch.setattr(bnr, "_finalize_in_kernel", lambda t: False)
        separate = _forward_backward(x, w, b, rm, rv, g, training, with_update)
        monkeypatch.undo()
        monkeypatch.setattr(bnr, "_TARGET_PROGRAMS", target)
        for i, (a, c) in enumerate(zip(fused, separate)):
            assert torch.equal(a, c), (training, with_update, i)
    # every counter left at zero for the next launch
    assert bnr._COUNTERS and all(int(t.abs().sum()) == 0 for t in bnr._COUNTERS.values())


def test_finalize_counts_launches_and_resets(bnr, monkeypatch):
    """The counters reset themselves: repeated fused calls (different tile counts) give the
    same bits, and the fused path launches two kernels each way in training."""
    launched = []
    real = bnr._kernel

    def counting(kernel, like):
        launched.append(kernel.fn.__name__ if hasattr(kernel, "fn") else str(kernel))
        return real(kernel, like)

    monkeypatch.setattr(bnr, "_kernel", counting)
    for C in (5, 70, 5):
        x = torch.randn(2, C, 6, 5, device=DEVICE).contiguous(memory_format=torch.channels_last)
        g = torch.randn(x.shape, device=DEVICE)
        w, b, rm, rv = _params(C, torch.float32)
        launched.clear()
        first = _forward_backward(x, w, b, rm, rv, g, True, True)
        assert launched == ["_bn_stats_kernel", "_bn_relu_fwd_kernel", "_bn_relu_bwd_reduce_kernel",
                            "_bn_relu_bwd_kernel"], launched
        second = _forward_backward(x, w, b, rm, rv, g, True, True)
        assert all(torch.equal(a, c) for a, c in zip(first, second))
