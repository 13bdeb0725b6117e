"""Backend selection: available_backends, backend=, RESATTN_BACKEND, clear errors."""

from __future__ import annotations

import pytest
import torch

from resattn_fast import ops


def test_reference_always_available():
    assert "reference" in ops.available_backends("cpu")
    assert ops.available_backends("cpu")[-1] == "reference"


def test_default_is_fastest_available(monkeypatch):
    monkeypatch.delenv("RESATTN_BACKEND", raising=False)
    chosen = ops.resolve_backend(None, torch.device("cpu"))
    assert chosen == ("cpu" if "cpu" in ops.available_backends("cpu") else "reference")


def test_env_overrides_default(monkeypatch):
    monkeypatch.setenv("RESATTN_BACKEND", "reference")
    assert ops.resolve_backend(None, torch.device("cpu")) == "reference"
    # An explicit backend= wins over the environment.
    if "cpu" in ops.available_backends("cpu"):
        assert ops.resolve_backend("cpu", torch.device("cpu")) == "cpu"


def test_env_backend_unavailable_says_why(monkeypatch, no_cuda_emulation):
    monkeypatch.setenv("RESATTN_BACKEND", "cuda")
    with pytest.raises(ops.BackendUnavailableError, match="RESATTN_BACKEND='cuda'.*CUDA tensors only"):
        ops.attention_residual(torch.randn(2), torch.randn(2))


def test_unknown_backend():
    with pytest.raises(ops.BackendUnavailableError, match="unknown backend 'fortran'"):
        ops.attention_residual(torch.randn(2), torch.randn(2), backend="fortran")


def test_cuda_backend_on_cpu_tensor_says_why(no_cuda_emulation):
    with pytest.raises(ops.BackendUnavailableError, match="cuda backend runs on CUDA tensors only"):
        ops.upsample_bilinear_add(torch.randn(1, 1, 2, 2), None, size=(4, 4), backend="cuda")
