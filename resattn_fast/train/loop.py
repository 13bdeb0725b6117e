"""The training and evaluation loops: AMP, channels-last, NaN detection, stop requests.

One training step is forward (under autocast), backward (through the AMP scaler), a
check that the loss is finite on every rank and that no rank was asked to stop (one small
all-reduce), then the optimizer and per-iteration scheduler step. The check comes before
``optimizer.step()``, so a non-finite loss never reaches the weights.
"""

from __future__ import annotations

import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

import torch
import torch.nn as tnn

from . import distributed
from .augment import hard_labels
from .progress import Progress

__all__ = ["Trainer", "StopFlag", "NonFiniteLoss", "EpochStats", "make_criterion"]


class NonFiniteLoss(Exception):
    """The training loss was NaN or infinite on some rank."""


def make_criterion(label_smoothing: float = 0.0) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The training loss: mean cross-entropy over the (local) batch, with class indices
    (N,) or soft targets (N, C) (mixup/cutmix) and optional label smoothing."""
    return tnn.CrossEntropyLoss(label_smoothing=label_smoothing)


class StopFlag:
    """Turns SIGTERM/SIGINT into a request to stop at the next step boundary.

    A second SIGINT while a stop is pending raises KeyboardInterrupt at once (the usual
    "press Ctrl-C twice" escape hatch). Handlers are installed only by the main thread.
    """

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._saved: Dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def install(self) -> StopFlag:
        for s in (signal.SIGTERM, signal.SIGINT):
            try:
                self._saved[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread (e.g. inside a test harness)
                pass
        return self

    def restore(self) -> None:
        for s, h in self._saved.items():
            signal.signal(s, h)
        self._saved.clear()

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""


@dataclass
class EpochStats:
    """Sums over the samples seen so far in an epoch (global after :meth:`reduce`)."""

    loss_sum: float = 0.0
    correct: float = 0.0
    count: float = 0.0
    seconds: float = 0.0

    def add(self, other: EpochStats) -> None:
        self.loss_sum += other.loss_sum
        self.correct += other.correct
        self.count += other.count
        self.seconds += other.seconds

    def reduce(self, device: torch.device) -> EpochStats:
        """Sum loss, correct and count across ranks; seconds is the slowest rank's."""
        t = torch.tensor([self.loss_sum, self.correct, self.count], dtype=torch.float64, device=device)
        distributed.all_reduce(t, "sum")
        s = torch.tensor([self.seconds], dtype=torch.float64, device=device)
        distributed.all_reduce(s, "max")
        return EpochStats(float(t[0]), float(t[1]), float(t[2]), float(s[0]))

    @property
    def loss(self) -> float:
        return self.loss_sum / max(1.0, self.count)

    @property
    def acc(self) -> float:
        return self.correct / max(1.0, self.count)

    def as_dict(self) -> Dict[str, float]:
        return {"loss_sum": self.loss_sum, "correct": self.correct, "count": self.count,
                "seconds": self.seconds}

    @classmethod
    def from_dict(cls, d: Optional[Dict[str, float]]) -> EpochStats:
        if not d:
            return cls()
        return cls(float(d["loss_sum"]), float(d["correct"]), float(d["count"]), float(d["seconds"]))


