"""`resattn eval`: top-1 / top-5 accuracy, loss and images/s of a trained network.

As timm's validate.py: the validation split of a data set (by default the one the
checkpoint was trained on, with its normalisation, image size, ``--val-subset`` and batch
size, so that on its own checkpoint it reproduces the val_acc its metrics.csv recorded
for that epoch), printed and optionally written as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Any, Dict, Iterable, Optional, Tuple

import torch

from .errors import UsageError

__all__ = ["EvalResult", "evaluate", "load_for_eval", "add_arguments", "run"]


@dataclass
class EvalResult:
    """What `resattn eval` measures over ``images`` validation images."""

    images: int
    top1: float
    top5: float
    loss: float
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.images / max(1e-9, self.seconds)


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: Iterable[Tuple[torch.Tensor, torch.Tensor]],
             device: torch.device, *, amp_dtype: Optional[torch.dtype] = None,
             channels_last: bool = False) -> EvalResult:
    """Top-1, top-5 (top-k with k = min(5, classes)), mean cross-entropy and wall time of
    ``model`` (put in eval mode) over ``loader``'s (N, 3, S, S) float32 / (N,) int64 batches.

    The logits are taken in float32 for the loss (autocast gives bfloat16/float16). The
    time covers the whole loop: data loading, transfer and forward, as timm's validate.
    """
    model.eval()
    correct1 = correct5 = 0
    loss_sum, count = 0.0, 0
    autocast = (torch.autocast(device_type=device.type, dtype=amp_dtype) if amp_dtype is not None
                else nullcontext())
    t0 = time.perf_counter()
    for x, y in loader:
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast:
            logits = model(x)
        logits = logits.float() if logits.dtype not in (torch.float32, torch.float64) else logits
        loss_sum += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hit = top == y[:, None]
        correct1 += int(hit[:, 0].sum())
        correct5 += int(hit.any(dim=1).sum())
        count += int(y.shape[0])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    n = max(1, count)
    return EvalResult(images=count, top1=correct1 / n, top5=correct5 / n, loss=loss_sum / n,
                      seconds=seconds)


def _resolve_checkpoint(path: str) -> str:
    if os.path.isdir(path):
        return os.path.join(path, "best.pt")
    return path


def load_for_eval(path: str, *, impl: str = "fast",
                  backend: Optional[str] = None) -> Tuple[torch.nn.Module, Dict[str, Any]]:
    """The network of a checkpoint (best.pt / last.pt, a run directory for its best.pt, or
    a .safetensors of ours) in ``impl``, and the file's metadata (see
    :func:`resattn_fast.models.weights.read_weights`). Raises UsageError, one line."""
    from .models import CONFIGS, create_model
    from .models.weights import WeightsError, read_weights

    try:
        _, meta = read_weights(path)
    except WeightsError as exc:
        raise UsageError(f"--checkpoint: {exc}") from None
    name = meta.get("model")
    if name not in CONFIGS:
        raise UsageError(f"--checkpoint: {path} does not say which network it holds "
                         f"(model {name!r}); it was not written by resattn train/export")
    try:
        model = create_model(name, impl=impl, backend=backend, checkpoint_path=path)
    except WeightsError as exc:
        raise UsageError(f"--checkpoint: {exc}") from None
    return model, meta


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `resattn eval`."""
    from .train.data import DATASETS

    parser.description = (
        "Evaluate a trained network on a validation split: top-1 and top-5 accuracy, loss and "
        "images/s. By default the data set, folder, --val-subset, batch size, normalisation "
        "and image size are those the checkpoint was trained with.")
    parser.add_argument("--checkpoint", required=True, metavar="CKPT",
                        help="best.pt / last.pt of `resattn train` (or its RUN_DIR: best.pt), "
                             "or a .safetensors written by `resattn export`")
    parser.add_argument("--data", default=None, choices=DATASETS,
                        help="data set (default: the checkpoint's)")
    parser.add_argument("--data-dir", default=None, help="its folder (default: the checkpoint's)")
    parser.add_argument("--val-subset", type=int, default=None, metavar="N",
                        help="first N validation images (default: the checkpoint's; 0: all)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="default: the checkpoint's per-process training batch, else 64")
    parser.add_argument("--amp", default="none", choices=("none", "bf16", "fp16"),
                        help="autocast dtype (fp16 needs a GPU)")
    parser.add_argument("--channels-last", action="store_true", help="NHWC memory format")
    parser.add_argument("--impl", default="fast", choices=("fast", "reference"),
                        help="attention modules: fused kernels (fast) or plain PyTorch")
    parser.add_argument("--backend", default=None, choices=("reference", "cpu", "cuda", "triton"),
                        help="backend of the fused ops with --impl fast")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="auto: the GPU if there is one, else the CPU")
    parser.add_argument("--workers", type=int, default=None,
                        help="DataLoader workers (default: 0 for in-memory data, "
                             "min(8, CPUs) for imagefolder)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the results here")


