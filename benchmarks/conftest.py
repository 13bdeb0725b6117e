"""pytest configuration for ``pytest benchmarks/``.

Makes the checkout importable (``benchmarks`` and ``resattn_fast`` without installing) and,
when the pytest-benchmark plugin is not installed, provides a minimal ``benchmark``
fixture that just runs the function a few times, so the module still works as a smoke test.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Any, Callable

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

if importlib.util.find_spec("pytest_benchmark") is None:

    class _Runner:
        def pedantic(self, fn: Callable[..., Any], *, rounds: int = 1, warmup_rounds: int = 0,
                     iterations: int = 1, **_: Any) -> Any:
            out = None
            for _ in range(warmup_rounds + rounds * iterations):
                out = fn()
            return out

        def __call__(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            return fn(*args, **kwargs)

    @pytest.fixture
    def benchmark() -> _Runner:
        return _Runner()
