"""The CUDA kernels of batch_norm_relu (kernels/batch_norm_relu.cu) on the CPU, under the
emulation of CUDA's execution model (a build with RESATTN_BUILD_CUDA_EMULATION=1).

The op battery (tests/test_batch_norm_relu.py) runs backend "cuda" too; this file covers
what it cannot see: which kernel specialisation ran (vector width, NCHW or channels_last,
32/64-bit index), how many launches each call makes, grids that take several grid-stride
turns, bit-identical results on one SM and on many (the reduction order depends on the
shape only), and the emulated warp shuffles the reductions are built on. Every value is
compared with a float64 F.batch_norm + F.relu reference, forward and every gradient.
"""

from __future__ import annotations

import re
from typing import Dict, List, Tuple

import pytest
import torch
import torch.nn.functional as F
from _emulation import emulated, kernels, launches, options  # noqa: F401 (emulated: an autouse fixture)

from resattn_fast import _ext

CL = torch.channels_last
EPS = 1e-5


def ns():
    return torch.ops.resattn_fast_emulated


def _tol(dtype: torch.dtype) -> Dict[str, float]:
    if dtype == torch.float64:
        return {"atol": 1e-10, "rtol": 1e-10}
    if dtype == torch.float32:
        return {"atol": 2e-5, "rtol": 2e-5}
    return {"atol": 3e-2, "rtol": 2e-2}


def _params(C: int, dtype: torch.dtype, affine: bool = True, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(C, generator=gen).to(dtype) if affine else None
    b = torch.randn(C, generator=gen).to(dtype) if affine else None
    rm = torch.randn(C, generator=gen).to(dtype)
    rv = (torch.rand(C, generator=gen) + 0.5).to(dtype)
    return w, b, rm, rv


def _reference(x, w, b, rm, rv, training, g, residual):
    """float64 relu(batch_norm) forward, batch statistics, and (grad_x, grad_w, grad_b)."""
    x64 = x.detach().double().requires_grad_(True)
    w64 = w.double().requires_grad_(True) if w is not None else None
    b64 = b.double().requires_grad_(True) if b is not None else None
    out = F.relu(F.batch_norm(x64, rm.double().clone(), rv.double().clone(), w64, b64, training, 0.1, EPS))
    out.backward(g.double())
    grad_x = x64.grad + (residual.double() if residual is not None else 0)
    if training:
        mean, var = x64.detach().mean((0, 2, 3)), x64.detach().var((0, 2, 3), unbiased=False)
    else:
        mean, var = rm.double(), rv.double()
    grads = (grad_x,
             w64.grad if w64 is not None else None,
             b64.grad if b64 is not None else None)
    return out.detach(), mean, var, grads


def _run(x, w, b, rm, rv, training, g, residual=None):
    """Forward and backward of backend "cuda" (emulated) with the weight grads."""
    out, mean, var = ns().batch_norm_relu(x, w, b, rm, rv, training, EPS)
    grads = ns().batch_norm_relu_backward(g, x, w, b, mean, var, training, EPS, residual, True)
    return out, mean, var, grads


def _check(x, w, b, rm, rv, training, g, residual=None) -> Tuple:
    out, mean, var, (gx, gw, gb) = _run(x, w, b, rm, rv, training, g, residual)
    want_out, want_mean, want_var, (wgx, wgw, wgb) = _reference(x, w, b, rm, rv, training, g, residual)
    tol = _tol(x.dtype)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    assert out.dtype == x.dtype and out.shape == x.shape
    assert mean.dtype == acc and var.dtype == acc
    torch.testing.assert_close(out.double(), want_out, **tol)
    stat_tol = {"atol": 1e-12, "rtol": 1e-12} if acc == torch.float64 else {"atol": 1e-5, "rtol": 1e-5}
    torch.testing.assert_close(mean.double(), want_mean, **stat_tol)
    torch.testing.assert_close(var.double(), want_var, **stat_tol)
    # Gradients scale with the number of summed elements: compare relative to their size.
    for got, want in ((gx, wgx), (gw, wgw), (gb, wgb)):
        if want is None:
            continue
        scale = max(1.0, want.abs().max().item())
        torch.testing.assert_close(got.double() / scale, want / scale, **tol)
    return out, mean, var, (gx, gw, gb)


def _inputs(shape, dtype, memory_format=torch.contiguous_format, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen) * 2 + 0.5).to(dtype).contiguous(memory_format=memory_format)
    g = torch.randn(shape, generator=gen).to(dtype).contiguous(memory_format=memory_format)
    return x, g