def _recorded(meta: Dict[str, Any]) -> Tuple[Optional[int], Optional[float]]:
    """(epoch, val_acc) that training recorded for the weights in this checkpoint."""
    ckpt = meta.get("checkpoint") or {}
    epoch = meta.get("epoch")
    if "val_acc" in ckpt:  # best.pt
        return epoch, float(ckpt["val_acc"])
    for row in ckpt.get("history") or []:  # last.pt: the row of its last finished epoch
        if epoch is not None and int(row.get("epoch", -1)) == epoch and ckpt.get("step", 0) == 0:
            return epoch, float(row["val_acc"])
    return epoch, None


def run(args: argparse.Namespace) -> int:
    """Entry point of `resattn eval`."""
    from torch.utils.data import DataLoader

    from .train.checkpoint import atomic_write
    from .train.data import load_data

    for name in ("batch_size", "threads"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {v}")
    for name in ("workers", "val_subset"):
        v = getattr(args, name)
        if v is not None and v < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be 0 or more, got {v}")
    if args.json:
        jdir = os.path.dirname(os.path.abspath(args.json))
        if not os.path.isdir(jdir):
            raise UsageError(f"--json: directory {jdir} does not exist")
    if args.threads:
        torch.set_num_threads(args.threads)
    use_cuda = torch.cuda.is_available() if args.device == "auto" else args.device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is visible")
    device = torch.device("cuda" if use_cuda else "cpu")
    if args.amp == "fp16" and device.type != "cuda":
        raise UsageError("--amp fp16 needs a CUDA GPU; use --amp bf16 on the CPU")
    if args.impl == "reference" and args.backend is not None:
        raise UsageError("--backend applies to --impl fast only")
    if args.impl == "fast":
        from .ops._backends import BackendUnavailableError, resolve_backend

        try:
            resolve_backend(args.backend, device)
        except BackendUnavailableError as exc:
            raise UsageError(f"--backend: {exc}") from None

    path = _resolve_checkpoint(args.checkpoint)
    model, meta = load_for_eval(path, impl=args.impl, backend=args.backend)
    config = meta.get("config") or {}
    info = meta.get("data") or {}
    data_name = args.data or info.get("name") or config.get("data")
    if data_name is None:
        raise UsageError(f"--checkpoint: {path} does not name its data set; pass --data")
    if "mean" not in info or "std" not in info:
        raise UsageError(f"--checkpoint: {path} does not record its input normalisation "
                         "(mean/std); it was not written by resattn train/export")
    same_data = data_name == (info.get("name") or config.get("data"))
    data_dir = args.data_dir if args.data_dir is not None else (config.get("data_dir") if same_data else None)
    val_subset = args.val_subset if args.val_subset is not None else (
        config.get("val_subset") if same_data else None)
    image_size = int(info.get("image_size") or model.config.input_size)
    data = load_data(data_name, data_dir=data_dir, image_size=image_size,
                     seed=int(config.get("seed", 0)),
                     synthetic_size=int(config.get("synthetic_size", 1024)),
                     val_subset=val_subset or None, eval_only=True,
                     classes=info.get("classes") if same_data else None)
    if data.num_classes != model.num_classes:
        raise UsageError(f"--data {data_name} has {data.num_classes} classes, the network in "
                         f"{path} {model.num_classes}")
    data.val.set_normalization(info["mean"], info["std"])
    batch = args.batch_size or int(config.get("local_batch") or config.get("batch_size") or 64)
    workers = args.workers
    if workers is None:
        workers = min(8, os.cpu_count() or 1) if data_name == "imagefolder" else 0
    loader = DataLoader(data.val, batch_size=batch, shuffle=False, num_workers=workers,
                        pin_memory=device.type == "cuda")
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    res = evaluate(model, loader, device, amp_dtype=amp_dtype, channels_last=args.channels_last)
    epoch, recorded = _recorded(meta)
    name = model.config.name
    where = f"{os.path.basename(path)}" + (f", epoch {epoch}" if epoch is not None else "")
    line = (f"resattn eval: {name} ({where}, {args.impl}) on {data_name} val, {res.images} images: "
            f"top-1 {res.top1:.4f}  top-5 {res.top5:.4f}  loss {res.loss:.4f}  "
            f"{res.images_per_s:.1f} images/s ({device}, batch {batch})")
    if recorded is not None and same_data:
        line += f"; training recorded val_acc {recorded:.4f}"
    print(line, flush=True)
    if args.json:
        out = dict(asdict(res), images_per_s=res.images_per_s, model=name, checkpoint=path,
                   epoch=epoch, data=data_name, data_dir=data_dir, val_subset=val_subset,
                   batch_size=batch, amp=args.amp, channels_last=bool(args.channels_last),
                   impl=args.impl, backend=args.backend, device=str(device),
                   recorded_val_acc=recorded if same_data else None,
                   torch=torch.__version__)
        text = json.dumps(out, indent=2, sort_keys=True) + "\n"
        atomic_write(args.json, lambda f: f.write(text.encode()))
    return 0
