"""Whole-network benchmarks: training step and inference, reference vs fast, eager vs compile.

Rows per network and implementation:

- ``train``: forward + cross-entropy + backward + SGD step; ``infer``: eval-mode forward
  under no_grad. Metrics: ``throughput`` (images/s), ``time`` (ms per step), on a GPU
  ``peak_memory`` (torch.cuda.max_memory_allocated over the timed steps), and for
  ``train`` on every device ``saved_bytes``: the activations autograd keeps for backward
  (tensors seen by torch.autograd.graph.saved_tensors_hooks, parameters excluded).
- ``activation_bytes`` and ``step_peak_bytes`` (``train``, every device): measured by
  following every storage the step allocates (benchmarks/memory.py, a TorchDispatchMode
  that also sees inside checkpointed regions and the selective recomputation): the bytes
  the step allocated that are still alive at the end of the forward pass (what backward
  keeps, plus the logits and the loss), and the peak of the whole step (parameters,
  buffers, optimizer state and the batch, plus the most the step's allocations held at
  once). ``saved_bytes`` is not recorded for a checkpointed model: the hooks it counts
  with do not see inside checkpointed regions.
- ``max_batch`` (GPU): the largest batch of a network whose training step fits in memory,
  found by doubling then bisection (an OOM is caught, the cache emptied between tries),
  per gradient-checkpointing mode, within a time limit.

Implementations: ``reference`` (plain PyTorch modules), ``fast`` (fused ops with an
explicit backend), each of them under torch.compile (``+compile``), and in training the
gradient-checkpointing modes of ``set_grad_checkpointing`` (rows of mode
``train+selective`` and ``train+full`` of the fast model; the reference too in ``train+full``
in the largest-batch search). The eager implementations of a network and mode are
timed side by side, one step of each in turn (``measure_interleaved``), so that their
ratios hold on a busy machine.
"""

from __future__ import annotations

import contextlib
import gc
import time
from dataclasses import dataclass, field, replace
from typing import Callable, ContextManager, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .common import Results
from .memory import train_step_memory
from .timing import Deadline, Stats, measure_interleaved, saved_tensor_bytes, synchronize

__all__ = ["ModelCase", "ModelImpl", "ModelsPlan", "bracket_search", "max_batch_search", "run_models"]


@dataclass(frozen=True)
class ModelCase:
    """A network at an input size and batch."""

    net: str
    batch: int
    input_size: int

    @property
    def shape(self) -> str:
        return f"{self.batch}x3x{self.input_size}x{self.input_size}"


@dataclass(frozen=True)
class ModelImpl:
    """How a network is built: create_model's impl and backend, and whether it is compiled."""

    impl: str  # "reference" | "fast"
    backend: str  # the backend passed to create_model ("reference" for impl="reference")
    compiled: bool = False
    checkpointing: str = "none"  # set_grad_checkpointing's mode: "none" | "selective" | "full"

    @property
    def label(self) -> str:
        return self.impl + ("+compile" if self.compiled else "")

    def row_mode(self, mode: str) -> str:
        """The mode column of its rows: "train", or "train+selective" / "train+full"."""
        return mode if self.checkpointing == "none" else f"{mode}+{self.checkpointing}"

    @property
    def tag(self) -> str:
        return self.label + ("" if self.checkpointing == "none" else "+" + self.checkpointing)


@dataclass
class ModelsPlan:
    """What the models suite measures."""

    cases: List[ModelCase]
    impls: List[ModelImpl]
    modes: Sequence[str] = ("train", "infer")
    compile_nets: Optional[Sequence[str]] = None  # None: compile every network
    amp_dtype: Optional[torch.dtype] = None  # autocast dtype (bfloat16 on GPU)
    channels_last: bool = False
    warmup: int = 1
    min_reps: int = 3
    max_reps: int = 50
    max_time_s: float = 2.0
    budget_s: Optional[float] = None
    compile_estimate_s: float = 60.0  # a compiled row is skipped when less budget is left
    # Training rows of the eager fast implementations in these gradient-checkpointing modes
    # too (beside "none"); the largest-batch search runs the reference in "full" as well.
    checkpointing: Sequence[str] = ()
    # Networks whose training step is measured for memory only (one step, no timing, no
    # inference rows): too slow to time on this device.
    memory_only_nets: Sequence[str] = ()
    # The largest-batch search (GPU): network, input size, impls, seconds per search.
    max_batch_net: Optional[str] = None
    max_batch_input: int = 224
    max_batch_impls: List[ModelImpl] = field(default_factory=list)
    max_batch_limit_s: float = 30.0
    max_batch_start: int = 16
    max_batch_cap: int = 4096
    skipped: List[Tuple[ModelCase, ModelImpl, str]] = field(default_factory=list)


