"""Trace what a piece of PyTorch code launches: one record per GPU kernel it would run.

A ``TorchDispatchMode`` sees every aten op (and every ``torch.ops.resattn_fast`` op) below
autograd, so the forward, the backward and the optimizer step all pass through it. Run
under ``FakeTensorMode`` nothing is computed and no memory is used: attention452 at batch
256 traces in seconds on a CPU.

For each op a record holds:

- ``flops``: PyTorch's own count (``torch.utils.flop_counter.flop_registry``, the table
  ``FlopCounterMode`` uses): convolutions and matrix products; 0 for the others;
- ``read_bytes`` / ``write_bytes``: the sizes of the tensors it reads and writes, each
  once (an ideal single pass; broadcast dimensions count once; views cost nothing);
- ``cls``: its op class (convolution, batch norm, ...), ``phase`` (forward, backward,
  optimizer) and ``launches`` (kernels it starts).

The fused ops count their own traffic like any other op: upsample_bilinear_add reads x
(and skip) and writes the output; its backward reads the gradient and writes grad_x
(grad_skip is the incoming gradient itself, no kernel); attention_residual reads two
tensors and writes one; its backward reads three and writes two.

Batch norm runs several kernels per op, and each is one record (``_batch_norm_passes``):

- eager (ATen's CUDA kernels, aten/src/ATen/native/cuda/Normalization.cu, the path
  ``_select_batch_norm_backend`` takes for bfloat16): training forward = a statistics
  kernel (reads x), a per-channel kernel updating the running statistics and inverting the
  variance, then the elementwise kernel (reads x, writes y); eval forward = the elementwise
  kernel alone. Backward = ``batch_norm_backward_reduce`` (reads grad and x) then
  ``batch_norm_backward_elemt`` (reads grad and x, writes grad_x); for an NCHW input the
  two run as one kernel (``batch_norm_backward_cuda_template``) that reads both tensors
  twice: the same bytes, one launch (the second record has 0 launches). Eval backward without weight gradients: one kernel.
- fused (``resattn_fast::batch_norm_relu``, the CUDA kernels): training forward = the
  statistics kernel (reads x; its last block per channel finalizes, in the same launch)
  then the normalise+ReLU kernel (reads x, writes out); eval = that kernel alone.
  Backward (``batch_norm_relu_backward``) = the reduction (reads grad and x, finalized in
  the same launch) then the apply kernel (reads grad, x and grad_residual when given,
  writes grad_x); in eval without weight gradients the apply kernel alone. An eval pass
  with C in the thousands adds one small kernel for its rows. ``batch_norm_update_stats``:
  one kernel over the per-channel tensors. ``batch_norm_relu_with_update`` (what the fast
  modules call in training): the training forward's two kernels, the normalise kernel
  also reading and writing the running statistics and num_batches_tracked (its first
  block updates them: no kernel of its own). Each count is the launch log of the emulated
  CUDA kernels (tests/test_cuda_emulation_batch_norm.py). The ``_triton`` twin moves the
  same bytes in the same launches in eager mode (its reductions finalize in their own
  launch too; with_update's statistics kernel updates the running statistics), except
  in eval: a per-channel kernel before the normalise pass (eval forward 2, and eval
  backward without weight gradients 2). Traced by torch.compile, its reductions finalize
  in kernels of their own (training forward 3, backward 4): not what this model prices.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Set, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

__all__ = [
    "CLASSES",
    "COMPILED",
    "SOFT_MASK_CLASSES",
    "KernelRecord",
    "LiveStorages",
    "Tracer",
    "tensor_bytes",
    "foreach_launches",
    "mark_region",
    "region_of_module",
    "FUSED_NAMESPACES",
    "BN_RELU_ADD_CLASSES",
]

aten = torch.ops.aten

# Op classes, in the order the report shows them.
CONV, BN, RELU, POOL, UPSAMPLE, ADD, SIGMUL = (
    "convolution", "batch norm", "ReLU", "max-pool", "upsample", "add", "sigmoid/multiply")
FUSED_UP, FUSED_ATT, FUSED_BN, OPTIM, CAST, OTHER = (
    "fused upsample-add", "fused attention-residual", "fused BN-ReLU", "optimizer", "cast (AMP)", "other")
# The memory-bound kernels of the reference as a compiler fuses them (benchmarks/roofline/fusion.py).
COMPILED = "fused by compile"
CLASSES = (CONV, BN, RELU, POOL, UPSAMPLE, ADD, SIGMUL, FUSED_UP, FUSED_ATT, FUSED_BN, COMPILED, OPTIM, CAST,
           OTHER)
# The pre-activation path (batch norm, ReLU, the residual adds and gradient sums), eager or fused.
BN_RELU_ADD_CLASSES = (BN, RELU, ADD, FUSED_BN)
# The soft-mask branch's own ops: what the fused kernels replace.
SOFT_MASK_CLASSES = (UPSAMPLE, SIGMUL, FUSED_UP, FUSED_ATT)

# Regions set around code whose generic elementwise ops (add, mul, copy) belong to a class.
REGION_UPSAMPLE, REGION_ATTEND, REGION_BN = "upsample", "attend", "bn"

try:  # torch's own list of ops that launch nothing (guarded: a private module)
    from torch.utils._runtime_estimation import _VIEW_OPS as _TORCH_VIEW_OPS
except Exception:  # pragma: no cover - older or newer torch without it
    _TORCH_VIEW_OPS = set()

# Ops that allocate or relabel memory without a kernel (views are found from the schema).
_NO_KERNEL = {
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "alias",
    "lift_fresh", "set_", "as_strided_", "resize_", "_local_scalar_dense", "device", "sym_size",
    "sym_stride", "sym_numel", "sym_storage_offset", "_record_function_enter_new", "_record_function_exit",
    "view", "_unsafe_view", "t", "expand", "squeeze", "unsqueeze", "permute", "transpose", "as_strided",
}
# In-place ops whose destination is written without being read.
_WRITE_ONLY_DEST = {"copy_", "fill_", "zero_", "normal_", "uniform_", "bernoulli_"}

_BY_NAME: Dict[str, str] = {
    "convolution": CONV, "convolution_backward": CONV, "_convolution": CONV, "cudnn_convolution": CONV,
    "native_batch_norm": BN, "native_batch_norm_backward": BN, "_native_batch_norm_legit": BN,
    "_native_batch_norm_legit_functional": BN, "_native_batch_norm_legit_no_training": BN,
    "cudnn_batch_norm": BN, "cudnn_batch_norm_backward": BN, "batch_norm_backward": BN,
    "_batch_norm_with_update": BN, "_batch_norm_with_update_functional": BN,
    "relu": RELU, "relu_": RELU, "threshold_backward": RELU,
    "max_pool2d_with_indices": POOL, "max_pool2d_with_indices_backward": POOL,
    "upsample_bilinear2d": UPSAMPLE, "upsample_bilinear2d_backward": UPSAMPLE,
    "sigmoid": SIGMUL, "sigmoid_backward": SIGMUL,
    "_to_copy": CAST,
}
# Namespaces whose ops are this project's fused ops (tests register stand-ins elsewhere).
FUSED_NAMESPACES = ("resattn_fast",)
_FUSED_BN_OPS = ("batch_norm_relu", "batch_norm_relu_backward", "batch_norm_update_stats",
                 "batch_norm_relu_with_update")
_EAGER_BN_FORWARD = {"native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_no_training",
                     "_native_batch_norm_legit_functional", "_batch_norm_with_update",
                     "_batch_norm_with_update_functional", "_batch_norm_no_update"}
_EAGER_BN_BACKWARD = {"native_batch_norm_backward", "batch_norm_backward"}
# Reductions whose result a following elementwise pass needs (a fusion boundary).
_REDUCTIONS = {"sum", "mean", "var_mean", "_log_softmax", "_log_softmax_backward_data", "nll_loss_forward",
               "amax", "max", "_adaptive_avg_pool2d", "mean.dim"}
_GENERIC = {"add", "add_", "mul", "mul_", "sub", "rsub", "clone", "copy_", "contiguous", "addcmul", "div"}


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes one pass over ``t`` moves: its element size times the elements it addresses
    (a dimension of stride 0, i.e. broadcast, counts once)."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= int(size)
    return n * t.element_size()


def foreach_launches(lists: Sequence[Sequence[torch.Tensor]]) -> int:
    """Kernels a CUDA ``torch._foreach_*`` op launches (ATen's multi_tensor_apply,
    aten/src/ATen/native/cuda/MultiTensorApply.cuh): one launch per at most
    ``depth_to_max_tensors[depth - 1]`` tensors and per at most 320 blocks of 65536
    elements, where depth is the number of tensor lists."""
    depth = max(1, min(len(lists), 5))
    max_tensors = (110, 64, 48, 36, 30)[depth - 1]
    first = lists[0] if lists else []
    n = len(first)
    if n == 0:
        return 0
    chunks = sum(max(1, math.ceil(t.numel() / 65536)) for t in first)
    return max(math.ceil(n / max_tensors), math.ceil(chunks / 320))


@dataclass
class KernelRecord:
    """One kernel (or one foreach op of several launches) of the traced code."""

    op: str  # "aten.convolution_backward (dgrad)", "resattn_fast.attention_residual", ...
    cls: str
    phase: str
    flops: float
    read_bytes: int
    write_bytes: int
    launches: int
    dtype: str  # the output's dtype ("torch.bfloat16")
    matmul: bool  # counted at the matrix (tensor-core) rate
    # (storage id, bytes) of each tensor read / written: what a fusion model needs (fusion.py)
    reads_io: Tuple[Tuple[int, int], ...] = ()
    writes_io: Tuple[Tuple[int, int], ...] = ()
    reduction: bool = False  # a per-channel reduction whose result the next pass over the tensor needs

    @property
    def bytes(self) -> int:
        return self.read_bytes + self.write_bytes


def _op_name(func: Any) -> str:
    return func._schema.name.split("::", 1)[-1]


def _namespace(func: Any) -> str:
    return func._schema.name.split("::", 1)[0]


def _tensors(x: Any) -> List[torch.Tensor]:
    return [t for t in tree_flatten(x)[0] if isinstance(t, torch.Tensor)]


def _unique(ts: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    seen: Set[int] = set()
    out = []
    for t in ts:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def _is_view(func: Any) -> bool:
    if getattr(func, "is_view", False):
        return True
    return getattr(func, "overloadpacket", None) in _TORCH_VIEW_OPS


def _fused_base(name: str) -> str:
    """The op's name without its backend suffix (``batch_norm_relu_triton`` -> ``batch_norm_relu``)."""
    return name[: -len("_triton")] if name.endswith("_triton") else name


