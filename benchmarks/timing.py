"""Timers for the benchmark suite: CUDA events on a GPU, perf_counter on the CPU.

Every measurement is bounded by wall time (``max_time_s``) as well as by a repetition
count, so a slow machine shortens a run instead of stretching it. Results are the median
and the 20th / 80th percentiles of the per-repetition times, in milliseconds.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch

__all__ = [
    "Stats",
    "Deadline",
    "L2Flusher",
    "measure",
    "measure_interleaved",
    "percentiles",
    "saved_tensor_bytes",
    "synchronize",
]


@dataclass(frozen=True)
class Stats:
    """Summary of repeated measurements (times in ms, or whatever unit was fed in)."""

    median: float
    p20: float
    p80: float
    n: int

    def scaled(self, factor: float) -> Stats:
        """The same statistics multiplied by ``factor`` (> 0 keeps the order)."""
        return Stats(self.median * factor, self.p20 * factor, self.p80 * factor, self.n)

    def inverse(self, numerator: float) -> Stats:
        """Statistics of ``numerator / sample`` (e.g. a rate from times): p20 and p80 swap."""
        return Stats(numerator / self.median, numerator / self.p80, numerator / self.p20, self.n)


def percentiles(samples: Sequence[float]) -> Stats:
    """Median, 20th and 80th percentiles (linear interpolation, like numpy's default)."""
    if not samples:
        raise ValueError("percentiles: no samples")
    xs = sorted(samples)

    def q(p: float) -> float:
        pos = p * (len(xs) - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, len(xs) - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    return Stats(q(0.5), q(0.2), q(0.8), len(xs))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Deadline:
    """A wall-clock budget shared by the rows of one suite (None: unlimited)."""

    def __init__(self, seconds: Optional[float]) -> None:
        self.seconds = seconds
        self.start = time.perf_counter()

    def left(self) -> float:
        if self.seconds is None:
            return math.inf
        return self.seconds - (time.perf_counter() - self.start)

    def expired(self, need_s: float = 0.0) -> bool:
        return self.left() <= need_s


class L2Flusher:
    """Overwrites a buffer larger than the GPU's L2 cache before each timed repetition, so
    bandwidth figures come from HBM and not from data left in cache by the last run."""

    def __init__(self, device: torch.device) -> None:
        self.buf: Optional[torch.Tensor] = None
        if device.type == "cuda":
            l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 64 << 20)
            self.buf = torch.empty(max(2 * int(l2), 64 << 20), dtype=torch.int8, device=device)

    def __call__(self) -> None:
        if self.buf is not None:
            self.buf.zero_()


def measure(
    fn: Callable[[], object],
    device: torch.device,
    *,
    setup: Optional[Callable[[], object]] = None,
    warmup: int = 2,
    min_reps: int = 5,
    max_reps: int = 200,
    max_time_s: float = 1.0,
    flush: Optional[L2Flusher] = None,
) -> Stats:
    """Time ``fn()`` (ms per call): ``warmup`` untimed calls, then repetitions until
    ``max_time_s`` of wall time has passed (at least ``min_reps``, at most ``max_reps``).

    ``setup()`` runs untimed before every call (e.g. the forward pass whose backward is
    timed) and its result is passed to nothing: ``fn`` reads what it needs from closures.
    On CUDA each call is bracketed by events recorded on the current stream, so host-side
    setup and launch gaps before the start event are not counted; on the CPU the call is
    bracketed by ``time.perf_counter``.
    """
    return measure_interleaved({"fn": (fn, setup)}, device, warmup=warmup, min_reps=min_reps,
                               max_reps=max_reps, max_time_s=max_time_s, flush=flush)["fn"]


def measure_interleaved(
    fns: Dict[str, Tuple[Callable[[], object], Optional[Callable[[], object]]]],
    device: torch.device,
    *,
    warmup: int = 2,
    min_reps: int = 5,
    max_reps: int = 200,
    max_time_s: float = 1.0,
    flush: Optional[L2Flusher] = None,
) -> Dict[str, Stats]:
    """Time several implementations of one thing round-robin: one call of each per round.

    ``fns`` maps a label to (fn, setup or None) as in :func:`measure`. Interleaving makes
    the implementations share whatever the machine does meanwhile (other processes on a
    shared CPU, clocks, thermal state), so their ratios stay meaningful even when the
    absolute times drift. Rounds continue until ``max_time_s`` per implementation has
    passed (at least ``min_reps``, at most ``max_reps`` rounds).
    """
    for _ in range(max(warmup, 0)):
        for fn, setup in fns.values():
            if setup is not None:
                setup()
            fn()
    synchronize(device)
    samples: Dict[str, List[float]] = {k: [] for k in fns}
    events: Dict[str, List[Tuple[torch.cuda.Event, torch.cuda.Event]]] = {k: [] for k in fns}
    budget = max_time_s * len(fns)
    t_begin = time.perf_counter()
    reps = 0
    while reps < max_reps and (reps < min_reps or time.perf_counter() - t_begin < budget):
        for label, (fn, setup) in fns.items():
            if setup is not None:
                setup()
            if flush is not None:
                flush()
            if device.type == "cuda":
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                events[label].append((start, end))
            else:
                t0 = time.perf_counter()
                fn()
                samples[label].append((time.perf_counter() - t0) * 1e3)
        if device.type == "cuda" and reps % 8 == 7:
            synchronize(device)  # keep the host from racing far ahead of the GPU
        reps += 1
    if device.type == "cuda":
        synchronize(device)
        samples = {k: [s.elapsed_time(e) for s, e in ev] for k, ev in events.items()}
    return {k: percentiles(v) for k, v in samples.items()}


def _storage_key(t: torch.Tensor) -> Tuple[int, int]:
    try:
        st = t.untyped_storage()
        return st.data_ptr(), st.nbytes()
    except Exception:  # tensors without storage (e.g. wrapper subclasses): count their bytes
        return id(t), t.numel() * t.element_size()


@contextlib.contextmanager
def saved_tensor_bytes(exclude: Iterable[torch.Tensor] = ()) -> Iterator[Dict[str, int]]:
    """Count the memory autograd keeps for backward while the block runs.

    Yields a dict filled on exit with ``bytes`` (unique storages, each counted once, so
    tensors saved twice or views of one buffer are not double-counted) and ``tensors``
    (how many save calls were made). Parameters saved by layers are counted too; callers
    that compare implementations compare like with like; pass them in ``exclude`` (e.g.
    ``model.parameters()``) to count activations only.
    """
    skip = {_storage_key(t) for t in exclude}
    seen: Dict[Tuple[int, int], int] = {}
    count = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        count[0] += 1
        key = _storage_key(t)
        if key not in skip:
            seen[key] = key[1]
        return t

    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    out: Dict[str, int] = {}
    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield out
    out["bytes"] = int(sum(seen.values()))
    out["tensors"] = count[0]
