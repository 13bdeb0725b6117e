"""The ``roofline`` suite of benchmarks/run.py: predicted GPU training steps, and their
calibration against a GPU run's measurements.

    python benchmarks/run.py --suite roofline --gpu H100 --batch 64 --dtype bf16 --channels-last \
        --inductor-check attention56 --out docs/perf/roofline
    python benchmarks/run.py --suite roofline --gpu auto --measured GPU_OUT/results.csv --out DIR

The first traces every network (reference; fast; fast with selective and with full
checkpointing), prices the reference as compiled (fusion.py; ``--inductor-check NET``
sets inductor's own scheduler beside it for one network) and the fused ops at the ops
suite's headline shapes; the second predicts exactly what the GPU run measured (the
models suite's training steps, with its plain SGD, its largest batches with and without
checkpointing, and every ops-suite row of the two fused ops and their eager expressions)
and writes measured / predicted.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import re
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

from resattn_fast.roofline.devices import GPUS, Gpu, from_device_name, lookup, torch_datasheet
from resattn_fast.roofline.model import StepPrediction, predict_kernels, predict_step
from resattn_fast.roofline.step import fast_backend_problem, trace_op, trace_step
from resattn_fast.roofline.trace import CLASSES

from ..bench_ops import OpCase, op_cases
from ..common import Results
from .fusion import compiled_step

__all__ = ["RooflineRun", "add_arguments", "run_roofline", "DEFAULT_NETS", "OPS"]

DEFAULT_NETS = ("attention56", "attention92", "attention128", "attention164", "attention236", "attention452")
OPS = ("upsample_bilinear_add", "attention_residual")
MODES = ("fwd", "bwd", "fwd+bwd")
_DTYPE_ALIASES = {"bf16": "bf16", "bfloat16": "bf16", "fp32": "fp32", "float32": "fp32"}


class RooflineUsageError(Exception):
    """Raised for bad roofline arguments or inputs; run.py turns it into one line, exit 2."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The roofline suite's options (ignored by the other suites)."""
    g = p.add_argument_group("roofline suite (--suite roofline): a model of the GPU training step")
    g.add_argument("--gpu", default=None,
                   help=f"GPU to predict for: {', '.join(GPUS)}, or auto (the visible GPU, for --measured)")
    g.add_argument("--dtype", default="bf16", help="bf16 (bfloat16 autocast, default) or fp32")
    g.add_argument("--channels-last", action="store_true", help="channels_last model and input (default NCHW)")
    g.add_argument("--measured", default=None, metavar="RESULTS_CSV",
                   help="results.csv of a GPU run of the ops/models suites: write measured / predicted")
    g.add_argument("--bandwidth", type=float, default=None, metavar="GB_S",
                   help="DRAM bandwidth to use instead of the datasheet's (e.g. measured copy bandwidth)")
    g.add_argument("--matmul-tflops", type=float, default=None, metavar="TFLOPS",
                   help="matrix rate to use instead of the datasheet's, for every convolution and product")
    g.add_argument("--inductor-check", default=None, metavar="NET",
                   help="also compile NET's reference step with inductor (Triton's fusion rules, no code "
                        "generation, batch 2 on this CPU) and set its kernels beside the ideal fusion's "
                        "(a few minutes)")
    g.add_argument("--launch-us", type=float, default=None, metavar="US",
                   help="per-kernel launch overhead in microseconds (default 4)")


@dataclass
class RooflineRun:
    """What one roofline run produced: the rows (``res``) and what the report needs."""

    res: Results
    gpu: Gpu
    dtype: str
    channels_last: bool
    batch: int
    predictions: List[StepPrediction] = field(default_factory=list)
    op_rows: List[Dict[str, object]] = field(default_factory=list)
    calibration: List[Dict[str, object]] = field(default_factory=list)
    inductor_check: Optional[Dict[str, object]] = None
    trace_s: Dict[str, float] = field(default_factory=dict)
    measured_path: Optional[str] = None


