"""Triton kernels of the fused ops (CUDA tensors; CPU tensors under TRITON_INTERPRET=1).

Importing this package imports Triton and registers the ops
``torch.ops.resattn_fast.upsample_bilinear_add_triton`` (+ ``_backward_triton``) and
``torch.ops.resattn_fast.attention_residual_triton`` (+ ``_backward_triton``) and
``torch.ops.resattn_fast.batch_norm_relu_triton`` (+ ``_backward_triton``, and
``batch_norm_update_stats_triton``).
"""

from .attention_residual import attention_residual
from .batch_norm_relu import batch_norm_relu, batch_norm_relu_backward, batch_norm_update_stats
from .upsample_bilinear_add import upsample_bilinear_add

__all__ = [
    "attention_residual",
    "batch_norm_relu",
    "batch_norm_relu_backward",
    "batch_norm_update_stats",
    "upsample_bilinear_add",
]
