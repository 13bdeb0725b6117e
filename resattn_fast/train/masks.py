"""`resattn masks`: the soft attention masks of a trained network over an image.

As in the paper's figure: the input image, then for each attention stage the
channel-mean of the soft mask M(x) of the stage's last attention module, upsampled to the
image and overlaid as a heat map. One PNG with one panel per stage.
"""

from __future__ import annotations

import argparse
import os
from typing import List

import torch
import torch.nn.functional as F

from ..errors import UsageError
from .checkpoint import atomic_write, load_checkpoint

__all__ = ["add_arguments", "run", "stage_masks"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `resattn masks`."""
    parser.description = ("Render the soft masks of a trained Residual Attention Network on an "
                          "image: one panel per attention stage (channel-mean of the stage's last "
                          "module's mask, overlaid on the image).")
    parser.add_argument("--checkpoint", required=True, metavar="PT",
                        help="best.pt or last.pt written by `resattn train` (or its RUN_DIR)")
    parser.add_argument("--image", required=True, help="image file (JPEG, PNG, WebP, GIF, BMP, TIFF, ...)")
    parser.add_argument("--out", required=True, metavar="PNG", help="where to write the figure")
    parser.add_argument("--alpha", type=float, default=0.5, help="opacity of the heat map")


def stage_masks(model: torch.nn.Module, x: torch.Tensor) -> List[torch.Tensor]:
    """Channel-mean soft mask of the last attention module of each stage.

    Args:
        model: a ResidualAttentionNet (eval mode).
        x: (1, 3, S, S) normalised float32 input.
    Returns:
        one (H_stage, W_stage) float32 tensor in (0, 1) per attention stage.
    """
    masks = model.forward_masks(x)
    out: List[torch.Tensor] = []
    i = 0
    for _ch, _depth, n_modules, _stride in model.config.stages:
        if n_modules == 0:
            continue
        i += n_modules
        out.append(masks[i - 1][0].float().mean(0))
    return out


def run(args: argparse.Namespace) -> int:
    """Entry point of `resattn masks`."""
    import numpy as np
    from torchvision.transforms.v2 import functional as TF

    from ..models import CONFIGS, create_model
    from .data import eval_transform, read_image

    path = args.checkpoint
    if os.path.isdir(path):
        path = os.path.join(path, "best.pt")
    if not (0.0 <= args.alpha <= 1.0):
        raise UsageError(f"--alpha must be between 0 and 1, got {args.alpha}")
    ckpt = load_checkpoint(path, "--checkpoint")
    config, data = ckpt.get("config") or {}, ckpt.get("data") or {}
    name = config.get("model")
    if name not in CONFIGS or "num_classes" not in data:
        raise UsageError(f"--checkpoint: {path} does not say which model it holds")
    model = create_model(name, num_classes=int(data["num_classes"]), impl="reference")
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise UsageError(f"--checkpoint: {path} does not fit {name} "
                         f"({str(exc).strip().splitlines()[0][:200]})") from None
    model.eval()
    size = int(data.get("image_size", CONFIGS[name].input_size))
    mean = torch.tensor(data.get("mean", (0.5, 0.5, 0.5)), dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(data.get("std", (0.25, 0.25, 0.25)), dtype=torch.float32).view(3, 1, 1)
    if not os.path.isfile(args.image):
        raise UsageError(f"--image: no such file {args.image}")
    try:
        im = read_image(args.image)  # (3, H, W) uint8
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"--image: cannot read {args.image} as an image ({first})") from None
    if min(im.shape[-2:]) > size:
        im = eval_transform(size)(im)
    else:
        im = TF.resize(im, [size, size], antialias=True)
    x = ((im.float() / 255.0 - mean) / std)[None]
    with torch.no_grad():
        logits = model(x)
        masks = stage_masks(model, x)
    prob = logits.softmax(1)[0]
    top = int(prob.argmax())
    classes = data.get("classes") or []
    label = classes[top] if top < len(classes) else str(top)

    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    img = im.permute(1, 2, 0).numpy().astype(np.float32) / 255.0
    fig, axes = plt.subplots(1, len(masks) + 1, figsize=(3 * (len(masks) + 1), 3.6))
    try:
        axes[0].imshow(img, interpolation="nearest")
        axes[0].set_title(f"input: {label} ({float(prob[top]):.2f})", fontsize=9)
        for k, (ax, m) in enumerate(zip(axes[1:], masks), start=1):
            up = F.interpolate(m[None, None], size=(size, size), mode="bilinear",
                               align_corners=True)[0, 0].numpy()
            ax.imshow(img, interpolation="nearest")
            ax.imshow(up, cmap="jet", alpha=args.alpha, vmin=float(up.min()), vmax=float(up.max()),
                      interpolation="bilinear")
            ax.set_title(f"stage {k} mask {tuple(m.shape)}\nmean {float(m.mean()):.2f}", fontsize=9)
        for ax in axes:
            ax.axis("off")
        fig.suptitle(f"{name}, {os.path.basename(path)} (epoch {ckpt.get('epoch', '?')})", fontsize=10)
        fig.tight_layout(rect=(0, 0, 1, 0.93))  # room for the suptitle
        out_dir = os.path.dirname(os.path.abspath(args.out))
        if not os.path.isdir(out_dir):
            raise UsageError(f"--out: directory {out_dir} does not exist")
        atomic_write(args.out, lambda f: fig.savefig(f, format="png", dpi=100))
    finally:
        plt.close(fig)
    print(f"resattn masks: wrote {args.out} ({len(masks)} stages; predicted {label})")
    return 0