def _at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """Autocast logits (float16/bfloat16) go to float32 for the loss; float64 stays."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


class Trainer:
    """Runs training steps and evaluation for ``model`` (possibly DDP- and/or
    compile-wrapped) on ``device``.

    Args:
        amp_dtype: torch.bfloat16 / torch.float16 for autocast, None for float32.
        scaler: a torch.amp.GradScaler (enabled for float16 on CUDA only).
        channels_last: feed inputs as channels_last (N, C, H, W) tensors.
        label_smoothing: of the training loss (evaluation uses plain cross-entropy).
        batch_mix: ``(x, y, batch_index) -> (x, soft y)`` applied to each training batch
            (mixup/cutmix, :class:`.augment.BatchMix`), or None.
    """

    def __init__(self, model: tnn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: Any,
                 device: torch.device, *, amp_dtype: Optional[torch.dtype] = None,
                 channels_last: bool = False, stop: Optional[StopFlag] = None,
                 label_smoothing: float = 0.0,
                 batch_mix: Optional[Callable[[torch.Tensor, torch.Tensor, int],
                                              Tuple[torch.Tensor, torch.Tensor]]] = None) -> None:
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.scaler = scaler
        self.device = device
        self.amp_dtype = amp_dtype
        self.channels_last = channels_last
        self.stop = stop or StopFlag()
        # Called without an argument when smoothing is off, so that a replacement factory
        # taking none (the fault-injection tests use one) still fits.
        self.criterion = (make_criterion(label_smoothing) if label_smoothing
                          else make_criterion())
        self.batch_mix = batch_mix
        self.last_lr = float(optimizer.param_groups[0]["lr"])  # lr of the latest step

    def _autocast(self) -> Any:
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _inputs(self, x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x = x.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y.to(self.device, non_blocking=True)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> Tuple[float, float, bool]:
        """One optimisation step on the local batch (N, 3, S, S) float32 and labels (N,)
        int64 or soft targets (N, C) float32 (accuracy then counts their argmax).

        Returns (mean loss, number correct, stop requested on some rank). Raises
        NonFiniteLoss (before the optimizer step) if the loss is not finite on some rank.
        """
        x, y = self._inputs(x, y)
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            logits = self.model(x)
        loss = self.criterion(_at_least_float32(logits), y)
        self.scaler.scale(loss).backward()
        flags = torch.stack([(~torch.isfinite(loss.detach())).to(torch.float32),
                             torch.tensor(float(self.stop.requested), device=loss.device)])
        distributed.all_reduce(flags, "max")
        bad, stop = flags.tolist()
        if bad > 0:
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLoss(f"loss is {loss.item()} on this rank")
        self.last_lr = float(self.optimizer.param_groups[0]["lr"])
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        correct = (logits.detach().argmax(1) == hard_labels(y)).sum()
        return float(loss.detach()), float(correct), stop > 0

    def train_epoch(self, loader: Iterable, *, total: int, start: int, desc: str,
                    progress: bool, log_every: int) -> Tuple[EpochStats, int, bool]:
        """Train over ``loader`` (which yields batches start+1 .. total of the epoch).

        Returns (local stats, batches done in the epoch, stopped early on request).
        """
        self.model.train()
        stats = EpochStats()
        bar = Progress(desc, total, enabled=progress, log_every=log_every)
        done = start
        t0 = time.perf_counter()
        stopped = False
        try:
            it = iter(loader)
            while done < total:
                try:
                    x, y = next(it)
                except StopIteration:
                    break
                n = int(y.shape[0])
                if self.batch_mix is not None:
                    x, y = self.batch_mix(x, y, done)
                loss, correct, stop = self.train_step(x, y)
                done += 1
                stats.loss_sum += loss * n
                stats.correct += correct
                stats.count += n
                bar.update(done, int(stats.count), stats.loss, stats.acc)
                if stop:
                    stopped = True
                    break
        finally:
            bar.close()
        stats.seconds = time.perf_counter() - t0
        return stats, done, stopped

    @torch.no_grad()
    def evaluate(self, model: tnn.Module, loader: Iterable) -> Tuple[EpochStats, bool]:
        """Loss and accuracy of ``model`` (unwrapped: no DDP collectives) over ``loader``,
        summed across ranks. Returns (global stats, stopped early on request)."""
        model.eval()
        stats = EpochStats()
        t0 = time.perf_counter()
        stopped = False
        for x, y in loader:
            if self.stop.requested:
                stopped = True
                break
            x, y = self._inputs(x, y)
            with self._autocast():
                logits = model(x)
            stats.loss_sum += float(torch.nn.functional.cross_entropy(_at_least_float32(logits), y,
                                                                      reduction="sum"))
            stats.correct += float((logits.argmax(1) == y).sum())
            stats.count += int(y.shape[0])
        stats.seconds = time.perf_counter() - t0
        flag = torch.tensor([float(stopped)], device=self.device)
        distributed.all_reduce(flag, "max")
        return stats.reduce(self.device), bool(flag.item() > 0)
