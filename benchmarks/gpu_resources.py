"""Registers, spills and shared memory of every GPU kernel, compiled ahead of time (no GPU).

    python benchmarks/gpu_resources.py [--arch 80,90] [--part all|triton|cuda]
                                       [--jobs N] [--json FILE] [--hot] [--kernels REGEX]

Triton: every ``@triton.jit`` kernel of ``resattn_fast/ops/triton`` is compiled by Triton's
own compiler for each target (``triton.compile(ASTSource(...), target=GPUTarget("cuda",
arch, 32))``) in every specialization its launcher can produce: each autotune config
(BLOCK, num_warps, num_stages) the autotuner may try (after its own pruning) x each dtype (float32, float16, bfloat16, float64; the
kernel's IS_FP64 follows it) x every value of its other boolean constexpr flags
(CHANNELS_LAST, HAS_SKIP, ALIGN, INT64, TRAINING, ...). Pointers carry the 16-byte
alignment hint of a fresh PyTorch allocation and the dtype the launcher passes: the
tensor's, except for per-channel workspaces and statistics (the accumulation type: float32,
float64 for float64) and batch-norm parameters (float32, as under autocast; float64 for
float64); integers are not specialized (the general case); with INT64 the element counts
are 64-bit integers, as they are for tensors over 2**31 elements. Plus,
per kernel, the specialization Triton makes of integer arguments equal to 1 (every size
and stride 1, flags all off and all on, float32, first config), which turns them into
constants.

CUDA: the cubins of the built extension (``resattn_fast/_C*.so`` of this interpreter), for
every architecture it was built for.

Each cubin's registers, local/stack bytes (spills) and static shared memory are read with
the ``cuobjdump -res-usage`` that ships in Triton's package; Triton kernels add the
shared memory the launch requests. "warps/SM" is how many warps the register file lets
one SM hold (65536 registers, allocated per warp in units of 256, at most 64 warps and
whole blocks; CUDA kernels: any block size). Prints one row per variant (``--hot``: only
the specializations the headline benchmarks run) and a per-kernel summary; exits 1 on a
compile failure or any spill, 2 on usage errors.
"""

from __future__ import annotations

import os

# Run as a script: the real compiler, never the CPU interpreter (tests set
# TRITON_INTERPRET=1), and the kernels' GPU autotune configs (the interpreter gets a single
# one). Set before any import of Triton; the compile workers inherit it. Imported as a
# module (the tests read its helpers), it leaves the environment alone.
if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import importlib  # noqa: E402
import importlib.util  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

__all__ = [
    "Row",
    "TritonVariant",
    "cuda_rows",
    "cuobjdump",
    "exit_status",
    "parse_res_usage",
    "triton_rows",
    "triton_variants",
    "warps_per_sm",
]

TRITON_MODULES = ("resattn_fast.ops.triton.upsample_bilinear_add",
                  "resattn_fast.ops.triton.attention_residual",
                  "resattn_fast.ops.triton.batch_norm_relu")
DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64"}
# The element-count arguments of each kernel (the count and its size class; per-channel
# element counts and chunk lengths): 64-bit in the INT64 specialization.
COUNT_ARGS = ("total", "numel", "size_cls", "M", "CHUNK")
# Scalar float arguments (Triton passes Python floats as float32).
FLOAT_ARGS = ("scale_h32", "scale_w32", "eps32", "momentum32")
# Scalar int64 arguments (the bits of a float64 scalar).
INT64_ARGS = ("scale_h64", "scale_w64", "eps64", "momentum64")
# Pointers in the accumulation type (float32; float64 for float64 tensors): per-channel
# workspaces and statistics.
ACC_PTR_ARGS = ("pmean_ptr", "pm2_ptr", "par_ptr", "pdy_ptr", "pdyx_ptr", "coef_ptr",
                "mean_ptr", "var_ptr")
