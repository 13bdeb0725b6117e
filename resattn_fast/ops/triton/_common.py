"""Helpers shared by the Triton kernels of both ops (host side and ``@triton.jit``).

Host side: autotune config lists (one config under TRITON_INTERPRET=1, so the CPU
interpreter never benchmarks), the 64-bit index decision, layout helpers and the
``triton_op`` registration keywords. Device side: the float32/float64 accumulation cast.
"""

import contextlib
import inspect
import os
from typing import Any, Callable, ContextManager, Dict, List, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake

__all__ = [
    "INTERPRETED",
    "acc",
    "configs",
    "dense_like",
    "device_guard",
    "flat_grid",
    "needs_fake",
    "needs_int64",
    "opaque_when_interpreted",
    "same_layout",
    "size_class",
    "triton_op_kwargs",
]

# The interpreter runs every program in numpy on the CPU: autotuning there would only
# multiply the (slow) runs, so it gets a single, large block.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

_INT32_LIMIT = 2**31 - 1


def configs(gpu: Sequence[Tuple[int, int]], interpreted_block: int) -> List[triton.Config]:
    """``triton.Config({"BLOCK": b}, num_warps=w)`` for each (b, w) of ``gpu``; a single
    config of ``interpreted_block`` under TRITON_INTERPRET=1."""
    if INTERPRETED:
        return [triton.Config({"BLOCK": interpreted_block}, num_warps=4)]
    return [triton.Config({"BLOCK": b}, num_warps=w) for b, w in gpu]


def _span(t: torch.Tensor) -> int:
    """One past the largest element offset ``t`` addresses (its extent in elements)."""
    if t.numel() == 0:
        return 0
    return 1 + sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride()))


def needs_int64(*tensors: torch.Tensor) -> bool:
    """True if an element offset into any of ``tensors`` (or an element count) can pass
    2**31 - 1: the kernels then do their index math in int64 (int32 is faster otherwise)."""
    return any(max(_span(t), t.numel()) > _INT32_LIMIT for t in tensors)


def same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape and the same strides on every dimension longer than 1 (the strides of
    size-1 dimensions never matter for addressing)."""
    if a.shape != b.shape:
        return False
    return all(s == 1 or sa == sb for s, sa, sb in zip(a.shape, a.stride(), b.stride()))


def dense_like(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``t`` laid out exactly like ``ref`` (a freshly allocated, dense tensor): ``t``
    itself when it already is, else a copy. Lets an elementwise kernel walk all its
    operands with one flat offset."""
    if same_layout(t, ref):
        return t
    out = torch.empty_like(ref)
    out.copy_(t)
    return out


def triton_op_kwargs(schema: str) -> Dict[str, Any]:
    """Keywords for ``torch.library.triton_op``: ``mutates_args=()`` and the explicit
    ``schema`` where this torch accepts one (newer than 2.6); older versions infer the
    schema from the annotations (``int[]`` then reads ``SymInt[]``, which accepts the
    same calls)."""
    kwargs: Dict[str, Any] = {"mutates_args": ()}
    if "schema" in inspect.signature(torch.library.triton_op).parameters:
        kwargs["schema"] = schema
    return kwargs


def needs_fake(op: Any) -> bool:
    """Whether ``op`` (a ``triton_op``) still needs the fake kernels of ``_registry``.

    ``triton_op`` registers the decorated function itself as the fake kernel (it must be
    traceable: torch ops plus ``wrap_triton`` launches, which do nothing on fake tensors),
    so nothing is needed where it does that; a torch that did not would get the shared
    fakes, which describe the same shapes, dtypes and layouts."""
    return getattr(op, "_abstract_fn", None) is None


def opaque_when_interpreted(op: Any) -> None:
    """Under TRITON_INTERPRET=1, keep ``op`` (a ``triton_op``) one opaque node in the graphs
    that AOTDispatcher (torch.compile, opcheck) traces, as a plain custom op is.

    A ``triton_op`` is decomposed into its body there, so that the compiled graph holds
    its ``wrap_triton`` launches; an interpreted kernel cannot be recorded that way (the
    graph would hold the allocations only). Kept whole, the op runs its kernels, under
    the interpreter, when the graph runs. Compiled (a GPU), nothing changes."""
    if not INTERPRETED:
        return
    from torch._subclasses.functional_tensor import FunctionalTensorMode

    def keep_whole(mode: Any, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
        # What triton_op itself does when custom_triton_ops decomposition is disabled.
        return mode.__torch_dispatch__(func, types, args, kwargs)

    op.register_torch_dispatch(FunctionalTensorMode, keep_whole)


def size_class(n: int) -> int:
    """The autotune size class of ``n`` elements: the next power of two (>= 1).

    The kernels take it as an extra, unused argument that is in the autotune key instead
    of the exact element count, so a new shape of the same class (another batch size, as
    the max-batch search tries) reuses the tuned config instead of benchmarking all of
    them again. It is never specialized on (``do_not_specialize``), so it adds no compiled
    variant."""
    return 1 << max(0, int(n) - 1).bit_length()


def device_guard(t: torch.Tensor) -> ContextManager[Any]:
    """Make ``t``'s GPU the current device for a kernel launch (Triton launches on the
    current device; the C++ launchers use a CUDAGuard for the same reason). A no-op for
    CPU tensors (the interpreter) and for fake tensors (torch.compile and opcheck trace the
    op body on them, where ``wrap_triton`` launches nothing: no device is touched, so
    tracing needs no GPU)."""
    if t.device.type == "cuda" and not is_fake(t):
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def flat_grid(n: int) -> Callable[[Dict[str, Any]], Tuple[int]]:
    """Launch grid for one program per ``BLOCK`` of ``n`` elements (``BLOCK`` autotuned)."""
    return lambda meta: (triton.cdiv(n, meta["BLOCK"]),)


@triton.jit
def acc(v, IS_FP64: tl.constexpr):
    """Cast a loaded value to the accumulation type: float64 for float64 tensors, float32
    for everything else (half types compute in float32 and round once, at the store)."""
    # tl.cast (not .to) also accepts plain ints: Triton turns integer arguments equal to 1
    # into compile-time constants.
    if IS_FP64:
        return tl.cast(v, tl.float64)
    else:
        return tl.cast(v, tl.float32)
