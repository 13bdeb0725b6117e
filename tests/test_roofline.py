"""The roofline model (benchmarks/roofline): its counting on cases worked out by hand (a
convolution, a batch norm, each fused op forward and backward, their eager expressions,
one residual unit), the kernel-time formula, the device table, the traced training step
(the fast model really runs the fused ops), and the suite's command line, including the
calibration against a GPU run's results.csv and its one-line errors.

Everything runs on fake tensors: no GPU, no memory, small shapes.
"""

from __future__ import annotations

import csv
import math
import os
import sys
from typing import Callable, Dict, List, Sequence

import pytest
import torch
import torch.nn.functional as F
from conftest import require_backend
from torch._subclasses.fake_tensor import FakeTensorMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # benchmarks/ lives beside the package, not inside it
    sys.path.insert(0, ROOT)

from benchmarks import run as bench_run  # noqa: E402
from resattn_fast.roofline import devices  # noqa: E402
from resattn_fast.roofline.model import kernel_seconds, max_batch, predict_step  # noqa: E402
from resattn_fast.roofline.step import fast_backend_problem, trace_op, trace_step  # noqa: E402
from resattn_fast.roofline.trace import KernelRecord, Tracer, foreach_launches  # noqa: E402


@pytest.fixture
def _needs_ext() -> None:
    """The cpu backend's registered ops are traced: a skip without them, a failure in CI."""
    require_backend("cpu")
    assert fast_backend_problem() is None, fast_backend_problem()


needs_ext = pytest.mark.usefixtures("_needs_ext")


def _traced(fn: Callable[[], object], phase: str = "forward") -> List[KernelRecord]:
    tracer = Tracer()
    tracer.phase = phase
    with tracer:
        fn()
    return tracer.records


def _summary(recs: Sequence[KernelRecord]) -> List[tuple]:
    return [(r.op, r.flops, r.read_bytes, r.write_bytes) for r in recs]


def test_a_convolution_counted_by_hand() -> None:
    # x (2, 4, 8, 8), w (6, 4, 3, 3), pad 1, float32: FLOPs = 2 * N*Cout*H*W * Cin*kh*kw.
    n, cin, cout, hw = 2, 4, 6, 8
    flops = 2 * n * cout * hw * hw * cin * 9
    x_b, w_b, y_b = 4 * n * cin * hw * hw, 4 * cout * cin * 9, 4 * n * cout * hw * hw
    with FakeTensorMode():
        x = torch.randn(n, cin, hw, hw, requires_grad=True)
        w = torch.randn(cout, cin, 3, 3, requires_grad=True)
        fwd = _traced(lambda: F.conv2d(x, w, padding=1))
        y = F.conv2d(x, w, padding=1)
        g = torch.randn_like(y)
        bwd = _traced(lambda: torch.autograd.grad(y, [x, w], g), "backward")
    assert _summary(fwd) == [("aten.convolution", flops, x_b + w_b, y_b)]
    # Backward: dgrad reads dy and w, writes dx; wgrad reads dy and x, writes dw; one forward's FLOPs each.
    assert _summary(bwd) == [("aten.convolution_backward (dgrad)", flops, y_b + w_b, x_b),
                             ("aten.convolution_backward (wgrad)", flops, y_b + x_b, w_b)]
    assert all(r.cls == "convolution" and r.matmul and r.launches == 1 for r in fwd + bwd)


@pytest.mark.parametrize("channels_last", [False, True])
def test_a_training_batch_norm_counted_by_hand(channels_last: bool) -> None:
    n, c, hw = 2, 3, 4
    x_b, c_b = 4 * n * c * hw * hw, 4 * c
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    with FakeTensorMode():
        x = torch.randn(n, c, hw, hw).contiguous(memory_format=fmt).requires_grad_()
        w = torch.randn(c, requires_grad=True)
        b = torch.randn(c, requires_grad=True)
        rm, rv = torch.zeros(c), torch.ones(c)
        fwd = _traced(lambda: F.batch_norm(x, rm, rv, w, b, training=True))
        y = F.batch_norm(x, rm, rv, w, b, training=True)
        g = torch.randn_like(y)
        bwd = _traced(lambda: torch.autograd.grad(y, [x, w, b], g), "backward")
    # As ATen's CUDA kernels run it: statistics (reads x; writes the batch mean and inverse
    # std), the running update (reads both and the running statistics; writes the running
    # statistics and the inverted variance), then the elementwise pass (reads x, weight,
    # bias, mean, inverse std; writes y).
    assert _summary(fwd) == [("aten.native_batch_norm (stats)", 0.0, x_b, 2 * c_b),
                             ("aten.native_batch_norm (update stats, invert var)", 0.0, 4 * c_b, 3 * c_b),
                             ("aten.native_batch_norm (elemt)", 0.0, x_b + 4 * c_b, x_b)]
    # Backward: the reduction (reads dy, x, mean, inverse std, weight; writes dweight,
    # dbias), then the elementwise pass (reads the same; writes dx). NCHW runs both in one
    # kernel that reads dy and x twice.
    reduce = ("aten.native_batch_norm_backward (reduce)", 0.0, 2 * x_b + 3 * c_b, 2 * c_b)
    elemt = ("aten.native_batch_norm_backward (elemt)", 0.0, 2 * x_b + 3 * c_b, x_b)
    if channels_last:
        assert _summary(bwd) == [reduce, elemt]
    else:
        assert _summary(bwd) == [reduce, ("aten.native_batch_norm_backward (elemt, same kernel)",) + elemt[1:]]
    assert {r.cls for r in fwd + bwd} == {"batch norm"}
    assert [r.launches for r in fwd + bwd] == [1, 1, 1, 1, 1 if channels_last else 0]