# Batch-norm parameters, running statistics and their gradients: float32 (autocast's
# parameters of half tensors; float64 for float64).
PARAM_PTR_ARGS = ("w_ptr", "b_ptr", "rm_ptr", "rv_ptr", "gw_ptr", "gb_ptr")
# int64 pointers: num_batches_tracked.
INT64_PTR_ARGS = ("nbt_ptr",)
# int32 pointers: the reductions' tile counters (_arrive_last).
INT32_PTR_ARGS = ("cnt_ptr",)
# What the headline benchmarks run (--hot): stage-1 shapes, skip, align_corners=True,
# 32-bit offsets, float32 and bfloat16, NCHW and channels_last.
HOT = {"HAS_SKIP": True, "ALIGN": True, "INT64": False, "TRAINING": True, "HAS_W": True,
       "HAS_B": True}
HOT_DTYPES = ("float32", "bfloat16")

REGS_PER_SM = 65536
REG_ALLOC_UNIT = 256  # registers, per warp
MAX_WARPS_PER_SM = 64  # sm_80 and sm_90
MAX_BLOCKS_PER_SM = 32


@dataclasses.dataclass
class Row:
    """One compiled kernel variant and what it uses per thread (registers, spill bytes) and
    per block (shared memory bytes)."""

    source: str  # "triton" or "cuda"
    kernel: str
    spec: str
    arch: int
    num_warps: Optional[int] = None
    regs: Optional[int] = None
    spill_bytes: Optional[int] = None
    smem_bytes: Optional[int] = None
    warps_per_sm: Optional[int] = None
    compile_s: Optional[float] = None
    error: Optional[str] = None


@dataclasses.dataclass
class TritonVariant:
    """The inputs of one ``triton.compile`` call (picklable: the kernel by module/name)."""

    module: str
    name: str
    signature: Dict[str, str]
    constexprs: Dict[str, Any]
    num_warps: int
    num_stages: int
    spec: str