def _pick_gpu(args: argparse.Namespace) -> Gpu:
    name = args.gpu
    if not name:
        raise RooflineUsageError(f"--suite roofline needs --gpu ({', '.join(GPUS)} or auto)")
    if name.strip().lower() == "auto":
        if not torch.cuda.is_available():
            raise RooflineUsageError("--gpu auto: no CUDA GPU is visible to torch here; name one with "
                                     f"--gpu {'|'.join(GPUS)}")
        dev_name = torch.cuda.get_device_name(0)
        gpu = from_device_name(dev_name)
        if gpu is None:
            raise RooflineUsageError(f"--gpu auto: {dev_name!r} is not in the roofline table ({', '.join(GPUS)}); "
                                     "name the closest with --gpu and give --bandwidth/--matmul-tflops")
    else:
        try:
            gpu = lookup(name)
        except KeyError:
            raise RooflineUsageError(f"--gpu: unknown GPU {name!r}; choose from {', '.join(GPUS)} or auto") from None
    for flag, v, zero_ok in (("--bandwidth", args.bandwidth, False), ("--matmul-tflops", args.matmul_tflops, False),
                             ("--launch-us", args.launch_us, True)):
        if v is not None and (not math.isfinite(v) or v < 0 or (v == 0 and not zero_ok)):
            raise RooflineUsageError(f"{flag} must be a {'non-negative' if zero_ok else 'positive'} number, got {v}")
    return gpu.with_overrides(args.bandwidth, args.matmul_tflops, args.launch_us)


def _dtype_names(dtype: str) -> Tuple[str, str]:
    """(models-suite dtype column, ops-suite dtype column) of a roofline dtype."""
    return ("amp_bfloat16", "bfloat16") if dtype == "bf16" else ("float32", "float32")


def _net_shape(net: str, batch: int) -> Tuple[int, str]:
    from resattn_fast.models import CONFIGS

    size = CONFIGS[net].input_size
    b = batch if size >= 224 else 2 * batch
    return b, f"{b}x3x{size}x{size}"


def _add(res: Results, key: Dict[str, str], metric: str, unit: str, v: float) -> None:
    res.add(**key, metric=metric, unit=unit, median=float(v), p20=float(v), p80=float(v))


def _step_rows(res: Results, pred: StepPrediction, key: Dict[str, str]) -> None:
    tr = pred.trace
    memory = tr.impl != "reference+compile"  # fusion.py does not model the compiled step's memory
    _add(res, key, "fwd_flops", "FLOP/image", tr.fwd_flops_per_image)
    _add(res, key, "step_flops", "FLOP", pred.step_flops)
    _add(res, key, "step_bytes", "bytes", pred.step_bytes)
    _add(res, key, "kernels", "count", pred.launches)
    _add(res, key, "predicted_step_ms", "ms", pred.step_ms)
    _add(res, key, "predicted_images_per_s", "images/s", pred.images_per_s)
    if memory:
        _add(res, key, "activation_bytes", "bytes", tr.activation_bytes)
        _add(res, key, "peak_bytes", "bytes", tr.peak_bytes)
        _add(res, key, "predicted_memory", "bytes", pred.memory_bytes)
        _add(res, key, "max_batch", "images", pred.max_batch)
    _add(res, key, "soft_mask_share", "fraction", pred.soft_mask_share)
    _add(res, key, "bn_relu_add_share", "fraction", pred.bn_relu_add_share)
    for cls in CLASSES:
        if pred.class_ms.get(cls, 0.0) > 0:
            _add(res, key, f"share:{cls}", "fraction", pred.share(cls))
            _add(res, key, f"ms:{cls}", "ms", pred.class_ms[cls])


def _trace_net(run: RooflineRun, net: str, impl: str, batch: int, optimizer: str,
               log: Callable[[str], None], checkpointing: str = "none") -> StepPrediction:
    t0 = time.perf_counter()
    tr = trace_step(net, impl, batch, amp=run.dtype == "bf16", channels_last=run.channels_last,
                    optimizer=optimizer, checkpointing=checkpointing)
    pred = predict_step(tr, run.gpu)
    took = time.perf_counter() - t0
    label = impl if checkpointing == "none" else f"{impl} {checkpointing}"
    run.trace_s[f"{net} {label}"] = took
    log(f"  {net} {label} batch {batch}: traced {len(tr.records)} kernels in {took:.1f} s; "
        f"predicted {pred.step_ms:.1f} ms/step, soft-mask ops {pred.soft_mask_share:.1%}, "
        f"BN+ReLU+add {pred.bn_relu_add_share:.1%}, max batch {pred.max_batch}")
    return pred


def _headline_op_cases(batch: int) -> List[OpCase]:
    return [c for c in op_cases(imagenet_batch=batch, cifar_batch=2 * batch) if c.headline]


def _op_shapes(case: OpCase) -> Tuple[List[Tuple[int, ...]], Optional[Tuple[int, int]]]:
    if case.op == "upsample_bilinear_add":
        shapes = [case.in_shape] + ([case.out_shape] if case.skip else [])
        return shapes, case.out_hw
    return [case.out_shape, case.out_shape], None


