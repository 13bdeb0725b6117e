"""The GPU kernels (CUDA C++ and Triton) against the float64 reference, on a CUDA device.

Every test carries the ``gpu`` marker and is skipped without a CUDA GPU; run them with
``python -m pytest -m gpu`` (benchmarks/gpu_check.sh does). Covered, for each GPU backend:
forward and both gradients of both ops in every dtype, NCHW / channels_last /
non-contiguous / misaligned (scalar path) inputs, align_corners True and False, up-,
down- and same-size, odd sizes; a full Attention-92 stage-1 tensor (32x256x56x56); a
tensor over 2**31 elements (64-bit indexing; skipped if the GPU lacks the memory);
torch.library.opcheck; torch.compile(fullgraph=True); bit-identical backward (also under
torch.use_deterministic_algorithms(True)); CUDA graph capture; float64 gradcheck.

float16/bfloat16 results must stay within 2x the error of eager PyTorch in the same dtype
(plus a small atol) against a float64 reference (tests/_tolerance.py); so must float32 at
sizes where float32's own index and weight math errs by more than the fixed tolerance.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, List, Optional, Tuple

import pytest
import torch
import torch.nn.functional as F
from _tolerance import assert_matches
from conftest import require_backend

from resattn_fast import ops
from resattn_fast.reference import ops as ref

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DEV = "cuda"
GPU_BACKENDS = ("cuda", "triton")
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
HALF = (torch.float16, torch.bfloat16)
# "offset": contiguous but one element past an aligned address, so the 128-bit vector
# path must fall back to scalar access.
LAYOUTS = ["nchw", "channels_last", "strided", "offset"]
# (h, w) -> (H, W): up, down, same, 1x1, odd / non-square, mixed up and down, and sizes
# whose rows or channel counts are (not) multiples of the vector width.
SIZES = [
    ((28, 28), (56, 56)),
    ((7, 7), (14, 14)),
    ((3, 5), (7, 9)),
    ((1, 1), (5, 3)),
    ((1, 1), (1, 1)),
    ((6, 6), (6, 6)),
    ((9, 6), (4, 3)),
    ((2, 7), (11, 2)),
    ((5, 1), (1, 4)),
    ((13, 17), (40, 48)),
]


def _ids(pairs):
    return [f"{a[0]}x{a[1]}-{b[0]}x{b[1]}" for a, b in pairs]


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """``t`` (4-D, on the GPU) with the same values in the given memory layout."""
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # non-contiguous in channels and both spatial dims
        n, c, h, w = t.shape
        big = torch.zeros(n, c * 2, h * 2, w + 3, dtype=t.dtype, device=t.device)
        big[:, ::2, ::2, 1 : w + 1] = t
        return big[:, ::2, ::2, 1 : w + 1]
    if layout == "offset":
        flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
        view = flat[1:].view(t.shape)
        view.copy_(t)
        return view
    return t.contiguous()


def _rand(shape, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """float64 values exactly representable in ``dtype`` (the reference sees the kernel's
    inputs bit for bit)."""
    return (torch.randn(shape, dtype=torch.float64, device=DEV) * scale).to(dtype).double()


@contextlib.contextmanager
def _deterministic() -> Iterator[None]:
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


# ------------------------------------------------------------- upsample_bilinear_add
def _up_run(fn: Callable, x: torch.Tensor, s: Optional[torch.Tensor], g: torch.Tensor,
            size, align_corners: bool):
    x = x.detach().requires_grad_(True)
    s = s.detach().requires_grad_(True) if s is not None else None
    out = fn(x, s, size=size, align_corners=align_corners)
    out.backward(g.to(out.dtype))
    return out.detach(), x.grad, (s.grad if s is not None else None)


def _up_check(backend: str, n: int, c: int, hw, HW, dtype: torch.dtype, layout: str,
              align_corners: bool, with_skip: bool = True, eager_rule: bool = False) -> None:
    """The fused op vs the float64 reference; half types (and float32 with ``eager_rule``)
    within 2x eager PyTorch's own error in that dtype."""
    require_backend(backend, DEV)
    x64 = _rand((n, c, *hw), dtype)
    s64 = _rand((n, c, *HW), dtype) if with_skip else None
    g64 = _rand((n, c, *HW), dtype)
    x = _layout(x64.to(dtype), layout)
    s = _layout(s64.to(dtype), layout) if with_skip else None

    def fused(a, b, **kw):
        return ops.upsample_bilinear_add(a, b, backend=backend, **kw)

    out, gx, gs = _up_run(fused, x, s, g64, HW, align_corners)
    eout, egx, _ = _up_run(ref.upsample_bilinear_add, x64, s64, g64, HW, align_corners)
    h_out = h_gx = None
    if dtype in HALF or eager_rule:  # eager PyTorch in the same dtype, for the 2x-error rule
        h_out, h_gx, _ = _up_run(ref.upsample_bilinear_add, x64.to(dtype),
                                 s64.to(dtype) if with_skip else None, g64.to(dtype), HW,
                                 align_corners)
    tag = f"{backend} {dtype} {layout} {n}x{c} {hw}->{HW} ac={align_corners} skip={with_skip}"
    assert_matches(out, eout, dtype, h_out, f"forward {tag}")
    assert_matches(gx, egx, dtype, h_gx, f"grad_x {tag}")
    if with_skip:
        torch.testing.assert_close(gs.double(), g64, atol=0, rtol=0)  # grad_skip is grad itself
    if layout == "channels_last" and c > 1 and HW != (1, 1):
        assert out.is_contiguous(memory_format=torch.channels_last), f"{tag}: output not channels_last"
    elif layout in ("nchw", "offset"):
        assert out.is_contiguous(), f"{tag}: output not contiguous"


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("hw,HW", SIZES, ids=_ids(SIZES))
def test_upsample_sizes(backend, hw, HW, align_corners):
    _up_check(backend, 2, 3, hw, HW, torch.float32, "nchw", align_corners)
    _up_check(backend, 2, 16, hw, HW, torch.float32, "channels_last", align_corners)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("align_corners", [True, False])