def warps_per_sm(regs: int, num_warps: Optional[int] = None) -> int:
    """Resident warps per SM that ``regs`` registers per thread allow (sm_80/sm_90 register
    file), in whole blocks of ``num_warps`` warps if given."""
    per_warp = -(-max(regs, 1) * 32 // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    warps = min(REGS_PER_SM // per_warp, MAX_WARPS_PER_SM)
    if num_warps:
        warps = min(warps // num_warps, MAX_BLOCKS_PER_SM) * num_warps
    return warps


def cuobjdump() -> str:
    """The cuobjdump shipped in Triton's package (else one on PATH)."""
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if os.access(path, os.X_OK):
        return path
    found = shutil.which("cuobjdump")
    if not found:
        raise RuntimeError(f"cuobjdump not found ({path} is missing and none is on PATH)")
    return found


_ARCH = re.compile(r"^\s*arch\s*=\s*sm_(\d+)a?\s*$")
_FUNC = re.compile(r"^\s*Function\s+(\S+?)\s*:\s*$")
_RES = re.compile(r"([A-Z]+)(?:\[\d+\])?:(\d+)")


def parse_res_usage(text: str) -> List[Tuple[Optional[int], str, Dict[str, int]]]:
    """(arch or None, function name, {"REG": .., "STACK": .., "SHARED": .., "LOCAL": ..})
    for each function in ``cuobjdump -res-usage`` output."""
    out: List[Tuple[Optional[int], str, Dict[str, int]]] = []
    arch: Optional[int] = None
    func: Optional[str] = None
    for line in text.splitlines():
        m = _ARCH.match(line)
        if m:
            arch = int(m.group(1))
            continue
        m = _FUNC.match(line)
        if m:
            func = m.group(1)
            continue
        if func is not None and "REG:" in line:
            out.append((arch, func, {k: int(v) for k, v in _RES.findall(line)}))
            func = None
    return out


def _res_usage(path: str) -> List[Tuple[Optional[int], str, Dict[str, int]]]:
    proc = subprocess.run([cuobjdump(), "-res-usage", path], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"cuobjdump -res-usage {path} failed: {proc.stderr.strip()}")
    return parse_res_usage(proc.stdout)


# --------------------------------------------------------------------------- Triton
def _jit_kernels(module: str) -> Iterator[Tuple[str, Any, List[Any], Any]]:
    """(name, JITFunction, autotune configs, early_config_prune or None) of every launched
    kernel of ``module``."""
    import triton
    from triton.runtime.autotuner import Autotuner

    mod = importlib.import_module(module)
    for name, obj in sorted(vars(mod).items()):
        if isinstance(obj, Autotuner):
            yield name, obj.fn, list(obj.configs), getattr(obj, "early_config_prune", None)
        elif isinstance(obj, triton.runtime.jit.JITFunction) and name.endswith("_kernel"):
            yield name, obj, [triton.Config({}, num_warps=4)], None


def _variant(module: str, name: str, fn: Any, cfg: Any, dtype: str, flags: List[str],
             const: Dict[str, Any]) -> TritonVariant:
    sig: Dict[str, str] = {}
    for p in fn.params:
        if p.is_constexpr:
            sig[p.name] = "constexpr"
        elif p.name in INT64_PTR_ARGS:
            sig[p.name] = "*i64"
        elif p.name in INT32_PTR_ARGS:
            sig[p.name] = "*i32"
        elif p.name in ACC_PTR_ARGS or p.name in PARAM_PTR_ARGS:
            sig[p.name] = "*fp64" if dtype == "float64" else "*fp32"
        elif p.name.endswith("_ptr"):
            sig[p.name] = "*" + DTYPES[dtype]
        elif p.name in FLOAT_ARGS:
            sig[p.name] = "fp32"
        elif p.name in INT64_ARGS:
            sig[p.name] = "i64"
        elif p.name in COUNT_ARGS and const.get("INT64"):
            sig[p.name] = "i64"
        else:
            sig[p.name] = "i32"
    parts = [f"BLOCK={cfg.kwargs.get('BLOCK')}/w{cfg.num_warps}", dtype]
    parts += [f for f in flags if const[f]]
    return TritonVariant(module, name, sig, const, cfg.num_warps, cfg.num_stages, " ".join(parts))


def triton_variants(kernels: Optional[str] = None) -> List[TritonVariant]:
    """Every specialization the launchers can produce (see the module docstring), of the
    kernels whose name matches the regular expression ``kernels`` (all if None)."""
    variants: List[TritonVariant] = []
    for module in TRITON_MODULES:
        for name, fn, cfgs, prune in _jit_kernels(module):
            if kernels and not re.search(kernels, name):
                continue
            flags = [p.name for p in fn.params if p.is_constexpr
                     and p.name != "IS_FP64" and all(p.name not in c.kwargs for c in cfgs)]
            for dtype, values in itertools.product(
                    DTYPES, itertools.product((False, True), repeat=len(flags))):
                flag_const = dict(zip(flags, values))
                if any(p.name == "IS_FP64" for p in fn.params):
                    flag_const["IS_FP64"] = dtype == "float64"
                # The configs this launch tunes over (the autotuner's own pruning).
                for cfg in prune(cfgs, {}, **flag_const) if prune else cfgs:
                    variants.append(_variant(module, name, fn, cfg, dtype, flags,
                                             {**flag_const, **cfg.kwargs}))
            # Triton turns integer arguments equal to 1 (sizes, strides) into constants,
            # which breaks code that calls tensor methods on them: compile that case
            # too, every such argument 1, all flags off and all on (once if no flags).
            for flag_value in (False, True) if flags else (False,):
                base = next(v for v in variants if v.name == name and v.spec.split()[1] == "float32"
                            and all(v.constexprs[f] == flag_value for f in flags))
                sig = dict(base.signature)
                const = dict(base.constexprs)
                for p in fn.params:
                    if sig[p.name] == "i32" and p.name not in COUNT_ARGS and not getattr(p, "do_not_specialize", False):
                        sig[p.name] = "constexpr"
                        const[p.name] = 1
                variants.append(dataclasses.replace(base, signature=sig, constexprs=const,
                                                    spec=base.spec + " ints=1"))
    return variants


def _is_hot(v: TritonVariant) -> bool:
    return (all(v.constexprs.get(k, want) == want for k, want in HOT.items())
            and any(f" {d}" in f" {v.spec}" for d in HOT_DTYPES))


def _compile_one(args: Tuple[TritonVariant, int]) -> Row:
    """Compile one variant for sm_``arch`` and read its resources (runs in a worker)."""
    v, arch = args
    row = Row("triton", v.name, v.spec, arch, num_warps=v.num_warps)
    t0 = time.perf_counter()
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        fn = {n: f for n, f, _, _ in _jit_kernels(v.module)}[v.name]
        attrs = {(i,): [["tt.divisibility", 16]]
                 for i, p in enumerate(fn.params) if v.signature[p.name].startswith("*")}
        src = ASTSource(fn=fn, signature=v.signature, constexprs=v.constexprs, attrs=attrs)
        kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                options={"num_warps": v.num_warps, "num_stages": v.num_stages})
        row.compile_s = time.perf_counter() - t0
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, f"{v.name}.cubin")
            with open(path, "wb") as f:
                f.write(kernel.asm["cubin"])
            funcs = _res_usage(path)
        if len(funcs) != 1:
            raise RuntimeError(f"expected one function in the cubin, cuobjdump found {len(funcs)}")
        res = funcs[0][2]
        row.regs = res.get("REG", 0)
        row.spill_bytes = res.get("LOCAL", 0) + res.get("STACK", 0)
        row.smem_bytes = res.get("SHARED", 0) + int(getattr(kernel.metadata, "shared", 0) or 0)
        row.warps_per_sm = warps_per_sm(row.regs, v.num_warps)
    except Exception as exc:  # reported per variant; the run fails at the end
        row.compile_s = time.perf_counter() - t0
        row.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
    return row