def _arguments(func: Any, args: Sequence[Any], kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """The op's arguments by their schema names (defaults filled in)."""
    out: Dict[str, Any] = {}
    for i, a in enumerate(func._schema.arguments):
        if i < len(args):
            out[a.name] = args[i]
        elif a.name in kwargs:
            out[a.name] = kwargs[a.name]
        elif a.has_default_value():
            out[a.name] = a.default_value
        else:
            out[a.name] = None
    return out


def _ts(*vals: Any) -> List[torch.Tensor]:
    return [t for v in vals for t in _tensors(v) if t.numel() > 0]


# One kernel of a multi-kernel op: (suffix, tensors read, tensors written, launches); a
# tensor listed twice is read twice.
_Pass = Tuple[str, List[torch.Tensor], List[torch.Tensor], int]


def _eval_rows_launches(x: torch.Tensor) -> int:
    """The fused op's eval passes keep each channel's row (4 values of the accumulation
    dtype) in a block's shared memory up to 48 KiB; past that (C in the thousands), one
    small kernel writes the rows first (kernels/batch_norm_relu.cu, eval_rows)."""
    acc_bytes = 8 if x.dtype == torch.float64 else 4
    return int(x.shape[1] * 4 * acc_bytes > 48 * 1024)


def _batch_norm_passes(name: str, a: Dict[str, Any], out: Any, fused: bool) -> Optional[List[_Pass]]:
    """The kernels of a batch-norm op (eager ATen or the fused BN-ReLU ops); None for other ops.
    See the module docstring for the kernels each op runs."""
    outs = list(out) if isinstance(out, (list, tuple)) else [out]
    if fused:
        base = _fused_base(name)
        # The Triton twin (eager) runs a per-channel kernel (the rows) before an eval pass
        # over x; its reductions finalize in their own launch, as the CUDA kernels' do.
        triton = name.endswith("_triton")
        if base == "batch_norm_relu":
            y, mean, var = outs[:3]
            if a["training"]:
                return [("(stats)", _ts(a["x"]), _ts(mean, var), 1),
                        ("(apply)", _ts(a["x"], a["weight"], a["bias"], mean, var), _ts(y), 1)]
            return [("", _ts(a["x"], a["weight"], a["bias"], a["running_mean"], a["running_var"]),
                     _ts(y, mean, var), 2 if triton else 1 + _eval_rows_launches(a["x"]))]
        if base == "batch_norm_relu_backward":
            gx, gw, gb = outs[:3]
            params = _ts(a["weight"], a["bias"], a["mean"], a["var"])
            apply_reads = _ts(a["grad"], a["x"], a["grad_residual"]) + params
            # Eval: the apply pass makes its rows from the parameters (its own kernel past
            # 48 KiB). Triton: the reduction's finalize writes them; without a reduction,
            # the rows kernel first.
            apply_launches = 1 if a["training"] or triton else 1 + _eval_rows_launches(a["x"])
            if a["training"] or a["weight_grads"]:
                return [("(reduce)", _ts(a["grad"], a["x"]) + params, _ts(gw, gb), 1),
                        ("(apply)", apply_reads + _ts(gw, gb), _ts(gx), apply_launches)]
            return [("", apply_reads, _ts(gx), 2 if triton else apply_launches)]
        if base == "batch_norm_relu_with_update":
            # The running statistics and num_batches_tracked are read and written by a kernel
            # the op runs anyway (CUDA: the normalise kernel's first block; Triton: the
            # statistics kernel's finalize): no launch of their own.
            y, mean, var = outs[:3]
            running = _ts(a["running_mean"], a["running_var"], a.get("num_batches_tracked"))
            stats_io = (running, running) if triton else ([], [])
            apply_io = ([], []) if triton else (running, running)
            return [("(stats)", _ts(a["x"]) + stats_io[0], _ts(mean, var) + stats_io[1], 1),
                    ("(apply, update)", _ts(a["x"], a["weight"], a["bias"], mean, var) + apply_io[0],
                     _ts(y) + apply_io[1], 1)]
        if base == "batch_norm_update_stats":  # num_batches_tracked += 1 in the same kernel
            running = _ts(a["running_mean"], a["running_var"], a.get("num_batches_tracked"))
            return [("", running + _ts(a["mean"], a["var"]), running, 1)]
        return None
    if name in _EAGER_BN_FORWARD:
        x = a["input"]
        running = _ts(a.get("running_mean"), a.get("running_var"))
        training = a.get("training", name.startswith("_batch_norm_with_update"))
        if name in ("_native_batch_norm_legit_no_training", "_batch_norm_no_update"):
            training = False
        y, save_mean, save_invstd = outs[:3]
        params = _ts(a["weight"], a["bias"])
        if not training:
            return [("", _ts(x) + params + running, _ts(y), 1)]
        saved = _ts(save_mean, save_invstd)
        return [("(stats)", _ts(x), saved, 1),
                ("(update stats, invert var)", saved + running, running + _ts(save_invstd), 1),
                ("(elemt)", _ts(x) + params + saved, _ts(y), 1)]
    if name in _EAGER_BN_BACKWARD:
        x, grad = a["input"], a["grad_out"]
        training = a.get("train", a.get("update", True))
        mask = a.get("output_mask") or [True, True, True]
        gx, gw, gb = outs[:3]
        stats = _ts(a.get("save_mean"), a.get("save_invstd"), a.get("save_var"))
        if not training and not stats:
            stats = _ts(a.get("running_mean"), a.get("running_var"))
        stats = _unique(stats + _ts(a["weight"]))
        if not (training or mask[1] or mask[2]):
            return [("(elemt)", _ts(grad, x) + stats, _ts(gx), 1)]
        reduce = ("(reduce)", _ts(grad, x) + stats, _ts(gw, gb), 1)
        elemt = ("(elemt)", _ts(grad, x) + stats, _ts(gx), 1)
        if gx is None:
            return [reduce]
        if x.is_contiguous(memory_format=torch.channels_last) and x.dim() == 4:
            return [reduce, elemt]
        # NCHW: one kernel per channel block that reduces, then applies (reads grad and x
        # twice): the same two passes, one launch.
        return [reduce, ("(elemt, same kernel)", elemt[1], elemt[2], 0)]
    return None


class LiveStorages:
    """The storages the traced code creates, and when each dies: a timeline of live bytes.

    Every output of every op (views included: they share their base's storage, counted
    once) is registered with a weak reference to its storage; before each op the dead
    ones are swept. It sees what autograd keeps wherever it keeps it: inside
    torch.utils.checkpoint regions, behind saved-tensor hooks, in a recomputation during
    backward. On fake tensors a storage has its real size and no memory. Each storage gets
    a serial number (an address can be reused once its storage is gone).

    Checking every live storage before every op is quadratic in the network's depth, so
    each sweep checks the storages born in the last ``YOUNG`` ops (temporaries die young)
    and those the previous op read (autograd frees a node's saved tensors right after the
    node's backward, whose ops read them); a full sweep every ``FULL_EVERY`` ops catches
    the rest, late by at most that many ops. At 32 the peaks of Attention-56 and
    Attention-452 (batch 64) equal those of a sweep before every op (tests/test_roofline.py
    checks it on attention56_cifar), at a quarter more tracing time; at 256 a death
    found late raised the peak by up to 1% (and moved with unrelated changes in op count).
    """

    YOUNG = 64
    FULL_EVERY = 32

    def __init__(self) -> None:
        from torch.multiprocessing.reductions import StorageWeakRef

        self._ref = StorageWeakRef
        self.live: Dict[int, Tuple[Any, int, int]] = {}  # address -> (weak ref, bytes, serial)
        self.events: List[Tuple[int, int]] = []  # (serial, +bytes at birth / -bytes at death)
        self.marks: Dict[str, int] = {}
        self._known: Set[int] = set()
        self._keep: List[Any] = []
        self._serial = 0
        self._young: List[int] = []  # addresses born in the last YOUNG ops (with repeats)
        self._born: List[int] = []  # how many addresses each of those ops added
        self._suspects: List[int] = []
        self._ops = 0

    def ignore(self, tensors: Sequence[torch.Tensor]) -> None:
        """Storages that exist before the traced code (parameters, buffers, optimizer
        state): ops that write them in place create nothing."""
        for t in tensors:
            ref = self._ref(t.untyped_storage())
            self._known.add(ref.cdata)
            self._keep.append(ref)  # the address stays this storage's while the reference lives

    def _drop(self, keys: Iterable[int]) -> None:
        for k in keys:
            entry = self.live.get(k)
            if entry is not None and entry[0].expired():
                del self.live[k]
                self.events.append((entry[2], -entry[1]))

    def sweep(self) -> None:
        """Record the deaths of every storage that died (all of them checked)."""
        self._drop(list(self.live))

    def step(self, inputs: Sequence[torch.Tensor]) -> None:
        """Before an op: record the deaths among the likely dead (see the class docstring);
        ``inputs``: the tensors the coming op reads (suspects for the next step)."""
        self._ops += 1
        if self._ops % self.FULL_EVERY == 0:
            self.sweep()
        else:
            self._drop(set(self._young) | set(self._suspects))
        self._suspects = [self._ref(t.untyped_storage()).cdata for t in inputs]

    def add(self, tensors: Sequence[torch.Tensor]) -> None:
        born = 0
        for t in tensors:
            st = t.untyped_storage()
            ref = self._ref(st)
            if ref.cdata not in self.live and ref.cdata not in self._known:
                n = int(st.nbytes())
                self._serial += 1
                self.live[ref.cdata] = (ref, n, self._serial)
                self.events.append((self._serial, n))
                self._young.append(ref.cdata)
                born += 1
        self._born.append(born)
        if len(self._born) > self.YOUNG:
            del self._young[: self._born.pop(0)]

    def serial(self, t: torch.Tensor) -> Optional[int]:
        """The serial number of ``t``'s storage if the traced code created it and it lives."""
        entry = self.live.get(self._ref(t.untyped_storage()).cdata)
        return entry[2] if entry is not None and not entry[0].expired() else None

    def mark(self, name: str) -> None:
        """Remember this point of the timeline (e.g. the end of the forward pass)."""
        self.sweep()
        self.marks[name] = len(self.events)

    def live_bytes(self, at: str, exclude: Set[int] = frozenset()) -> int:  # type: ignore[assignment]
        """Bytes alive at mark ``at``, the storages whose serials are in ``exclude`` left out."""
        return sum(n for k, n in self.events[: self.marks[at]] if k not in exclude)

    def peak_bytes(self, until: str, exclude: Set[int] = frozenset()) -> int:  # type: ignore[assignment]
        """Most bytes alive at once up to mark ``until``, ``exclude`` as in live_bytes."""
        live = peak = 0
        for k, n in self.events[: self.marks[until]]:
            if k not in exclude:
                live += n
                peak = max(peak, live)
        return peak


class Tracer(TorchDispatchMode):
    """Records a KernelRecord per kernel launched while active.

    ``phase`` (forward, backward, optimizer) and ``region`` are set by the caller; the
    region says which class a generic elementwise op (add, mul, copy) belongs to.
    ``fused_namespaces``: the namespaces whose ops are this project's fused ops.
    """

    def __init__(self, fused_namespaces: Sequence[str] = FUSED_NAMESPACES, memory: bool = False) -> None:
        super().__init__()
        self.memory: Optional[LiveStorages] = LiveStorages() if memory else None
        self.records: List[KernelRecord] = []
        self.phase = "forward"
        self.region: List[str] = []
        self.ops_seen: Dict[str, int] = {}
        self.fused_namespaces = tuple(fused_namespaces)
        from torch.multiprocessing.reductions import StorageWeakRef

        self._storage_ref = StorageWeakRef
        self._ids: Dict[int, int] = {}
        self._refs: List[Any] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Sequence[Any] = (),
                           kwargs: Optional[Dict[str, Any]] = None) -> Any:
        kwargs = kwargs or {}
        if self.memory is not None:
            self.memory.step(_tensors((args, kwargs)))
        out = func(*args, **kwargs)
        if self.memory is not None:
            self.memory.add(_tensors(out))
        name = _op_name(func)
        if name in _NO_KERNEL or _namespace(func) in ("prim", "profiler") or _is_view(func):
            return out
        key = f"{_namespace(func)}.{name}"
        self.ops_seen[key] = self.ops_seen.get(key, 0) + 1
        self._record(func, key, name, args, kwargs, out)
        return out

    def _class(self, func: Any, name: str) -> str:
        if self.phase == "optimizer":
            return OPTIM
        if _namespace(func) in self.fused_namespaces:
            if _fused_base(name) in _FUSED_BN_OPS:
                return FUSED_BN
            return FUSED_UP if name.startswith("upsample_bilinear_add") else FUSED_ATT
        region = self.region[-1] if self.region else None
        if name in _GENERIC and region is not None:
            return {REGION_UPSAMPLE: UPSAMPLE, REGION_ATTEND: SIGMUL, REGION_BN: BN}[region]
        if name in _BY_NAME:
            return _BY_NAME[name]
        if name.startswith("_foreach"):
            return OPTIM
        if name in ("add", "add_"):
            return ADD
        return OTHER

    def _id(self, t: torch.Tensor) -> int:
        """A number for ``t``'s storage, unique over the trace (the weak reference kept
        here stops the address from being reused)."""
        ref = self._storage_ref(t.untyped_storage())
        sid = self._ids.get(ref.cdata)
        if sid is None:
            sid = self._ids[ref.cdata] = len(self._ids) + 1
            self._refs.append(ref)
        return sid

    def _emit(self, op: str, cls: str, flops: float, reads: Sequence[torch.Tensor], writes: Sequence[torch.Tensor],
              launches: int, dtype: str, matmul: bool, reduction: bool = False) -> None:
        rd = tuple((self._id(t), tensor_bytes(t)) for t in reads)
        wr = tuple((self._id(t), tensor_bytes(t)) for t in writes)
        self.records.append(KernelRecord(
            op=op, cls=cls, phase=self.phase, flops=flops, read_bytes=sum(b for _, b in rd),
            write_bytes=sum(b for _, b in wr), launches=launches, dtype=dtype, matmul=matmul,
            reads_io=rd, writes_io=wr, reduction=reduction))

    def _record(self, func: Any, key: str, name: str, args: Sequence[Any], kwargs: Dict[str, Any],
                out: Any) -> None:
        schema_args = func._schema.arguments
        mutated: List[torch.Tensor] = []
        reads: List[torch.Tensor] = []
        for i, a in enumerate(schema_args):
            val = args[i] if i < len(args) else kwargs.get(a.name)
            ts = _tensors(val)
            written = a.alias_info is not None and a.alias_info.is_write
            if written:
                mutated += ts
            if a.kwarg_only and a.name == "out":
                continue
            if written and name in _WRITE_ONLY_DEST:
                continue
            reads += ts
        writes = _unique(_tensors(out) + mutated)
        reads = _unique(reads)
        out_ts = _tensors(out)
        dtype = str(out_ts[0].dtype if out_ts else (reads[0].dtype if reads else torch.float32))
        flops = 0.0
        packet = func.overloadpacket
        if packet in flop_registry:
            flops = float(flop_registry[packet](*args, **kwargs, out_val=out))
        cls = self._class(func, name)
        launches = 1
        if name.startswith("_foreach"):
            lists = [v for v in args if isinstance(v, (list, tuple)) and v and isinstance(v[0], torch.Tensor)]
            launches = foreach_launches(lists)
        if name == "convolution_backward":
            self._conv_backward(key, cls, args, out, flops, dtype)
            return
        passes = _batch_norm_passes(name, _arguments(func, args, kwargs), out,
                                    _namespace(func) in self.fused_namespaces)
        if passes is not None:
            for suffix, rd, wr, n in passes:
                self._emit(f"{key} {suffix}".rstrip(), cls, 0.0, rd, wr, n, dtype, False,
                           reduction=suffix in ("(stats)", "(reduce)"))
            return
        self._emit(key, cls, flops, reads, writes, launches, dtype, packet in flop_registry,
                   reduction=name in _REDUCTIONS)

    def _conv_backward(self, key: str, cls: str, args: Sequence[Any], out: Any, flops: float,
                       dtype: str) -> None:
        """cuDNN runs a convolution's backward as two kernels: dgrad reads the output
        gradient and the weight and writes grad_input; wgrad reads the output gradient and
        the input and writes grad_weight. The FLOPs split evenly (each is one forward's)."""
        grad_out, inp, weight = args[0], args[1], args[2]
        grad_in, grad_w = out[0], out[1]
        parts = []
        if grad_in is not None:
            parts.append(("dgrad", [grad_out, weight], [grad_in]))
        if grad_w is not None:
            parts.append(("wgrad", [grad_out, inp], [grad_w]))
        if len(out) > 2 and out[2] is not None:
            parts.append(("bgrad", [grad_out], [out[2]]))
        conv_parts = [p for p in parts if p[0] != "bgrad"]
        for part, rd, wr in parts:
            self._emit(f"{key} ({part})", cls, flops / len(conv_parts) if part != "bgrad" else 0.0, rd, wr, 1,
                       dtype, part != "bgrad")