def _offset(t: torch.Tensor, memory_format=torch.contiguous_format) -> torch.Tensor:
    """``t``'s values one element past a 16-byte boundary: same layout, misaligned pointer."""
    flat = torch.empty(t.numel() + 1, dtype=t.dtype)
    if memory_format == CL:
        out = flat[1:].view(t.permute(0, 2, 3, 1).shape).permute(0, 3, 1, 2)
    else:
        out = flat[1:].view(t.shape)
    out.copy_(t)
    assert out.data_ptr() % 16 != 0 and out.is_contiguous(memory_format=memory_format)
    return out


# ------------------------------------------------------------------ against the reference
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("training", [True, False])
def test_forward_and_grads_match_float64_reference(dtype, layout, training):
    fmt = CL if layout == "channels_last" else torch.contiguous_format
    x, g = _inputs((3, 8, 5, 4), dtype, fmt)
    residual = torch.randn(x.shape).to(dtype)
    out, _, _, (gx, gw, gb) = _check(x, *_params(8, dtype), training, g, residual)
    want = CL if layout == "channels_last" else torch.contiguous_format
    assert out.is_contiguous(memory_format=want) and gx.is_contiguous(memory_format=want)
    assert gw.dtype == dtype and gb.dtype == dtype  # the parameters' dtype


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_input_float32_parameters(dtype):
    """Autocast's mix: half x, float32 weight/bias/statistics; grads in float32."""
    x, g = _inputs((2, 16, 3, 8), dtype, CL)
    _, _, _, (_, gw, gb) = _check(x, *_params(16, torch.float32), True, g)
    assert gw.dtype == torch.float32 and gb.dtype == torch.float32


@pytest.mark.parametrize("training", [True, False])
def test_without_affine_parameters(training):
    x, g = _inputs((2, 5, 3, 7), torch.float32)
    _, _, _, (gx, gw, gb) = _check(x, *_params(5, torch.float32, affine=False), training, g)
    assert gw.shape == (5,) and gb.shape == (5,) and gw.dtype == torch.float32


