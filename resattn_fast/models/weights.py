"""Weights files: our training checkpoints (best.pt / last.pt) and .safetensors.

``create_model(name, checkpoint_path=FILE)`` reads either through :func:`read_weights`.
A training checkpoint is a plain-data ``torch.save`` dict (``format``
``resattn_fast.train/1``) whose ``model`` entry is the state_dict and whose ``config`` /
``data`` entries name the network and its classes. A .safetensors file written by
``resattn export --format safetensors`` holds the state_dict alone, with the network name,
the class count and the data set's normalisation in its string metadata.
safetensors is an optional dependency (``pip install safetensors``), imported only here.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional, Tuple

import torch

__all__ = ["WeightsError", "WEIGHTS_FORMAT", "read_weights", "safetensors_bytes",
           "load_state_into", "missing_package"]

WEIGHTS_FORMAT = "resattn_fast.weights/1"
_TRAIN_FORMAT = "resattn_fast.train/1"  # resattn_fast.train.checkpoint.FORMAT


class WeightsError(ValueError):
    """A weights file is missing, unreadable, or does not fit the network asked for.
    The message is one line naming the file and what is wrong."""


def missing_package(pip_name: str, what: str) -> str:
    """The one-line message for an optional package that is not installed."""
    return (f"{what} needs the Python package {pip_name!r}, which is not installed: "
            f"pip install {pip_name}  (or pip install 'resattn_fast[export]')")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


def _is_safetensors(path: str) -> bool:
    if path.endswith(".safetensors"):
        return True
    # A safetensors file starts with an 8-byte little-endian header length and a JSON object.
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def _read_safetensors(path: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    try:
        from safetensors import safe_open
    except ImportError:
        raise WeightsError(missing_package("safetensors", f"reading {path}")) from None
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            raw = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise WeightsError(f"{path} is corrupt or not a safetensors file ({_first_line(exc)})") from None
    meta: Dict[str, Any] = {"model": raw.get("model"), "num_classes": None, "data": None}
    if raw.get("num_classes", "").isdigit():
        meta["num_classes"] = int(raw["num_classes"])
    if raw.get("data"):
        try:
            meta["data"] = json.loads(raw["data"])
        except ValueError:
            meta["data"] = None
    if raw.get("epoch", "").isdigit():
        meta["epoch"] = int(raw["epoch"])
    return state, meta


def _read_checkpoint(path: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"{path} is corrupt or not a checkpoint ({_first_line(exc)})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != _TRAIN_FORMAT or \
            not isinstance(ckpt.get("model"), dict):
        raise WeightsError(f"{path} is neither a resattn train checkpoint ({_TRAIN_FORMAT}) "
                           "nor a .safetensors file")
    config, data = ckpt.get("config") or {}, ckpt.get("data") or {}
    meta: Dict[str, Any] = {"model": config.get("model"),
                            "num_classes": data.get("num_classes"), "data": data or None,
                            "config": config, "checkpoint": ckpt}
    if "epoch" in ckpt:
        meta["epoch"] = int(ckpt["epoch"])
    return ckpt["model"], meta


def read_weights(path: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Read a state_dict and what is known about it from ``path``.

    Returns:
        (state_dict, meta) with meta["model"] (network name or None), meta["num_classes"]
        (int or None), meta["data"] (the data set's ``info()``: name, classes, mean, std,
        image_size; or None) and, for a training checkpoint, meta["config"],
        meta["checkpoint"] (the whole dict) and meta["epoch"].
    Raises:
        WeightsError: missing, a directory, corrupt, or of an unknown kind.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise WeightsError(f"{path}: no such file")
    if os.path.isdir(path):
        raise WeightsError(f"{path} is a directory, not a weights file")
    try:
        st = _is_safetensors(path)
    except OSError as exc:
        raise WeightsError(f"cannot read {path}: {exc.strerror or exc}") from None
    state, meta = _read_safetensors(path) if st else _read_checkpoint(path)
    if meta["num_classes"] is None:
        fc = state.get("fc.weight")
        if isinstance(fc, torch.Tensor) and fc.dim() == 2:
            meta["num_classes"] = int(fc.shape[0])
    return state, meta


def load_state_into(model: torch.nn.Module, state: Dict[str, torch.Tensor], path: str,
                    name: str) -> None:
    """``model.load_state_dict(state)`` (strict), a mismatch raised as one WeightsError."""
    try:
        model.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError) as exc:
        raise WeightsError(f"{path} does not fit {name} ({_first_line(exc)})") from None


def safetensors_bytes(state: Dict[str, torch.Tensor], *, model: str, num_classes: int,
                      data: Optional[Dict[str, Any]] = None, epoch: Optional[int] = None) -> bytes:
    """Serialise ``state`` (a state_dict) as safetensors with our metadata: ``format``,
    ``model``, ``num_classes`` and, when known, ``data`` (JSON of the data set's info:
    classes, mean, std, image_size) and ``epoch``."""
    try:
        from safetensors.torch import save
    except ImportError:
        raise WeightsError(missing_package("safetensors", "--format safetensors")) from None
    meta = {"format": WEIGHTS_FORMAT, "model": model, "num_classes": str(int(num_classes))}
    if data:
        meta["data"] = json.dumps(data, sort_keys=True)
    if epoch is not None:
        meta["epoch"] = str(int(epoch))
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    return save(tensors, metadata=meta)
