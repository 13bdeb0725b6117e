"""Benchmarks of the fused ops against eager PyTorch and torch.compile.

For every shape the soft-mask branch of the networks actually runs (each stage of
Attention-56/92 at 224x224 and of the CIFAR networks at 32x32), every dtype and memory
format asked for, and forward / backward / forward+backward, this times:

- ``eager``: resattn_fast.reference.ops (plain PyTorch, what the reference model runs);
  for ``batch_norm_relu``, ``F.relu(F.batch_norm(...))`` in training mode (batch
  statistics, running statistics updated), at the headline shape of the residual units'
  pre-activation (stage 1: 256 channels at 56x56);
- ``compile``: torch.compile(fullgraph=True, dynamic=False) of that same expression;
- ``fused``: resattn_fast.ops with ``backend=`` each fused backend asked for (the backend
  is always passed explicitly; one that cannot run here is recorded as skipped with the
  reason, never replaced by another).

Metrics per row: time (ms), effective bandwidth (the bytes an ideal single pass must read
and write, divided by the time) and its ratio to ``Tensor.copy_`` moving the same number of
bytes on the same device in the same run, and, for forward+backward, the bytes of the
tensors autograd keeps for backward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .common import Results, check_backend_ran, shape_str
from .timing import Deadline, L2Flusher, Stats, measure, measure_interleaved, saved_tensor_bytes

__all__ = ["OpCase", "OpsPlan", "op_cases", "run_ops", "HEADLINE_WHERE", "BATCH_NORM"]

UPSAMPLE = "upsample_bilinear_add"
ATTENTION = "attention_residual"
BATCH_NORM = "batch_norm_relu"
BN_EPS = 1e-5
BN_MOMENTUM = 0.1
MODES = ("fwd", "bwd", "fwd+bwd")
HEADLINE_WHERE = "headline"
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
               torch.float64: "float64"}


@dataclass(frozen=True)
class OpCase:
    """One op at one shape. For the upsample, ``in_hw`` is the coarse input's size and
    ``skip`` says whether a skip tensor of the output's size is added; for
    batch_norm_relu, ``out_shape`` is x's shape."""

    op: str
    where: str  # which network stage (or "headline") runs this shape
    n: int
    c: int
    out_hw: Tuple[int, int]
    in_hw: Optional[Tuple[int, int]] = None
    skip: bool = False
    headline: bool = False

    @property
    def out_shape(self) -> Tuple[int, int, int, int]:
        return (self.n, self.c, *self.out_hw)

    @property
    def in_shape(self) -> Tuple[int, int, int, int]:
        assert self.in_hw is not None
        return (self.n, self.c, *self.in_hw)

    @property
    def shape(self) -> str:
        """The CSV's shape field: "N x C x H x W" of the output, plus the input for the upsample."""
        if self.op == UPSAMPLE:
            return f"{shape_str(self.in_shape)}>{self.out_hw[0]}x{self.out_hw[1]}" + (
                "+skip" if self.skip else "")
        return shape_str(self.out_shape)


