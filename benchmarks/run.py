"""The resattn_fast benchmark suite: fused ops and whole networks, side by side with eager
PyTorch and torch.compile, on the CPU or a CUDA GPU.

    python benchmarks/run.py --suite all --device cpu --quick --out /tmp/bench_cpu
    python benchmarks/run.py --suite all --device cuda --out OUTDIR      (gpu_check.sh)
    python benchmarks/run.py --suite roofline --gpu H100 --channels-last --out OUTDIR
                                          (a model of the GPU training step; see benchmarks/roofline)

Writes OUTDIR/results.csv (long format), OUTDIR/report.md, OUTDIR/skipped.csv and PNG
plots; prints the headline table last. Every loop is bounded by time, so ``--quick`` on a
2-core CPU and the full run on one H100 stay within minutes.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence, Tuple

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `resattn_fast` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import Results, ensure_package_importable, load_average, machine_info  # noqa: E402

ensure_package_importable()

import torch  # noqa: E402

from benchmarks.roofline.report import write_roofline  # noqa: E402
from benchmarks.roofline.suite import RooflineRun, RooflineUsageError, run_roofline  # noqa: E402
from resattn_fast.errors import UsageError  # noqa: E402

if TYPE_CHECKING:
    from benchmarks.bench_models import ModelsPlan

__all__ = ["main", "build_parser", "run"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_CPU_MODEL_NETS = ("attention56", "attention92", "attention236_cifar", "attention452_cifar")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python benchmarks/run.py",
        description="Benchmark the fused soft-mask ops and the networks against eager PyTorch "
                    "and torch.compile; writes results.csv, report.md and plots into --out.")
    p.add_argument("--suite", choices=("ops", "models", "all", "roofline"), default="all",
                   help="all = ops + models; roofline = the predicted GPU training step (no GPU needed)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--out", required=True, help="output directory (created if missing)")
    p.add_argument("--quick", action="store_true",
                   help="short run: headline shapes with every implementation, other shapes eager vs "
                        "fused only, small networks (under 5 minutes on a 2-core CPU)")
    p.add_argument("--threads", type=int, default=None,
                   help=f"torch CPU threads (default: torch's default, here {torch.get_num_threads()})")
    p.add_argument("--backends", default=None,
                   help="comma-separated fused backends to measure (default: every one available on "
                        "the device except reference; on the CPU Triton only runs interpreted and is "
                        "left out unless named here with TRITON_INTERPRET=1)")
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile rows")
    p.add_argument("--dtypes", default=None,
                   help="comma-separated: float32,bfloat16,float16 (default: float32 on CPU, all three on GPU)")
    p.add_argument("--layouts", default="nchw,channels_last", help="comma-separated: nchw,channels_last")
    p.add_argument("--batch", type=int, default=None,
                   help="batch of the ImageNet-shaped op cases (default 8 on CPU, 64 on GPU); roofline: "
                        "batch of the 224x224 networks and the headline op shapes (default 64; 32x32 "
                        "networks take twice as many)")
    p.add_argument("--nets", default=None,
                   help="comma-separated networks for the models suite (default: attention56, "
                        "attention92, attention236_cifar, attention452_cifar; --quick: fewer)")
    p.add_argument("--model-batch", type=int, default=None,
                   help="batch of the 224x224 networks (default 64 on GPU, 4 on CPU, 2 with --quick); "
                        "the 32x32 networks take twice as many (default 128 on GPU, 16 on CPU, 8 with --quick)")
    p.add_argument("--grad-checkpointing", default="none,selective,full",
                   help="comma-separated set_grad_checkpointing modes whose training step the models "
                        "suite measures for the fast model (memory and time; 'none' alone: no extra rows)")
    p.add_argument("--memory-only", default=None,
                   help="comma-separated networks of --nets whose training step is measured for memory "
                        "only (default on the CPU: attention452, attention236; too slow to time there)")
    p.add_argument("--max-time", type=float, default=None,
                   help="seconds of repetitions per implementation and measurement "
                        "(default 1.0 CPU, 0.3 CPU --quick, 0.1 GPU)")
    p.add_argument("--budget-ops", type=float, default=None,
                   help="seconds for the whole ops suite; rows past it are recorded as skipped "
                        "(default 140 on GPU, 120 with --quick, none otherwise)")
    p.add_argument("--budget-models", type=float, default=None,
                   help="seconds for the whole models suite; rows past it are recorded as skipped "
                        "(default 180 on GPU, 120 with --quick, none otherwise)")
    p.add_argument("--tiny", action="store_true",
                   help="smoke test: tiny op shapes and tiny batches (used by the tests; numbers meaningless)")
    from benchmarks.roofline.suite import add_arguments

    add_arguments(p)
    return p


def _csv_list(value: Optional[str], allowed: Sequence[str], what: str) -> Optional[List[str]]:
    if value is None:
        return None
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise UsageError(f"{what}: unknown value(s) {bad or [value]}; choose from {', '.join(allowed)}")
    return items


def _fused_backends(device: torch.device, requested: Optional[List[str]]) -> Tuple[List[str], Dict[str, str]]:
    """(backends to time, {backend: why it is left out}); a named backend that cannot run
    here is recorded as skipped with the reason, never replaced by another."""
    from resattn_fast.ops import available_backends
    from resattn_fast.ops._backends import _why_not, triton_interpreted

    avail = available_backends(device)
    run: List[str] = []
    skipped: Dict[str, str] = {}
    if requested is None:
        candidates = ["cpu", "triton"] if device.type == "cpu" else ["cuda", "triton"]
        for b in candidates:
            why = _why_not(b, device.type)
            if b == "triton" and device.type == "cpu" and why is None and triton_interpreted():
                skipped[b] = ("Triton on the CPU runs in the interpreter (TRITON_INTERPRET=1), not a speed "
                              "path; name it in --backends to time it anyway")
            elif why is None and b in avail:
                run.append(b)
            elif b == "triton" and device.type == "cpu":
                continue  # no CPU Triton without the interpreter: nothing to report
            else:
                skipped[b] = why or "not available"
        return run, skipped
    for b in requested:
        why = _why_not(b, device.type)
        if why is None:
            run.append(b)
        else:
            skipped[b] = why
    return run, skipped


def run(args: argparse.Namespace, command: str, log: Callable[[str], None] = print,
        results: Optional[List[Results]] = None) -> Results:
    """Run the suites that ``args`` asks for and write the outputs; returns the results
    (also appended to ``results`` as soon as they exist, for a caller that is interrupted)."""
    from benchmarks import bench_models, bench_ops, report
    from resattn_fast.ops import available_backends

    if args.suite == "roofline":
        raise AssertionError("the roofline suite runs through run_roofline (see main)")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is visible to torch here (use --device cpu)")
    device = torch.device(args.device)
    if args.threads is not None:
        if args.threads < 1:
            raise UsageError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    gpu = device.type == "cuda"
    quick, tiny = args.quick, args.tiny

    requested = _csv_list(args.backends, ("reference", "cpu", "cuda", "triton"), "--backends")
    fused, skipped = _fused_backends(device, requested)
    dtype_names = _csv_list(args.dtypes, list(_DTYPES), "--dtypes") or (
        ["bfloat16", "float16", "float32"] if gpu else ["float32"])
    dtypes = [_DTYPES[d] for d in dtype_names]
    if not gpu and any(d != torch.float32 for d in dtypes):
        log("note: half-precision timings on the CPU are measured as asked, but the targets are float32")
    layouts = _csv_list(args.layouts, ("nchw", "channels_last"), "--layouts")
    nets = _csv_list(args.nets, list(_model_names()), "--nets")
    modes = _csv_list(args.grad_checkpointing, ("none", "selective", "full"), "--grad-checkpointing")
    memory_only = _csv_list(args.memory_only, list(_model_names()), "--memory-only")

    res = Results(device=device, threads=threads, command=command, quick=quick)
    if results is not None:
        results.append(res)
    res.info = machine_info(device, threads)
    res.backends = {device.type: available_backends(device)}
    for b, why in skipped.items():
        res.notes.append(f"fused backend {b} not measured: {why}")
    log(f"device: {res.info['device']}; threads {threads}; fused backends: {', '.join(fused) or 'none'}"
        + (f"; left out: {', '.join(skipped)}" if skipped else ""))

    max_time = args.max_time or (0.05 if tiny else 0.1 if gpu else 0.3 if quick else 1.0)
    if args.suite in ("ops", "all"):
        t0 = time.perf_counter()
        batch = args.batch or (2 if tiny else 64 if gpu else 8)
        cases = bench_ops.op_cases(imagenet_batch=batch, cifar_batch=(2 if tiny else 128 if gpu else 32),
                                   tiny=tiny)
        plan = bench_ops.OpsPlan(
            cases=cases, dtypes=dtypes, layouts=layouts, fused_backends=fused,
            skipped_backends=skipped, with_compile=not args.no_compile,
            # Each shape costs two compilations (inference and training graphs): on a
            # GPU compile every shape in bfloat16 and the headline shapes in every dtype;
            # --quick on the CPU compiles the headline shapes only.
            compile_dtypes_beyond_headline=([] if quick else [torch.bfloat16] if gpu else None),
            modes_beyond_headline=(("fwd", "fwd+bwd") if quick else bench_ops.MODES),
            # On a GPU float16 is timed at the headline shapes only (bfloat16 is the AMP
            # dtype the networks train in; float32 everywhere as the baseline).
            dtypes_beyond_headline=([torch.bfloat16, torch.float32] if gpu and args.dtypes is None else None),
            warmup=1 if (quick or tiny) else (5 if gpu else 2),
            min_reps=3 if (quick or tiny) else (10 if gpu else 5),
            max_reps=200 if gpu else 100,
            max_time_s=max_time,
            budget_s=args.budget_ops or (140.0 if gpu else 120.0 if quick else None),
        )
        log(f"ops suite: {len(cases)} shapes x {len(dtypes)} dtypes x {len(layouts)} layouts")
        try:
            bench_ops.run_ops(device, plan, res, log=log)
        finally:
            res.suites_s["ops"] = time.perf_counter() - t0
        if args.suite == "all":  # a run cut short later still leaves the ops results
            report.write_outputs(res, args.out)

    if args.suite in ("models", "all"):
        t0 = time.perf_counter()
        mplan = _models_plan(args, device, fused, nets, max_time, modes or [], memory_only)
        log(f"models suite: {', '.join(c.net + ' ' + c.shape for c in mplan.cases)}")
        try:
            bench_models.run_models(device, mplan, res, log=log)
        finally:
            res.suites_s["models"] = time.perf_counter() - t0

    res.info["load_end"] = load_average()
    paths = report.write_outputs(res, args.out)
    log("")
    log("wrote " + ", ".join(sorted(paths.values())))
    head = report.headline_lines(res)
    if head:
        log("")
        log(f"Headline ({res.info['device']}, {threads} threads, torch {torch.__version__}):")
        for line in head:
            log(line)
    return res


def _model_names() -> List[str]:
    from resattn_fast import list_models

    return list_models()


def _models_plan(args: argparse.Namespace, device: torch.device, fused: List[str],
                 nets: Optional[List[str]], max_time: float, checkpointing: Sequence[str] = (),
                 memory_only: Optional[List[str]] = None) -> ModelsPlan:
    from benchmarks.bench_models import ModelCase, ModelImpl, ModelsPlan
    from resattn_fast.models import CONFIGS

    gpu, quick, tiny = device.type == "cuda", args.quick, args.tiny
    if nets is None:
        if tiny:
            nets = ["attention56_cifar"]
        elif quick and not gpu:
            nets = ["attention56", "attention236_cifar"]
        else:
            nets = list(_CPU_MODEL_NETS)
    cases = []
    for net in nets:
        size = CONFIGS[net].input_size
        if size >= 224:
            b = args.model_batch or (64 if gpu else 2 if quick else 4)
        else:
            b = (args.model_batch and 2 * args.model_batch) or (
                128 if gpu else 2 if tiny else 8 if quick else 16)
        cases.append(ModelCase(net, b, size))
    impls = [ModelImpl("reference", "reference")]
    # On a GPU the networks run the first (fastest) fused backend only: the ops suite
    # compares the backends, and every network row costs seconds of the time budget.
    impls += [ModelImpl("fast", b) for b in (fused[:1] if gpu else fused)]
    compile_nets: Optional[List[str]] = None
    if not args.no_compile:
        impls += [ModelImpl("reference", "reference", compiled=True)]
        impls += [ModelImpl("fast", b, compiled=True) for b in fused[:1]]
        if gpu:
            compile_nets = ["attention56"]  # a whole-network compile costs a minute or more
        elif tiny or quick:
            compile_nets = []  # minutes per network on 2 cores: the ops suite covers compile
    if memory_only is None:
        memory_only = [] if gpu else ["attention452", "attention236"]
    return ModelsPlan(
        cases=cases, impls=impls, compile_nets=compile_nets,
        checkpointing=[m for m in checkpointing if m != "none"], memory_only_nets=memory_only,
        amp_dtype=torch.bfloat16 if gpu else None, channels_last=gpu,
        # The untimed first call already warms up; on a GPU two more settle cuDNN's choices.
        warmup=2 if gpu else 0 if (quick or tiny) else 1, min_reps=2 if (quick or tiny) else 3,
        max_reps=30, max_time_s=(max_time if tiny else 1.5 if gpu else 1.0 if quick else 5.0),
        budget_s=args.budget_models or (180.0 if gpu else 120.0 if quick else None),
        compile_estimate_s=60.0 if gpu else 5.0 if tiny else 240.0,
        max_batch_net="attention452" if gpu else None,
        max_batch_impls=[ModelImpl("reference", "reference")] + [ModelImpl("fast", b) for b in fused[:1]],
        max_batch_limit_s=20.0,
    )


class Interrupted(BaseException):
    """SIGTERM (e.g. from `timeout`): stop measuring, write what was measured. A
    BaseException, like KeyboardInterrupt, so the per-row ``except Exception`` that keeps
    one failing row from ending the run does not swallow it."""


def _on_signal(signum: int, frame: object) -> None:
    raise Interrupted(f"signal {signum}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point: 0 on success, 2 on a usage error, 3 when interrupted
    (the outputs then hold what was measured so far)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    command = "python benchmarks/run.py " + " ".join(shlex.quote(a) for a in argv)
    results: List[Results] = []
    roofline_runs: List[RooflineRun] = []
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_signal)
    try:
        if args.suite == "roofline":
            run_roofline(args, command, holder=roofline_runs)
        else:
            run(args, command, results=results)
    except (UsageError, RooflineUsageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (Interrupted, KeyboardInterrupt) as exc:
        if roofline_runs:
            rr = roofline_runs[0]
            rr.res.notes.append(f"run interrupted ({exc or 'keyboard interrupt'}): the tables hold what was "
                                "traced before that")
            paths = write_roofline(rr, args.out)
            print(f"interrupted; wrote {', '.join(sorted(paths.values()))}", file=sys.stderr)
        if results:
            from benchmarks import report

            res = results[0]
            res.notes.append(f"run interrupted ({exc or 'keyboard interrupt'}): the tables hold what was "
                             "measured before that")
            res.info["load_end"] = load_average()
            paths = report.write_outputs(res, args.out)
            print(f"interrupted; wrote {', '.join(sorted(paths.values()))}", file=sys.stderr)
        return 3
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