def checkpointing_variants(impls: Sequence[ModelImpl], modes: Sequence[str]) -> List[ModelImpl]:
    """The eager ``impls`` in each of ``modes`` besides their own ("selective" exists for the
    fast model only: it recomputes the fused BN-ReLU outputs)."""
    out = []
    for mi in impls:
        if mi.compiled or mi.checkpointing != "none":
            continue
        for mode in modes:
            if mode != "none" and (mode != "selective" or mi.impl == "fast"):
                out.append(replace(mi, checkpointing=mode))
    return out


def _build(case: ModelCase, mi: ModelImpl, device: torch.device, channels_last: bool,
           grad_checkpointing: Optional[str] = None) -> torch.nn.Module:
    import resattn_fast

    torch.manual_seed(0)
    backend = None if mi.impl == "reference" else mi.backend
    mode = mi.checkpointing if grad_checkpointing is None else grad_checkpointing
    model = resattn_fast.create_model(case.net, impl=mi.impl, backend=backend, grad_checkpointing=mode)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _inputs(case: ModelCase, num_classes: int, device: torch.device,
            channels_last: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    # Drawn on the device itself: a large batch drawn on the host would cost seconds.
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(case.batch, 3, case.input_size, case.input_size, generator=gen, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, num_classes, (case.batch,), generator=gen, device=device)
    return x, y


def _autocast(device: torch.device, amp: Optional[torch.dtype]) -> ContextManager[object]:
    """autocast to ``amp`` (e.g. bfloat16 on a GPU), or nothing when ``amp`` is None."""
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=amp)