def _predict_op(op: str, impl: str, shapes: List[Tuple[int, ...]], out_hw: Optional[Tuple[int, int]],
                dtype: torch.dtype, channels_last: bool, gpu: Gpu) -> Dict[str, Dict[str, float]]:
    tr = trace_op(op, "fused" if impl == "fused" else "eager", shapes, out_hw, dtype, channels_last)
    return {mode: predict_kernels(recs, gpu) for mode, recs in tr.records.items()}


def _ops_rows(run: RooflineRun, log: Callable[[str], None]) -> None:
    _, op_dtype = _dtype_names(run.dtype)
    dtype = torch.bfloat16 if run.dtype == "bf16" else torch.float32
    layout = "channels_last" if run.channels_last else "nchw"
    # the headline shape of the BN-ReLU op: a 256-channel 56x56 stage at the batch
    bn_shape = (run.batch, 256, 56, 56)
    # (the ops suite's own BN-ReLU headline case is replaced by the shape below)
    cases = [(c.op, c.shape) + _op_shapes(c) for c in _headline_op_cases(run.batch)
             if c.op != "batch_norm_relu"]
    cases.append(("batch_norm_relu", "x".join(map(str, bn_shape)), [bn_shape], None))
    for op, shape, shapes, out_hw in cases:
        for impl in ("eager", "fused"):
            preds = _predict_op(op, impl, shapes, out_hw, dtype, run.channels_last, run.gpu)
            for mode in MODES:
                p = preds[mode]
                key = dict(suite="roofline", name=op, impl=impl,
                           backend="model", mode=mode, dtype=op_dtype, layout=layout, shape=shape)
                _add(run.res, key, "bytes", "bytes", p["bytes"])
                _add(run.res, key, "kernels", "count", p["launches"])
                _add(run.res, key, "predicted_ms", "ms", p["ms"])
                run.op_rows.append(dict(key, bytes=p["bytes"], kernels=p["launches"], ms=p["ms"]))
    log(f"  fused ops at the headline shapes: {len(run.op_rows)} rows")


# Calibration ------------------------------------------------------------------------------
_NET_SHAPE = re.compile(r"^(\d+)x3x(\d+)x(\d+)$")
_UP_SHAPE = re.compile(r"^(\d+)x(\d+)x(\d+)x(\d+)>(\d+)x(\d+)(\+skip)?$")
_ATT_SHAPE = re.compile(r"^(\d+)x(\d+)x(\d+)x(\d+)$")
_MAX_BATCH_SHAPE = re.compile(r"^Nx3x(\d+)x(\d+)$")
_MAX_BATCH_TRACE = 64  # the batch traced to predict the largest batch (memory is linear in it)


def _read_measured(path: str) -> List[Dict[str, str]]:
    if not os.path.isfile(path):
        raise RooflineUsageError(f"--measured: {path} does not exist (run the ops/models suites on the GPU first)")
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, csv.Error, UnicodeDecodeError) as exc:
        raise RooflineUsageError(f"--measured: cannot read {path} as results.csv ({exc})") from None
    need = {"suite", "name", "impl", "mode", "dtype", "layout", "shape", "metric", "median"}
    if rows and not need <= set(rows[0]):
        raise RooflineUsageError(f"--measured: {path} is not a results.csv of this suite (columns "
                                 f"{sorted(need - set(rows[0]))} missing)")
    return rows


def _measured_cases(rows: List[Dict[str, str]]) -> Tuple[List[Dict[str, str]], List[Dict[str, str]]]:
    from resattn_fast import list_models

    nets = set(list_models())
    models, ops = [], []
    for r in rows:
        try:
            v = float(r["median"])
        except (TypeError, ValueError):
            continue
        if not (v > 0 and math.isfinite(v)) or r["metric"] not in ("time", "max_batch"):
            continue
        if (r["suite"] == "models" and r["mode"] in _MEASURED_MODES and r["impl"] in ("reference", "fast")
                and r["name"] in nets and r["dtype"] in ("amp_bfloat16", "float32")
                and (_NET_SHAPE.match(r["shape"]) if r["metric"] == "time" else _MAX_BATCH_SHAPE.match(r["shape"]))):
            models.append(r)
        elif (r["suite"] == "ops" and r["metric"] == "time" and r["name"] in OPS and r["impl"] in ("eager", "fused")
              and r["mode"] in MODES and r["dtype"] in ("bfloat16", "float32", "float16")):
            ops.append(r)
    return models, ops


# The models suite's training modes and the checkpointing each one runs.
_MEASURED_MODES = {"train": "none", "train+ckpt": "full", "train+full": "full", "train+selective": "selective"}


