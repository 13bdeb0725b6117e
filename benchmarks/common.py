"""Shared pieces of the benchmark suite: the result rows, the machine description, and
how the package is found when the suite runs from a source checkout."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Set

import torch

__all__ = [
    "CSV_COLUMNS",
    "Row",
    "Skip",
    "Results",
    "backend_that_ran",
    "check_backend_ran",
    "device_name",
    "load_average",
    "ensure_package_importable",
    "machine_info",
    "shape_str",
]

# The long format of results.csv: one row per measured number.
CSV_COLUMNS = [
    "suite", "name", "impl", "backend", "mode", "dtype", "layout", "shape",
    "metric", "unit", "median", "p20", "p80", "device", "torch", "timestamp",
]


def ensure_package_importable() -> None:
    """Make ``import resattn_fast`` work from a checkout that is not pip-installed."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        import resattn_fast  # noqa: F401
    except ModuleNotFoundError:
        sys.path.insert(0, root)


def shape_str(shape: Any) -> str:
    """(8, 256, 56, 56) -> "8x256x56x56"; strings pass through."""
    if isinstance(shape, str):
        return shape
    return "x".join(str(int(s)) for s in shape)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model (from /proc/cpuinfo)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return _cpu_model()


def load_average() -> str:
    """The 1-minute load average ("?" where the OS has none): on a shared machine, a load
    above the core count means other processes took CPU time from the measurements."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except (AttributeError, OSError):
        return "?"


def machine_info(device: torch.device, threads: int) -> Dict[str, str]:
    """What a reader needs to reproduce or compare a run."""
    info = {
        "device": device_name(device),
        "cpu": _cpu_model(),
        "cpu_cores_visible": str(os.cpu_count()),
        "torch_threads": str(threads),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    info["load_start"] = load_average()
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu_memory_gib"] = f"{props.total_memory / 2**30:.1f}"
        info["cuda"] = str(torch.version.cuda)
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:
        info["triton"] = "not importable"
    return info


def backend_that_ran(fn: Callable[[], object]) -> str:
    """Which backend's kernels ``fn()`` ran, read from the dispatcher rather than from the
    name it was given: ``"cpu"`` / ``"cuda"`` for the C++ ops of ``torch.ops.resattn_fast``
    (by the tensors' device; the emulated namespace is ``"cuda"`` on CPU tensors),
    ``"triton"`` for the ``*_triton`` ops, ``"reference"`` when it called none of them
    (plain PyTorch); several are joined by "+"."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen: Set[str] = set()

    def device_of(args: Any) -> str:
        for a in args:
            if isinstance(a, torch.Tensor):
                return a.device.type
        return "?"

    class _Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            ns = getattr(func, "namespace", "")
            if ns in ("resattn_fast", "resattn_fast_emulated"):
                if func.name().split(".")[0].endswith("_triton"):
                    seen.add("triton")
                elif ns == "resattn_fast_emulated":
                    seen.add("cuda")
                else:
                    seen.add(device_of(args))
            return func(*args, **(kwargs or {}))

    with _Spy():
        fn()
    return "+".join(sorted(seen)) or "reference"


def check_backend_ran(backend: str, fn: Callable[..., object], *args: Any) -> None:
    """Call ``fn(*args)``; raise unless the kernels of ``backend`` are what ran, so that a
    row labelled with a backend measures that backend (never a silent fallback)."""
    ran = backend_that_ran(lambda: fn(*args))
    if ran != backend:
        raise RuntimeError(f"asked for backend {backend!r}, but {ran!r} ran")


@dataclass
class Row:
    """One measured number (see CSV_COLUMNS); times in ms, rates per second, bytes."""

    suite: str
    name: str
    impl: str
    backend: str
    mode: str
    dtype: str
    layout: str
    shape: str
    metric: str
    unit: str
    median: float
    p20: float
    p80: float


@dataclass
class Skip:
    """A row that was asked for and not measured, with the reason."""

    suite: str
    name: str
    impl: str
    backend: str
    mode: str
    dtype: str
    layout: str
    shape: str
    reason: str


@dataclass
class Results:
    """Everything one run produced, written out by report.write_outputs."""

    device: torch.device
    threads: int
    command: str
    quick: bool
    timestamp: str = field(default_factory=lambda: _dt.datetime.now().astimezone().isoformat(timespec="seconds"))
    rows: List[Row] = field(default_factory=list)
    skips: List[Skip] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    info: Dict[str, str] = field(default_factory=dict)
    backends: Dict[str, List[str]] = field(default_factory=dict)
    suites_s: Dict[str, float] = field(default_factory=dict)
    labels: Dict[str, str] = field(default_factory=dict)  # shape -> where the networks run it
    headline: Set[str] = field(default_factory=set)  # shapes of the headline (target) cases

    def add(self, **kw: Any) -> None:
        self.rows.append(Row(**kw))

    def skip(self, **kw: Any) -> None:
        self.skips.append(Skip(**kw))

    def csv_records(self) -> List[Dict[str, Any]]:
        dev = self.info.get("device") or device_name(self.device)
        out = []
        for r in self.rows:
            d = asdict(r)
            d.update(device=dev, torch=torch.__version__, timestamp=self.timestamp)
            out.append({k: d[k] for k in CSV_COLUMNS})
        return out

    def find(self, **kw: Any) -> List[Row]:
        """Rows whose fields equal every given value."""
        return [r for r in self.rows if all(getattr(r, k) == v for k, v in kw.items())]

    def one(self, **kw: Any) -> Optional[Row]:
        rows = self.find(**kw)
        return rows[0] if rows else None
