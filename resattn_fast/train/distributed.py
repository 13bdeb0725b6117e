"""Distributed training under torchrun: process group, samplers, metric reduction, SyncBN.

``torchrun --nproc_per_node=K -m resattn_fast train ...`` sets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT; :func:`setup` reads them and joins the group
with NCCL on GPUs and gloo on CPUs. Without them (a plain ``resattn train``) the run is a
single process and no process group is created.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as tnn
from torch.utils.data import Sampler

from ..errors import UsageError

__all__ = ["DistInfo", "setup", "cleanup", "all_reduce", "barrier", "EpochSampler",
           "ShardSampler", "GroupSyncBatchNorm", "convert_sync_batchnorm"]


@dataclass
class DistInfo:
    """Where this process sits: rank among world_size processes, its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def setup(device: str = "auto") -> DistInfo:
    """Join the torchrun process group if there is one and pick this process's device.

    Args:
        device: "auto" (cuda:LOCAL_RANK when a GPU is visible, else cpu), "cpu" or "cuda".
    """
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if device not in ("auto", "cpu", "cuda"):
        raise UsageError(f"--device {device!r}: choose auto, cpu or cuda")
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is visible (torch.cuda.is_available() is False)")
    if use_cuda:
        n = torch.cuda.device_count()
        if world > 1 and local_rank >= n:
            raise UsageError(f"torchrun started {local_rank + 1}+ processes on this node but only "
                             f"{n} GPU(s) are visible; use --nproc_per_node={n}")
        dev = torch.device("cuda", local_rank % n)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", init_method="env://",
                                rank=rank, world_size=world)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def cleanup() -> None:
    """Leave the process group (if any)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (sum or max) of ``t`` across ranks; a no-op in one process."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


class EpochSampler(Sampler[int]):
    """Training sampler: a permutation drawn from (seed, epoch), cut into whole global
    batches (the incomplete last one is dropped: batch norm needs more than one sample),
    each global batch split into ``num_replicas`` consecutive per-rank parts.

    With K ranks of batch B/K, rank r's i-th batch is exactly the r-th K-th of what one
    process with batch B sees as its i-th batch, so DDP takes the same steps as one process.
    ``start_batch`` skips the first batches of the epoch (mid-epoch resume).
    """

    def __init__(self, size: int, global_batch: int, num_replicas: int = 1, rank: int = 0,
                 seed: int = 0, shuffle: bool = True) -> None:
        if global_batch % num_replicas:
            raise ValueError("global_batch must be divisible by num_replicas")
        self.size, self.global_batch = size, global_batch
        self.num_replicas, self.rank = num_replicas, rank
        self.local_batch = global_batch // num_replicas
        self.seed, self.shuffle = seed, shuffle
        self.epoch = 0
        self.start_batch = 0

    @property
    def batches_per_epoch(self) -> int:
        return self.size // self.global_batch

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def _order(self) -> List[int]:
        if not self.shuffle:
            return list(range(self.size))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.size, generator=g).tolist()

    def __iter__(self) -> Iterator[int]:
        order = self._order()
        for b in range(self.start_batch, self.batches_per_epoch):
            lo = b * self.global_batch + self.rank * self.local_batch
            yield from order[lo:lo + self.local_batch]

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.local_batch


class ShardSampler(Sampler[int]):
    """Evaluation sampler: rank r takes indices r, r + K, r + 2K, ... — every sample once
    across ranks, no padding (the metrics are summed across ranks afterwards)."""

    def __init__(self, size: int, num_replicas: int = 1, rank: int = 0) -> None:
        self.size, self.num_replicas, self.rank = size, num_replicas, rank

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.size, self.num_replicas))

    def __len__(self) -> int:
        return max(0, math.ceil((self.size - self.rank) / self.num_replicas))


class _AllReduceSum(torch.autograd.Function):
    """Differentiable all-reduce (sum): every rank's output depends on every rank's input,
    so the gradient of an input is the all-reduced sum of the output gradients."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
        ctx.group = group
        out = t.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Tuple[torch.Tensor, None]:
        return _AllReduceSum.apply(grad, ctx.group), None


class GroupSyncBatchNorm(tnn.BatchNorm2d):
    """Batch norm whose training statistics are taken over the whole global batch, on any
    device and process-group backend (torch's SyncBatchNorm runs on GPUs only; this one
    is what ``--sync-bn`` uses on the CPU with gloo).

    Per-channel sum, sum of squares and count are all-reduced with a differentiable
    all-reduce, so the backward pass is exact too.
    Statistics are accumulated in float64. Input (N, C, H, W), any memory format.
    """

    process_group: Optional[dist.ProcessGroup] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        self._check_input_dim(x)
        xs = x.double()
        count = torch.full((1,), x.numel() / x.shape[1], dtype=torch.float64, device=x.device)
        stats = torch.cat([xs.sum(dim=(0, 2, 3)), (xs * xs).sum(dim=(0, 2, 3)), count])
        stats = _AllReduceSum.apply(stats, self.process_group)
        c = x.shape[1]
        n = stats[2 * c]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean * mean).clamp_min(0)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * (n / (n - 1).clamp_min(1))
                self.running_mean.mul_(1 - m).add_(mean.to(self.running_mean.dtype), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)
        inv = torch.rsqrt(var + self.eps)
        w = self.weight.double() if self.weight is not None else torch.ones_like(mean)
        b = self.bias.double() if self.bias is not None else torch.zeros_like(mean)
        scale = (w * inv).to(x.dtype)
        shift = (b - mean * w * inv).to(x.dtype)
        return x * scale.view(1, c, 1, 1) + shift.view(1, c, 1, 1)


def convert_sync_batchnorm(model: tnn.Module, device: torch.device) -> tnn.Module:
    """Replace every BatchNorm2d by a synchronised one: torch's SyncBatchNorm on CUDA,
    :class:`GroupSyncBatchNorm` elsewhere. Parameters and buffers are kept (same
    state_dict keys)."""
    if device.type == "cuda":
        return tnn.SyncBatchNorm.convert_sync_batchnorm(model)
    for module in model.modules():
        if type(module) is tnn.BatchNorm2d:
            module.__class__ = GroupSyncBatchNorm
    return model

