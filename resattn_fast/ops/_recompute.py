"""Selective recomputation of the fused BN-ReLU outputs (``set_grad_checkpointing("selective")``).

Inside ``selective_recompute()`` every output of the fused ``batch_norm_relu`` is
registered with a recipe: its input x, weight, bias, the per-channel mean and variance it
normalised with, and the op that computes it. A saved-tensors hook then packs any saved
tensor that *is* such an output (in practice: the input a convolution keeps for its weight
gradient) as that recipe instead of the tensor, and unpacking recomputes it in one pass
over x with the statistics given (the eval-mode kernel evaluates the very expression the
training-mode kernel did, so the bits are the same). The convolution never reruns, no
running statistic is touched, and everything the recipe holds is kept anyway by the
BN-ReLU op's own backward (x and the statistics).

Why saved-tensor hooks rather than torch.utils.checkpoint with a selective policy: the
policy can only save or rerun whole ops, and rerunning ``batch_norm_relu`` in training mode
would compute the statistics again (one more pass over x, and a running-statistics update
to suppress); the hook recomputes only the normalise+ReLU pass, from the statistics the
forward pass already produced.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, Dict, Iterator, Tuple

import torch
from torch.multiprocessing.reductions import StorageWeakRef

__all__ = ["selective_recompute", "offer", "active"]


class _State(threading.local):
    def __init__(self) -> None:
        self.depth = 0
        self.recipes: Dict[Tuple[Any, ...], _Recipe] = {}


_state = _State()


class _Recipe:
    """How to compute a saved BN-ReLU output again (holds only what its op saves anyway)."""

    __slots__ = ("compute", "version")

    def __init__(self, compute: Callable[[], torch.Tensor], version: int) -> None:
        self.compute = compute
        self.version = version


def _key(t: torch.Tensor) -> Tuple[Any, ...]:
    # The storage by a weak reference, not its address: once a registered output is packed
    # as a recipe nothing holds it, its memory is freed and may come back for another
    # tensor of the same shape; a weak reference keeps the storage object (not its memory)
    # from being reused, so a later tensor never matches a stale recipe.
    return (StorageWeakRef(t.untyped_storage()), t.storage_offset(), tuple(t.shape), t.stride(),
            t.dtype)


def active() -> bool:
    """Whether outputs are being registered (inside ``selective_recompute()``)."""
    return _state.depth > 0


def offer(out: torch.Tensor, compute: Callable[[], torch.Tensor]) -> None:
    """Register ``out`` as recomputable by ``compute()`` (no-op outside the context)."""
    if _state.depth > 0 and out.numel() > 0:
        _state.recipes[_key(out)] = _Recipe(compute, out._version)


def _pack(t: torch.Tensor) -> Any:
    if _state.recipes and isinstance(t, torch.Tensor) and t.numel() > 0:
        recipe = _state.recipes.get(_key(t))
        if recipe is not None and recipe.version == t._version:
            return recipe
    return t


def _unpack(packed: Any) -> torch.Tensor:
    if isinstance(packed, _Recipe):
        with torch.no_grad():
            return packed.compute()
    return packed


@contextlib.contextmanager
def selective_recompute() -> Iterator[None]:
    """Run a block so that the BN-ReLU outputs it saves for backward are recomputed there."""
    outer = _state.recipes
    _state.depth += 1
    _state.recipes = {}
    try:
        with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
            yield
    finally:
        _state.depth -= 1
        _state.recipes = outer
