"""Named Residual Attention Networks: create_model(name, ...) and list_models()."""

from __future__ import annotations

import difflib
from typing import Any, List, Optional

from ..convert import IMPLS, convert
from ..ops._backends import BACKENDS
from .resattn import CHECKPOINT_MODES, CONFIGS, NetConfig, ResidualAttentionNet, checkpoint_mode
from .weights import WeightsError, load_state_into, read_weights

__all__ = ["CHECKPOINT_MODES", "CONFIGS", "NetConfig", "ResidualAttentionNet", "WeightsError", "create_model",
           "list_models"]


def list_models() -> List[str]:
    """The names create_model accepts."""
    return list(CONFIGS)


def create_model(name: str, *, num_classes: Optional[int] = None, impl: str = "fast",
                 backend: Optional[str] = None, checkpoint_path: Optional[str] = None,
                 **kwargs: Any) -> ResidualAttentionNet:
    """Build a named network, with fresh weights or those of ``checkpoint_path``.

    Args:
        name: one of list_models(): attention56/92/128/164/236/452 (224x224, 1000 classes)
            or attention56/92/236/452_cifar (32x32, 10 classes).
        num_classes: classifier outputs (default: the checkpoint's, else the configuration's).
        impl: "fast" (fused soft-mask kernels) or "reference" (plain PyTorch).
        backend: with impl="fast", the backend of the fused ops (None: fastest available).
        checkpoint_path: (timm's keyword) a .safetensors file written by ``resattn export``
            or a training checkpoint of ours (best.pt / last.pt): its weights are loaded
            into whichever ``impl`` is asked for (both share one state_dict).
        **kwargs: ``grad_checkpointing="none" | "selective" | "full"`` (or False / True):
            see ``ResidualAttentionNet.set_grad_checkpointing``.

    Raises:
        ValueError: unknown name, impl or backend. WeightsError (a ValueError): the file
            is missing or corrupt, holds another network or another class count.
    """
    if name not in CONFIGS:
        close = difflib.get_close_matches(name, CONFIGS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown model {name!r}.{hint} Valid names: {', '.join(CONFIGS)}")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    grad_ckpt = checkpoint_mode(kwargs.pop("grad_checkpointing", False))
    if kwargs:
        raise TypeError(f"create_model: unexpected arguments {sorted(kwargs)}")
    state = None
    if checkpoint_path is not None:
        path = str(checkpoint_path)
        state, meta = read_weights(path)
        held = meta.get("model")
        if held is not None and held != name:
            raise WeightsError(f"{path} holds {held} weights, not {name}")
        held_classes = meta.get("num_classes")
        if num_classes is None:
            num_classes = held_classes
        elif held_classes is not None and held_classes != num_classes:
            raise WeightsError(f"{path} has a {held_classes}-class classifier, not the "
                               f"num_classes={num_classes} asked for")
    model = ResidualAttentionNet(CONFIGS[name], num_classes=num_classes)
    if state is not None:
        load_state_into(model, state, path, name)
    if impl == "fast":
        convert(model, "fast", backend=backend)
    model.set_grad_checkpointing(grad_ckpt)
    return model
