"""Memory of a training step, measured by following every tensor storage it creates.

``LiveBytes`` is a ``TorchDispatchMode``: every aten op and every custom op
(``torch.ops.resattn_fast.*``) that runs while it is active passes through it, in the
forward pass, in backward, in the recomputations of ``torch.utils.checkpoint`` and of the
selective mode, and in the optimizer step. Each output whose storage is not one of the
op's inputs (not a view, not an in-place result) is a new allocation: its bytes are added
to the live total, and a weak reference to the storage subtracts them when the storage is
freed. So ``live`` is the bytes of the storages created since the mode was entered and
still alive, and ``peak`` its maximum.

Why not the alternatives: saved-tensor hooks see what autograd saves outside checkpointed
regions only (inside, the checkpoint's own hooks take over), and they cannot see a tensor
that is dropped and recomputed; the profiler's CPU memory events did not add up; the
resident memory of the process depends on the allocator returning pages. Following the
storages is exact for what the tensors hold, on any device, with no GPU needed. What it
does not see: temporary buffers a kernel allocates and frees inside one op (oneDNN
scratch space, for example) and allocator overhead; both are small beside activations.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Optional, Set, Tuple

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["LiveBytes", "StepMemory", "storage_bytes", "train_step_memory"]


def _storage(t: Any) -> Optional[torch.UntypedStorage]:
    if not isinstance(t, torch.Tensor):
        return None
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # tensors without a storage (sparse, nested)
        return None


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages allocated while active and still alive (``live``), their
    maximum (``peak``), and the total allocated (``allocated``). Usable on its own:

        with LiveBytes() as mem:
            loss = model(x).sum()
            kept = mem.live          # activations kept for backward (and the loss)
            loss.backward()
        mem.peak
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self.allocated = 0
        self._held: Dict[int, Tuple[weakref.ref, int]] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: Tuple[Any, ...] = (),
                           kwargs: Optional[Dict[str, Any]] = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs: Optional[Set[int]] = None
        for t in tree_leaves(out):
            st = _storage(t)
            if st is None or id(st) in self._held:
                continue
            if inputs is None:  # views and in-place results share an input's storage
                inputs = {id(s) for s in map(_storage, tree_leaves((args, kwargs))) if s is not None}
            if id(st) not in inputs:
                self._track(st)
        return out

    def _track(self, st: torch.UntypedStorage) -> None:
        n = st.nbytes()
        if n == 0:
            return
        key = id(st)
        self._held[key] = (weakref.ref(st, lambda _ref, key=key: self._freed(key)), n)
        self.live += n
        self.allocated += n
        self.peak = max(self.peak, self.live)

    def _freed(self, key: int) -> None:
        held = self._held.pop(key, None)
        if held is not None:
            self.live -= held[1]


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views and repeats counted once)."""
    seen: Dict[int, int] = {}
    for t in tensors:
        st = _storage(t)
        if st is not None:
            seen[st.data_ptr() or id(st)] = st.nbytes()
    return sum(seen.values())


@dataclass(frozen=True)
class StepMemory:
    """One training step: bytes alive at the end of the forward pass that it allocated
    (``activations``: what backward keeps, plus the logits and the loss), and the peak of
    the whole step (``peak``: the model's parameters, buffers, optimizer state and the batch,
    plus the most that the step's own allocations ever held at once: activations,
    gradients, recomputed tensors, temporaries of autograd)."""

    activations: int
    peak: int
    resident: int  # parameters, buffers, optimizer state and the batch, before the step


def train_step_memory(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                      optimizer: torch.optim.Optimizer,
                      autocast: Optional[Callable[[], contextlib.AbstractContextManager]] = None,
                      run: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> StepMemory:
    """Run one training step (forward, cross-entropy, backward, optimizer step, gradients
    set to None) under :class:`LiveBytes` and return its memory."""
    run = run or model
    state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    resident = storage_bytes([*model.parameters(), *model.buffers(), *grads, *state, x, y])
    ctx = autocast or contextlib.nullcontext
    with LiveBytes() as mem:
        with ctx():
            loss = F.cross_entropy(run(x), y)
        activations = mem.live
        loss.backward()
        del loss
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return StepMemory(activations=activations, peak=resident + mem.peak, resident=resident)

