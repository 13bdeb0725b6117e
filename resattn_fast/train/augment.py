"""Reproducible torchvision augmentation: per-sample transforms and batch mixing.

torchvision's ``transforms.v2`` draw their randomness from the global torch RNG. To keep
augmentation a function of ``(seed, epoch, index)`` alone — what makes ``--resume`` exact
and DDP take the same steps whatever the number of ranks or DataLoader workers — every
call runs under :func:`seeded`, which forks the CPU RNG, seeds it with a key mixed from
those numbers, and restores it afterwards (the global RNG is left as it was).

Batch mixing (``--mixup`` / ``--cutmix``, torchvision's ``v2.MixUp`` / ``v2.CutMix``) is
keyed by ``(seed, epoch, batch index, rank)``: each rank mixes its own part of the global
batch, as timm does.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional, Tuple

import torch

__all__ = ["seed_key", "seeded", "run_seeded", "BatchMix", "randaugment", "hard_labels", "describe"]


def seed_key(*parts: int) -> int:
    """A fixed mixing of integers into one 63-bit seed (the same on every platform)."""
    key = 0
    for p in parts:
        key = (key * 1_000_003 + int(p)) * 2_147_483_647 % (2**63 - 1)
    return key


@contextmanager
def seeded(key: int) -> Iterator[None]:
    """Run the body with the CPU RNG seeded by ``key``; restore the RNG afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(key)
        yield


def run_seeded(fn: Callable[..., Any], key: int, *args: Any) -> Any:
    """``fn(*args)`` with the CPU RNG seeded by ``key`` (see :func:`seeded`)."""
    with seeded(key):
        return fn(*args)


def randaugment(magnitude: int, num_ops: int = 2) -> Any:
    """torchvision's RandAugment (Cubuk et al. 2020) with ``num_ops`` operations of
    ``magnitude`` (0..30, torchvision's scale of 31 bins)."""
    from torchvision.transforms import v2

    return v2.RandAugment(num_ops=num_ops, magnitude=magnitude)


class BatchMix:
    """MixUp and/or CutMix of a training batch, reproducible from (seed, epoch, batch, rank).

    Args:
        mixup, cutmix: Beta(alpha, alpha) parameters; 0 turns that one off. With both on,
            each batch uses one of them, chosen with probability 1/2 (timm's default).
        num_classes: classifier outputs (labels become (N, num_classes) float targets).

    Call: ``(x (N, 3, S, S) float32, y (N,) int64, batch_index) -> (x mixed, y (N, C)
    float32)``; the cross-entropy takes the soft targets as they are.
    """

    def __init__(self, mixup: float, cutmix: float, num_classes: int, seed: int,
                 rank: int = 0) -> None:
        from torchvision.transforms import v2

        choices = []
        if mixup > 0:
            choices.append(v2.MixUp(alpha=float(mixup), num_classes=num_classes))
        if cutmix > 0:
            choices.append(v2.CutMix(alpha=float(cutmix), num_classes=num_classes))
        if not choices:
            raise ValueError("BatchMix needs mixup > 0 or cutmix > 0")
        self.transform = choices[0] if len(choices) == 1 else v2.RandomChoice(choices)
        self.seed, self.rank, self.epoch = int(seed), int(rank), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __call__(self, x: torch.Tensor, y: torch.Tensor,
                 batch_index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        key = seed_key(self.seed, self.epoch, batch_index, self.rank, 7)
        return run_seeded(self.transform, key, x, y)


def hard_labels(y: torch.Tensor) -> torch.Tensor:
    """(N,) class indices from (N,) labels or (N, C) soft targets (their argmax)."""
    return y.argmax(1) if y.dim() == 2 else y


def describe(mixup: float, cutmix: float, label_smoothing: float,
             randaugment_m: Optional[int]) -> str:
    """A short text of the regularisers in use ('' when none)."""
    parts = []
    if mixup > 0:
        parts.append(f"mixup {mixup:g}")
    if cutmix > 0:
        parts.append(f"cutmix {cutmix:g}")
    if label_smoothing > 0:
        parts.append(f"label smoothing {label_smoothing:g}")
    if randaugment_m is not None:
        parts.append(f"RandAugment m{randaugment_m}")
    return ", ".join(parts)
