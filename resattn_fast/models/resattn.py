"""ResidualAttentionNet and its named configurations (PAPER.md)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as tnn
from torch.utils.checkpoint import checkpoint

from ..nn.batch_norm import bn_relu
from ..ops._recompute import selective_recompute
from ..reference.modules import AttentionModule as RefAttentionModule
from ..reference.modules import ResidualUnit

CHECKPOINT_MODES = ("none", "selective", "full")

__all__ = ["NetConfig", "ResidualAttentionNet", "CONFIGS", "CHECKPOINT_MODES", "checkpoint_mode"]


@dataclass(frozen=True)
class NetConfig:
    """One network: the stem, the attention stages, the last stage and the head.

    ``stages`` holds (out_channels, mask_depth, modules, first_stride) per attention stage;
    ``last_stage`` is (out_channels, units, first_stride), or None (no plain stage).
    """

    name: str
    stem: str  # "imagenet": conv7x7/2 + BN + ReLU + maxpool3x3/2; "cifar": conv3x3
    stem_channels: int
    stages: Tuple[Tuple[int, int, int, int], ...]
    last_stage: Optional[Tuple[int, int, int]]
    p: int = 1
    t: int = 2
    r: int = 1
    num_classes: int = 1000
    input_size: int = 224
    paper: Dict[str, Any] = field(default_factory=dict, compare=False)


def _imagenet(name: str, modules: Tuple[int, int, int], p: int, t: int, r: int, **paper: Any) -> NetConfig:
    return NetConfig(
        name=name, stem="imagenet", stem_channels=64,
        stages=((256, 3, modules[0], 1), (512, 2, modules[1], 2), (1024, 1, modules[2], 2)),
        last_stage=(2048, 3, 2), p=p, t=t, r=r, num_classes=1000, input_size=224, paper=paper,
    )


def _cifar(name: str, modules: Tuple[int, int, int], p: int, t: int, r: int, **paper: Any) -> NetConfig:
    # The authors released no CIFAR definition; this is PAPER.md's construction: a 3x3
    # stem of 16 channels, attention stages of 64/128/256 channels at 32/16/8 pixels with
    # mask depths 2/1/1, the ImageNet module counts and (p, t, r), no plain last stage.
    return NetConfig(
        name=name, stem="cifar", stem_channels=16,
        stages=((64, 2, modules[0], 1), (128, 1, modules[1], 2), (256, 1, modules[2], 2)),
        last_stage=None, p=p, t=t, r=r, num_classes=10, input_size=32, paper=paper,
    )


CONFIGS: Dict[str, NetConfig] = {
    c.name: c
    for c in [
        _imagenet("attention56", (1, 1, 1), 1, 2, 1, params=31_810_728, top1_err=21.76, top5_err=5.9),
        _imagenet("attention92", (1, 2, 3), 1, 2, 1, params=52_466_344, top1_err=19.5, top5_err=4.8),
        _imagenet("attention128", (2, 3, 4), 1, 2, 1, params=65_294_504),
        _imagenet("attention164", (3, 4, 5), 1, 2, 1, params=78_122_664),
        _imagenet("attention236", (5, 6, 7), 1, 2, 1, params=103_778_984),
        _imagenet("attention452", (5, 6, 7), 2, 4, 3, params=192_137_896),
        _cifar("attention56_cifar", (1, 1, 1), 1, 2, 1, cifar10_err=5.52),
        _cifar("attention92_cifar", (1, 2, 3), 1, 2, 1, params=1_900_000, cifar10_err=4.99, cifar100_err=21.71),
        _cifar("attention236_cifar", (5, 6, 7), 1, 2, 1, params=5_100_000, cifar10_err=4.14, cifar100_err=21.16),
        _cifar("attention452_cifar", (5, 6, 7), 2, 4, 3, params=8_600_000, cifar10_err=3.90, cifar100_err=20.45),
    ]
}


class ResidualAttentionNet(tnn.Module):
    """Residual Attention Network (Wang et al., CVPR 2017), timm-style interface.

    Input (N, 3, H, W) -> logits (N, num_classes). ``forward_features`` gives the last
    feature map (N, num_features, h, w); ``forward_head(x, pre_logits=True)`` the pooled
    (N, num_features) features. ``forward_masks`` returns the soft masks of every
    attention module for visualisation.
    """

    def __init__(self, config: NetConfig, num_classes: Optional[int] = None,
                 attention_cls: type = RefAttentionModule, **attention_kwargs: Any) -> None:
        super().__init__()
        self.config = config
        self.num_classes = config.num_classes if num_classes is None else num_classes
        if config.stem == "imagenet":
            self.stem = tnn.Sequential(
                tnn.Conv2d(3, config.stem_channels, 7, stride=2, padding=3, bias=False),
                tnn.BatchNorm2d(config.stem_channels),
                tnn.ReLU(inplace=True),
                tnn.MaxPool2d(3, stride=2, padding=1),
            )
        else:
            self.stem = tnn.Sequential(tnn.Conv2d(3, config.stem_channels, 3, padding=1, bias=False))
        stages: List[tnn.Module] = []
        ch = config.stem_channels
        for out_ch, depth, n_modules, stride in config.stages:
            blocks: List[tnn.Module] = [ResidualUnit(ch, out_ch, stride)]
            blocks += [attention_cls(out_ch, depth, p=config.p, t=config.t, r=config.r, **attention_kwargs)
                       for _ in range(n_modules)]
            stages.append(tnn.Sequential(*blocks))
            ch = out_ch
        if config.last_stage is not None:
            out_ch, n_units, stride = config.last_stage
            stages.append(tnn.Sequential(
                ResidualUnit(ch, out_ch, stride), *[ResidualUnit(out_ch, out_ch) for _ in range(n_units - 1)]
            ))
            ch = out_ch
        self.stages = tnn.Sequential(*stages)
        self.num_features = ch
        self.norm = tnn.BatchNorm2d(ch)
        self.act = tnn.ReLU(inplace=True)
        self.global_pool = tnn.AdaptiveAvgPool2d(1)
        self.fc: tnn.Module = tnn.Linear(ch, self.num_classes) if self.num_classes > 0 else tnn.Identity()
        self.grad_checkpointing = False
        self.checkpoint_mode = "none"
        # "fast": the stem's and the final BN-ReLU run the fused op (set by convert()).
        self.norm_impl = "reference"
        self.norm_backend: Optional[str] = None
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, tnn.Conv2d):
                tnn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, tnn.BatchNorm2d):
                tnn.init.ones_(m.weight)
                tnn.init.zeros_(m.bias)
            elif isinstance(m, tnn.Linear):
                tnn.init.normal_(m.weight, std=0.01)
                tnn.init.zeros_(m.bias)

    # timm conventions ------------------------------------------------------------------
    def set_grad_checkpointing(self, enable: Union[bool, str] = True) -> None:
        """Trade compute for activation memory in training (timm's method; a mode name too).

        Modes:
            "none" (or False): keep every activation backward needs.
            "selective": each BN-ReLU output a convolution keeps for its weight gradient is
                dropped and recomputed in backward from the pair's input and the per-channel
                statistics, in one pass (the fused op's eval kernel); no convolution reruns
                and running statistics are untouched. Needs the fast model (impl="fast").
            "full" (or True): each block (residual unit or attention module) keeps only its
                input and runs again in backward. Its batch norms then see the same batch
                and give the same statistics, but must not update the running statistics a
                second time: the rerun uses momentum 0 and restores num_batches_tracked
                (``_BNOnce``), so they are updated exactly once per step.

        In every mode the gradients equal "none"'s.
        """
        mode = checkpoint_mode(enable)
        if mode == "selective" and self.norm_impl != "fast":
            raise ValueError(
                'set_grad_checkpointing("selective") recomputes the fused BN-ReLU outputs and '
                "needs the fast model (impl=\"fast\" or resattn_fast.convert(model, \"fast\")); "
                'the reference model supports "none" and "full"')
        self.checkpoint_mode = mode
        self.grad_checkpointing = mode != "none"

    def get_classifier(self) -> tnn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.fc = tnn.Linear(self.num_features, num_classes) if num_classes > 0 else tnn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"{self.config.name}: expected input of shape (N, 3, H, W), got {tuple(x.shape)}")
        x = self._stem(x)
        mode = self.checkpoint_mode if self.training and torch.is_grad_enabled() else "none"
        for stage in self.stages:
            for block in stage:
                if mode == "full":
                    x = _checkpointed(block, x)
                elif mode == "selective" and not torch.compiler.is_compiling():
                    # Under torch.compile the block runs as is: inductor's partitioner
                    # chooses what to recompute in the compiled graph.
                    with selective_recompute():
                        x = block(x)
                else:
                    x = block(x)
        return x

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm_impl == "fast" and self.config.stem == "imagenet":
            conv, bn, _relu, pool = self.stem
            if selective_recompute_wanted(self):
                with selective_recompute():
                    return pool(bn_relu(bn, conv(x), backend=self.norm_backend))
            return pool(bn_relu(bn, conv(x), backend=self.norm_backend))
        return self.stem(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.norm_impl == "fast":
            x = bn_relu(self.norm, x, backend=self.norm_backend)
        else:
            x = self.act(self.norm(x))
        x = self.global_pool(x).flatten(1)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    @torch.no_grad()
    def forward_masks(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The soft mask M(x) in (0, 1) of every attention module, in order:
        a list of (N, C_stage, H_stage, W_stage) tensors."""
        masks = []
        x = self._stem(x)
        for stage in self.stages:
            for block in stage:
                if isinstance(block, RefAttentionModule):
                    x, mask = block.forward_with_mask(x)
                    masks.append(mask)
                else:
                    x = block(x)
        return masks


def checkpoint_mode(enable: Union[bool, str, None]) -> str:
    """The mode name of ``set_grad_checkpointing``'s argument: True -> "full", False or
    None -> "none", or one of CHECKPOINT_MODES."""
    if enable is None or enable is False:
        return "none"
    if enable is True:
        return "full"
    if isinstance(enable, str) and enable.strip().lower() in CHECKPOINT_MODES:
        return enable.strip().lower()
    raise ValueError(f"grad checkpointing mode must be one of {CHECKPOINT_MODES} (or True/False), "
                     f"got {enable!r}")


def selective_recompute_wanted(net: ResidualAttentionNet) -> bool:
    return (net.checkpoint_mode == "selective" and net.training and torch.is_grad_enabled()
            and not torch.compiler.is_compiling())


def _checkpointed(block: tnn.Module, x: torch.Tensor) -> torch.Tensor:
    if torch.compiler.is_compiling():
        # Compiled, the running statistics are updated once by the forward graph and the
        # backward's recomputation replays only what the gradients need, so _BNOnce (whose
        # call counter dynamo cannot trace inside checkpoint: a graph break per block) is
        # not wanted.
        return checkpoint(block, x, use_reentrant=False)
    return checkpoint(_BNOnce(block), x, use_reentrant=False)


class _BNOnce(tnn.Module):
    """Runs ``block``; when called again for recomputation, its batch-norm layers use the
    batch statistics as usual but do not update their running statistics a second time."""

    def __init__(self, block: tnn.Module) -> None:
        super().__init__()
        self.block = block
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == 1:
            return self.block(x)
        bns = [m for m in self.block.modules() if isinstance(m, tnn.modules.batchnorm._BatchNorm)]
        saved = [(m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone())
                 for m in bns]
        try:
            for m in bns:
                m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch: unchanged
            return self.block(x)
        finally:
            for m, (momentum, tracked) in zip(bns, saved):
                m.momentum = momentum
                if tracked is not None:
                    m.num_batches_tracked.copy_(tracked)


def config_dict(config: NetConfig) -> Dict[str, Any]:
    d = asdict(config)
    d.pop("paper", None)
    return d