def _calibrate(run: RooflineRun, path: str, out_dir: str, log: Callable[[str], None]) -> None:
    ours = os.path.join(out_dir, "results.csv")
    if os.path.exists(ours) and os.path.exists(path) and os.path.samefile(ours, path):
        raise RooflineUsageError(f"--out {out_dir} would overwrite the measured {path}; give another --out directory")
    rows = _read_measured(path)
    models, ops = _measured_cases(rows)
    if not models and not ops:
        raise RooflineUsageError(
            f"--measured: {path} has no rows to compare with (looked for suite=models mode=train metric=time or "
            "max_batch, impl reference/fast, and suite=ops metric=time of upsample_bilinear_add / attention_residual)")
    run.measured_path = path
    devs = sorted({r.get("device", "") for r in rows if r.get("device")})
    run.res.notes.append(f"measured rows from {path} (device: {', '.join(devs) or 'not recorded'})")
    copies = [float(r["median"]) for r in rows if r.get("suite") == "ops" and r.get("name") == "copy"
              and r.get("metric") == "bandwidth"]
    if copies:
        run.res.notes.append(f"Tensor.copy_ bandwidth measured in that run: {min(copies):.0f} to {max(copies):.0f} GB/s "
                             f"(model: {run.gpu.bandwidth_gbs:g} GB/s); rerun with --bandwidth "
                             f"{max(copies):.0f} to model with it")
    cache: Dict[Tuple[str, str, int, bool, bool, str], StepPrediction] = {}
    for r in models:
        m = _NET_SHAPE.match(r["shape"])
        batch = int(m.group(1)) if m else _MAX_BATCH_TRACE
        amp, cl = r["dtype"] == "amp_bfloat16", r["layout"] == "channels_last"
        ckpt = _MEASURED_MODES[r["mode"]]
        k = (r["name"], r["impl"], batch, amp, cl, ckpt)
        if k not in cache:
            t0 = time.perf_counter()
            try:
                tr = trace_step(r["name"], r["impl"], batch, amp=amp, channels_last=cl, optimizer="sgd",
                                checkpointing=ckpt)
            except ValueError as exc:  # a mode this model or version does not have
                log(f"  {r['name']} {r['impl']} {r['mode']}: not modelled ({exc})")
                continue
            cache[k] = predict_step(tr, run.gpu)
            run.trace_s[f"{r['name']} {r['impl']} {r['mode']}"] = time.perf_counter() - t0
            log(f"  {r['name']} {r['impl']} {r['mode']} batch {batch}: traced, predicted "
                f"{cache[k].step_ms:.1f} ms/step")
        if r["metric"] == "max_batch":
            _calib_row(run, r, float(cache[k].max_batch), "max_batch")
        else:
            _calib_row(run, r, cache[k].step_ms, "step")
    op_cache: Dict[Tuple[str, str, str, str, str], Dict[str, Dict[str, float]]] = {}
    dtypes = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
    for r in ops:
        shapes_hw = _parse_op_shape(r["name"], r["shape"])
        if shapes_hw is None:
            continue
        k2 = (r["name"], r["impl"], r["shape"], r["dtype"], r["layout"])
        if k2 not in op_cache:
            op_cache[k2] = _predict_op(r["name"], r["impl"], shapes_hw[0], shapes_hw[1], dtypes[r["dtype"]],
                                       r["layout"] == "channels_last", run.gpu)
        _calib_row(run, r, op_cache[k2][r["mode"]]["ms"], "op")
    log(f"  calibration: {len(models)} network rows (step times and largest batches), {len(ops)} op rows")


def _parse_op_shape(op: str, shape: str) -> Optional[Tuple[List[Tuple[int, ...]], Optional[Tuple[int, int]]]]:
    if op == "upsample_bilinear_add":
        m = _UP_SHAPE.match(shape)
        if not m:
            return None
        n, c, h, w, oh, ow = (int(g) for g in m.groups()[:6])
        return [(n, c, h, w)] + ([(n, c, oh, ow)] if m.group(7) else []), (oh, ow)
    m = _ATT_SHAPE.match(shape)
    if not m:
        return None
    s = tuple(int(g) for g in m.groups())
    return [s, s], None


def _calib_row(run: RooflineRun, r: Dict[str, str], predicted: float, kind: str) -> None:
    """measured, predicted and measured / predicted rows: times in ms, or (kind
    "max_batch") the largest batch that fits, in images."""
    measured = float(r["median"])
    key = dict(suite="roofline", name=r["name"], impl=r["impl"], backend=r.get("backend", ""), mode=r["mode"],
               dtype=r["dtype"], layout=r["layout"], shape=r["shape"])
    what, unit = ("max_batch", "images") if kind == "max_batch" else ("ms", "ms")
    _add(run.res, key, f"measured_{what}", unit, measured)
    _add(run.res, key, f"predicted_{what}", unit, predicted)
    ratio = measured / predicted if predicted else math.nan
    _add(run.res, key, "measured_over_predicted", "ratio", ratio)
    run.calibration.append(dict(key, kind=kind, measured=measured, predicted=predicted, ratio=ratio, unit=unit))


