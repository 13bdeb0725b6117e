"""Crash-safe checkpoints of plain data.

A checkpoint is a dict of tensors, numbers, strings, lists and dicts only, so it loads
with ``torch.load(path, weights_only=True)`` (no pickled classes, no code run on load).
Files are written atomically: a temporary file in the same directory, flushed and
fsync'ed, then ``os.replace``'d over the target (and the directory fsync'ed), so a crash
or SIGKILL at any moment leaves either the old or the new file, never a partial one.
"""

from __future__ import annotations

import os
import random
import tempfile
from typing import IO, Any, Callable, Dict, Optional

import numpy as np
import torch

from ..errors import UsageError

__all__ = ["FORMAT", "atomic_write", "save_checkpoint", "load_checkpoint", "rng_state",
           "set_rng_state"]

FORMAT = "resattn_fast.train/1"


def atomic_write(path: str, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write(f)`` on a temporary file beside ``path``, fsync it and rename it over
    ``path``. On any error the temporary file is removed and ``path`` is untouched."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        # mkstemp creates the file 0600; give it the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable
        dfd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def save_checkpoint(state: Dict[str, Any], path: str) -> None:
    """Atomically write ``state`` (plain data; ``format`` is added) to ``path``."""
    state = dict(state, format=FORMAT)
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str, what: str = "--checkpoint") -> Dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` on the CPU with
    ``weights_only=True``. Raises UsageError (naming ``what``) if it is missing, unreadable,
    corrupt or not a resattn training checkpoint."""
    if not os.path.exists(path):
        raise UsageError(f"{what}: no checkpoint at {path}")
    if os.path.isdir(path):
        raise UsageError(f"{what}: {path} is a directory, not a checkpoint file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"{what}: {path} is corrupt or not a checkpoint ({first[:200]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or "model" not in state:
        raise UsageError(f"{what}: {path} is not a resattn train checkpoint (format {FORMAT})")
    return state


def rng_state() -> Dict[str, Any]:
    """RNG states of python, numpy, torch (CPU) and every CUDA device, as plain data."""
    # The legacy global numpy RNG is what third-party code draws from: save it as it is.
    np_state = np.random.get_state()  # noqa: NPY002
    state: Dict[str, Any] = {
        "python": _to_plain(random.getstate()),
        "numpy": {"name": str(np_state[0]), "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                  "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Optional[Dict[str, Any]]) -> None:
    """Restore what :func:`rng_state` returned (missing parts are left alone)."""
    if not state:
        return
    if "python" in state:
        v = state["python"]
        random.setstate((v[0], tuple(v[1]), v[2]))
    if "numpy" in state:
        n = state["numpy"]
        legacy = (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                  n["cached_gaussian"])
        np.random.set_state(legacy)  # noqa: NPY002
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def _to_plain(x: Any) -> Any:
    if isinstance(x, tuple):
        return [_to_plain(v) for v in x]
    return x