def test_an_eval_batch_norm_is_one_pass() -> None:
    n, c, hw = 2, 3, 4
    x_b, c_b = 4 * n * c * hw * hw, 4 * c
    with FakeTensorMode():
        x = torch.randn(n, c, hw, hw)
        w, b, rm, rv = torch.randn(c), torch.randn(c), torch.zeros(c), torch.ones(c)
        fwd = _traced(lambda: F.batch_norm(x, rm, rv, w, b, training=False))
    assert [(r.op, r.read_bytes, r.write_bytes) for r in fwd] == [
        ("aten.native_batch_norm", x_b + 4 * c_b, x_b)]


@needs_ext
@pytest.mark.parametrize("skip", [True, False])
def test_fused_upsample_add_counted_by_hand(skip: bool) -> None:
    n, c, h, w, H, W = 2, 3, 4, 5, 8, 9
    e = 2  # bfloat16
    small, big = e * n * c * h * w, e * n * c * H * W
    shapes = [(n, c, h, w)] + ([(n, c, H, W)] if skip else [])
    fused = trace_op("upsample_bilinear_add", "fused", shapes, (H, W), torch.bfloat16, True).records
    # Forward reads x (and skip), writes the output; backward reads the output gradient and
    # writes grad_x (grad_skip is the incoming gradient itself: no kernel).
    assert _summary(fused["fwd"]) == [("resattn_fast.upsample_bilinear_add", 0.0, small + (big if skip else 0), big)]
    assert _summary(fused["bwd"]) == [("resattn_fast.upsample_bilinear_add_backward", 0.0, big, small)]
    assert len(fused["fwd+bwd"]) == 2
    assert {r.cls for r in fused["fwd+bwd"]} == {"fused upsample-add"}
    eager = trace_op("upsample_bilinear_add", "eager", shapes, (H, W), torch.bfloat16, True).records
    # Eager: the upsample (reads x, writes a temporary), then the add (reads it and skip, writes).
    expected = [("aten.upsample_bilinear2d", 0.0, small, big)] + ([("aten.add", 0.0, 2 * big, big)] if skip else [])
    assert _summary(eager["fwd"]) == expected
    assert _summary(eager["bwd"]) == [("aten.upsample_bilinear2d_backward", 0.0, big, small)]


@needs_ext
def test_fused_attention_residual_counted_by_hand() -> None:
    shape = (2, 3, 4, 5)
    t = 4 * math.prod(shape)  # float32
    fused = trace_op("attention_residual", "fused", [shape, shape], None, torch.float32, False).records
    assert _summary(fused["fwd"]) == [("resattn_fast.attention_residual", 0.0, 2 * t, t)]
    assert _summary(fused["bwd"]) == [("resattn_fast.attention_residual_backward", 0.0, 3 * t, 2 * t)]
    assert {r.cls for r in fused["fwd+bwd"]} == {"fused attention-residual"}
    eager = trace_op("attention_residual", "eager", [shape, shape], None, torch.float32, False).records
    # (1 + sigmoid(m)) * f: three passes forward (sigmoid, add, mul); backward: the
    # product's two gradients and sigmoid's backward.
    assert [(r.op, r.read_bytes, r.write_bytes) for r in eager["fwd"]] == [
        ("aten.sigmoid", t, t), ("aten.add", t, t), ("aten.mul", 2 * t, t)]
    assert sum(r.read_bytes for r in eager["bwd"]) == 6 * t and sum(r.write_bytes for r in eager["bwd"]) == 3 * t
    assert len(eager["bwd"]) == 3


# Stand-ins for the fused BN-ReLU ops: the schemas of csrc/schemas.h in a test namespace,
# fake kernels only (the roofline traces on fake tensors and never runs a kernel).
_NS = "resattn_roofline_test"
_STANDINS: Dict[str, object] = {}


