"""Memory-format helper shared by the reference ops, the fake kernels and the modules."""

from __future__ import annotations

import torch
from torch._prims_common import suggest_memory_format

__all__ = ["memory_format_of"]


def memory_format_of(t: torch.Tensor) -> torch.memory_format:
    """channels_last if ``t`` is laid out so (as ATen's suggest_memory_format decides),
    else contiguous_format: the format a result that "follows ``t``" takes."""
    if t.dim() == 4 and suggest_memory_format(t) == torch.channels_last:
        return torch.channels_last
    return torch.contiguous_format