def triton_rows(archs: Sequence[int], jobs: int = 0, hot_only: bool = False,
                kernels: Optional[str] = None) -> List[Row]:
    """Compile every Triton variant (of the kernels matching ``kernels``) for every arch
    (``jobs`` worker processes; 0: one per CPU) and return one Row each, in a stable
    order."""
    variants = [v for v in triton_variants(kernels) if not hot_only or _is_hot(v)]
    work = [(v, a) for v in variants for a in archs]
    jobs = jobs or os.cpu_count() or 1
    if jobs == 1:
        return [_compile_one(w) for w in work]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(_compile_one, work, chunksize=4))


# ----------------------------------------------------------------------------- CUDA
def extension_path() -> Optional[str]:
    """The resattn_fast._C library this interpreter would import (None if not built)."""
    spec = importlib.util.find_spec("resattn_fast._C")
    return spec.origin if spec is not None and spec.origin else None


def _demangle(names: List[str]) -> Dict[str, str]:
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return {n: n for n in names}
    proc = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True)
    out = proc.stdout.splitlines()
    return dict(zip(names, out)) if proc.returncode == 0 and len(out) == len(names) else {n: n for n in names}


def _short(demangled: str) -> Tuple[str, str]:
    """(kernel name, template arguments) of a demangled CUDA kernel name such as
    ``void ns::(anonymous namespace)::kernel<float, long, 4>(float const*, ...)``."""
    name = demangled[5:] if demangled.startswith("void ") else demangled
    if name.endswith(")"):  # drop the parameter list (it may hold parentheses itself)
        depth = 0
        for i in range(len(name) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(name[i], 0)
            if depth == 0:
                name = name[:i]
                break
    targs = ""
    if "<" in name and name.endswith(">"):
        name, targs = name[:name.index("<")], name[name.index("<") + 1:-1]
    return name.split("::")[-1], targs.replace("c10::", "")


def cuda_rows(path: Optional[str] = None) -> List[Row]:
    """One Row per (CUDA kernel, architecture) in the extension's cubins; [] if the
    extension has none (CPU-only build) or is not built."""
    path = path or extension_path()
    if not path or not os.path.exists(path):
        return []
    funcs = [(a, f, r) for a, f, r in _res_usage(path) if a is not None]
    names = _demangle(sorted({f for _, f, _ in funcs}))
    rows = []
    for arch, func, res in funcs:
        kernel, spec = _short(names[func])
        regs = res.get("REG", 0)
        rows.append(Row("cuda", kernel, spec or "-", arch, regs=regs,
                        spill_bytes=res.get("LOCAL", 0) + res.get("STACK", 0),
                        smem_bytes=res.get("SHARED", 0), warps_per_sm=warps_per_sm(regs)))
    return sorted(rows, key=lambda r: (r.kernel, r.spec, r.arch))


# ---------------------------------------------------------------------------- report
def exit_status(rows: Sequence[Row]) -> int:
    """1 if any variant failed to compile or spills, else 0."""
    return int(any(r.error or (r.spill_bytes or 0) > 0 for r in rows))


def format_table(rows: Sequence[Row]) -> str:
    """The rows as a fixed-width table (kernel, specialization, arch, registers, spills,
    shared memory, warps per SM, compile seconds)."""
    head = ("kernel", "specialization", "arch", "regs", "spill B", "smem B", "warps/SM", "compile s")
    body = []
    for r in rows:
        if r.error:
            body.append((r.kernel, r.spec, f"sm_{r.arch}", "FAILED", r.error, "", "", ""))
            continue
        body.append((r.kernel, r.spec, f"sm_{r.arch}", str(r.regs), str(r.spill_bytes),
                     str(r.smem_bytes), str(r.warps_per_sm),
                     "" if r.compile_s is None else f"{r.compile_s:.2f}"))
    widths = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(head, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in body]
    return "\n".join(lines)


def format_summary(rows: Sequence[Row]) -> str:
    """Per (source, kernel, arch): variants, failures, max registers, spills, min warps/SM."""
    groups: Dict[Tuple[str, str, int], List[Row]] = {}
    for r in rows:
        groups.setdefault((r.source, r.kernel, r.arch), []).append(r)
    lines = []
    for (source, kernel, arch), rs in sorted(groups.items()):
        ok = [r for r in rs if not r.error]
        failed = len(rs) - len(ok)
        if not ok:
            lines.append(f"  {source:6s} {kernel} sm_{arch}: {len(rs)} variants, all FAILED")
            continue
        spills = sum(1 for r in ok if (r.spill_bytes or 0) > 0)
        times = [r.compile_s for r in ok if r.compile_s is not None]
        mean = f", {sum(times) / len(times):.2f} s/variant" if times else ""
        lines.append(
            f"  {source:6s} {kernel} sm_{arch}: {len(rs)} variants, {failed} failed, "
            f"{spills} spilling, registers {min(r.regs or 0 for r in ok)}-{max(r.regs or 0 for r in ok)}, "
            f"smem <= {max(r.smem_bytes or 0 for r in ok)} B, "
            f"warps/SM >= {min(r.warps_per_sm or 0 for r in ok)}{mean}")
    return "\n".join(lines)


def _write_json(path: str, rows: Sequence[Row]) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump([dataclasses.asdict(r) for r in rows], f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _archs(text: str) -> List[int]:
    try:
        archs = [int(a.strip().replace("sm_", "").replace(".", "")) for a in text.split(",") if a.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--arch takes numbers like 80,90, got {text!r}") from None
    if not archs or any(a < 50 for a in archs):
        raise argparse.ArgumentTypeError(f"--arch takes numbers like 80,90, got {text!r}")
    return archs


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=_archs, default=[80, 90],
                        help="Triton targets, comma-separated (default: 80,90)")
    parser.add_argument("--part", choices=("all", "triton", "cuda"), default="all")
    parser.add_argument("--jobs", type=int, default=0, help="compile processes (default: one per CPU)")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    parser.add_argument("--hot", action="store_true",
                        help="only the specializations the headline benchmarks run")
    parser.add_argument("--kernels", metavar="REGEX",
                        help="only the Triton kernels whose name matches REGEX")
    args = parser.parse_args(argv)
    if args.jobs < 0:
        parser.error("--jobs must be >= 0")
    t0 = time.perf_counter()
    rows: List[Row] = []
    if args.part in ("all", "triton"):
        rows += triton_rows(args.arch, args.jobs, args.hot, args.kernels)
    if args.part in ("all", "cuda"):
        crow = cuda_rows()
        if not crow:
            print(f"CUDA: no cubins in the extension ({extension_path() or 'not built'}): "
                  "built without CUDA kernels", file=sys.stderr)
        rows += crow
    if args.json:
        _write_json(args.json, rows)
    print(format_table(rows))
    print()
    print(f"summary ({len(rows)} variants, {time.perf_counter() - t0:.0f} s):")
    print(format_summary(rows))
    status = exit_status(rows)
    bad = [r for r in rows if r.error or (r.spill_bytes or 0) > 0]
    for r in bad[:20]:
        print(f"FAIL: {r.source} {r.kernel} [{r.spec}] sm_{r.arch}: "
              f"{r.error or f'{r.spill_bytes} bytes of spills'}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