def _standin_ops() -> Dict[str, object]:
    if not _STANDINS:
        lib = torch.library.Library(_NS, "FRAGMENT")
        lib.define("batch_norm_relu(Tensor x, Tensor? weight, Tensor? bias, Tensor? running_mean, "
                   "Tensor? running_var, bool training, float eps) -> (Tensor, Tensor, Tensor)")
        lib.define("batch_norm_relu_backward(Tensor grad, Tensor x, Tensor? weight, Tensor? bias, Tensor mean, "
                   "Tensor var, bool training, float eps, Tensor? grad_residual, bool weight_grads) "
                   "-> (Tensor, Tensor, Tensor)")
        lib.define("batch_norm_update_stats(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor mean, "
                   "Tensor var, float momentum, int count, Tensor(c!)? num_batches_tracked) -> ()")
        lib.define("batch_norm_relu_with_update(Tensor x, Tensor? weight, Tensor? bias, Tensor(a!) running_mean, "
                   "Tensor(b!) running_var, float momentum, float eps, Tensor(c!)? num_batches_tracked) "
                   "-> (Tensor, Tensor, Tensor)")

        def fwd(x, weight, bias, running_mean, running_var, training, eps):  # type: ignore[no-untyped-def]
            c = x.shape[1]
            return torch.empty_like(x), x.new_empty(c, dtype=torch.float32), x.new_empty(c, dtype=torch.float32)

        def bwd(grad, x, weight, bias, mean, var, training, eps, grad_residual, weight_grads):  # type: ignore[no-untyped-def]
            c = x.shape[1] if weight_grads else 0
            return torch.empty_like(x), x.new_empty(c, dtype=torch.float32), x.new_empty(c, dtype=torch.float32)

        def upd(running_mean, running_var, mean, var, momentum, count, num_batches_tracked):  # type: ignore[no-untyped-def]
            return None

        def fwd_upd(x, weight, bias, running_mean, running_var, momentum, eps, num_batches_tracked):  # type: ignore[no-untyped-def]
            return fwd(x, weight, bias, running_mean, running_var, True, eps)

        for name, fn in (("batch_norm_relu", fwd), ("batch_norm_relu_backward", bwd),
                         ("batch_norm_update_stats", upd), ("batch_norm_relu_with_update", fwd_upd)):
            torch.library.register_fake(f"{_NS}::{name}", fn, lib=lib)
        _STANDINS["lib"] = lib
    return _STANDINS