def _train_step_fn(model: torch.nn.Module, run: Callable[[torch.Tensor], torch.Tensor],
                   x: torch.Tensor, y: torch.Tensor, amp: Optional[torch.dtype],
                   opt: torch.optim.Optimizer) -> Callable[[], None]:
    def step() -> None:
        with _autocast(x.device, amp):
            loss = F.cross_entropy(run(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def _rows_from_times(res: Results, common: dict, st: Stats, batch: int) -> None:
    res.add(**common, metric="time", unit="ms", median=st.median, p20=st.p20, p80=st.p80)
    ips = st.inverse(batch * 1e3)
    res.add(**common, metric="throughput", unit="images/s", median=ips.median, p20=ips.p20, p80=ips.p80)


def _add_value(res: Results, common: dict, metric: str, unit: str, v: float) -> None:
    res.add(**common, metric=metric, unit=unit, median=v, p20=v, p80=v)


@dataclass
class _Prepared:
    """A built implementation, warm (first call done), ready to be timed."""

    mi: ModelImpl
    common: dict
    fn: Callable[[], None]
    model: torch.nn.Module


def _prepare(res: Results, case: ModelCase, mi: ModelImpl, mode: str, device: torch.device,
             plan: ModelsPlan, key: dict, memory_only: bool = False) -> Optional[_Prepared]:
    """Build ``mi``, make its first (untimed) call and record what is measured once: the
    first call's time, and for training the memory of one step. Returns None when only
    memory was asked for."""
    model = _build(case, mi, device, plan.channels_last)
    x, y = _inputs(case, model.num_classes, device, plan.channels_last)
    if mi.compiled:
        torch._dynamo.reset()
        run = torch.compile(model)
    else:
        run = model
    amp = plan.amp_dtype
    common = dict(key, mode=mi.row_mode(mode))
    if mode == "train":
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        fn = _train_step_fn(model, run, x, y, amp, opt)
    else:
        model.eval()

        def fn() -> None:
            with torch.no_grad(), _autocast(device, amp):
                run(x)
    if memory_only:
        # One step under the tracker only (it also warms up nothing that would be timed).
        mem = train_step_memory(model, x, y, opt, lambda: _autocast(device, amp))
        _add_value(res, common, "activation_bytes", "bytes", float(mem.activations))
        _add_value(res, common, "step_peak_bytes", "bytes", float(mem.peak))
        return None
    params = list(model.parameters()) + list(model.buffers())
    # Activations kept for backward (training), as saved_tensors_hooks see them: counted
    # during the first, untimed step of an eager model without checkpointing (the hooks
    # do not see inside checkpointed regions); a compiled one is counted in a separate
    # forward after compilation, so that the hooks do not take part in what Dynamo traces.
    count_saved = mode == "train" and mi.checkpointing == "none"
    count_first = count_saved and not mi.compiled
    t0 = time.perf_counter()
    counter = saved_tensor_bytes(exclude=params) if count_first else contextlib.nullcontext({})
    with counter as saved:
        fn()  # the first call compiles (for +compile) and is not a warmup that counts
    synchronize(device)
    first_s = time.perf_counter() - t0
    _add_value(res, common, "first_call", "s", first_s)
    if count_saved and not count_first:
        model.train()
        with saved_tensor_bytes(exclude=params) as saved:
            with _autocast(device, amp):
                loss = F.cross_entropy(run(x), y)
        del loss
        model.zero_grad(set_to_none=True)
    if count_saved:
        _add_value(res, common, "saved_bytes", "bytes", float(saved["bytes"]))
    if mode == "train" and not mi.compiled:
        # Every storage the step allocates, inside checkpointed regions and recomputations
        # too (benchmarks/memory.py); Dynamo is left out of it.
        mem = train_step_memory(model, x, y, opt, lambda: _autocast(device, amp))
        _add_value(res, common, "activation_bytes", "bytes", float(mem.activations))
        _add_value(res, common, "step_peak_bytes", "bytes", float(mem.peak))
    return _Prepared(mi, common, fn, model)


def _time_rows(res: Results, prepared: List[_Prepared], case: ModelCase, device: torch.device,
               plan: ModelsPlan) -> None:
    """Time the prepared implementations side by side (one call of each per round)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    stats = measure_interleaved({p.mi.tag: (p.fn, None) for p in prepared}, device, warmup=plan.warmup,
                                min_reps=plan.min_reps, max_reps=plan.max_reps, max_time_s=plan.max_time_s)
    for p in prepared:
        _rows_from_times(res, p.common, stats[p.mi.tag], case.batch)
    if device.type == "cuda" and len(prepared) == 1:
        peak = float(torch.cuda.max_memory_allocated(device))
        _add_value(res, prepared[0].common, "peak_memory", "bytes", peak)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_models(device: torch.device, plan: ModelsPlan, res: Results,
               log: Callable[[str], None] = print) -> None:
    """Measure every (network, implementation, mode) of ``plan`` into ``res``: eager rows
    first, then the largest-batch search (GPU), then the compiled rows (the slowest to
    set up, so the first to give way when the time budget runs out)."""
    deadline = Deadline(plan.budget_s)
    dname = str(plan.amp_dtype).replace("torch.", "amp_") if plan.amp_dtype else "float32"
    layout = "channels_last" if plan.channels_last else "nchw"
    eager = [m for m in plan.impls if not m.compiled]
    compiled = [m for m in plan.impls if m.compiled]
    # Keep the time the largest-batch searches need out of the eager rows' share.
    reserve = 0.0
    if plan.max_batch_net and device.type == "cuda":
        reserve = len(_max_batch_impls(plan)) * plan.max_batch_limit_s
    jobs = [(c, m) for c in plan.cases for m in eager]
    _rows(jobs, device, plan, res, deadline, dname, layout, log, reserve)
    _max_batch(device, plan, res, deadline, dname, layout, log)
    _rows([(c, m) for c in plan.cases for m in compiled], device, plan, res, deadline, dname, layout, log)


def _rows(jobs: List[Tuple[ModelCase, ModelImpl]], device: torch.device, plan: ModelsPlan, res: Results,
          deadline: Deadline, dname: str, layout: str, log: Callable[[str], None],
          reserve_s: float = 0.0) -> None:
    # Network by network, mode by mode: the eager implementations of a mode (and in
    # training their checkpointing modes) are built together and timed side by side; on
    # a GPU, where a step's peak memory is read per implementation, one at a time. A
    # compiled implementation is measured alone. If the budget runs out, what was
    # measured still compares implementations like for like.
    cases = list(dict.fromkeys(c for c, _ in jobs))
    groups: List[Tuple[ModelCase, str, List[ModelImpl]]] = []
    for c in cases:
        impls = [m for c2, m in jobs if c2 == c]
        for mode in plan.modes:
            if c.net in plan.memory_only_nets and mode != "train":
                continue
            # Checkpointing is measured on the fast model; the reference runs as users run it.
            fast = [m for m in impls if m.impl == "fast"]
            ms = impls + (checkpointing_variants(fast, plan.checkpointing) if mode == "train" else [])
            eager = [m for m in ms if not m.compiled]
            if eager and device.type == "cpu" and c.net not in plan.memory_only_nets:
                groups.append((c, mode, eager))
            else:
                groups += [(c, mode, [m]) for m in eager]
            groups += [(c, mode, [m]) for m in ms if m.compiled]
    took: dict = {}  # (network, mode) -> seconds per implementation of the rows measured so far
    for case, mode, impls in groups:
        keys = {mi: dict(suite="models", name=case.net, impl=mi.label, backend=mi.backend,
                         dtype=dname, layout=layout, shape=case.shape) for mi in impls}
        if any(mi.compiled for mi in impls) and plan.compile_nets is not None and \
                case.net not in plan.compile_nets:
            for mi, key in keys.items():
                res.skip(**key, mode=mi.row_mode(mode), reason="torch.compile of this network is left out of this run (a "
                                                  "whole-network compilation takes minutes on a small CPU; "
                                                  "the full run compiles it)")
            continue
        # A group is started only if the time it will likely take is left: the slowest
        # implementation of this network and mode so far, else the mean of all so far.
        same = took.get((case.net, mode), [])
        every = [t for ts in took.values() for t in ts]
        likely = max(same) if same else (sum(every) / len(every) if every else 0.0)
        compiled = any(mi.compiled for mi in impls)
        need = (plan.compile_estimate_s if compiled else likely * len(impls)) + reserve_s
        if deadline.expired(need):
            for mi, key in keys.items():
                res.skip(**key, mode=mi.row_mode(mode), reason=f"time budget of the models suite ({plan.budget_s:.0f} s) used up")
            continue
        t0 = time.perf_counter()
        labels = ", ".join(f"{mi.tag}[{mi.backend}]" for mi in impls)
        memory_only = case.net in plan.memory_only_nets
        prepared: List[_Prepared] = []
        try:
            for mi in impls:
                p = _prepare(res, case, mi, mode, device, plan, keys[mi], memory_only)
                if p is not None:
                    prepared.append(p)
                else:
                    _free(device)
            if prepared:
                _time_rows(res, prepared, case, device, plan)
            if not compiled:
                took.setdefault((case.net, mode), []).append((time.perf_counter() - t0) / len(impls))
            what = "memory of one step" if memory_only else mode
            log(f"  {case.net} {case.shape} {labels} {what}: {time.perf_counter() - t0:.1f} s")
        except Exception as exc:  # one failing group must not end the run
            msg = f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:300]
            done = {(r.impl, r.mode) for r in res.find(suite="models", name=case.net, shape=case.shape,
                                                       metric="time")}
            for mi in impls:
                if (mi.label, mi.row_mode(mode)) not in done:
                    res.skip(**keys[mi], mode=mi.row_mode(mode), reason=msg)
            log(f"  skipped {case.net} {labels} {mode}: {msg[:200]}")
        finally:
            prepared.clear()
            _free(device)


def _max_batch_impls(plan: ModelsPlan) -> List[ModelImpl]:
    """What the largest-batch search measures: each implementation in every checkpointing mode."""
    return [*plan.max_batch_impls, *checkpointing_variants(plan.max_batch_impls, ("selective", "full"))]


def _max_batch(device: torch.device, plan: ModelsPlan, res: Results, deadline: Deadline, dname: str,
               layout: str, log: Callable[[str], None]) -> None:
    if plan.max_batch_net and device.type == "cuda":
        case = ModelCase(plan.max_batch_net, 0, plan.max_batch_input)
        for mi in _max_batch_impls(plan):
            mode = mi.row_mode("train")
            key = dict(suite="models", name=case.net, impl=mi.label, backend=mi.backend, mode=mode,
                       dtype=dname, layout=layout, shape=f"Nx3x{case.input_size}x{case.input_size}")
            limit = min(plan.max_batch_limit_s, deadline.left())
            if limit < 5:
                res.skip(**key, reason="time budget of the models suite used up")
                continue
            try:
                lo, hi, tries = max_batch_search(case, mi, device, plan, limit)
            except Exception as exc:
                res.skip(**key, reason=f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:300])
                continue
            finally:
                _free(device)
            v = float(lo)
            res.add(**key, metric="max_batch", unit="images", median=v, p20=v,
                    p80=float(hi - 1) if hi is not None else v)
            bound = f"fits {lo}, " + (f"fails {hi}" if hi is not None else "upper bound not reached")
            res.notes.append(f"max batch {case.net} {mi.label}[{mi.backend}] {mode}: {bound} "
                             f"({tries} tries; p80 column = largest batch not ruled out)")
            log(f"  max batch {case.net} {mi.label} {mode}: {bound}")


def _oom_types() -> Tuple[type, ...]:
    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    return (oom,)


def max_batch_search(case: ModelCase, mi: ModelImpl, device: torch.device, plan: ModelsPlan,
                     limit_s: float) -> Tuple[int, Optional[int], int]:
    """Largest batch whose training step runs: returns (fits, fails or None, tries).

    Doubles from ``plan.max_batch_start`` until a step runs out of memory (or the cap),
    then bisects until the bracket is within 1/16 of the batch; stops early when
    ``limit_s`` is spent (the bracket then says how far it got).
    """
    model = _build(case, mi, device, plan.channels_last)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    amp = plan.amp_dtype
    t_end = time.perf_counter() + limit_s

    def fits(b: int) -> bool:
        ok = True
        try:
            x, y = _inputs(ModelCase(case.net, b, case.input_size), model.num_classes, device,
                           plan.channels_last)
            with _autocast(device, amp):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            synchronize(device)
        except _oom_types():
            ok = False
        except RuntimeError as exc:  # cuDNN and friends report OOM as a plain RuntimeError
            if "out of memory" not in str(exc).lower():
                raise
            ok = False
        # Drop every reference (the exception's frames included) before emptying the cache.
        x = y = loss = None  # noqa: F841
        opt.zero_grad(set_to_none=True)
        _free(device)
        return ok

    return bracket_search(fits, plan.max_batch_start, plan.max_batch_cap, t_end)


def bracket_search(fits: Callable[[int], bool], start: int, cap: int,
                   t_end: float) -> Tuple[int, Optional[int], int]:
    """Largest ``b`` in [1, cap] with ``fits(b)``, assuming fits is monotone (fits for all
    batches below some limit): doubles from ``start`` until a failure or ``cap``, then
    bisects until the bracket is within 1/16 of the batch, or until ``time.perf_counter()``
    reaches ``t_end``. Returns (largest that fits or 0, smallest that fails or None, tries).
    """
    lo, hi, tries = 0, None, 0
    b = max(1, min(start, cap))
    while time.perf_counter() < t_end:
        tries += 1
        if fits(b):
            lo = b
            if hi is None:
                if b >= cap:
                    break
                b = min(2 * b, cap)
                continue
        else:
            hi = b
        if hi - lo <= max(1, lo // 16):
            break
        b = (lo + hi) // 2
    return lo, hi, tries