def test_double_input_float32_parameters():
    x, g = _inputs((2, 3, 4, 5), torch.float64)
    w, b, rm, rv = _params(3, torch.float32)
    out, mean, var, (gx, gw, gb) = _run(x, w, b, rm, rv, True, g)
    assert mean.dtype == torch.float64 and gw.dtype == torch.float32
    want_out, want_mean, _, (wgx, _, _) = _reference(x, w, b, rm, rv, True, g, None)
    torch.testing.assert_close(out, want_out, atol=1e-6, rtol=1e-6)  # float32 weights
    torch.testing.assert_close(mean, want_mean, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(gx, wgx, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_non_dense_inputs_are_copied(layout):
    """Sliced and permuted views of x, grad and grad_residual."""
    fmt = CL if layout == "channels_last" else torch.contiguous_format
    big = torch.randn(4, 6, 10, 9).contiguous(memory_format=fmt)
    x = big[::2, :, 1::2, :7]
    g = torch.randn(2, 6, 7, 5).transpose(2, 3)
    residual = torch.randn(2, 6, 5, 14)[..., ::2]
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=CL)
    _check(x, *_params(6, torch.float32), True, g, residual)


def test_eval_statistics_are_new_tensors():
    x, g = _inputs((2, 4, 3, 3), torch.float32)
    w, b, rm, rv = _params(4, torch.float32)
    out, mean, var = ns().batch_norm_relu(x, w, b, rm, rv, False, EPS)
    assert torch.equal(mean, rm) and torch.equal(var, rv)
    assert mean.data_ptr() != rm.data_ptr() and var.data_ptr() != rv.data_ptr()
    half_stats = ns().batch_norm_relu(x.half(), w.half(), b.half(), rm.half(), rv.half(), False, EPS)
    assert half_stats[1].dtype == torch.float32


def test_empty_batch():
    x = torch.randn(0, 3, 4, 4)
    w, b, rm, rv = _params(3, torch.float32)
    out, mean, var = ns().batch_norm_relu(x, w, b, rm, rv, True, EPS)
    assert out.shape == x.shape and torch.equal(mean, torch.zeros(3)) and torch.equal(var, torch.zeros(3))
    assert not kernels()
    gx, gw, gb = ns().batch_norm_relu_backward(x, x, w, b, mean, var, True, EPS, None, True)
    assert gx.shape == x.shape and torch.equal(gw, torch.zeros(3))


def test_one_value_per_channel_raises():
    with pytest.raises(RuntimeError, match="Expected more than 1 value per channel"):
        ns().batch_norm_relu(torch.randn(1, 3, 1, 1), None, None, None, None, True, EPS)


def test_weight_grads_off_returns_empty():
    x, g = _inputs((2, 4, 3, 4), torch.float32)
    w, b, rm, rv = _params(4, torch.float32)
    _, mean, var = ns().batch_norm_relu(x, w, b, rm, rv, True, EPS)
    gx, gw, gb = ns().batch_norm_relu_backward(g, x, w, b, mean, var, True, EPS, None, False)
    assert gw.shape == (0,) and gb.shape == (0,)
    want = ns().batch_norm_relu_backward(g, x, w, b, mean, var, True, EPS, None, True)[0]
    assert torch.equal(gx, want)


# ---------------------------------------------------------------- launches, specialisations
def _names(pattern: str) -> List[str]:
    return [k for k in kernels() if re.match(pattern, k)]


@pytest.mark.parametrize("dtype,shape,layout,vec", [
    (torch.float32, (2, 3, 4, 5), "nchw", 4),            # HW = 20: float4
    (torch.float32, (2, 3, 3, 5), "nchw", 1),            # HW = 15: scalar
    (torch.float16, (2, 3, 4, 4), "nchw", 8),            # HW = 16: 8 halves
    (torch.float64, (2, 3, 3, 2), "nchw", 2),
    (torch.float32, (2, 8, 3, 3), "channels_last", 4),   # C = 8: float4 along C
    (torch.float32, (2, 6, 3, 3), "channels_last", 1),   # C = 6: scalar
    (torch.bfloat16, (2, 16, 3, 3), "channels_last", 8),
    (torch.float64, (2, 6, 3, 3), "channels_last", 2),
])
def test_vector_width_and_layout_kernels(dtype, shape, layout, vec):
    fmt = CL if layout == "channels_last" else torch.contiguous_format
    x, g = _inputs(shape, dtype, fmt)
    _check(x, *_params(shape[1], dtype), True, g)
    tag = "cl" if layout == "channels_last" else "nchw"
    cl = "true" if layout == "channels_last" else "false"
    ran = kernels()
    assert len(ran) == 4, ran
    assert re.fullmatch(rf"bn_stats_{tag}_kernel<.+, int, {vec}>", ran[0]), ran
    assert re.fullmatch(rf"bn_relu_forward_kernel<.+, int, {vec}, {cl}>", ran[1]), ran
    assert re.fullmatch(rf"bn_relu_grad_sums_{tag}_kernel<.+, int, {vec}>", ran[2]), ran
    assert re.fullmatch(rf"bn_relu_backward_kernel<.+, int, {vec}, {cl}, true>", ran[3]), ran


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_misaligned_pointers_fall_back_to_scalar(layout):
    fmt = CL if layout == "channels_last" else torch.contiguous_format
    x, g = _inputs((2, 8, 4, 4), torch.float32, fmt)
    _check(_offset(x, fmt), *_params(8, torch.float32), True, _offset(g, fmt))
    assert kernels() and all(re.search(r", 1(, (true|false))*>$", k) for k in kernels()), kernels()


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("training", [True, False])
def test_int64_index_path(layout, training):
    fmt = CL if layout == "channels_last" else torch.contiguous_format
    x, g = _inputs((3, 8, 5, 4), torch.float32, fmt)
    with options(force_int64_index=True):
        _check(x, *_params(8, torch.float32), training, g, torch.randn(x.shape))
    assert kernels() and all(re.search(r"<float, long( int)?, ", k) for k in kernels()), kernels()


@pytest.mark.parametrize("shape", [(2, 4, 4, 4), (9, 2, 48, 48)])  # one chunk per channel; two
def test_launch_counts_per_mode(shape):
    """One launch per pass over x (what the roofline prices): training forward, the
    statistics (their finalize in the same kernel) and normalise; eval one kernel. Backward:
    the sums (finalized in the same kernel) and apply; in eval without weight grads only
    the apply."""
    x, g = _inputs(shape, torch.float32)
    w, b, rm, rv = _params(shape[1], torch.float32)
    ns().batch_norm_relu(x, w, b, rm, rv, True, EPS)
    assert [k.split("<")[0] for k in kernels()] == ["bn_stats_nchw_kernel", "bn_relu_forward_kernel"]
    # The running update and the count inside the statistics kernel: no launch of their own.
    _ext.EMULATED.clear_launches()
    n = torch.tensor(0)
    ns().batch_norm_relu_with_update(x, w, b, rm.clone(), rv.clone(), 0.1, EPS, n)
    assert [k.split("<")[0] for k in kernels()] == ["bn_stats_nchw_kernel", "bn_relu_forward_kernel"]
    assert n.item() == 1
    _ext.EMULATED.clear_launches()
    _, mean, var = ns().batch_norm_relu(x, w, b, rm, rv, False, EPS)
    assert [k.split("<")[0] for k in kernels()] == ["bn_relu_forward_kernel"]
    _ext.EMULATED.clear_launches()
    ns().batch_norm_relu_backward(g, x, w, b, mean, var, False, EPS, x, False)
    assert [k.split("<")[0] for k in kernels()] == ["bn_relu_backward_kernel"]
    _ext.EMULATED.clear_launches()
    ns().batch_norm_relu_backward(g, x, w, b, mean, var, False, EPS, None, True)
    assert [k.split("<")[0] for k in kernels()] == ["bn_relu_grad_sums_nchw_kernel", "bn_relu_backward_kernel"]
    _ext.EMULATED.clear_launches()
    ns().batch_norm_relu_backward(g, x, w, b, mean, var, True, EPS, None, True)
    assert [k.split("<")[0] for k in kernels()] == ["bn_relu_grad_sums_nchw_kernel", "bn_relu_backward_kernel"]


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", [(2, 4, 4, 4), (9, 2, 48, 48), (2, 3073, 1, 2)])
def test_roofline_prices_the_launches_that_run(layout, shape):
    """The roofline model's launch count of each fused call (resattn_fast/roofline/trace.py)
    is the number of kernels these very kernels launch, in every mode: training and eval
    forward, the running update, backward with and without weight gradients and the
    shortcut's gradient; one and several chunks per channel; eval rows in shared memory or,
    past 48 KiB, from a kernel of their own."""
    from resattn_fast.roofline.trace import Tracer

    fmt = CL if layout == "channels_last" else torch.contiguous_format
    x, g = _inputs(shape, torch.float32, fmt)
    w, b, rm, rv = _params(shape[1], torch.float32)
    many_channels = shape[1] > 3072  # only the eval passes (a reduction over 3073 channels is slow here)
    _, mean, var = ns().batch_norm_relu(x, w, b, rm, rv, not many_channels, EPS)
    count = x.numel() // x.shape[1]
    rm_u, rv_u, n_u = rm.clone(), rv.clone(), torch.tensor(0)
    calls = {
        "forward, training": lambda: ns().batch_norm_relu(x, w, b, rm, rv, True, EPS),
        "forward, eval": lambda: ns().batch_norm_relu(x, w, b, rm, rv, False, EPS),
        "forward, training, with the running update": lambda: ns().batch_norm_relu_with_update(
            x, w, b, rm_u, rv_u, 0.1, EPS, n_u),
        "running update": lambda: ns().batch_norm_update_stats(rm, rv, mean, var, 0.1, count, torch.tensor(0)),
        "backward, training": lambda: ns().batch_norm_relu_backward(g, x, w, b, mean, var, True, EPS, None, True),
        "backward, training, shortcut": lambda: ns().batch_norm_relu_backward(
            g, x, w, b, mean, var, True, EPS, g, True),
        "backward, eval": lambda: ns().batch_norm_relu_backward(g, x, w, b, mean, var, False, EPS, None, False),
        "backward, eval, weight grads": lambda: ns().batch_norm_relu_backward(
            g, x, w, b, mean, var, False, EPS, None, True),
    }
    for what, call in calls.items():
        if many_channels and what not in ("forward, eval", "backward, eval"):
            continue
        _ext.EMULATED.clear_launches()
        tracer = Tracer(fused_namespaces=("resattn_fast_emulated",))
        with tracer:
            call()
        priced = sum(r.launches for r in tracer.records)
        assert priced == len(kernels()), (what, [(r.op, r.launches) for r in tracer.records], kernels())
        if many_channels:
            assert kernels()[0].startswith("bn_rows_kernel<"), kernels()


@pytest.mark.parametrize("dtype,C,in_shared", [
    (torch.float32, 8, True), (torch.float32, 3072, True), (torch.float32, 3073, False),
    (torch.float64, 1536, True), (torch.float64, 1537, False),
])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_eval_rows_in_shared_memory_or_global(dtype, C, in_shared, layout):
    """Eval passes compute each channel's (mean, scale, bias, invstd) once per block into
    shared memory (one launch); past 48 KiB of rows, one small kernel writes them to global
    memory."""
    fmt = CL if layout == "channels_last" else torch.contiguous_format
    x, g = _inputs((2, C, 1, 2), dtype, fmt)
    w, b, rm, rv = _params(C, dtype)
    out, mean, var = ns().batch_norm_relu(x, w, b, rm, rv, False, EPS)
    acc_bytes = 8 if dtype == torch.float64 else 4
    fwd = launches()
    _ext.EMULATED.clear_launches()
    gx = ns().batch_norm_relu_backward(g, x, w, b, mean, var, False, EPS, None, False)[0]
    bwd = launches()
    for ran, name in ((fwd, "bn_relu_forward_kernel"), (bwd, "bn_relu_backward_kernel")):
        if in_shared:
            assert [r["kernel"].split("<")[0] for r in ran] == [name], ran
            assert ran[0]["shared_bytes"] == C * 4 * acc_bytes, ran
        else:
            assert [r["kernel"].split("<")[0] for r in ran] == ["bn_rows_kernel", name], ran
            assert ran[1]["shared_bytes"] == 0, ran
    want_out, _, _, (wgx, _, _) = _reference(x, w, b, rm, rv, False, g, None)
    torch.testing.assert_close(out.double(), want_out, **_tol(dtype))
    torch.testing.assert_close(gx.double(), wgx, **_tol(dtype))


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_default_device_takes_several_grid_stride_turns(layout):
    """The emulated device (2 SMs) holds 4 blocks of 256: the elementwise kernels loop, and
    the reduction blocks each take several (channel, chunk) items."""
    fmt = CL if layout == "channels_last" else torch.contiguous_format
    x, g = _inputs((4, 16, 16, 16), torch.float32, fmt)
    _check(x, *_params(16, torch.float32), True, g)
    by_name = {launch["kernel"].split("<")[0]: launch for launch in launches()}
    for name in ("bn_relu_forward_kernel", "bn_relu_backward_kernel"):
        launch = by_name[name]
        assert launch["grid"][0] * launch["block"][0] * 2 <= x.numel() // 4, launch
    tag = "cl" if layout == "channels_last" else "nchw"
    stats = by_name[f"bn_stats_{tag}_kernel"]
    items = 16 if layout == "nchw" else 1  # (channel, chunk) items; one 16-channel tile
    assert stats["grid"][0] == min(4, items), stats
    if layout == "channels_last":
        assert stats["block"] == (4, 64, 1), stats  # 4 float4 vectors span C = 16


def _all_outputs(x, g, w, b, rm, rv, training, residual=None):
    out, mean, var, (gx, gw, gb) = _run(x, w, b, rm, rv, training, g, residual)
    return [out, mean, var, gx, gw, gb]


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_bit_identical_on_one_sm_and_many(layout):
    """Several chunks per channel (partials combined in a fixed order, by whichever block
    finishes a channel last): the same bits on a 1-SM device (one block loops over every
    item) as on a 64-SM one, and run to run (which also shows the arrival counters are left
    at zero: a count left over would keep the next call from finalizing)."""
    fmt = CL if layout == "channels_last" else torch.contiguous_format
    x, g = _inputs((9, 2, 48, 48), torch.float32, fmt, seed=3) if layout == "nchw" else \
        _inputs((9, 8, 48, 48), torch.float32, fmt, seed=3)
    C = x.shape[1]
    w, b, rm, rv = _params(C, torch.float32)
    want = _all_outputs(x, g, w, b, rm, rv, True)
    grids = {}
    for sms, per_sm in ((1, 256), (64, 2048)):
        with options(multiprocessors=sms, threads_per_multiprocessor=per_sm):
            _ext.EMULATED.clear_launches()
            got = _all_outputs(x, g, w, b, rm, rv, True)
            grids[sms] = [launch["grid"][0] for launch in launches()]
        for a, e in zip(got, want):
            assert torch.equal(a, e)
    assert grids[1] == [1] * len(grids[1]) and max(grids[64]) > 1, grids
    assert all(torch.equal(a, e) for a, e in zip(_all_outputs(x, g, w, b, rm, rv, True), want))
    # Several chunks per channel: a channel's partials are combined by its last block.
    ref = _reference(x, w, b, rm, rv, True, g, None)
    torch.testing.assert_close(want[1].double(), ref[1], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype,C", [(torch.float32, 136), (torch.float32, 135), (torch.float64, 66)])
def test_channels_last_several_tiles_and_chunks(dtype, C):
    """channels_last with more channel vectors than one block's columns (several tiles, the
    last one partial) and several chunks of rows: each tile's last block finalizes its
    channels, a warp per channel, on any device size."""
    x, g = _inputs((2, C, 9, 9), dtype, CL, seed=5)
    w, b, rm, rv = _params(C, dtype)
    with options(multiprocessors=64, threads_per_multiprocessor=2048):
        _check(x, w, b, rm, rv, True, g)
        stats = launches()[0]
        many = _all_outputs(x, g, w, b, rm, rv, True)
    with options(multiprocessors=1, threads_per_multiprocessor=256):
        one = _all_outputs(x, g, w, b, rm, rv, True)
    assert all(torch.equal(a, e) for a, e in zip(one, many))
    assert stats["kernel"].startswith("bn_stats_cl_kernel<"), stats
    vec = 1 if C % (16 // x.element_size()) else 16 // x.element_size()
    tiles = -(-(C // vec) // 32)
    assert tiles >= 2 and stats["grid"][0] >= 2 * tiles, stats  # several tiles, chunks of rows
    # The running update (the normalise kernel's first block); the batch counted once.
    rm1, rv1, n1 = rm.clone(), rv.clone(), torch.tensor(5)
    ns().batch_norm_update_stats(rm1, rv1, many[1], many[2], 0.2, x.numel() // C, n1)
    for sms, per_sm in ((1, 256), (64, 2048)):
        with options(multiprocessors=sms, threads_per_multiprocessor=per_sm):
            rm2, rv2, n2 = rm.clone(), rv.clone(), torch.tensor(5)
            got = ns().batch_norm_relu_with_update(x, w, b, rm2, rv2, 0.2, EPS, n2)
        assert all(torch.equal(a, e) for a, e in zip(list(got) + [rm2, rv2], many[:3] + [rm1, rv1]))
        assert n2.item() == n1.item() == 6


# ------------------------------------------------------------------ running statistics
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_update_stats_one_launch(dtype):
    gen = torch.Generator().manual_seed(1)
    rm, rv = torch.randn(7, generator=gen).to(dtype), torch.rand(7, generator=gen).to(dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    mean, var = torch.randn(7, generator=gen).to(acc), torch.rand(7, generator=gen).to(acc)
    want_m = 0.9 * rm.double() + 0.1 * mean.double()
    want_v = 0.9 * rv.double() + 0.1 * var.double() * 50 / 49
    ns().batch_norm_update_stats(rm, rv, mean, var, 0.1, 50, None)
    tol = _tol(dtype)
    torch.testing.assert_close(rm.double(), want_m, **tol)
    torch.testing.assert_close(rv.double(), want_v, **tol)
    assert [k.split("<")[0] for k in kernels()] == ["bn_update_stats_kernel"]


def test_update_stats_counts_batches_in_the_same_launch():
    """num_batches_tracked gains one from one thread of the update kernel (several blocks),
    and with no channels too: still one launch."""
    rm, rv = torch.zeros(1000), torch.ones(1000)
    n = torch.tensor(41)
    ns().batch_norm_update_stats(rm, rv, torch.full((1000,), 2.0), torch.full((1000,), 4.0), 0.5, 5, n)
    assert n.item() == 42
    torch.testing.assert_close(rm, torch.full((1000,), 1.0), atol=0, rtol=0)
    assert [k.split("<")[0] for k in kernels()] == ["bn_update_stats_kernel"]
    _ext.EMULATED.clear_launches()
    empty = torch.empty(0)
    ns().batch_norm_update_stats(empty, empty, empty, empty, 0.5, 5, n)
    assert n.item() == 43
    assert [k.split("<")[0] for k in kernels()] == ["bn_update_stats_kernel"]


def test_update_stats_strided_running_tensors():
    base_m, base_v = torch.zeros(10), torch.ones(10)
    rm, rv = base_m[::2], base_v[::2]
    ns().batch_norm_update_stats(rm, rv, torch.ones(5), torch.ones(5), 0.5, 3, None)
    assert torch.equal(base_m[::2], torch.full((5,), 0.5)) and torch.equal(base_m[1::2], torch.zeros(5))
    torch.testing.assert_close(base_v[::2], torch.full((5,), 0.5 + 0.5 * 1.5))


# ------------------------------------------------------------------ the warp shuffles
def test_emulated_warp_shuffles():
    """Down-tree, butterfly, broadcast and half-warp (mask and width 16) shuffles."""
    out = _ext.EMULATED.selftest_warp_shuffle(2, 96)
    v = torch.arange(1, 2 * 96 + 1, dtype=torch.float32)
    warps = v.view(-1, 32)
    lane = torch.arange(2 * 96) % 32
    warp_sum = warps.sum(1).repeat_interleave(32)
    assert torch.equal(out[lane == 0, 0], warps.sum(1))
    assert torch.equal(out[:, 1], warp_sum)
    assert torch.equal(out[:, 2], warps[:, 3].repeat_interleave(32))
    halves = v.view(-1, 16).sum(1)
    assert torch.equal(out[lane % 16 == 0, 3], halves)


def test_shuffle_with_departed_lanes_is_an_error():
    with pytest.raises(RuntimeError, match="does not exist or has returned"):
        _ext.EMULATED.selftest_divergent_shuffle()