@contextlib.contextmanager
def _in_region(tracer: Tracer, region: str) -> Iterator[None]:
    tracer.region.append(region)
    try:
        yield
    finally:
        tracer.region.pop()


def _mark_backward(tracer: Tracer, outputs: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor],
                   region: str) -> None:
    """Put the backward of every autograd node between ``inputs`` and ``outputs`` in
    ``region`` (node pre-hooks enter it, node hooks leave it)."""
    stop = {t.grad_fn for t in inputs if isinstance(t, torch.Tensor) and t.grad_fn is not None}
    stack = [t.grad_fn for t in outputs if isinstance(t, torch.Tensor) and t.grad_fn is not None]
    seen: Set[Any] = set()
    while stack:
        node = stack.pop()
        if node is None or node in seen or node in stop or type(node).__name__ == "AccumulateGrad":
            continue
        seen.add(node)

        def enter(grad_outputs: Any) -> None:
            tracer.region.append(region)

        def leave(grad_inputs: Any, grad_outputs: Any) -> None:
            if tracer.region:
                tracer.region.pop()

        node.register_prehook(enter)
        node.register_hook(leave)
        stack.extend(f for f, _ in node.next_functions)


def mark_region(tracer: Tracer, fn: Callable[..., torch.Tensor], region: str) -> Callable[..., torch.Tensor]:
    """``fn`` wrapped so that its forward ops, and their backward, fall in ``region``."""

    def wrapped(*args: Any, **kwargs: Any) -> torch.Tensor:
        with _in_region(tracer, region):
            out = fn(*args, **kwargs)
        if torch.is_grad_enabled():
            _mark_backward(tracer, [out], _tensors((args, kwargs)), region)
        return out

    return wrapped


def region_of_module(tracer: Tracer, module: torch.nn.Module, region: str) -> List[Any]:
    """Forward hooks putting ``module``'s forward ops in ``region``; returns the handles."""

    def pre(mod: torch.nn.Module, args: Any) -> None:
        tracer.region.append(region)

    def post(mod: torch.nn.Module, args: Any, out: Any) -> None:
        tracer.region.pop()

    return [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