# Entry point -------------------------------------------------------------------------------
def run_roofline(args: argparse.Namespace, command: str, log: Callable[[str], None] = print,
                 holder: Optional[List[RooflineRun]] = None) -> RooflineRun:
    """Run the roofline suite as ``args`` asks and write its outputs into ``args.out``."""
    from benchmarks.common import machine_info

    from .report import write_roofline

    t_start = time.perf_counter()
    gpu = _pick_gpu(args)
    dtype = _DTYPE_ALIASES.get(str(args.dtype).strip().lower())
    if dtype is None:
        raise RooflineUsageError(f"--dtype: unknown value {args.dtype!r}; choose bf16 or fp32")
    batch = args.batch or 64
    if batch < 1:
        raise RooflineUsageError(f"--batch must be >= 1, got {batch}")
    why = fast_backend_problem()
    if why is not None:
        raise RooflineUsageError("the roofline suite traces the fused ops through resattn_fast._C's registered ops, "
                                 f"which are not available: {why}")
    from resattn_fast import list_models

    nets = list(DEFAULT_NETS)
    if args.nets:
        nets = [v.strip() for v in args.nets.split(",") if v.strip()]
        bad = [v for v in nets if v not in list_models()]
        if bad or not nets:
            raise RooflineUsageError(f"--nets: unknown value(s) {bad or [args.nets]}; choose from "
                                     f"{', '.join(list_models())}")
    if args.inductor_check and args.inductor_check not in list_models():
        raise RooflineUsageError(f"--inductor-check: unknown network {args.inductor_check!r}; choose from "
                                 f"{', '.join(list_models())}")
    res = Results(device=torch.device("cpu"), threads=torch.get_num_threads(), command=command, quick=False)
    res.info = machine_info(torch.device("cpu"), res.threads)
    res.info["traced_on"] = res.info["device"]
    res.info["device"] = f"{gpu.name} (roofline model)"
    run = RooflineRun(res=res, gpu=gpu, dtype=dtype, channels_last=bool(args.channels_last), batch=batch)
    if holder is not None:
        holder.append(run)
    info = torch_datasheet(next(k for k, g in GPUS.items() if g.name == gpu.name))
    if info:
        res.notes.append(f"cross-check of the device table: {info}")
    log(f"roofline: {gpu.name}; {gpu.bandwidth_gbs:g} GB/s, bf16 {gpu.matmul_tflops['bfloat16']:g} TFLOP/s dense, "
        f"launch {gpu.launch_us:g} us")
    if args.measured:
        _calibrate(run, args.measured, args.out, log)
    else:
        models_dtype, _ = _dtype_names(dtype)
        layout = "channels_last" if run.channels_last else "nchw"
        for net in nets:
            b, shape = _net_shape(net, batch)
            for impl, mode in (("reference", "none"), ("fast", "none"), ("reference+compile", "none"),
                               ("fast", "selective"), ("fast", "full")):
                if impl == "reference+compile":
                    ref = next(p for p in run.predictions if p.trace.net == net and p.trace.impl == "reference")
                    pred = predict_step(compiled_step(ref.trace), run.gpu)
                else:
                    try:
                        pred = _trace_net(run, net, impl, b, "nesterov", log, checkpointing=mode)
                    except ValueError as exc:
                        if mode != "selective":
                            raise
                        note = f"{net} fast, selective checkpointing: not traced ({exc})"
                        if note not in res.notes:
                            res.notes.append(note)
                        continue
                run.predictions.append(pred)
                key = dict(suite="roofline", name=net, impl=impl, backend="model",
                           mode="train" if mode == "none" else f"train+{mode}",
                           dtype=models_dtype, layout=layout, shape=shape)
                _step_rows(res, pred, key)
        _ops_rows(run, log)
        if args.inductor_check:
            from .inductor_check import cross_check

            run.inductor_check = cross_check(args.inductor_check, 2, amp=dtype == "bf16",
                                             channels_last=run.channels_last, log=log)
    res.suites_s["roofline"] = time.perf_counter() - t_start
    paths = write_roofline(run, args.out)
    log("wrote " + ", ".join(sorted(paths.values())))
    return run
