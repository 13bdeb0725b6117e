"""Pure-PyTorch reference implementation: the ground truth for every fused kernel."""

from . import ops
from .modules import AttentionModule, ResidualUnit

__all__ = ["AttentionModule", "ResidualUnit", "ops"]
