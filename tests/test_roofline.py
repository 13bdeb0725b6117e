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
from benchmarks.roofline import devices  # noqa: E402
from benchmarks.roofline.model import kernel_seconds, max_batch, predict_step  # noqa: E402
from benchmarks.roofline.step import fast_backend_problem, trace_op, trace_step  # noqa: E402
from benchmarks.roofline.trace import KernelRecord, Tracer, foreach_launches  # noqa: E402


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


def test_a_training_batch_norm_counted_by_hand() -> None:
    n, c, hw = 2, 3, 4
    x_b, c_b = 4 * n * c * hw * hw, 4 * c
    with FakeTensorMode():
        x = torch.randn(n, c, hw, hw, requires_grad=True)
        w = torch.randn(c, requires_grad=True)
        b = torch.randn(c, requires_grad=True)
        rm, rv = torch.zeros(c), torch.ones(c)
        fwd = _traced(lambda: F.batch_norm(x, rm, rv, w, b, training=True))
        y = F.batch_norm(x, rm, rv, w, b, training=True)
        g = torch.randn_like(y)
        bwd = _traced(lambda: torch.autograd.grad(y, [x, w, b], g), "backward")
    # Forward reads x, weight, bias and the running statistics; writes y, the batch mean
    # and inverse std (saved for backward) and the updated running statistics.
    assert _summary(fwd) == [("aten.native_batch_norm", 0.0, x_b + 4 * c_b, x_b + 4 * c_b)]
    # Backward reads dy, x, weight and the saved mean and inverse std; writes dx, dweight, dbias.
    assert _summary(bwd) == [("aten.native_batch_norm_backward", 0.0, 2 * x_b + 3 * c_b, x_b + 2 * c_b)]
    assert {r.cls for r in fwd + bwd} == {"batch norm"}


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

    def bn_fwd(t: int, ch: int) -> int:  # reads x, weight, bias, running stats; writes y, mean, invstd, running
        return 2 * (t + 4 * e * ch)

    counter = 2 * 8  # num_batches_tracked += 1 (int64, read and written)
    fwd_bytes = (bn_fwd(X, c) + counter + 2 * X + (X + w1 + M)  # bn1, relu_, conv1
                 + bn_fwd(M, mid) + counter + 2 * M + (M + w2 + M)  # bn2, relu_, conv2
                 + bn_fwd(M, mid) + counter + 2 * M + (M + w3 + X)  # bn3, relu_, conv3
                 + 3 * X)  # the residual add

    def bn_bwd(t: int, ch: int) -> int:  # reads dy, x, weight, mean, invstd; writes dx, dweight, dbias
        return (2 * t + 3 * e * ch) + (t + 2 * e * ch)

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
    # forward: 3 x (bn, its counter, relu, conv) + add; backward: 3 x (dgrad, wgrad, relu, bn) + the sum
    assert len(fwd) == 13 and len(bwd) == 13


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
    assert "aten.upsample_bilinear2d" in ref.ops_seen and "aten.sigmoid" in ref.ops_seen  # type: ignore[attr-defined]
    assert "aten.upsample_bilinear2d" not in fast.ops_seen and "aten.sigmoid" not in fast.ops_seen  # type: ignore[attr-defined]
    # Same convolutions, so the same FLOPs; the fused step moves fewer bytes and keeps less.
    f_recs, r_recs = fast.records, ref.records  # type: ignore[attr-defined]
    assert sum(r.flops for r in f_recs) == sum(r.flops for r in r_recs) > 0
    assert sum(r.bytes for r in f_recs) < sum(r.bytes for r in r_recs)
    assert fast.activation_bytes < ref.activation_bytes  # type: ignore[attr-defined]
    phases = {r.phase for r in f_recs}
    assert phases == {"forward", "backward", "optimizer"}
    assert all(r.cls == "optimizer" for r in f_recs if r.phase == "optimizer")


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
    net = {(r["impl"], r["metric"]): float(r["median"]) for r in rows if r["name"] == "attention56_cifar"}
    for impl in ("reference", "fast"):
        for metric in ("fwd_flops", "step_flops", "step_bytes", "predicted_step_ms", "predicted_images_per_s",
                       "activation_bytes", "max_batch", "share:convolution", "share:batch norm"):
            assert net[(impl, metric)] > 0, (impl, metric)
        shares = sum(v for (i, m), v in net.items() if i == impl and m.startswith("share:"))
        assert shares == pytest.approx(1.0, abs=1e-4)
    assert net[("fast", "share:fused attention-residual")] > 0 and ("fast", "share:sigmoid/multiply") not in net
    assert {r["shape"] for r in rows if r["name"] == "attention56_cifar"} == {"4x3x32x32"}
    ops = [r for r in rows if r["name"] in ("upsample_bilinear_add", "attention_residual")]
    assert {(r["impl"], r["mode"]) for r in ops} >= {("eager", "fwd"), ("fused", "fwd+bwd")}
    assert {r["metric"] for r in ops} == {"bytes", "kernels", "predicted_ms"}
    report = open(os.path.join(out, "report.md")).read()
    assert "not a measurement" in report and "nvidia.com" in report
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
    # The compiled row and the checkpointed largest batch are not modelled: left out.
    assert sorted((r["name"], r["impl"], r["mode"], r["shape"]) for r in rows) == [
        ("attention56_cifar", "fast", "train", "4x3x32x32"), ("attention56_cifar", "reference", "train", "Nx3x32x32"),
        ("attention_residual", "fused", "bwd", "2x8x6x6")]
    for r in rows:
        what = "max_batch" if r["shape"].startswith("N") else "ms"
        pred = next(float(p["median"]) for p in every
                    if p["metric"] == f"predicted_{what}" and p["name"] == r["name"] and p["shape"] == r["shape"])
        meas = next(float(p["median"]) for p in every
                    if p["metric"] == f"measured_{what}" and p["name"] == r["name"] and p["shape"] == r["shape"])
        assert meas in (9.0, 0.02, 5000.0) and pred > 0
        assert float(r["median"]) == pytest.approx(meas / pred, rel=1e-4)
    assert "measured / predicted" in open(os.path.join(out, "report.md")).read()


@pytest.mark.parametrize("argv, message", [
    (["--gpu", "H100", "--measured", "MISSING"], "--measured:"),
    (["--gpu", "H100", "--measured", "EMPTY"], "has no rows to compare with"),
    (["--gpu", "H100", "--measured", "OURS"], "would overwrite the measured"),
    (["--gpu", "Z9"], "--gpu: unknown GPU"),
    ([], "needs --gpu"),
    (["--gpu", "H100", "--dtype", "fp8"], "--dtype"),
    (["--gpu", "H100", "--bandwidth", "0"], "--bandwidth"),
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