def _net_stage_sizes(net: str, input_size: int) -> List[Tuple[int, int, int]]:
    """(channels, spatial size, mask depth) of each attention stage of a configuration."""
    from resattn_fast.models import CONFIGS

    cfg = CONFIGS[net]
    size = input_size
    if cfg.stem == "imagenet":  # conv 7x7/2 pad 3, then max-pool 3x3/2 pad 1
        size = (size + 1) // 2
        size = (size + 1) // 2
    out = []
    for ch, depth, _, stride in cfg.stages:
        size = -(-size // stride)
        out.append((ch, size, depth))
    return out


def op_cases(*, imagenet_batch: int, cifar_batch: int, tiny: bool = False) -> List[OpCase]:
    """The shapes of the soft-mask ops in Attention-56/92 (224x224, the same shapes in
    every ImageNet configuration) and the CIFAR networks (32x32), plus the headline cases of
    the speed targets: a 2x upsample with skip to the stage-1 size 56x56, and the fused
    BN-ReLU of a stage-1 residual unit (``imagenet_batch`` x 256 x 56 x 56).

    ``tiny`` gives three small cases (for the tests) with the same structure.
    """
    from resattn_fast.reference.modules import mask_sizes

    if tiny:
        n = imagenet_batch
        return [
            OpCase(UPSAMPLE, HEADLINE_WHERE, n, 8, (12, 12), (6, 6), skip=True, headline=True),
            OpCase(UPSAMPLE, "tiny up (no skip)", n, 8, (12, 12), (6, 6), skip=False),
            OpCase(ATTENTION, HEADLINE_WHERE, n, 8, (12, 12), headline=True),
        ]
    cases: List[OpCase] = []
    seen = set()
    stage_names = {"attention56": "ImageNet", "attention56_cifar": "CIFAR"}
    for net, size, batch in (("attention56", 224, imagenet_batch), ("attention56_cifar", 32, cifar_batch)):
        for si, (ch, s, depth) in enumerate(_net_stage_sizes(net, size), start=1):
            label = f"{stage_names[net]} stage {si}"
            levels = [(s, s)] + mask_sizes((s, s), depth)
            # The mask branch upsamples level i+1 to level i adding skip i, except the last
            # (level 1 to the stage size), which has no skip.
            for i in reversed(range(depth)):
                skip = i > 0
                key = (UPSAMPLE, batch, ch, levels[i], levels[i + 1], skip)
                if key not in seen:
                    seen.add(key)
                    cases.append(OpCase(UPSAMPLE, label, batch, ch, levels[i], levels[i + 1], skip=skip))
            key = (ATTENTION, batch, ch, (s, s))
            if key not in seen:
                seen.add(key)
                cases.append(OpCase(ATTENTION, label, batch, ch, (s, s),
                                    headline=(net == "attention56" and si == 1)))
    head = OpCase(UPSAMPLE, HEADLINE_WHERE, imagenet_batch, 256, (56, 56), (28, 28), skip=True, headline=True)
    bn = OpCase(BATCH_NORM, HEADLINE_WHERE, imagenet_batch, 256, (56, 56), headline=True)
    # Headline cases first: under a time budget they are the ones that must be measured.
    return [head] + sorted(cases, key=lambda c: not c.headline) + [bn]


@dataclass
class OpsPlan:
    """What the ops suite measures and how long each measurement may take."""

    cases: List[OpCase]
    dtypes: List[torch.dtype]
    layouts: List[str]  # "nchw", "channels_last"
    fused_backends: List[str]
    skipped_backends: Dict[str, str]  # backend -> why it is not measured
    with_compile: bool = True
    # Rows beyond the headline that still get torch.compile: None = all; else a dtype filter.
    compile_dtypes_beyond_headline: Optional[List[torch.dtype]] = None
    modes_beyond_headline: Sequence[str] = MODES
    # dtypes measured beyond the headline shapes (None: all of ``dtypes``).
    dtypes_beyond_headline: Optional[List[torch.dtype]] = None
    warmup: int = 2
    min_reps: int = 5
    max_reps: int = 200
    max_time_s: float = 1.0
    budget_s: Optional[float] = None
    check: bool = True


def _make_inputs(case: OpCase, dtype: torch.dtype, layout: str, device: torch.device,
                 requires_grad: bool) -> List[torch.Tensor]:
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rnd(shape: Sequence[int]) -> torch.Tensor:
        t = torch.randn(*shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
        t = t.contiguous(memory_format=fmt)
        return t.requires_grad_(requires_grad)

    if case.op == UPSAMPLE:
        xs = [rnd(case.in_shape)]
        if case.skip:
            xs.append(rnd(case.out_shape))
        return xs
    if case.op == BATCH_NORM:
        return _bn_inputs(case, dtype, fmt, device, requires_grad, gen)
    return [rnd(case.out_shape), rnd(case.out_shape)]


def _bn_inputs(case: OpCase, dtype: torch.dtype, fmt: torch.memory_format, device: torch.device,
               requires_grad: bool, gen: torch.Generator) -> List[torch.Tensor]:
    """[x, weight, bias] of batch_norm_relu: x on a grid of 1/8 (exact in every dtype) and
    float32 parameters (as under autocast), the bias of each channel placing the ReLU
    threshold half-way between two grid values for the batch's statistics. No
    pre-activation then lies within rounding of 0, where eager and fused may legitimately
    take different sides of the ReLU (a gradient of the order of 1 at that element), so the
    check against eager compares like with like; the timing does not depend on values."""
    c = case.c
    x64 = (torch.randn(*case.out_shape, generator=gen, dtype=torch.float64) * 8).round() / 8
    w64 = torch.rand(c, generator=gen, dtype=torch.float64) + 0.5
    mean = x64.mean((0, 2, 3))
    scale = w64 / (x64.var((0, 2, 3), unbiased=False) + BN_EPS).sqrt()
    b64 = scale * (mean - ((mean * 8).floor() + 0.5) / 8)
    x = x64.to(dtype).to(device).contiguous(memory_format=fmt)
    w = w64.float().to(device)
    b = b64.float().to(device)
    return [t.requires_grad_(requires_grad) for t in (x, w, b)]


def _impl_fn(case: OpCase, impl: str, backend: str) -> Callable[..., torch.Tensor]:
    """The function a row times; its arguments are the tensors of _make_inputs."""
    import resattn_fast.ops as fused
    from resattn_fast.reference import ops as ref

    if case.op == BATCH_NORM:
        return _bn_fn(case, impl, backend)
    if case.op == UPSAMPLE:
        hw = list(case.out_hw)

        if impl == "fused":
            def up_fused(x: torch.Tensor, skip: Optional[torch.Tensor] = None) -> torch.Tensor:
                return fused.upsample_bilinear_add(x, skip, size=hw, align_corners=True, backend=backend)
            return up_fused

        def up_ref(x: torch.Tensor, skip: Optional[torch.Tensor] = None) -> torch.Tensor:
            return ref.upsample_bilinear_add(x, skip, size=hw, align_corners=True)
        fn = up_ref
    else:
        if impl == "fused":
            def att_fused(m: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
                return fused.attention_residual(m, f, backend=backend)
            return att_fused
        fn = ref.attention_residual
    if impl == "compile":
        # A fresh Dynamo cache per shape: static shapes (dynamic=False) as a model compiled
        # once sees them, and no risk of hitting the recompile limit, past which Dynamo
        # would silently run eager code. fullgraph=True makes any graph break an error.
        torch._dynamo.reset()
        return torch.compile(fn, fullgraph=True, dynamic=False)
    return fn


def _bn_fn(case: OpCase, impl: str, backend: str) -> Callable[..., torch.Tensor]:
    """relu(batch_norm(x)) in training mode with running statistics of its own (updated by
    every call, as a training step does): eager, torch.compile of eager, or fused."""
    import torch.nn.functional as F

    import resattn_fast.ops as fused

    running: Dict[torch.device, Tuple[torch.Tensor, torch.Tensor]] = {}

    def stats(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if x.device not in running:
            running[x.device] = (torch.zeros(case.c, device=x.device), torch.ones(case.c, device=x.device))
        return running[x.device]

    if impl == "fused":
        def bn_fused(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            rm, rv = stats(x)
            return fused.batch_norm_relu(x, rm, rv, w, b, training=True, momentum=BN_MOMENTUM, eps=BN_EPS,
                                         backend=backend)
        return bn_fused

    def bn_eager(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        rm, rv = stats(x)
        return F.relu(F.batch_norm(x, rm, rv, w, b, True, BN_MOMENTUM, BN_EPS))
    if impl == "compile":
        torch._dynamo.reset()  # see _impl_fn
        return torch.compile(bn_eager, fullgraph=True, dynamic=False)
    return bn_eager


def _bytes(case: OpCase, mode: str, elsize: int) -> int:
    """Bytes an ideal single pass reads plus writes (grad_skip is the incoming gradient
    itself, so it costs nothing). batch_norm_relu: x in, out out; backward grad and x in,
    grad_x out (the per-channel vectors are negligible)."""
    out = math.prod(case.out_shape)
    if case.op == BATCH_NORM:
        fwd = 2 * out
        bwd = 3 * out
    elif case.op == UPSAMPLE:
        inp = math.prod(case.in_shape)
        fwd = inp + out + (out if case.skip else 0)
        bwd = out + inp
    else:
        fwd = 3 * out
        bwd = 5 * out
    return elsize * {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def _tolerances(dtype: torch.dtype, case: Optional[OpCase] = None, per_channel: bool = False) -> Dict[str, float]:
    # A guard against timing a broken kernel, not a precision test (tests/ does that): eager
    # half-precision rounds after every op, the fused kernels once, so they differ by a
    # few ulps (bfloat16: 2**-8 relative).
    if dtype in (torch.float16, torch.bfloat16):
        tol = {"rtol": 5e-2, "atol": 5e-2}
    else:
        tol = {"rtol": 1e-4, "atol": 1e-4}
    if case is not None and case.op == BATCH_NORM and dtype == torch.float32:
        # Statistics over N*H*W values in float32: eager's own error against float64 reaches
        # 1e-4 in the output and 3e-3 in grad_weight at the headline shape (channels_last),
        # and the per-channel gradients are sums of M values, whose rounding grows as sqrt(M).
        m = case.n * case.out_hw[0] * case.out_hw[1]
        tol = {"rtol": 1e-3, "atol": 1e-3 * (math.sqrt(m) if per_channel else 1.0)}
    return tol


def _check_against_eager(case: OpCase, fn: Callable[..., torch.Tensor], dtype: torch.dtype,
                         layout: str, device: torch.device) -> None:
    """Raise AssertionError if ``fn`` disagrees with the eager reference (forward and every
    gradient): a wrong kernel must not be timed as if it were a fast one."""
    ref_fn = _impl_fn(case, "eager", "reference")
    a = _make_inputs(case, dtype, layout, device, True)
    b = _make_inputs(case, dtype, layout, device, True)
    ya, yb = fn(*a), ref_fn(*b)
    g = torch.randn_like(yb)
    ga = torch.autograd.grad(ya, a, g)
    gb = torch.autograd.grad(yb, b, g)
    names = ["output"] + [f"grad of input {i}" for i in range(len(a))]
    for name, x, y in zip(names, (ya, *ga), (yb, *gb)):
        try:
            torch.testing.assert_close(x, y, **_tolerances(dtype, case, per_channel=x.dim() == 1))
        except AssertionError as exc:
            detail = " ".join(str(exc).split())[:200]
            raise AssertionError(f"{name} differs from the eager reference, not timed: {detail}") from None


class _CopyBaseline:
    """Time of ``dst.copy_(src)`` moving a given number of bytes (half read, half written),
    measured once per size in the run that times the ops."""

    def __init__(self, device: torch.device, plan: OpsPlan, res: Results, flush: L2Flusher) -> None:
        self.device, self.plan, self.res, self.flush = device, plan, res, flush
        self.cache: Dict[Tuple[torch.dtype, int], Stats] = {}

    def gbps(self, dtype: torch.dtype, nbytes: int) -> float:
        elsize = torch.empty((), dtype=dtype).element_size()
        numel = max(nbytes // (2 * elsize), 1)
        key = (dtype, numel)
        if key not in self.cache:
            src = torch.randn(numel, device=self.device).to(dtype)
            dst = torch.empty_like(src)
            st = measure(lambda: dst.copy_(src), self.device, warmup=self.plan.warmup,
                         min_reps=self.plan.min_reps, max_reps=self.plan.max_reps,
                         max_time_s=self.plan.max_time_s, flush=self.flush)
            self.cache[key] = st
            moved = 2 * numel * elsize
            common = dict(suite="ops", name="copy", impl="copy", backend="torch", mode="copy",
                          dtype=DTYPE_NAMES[dtype], layout="contiguous", shape=str(numel))
            self.res.add(**common, metric="time", unit="ms", median=st.median, p20=st.p20, p80=st.p80)
            bw = st.inverse(moved / 1e6)  # bytes / ms / 1e6 = GB/s
            self.res.add(**common, metric="bandwidth", unit="GB/s", median=bw.median, p20=bw.p20, p80=bw.p80)
        st = self.cache[key]
        return 2 * numel * elsize / st.median / 1e6


def run_ops(device: torch.device, plan: OpsPlan, res: Results, log: Callable[[str], None] = print) -> None:
    """Measure every (case, dtype, layout, implementation, mode) of ``plan`` into ``res``."""
    deadline = Deadline(plan.budget_s)
    flush = L2Flusher(device)
    copy = _CopyBaseline(device, plan, res, flush)
    for case in plan.cases:
        res.labels[case.shape] = case.where
        if case.headline:
            res.headline.add(case.shape)
    impls: List[Tuple[str, str]] = [("eager", "reference")]
    if plan.with_compile:
        impls.append(("compile", "inductor"))
    impls += [("fused", b) for b in plan.fused_backends]

    # Headline shapes in every dtype come first: under a time budget they must be measured.
    order = [(c, d) for d in plan.dtypes for c in plan.cases if c.headline]
    rest = plan.dtypes if plan.dtypes_beyond_headline is None else \
        [d for d in plan.dtypes if d in plan.dtypes_beyond_headline]
    order += [(c, d) for d in rest for c in plan.cases if not c.headline]
    for case, dtype in order:
        dname = DTYPE_NAMES[dtype]
        for layout in plan.layouts:
            key = dict(suite="ops", name=case.op, dtype=dname, layout=layout, shape=case.shape)
            modes = MODES if case.headline else tuple(plan.modes_beyond_headline)
            for b, why in plan.skipped_backends.items():
                res.skip(**key, impl="fused", backend=b, mode="all", reason=why)
            here: List[Tuple[str, str]] = []
            for impl, backend in impls:
                if impl == "compile" and not case.headline and plan.compile_dtypes_beyond_headline is not None \
                        and dtype not in plan.compile_dtypes_beyond_headline:
                    res.skip(**key, impl=impl, backend=backend, mode="all",
                             reason="torch.compile is measured at the headline shapes only in this run "
                                    "(each shape costs a compilation; drop --quick / see --help)")
                elif deadline.expired():
                    res.skip(**key, impl=impl, backend=backend, mode="all",
                             reason=f"time budget of the ops suite ({plan.budget_s:.0f} s) used up")
                else:
                    here.append((impl, backend))
            if here:
                _run_case(case, here, dtype, layout, modes, device, plan, res, copy, flush, log)
                log(f"  {case.op} {case.shape} {layout} {dname}: done"
                    + (f" ({deadline.left():.0f} s left)" if plan.budget_s else ""))


def _why(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}"[:300]


def _run_case(case: OpCase, impls: List[Tuple[str, str]], dtype: torch.dtype, layout: str,
              modes: Sequence[str], device: torch.device, plan: OpsPlan, res: Results,
              copy: _CopyBaseline, flush: L2Flusher, log: Callable[[str], None]) -> None:
    """Time the implementations of one (case, dtype, layout) side by side: each mode is
    measured round-robin over the implementations (see measure_interleaved)."""
    dname = DTYPE_NAMES[dtype]
    elsize = torch.empty((), dtype=dtype).element_size()
    key = dict(suite="ops", name=case.op, dtype=dname, layout=layout, shape=case.shape)
    xs_ng = _make_inputs(case, dtype, layout, device, False)
    xs = _make_inputs(case, dtype, layout, device, True)
    with torch.no_grad():
        grad_out = torch.randn_like(_impl_fn(case, "eager", "reference")(*xs_ng))

    fns: Dict[Tuple[str, str], Callable[..., torch.Tensor]] = {}
    for impl, backend in impls:
        try:
            fn = _impl_fn(case, impl, backend)
            if impl == "fused" and plan.check:
                _check_against_eager(case, fn, dtype, layout, device)
            # First calls (torch.compile compiles its inference and training graphs here)
            # stay out of the timings.
            with torch.no_grad():
                if impl == "fused":  # the row names the backend that ran, or is not measured
                    check_backend_ran(backend, fn, *xs_ng)
                else:
                    fn(*xs_ng)
            torch.autograd.grad(fn(*xs), xs, grad_out)
            fns[(impl, backend)] = fn
        except Exception as exc:  # one failing implementation must not end the run
            res.skip(**key, impl=impl, backend=backend, mode="all", reason=_why(exc))
            log(f"  skipped {case.op} {case.shape} {layout} {dname} {impl}[{backend}]: {_why(exc)[:200]}")
    if not fns:
        return
    timing = dict(warmup=plan.warmup, min_reps=plan.min_reps, max_reps=plan.max_reps,
                  max_time_s=plan.max_time_s, flush=flush)

    for mode in modes:
        nbytes = _bytes(case, mode, elsize)
        copy_gbps = copy.gbps(dtype, nbytes)
        tasks: Dict[str, Tuple[Callable[[], object], Optional[Callable[[], object]]]] = {}
        for (impl, backend), fn in fns.items():
            tasks[f"{impl}|{backend}"] = _mode_task(fn, mode, xs, xs_ng, grad_out)
        try:
            stats = measure_interleaved(tasks, device, **timing)
        except Exception:  # e.g. out of memory with every implementation alive: one at a time
            stats = {}
            for label, (fn_t, setup) in tasks.items():
                try:
                    stats[label] = measure(fn_t, device, setup=setup, **timing)
                except Exception as exc:
                    impl, backend = label.split("|")
                    res.skip(**key, impl=impl, backend=backend, mode=mode, reason=_why(exc))
        for label, st in stats.items():
            impl, backend = label.split("|")
            common = dict(key, impl=impl, backend=backend, mode=mode)
            res.add(**common, metric="time", unit="ms", median=st.median, p20=st.p20, p80=st.p80)
            bw = st.inverse(nbytes / 1e6)
            res.add(**common, metric="bandwidth", unit="GB/s", median=bw.median, p20=bw.p20, p80=bw.p80)
            ratio = bw.scaled(1.0 / copy_gbps)
            res.add(**common, metric="bw_vs_copy", unit="ratio",
                    median=ratio.median, p20=ratio.p20, p80=ratio.p80)

    # What autograd keeps for backward (inputs included: the fused attention_residual keeps
    # exactly its two inputs, the fused upsample keeps nothing).
    for (impl, backend), fn in fns.items():
        with saved_tensor_bytes() as saved:
            out = fn(*xs)
        del out
        common = dict(key, impl=impl, backend=backend, mode="fwd+bwd")
        for metric, unit, field_ in (("saved_bytes", "bytes", "bytes"), ("saved_tensors", "count", "tensors")):
            v = float(saved[field_])
            res.add(**common, metric=metric, unit=unit, median=v, p20=v, p80=v)


def _mode_task(fn: Callable[..., torch.Tensor], mode: str, xs: List[torch.Tensor],
               xs_ng: List[torch.Tensor], grad_out: torch.Tensor
               ) -> Tuple[Callable[[], object], Optional[Callable[[], object]]]:
    """(timed call, untimed setup) for one mode: fwd runs under no_grad (inference);
    fwd+bwd runs the forward with autograd and torch.autograd.grad for every input; bwd
    times only the latter, its forward runs in the setup."""
    if mode == "fwd":
        def run_fwd() -> None:
            with torch.no_grad():
                fn(*xs_ng)
        return run_fwd, None
    if mode == "fwd+bwd":
        def run_fwd_bwd() -> None:
            torch.autograd.grad(fn(*xs), xs, grad_out)
        return run_fwd_bwd, None
    holder: List[torch.Tensor] = []

    def fwd_only() -> None:
        holder[:] = [fn(*xs)]

    def run_bwd() -> None:
        torch.autograd.grad(holder.pop(), xs, grad_out)
    return run_bwd, fwd_only
