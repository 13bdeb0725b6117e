"""Drop-in fast modules: same constructors and state_dict keys as resattn_fast.reference."""

from .attention import AttentionModule
from .batch_norm import bn_relu
from .residual import ResidualUnit

__all__ = ["AttentionModule", "ResidualUnit", "bn_relu"]