def test_upsample_dtypes_layouts(backend, dtype, layout, align_corners):
    # 16 channels and 16-wide rows take the vector paths; 5 channels and 13-wide rows do not.
    _up_check(backend, 2, 16, (8, 8), (16, 16), dtype, layout, align_corners)
    _up_check(backend, 2, 5, (5, 7), (9, 13), dtype, layout, align_corners)
    _up_check(backend, 2, 8, (7, 4), (3, 4), dtype, layout, align_corners)  # down-sampling


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_upsample_no_skip(backend, dtype, layout):
    """skip=None, size=(H, W): the last upsample of the mask branch."""
    _up_check(backend, 2, 8, (4, 3), (9, 8), dtype, layout, True, with_skip=False)
    _up_check(backend, 2, 8, (14, 14), (56, 56), dtype, layout, True, with_skip=False)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_upsample_mixed_layouts(backend):
    """x channels_last, skip NCHW (and the reverse): the output follows skip."""
    require_backend(backend, DEV)
    x = torch.randn(2, 8, 5, 6, device=DEV)
    s = torch.randn(2, 8, 10, 11, device=DEV)
    want = ref.upsample_bilinear_add(x.double(), s.double(), align_corners=True)
    for xl, sl in [(torch.channels_last, torch.contiguous_format),
                   (torch.contiguous_format, torch.channels_last)]:
        out = ops.upsample_bilinear_add(x.contiguous(memory_format=xl),
                                        s.contiguous(memory_format=sl), backend=backend)
        torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
        assert out.is_contiguous(memory_format=sl)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_upsample_stage1_full_size(backend, dtype, layout):
    """The Attention-92 stage-1 shape: 32x256 channels, 28x28 -> 56x56."""
    _up_check(backend, 32, 256, (28, 28), (56, 56), dtype, layout, True)


def test_upsample_large_spatial_sizes_cuda():
    """Axis tables too big for shared memory: the in-thread range/tap path of the backward.

    At these sizes float32's own source indices and weights err by ~1e-4 (PyTorch's
    float32 result fails a fixed 1e-5 against float64 too): the 2x-eager rule applies."""
    _up_check("cuda", 1, 2, (700, 9), (4000, 3000), torch.float32, "nchw", False, eager_rule=True)
    _up_check("cuda", 1, 8, (3000, 5), (2900, 700), torch.float32, "channels_last", True,
              eager_rule=True)


# ----------------------------------------------------------------- attention_residual
ATT_SHAPES = [(2, 3, 5, 7), (1, 1, 1, 1), (3, 16, 9, 4), (1, 37, 3, 3), (2, 64, 8, 8),
              (4, 33, 17, 19)]


def _att_run(fn: Callable, m: torch.Tensor, f: torch.Tensor, g: torch.Tensor):
    m = m.detach().requires_grad_(True)
    f = f.detach().requires_grad_(True)
    out = fn(m, f)
    out.backward(g.to(out.dtype))
    return out.detach(), m.grad, f.grad


