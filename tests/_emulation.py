"""What the tests of the emulated CUDA kernels share (test_cuda_emulation.py,
test_cuda_emulation_batch_norm.py): the autouse fixture that needs the emulated backend
and clears its launch log, the launch log itself, and temporary emulation options."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Dict, Iterator, List

import pytest
from conftest import require_backend

from resattn_fast import _ext


@pytest.fixture(autouse=True)
def emulated() -> Iterator[Any]:
    require_backend("cuda", "cpu")
    _ext.EMULATED.clear_launches()
    yield _ext.EMULATED


@contextmanager
def options(**kw: Any) -> Iterator[None]:
    """Emulation options (``set_options``) for the block, restored after it."""
    emu = _ext.EMULATED
    before = emu.get_options()
    emu.set_options(kw)
    try:
        yield
    finally:
        emu.set_options(before)


def launches() -> List[Dict]:
    """Every launch since the last clear, in order (kernel name, grid, block, ...)."""
    return list(_ext.EMULATED.launches())


def kernels() -> List[str]:
    """The kernels launched since the last clear, in order."""
    return [launch["kernel"] for launch in _ext.EMULATED.launches()]
