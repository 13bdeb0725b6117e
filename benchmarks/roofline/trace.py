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
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

__all__ = [
    "CLASSES",
    "SOFT_MASK_CLASSES",
    "KernelRecord",
    "Tracer",
    "tensor_bytes",
    "foreach_launches",
    "mark_region",
    "region_of_module",
]

aten = torch.ops.aten

# Op classes, in the order the report shows them.
CONV, BN, RELU, POOL, UPSAMPLE, ADD, SIGMUL = (
    "convolution", "batch norm", "ReLU", "max-pool", "upsample", "add", "sigmoid/multiply")
FUSED_UP, FUSED_ATT, OPTIM, CAST, OTHER = (
    "fused upsample-add", "fused attention-residual", "optimizer", "cast (AMP)", "other")
CLASSES = (CONV, BN, RELU, POOL, UPSAMPLE, ADD, SIGMUL, FUSED_UP, FUSED_ATT, OPTIM, CAST, OTHER)
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


def _batch_norm_running_stats(name: str, args: Sequence[Any], reads: List[torch.Tensor],
                              mutated: List[torch.Tensor]) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """native_batch_norm's schema does not mark the running statistics it updates in
    training as written; its backward in training reads the saved batch statistics, not
    the running ones that its schema lists."""
    if name == "native_batch_norm" and len(args) > 5 and args[5]:
        mutated = mutated + [t for t in args[3:5] if isinstance(t, torch.Tensor)]
    elif name == "native_batch_norm_backward" and len(args) > 7 and args[7]:
        running = {id(t) for t in args[3:5] if isinstance(t, torch.Tensor)}
        reads = [t for t in reads if id(t) not in running]
    return reads, mutated


def _is_view(func: Any) -> bool:
    if getattr(func, "is_view", False):
        return True
    return getattr(func, "overloadpacket", None) in _TORCH_VIEW_OPS


class Tracer(TorchDispatchMode):
    """Records a KernelRecord per kernel launched while active.

    ``phase`` (forward, backward, optimizer) and ``region`` are set by the caller; the
    region says which class a generic elementwise op (add, mul, copy) belongs to.
    """

    def __init__(self) -> None:
        super().__init__()
        self.records: List[KernelRecord] = []
        self.phase = "forward"
        self.region: List[str] = []
        self.ops_seen: Dict[str, int] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: Sequence[Any] = (),
                           kwargs: Optional[Dict[str, Any]] = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
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
        if _namespace(func) == "resattn_fast":
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
        reads, mutated = _batch_norm_running_stats(name, args, reads, mutated)
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
        self.records.append(KernelRecord(
            op=key, cls=cls, phase=self.phase, flops=flops,
            read_bytes=sum(tensor_bytes(t) for t in reads),
            write_bytes=sum(tensor_bytes(t) for t in writes),
            launches=launches, dtype=dtype, matmul=packet in flop_registry))

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
            self.records.append(KernelRecord(
                op=f"{key} ({part})", cls=cls, phase=self.phase,
                flops=flops / len(conv_parts) if part != "bgrad" else 0.0,
                read_bytes=sum(tensor_bytes(t) for t in rd), write_bytes=sum(tensor_bytes(t) for t in wr),
                launches=1, dtype=dtype, matmul=part != "bgrad"))


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