@pytest.mark.parametrize("training", [True, False])
def test_fused_batch_norm_relu_counted_by_hand(training: bool) -> None:
    _standin_ops()
    ops = getattr(torch.ops, _NS)
    n, c, hw = 2, 5, 4
    e = 2  # bfloat16 x, float32 parameters and statistics
    X, P = e * n * c * hw * hw, 4 * c
    with FakeTensorMode():
        x = torch.randn(n, c, hw, hw, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
        w, b, rm, rv = torch.ones(c), torch.zeros(c), torch.zeros(c), torch.ones(c)
        nbt = torch.tensor(0)
        tracer = Tracer(fused_namespaces=(_NS,))
        with tracer:
            y, mean, var = ops.batch_norm_relu(x, w, b, rm, rv, training, 1e-5)
            if training:
                ops.batch_norm_update_stats(rm, rv, mean, var, 0.1, n * hw * hw, nbt)
                ops.batch_norm_relu_with_update(x, w, b, rm, rv, 0.1, 1e-5, nbt)
            tracer.phase = "backward"
            g = torch.empty_like(y)
            ops.batch_norm_relu_backward(g, x, w, b, mean, var, training, 1e-5, None, training)
            ops.batch_norm_relu_backward(g, x, w, b, mean, var, training, 1e-5, g, training)
    recs = [(r.op.split(".", 1)[1], r.phase, r.read_bytes, r.write_bytes, r.launches) for r in tracer.records
            if "empty" not in r.op]
    if training:
        assert recs == [
            # forward: statistics (reads x), then normalise+ReLU (reads x, writes out): two kernels
            ("batch_norm_relu (stats)", "forward", X, 2 * P, 1),
            ("batch_norm_relu (apply)", "forward", X + 4 * P, X, 1),
            # the running update and num_batches_tracked += 1: one small kernel, in place
            ("batch_norm_update_stats", "forward", 4 * P + 8, 2 * P + 8, 1),
            # both in one op: the statistics, then normalise+ReLU, whose first block also
            # reads and writes the running statistics and the count (no kernel of its own)
            ("batch_norm_relu_with_update (stats)", "forward", X, 2 * P, 1),
            ("batch_norm_relu_with_update (apply, update)", "forward", X + 6 * P + 8, X + 2 * P + 8, 1),
            # backward: the reduction (reads grad and x), then apply (reads grad, x; writes grad_x)
            ("batch_norm_relu_backward (reduce)", "backward", 2 * X + 4 * P, 2 * P, 1),
            ("batch_norm_relu_backward (apply)", "backward", 2 * X + 6 * P, X, 1),
            # with the shortcut's gradient: apply also reads grad_residual
            ("batch_norm_relu_backward (reduce)", "backward", 2 * X + 4 * P, 2 * P, 1),
            ("batch_norm_relu_backward (apply)", "backward", 3 * X + 6 * P, X, 1)]
    else:
        assert recs == [
            # eval: one kernel (the running statistics in, new mean/var tensors out)
            ("batch_norm_relu", "forward", X + 4 * P, X + 2 * P, 1),
            # eval backward without weight gradients: one apply kernel
            ("batch_norm_relu_backward", "backward", 2 * X + 4 * P, X, 1),
            ("batch_norm_relu_backward", "backward", 3 * X + 4 * P, X, 1)]
    assert {r.cls for r in tracer.records if "empty" not in r.op} == {"fused BN-ReLU"}


def test_one_residual_unit_counted_by_hand() -> None:
    from resattn_fast.reference.modules import ResidualUnit

    n, c, hw = 2, 8, 4
    mid = c // 4
    e = 4
    X, M = e * n * c * hw * hw, e * n * mid * hw * hw  # the unit's input/output and bottleneck tensors
    w1, w2, w3 = e * mid * c, e * mid * mid * 9, e * c * mid
    f1 = 2 * n * hw * hw * mid * c  # conv1 1x1 c -> mid
    f2 = 2 * n * hw * hw * mid * mid * 9  # conv2 3x3 mid -> mid
    f3 = 2 * n * hw * hw * c * mid  # conv3 1x1 mid -> c

    def bn_fwd(t: int, ch: int) -> int:  # stats (x), the running update, elemt (x, weight, bias, stats -> y)
        return (t + 2 * e * ch) + (4 * e * ch + 3 * e * ch) + (t + 4 * e * ch + t)

    counter = 2 * 8  # num_batches_tracked += 1 (int64, read and written)
    fwd_bytes = (bn_fwd(X, c) + counter + 2 * X + (X + w1 + M)  # bn1, relu_, conv1
                 + bn_fwd(M, mid) + counter + 2 * M + (M + w2 + M)  # bn2, relu_, conv2
                 + bn_fwd(M, mid) + counter + 2 * M + (M + w3 + X)  # bn3, relu_, conv3
                 + 3 * X)  # the residual add

    def bn_bwd(t: int, ch: int) -> int:  # reduce and elemt, each reading dy, x, weight, mean, invstd
        return 2 * (2 * t + 3 * e * ch) + (t + 2 * e * ch)

    bwd_bytes = (3 * X  # x's two gradients summed
                 + (X + w3 + M) + (X + M + w3)  # conv3 dgrad, wgrad
                 + 3 * M + bn_bwd(M, mid)  # relu (threshold_backward), bn3
                 + (M + w2 + M) + (M + M + w2)  # conv2
                 + 3 * M + bn_bwd(M, mid)
                 + (M + w1 + X) + (M + X + w1)  # conv1
                 + 3 * X + bn_bwd(X, c))
    torch.manual_seed(0)
    with FakeTensorMode():
        unit = ResidualUnit(c, c)
        x = torch.randn(n, c, hw, hw, requires_grad=True)
        tracer = Tracer()
        with tracer:
            y = unit(x)
            g = torch.ones_like(y)
            tracer.phase = "backward"
            torch.autograd.grad(y, [x, *unit.parameters()], g)
    recs = [r for r in tracer.records if r.op != "aten.ones_like"]
    fwd = [r for r in recs if r.phase == "forward"]
    bwd = [r for r in recs if r.phase == "backward"]
    assert sum(r.flops for r in fwd) == f1 + f2 + f3
    assert sum(r.flops for r in bwd) == 2 * (f1 + f2 + f3)
    assert sum(r.bytes for r in fwd) == fwd_bytes
    assert sum(r.bytes for r in bwd) == bwd_bytes
    # forward: 3 x (bn's three kernels, its counter, relu, conv) + add; backward: 3 x (dgrad,
    # wgrad, relu, bn's two passes) + the sum
    assert len(fwd) == 19 and len(bwd) == 16
    assert sum(r.launches for r in bwd) == 13  # NCHW: batch norm's two backward passes are one kernel


def test_ideal_fusion_counted_by_hand() -> None:
    from benchmarks.roofline.fusion import fuse_ideal

    n, c, hw = 2, 4, 6
    X = 4 * n * c * hw * hw
    with FakeTensorMode():
        x = torch.randn(n, c, hw, hw)
        w = torch.randn(c, c, 1, 1)
        tracer = Tracer()
        with tracer:
            y = (x * 2 + 1).relu()  # one kernel: reads x, writes y (the conv reads it)
            z = F.conv2d(y, w)  # kept as it is
            s = (z + x).sum()  # the add feeds the reduction only: never written
            (z / s).exp()  # after the reduction: reads z again, writes the result
    fused = fuse_ideal(tracer.records)
    assert [(r.op.split(":")[0], r.read_bytes, r.write_bytes) for r in fused] == [
        ("compiled", X, X), ("aten.convolution", X + 4 * c * c, X), ("compiled", 2 * X, 4),
        ("compiled", X + 4, X)]
    assert [r.cls for r in fused] == ["fused by compile", "convolution", "fused by compile", "fused by compile"]


def test_live_storages_see_inside_a_checkpointed_region() -> None:
    from torch.utils.checkpoint import checkpoint

    def block(t: torch.Tensor) -> torch.Tensor:
        return t.sin().sin()  # the first sin's output is saved by the second

    kept = {}
    for ckpt in (False, True):
        with FakeTensorMode():
            x = torch.randn(1000, requires_grad=True)
            tracer = Tracer(memory=True)
            mem = tracer.memory
            mem.ignore([x])
            with tracer:
                y = checkpoint(block, x, use_reentrant=False) if ckpt else block(x)
                mem.mark("forward")
                y.sum().backward()
                del y
                mem.mark("backward")
            kept[ckpt] = (mem.live_bytes("forward"), mem.peak_bytes("backward"))
    # without: sin(x) kept and the output y; with: only y (the region's input x is not new)
    assert kept[False][0] == 2 * 4000 and kept[True][0] == 4000
    # backward with checkpointing recomputes sin(x) (and the unused second sin) while y and its
    # gradient live: its peak exceeds what the forward kept
    assert kept[True][1] > kept[True][0]


def test_forward_flops_agree_with_flop_counter_mode() -> None:
    from torch.utils.flop_counter import FlopCounterMode

    from resattn_fast.reference.modules import ResidualUnit

    with FakeTensorMode():
        unit = ResidualUnit(8, 16, stride=2)
        x = torch.randn(2, 8, 6, 6)
        counter = FlopCounterMode(display=False)
        tracer = Tracer()
        with counter, tracer:
            unit(x)
    assert sum(r.flops for r in tracer.records) == counter.get_total_flops() > 0


def test_foreach_launches_follow_multi_tensor_apply() -> None:
    with FakeTensorMode():
        small = [torch.empty(10) for _ in range(250)]
        big = [torch.empty(65536 * 400)]
    assert foreach_launches([small]) == 3  # 110 tensors per launch at depth 1
    assert foreach_launches([small, small]) == 4  # 64 at depth 2
    assert foreach_launches([big]) == 2  # 400 chunks of 65536, 320 blocks per launch
    assert foreach_launches([[]]) == 0


def _rec(flops: float, read: int, write: int, dtype: str = "torch.bfloat16", op: str = "aten.convolution",
         launches: int = 1) -> KernelRecord:
    return KernelRecord(op=op, cls="convolution", phase="forward", flops=flops, read_bytes=read, write_bytes=write,
                        launches=launches, dtype=dtype, matmul=flops > 0)


def test_kernel_time_is_the_roofline_plus_launch() -> None:
    gpu = devices.lookup("H100").with_overrides(bandwidth_gbs=1000.0, matmul_tflops=100.0, launch_us=5.0)
    # Compute-bound: 1e12 FLOPs at 100 TFLOP/s = 10 ms; 1 MB at 1000 GB/s = 1 us.
    assert kernel_seconds(_rec(1e12, 500_000, 500_000), gpu) == pytest.approx(10e-3 + 5e-6)
    # Memory-bound: 1 GB = 1 ms.
    assert kernel_seconds(_rec(1e6, 600_000_000, 400_000_000), gpu) == pytest.approx(1e-3 + 5e-6)
    assert kernel_seconds(_rec(0, 1_000_000, 0, launches=3), gpu) == pytest.approx(1e-6 + 15e-6)
    h100 = devices.lookup("h100")
    # float32: convolutions at the TF32 rate, matrix products at the float32 rate.
    assert h100.matmul_rate("torch.float32", "aten.convolution") == pytest.approx(494.7e12)
    assert h100.matmul_rate("torch.float32", "aten.mm") == pytest.approx(66.9e12)
    assert h100.matmul_rate("torch.bfloat16", "aten.mm") == pytest.approx(989.4e12)


def test_device_table_maps_cuda_names_and_cites_sources() -> None:
    assert devices.from_device_name("NVIDIA H100 80GB HBM3").name.startswith("H100 SXM")
    assert devices.from_device_name("NVIDIA H100 PCIe").name.startswith("H100 PCIe")
    assert devices.from_device_name("NVIDIA H200").name.startswith("H200")
    assert devices.from_device_name("NVIDIA A100-SXM4-80GB").name.startswith("A100")
    assert devices.from_device_name("NVIDIA GeForce RTX 4090") is None
    for gpu in devices.GPUS.values():
        assert "nvidia.com" in gpu.source and gpu.bandwidth_gbs > 0 and gpu.memory_gib > 0
        assert 0 < gpu.usable_bytes() < gpu.memory_gib * 2**30
    # Hopper's datasheet matrix figures are with sparsity: the table holds the dense half.
    assert devices.GPUS["H100"].matmul_tflops["bfloat16"] == pytest.approx(1979 / 2, rel=1e-3)


@pytest.fixture(scope="module")
def cifar_steps() -> Dict[str, object]:
    if fast_backend_problem() is not None:
        pytest.skip(f"resattn_fast._C not built: {fast_backend_problem()}")
    return {impl: trace_step("attention56_cifar", impl, 4, amp=True, channels_last=True) for impl in
            ("reference", "fast")}


def test_the_fast_step_runs_the_fused_ops_and_the_reference_step_does_not(cifar_steps: Dict[str, object]) -> None:
    ref, fast = cifar_steps["reference"], cifar_steps["fast"]
    for name in ("upsample_bilinear_add", "upsample_bilinear_add_backward", "attention_residual",
                 "attention_residual_backward"):
        assert fast.ops_seen.get(f"resattn_fast.{name}", 0) > 0, name  # type: ignore[attr-defined]
        assert f"resattn_fast.{name}" not in ref.ops_seen  # type: ignore[attr-defined]
    for name in ("batch_norm_relu_with_update", "batch_norm_relu_backward"):
        assert fast.ops_seen.get(f"resattn_fast.{name}", 0) > 0, name  # type: ignore[attr-defined]
    # The running update runs inside the training forward op: no update op of its own.
    assert "resattn_fast.batch_norm_update_stats" not in fast.ops_seen  # type: ignore[attr-defined]
    assert "aten.native_batch_norm" not in fast.ops_seen  # type: ignore[attr-defined]
    assert "aten.upsample_bilinear2d" in ref.ops_seen and "aten.sigmoid" in ref.ops_seen  # type: ignore[attr-defined]
    assert "aten.upsample_bilinear2d" not in fast.ops_seen and "aten.sigmoid" not in fast.ops_seen  # type: ignore[attr-defined]
    # Same convolutions, so the same FLOPs; the fused step moves fewer bytes and keeps less.
    f_recs, r_recs = fast.records, ref.records  # type: ignore[attr-defined]
    assert sum(r.flops for r in f_recs) == sum(r.flops for r in r_recs) > 0
    assert sum(r.bytes for r in f_recs) < sum(r.bytes for r in r_recs)
    assert fast.activation_bytes < ref.activation_bytes  # type: ignore[attr-defined]
    # num_batches_tracked += 1 runs inside batch_norm_relu_with_update: no kernel of its own.
    def counter_adds(recs: list) -> int:
        return sum(1 for r in recs if r.op.startswith("aten.add_") and r.dtype == "torch.int64")
    assert counter_adds(f_recs) == 0 < counter_adds(r_recs)
    phases = {r.phase for r in f_recs}
    assert phases == {"forward", "backward", "optimizer"}
    assert all(r.cls == "optimizer" for r in f_recs if r.phase == "optimizer")


@needs_ext
def test_selective_checkpointing_recomputes_bn_relu_outputs_and_no_convolution(
        cifar_steps: Dict[str, object]) -> None:
    fast = cifar_steps["fast"]
    try:
        sel = trace_step("attention56_cifar", "fast", 4, amp=True, channels_last=True, checkpointing="selective")
    except ValueError as exc:  # a version without the mode
        pytest.skip(str(exc))
    full = trace_step("attention56_cifar", "fast", 4, amp=True, channels_last=True, checkpointing="full")

    def count(tr: object, phase: str, prefix: str) -> int:
        return sum(r.launches for r in tr.records if r.phase == phase and r.op.startswith(prefix))  # type: ignore[attr-defined]

    conv = "aten.convolution"
    # selective: backward runs the normalise+ReLU pass again (eval kernel, one pass); no
    # convolution reruns. full: every block's forward reruns, convolutions included.
    assert count(sel, "backward", "resattn_fast.batch_norm_relu ") == 0
    assert count(sel, "backward", "resattn_fast.batch_norm_relu") > count(fast, "backward", "resattn_fast.batch_norm_relu")
    assert count(sel, "backward", conv + " ") == 0 == count(fast, "backward", conv + " ")
    assert count(full, "backward", conv) > count(fast, "backward", conv)
    # the running statistics are updated once per unit in every mode
    for tr in (sel, full):
        assert tr.ops_seen["resattn_fast.batch_norm_relu_with_update"] == fast.ops_seen[  # type: ignore[attr-defined]
            "resattn_fast.batch_norm_relu_with_update"]
        assert "resattn_fast.batch_norm_update_stats" not in tr.ops_seen  # type: ignore[attr-defined]
    assert full.activation_bytes < sel.activation_bytes < fast.activation_bytes  # type: ignore[attr-defined]


def test_peak_memory_equals_an_exact_sweep(cifar_steps: Dict[str, object], monkeypatch: pytest.MonkeyPatch) -> None:
    """The timeline's deaths, found by its cheap sweeps, give the same peak as a sweep of
    every live storage before every op."""
    from resattn_fast.roofline.trace import LiveStorages

    monkeypatch.setattr(LiveStorages, "FULL_EVERY", 1)
    exact = trace_step("attention56_cifar", "fast", 4, amp=True, channels_last=True)
    assert cifar_steps["fast"].peak_bytes == exact.peak_bytes  # type: ignore[attr-defined]


def test_step_prediction_and_max_batch_are_consistent(cifar_steps: Dict[str, object]) -> None:
    gpu = devices.lookup("A100")
    for tr in cifar_steps.values():
        p = predict_step(tr, gpu)  # type: ignore[arg-type]
        assert p.step_ms == pytest.approx(sum(p.class_ms.values()))
        assert sum(p.share(c) for c in p.class_ms) == pytest.approx(1.0)
        assert p.step_ms == pytest.approx(sum(p.phase_ms.values()))
        mb = max_batch(tr, gpu)  # type: ignore[arg-type]
        per_image = (p.memory_bytes - (tr.param_bytes + tr.grad_bytes + tr.optimizer_state_bytes  # type: ignore[attr-defined]
                                       + tr.buffer_bytes)) / tr.batch  # type: ignore[attr-defined]
        static = p.memory_bytes - per_image * tr.batch  # type: ignore[attr-defined]
        assert static + per_image * mb <= gpu.usable_bytes() < static + per_image * (mb + 1)


def _read(path: str) -> List[Dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@needs_ext
def test_the_suite_writes_predictions_shares_and_op_rows(tmp_path: str) -> None:
    out = str(tmp_path)
    rc = bench_run.main(["--suite", "roofline", "--gpu", "H200", "--nets", "attention56_cifar", "--batch", "2",
                         "--channels-last", "--out", out])
    assert rc == 0
    rows = _read(os.path.join(out, "results.csv"))
    every = {(r["impl"], r["mode"], r["metric"]): float(r["median"]) for r in rows
             if r["name"] == "attention56_cifar"}
    net = {(i, m): v for (i, mode, m), v in every.items() if mode == "train"}
    for impl in ("reference", "fast"):
        for metric in ("fwd_flops", "step_flops", "step_bytes", "predicted_step_ms", "predicted_images_per_s",
                       "activation_bytes", "peak_bytes", "max_batch", "share:convolution", "bn_relu_add_share"):
            assert net[(impl, metric)] > 0, (impl, metric)
        shares = sum(v for (i, m), v in net.items() if i == impl and m.startswith("share:"))
        assert shares == pytest.approx(1.0, abs=1e-4)
    # the reference compiled: the same FLOPs, fewer bytes and kernels, no memory rows
    assert net[("reference+compile", "step_flops")] == net[("reference", "step_flops")]
    assert net[("reference+compile", "step_bytes")] < net[("reference", "step_bytes")]
    assert net[("reference+compile", "kernels")] < net[("reference", "kernels")]
    assert net[("reference+compile", "share:fused by compile")] > 0
    assert ("reference+compile", "max_batch") not in net
    # full checkpointing: more work, less kept, a larger batch
    full = {m: v for (i, mode, m), v in every.items() if i == "fast" and mode == "train+full"}
    assert full["step_flops"] > net[("fast", "step_flops")]
    assert full["activation_bytes"] < net[("fast", "activation_bytes")]
    assert full["max_batch"] > net[("fast", "max_batch")]
    assert net[("fast", "share:fused attention-residual")] > 0 and ("fast", "share:sigmoid/multiply") not in net
    # every batch norm of the fast network is followed by a ReLU: all fused
    assert net[("fast", "share:fused BN-ReLU")] > 0 and ("fast", "share:batch norm") not in net
    assert net[("reference", "share:batch norm")] > 0 and ("reference", "share:fused BN-ReLU") not in net
    assert {r["shape"] for r in rows if r["name"] == "attention56_cifar"} == {"4x3x32x32"}
    ops = [r for r in rows if r["name"] in ("upsample_bilinear_add", "attention_residual")]
    assert {(r["impl"], r["mode"]) for r in ops} >= {("eager", "fwd"), ("fused", "fwd+bwd")}
    assert {r["metric"] for r in ops} == {"bytes", "kernels", "predicted_ms"}
    report = open(os.path.join(out, "report.md")).read()
    assert "not a measurement" in report and "nvidia.com" in report
    assert "## Checkpointing modes (prediction)" in report and "ideal fusion" in report
    assert "## Launch-bound kernels of the fast step" in report
    # the BN+ReLU+add target: the mean over the fast networks (here the one), judged on it
    share = net[("fast", "bn_relu_add_share")]
    target = [line for line in report.splitlines() if "BN+ReLU+add (fused or not)" in line]
    assert len(target) == 1 and f"{share:.1%}; per network {share:.1%} to {share:.1%}" in target[0]
    assert target[0].startswith("- met:" if share <= 0.5 else "- NOT met:")
    with open(os.path.join(out, "roofline_breakdown.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@needs_ext
def test_calibration_writes_measured_over_predicted(tmp_path: str) -> None:
    measured = os.path.join(str(tmp_path), "gpu.csv")
    head = "suite,name,impl,backend,mode,dtype,layout,shape,metric,unit,median,p20,p80,device,torch,timestamp\n"
    with open(measured, "w") as f:
        f.write(head)
        f.write("models,attention56_cifar,fast,cuda,train,amp_bfloat16,channels_last,4x3x32x32,time,ms,9,9,9,H,t,x\n")
        f.write("models,attention56_cifar,fast+compile,cuda,train,amp_bfloat16,channels_last,4x3x32x32,time,ms,5,"
                "5,5,H,t,x\n")
        f.write("ops,attention_residual,fused,cuda,bwd,bfloat16,channels_last,2x8x6x6,time,ms,0.02,0.02,0.02,H,t,x\n")
        f.write("models,attention56_cifar,reference,reference,train,amp_bfloat16,channels_last,Nx3x32x32,max_batch,"
                "images,5000,5000,6000,H,t,x\n")
        f.write("models,attention56_cifar,reference,reference,train+ckpt,amp_bfloat16,channels_last,Nx3x32x32,"
                "max_batch,images,9000,9000,9000,H,t,x\n")
    out = os.path.join(str(tmp_path), "out")
    assert bench_run.main(["--suite", "roofline", "--gpu", "H100", "--measured", measured, "--out", out]) == 0
    every = _read(os.path.join(out, "results.csv"))
    rows = [r for r in every if r["metric"] == "measured_over_predicted"]
    # The compiled row is not modelled: left out; the checkpointed largest batch is (full).
    assert sorted((r["name"], r["impl"], r["mode"], r["shape"]) for r in rows) == [
        ("attention56_cifar", "fast", "train", "4x3x32x32"), ("attention56_cifar", "reference", "train", "Nx3x32x32"),
        ("attention56_cifar", "reference", "train+ckpt", "Nx3x32x32"), ("attention_residual", "fused", "bwd", "2x8x6x6")]
    for r in rows:
        what = "max_batch" if r["shape"].startswith("N") else "ms"
        pred = next(float(p["median"]) for p in every if p["metric"] == f"predicted_{what}"
                    and p["name"] == r["name"] and p["shape"] == r["shape"] and p["mode"] == r["mode"])
        meas = next(float(p["median"]) for p in every if p["metric"] == f"measured_{what}"
                    and p["name"] == r["name"] and p["shape"] == r["shape"] and p["mode"] == r["mode"])
        assert meas in (9.0, 0.02, 5000.0, 9000.0) and pred > 0
        assert float(r["median"]) == pytest.approx(meas / pred, rel=1e-4)
    largest = {p["mode"]: float(p["median"]) for p in every if p["metric"] == "predicted_max_batch"}
    assert largest["train+ckpt"] > largest["train"]
    assert "measured / predicted" in open(os.path.join(out, "report.md")).read()


@pytest.mark.parametrize("argv, message", [
    (["--gpu", "H100", "--measured", "MISSING"], "--measured:"),
    (["--gpu", "H100", "--measured", "EMPTY"], "has no rows to compare with"),
    (["--gpu", "H100", "--measured", "OURS"], "would overwrite the measured"),
    (["--gpu", "Z9"], "--gpu: unknown GPU"),
    ([], "needs --gpu"),
    (["--gpu", "H100", "--dtype", "fp8"], "--dtype"),
    (["--gpu", "H100", "--bandwidth", "0"], "--bandwidth"),
    (["--gpu", "H100", "--inductor-check", "resnet50"], "--inductor-check: unknown network"),
])
def test_bad_roofline_input_is_one_line_and_exit_2(tmp_path: str, capsys: pytest.CaptureFixture,
                                                   argv: List[str], message: str) -> None:
    empty = os.path.join(str(tmp_path), "empty.csv")
    with open(empty, "w") as f:
        f.write("suite,name,impl,backend,mode,dtype,layout,shape,metric,unit,median,p20,p80,device,torch,timestamp\n")
        f.write("ops,copy,copy,torch,copy,bfloat16,contiguous,10,bandwidth,GB/s,1,1,1,H,t,x\n")
    ours = os.path.join(str(tmp_path), "results.csv")  # what --out tmp_path would write
    with open(ours, "w") as f:
        f.write(open(empty).read())
    argv = [{"MISSING": os.path.join(str(tmp_path), "none.csv"), "EMPTY": empty, "OURS": ours}.get(a, a)
            for a in argv]
    assert bench_run.main(["--suite", "roofline", *argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible here")
def test_gpu_auto_without_a_gpu_is_exit_2(tmp_path: str, capsys: pytest.CaptureFixture) -> None:
    assert bench_run.main(["--suite", "roofline", "--gpu", "auto", "--out", str(tmp_path)]) == 2
    assert "no CUDA GPU is visible" in capsys.readouterr().err
