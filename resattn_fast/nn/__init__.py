"""Drop-in fast modules: same constructors and state_dict keys as resattn_fast.reference."""

from ..reference.modules import ResidualUnit
from .attention import AttentionModule

__all__ = ["AttentionModule", "ResidualUnit"]
