"""resattn_fast: the Residual Attention Network (Wang et al., CVPR 2017) with fused
soft-mask kernels (C++ CPU, CUDA, Triton) behind the same API as a pure-PyTorch reference.

    import resattn_fast
    model = resattn_fast.create_model("attention92", impl="fast")
    y = resattn_fast.ops.attention_residual(mask_logits, trunk)
"""

# Subpackage imports below bind `nn` to resattn_fast.nn; torch.nn is never imported here
# under that name.
from . import models, ops, reference
from . import nn as nn  # noqa: PLC0414  (resattn_fast.nn, the fast modules)
from ._ext import build_info
from .convert import convert
from .models import create_model, list_models
from .ops import available_backends

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "available_backends",
    "build_info",
    "convert",
    "create_model",
    "list_models",
    "models",
    "nn",
    "ops",
    "reference",
]