def _att_check(backend: str, shape, dtype: torch.dtype, m_layout: str, f_layout: str,
               scale: float = 3.0) -> None:
    require_backend(backend, DEV)
    m64, f64, g64 = _rand(shape, dtype, scale), _rand(shape, dtype), _rand(shape, dtype)
    m, f = _layout(m64.to(dtype), m_layout), _layout(f64.to(dtype), f_layout)
    out, gm, gf = _att_run(lambda a, b: ops.attention_residual(a, b, backend=backend), m, f, g64)
    eout, egm, egf = _att_run(ref.attention_residual, m64, f64, g64)
    h: List[Optional[torch.Tensor]] = [None, None, None]
    if dtype in HALF:
        h = list(_att_run(ref.attention_residual, m64.to(dtype), f64.to(dtype), g64.to(dtype)))
    tag = f"{backend} {dtype} {shape} m:{m_layout} f:{f_layout}"
    assert_matches(out, eout, dtype, h[0], f"forward {tag}")
    assert_matches(gm, egm, dtype, h[1], f"grad_mask_logits {tag}")
    assert_matches(gf, egf, dtype, h[2], f"grad_trunk {tag}")
    if f_layout == "channels_last" and shape[1] > 1 and shape[2] * shape[3] > 1:
        assert out.is_contiguous(memory_format=torch.channels_last), f"{tag}: output not channels_last"
    if f_layout in ("nchw", "offset"):
        assert out.is_contiguous(), f"{tag}: output not contiguous"


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("shape", ATT_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_attention_shapes_dtypes(backend, shape, dtype):
    _att_check(backend, shape, dtype, "nchw", "nchw")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("layouts", [("channels_last", "channels_last"), ("strided", "strided"),
                                     ("offset", "offset"), ("nchw", "channels_last"),
                                     ("channels_last", "nchw"), ("offset", "nchw")],
                         ids=lambda p: f"{p[0]}-{p[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_attention_layouts(backend, dtype, layouts):
    _att_check(backend, (2, 24, 7, 9), dtype, *layouts)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_attention_large_logits(backend, dtype):
    """Saturated sigmoid: no NaN or inf for |logits| up to 1e4 (float16's range allows 6e4)."""
    _att_check(backend, (2, 8, 6, 6), dtype, "nchw", "nchw", scale=3000.0)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_attention_stage1_full_size(backend, dtype, layout):
    _att_check(backend, (32, 256, 56, 56), dtype, layout, layout)


# ------------------------------------------------------- more than 2**31 elements
def _free_bytes() -> int:
    torch.cuda.empty_cache()  # blocks cached by earlier tests count as free here
    free, _total = torch.cuda.mem_get_info()
    return free


def _skip_unless_free(nbytes: int) -> None:
    if _free_bytes() < nbytes:
        pytest.skip(f"needs {nbytes / 2**30:.1f} GiB free GPU memory, "
                    f"{_free_bytes() / 2**30:.1f} GiB free")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_upsample_over_2g_elements(backend, layout):
    """A 1x32776x256x256 bfloat16 output (> 2**31 elements): 64-bit offsets. Forward and
    backward are checked on the first and the last channels (whose offsets pass 2**31)
    against the float64 reference of those channels."""
    require_backend(backend, DEV)
    n, c, hw, HW = 1, 32776, (128, 128), (256, 256)
    assert n * c * HW[0] * HW[1] > 2**31
    dt = torch.bfloat16
    _skip_unless_free(3 * n * c * HW[0] * HW[1] * 2 + 2 * n * c * hw[0] * hw[1] * 2 + 2**31)
    x = _layout(torch.randn(n, c, *hw, device=DEV, dtype=dt), layout)
    s = _layout(torch.randn(n, c, *HW, device=DEV, dtype=dt), layout)
    out = ops.upsample_bilinear_add(x, s, backend=backend)
    bwd = torch.ops.resattn_fast.upsample_bilinear_add_backward
    if backend == "triton":
        from resattn_fast.ops import triton as _triton  # noqa: F401  (registers the op)

        bwd = torch.ops.resattn_fast.upsample_bilinear_add_backward_triton
    grad_x = bwd(s, list(hw), True)  # skip's values serve as the incoming gradient
    for sl in (slice(0, 4), slice(c - 4, c)):
        xs, ss = x[:, sl], s[:, sl]
        want = ref.upsample_bilinear_add(xs.double(), ss.double(), align_corners=True)
        eager = ref.upsample_bilinear_add(xs, ss, align_corners=True)
        assert_matches(out[:, sl], want, dt, eager, f"forward channels {sl}")
        x64 = xs.double().requires_grad_(True)
        F.interpolate(x64, size=HW, mode="bilinear", align_corners=True).backward(ss.double())
        xh = xs.clone().requires_grad_(True)
        F.interpolate(xh, size=HW, mode="bilinear", align_corners=True).backward(ss)
        assert_matches(grad_x[:, sl], x64.grad, dt, xh.grad, f"grad_x channels {sl}")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_attention_over_2g_elements(backend):
    """(2**31 + 4096)-element bfloat16 tensors: forward and backward checked on the
    first and last elements against float64."""
    require_backend(backend, DEV)
    numel = 2**31 + 4096
    dt = torch.bfloat16
    _skip_unless_free(7 * numel * 2)
    m = torch.randn(numel, device=DEV, dtype=dt).view(1, 1, 1, numel)
    f = torch.randn(numel, device=DEV, dtype=dt).view(1, 1, 1, numel)
    out = ops.attention_residual(m, f, backend=backend)
    bwd = torch.ops.resattn_fast.attention_residual_backward
    if backend == "triton":
        bwd = torch.ops.resattn_fast.attention_residual_backward_triton
    gm, gf = bwd(out, m, f)
    for sl in (slice(0, 65536), slice(numel - 65536, numel)):
        ms, fs, os_ = m[..., sl], f[..., sl], out[..., sl]
        want = ref.attention_residual(ms.double(), fs.double())
        assert_matches(os_, want, dt, ref.attention_residual(ms, fs), f"forward {sl}")
        s = torch.sigmoid(ms.double())
        g = os_.double()
        assert_matches(gf[..., sl], g * (1 + s), dt, (os_ * (1 + torch.sigmoid(ms))), f"grad_trunk {sl}")
        sh = torch.sigmoid(ms)
        assert_matches(gm[..., sl], g * fs.double() * s * (1 - s), dt, os_ * fs * sh * (1 - sh),
                       f"grad_mask_logits {sl}")


# ------------------------------------------------------------------------- opcheck
def _upsample_samples() -> List[Tuple]:
    x = torch.randn(2, 3, 4, 5, device=DEV)
    s = torch.randn(2, 3, 7, 9, device=DEV)
    cl = torch.channels_last
    xh = torch.randn(2, 16, 8, 8, device=DEV, dtype=torch.bfloat16)
    sh = torch.randn(2, 16, 16, 16, device=DEV, dtype=torch.bfloat16)
    return [
        (x, s, [7, 9], True),
        (x.clone().requires_grad_(True), s.clone().requires_grad_(True), [7, 9], False),
        (x.contiguous(memory_format=cl), s.contiguous(memory_format=cl), [7, 9], True),
        (xh.contiguous(memory_format=cl).requires_grad_(True),
         sh.contiguous(memory_format=cl).requires_grad_(True), [16, 16], True),
        (x, None, [6, 11], True),
        (x.clone().requires_grad_(True), None, [3, 2], False),
    ]


def _attention_samples() -> List[Tuple]:
    m = torch.randn(2, 8, 5, 6, device=DEV)
    f = torch.randn(2, 8, 5, 6, device=DEV)
    cl = torch.channels_last
    return [
        (m, f),
        (m.clone().requires_grad_(True), f.clone().requires_grad_(True)),
        (m.contiguous(memory_format=cl).requires_grad_(True), f.contiguous(memory_format=cl)),
        (m.half(), f.half().contiguous(memory_format=cl)),
        (torch.randn(7, 3, device=DEV, requires_grad=True), torch.randn(7, 3, device=DEV)),
    ]


def _op_names(backend: str) -> Tuple[str, str]:
    if backend == "triton":
        from resattn_fast.ops import triton as _triton  # noqa: F401  (registers the ops)

        return "_triton", "_triton"
    return "", ""


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_opcheck_upsample(backend):
    require_backend(backend, DEV)
    suffix, _ = _op_names(backend)
    op = getattr(torch.ops.resattn_fast, f"upsample_bilinear_add{suffix}").default
    for args in _upsample_samples():
        torch.library.opcheck(op, args)
    bwd = getattr(torch.ops.resattn_fast, f"upsample_bilinear_add_backward{suffix}").default
    g = torch.randn(2, 3, 7, 9, device=DEV)
    torch.library.opcheck(bwd, (g, [4, 5], True))
    torch.library.opcheck(bwd, (g.contiguous(memory_format=torch.channels_last), [4, 5], False))
    torch.library.opcheck(bwd, (g.requires_grad_(True), [3, 11], True))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_opcheck_attention(backend):
    require_backend(backend, DEV)
    suffix, _ = _op_names(backend)
    op = getattr(torch.ops.resattn_fast, f"attention_residual{suffix}").default
    for args in _attention_samples():
        torch.library.opcheck(op, args)
    bwd = getattr(torch.ops.resattn_fast, f"attention_residual_backward{suffix}").default
    for m, f in _attention_samples():
        torch.library.opcheck(bwd, (torch.randn_like(f), m.detach(), f.detach()))


# ------------------------------------------------------- torch.compile, CUDA graphs
def _mask_branch(backend: str) -> Callable:
    def f(x, s, m):
        up = ops.upsample_bilinear_add(x, s, backend=backend)
        return ops.attention_residual(m, up, backend=backend)

    return f


def _compile_inputs(dtype=torch.float32, layout=torch.channels_last):
    x = torch.randn(4, 32, 7, 7, device=DEV, dtype=dtype).contiguous(memory_format=layout)
    s = torch.randn(4, 32, 14, 14, device=DEV, dtype=dtype).contiguous(memory_format=layout)
    m = torch.randn(4, 32, 14, 14, device=DEV, dtype=dtype).contiguous(memory_format=layout)
    return [t.requires_grad_(True) for t in (x, s, m)]


def _value_and_grads(fn: Callable, inputs) -> List[torch.Tensor]:
    for t in inputs:
        t.grad = None
    out = fn(*inputs)
    (out * out).sum().backward()
    return [out.detach().clone()] + [t.grad.clone() for t in inputs]


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_compile_fullgraph(backend):
    """torch.compile traces both ops (fake kernels + autograd) with no graph break."""
    require_backend(backend, DEV)
    torch._dynamo.reset()
    eager = _mask_branch(backend)
    inputs = _compile_inputs()
    want = _value_and_grads(eager, inputs)
    got = _value_and_grads(torch.compile(eager, fullgraph=True), inputs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_graphs_reduce_overhead(backend):
    """mode="reduce-overhead" captures the kernels in a CUDA graph: every launch must be
    on the current (capturing) stream, and replays must see fresh inputs."""
    require_backend(backend, DEV)
    torch._dynamo.reset()
    eager = _mask_branch(backend)
    compiled = torch.compile(eager, mode="reduce-overhead", fullgraph=True)
    for step in range(4):  # warm-up, record, then replays
        torch.manual_seed(step)
        inputs = _compile_inputs(torch.bfloat16)
        got = _value_and_grads(compiled, inputs)
        want = _value_and_grads(eager, inputs)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_graph_manual_capture(backend):
    """The forward and backward ops captured by torch.cuda.graph on a side stream."""
    require_backend(backend, DEV)
    x, s, m = (t.detach() for t in _compile_inputs())
    g = torch.randn_like(s)
    if backend == "triton":
        from resattn_fast.ops import triton as _triton  # noqa: F401

    sfx = "_triton" if backend == "triton" else ""
    up = getattr(torch.ops.resattn_fast, f"upsample_bilinear_add{sfx}")
    up_b = getattr(torch.ops.resattn_fast, f"upsample_bilinear_add_backward{sfx}")
    att = getattr(torch.ops.resattn_fast, f"attention_residual{sfx}")
    att_b = getattr(torch.ops.resattn_fast, f"attention_residual_backward{sfx}")

    def step():
        o = att(m, up(x, s, [14, 14], True))
        gm, gf = att_b(g, m, o)
        return o, gm, gf, up_b(gf, [7, 7], True)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()  # warm-up (Triton compiles here, not during capture)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()
    for _ in range(2):
        x.copy_(torch.randn_like(x))
        m.copy_(torch.randn_like(m))
        graph.replay()
        torch.cuda.synchronize()
        for a, b in zip(static, step()):
            torch.testing.assert_close(a, b, atol=0, rtol=0)


# ------------------------------------------------------------ determinism, gradcheck
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_upsample_backward_bit_identical(backend, layout, dtype):
    """The gather backward gives the same bits every run, and runs (unlike PyTorch's
    atomics-based kernel) under torch.use_deterministic_algorithms(True)."""
    require_backend(backend, DEV)
    x = _layout(torch.randn(8, 64, 28, 28, device=DEV, dtype=dtype), layout)
    s = _layout(torch.randn(8, 64, 56, 56, device=DEV, dtype=dtype), layout)
    g = _layout(torch.randn(8, 64, 56, 56, device=DEV, dtype=dtype), layout)

    def grad_x() -> torch.Tensor:
        xr = x.clone().requires_grad_(True)
        ops.upsample_bilinear_add(xr, s, backend=backend).backward(g)
        return xr.grad

    first = grad_x()
    runs = [grad_x() for _ in range(3)]
    with _deterministic():
        runs += [grad_x() for _ in range(3)]
    for r in runs:
        assert torch.equal(first, r)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("align_corners", [True, False])
def test_gradcheck_upsample(backend, align_corners):
    require_backend(backend, DEV)
    kw = {"dtype": torch.float64, "device": DEV, "requires_grad": True}
    x = torch.randn(1, 2, 3, 4, **kw)
    s = torch.randn(1, 2, 5, 7, **kw)
    torch.autograd.gradcheck(
        lambda a, b: ops.upsample_bilinear_add(a, b, align_corners=align_corners, backend=backend),
        (x, s))
    torch.autograd.gradcheck(
        lambda a: ops.upsample_bilinear_add(a, None, size=(4, 2), align_corners=align_corners,
                                            backend=backend), (x,))
    xc = torch.randn(1, 3, 4, 3, **kw).contiguous(memory_format=torch.channels_last)
    torch.autograd.gradgradcheck(
        lambda a: ops.upsample_bilinear_add(a, None, size=(7, 5), align_corners=align_corners,
                                            backend=backend), (xc,))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gradcheck_attention(backend):
    require_backend(backend, DEV)
    kw = {"dtype": torch.float64, "device": DEV, "requires_grad": True}
    m = torch.randn(2, 3, 4, 5, **kw)
    f = torch.randn(2, 3, 4, 5, **kw)
    torch.autograd.gradcheck(lambda a, b: ops.attention_residual(a, b, backend=backend), (m, f))


# ----------------------------------------------------------- devices, errors, empties
def test_cuda_kernels_registered():
    for op in ("upsample_bilinear_add", "upsample_bilinear_add_backward", "attention_residual",
               "attention_residual_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"resattn_fast::{op}", "CUDA"), op


def test_default_backend_on_cuda_is_cuda():
    require_backend("cuda", DEV)
    assert ops.resolve_backend(None, torch.device(DEV)) == "cuda"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_second_device(backend):
    """Inputs on cuda:1 while cuda:0 is current: the device guard launches on cuda:1."""
    require_backend(backend, DEV)
    x = torch.randn(2, 8, 5, 5, device="cuda:1")
    s = torch.randn(2, 8, 9, 9, device="cuda:1")
    with torch.cuda.device(0):
        out = ops.upsample_bilinear_add(x, s, backend=backend)
        att = ops.attention_residual(s, out, backend=backend)
    assert out.device == x.device and att.device == x.device
    torch.testing.assert_close(out, ref.upsample_bilinear_add(x, s))
    torch.testing.assert_close(att, ref.attention_residual(s, out))


def test_cpp_checks_on_cuda():
    require_backend("cuda", DEV)
    up = torch.ops.resattn_fast.upsample_bilinear_add
    att = torch.ops.resattn_fast.attention_residual
    x = torch.randn(2, 3, 4, 5, device=DEV)
    with pytest.raises(RuntimeError, match="same device"):
        up(x, torch.randn(2, 3, 8, 8), [8, 8], True)
    with pytest.raises(RuntimeError, match="x must be a 4-D"):
        up(torch.randn(3, 4, 5, device=DEV), None, [8, 8], True)
    with pytest.raises(RuntimeError, match="same dtype"):
        att(x, x.double())
    with pytest.raises(RuntimeError, match="same shape"):
        att(x, x[:, :2])


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_empty_batch(backend):
    require_backend(backend, DEV)
    x = torch.randn(0, 3, 4, 5, device=DEV, requires_grad=True)
    s = torch.randn(0, 3, 8, 9, device=DEV, requires_grad=True)
    out = ops.upsample_bilinear_add(x, s, backend=backend)
    assert out.shape == (0, 3, 8, 9)
    att = ops.attention_residual(out, out, backend=backend)
    att.sum().backward()
    assert x.grad.shape == x.shape
