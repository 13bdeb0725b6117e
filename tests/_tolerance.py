"""Tolerances: float32/float64 against a float64 reference, and the 2x-eager-error rule
for float16/bfloat16 (the kernel's error may be at most twice what eager PyTorch makes
computing the same thing in the same dtype, plus a small atol)."""

from __future__ import annotations

from typing import Optional

import torch

TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-5)}
# The small atol of the 2x rule, relative to the largest magnitude of the result.
RULE_ATOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def assert_matches(actual: torch.Tensor, expected64: torch.Tensor, dtype: torch.dtype,
                   eager: Optional[torch.Tensor] = None, what: str = "") -> None:
    """``actual`` (dtype) vs the float64 ``expected64``; ``eager`` is PyTorch's own result in
    ``dtype`` (needed for half types; for float32 it switches to the 2x rule too, for
    large sizes where float32 index math itself is off by more than a fixed tolerance)."""
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype}, expected {dtype}"
    assert actual.shape == expected64.shape, f"{what}: shape {tuple(actual.shape)} vs {tuple(expected64.shape)}"
    if dtype == torch.float64 or (dtype == torch.float32 and eager is None):
        atol, rtol = TOL[dtype]
        torch.testing.assert_close(actual.double(), expected64, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")
        return
    assert eager is not None, "half types need the eager same-dtype result"
    err = (actual.double() - expected64).abs().max().item()
    eager_err = (eager.double() - expected64).abs().max().item()
    bound = 2 * eager_err + RULE_ATOL[dtype] * max(1.0, expected64.abs().max().item())
    assert err <= bound, f"{what}: max error {err:.3g} > 2 x eager error {eager_err:.3g} + atol ({bound:.3g})"
