"""Named Residual Attention Networks: create_model(name, ...) and list_models()."""

from __future__ import annotations

import difflib
from typing import Any, List, Optional

from ..convert import IMPLS, convert
from ..ops._backends import BACKENDS
from .resattn import CONFIGS, NetConfig, ResidualAttentionNet

__all__ = ["CONFIGS", "NetConfig", "ResidualAttentionNet", "create_model", "list_models"]


def list_models() -> List[str]:
    """The names create_model accepts."""
    return list(CONFIGS)


def create_model(name: str, *, num_classes: Optional[int] = None, impl: str = "fast",
                 backend: Optional[str] = None, **kwargs: Any) -> ResidualAttentionNet:
    """Build a named network with fresh weights.

    Args:
        name: one of list_models(): attention56/92/128/164/236/452 (224x224, 1000 classes)
            or attention56/92/236/452_cifar (32x32, 10 classes).
        num_classes: classifier outputs (default: the configuration's).
        impl: "fast" (fused soft-mask kernels) or "reference" (plain PyTorch).
        backend: with impl="fast", the backend of the fused ops (None: fastest available).
        **kwargs: `grad_checkpointing=True` to enable gradient checkpointing.
    """
    if name not in CONFIGS:
        close = difflib.get_close_matches(name, CONFIGS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown model {name!r}.{hint} Valid names: {', '.join(CONFIGS)}")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    grad_ckpt = bool(kwargs.pop("grad_checkpointing", False))
    if kwargs:
        raise TypeError(f"create_model: unexpected arguments {sorted(kwargs)}")
    model = ResidualAttentionNet(CONFIGS[name], num_classes=num_classes)
    if impl == "fast":
        convert(model, "fast", backend=backend)
    model.set_grad_checkpointing(grad_ckpt)
    return model
