"""batch_norm_relu: every fused backend against the float64 reference.

relu(batch_norm(x)) in training and eval, forward, grad_x / grad_weight / grad_bias and the
running statistics; every dtype (half types by the 2x-eager rule, with float32 parameters
as under autocast), NCHW / channels_last / sliced views, odd sizes (C = 1, 3, 17; H = W = 1
with N > 1), affine=False, the identity shortcut's gradient fused into backward; the
module path (num_batches_tracked, momentum=None, three steps); gradcheck, opcheck,
torch.compile, what backward saves, run-to-run bit identity, and the eval kernel
reproducing the training output bit for bit (what selective recompute relies on).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _tolerance import assert_matches
from conftest import CPU_FUSED, require_backend

from resattn_fast import ops
from resattn_fast.nn import bn_relu
from resattn_fast.reference import ops as _ref_ops

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SHAPES = [(2, 3, 5, 7), (3, 1, 4, 4), (4, 17, 1, 1), (1, 3, 5, 5), (2, 16, 6, 6)]
EPS = 1e-5


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "sliced":
        # A view with gaps in memory: every other column of a wider tensor.
        wide = torch.zeros(t.shape[0], t.shape[1], t.shape[2], 2 * t.shape[3], dtype=t.dtype, device=t.device)
        wide[..., ::2] = t
        return wide[..., ::2]
    return t.contiguous()


def _inputs(shape, dtype, affine=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5).to(dtype).double()
    w = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5) if affine else None
    b = (torch.randn(c, generator=g, dtype=torch.float64) * 0.5) if affine else None
    rm = torch.randn(c, generator=g, dtype=torch.float64) * 0.1
    rv = torch.rand(c, generator=g, dtype=torch.float64) + 0.5
    grad = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).double()
    return x, w, b, rm, rv, grad


def _param_dtype(dtype):
    # Half x comes with float32 parameters and statistics (autocast, nn.BatchNorm2d).
    return torch.float64 if dtype == torch.float64 else torch.float32


def _run(fn, x, w, b, rm, rv, grad, training, momentum=0.1, grad_identity=None):
    x = x.detach().requires_grad_(True)
    w = None if w is None else w.detach().requires_grad_(True)
    b = None if b is None else b.detach().requires_grad_(True)
    if grad_identity is None:
        out = fn(x, rm, rv, w, b, training, momentum, EPS)
        out.backward(grad.to(out.dtype))
    else:
        out, ident = fn(x, rm, rv, w, b, training, momentum, EPS, identity=True)
        torch.autograd.backward([out, ident], [grad.to(out.dtype), grad_identity.to(out.dtype)])
    return (out.detach(), x.grad, None if w is None else w.grad, None if b is None else b.grad)


def _ref(x, rm, rv, w, b, training, momentum, eps, identity=False):
    out = F.relu(F.batch_norm(x, rm, rv, w, b, training, momentum, eps))
    return (out, x) if identity else out


def _check(backend, shape, dtype, layout, training=True, affine=True, identity=False, device="cpu"):
    require_backend(backend, device)
    x64, w64, b64, rm64, rv64, g64 = (None if t is None else t.to(device)
                                      for t in _inputs(shape, dtype, affine))
    gid64 = torch.randn(shape, dtype=torch.float64).to(dtype).double().to(device) if identity else None
    pdt = _param_dtype(dtype)

    def cast(t):
        return None if t is None else t.to(pdt, copy=True)

    rm, rv = cast(rm64), cast(rv64)
    x = _layout(x64.to(dtype), layout)

    def fused(*a, **k):
        return ops.batch_norm_relu(*a, backend=backend, **k)

    got = _run(fused, x, cast(w64), cast(b64), rm, rv, g64, training, grad_identity=gid64)
    erm, erv = rm64.clone(), rv64.clone()
    exp = _run(_ref, x64, w64, b64, erm, erv, g64, training, grad_identity=gid64)
    eager = [None] * 4
    if dtype in (torch.float16, torch.bfloat16):
        eager = _run(_ref, x64.to(dtype), cast(w64), cast(b64), rm64.to(pdt), rv64.to(pdt), g64,
                     training, grad_identity=gid64)
    tag = f"{backend} {dtype} {shape} {layout} training={training} affine={affine} identity={identity}"
    assert_matches(got[0], exp[0], dtype, eager[0], f"forward {tag}")
    assert_matches(got[1], exp[1], dtype, eager[1], f"grad_x {tag}")
    for i, name in ((2, "grad_weight"), (3, "grad_bias")):
        if affine:
            # Parameters are float32 (or float64): a sum over N*H*W of half inputs, checked
            # against float64 at a tolerance relative to the sum's magnitude.
            scale = max(1.0, exp[i].abs().max().item())
            tol = {torch.float64: 1e-10, torch.float32: 1e-5}.get(dtype, 2e-2)
            torch.testing.assert_close(got[i].double(), exp[i], atol=tol * scale, rtol=tol,
                                       msg=lambda m, n=name: f"{n} {tag}: {m}")
            assert got[i].dtype == pdt
    if training:
        tol = 1e-10 if dtype == torch.float64 else (1e-5 if dtype == torch.float32 else 1e-2)
        torch.testing.assert_close(rm.double(), erm, atol=tol, rtol=tol, msg=lambda m: f"running_mean {tag}: {m}")
        torch.testing.assert_close(rv.double(), erv, atol=tol, rtol=tol, msg=lambda m: f"running_var {tag}: {m}")
    else:
        torch.testing.assert_close(rm, cast(rm64), atol=0, rtol=0)  # eval never writes them
    if layout == "channels_last" and shape[1] > 1 and shape[2] * shape[3] > 1:
        assert got[0].is_contiguous(memory_format=torch.channels_last), f"{tag}: output not channels_last"
        assert got[1].is_contiguous(memory_format=torch.channels_last), f"{tag}: grad_x not channels_last"
    if layout == "nchw":
        assert got[0].is_contiguous() and got[1].is_contiguous(), f"{tag}: output not contiguous"


@pytest.mark.parametrize("backend", CPU_FUSED)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_shapes_float32(backend, shape):
    _check(backend, shape, torch.float32, "nchw")


@pytest.mark.parametrize("backend", CPU_FUSED)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "sliced"])
def test_dtypes_layouts(backend, dtype, layout):
    _check(backend, (2, 5, 6, 7), dtype, layout)


@pytest.mark.parametrize("backend", CPU_FUSED)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_eval(backend, dtype, layout):
    _check(backend, (2, 17, 3, 5), dtype, layout, training=False)


@pytest.mark.parametrize("backend", CPU_FUSED)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_affine_false(backend, layout):
    _check(backend, (3, 3, 4, 5), torch.float32, layout, affine=False)
    _check(backend, (3, 3, 4, 5), torch.float32, layout, affine=False, training=False)


@pytest.mark.parametrize("backend", CPU_FUSED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_identity_gradient_fused(backend, dtype, layout, training):
    """identity=True: the shortcut's gradient is added to grad_x by the op's backward."""
    _check(backend, (2, 8, 5, 3), dtype, layout, training=training, identity=True)


@pytest.mark.parametrize("backend", CPU_FUSED)
def test_identity_is_x_without_grad(backend):
    require_backend(backend)
    x = torch.randn(2, 3, 4, 4)
    out, ident = ops.batch_norm_relu(x, torch.zeros(3), torch.ones(3), training=True, identity=True,
                                     backend=backend)
    assert ident is x
    torch.testing.assert_close(out, _ref(x, None, None, None, None, True, 0.1, EPS))


@pytest.mark.parametrize("backend", CPU_FUSED)
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum0.1", "momentumNone"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_module_three_steps(backend, momentum, layout):
    """nn.bn_relu on a BatchNorm2d equals BatchNorm2d + ReLU over three training steps and
    one eval step: outputs, every gradient, running statistics, num_batches_tracked."""
    require_backend(backend)
    ref = torch.nn.BatchNorm2d(17, momentum=momentum)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-0.5, 0.5)
    fast = torch.nn.BatchNorm2d(17, momentum=momentum)
    fast.load_state_dict(ref.state_dict())
    for step in range(4):
        training = step < 3
        ref.train(training)
        fast.train(training)
        x = _layout(torch.randn(3, 17, 5, 4) * (step + 1) + step, layout)
        g = torch.randn(3, 17, 5, 4)
        xr = x.detach().clone().requires_grad_(True)
        xf = x.detach().clone().requires_grad_(True)
        out_r = F.relu(ref(xr))
        out_f = bn_relu(fast, xf, backend=backend)
        out_r.backward(g)
        out_f.backward(g)
        torch.testing.assert_close(out_f, out_r, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(xf.grad, xr.grad, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fast.weight.grad, ref.weight.grad, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(fast.bias.grad, ref.bias.grad, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(fast.running_mean, ref.running_mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fast.running_var, ref.running_var, atol=1e-5, rtol=1e-5)
        assert int(fast.num_batches_tracked) == int(ref.num_batches_tracked) == min(step + 1, 3)


@pytest.mark.parametrize("backend", CPU_FUSED)
def test_module_track_running_stats_false(backend):
    require_backend(backend)
    ref = torch.nn.BatchNorm2d(5, track_running_stats=False).eval()  # batch statistics in eval too
    fast = torch.nn.BatchNorm2d(5, track_running_stats=False).eval()
    x = torch.randn(4, 5, 3, 3)
    torch.testing.assert_close(bn_relu(fast, x, backend=backend), F.relu(ref(x)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ("reference",) + CPU_FUSED)
def test_one_value_per_channel_raises(backend):
    require_backend(backend)
    x = torch.randn(1, 4, 1, 1)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        ops.batch_norm_relu(x, torch.zeros(4), torch.ones(4), training=True, backend=backend)
    ops.batch_norm_relu(x, torch.zeros(4), torch.ones(4), training=False, backend=backend)  # eval is fine


def test_cpp_checks_name_the_argument():
    require_backend("cpu")
    op = torch.ops.resattn_fast.batch_norm_relu
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(RuntimeError, match="weight must be a 1-D tensor of C = 3"):
        op(x, torch.ones(4), None, None, None, True, 1e-5)
    with pytest.raises(RuntimeError, match="x must be a 4-D"):
        op(torch.randn(2, 3), None, None, None, None, True, 1e-5)
    with pytest.raises(RuntimeError, match="running_mean and running_var are required"):
        op(x, None, None, None, None, False, 1e-5)
    with pytest.raises(RuntimeError, match="Expected more than 1 value per channel"):
        op(torch.randn(1, 3, 1, 1), None, None, None, None, True, 1e-5)
    with pytest.raises(RuntimeError, match="bias must be float32 or x's dtype"):
        op(x, None, torch.ones(3, dtype=torch.float64), None, None, True, 1e-5)


@pytest.mark.parametrize("backend", ("reference",) + CPU_FUSED)
def test_python_checks_name_the_argument(backend):
    require_backend(backend)
    f = ops.batch_norm_relu
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="x must be a 4-D"):
        f(torch.randn(2, 3), None, None, training=True, backend=backend)
    with pytest.raises(ValueError, match="weight must be a 1-D tensor of C = 3"):
        f(x, None, None, torch.ones(4), training=True, backend=backend)
    with pytest.raises(ValueError, match="required when training=False"):
        f(x, None, None, training=False, backend=backend)
    with pytest.raises(TypeError, match="running_mean must be float32 or x's dtype"):
        f(x, torch.zeros(3, dtype=torch.float64), torch.ones(3), backend=backend)
    with pytest.raises(TypeError, match="momentum must be a float"):
        f(x, torch.zeros(3), torch.ones(3), training=True, momentum=None, backend=backend)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        f([1.0], None, None, training=True, backend=backend)


@pytest.mark.parametrize("backend", CPU_FUSED)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("identity", [False, True], ids=["plain", "identity"])
def test_gradcheck(backend, training, identity):
    require_backend(backend)
    x = (torch.randn(3, 4, 3, 2, dtype=torch.float64) + 0.3).requires_grad_(True)
    w = (torch.rand(4, dtype=torch.float64) + 0.5).requires_grad_(True)
    b = (torch.randn(4, dtype=torch.float64) * 0.3).requires_grad_(True)
    rm, rv = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)

    def fn(x, w, b):
        out = ops.batch_norm_relu(x, rm.clone(), rv.clone(), w, b, training, 0.1, EPS,
                                  identity=identity, backend=backend)
        return out[0] * 1.5 + out[1] if identity else out

    torch.autograd.gradcheck(fn, (x, w, b))


@pytest.mark.parametrize("backend", CPU_FUSED)
def test_saves_input_and_statistics_only(backend):
    """Backward keeps x, weight, bias and the (C,) mean and variance: never the output."""
    require_backend(backend)
    saved = []
    x = torch.randn(2, 3, 4, 5, requires_grad=True)
    w = torch.ones(3, requires_grad=True)
    b = torch.zeros(3, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = ops.batch_norm_relu(x, torch.zeros(3), torch.ones(3), w, b, True, backend=backend)
    big = [t for t in saved if t.numel() == x.numel()]
    assert len(big) == 1 and big[0].data_ptr() == x.data_ptr(), [tuple(t.shape) for t in saved]
    assert all(t.numel() in (x.numel(), 3) for t in saved), [tuple(t.shape) for t in saved]
    assert out.data_ptr() not in {t.data_ptr() for t in saved}
    out.sum().backward()


@pytest.mark.parametrize("backend", CPU_FUSED)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_bit_identical_and_eval_reproduces_training(backend, layout):
    """Two runs give the same bits; the eval kernel with the batch statistics reproduces the
    training output bit for bit (selective recompute relies on it)."""
    require_backend(backend)
    x = _layout(torch.randn(4, 24, 9, 11) * 3 + 1, layout)
    w, b = torch.rand(24) + 0.5, torch.randn(24)
    fwd = ops._bn_ops(backend, x.device)[0]
    out1, mean1, var1 = fwd(x, w, b, None, None, True, EPS)
    out2, mean2, var2 = fwd(x, w, b, None, None, True, EPS)
    assert torch.equal(out1, out2) and torch.equal(mean1, mean2) and torch.equal(var1, var2)
    again, _, _ = fwd(x, w, b, mean1, var1, False, EPS)
    assert torch.equal(again, out1)
    g = torch.randn_like(x)
    bwd = ops._bn_ops(backend, x.device)[1]
    r1 = bwd(g, x, w, b, mean1, var1, True, EPS, None, True)
    r2 = bwd(g, x, w, b, mean1, var1, True, EPS, None, True)
    assert all(torch.equal(a, c) for a, c in zip(r1, r2))


@pytest.mark.parametrize("backend", CPU_FUSED)
def test_empty_batch(backend):
    require_backend(backend)
    x = torch.randn(0, 3, 4, 4, requires_grad=True)
    rm, rv = torch.zeros(3), torch.ones(3)
    out = ops.batch_norm_relu(x, rm, rv, torch.ones(3), torch.zeros(3), training=True, backend=backend)
    assert out.shape == x.shape
    out.sum().backward()
    assert x.grad.shape == x.shape
    torch.testing.assert_close(rm, torch.zeros(3))  # nothing to average: running stats unchanged


def _opcheck_args(x):
    c = x.shape[1]
    w, b = torch.rand(c) + 0.5, torch.randn(c)
    return w, b, torch.zeros(c), torch.ones(c)


@pytest.mark.parametrize("backend", CPU_FUSED)
def test_opcheck(backend):
    require_backend(backend)
    fwd, bwd, upd, with_update = ops._bn_ops(backend, torch.device("cpu"))
    x = torch.randn(2, 3, 4, 5)
    w, b, rm, rv = _opcheck_args(x)
    for xx in (x, x.contiguous(memory_format=torch.channels_last)):
        torch.library.opcheck(fwd, (xx, w, b, None, None, True, EPS))
        torch.library.opcheck(fwd, (xx, w, b, rm, rv, False, EPS))
        torch.library.opcheck(fwd, (xx.clone().requires_grad_(True), w.clone().requires_grad_(True),
                                    b.clone().requires_grad_(True), None, None, True, EPS))
        _, mean, var = fwd(xx, w, b, None, None, True, EPS)
        torch.library.opcheck(bwd, (torch.randn_like(xx), xx, w, b, mean, var, True, EPS, None, True))
        torch.library.opcheck(bwd, (torch.randn_like(xx), xx, w, b, mean, var, False, EPS,
                                    torch.randn_like(xx), False))
    _, mean, var = fwd(x, w, b, None, None, True, EPS)
    torch.library.opcheck(upd, (rm.clone(), rv.clone(), mean, var, 0.1, x.numel() // 3, None))
    torch.library.opcheck(upd, (rm.clone(), rv.clone(), mean, var, 0.1, x.numel() // 3, torch.tensor(4)))
    for xx in (x, x.contiguous(memory_format=torch.channels_last)):
        torch.library.opcheck(with_update, (xx, w, b, rm.clone(), rv.clone(), 0.1, EPS, None))
        torch.library.opcheck(with_update, (xx, None, None, rm.clone(), rv.clone(), 0.1, EPS, torch.tensor(4)))


# Tracing through a functools cache in the op's path makes Dynamo warn (a user's warning):
# the ops' dispatch must trace without one.
@pytest.mark.filterwarnings("error:Dynamo detected a call to a `functools:UserWarning")
@pytest.mark.parametrize("backend", CPU_FUSED)
def test_torch_compile_fullgraph(backend):
    require_backend(backend)
    torch._dynamo.reset()

    def fn(x, rm, rv, w, b):
        out, ident = ops.batch_norm_relu(x, rm, rv, w, b, True, 0.1, EPS, identity=True, backend=backend)
        return out * 2 + ident

    x = torch.randn(2, 6, 5, 5)
    w, b = torch.rand(6) + 0.5, torch.randn(6)
    rm_e, rv_e, rm_c, rv_c = torch.zeros(6), torch.ones(6), torch.zeros(6), torch.ones(6)
    xe, xc = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    eager = fn(xe, rm_e, rv_e, w, b)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(xc, rm_c, rv_c, w, b)
    torch.testing.assert_close(compiled, eager)
    eager.sum().backward()
    compiled.sum().backward()
    torch.testing.assert_close(xc.grad, xe.grad)
    torch.testing.assert_close(rm_c, rm_e)
    torch.testing.assert_close(rv_c, rv_e)


# --------------------------------------------------------- batch_norm_relu_with_update
# Training forward and running update in one op (the update inside the statistics kernel):
# what ops.batch_norm_relu runs in training with running statistics, outside torch.compile.
# Its outputs, running statistics and count equal batch_norm_relu(training) followed by
# batch_norm_update_stats bit for bit, on every backend; the battery above covers it
# against the float64 reference through ops.batch_norm_relu.
WITH_UPDATE_DTYPES = [(torch.float32, torch.float32), (torch.float64, torch.float64),
                      (torch.float16, torch.float32), (torch.bfloat16, torch.float32),
                      (torch.float16, torch.float16), (torch.float64, torch.float32)]


def _running(c, dtype, strided, seed):
    g = torch.Generator().manual_seed(seed)
    rm, rv = torch.randn(2 * c, generator=g).to(dtype), (torch.rand(2 * c, generator=g) + 0.5).to(dtype)
    return (rm[::2], rv[::2]) if strided else (rm[:c].clone(), rv[:c].clone())


@pytest.mark.parametrize("backend", CPU_FUSED)
@pytest.mark.parametrize("dtypes", WITH_UPDATE_DTYPES, ids=lambda d: f"{d[0]}-{d[1]}".replace("torch.", ""))
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "sliced"])
def test_with_update_equals_forward_then_update(backend, dtypes, layout):
    require_backend(backend)
    fwd, _, upd, with_update = ops._bn_ops(backend, torch.device("cpu"))
    dtype, rdtype = dtypes
    for i, shape in enumerate(SHAPES + [(9, 2, 48, 48)]):
        c = shape[1]
        x, w, b, _, _, _ = _inputs(shape, dtype, seed=i)
        x = _layout(x.to(dtype), layout)
        pdt = _param_dtype(dtype)
        w, b = w.to(pdt), b.to(pdt)
        momentum = (0.1, 0.0, 1.0, 0.25)[i % 4]
        strided = i % 2 == 1
        rm1, rv1 = _running(c, rdtype, strided, i)
        rm2, rv2 = _running(c, rdtype, strided, i)
        n1, n2 = (torch.tensor(7), torch.tensor(7)) if i % 3 else (None, None)
        out1, mean1, var1 = fwd(x, w, b, None, None, True, EPS)
        upd(rm1, rv1, mean1, var1, momentum, x.numel() // c, n1)
        out2, mean2, var2 = with_update(x, w, b, rm2, rv2, momentum, EPS, n2)
        tag = f"{backend} {dtype} running {rdtype} {layout} {shape} momentum={momentum} strided={strided}"
        for got, want, name in ((out2, out1, "out"), (mean2, mean1, "mean"), (var2, var1, "var"),
                                (rm2, rm1, "running_mean"), (rv2, rv1, "running_var")):
            assert got.dtype == want.dtype and torch.equal(got, want), f"{name} {tag}"
        assert n1 is None or n1.item() == n2.item() == 8, tag
        if momentum == 0.0:
            torch.testing.assert_close(rm2, _running(c, rdtype, strided, i)[0], atol=0, rtol=0)


@pytest.mark.parametrize("backend", ("reference",) + CPU_FUSED)
def test_with_update_empty_batch_counts_only(backend):
    require_backend(backend)
    with_update = _ref_ops.batch_norm_relu_with_update if backend == "reference" else \
        ops._bn_ops(backend, torch.device("cpu"))[3]
    rm, rv, n = torch.randn(3), torch.rand(3) + 0.5, torch.tensor(2)
    rm0, rv0 = rm.clone(), rv.clone()
    out, mean, var = with_update(torch.randn(0, 3, 4, 4), torch.ones(3), torch.zeros(3), rm, rv, 0.1, EPS, n)
    assert out.shape == (0, 3, 4, 4) and n.item() == 3
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)
    assert torch.equal(mean, torch.zeros(3)) and torch.equal(var, torch.zeros(3))


@pytest.mark.parametrize("backend", CPU_FUSED)
def test_with_update_matches_reference(backend):
    """The op against its plain-PyTorch reference (reference/ops.py): float64, C = 17."""
    require_backend(backend)
    with_update = ops._bn_ops(backend, torch.device("cpu"))[3]
    x, w, b, rm, rv, _ = _inputs((3, 17, 5, 4), torch.float64)
    rm_r, rv_r, n_r, n = rm.clone(), rv.clone(), torch.tensor(0), torch.tensor(0)
    want = _ref_ops.batch_norm_relu_with_update(x, w, b, rm_r, rv_r, 0.3, EPS, n_r)
    got = with_update(x, w, b, rm, rv, 0.3, EPS, n)
    for g, e in zip(list(got) + [rm, rv], list(want) + [rm_r, rv_r]):
        torch.testing.assert_close(g, e, atol=1e-12, rtol=1e-12)
    assert n.item() == n_r.item() == 1


@pytest.mark.parametrize("backend", CPU_FUSED)
def test_with_update_checks_name_the_argument(backend):
    require_backend(backend)
    with_update = ops._bn_ops(backend, torch.device("cpu"))[3]
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(RuntimeError, match="running_mean and running_var must have the same dtype"):
        with_update(x.half(), None, None, torch.zeros(3), torch.ones(3, dtype=torch.half), 0.1, EPS, None)
    with pytest.raises(RuntimeError, match="num_batches_tracked must hold one int64 value"):
        with_update(x, None, None, torch.zeros(3), torch.ones(3), 0.1, EPS, torch.tensor(1.0))
    with pytest.raises(RuntimeError, match="running_var must be a 1-D tensor of C = 3"):
        with_update(x, None, None, torch.zeros(3), torch.ones(4), 0.1, EPS, None)
    with pytest.raises(RuntimeError, match="Expected more than 1 value per channel"):
        with_update(torch.randn(1, 3, 1, 1), None, None, torch.zeros(3), torch.ones(3), 0.1, EPS, None)


@pytest.mark.parametrize("backend", CPU_FUSED)
def test_module_runs_one_op_per_training_call(backend):
    """nn.bn_relu in training: the forward is one batch_norm_relu_with_update (the running
    statistics and the count inside it), no separate update and no `+= 1`; eval and
    momentum=0 (the checkpoint's recomputation) take the plain op."""
    require_backend(backend)
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.append(func._schema.name.split("::")[-1])
            return func(*args, **(kwargs or {}))

    bn = torch.nn.BatchNorm2d(5)
    x = torch.randn(2, 5, 3, 3, requires_grad=True)
    with Ops() as mode:
        bn_relu(bn, x, backend=backend).sum().backward()
    fused = [n for n in mode.seen if n.startswith("batch_norm")]
    suffix = "_triton" if backend == "triton" else ""
    assert fused == [f"batch_norm_relu_with_update{suffix}", f"batch_norm_relu_backward{suffix}"], mode.seen
    assert "add_" not in mode.seen and bn.num_batches_tracked.item() == 1
    bn.momentum = 0.0
    with Ops() as mode:
        bn_relu(bn, x, backend=backend)
    assert [n for n in mode.seen if n.startswith("batch_norm")] == [f"batch_norm_relu{suffix}"], mode.seen


# On a GPU (benchmarks/gpu_check.sh): the CUDA and Triton kernels, compiled for the device.
GPU_BACKENDS = ("cuda", "triton")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "sliced"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gpu_dtypes_layouts(backend, dtype, layout, training):
    for shape in ((2, 5, 6, 7), (8, 64, 28, 28), (4, 17, 1, 1)):
        _check(backend, shape, dtype, layout, training=training, device="cuda")
    _check(backend, (4, 33, 9, 9), dtype, layout, training=training, identity=True, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_gpu_stage1_full_size_bit_identical(backend, layout):
    """The headline shape (batch 16 here): float32 against float64, and two runs bit-identical."""
    require_backend(backend, "cuda")
    _check(backend, (16, 256, 56, 56), torch.float32, layout, device="cuda")
    x = _layout(torch.randn(16, 256, 56, 56, device="cuda") * 2 + 1, layout)
    fwd, bwd, _, _ = ops._bn_ops(backend, x.device)
    w, b = torch.rand(256, device="cuda") + 0.5, torch.randn(256, device="cuda")
    r1, r2 = fwd(x, w, b, None, None, True, EPS), fwd(x, w, b, None, None, True, EPS)
    assert all(torch.equal(a, c) for a, c in zip(r1, r2))
    g = torch.randn_like(x)
    b1 = bwd(g, x, w, b, r1[1], r1[2], True, EPS, None, True)
    b2 = bwd(g, x, w, b, r1[1], r1[2], True, EPS, None, True)
    assert all(torch.equal(a, c) for a, c in zip(b1, b2))
    assert torch.equal(fwd(x, w, b, r1[1], r1[2], False, EPS)[0], r1[0])


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_opcheck_and_compile(backend):
    require_backend(backend, "cuda")
    fwd, bwd, upd, with_update = ops._bn_ops(backend, torch.device("cuda"))
    x = torch.randn(2, 3, 4, 5, device="cuda")
    w, b = torch.rand(3, device="cuda") + 0.5, torch.randn(3, device="cuda")
    torch.library.opcheck(fwd, (x, w, b, None, None, True, EPS))
    _, mean, var = fwd(x, w, b, None, None, True, EPS)
    torch.library.opcheck(bwd, (torch.randn_like(x), x, w, b, mean, var, True, EPS, torch.randn_like(x), True))
    torch.library.opcheck(upd, (torch.zeros(3, device="cuda"), torch.ones(3, device="cuda"), mean, var, 0.1, 40,
                                torch.tensor(2, device="cuda")))
    torch.library.opcheck(with_update, (x, w, b, torch.zeros(3, device="cuda"), torch.ones(3, device="cuda"),
                                        0.1, EPS, torch.tensor(2, device="cuda")))
    torch._dynamo.reset()

    def fn(x, rm, rv):
        out, ident = ops.batch_norm_relu(x, rm, rv, w, b, True, 0.1, EPS, identity=True, backend=backend)
        return out * 2 + ident

    xe = x.clone().requires_grad_(True)
    xc = x.clone().requires_grad_(True)
    rms = [torch.zeros(3, device="cuda") for _ in range(2)]
    rvs = [torch.ones(3, device="cuda") for _ in range(2)]
    eager = fn(xe, rms[0], rvs[0])
    compiled = torch.compile(fn, fullgraph=True)(xc, rms[1], rvs[1])
    torch.testing.assert_close(compiled, eager)
    eager.sum().backward()
    compiled.sum().backward()
    torch.testing.assert_close(xc.grad, xe.grad)
    torch.testing.assert_close(rms[1], rms[0])
    torch.testing.assert_close(rvs[1], rvs[0])


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("shape,dtype,layout", [
    ((16, 256, 56, 56), torch.float32, "nchw"), ((16, 256, 56, 56), torch.bfloat16, "channels_last"),
    ((64, 2048, 7, 7), torch.bfloat16, "channels_last"), ((64, 1024, 14, 14), torch.float16, "nchw")])
def test_gpu_reductions_finalized_in_one_launch(backend, shape, dtype, layout):
    """On a real device the per-channel reductions are finalized by the block that
    completes each channel (counters reset by that block, partials published by a fence):
    twenty runs give the same bits, and batch_norm_relu_with_update equals the forward
    followed by batch_norm_update_stats."""
    require_backend(backend, "cuda")
    fwd, bwd, upd, with_update = ops._bn_ops(backend, torch.device("cuda"))
    c = shape[1]
    x = _layout(torch.randn(shape, device="cuda") * 2 + 1, layout).to(dtype)
    w, b = torch.rand(c, device="cuda") + 0.5, torch.randn(c, device="cuda")
    g = torch.randn_like(x)
    first = fwd(x, w, b, None, None, True, EPS)
    grads = bwd(g, x, w, b, first[1], first[2], True, EPS, None, True)
    for _ in range(20):
        again = fwd(x, w, b, None, None, True, EPS)
        assert all(torch.equal(a, e) for a, e in zip(again, first))
        assert all(torch.equal(a, e) for a, e in zip(bwd(g, x, w, b, again[1], again[2], True, EPS, None, True),
                                                     grads))
    rm1, rv1 = torch.zeros(c, device="cuda"), torch.ones(c, device="cuda")
    rm2, rv2 = rm1.clone(), rv1.clone()
    n1, n2 = torch.tensor(0, device="cuda"), torch.tensor(0, device="cuda")
    upd(rm1, rv1, first[1], first[2], 0.1, x.numel() // c, n1)
    got = with_update(x, w, b, rm2, rv2, 0.1, EPS, n2)
    assert all(torch.equal(a, e) for a, e in zip(list(got) + [rm2, rv2, n2], list(first) + [rm1, rv1, n1]))
