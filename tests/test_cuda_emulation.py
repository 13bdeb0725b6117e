"""The CUDA kernels (kernels/*.cu) run on the CPU under the emulation of CUDA's execution
model (a build with RESATTN_BUILD_CUDA_EMULATION=1): the paths a GPU test reaches only with
huge or oddly placed tensors, checked against the reference and by the launch log.

The per-op batteries (tests/test_upsample_bilinear_add.py, test_attention_residual.py,
test_modules.py) run on backend "cuda" too; this file covers what they cannot see: which
kernel specialisation ran (vector width, 32/64-bit index, shared-memory tables or not),
one-block and many-block grids, and that the emulation's nets catch a missing barrier.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch
from _emulation import emulated, kernels, options  # noqa: F401 (emulated: an autouse fixture)
from _tolerance import assert_matches

from resattn_fast import _ext, ops
from resattn_fast.reference import ops as ref


def _offset(t: torch.Tensor, elements: int = 1, memory_format=torch.contiguous_format) -> torch.Tensor:
    """``t``'s values in a buffer that starts ``elements`` past a 16-byte boundary: same
    layout, misaligned data pointer."""
    flat = torch.empty(t.numel() + elements, dtype=t.dtype)
    out = flat[elements:].view(t.permute(0, 2, 3, 1).shape).permute(0, 3, 1, 2) \
        if memory_format == torch.channels_last else flat[elements:].view(t.shape)
    out.copy_(t)
    assert out.data_ptr() % 16 != 0
    return out


def _reference_grads(fn, inputs, g):
    """``fn(*inputs)`` and the gradients of the inputs that require them, by autograd."""
    out = fn(*inputs)
    out.backward(g)
    return [out.detach()] + [t.grad for t in inputs if t is not None and t.requires_grad]


def _check(got, fn_ref, inputs, g, what):
    """``got`` (the kernel's output and input gradients) vs the float64 reference; for
    half types within twice the error of eager PyTorch in the same dtype (tests/_tolerance.py)."""
    dtype = g.dtype

    def leaves(cast):
        return [None if t is None else cast(t.detach()).requires_grad_(t.requires_grad) for t in inputs]

    want = _reference_grads(fn_ref, leaves(torch.Tensor.double), g.double())
    eager = None
    if dtype in (torch.float16, torch.bfloat16):
        eager = _reference_grads(fn_ref, leaves(torch.Tensor.clone), g)
    for i, (a, w) in enumerate(zip(got, want)):
        assert_matches(a, w, dtype, eager[i] if eager else None, f"{what} [{i}]")


def _upsample_check(x, s, size=None, align_corners=True):
    """Forward and grad_x of backend "cuda" vs the float64 reference; returns the launches."""
    _ext.EMULATED.clear_launches()
    xr = x.detach().requires_grad_(True)  # keeps x's strides and storage offset
    out = ops.upsample_bilinear_add(xr, s, size=size, align_corners=align_corners, backend="cuda")
    g = torch.randn_like(out)  # in the output's memory format, like a real upstream grad
    out.backward(g)
    launched = kernels()
    size = size or tuple(s.shape[-2:])
    _check([out.detach(), xr.grad], lambda a, b: ref.upsample_bilinear_add(a, b, size=size, align_corners=align_corners),
           [x.detach().requires_grad_(True), s], g, f"upsample {x.dtype} {tuple(x.shape)}->{size}")
    return launched


# ------------------------------------------------------------------ the backend itself
def test_cuda_listed_for_cpu_tensors():
    assert "cuda" in ops.available_backends("cpu")
    assert ops.resolve_backend(None, torch.device("cpu")) != "cuda"  # never the default on a CPU
    info = _ext.build_info()
    assert info["cuda_emulation"] is True
    expected = os.environ.get("RESATTN_EXPECT_EMULATION_SANITIZER")
    if expected is not None:  # set by the AddressSanitizer run (tests/test_cuda_emulation_asan.py)
        assert info["cuda_emulation_sanitizer"] == expected


def test_resattn_info_says_emulated():
    proc = subprocess.run([sys.executable, "-m", "resattn_fast", "info"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "emulated" in proc.stdout and "cuda" in proc.stdout


def test_each_op_launches_the_cuda_kernels():
    x, s = torch.randn(2, 4, 5, 6, requires_grad=True), torch.randn(2, 4, 9, 11)
    m = torch.randn(2, 4, 9, 11, requires_grad=True)
    out = ops.attention_residual(m, ops.upsample_bilinear_add(x, s, backend="cuda"), backend="cuda")
    out.sum().backward()
    ran = kernels()
    assert [k.split("<")[0] for k in ran] == [
        "upsample_forward_nchw_kernel", "attention_residual_forward_kernel",
        "attention_residual_backward_kernel", "upsample_backward_nchw_kernel"]


def test_opcheck_emulated_ops():
    ns = torch.ops.resattn_fast_emulated
    x, s = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 7, 9)
    torch.library.opcheck(ns.upsample_bilinear_add.default, (x.requires_grad_(True), s, [7, 9], True))
    torch.library.opcheck(ns.upsample_bilinear_add.default, (x.detach(), None, [3, 2], False))
    torch.library.opcheck(ns.upsample_bilinear_add_backward.default, (torch.randn(2, 3, 7, 9), [4, 5], True))
    m, f = torch.randn(2, 3, 4, 5, requires_grad=True), torch.randn(2, 3, 4, 5, requires_grad=True)
    torch.library.opcheck(ns.attention_residual.default, (m, f))
    torch.library.opcheck(ns.attention_residual_backward.default, (torch.randn(2, 3, 4, 5), m.detach(), f.detach()))


def test_gradgradcheck():
    x = torch.randn(1, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    s = torch.randn(1, 2, 6, 5, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradgradcheck(lambda a, b: ops.upsample_bilinear_add(a, b, backend="cuda"), (x, s))


def test_compile_fullgraph():
    def f(x, s, m):
        return ops.attention_residual(m, ops.upsample_bilinear_add(x, s, backend="cuda"), backend="cuda")

    x, s, m = torch.randn(2, 4, 5, 6), torch.randn(2, 4, 9, 11), torch.randn(2, 4, 9, 11)
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x, s, m), f(x, s, m))


# ------------------------------------------------------------ vector widths and fallbacks
@pytest.mark.parametrize("dtype,W,vec", [
    (torch.float32, 12, 4), (torch.float32, 14, 2), (torch.float32, 7, 1),
    (torch.float16, 16, 8), (torch.bfloat16, 16, 8), (torch.bfloat16, 12, 4), (torch.float16, 9, 1),
    (torch.float64, 10, 2),
])
def test_upsample_forward_nchw_vector_width(dtype, W, vec):
    """NCHW: the widest power of two up to 128 bits that divides W (a 1-wide scalar loop else)."""
    x, s = torch.randn(2, 3, 4, 5).to(dtype), torch.randn(2, 3, 7, W).to(dtype)
    ran = _upsample_check(x, s)
    assert ran[0].startswith("upsample_forward_nchw_kernel<") and ran[0].endswith(f", {vec}>"), ran


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_upsample_forward_nchw_misaligned_falls_back_to_scalar(dtype):
    x, s = torch.randn(2, 3, 4, 5).to(dtype), torch.randn(2, 3, 7, 16).to(dtype)
    ran = _upsample_check(x, _offset(s))
    assert ran[0].endswith(", 1>"), ran


@pytest.mark.parametrize("dtype,C,vec", [(torch.float32, 8, 4), (torch.float32, 6, 1),
                                         (torch.bfloat16, 16, 8), (torch.float16, 24, 8),
                                         (torch.float16, 12, 1), (torch.float64, 6, 2),
                                         (torch.float64, 5, 1)])
def test_upsample_channels_last_vector_width(dtype, C, vec):
    """channels_last: VEC channels per thread when C is a multiple of VEC, forward and backward."""
    cl = torch.channels_last
    x = torch.randn(2, C, 4, 5).to(dtype).contiguous(memory_format=cl)
    s = torch.randn(2, C, 7, 9).to(dtype).contiguous(memory_format=cl)
    ran = _upsample_check(x, s)
    assert ran[0].startswith("upsample_forward_cl_kernel<") and ran[0].endswith(f", {vec}>"), ran
    assert ran[-1].startswith("upsample_backward_cl_kernel<") and f", {vec}, true>" in ran[-1], ran


def test_upsample_channels_last_misaligned_falls_back_to_scalar():
    cl = torch.channels_last
    x = _offset(torch.randn(2, 8, 4, 5), memory_format=cl)
    s = torch.randn(2, 8, 7, 9).contiguous(memory_format=cl)
    assert x.is_contiguous(memory_format=cl)
    ran = _upsample_check(x, s)
    assert ran[0].startswith("upsample_forward_cl_kernel<") and ran[0].endswith(", 1>"), ran


def test_upsample_backward_channels_last_misaligned_grad_falls_back_to_scalar():
    cl = torch.channels_last
    grad = _offset(torch.randn(2, 8, 7, 9), memory_format=cl)
    got = torch.ops.resattn_fast_emulated.upsample_bilinear_add_backward(grad, [4, 5], True)
    x64 = torch.zeros(2, 8, 4, 5, dtype=torch.float64, requires_grad=True)
    ref.upsample_bilinear_add(x64, None, size=(7, 9), align_corners=True).backward(grad.double())
    torch.testing.assert_close(got.double(), x64.grad, atol=1e-5, rtol=1e-5)
    (name,) = kernels()
    assert name.startswith("upsample_backward_cl_kernel<float, int, 1, "), name


@pytest.mark.parametrize("dtype,shape,vec", [
    (torch.float32, (2, 3, 4, 5), 4),  # 120 elements: vectors only
    (torch.float32, (2, 3, 5, 7), 4),  # 210: vectors and a 2-element scalar tail
    (torch.float16, (2, 3, 5, 7), 8),
    (torch.bfloat16, (2, 3, 5, 7), 8),
    (torch.float64, (2, 3, 5, 7), 2),
])
@pytest.mark.parametrize("misaligned", [False, True])
def test_attention_residual_vector_and_tail(dtype, shape, vec, misaligned):
    """128-bit vectors plus a scalar tail (n not a multiple of VEC); all-scalar when a
    pointer is not 16-byte aligned."""
    m = torch.randn(shape).to(dtype) * 3
    f = torch.randn(shape).to(dtype)
    if misaligned:
        m = _offset(m)
    mr, fr = m.detach().requires_grad_(True), f.clone().requires_grad_(True)
    out = ops.attention_residual(mr, fr, backend="cuda")
    g = torch.randn(shape).to(dtype)
    out.backward(g)
    _check([out.detach(), mr.grad, fr.grad], ref.attention_residual,
           [m.detach().requires_grad_(True), f.detach().requires_grad_(True)], g, f"attention {dtype} {shape}")
    want_vec = 1 if misaligned else vec
    assert all(k.endswith(f", {want_vec}>") for k in kernels()), kernels()


@pytest.mark.parametrize("C,vec", [(6, 2), (3, 2)])
def test_attention_residual_float64_channels_last(C, vec):
    """float64 channels_last: two doubles per 128-bit vector (a scalar tail when n is odd)."""
    cl = torch.channels_last
    m = (torch.randn(2, C, 5, 7, dtype=torch.float64) * 3).contiguous(memory_format=cl)
    f = torch.randn(2, C, 5, 7, dtype=torch.float64).contiguous(memory_format=cl)
    g = torch.randn(2, C, 5, 7, dtype=torch.float64).contiguous(memory_format=cl)
    mr, fr = m.clone().requires_grad_(True), f.clone().requires_grad_(True)
    out = ops.attention_residual(mr, fr, backend="cuda")
    assert out.is_contiguous(memory_format=cl)
    out.backward(g)
    assert all(k.endswith(f", {vec}>") for k in kernels()), kernels()
    _check([out.detach(), mr.grad, fr.grad], ref.attention_residual,
           [m.requires_grad_(True), f.requires_grad_(True)], g, f"attention float64 channels_last C={C}")


# ------------------------------------------------- 64-bit index, in-thread tables, grids
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("align_corners", [True, False])
def test_upsample_int64_index_path(layout, align_corners):
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(2, 8, 5, 6).contiguous(memory_format=fmt)
    s = torch.randn(2, 8, 11, 13).contiguous(memory_format=fmt)
    with options(force_int64_index=True):
        ran = _upsample_check(x, s, align_corners=align_corners)
    assert len(ran) == 2 and all(re.search(r"<float, long( int)?, ", k) for k in ran), ran


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("sizes", [((5, 6), (11, 13)), ((9, 7), (4, 3)), ((1, 1), (5, 4))])
def test_upsample_backward_in_thread_tables(layout, sizes):
    """The path for axis tables too large for shared memory, forced on small tensors."""
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    (h, w), (H, W) = sizes
    x = torch.randn(2, 4, h, w).contiguous(memory_format=fmt)
    s = torch.randn(2, 4, H, W).contiguous(memory_format=fmt)
    with options(force_in_thread_tables=True):
        ran = _upsample_check(x, s, align_corners=False)
    bwd = [launch for launch in _ext.EMULATED.launches() if "backward" in launch["kernel"]]
    assert len(bwd) == 1 and bwd[0]["kernel"].endswith(", false>") and bwd[0]["shared_bytes"] == 0, ran
    tabled = _upsample_check(x, s, align_corners=False)
    assert tabled[-1].endswith(", true>")


def test_tables_and_in_thread_agree_bitwise():
    x = torch.randn(2, 16, 7, 9, requires_grad=True)
    g = torch.randn(2, 16, 13, 17)

    def grad_x():
        x.grad = None
        ops.upsample_bilinear_add(x, None, size=(13, 17), backend="cuda").backward(g)
        return x.grad.clone()

    tabled = grad_x()
    with options(force_in_thread_tables=True):
        in_thread = grad_x()
    assert torch.equal(tabled, in_thread)


@pytest.mark.parametrize("sms,threads_per_sm", [(1, 256), (2, 512), (64, 2048)])
def test_grids_one_block_to_many(sms, threads_per_sm):
    """One block looping many times, a few blocks, and one block per 256 items: same bits."""
    x = torch.randn(2, 16, 7, 9, requires_grad=True)
    s = torch.randn(2, 16, 13, 17)
    m = torch.randn(2, 16, 13, 17)
    g = torch.randn(2, 16, 13, 17)

    def run():
        x.grad = None
        out = ops.attention_residual(m, ops.upsample_bilinear_add(x, s, backend="cuda"), backend="cuda")
        out.backward(g)
        return out.detach(), x.grad.clone()

    want = run()
    with options(multiprocessors=sms, threads_per_multiprocessor=threads_per_sm):
        _ext.EMULATED.clear_launches()
        got = run()
        launches = _ext.EMULATED.launches()
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    wave = sms * max(threads_per_sm // 256, 1)
    items = 2 * 16 * 13 * 17  # outputs of the forward kernels
    blocks = [launch["grid"][0] for launch in launches]
    assert max(blocks) == min(wave, -(-items // 256)), launches
    if sms == 1:
        assert blocks == [1] * len(blocks)  # one block, the grid-stride loops do all the work


def test_default_device_needs_several_grid_stride_turns():
    x, s = torch.randn(2, 32, 8, 8), torch.randn(2, 32, 16, 16)
    ops.upsample_bilinear_add(x, s, backend="cuda")
    (launch,) = _ext.EMULATED.launches()
    items = 2 * 32 * 16 * 16 // 4  # VEC = 4 along 16-wide rows
    assert launch["grid"][0] * launch["block"][0] * 2 <= items, launch


# ------------------------------------------------------------- the emulation's own nets
def test_barrier_orders_shared_memory():
    out = _ext.EMULATED.selftest_shared_exchange(3, 256, True)
    t = torch.arange(256)
    want = ((t + 128) % 256 + 1).float().repeat(3)
    assert torch.equal(out, want)


def test_missing_barrier_is_caught():
    """Without __syncthreads a thread reads a slot its neighbour has not written yet: the
    emulation runs a block's threads concurrently and poisons shared memory, so the race
    shows up as wrong (NaN) values instead of passing by luck of ordering."""
    t = torch.arange(256)
    want = ((t + 128) % 256 + 1).float().repeat(3)
    bad = sum(int((_ext.EMULATED.selftest_shared_exchange(3, 256, False) != want).sum())
              for _ in range(3))
    assert bad > 0


def test_invalid_launch_is_an_error():
    with pytest.raises(RuntimeError, match="invalid configuration argument"):
        _ext.EMULATED.selftest_shared_exchange(1, 2048, True)  # 2048 threads per block


def test_launch_log_names_specialisations():
    ops.upsample_bilinear_add(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 5, 8), backend="cuda")
    (name,) = kernels()
    assert re.fullmatch(r"upsample_forward_nchw_kernel<float, int, \d>", name), name
