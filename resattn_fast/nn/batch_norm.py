"""A BatchNorm2d module followed by ReLU, on the fused ``ops.batch_norm_relu``.

``bn_relu(bn, x)`` computes ``relu(bn(x))`` with the module's own parameters, buffers and
flags, exactly as ``nn.BatchNorm2d.forward`` would (num_batches_tracked, momentum=None's
cumulative average, track_running_stats=False, affine=False, eval mode), so the fast
modules keep the reference's BatchNorm2d submodules and state_dict unchanged.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn as tnn
import torch.nn.functional as F

from .. import ops

__all__ = ["bn_relu"]


def bn_relu(bn: tnn.Module, x: torch.Tensor, *, identity: bool = False,
            backend: Optional[str] = None) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """``relu(bn(x))`` (and ``x`` itself when ``identity``) on the fused op.

    Args:
        bn: an ``nn.BatchNorm2d``. Any other module (``nn.SyncBatchNorm`` after
            ``convert_sync_batchnorm``, a frozen or custom norm) is run as it is, followed
            by ``F.relu``: the fused op never replaces a norm it does not implement.
        x: (N, C, H, W).
        identity: also return ``x`` for the unit's identity shortcut, whose gradient the
            fused backward then adds in its apply pass.
        backend: the fused op's backend (None: fastest for x's device).
    """
    if type(bn) is not tnn.BatchNorm2d:
        out = F.relu(bn(x))
        return (out, x) if identity else out
    bn._check_input_dim(x)
    factor = 0.0 if bn.momentum is None else bn.momentum
    tracked = None
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        # num_batches_tracked += 1 happens in the op's running-statistics update (one launch).
        tracked = bn.num_batches_tracked
        factor = 1.0 / (float(tracked) + 1.0) if bn.momentum is None else bn.momentum
    # nn.BatchNorm2d's rules: batch statistics in training, and in eval when no running
    # statistics are tracked; running statistics updated only when tracked.
    batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    track = not bn.training or bn.track_running_stats
    if batch_stats:
        ops._check_batch_size(x)
    # The module's own tensors need no argument checks (the kernels' checks still run).
    return ops._batch_norm_relu(
        x, bn.running_mean if track else None, bn.running_var if track else None,
        bn.weight, bn.bias, bool(batch_stats), float(factor), float(bn.eps), identity,
        ops.resolve_backend(backend, x.device), tracked)
