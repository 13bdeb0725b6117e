"""`resattn train`: train a Residual Attention Network, crash-safe and torchrun-ready.

RUN_DIR (``--out``) receives config.json (at start), and after every epoch metrics.csv,
last.pt (full state), best.pt (weights of the best validation accuracy so far) and
curves.png. ``--resume`` continues from RUN_DIR/last.pt. Exit status: 0 done, 2 usage
error (one line on stderr), 3 the loss became NaN/inf, 128+signal after SIGTERM/SIGINT
(a checkpoint was saved first).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import platform
import resource
import sys
import time
from typing import Any, Dict, List, Optional

import torch

from ..errors import UsageError
from ..models.resattn import CHECKPOINT_MODES, checkpoint_mode
from . import distributed
from .augment import BatchMix, describe
from .checkpoint import atomic_write, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .data import DATASETS, DataBundle, load_data
from .loop import EpochStats, NonFiniteLoss, StopFlag, Trainer
from .recipe import RECIPES, SCHEDULES, build_optimizer, build_scheduler

__all__ = ["add_arguments", "run", "METRIC_COLUMNS"]

METRIC_COLUMNS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "images_per_s",
                  "peak_mem_mb"]

# Settings that define a run: --resume refuses a command line that changes them. The
# others (epochs, amp, workers, compile, channels-last, grad-checkpointing, impl, backend,
# device, data-dir, sync-bn, log-every) may change between the interrupted run and the
# resumed one (a --grad-checkpointing left out keeps the run's mode).
_RUN_DEFINING = ("model", "data", "batch_size", "seed", "recipe", "lr", "momentum", "nesterov",
                 "weight_decay", "schedule", "warmup_epochs", "train_subset", "val_subset",
                 "synthetic_size", "augment", "label_smoothing", "mixup", "cutmix", "randaugment")


class TrainingFailed(Exception):
    """The run cannot go on (e.g. the loss diverged); the message says what was kept."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" only where X says something (not None, not False): the help
    text of those options explains their default itself."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False) or isinstance(action, argparse._StoreFalseAction):
            return action.help or ""
        return super()._get_help_string(action)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `resattn train`."""
    parser.formatter_class = _HelpFormatter
    parser.description = (
        "Train a Residual Attention Network. Writes RUN_DIR/config.json, metrics.csv, last.pt, "
        "best.pt and curves.png; --resume continues from RUN_DIR/last.pt. Distributed: "
        "torchrun --nproc_per_node=K -m resattn_fast train ... (DDP; --batch-size is global).")
    parser.epilog = (
        "Recipes: Nesterov SGD 0.9, wd 1e-4, batch 64; paper-cifar: lr 0.1 divided by 10 "
        "at 40% and 60% of the run's iterations (the paper's 64k/96k of 160k, scaled to "
        "--epochs); paper-imagenet: lr 0.1, at 200k/400k/500k of 530k scaled; cosine: lr 0.2 "
        "decayed to 0 (default for digits/synthetic). "
        "--grad-checkpointing selective|full trades compute for activation memory; the "
        "batch-norm layers still update their running statistics once per step. "
        "Exit status: 0 done, 2 usage error, 3 loss became NaN/inf (last good checkpoint kept), "
        "128+N stopped by signal N after saving RUN_DIR/last.pt.")
    g = parser.add_argument_group("what to train")
    from ..models import list_models

    g.add_argument("--model", required=True, help="network: " + ", ".join(list_models()))
    g.add_argument("--data", default="digits", choices=DATASETS,
                   help="data set: digits (scikit-learn's 8x8 digits at 32x32, bundled), "
                        "cifar10/cifar100 (torchvision's on-disk format under --data-dir), "
                        "imagefolder (--data-dir/train and /val class folders), synthetic")
    g.add_argument("--data-dir", default=None, help="folder of the cifar or imagefolder data")
    g.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory")
    g.add_argument("--resume", action="store_true", help="continue from RUN_DIR/last.pt")
    g.add_argument("--epochs", type=int, default=5, help="number of epochs")
    g.add_argument("--batch-size", type=int, default=None,
                   help="global batch (split evenly over torchrun ranks); default: the recipe's (64)")
    g.add_argument("--seed", type=int, default=0, help="seed of weights, shuffling, augmentation")
    g.add_argument("--train-subset", type=int, default=None, metavar="N",
                   help="use only the first N training images (quick experiments)")
    g.add_argument("--val-subset", type=int, default=None, metavar="N",
                   help="use only the first N validation images")
    g.add_argument("--no-augment", dest="augment", action="store_false", default=True,
                   help="train without the data set's augmentation (crop/flip)")
    g.add_argument("--synthetic-size", type=int, default=1024, help="images in --data synthetic")
    a = parser.add_argument_group(
        "regularisation (timm's options; all off by default: the paper's recipe uses none)")
    a.add_argument("--label-smoothing", type=float, default=0.0, metavar="EPS",
                   help="label smoothing of the training loss (e.g. 0.1)")
    a.add_argument("--mixup", type=float, default=0.0, metavar="ALPHA",
                   help="mixup with Beta(ALPHA, ALPHA) mixing weights (e.g. 0.8; torchvision's v2.MixUp)")
    a.add_argument("--cutmix", type=float, default=0.0, metavar="ALPHA",
                   help="cutmix with Beta(ALPHA, ALPHA) (e.g. 1.0; v2.CutMix); with --mixup too, "
                        "each batch uses one of the two, at random")
    a.add_argument("--randaugment", type=int, default=None, metavar="M",
                   help="torchvision's RandAugment, 2 operations of magnitude M (0..30, e.g. 9)")
    r = parser.add_argument_group("recipe")
    r.add_argument("--recipe", default=None, choices=sorted(RECIPES),
                   help="preset (Nesterov SGD 0.9, wd 1e-4, batch 64); paper-cifar and "
                        "paper-imagenet: lr 0.1, the paper's step schedules scaled to --epochs; "
                        "cosine: lr 0.2 with cosine decay, for short runs. Default: paper-cifar for cifar10/100, paper-imagenet for "
                        "imagefolder, cosine for digits and synthetic")
    r.add_argument("--lr", type=float, default=None, help="base learning rate (default: the recipe's)")
    r.add_argument("--schedule", default=None, choices=SCHEDULES,
                   help="lr schedule per iteration (default: the recipe's)")
    r.add_argument("--warmup-epochs", type=float, default=None,
                   help="linear lr warm-up length (default: recipe's: 0)")
    r.add_argument("--momentum", type=float, default=None, help="default: recipe's 0.9")
    r.add_argument("--weight-decay", type=float, default=None, help="default: recipe's 1e-4")
    r.add_argument("--no-nesterov", dest="nesterov", action="store_false", default=True,
                   help="plain momentum instead of Nesterov's")
    p = parser.add_argument_group("speed and memory")
    p.add_argument("--impl", default="fast", choices=("fast", "reference"),
                   help="attention modules: fused kernels (fast) or plain PyTorch (reference)")
    p.add_argument("--backend", default=None, choices=("reference", "cpu", "cuda", "triton"),
                   help="backend of the fused ops with --impl fast (default: fastest available)")
    p.add_argument("--amp", default="none", choices=("none", "bf16", "fp16"),
                   help="autocast dtype (fp16 uses a GradScaler and needs a GPU)")
    p.add_argument("--channels-last", action="store_true", help="NHWC memory format")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--grad-checkpointing", nargs="?", const="full", default=None,
                   choices=CHECKPOINT_MODES, metavar="{none,selective,full}",
                   help="trade compute for activation memory: selective recomputes the fused "
                        "BN-ReLU outputs in backward (no convolution reruns; --impl fast only), "
                        "full recomputes each block (one more forward pass per step); a bare "
                        "--grad-checkpointing means full. Batch-norm running statistics update "
                        "once per step in every mode. Default: none, or with --resume the mode "
                        "the run was trained with")
    p.add_argument("--sync-bn", action="store_true",
                   help="with torchrun: batch-norm statistics over the global batch")
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader worker processes per rank (default: 0 for in-memory data "
                        "sets, min(8, CPUs per rank) for imagefolder)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads per process (default: PyTorch's, one per core; torchrun "
                        "sets OMP_NUM_THREADS=1). On a busy shared CPU, 1 is often fastest")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto: the GPU of this rank if there is one, else the CPU")
    p.add_argument("--log-every", type=int, default=None, metavar="K",
                   help="without a terminal: a log line every K batches (default: 4 per epoch; 0: none)")


# ---------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    """Entry point of `resattn train` (every torchrun rank runs it)."""
    rank = int(os.environ.get("RANK", "0") or 0)
    stop = StopFlag()
    try:
        return _run(args, stop)
    except UsageError:
        if rank != 0:  # rank 0 reports the same mistake once
            return 2
        raise
    except TrainingFailed as exc:
        if rank == 0:
            print(f"resattn train: error: {exc}", file=sys.stderr, flush=True)
        return 3
    finally:
        stop.restore()
        distributed.cleanup()


def _check_args(args: argparse.Namespace) -> None:
    for name in ("epochs", "batch_size", "train_subset", "val_subset", "synthetic_size"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {v}")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be at least 1, got {args.threads}")
    for name in ("workers", "log_every"):
        v = getattr(args, name)
        if v is not None and v < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be 0 or more, got {v}")
    for name in ("lr", "momentum", "weight_decay", "warmup_epochs"):
        v = getattr(args, name)
        if v is not None and not (v >= 0 and v < float("inf")):
            raise UsageError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {v}")
    if args.lr is not None and args.lr == 0:
        raise UsageError("--lr must be positive")
    if not (0.0 <= args.label_smoothing < 1.0):
        raise UsageError(f"--label-smoothing must be in [0, 1), got {args.label_smoothing}")
    for name in ("mixup", "cutmix"):
        v = getattr(args, name)
        if not (v >= 0 and v < float("inf")):
            raise UsageError(f"--{name} must be a finite number >= 0 (0: off), got {v}")
    if args.randaugment is not None and not (0 <= args.randaugment <= 30):
        raise UsageError(f"--randaugment must be a magnitude from 0 to 30, got {args.randaugment}")
    if args.grad_checkpointing == "selective" and args.impl == "reference":
        raise UsageError("--grad-checkpointing selective recomputes the fused BN-ReLU outputs and "
                         "needs --impl fast; with --impl reference use none or full")


def grad_checkpointing_mode(requested: Optional[str], ckpt: Optional[Dict[str, Any]]) -> str:
    """The checkpointing mode of a run: the one asked for, else (with --resume) the one the
    checkpoint was trained with (older checkpoints recorded True/False), else "none"."""
    if requested is not None:
        return checkpoint_mode(requested)
    old = ((ckpt or {}).get("config") or {}).get("grad_checkpointing")
    try:
        return checkpoint_mode(old)
    except ValueError:
        return "none"


def _model_config(name: str) -> Any:
    from ..models import CONFIGS, create_model

    if name not in CONFIGS:
        try:
            create_model(name)
        except ValueError as exc:
            raise UsageError(f"--model: {exc}") from None
    return CONFIGS[name]


def _check_backend(args: argparse.Namespace, device: torch.device) -> None:
    from ..ops._backends import BackendUnavailableError, resolve_backend

    if args.impl == "reference":
        if args.backend is not None:
            raise UsageError("--backend applies to --impl fast only")
        return
    try:
        resolve_backend(args.backend, device)
    except BackendUnavailableError as exc:
        raise UsageError(f"--backend: {exc}") from None


def default_recipe(data: str, input_size: int) -> str:
    """paper-cifar for CIFAR, paper-imagenet for image folders (and 224-pixel models on
    CIFAR-like data), cosine for the short digits and synthetic runs."""
    if data in ("digits", "synthetic"):
        return "cosine"
    if data == "imagefolder" or input_size >= 128:
        return "paper-imagenet"
    return "paper-cifar"


def _resolve_recipe(args: argparse.Namespace, input_size: int) -> Dict[str, Any]:
    name = args.recipe or default_recipe(args.data, input_size)
    rc = RECIPES[name]
    return {
        "recipe": name,
        "lr": rc.lr if args.lr is None else args.lr,
        "momentum": rc.momentum if args.momentum is None else args.momentum,
        "nesterov": bool(rc.nesterov and args.nesterov),
        "weight_decay": rc.weight_decay if args.weight_decay is None else args.weight_decay,
        "batch_size": rc.batch_size if args.batch_size is None else args.batch_size,
        "schedule": rc.schedule if args.schedule is None else args.schedule,
        "milestones": list(rc.milestones),
        "gamma": rc.gamma,
        "warmup_epochs": rc.warmup_epochs if args.warmup_epochs is None else args.warmup_epochs,
    }


def _check_resume_compatible(ckpt: Dict[str, Any], config: Dict[str, Any], path: str) -> None:
    old = ckpt.get("config") or {}
    for key in _RUN_DEFINING:
        if key in old and old[key] != config[key]:
            flag = "--" + key.replace("_", "-")
            raise UsageError(f"--resume: {path} was trained with {flag} {old[key]!r}, this command "
                             f"asks for {config[key]!r}; resume with the same setting or use a new --out")
    old_classes = (ckpt.get("data") or {}).get("num_classes")
    if old_classes is not None and old_classes != config["num_classes"]:
        raise UsageError(f"--resume: {path} has a {old_classes}-class classifier, the data has "
                         f"{config['num_classes']} classes")


def _write_json(path: str, obj: Any) -> None:
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


def _write_metrics(path: str, history: List[Dict[str, float]]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=METRIC_COLUMNS, lineterminator="\n")
    w.writeheader()
    for row in history:
        w.writerow({k: row[k] for k in METRIC_COLUMNS})
    atomic_write(path, lambda f: f.write(buf.getvalue().encode()))


def _peak_mem_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # ru_maxrss is in KiB on Linux (bytes on macOS): the process's peak resident memory.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


def _run(args: argparse.Namespace, stop: StopFlag) -> int:
    from torch.utils.data import DataLoader

    from .. import __version__
    from ..models import create_model

    _check_args(args)
    net = _model_config(args.model)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = distributed.setup(args.device)
    device = info.device
    main = info.is_main
    _check_backend(args, device)
    if args.amp == "fp16" and device.type != "cuda":
        raise UsageError("--amp fp16 needs a CUDA GPU (its GradScaler); use --amp bf16 on the CPU")
    if args.amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UsageError("--amp bf16: this GPU has no bfloat16 support; use --amp fp16")
    recipe = _resolve_recipe(args, net.input_size)
    batch = recipe["batch_size"]
    if batch % info.world_size:
        raise UsageError(f"--batch-size {batch} is global and must divide evenly over the "
                         f"{info.world_size} torchrun processes")

    data: DataBundle = load_data(args.data, data_dir=args.data_dir, image_size=net.input_size,
                                 seed=args.seed, synthetic_size=args.synthetic_size,
                                 train_subset=args.train_subset, val_subset=args.val_subset,
                                 augment=args.augment, randaugment_m=args.randaugment)
    if batch > len(data.train):
        raise UsageError(f"--batch-size {batch} is larger than the training set "
                         f"({len(data.train)} images); lower --batch-size")
    iters_per_epoch = len(data.train) // batch
    total_iters = iters_per_epoch * args.epochs
    warmup_iters = int(round(recipe["warmup_epochs"] * iters_per_epoch))

    config: Dict[str, Any] = {k: v for k, v in vars(args).items() if k not in ("func", "command")}
    config.update(recipe)
    config.update(num_classes=data.num_classes, world_size=info.world_size,
                  local_batch=batch // info.world_size, iters_per_epoch=iters_per_epoch,
                  total_iters=total_iters, device=str(device))

    out = args.out
    last_path, best_path = os.path.join(out, "last.pt"), os.path.join(out, "best.pt")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out} exists and is not a directory")
    ckpt: Optional[Dict[str, Any]] = None
    if args.resume:
        if not os.path.exists(last_path):
            raise UsageError(f"--resume: no checkpoint at {last_path} (start without --resume)")
        ckpt = load_checkpoint(last_path, "--resume")
        if "optimizer" not in ckpt:
            raise UsageError(f"--resume: {last_path} holds no optimizer state (not a last.pt)")
        _check_resume_compatible(ckpt, config, last_path)
    elif os.path.exists(last_path):
        raise UsageError(f"--out {out} already holds a run ({last_path}); pass --resume to "
                         "continue it or choose another --out")
    config["grad_checkpointing"] = args.grad_checkpointing = grad_checkpointing_mode(
        args.grad_checkpointing, ckpt)
    if args.grad_checkpointing == "selective" and args.impl == "reference":
        raise UsageError(f"--resume: {last_path} was trained with --grad-checkpointing selective, "
                         "which needs --impl fast; pass --grad-checkpointing none or full")

    workers = args.workers
    if workers is None:
        cpus = os.cpu_count() or 1
        workers = min(8, max(1, cpus // max(1, info.world_size))) if args.data == "imagefolder" else 0

    # Same initial weights on every rank (DDP also broadcasts rank 0's at construction).
    torch.manual_seed(args.seed)
    try:
        model = create_model(args.model, num_classes=data.num_classes, impl=args.impl,
                             backend=args.backend, grad_checkpointing=args.grad_checkpointing)
    except ValueError as exc:
        raise UsageError(f"--model: {exc}") from None
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model"])
        except (RuntimeError, KeyError, TypeError) as exc:
            first = str(exc).strip().splitlines()[0][:200]
            raise UsageError(f"--resume: {last_path} does not fit --model {args.model} "
                             f"with {data.num_classes} classes ({first})") from None
    if args.sync_bn and info.distributed:
        model = distributed.convert_sync_batchnorm(model, device)
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    raw_model = model

    optimizer = build_optimizer(model.parameters(), lr=recipe["lr"], momentum=recipe["momentum"],
                                nesterov=recipe["nesterov"], weight_decay=recipe["weight_decay"])
    scheduler = build_scheduler(optimizer, total_iters=total_iters, warmup_iters=warmup_iters,
                                schedule=recipe["schedule"], milestones=tuple(recipe["milestones"]),
                                gamma=recipe["gamma"])
    scaler = torch.amp.GradScaler(device.type, enabled=(args.amp == "fp16"))
    history: List[Dict[str, float]] = []
    best_acc, best_epoch = -1.0, 0
    done_epochs, start_step = 0, 0
    partial = EpochStats()
    if ckpt is not None:
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            if ckpt.get("scaler"):
                scaler.load_state_dict(ckpt["scaler"])
            history = [dict(r) for r in ckpt.get("history", [])]
            best_acc = float(ckpt.get("best_val_acc", -1.0))
            best_epoch = int(ckpt.get("best_epoch", 0))
            done_epochs, start_step = int(ckpt["epoch"]), int(ckpt.get("step", 0))
            partial = EpochStats.from_dict(ckpt.get("partial"))
        except (KeyError, ValueError, TypeError, RuntimeError) as exc:
            raise UsageError(f"--resume: {last_path} has an unusable training state "
                             f"({type(exc).__name__}: {str(exc)[:160]})") from None
        set_rng_state(ckpt.get("rng"))
        if start_step > iters_per_epoch:
            raise UsageError(f"--resume: {last_path} stopped at batch {start_step} of an epoch of "
                             f"{iters_per_epoch}; the data or batch size changed")

    wrapped: torch.nn.Module = model
    if info.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        wrapped = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        wrapped = torch.compile(wrapped)
    eval_model = raw_model if info.distributed else wrapped

    amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    batch_mix = None
    if args.mixup > 0 or args.cutmix > 0:
        batch_mix = BatchMix(args.mixup, args.cutmix, data.num_classes, args.seed, info.rank)
    trainer = Trainer(wrapped, optimizer, scheduler, scaler, device, amp_dtype=amp_dtype,
                      channels_last=args.channels_last, stop=stop,
                      label_smoothing=args.label_smoothing, batch_mix=batch_mix)

    data_info = data.info()
    extras = describe(args.mixup, args.cutmix, args.label_smoothing, args.randaugment)
    if main:
        os.makedirs(out, exist_ok=True)
        _write_json(os.path.join(out, "config.json"), {
            "config": config, "data": data_info,
            "versions": {"resattn_fast": __version__, "torch": torch.__version__,
                         "python": platform.python_version()},
            "resumed_from_epoch": done_epochs if ckpt is not None else None,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        })
        if ckpt is not None:  # one row per finished epoch, whatever the file held
            _write_metrics(os.path.join(out, "metrics.csv"), history)
        what = (f"resuming at epoch {done_epochs + 1}, batch {start_step + 1}" if ckpt is not None
                else "starting")
        ckpt_note = ("" if args.grad_checkpointing == "none"
                     else f", {args.grad_checkpointing} grad checkpointing")
        print(f"resattn train: {args.model} ({args.impl}{ckpt_note}) on {args.data}: {len(data.train)} train / "
              f"{len(data.val)} val images, {data.num_classes} classes; {args.epochs} epochs x "
              f"{iters_per_epoch} iterations of {batch} ({info.world_size} process(es), "
              f"{device}); {recipe['recipe']}: lr {recipe['lr']:g}, {recipe['schedule']} schedule"
              f"{'; ' + extras if extras else ''}; {what} -> {out}", flush=True)
    if done_epochs >= args.epochs and start_step == 0:
        if main:
            print(f"resattn train: {last_path} already finished {done_epochs} epochs; "
                  "pass a larger --epochs to train longer", flush=True)
        return 0

    def state(epochs_done: int, step: int, part: Optional[EpochStats]) -> Dict[str, Any]:
        return {
            "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
            "epoch": epochs_done, "step": step, "partial": part.as_dict() if part else None,
            "history": history, "best_val_acc": best_acc, "best_epoch": best_epoch,
            "rng": rng_state(), "config": config, "data": data_info,
        }

    def stopped_exit(epochs_done: int, step: int, part: EpochStats) -> int:
        if main:
            save_checkpoint(state(epochs_done, step, part), last_path)
            where = (f"epoch {epochs_done + 1}, after batch {step}/{iters_per_epoch}"
                     if step < iters_per_epoch else f"epoch {epochs_done + 1}, during validation")
            print(f"resattn train: stopped by {stop.name} at {where}; saved {last_path}. "
                  "Continue with the same command and --resume.", file=sys.stderr, flush=True)
        distributed.barrier()
        return 128 + int(stop.signum or 15)

    log_every = args.log_every if args.log_every is not None else max(1, min(200, iters_per_epoch // 4))
    sampler = distributed.EpochSampler(len(data.train), batch, info.world_size, info.rank,
                                       seed=args.seed)
    val_loader = DataLoader(data.val, batch_size=batch // info.world_size,
                            sampler=distributed.ShardSampler(len(data.val), info.world_size, info.rank),
                            num_workers=workers, pin_memory=device.type == "cuda")
    stop.install()
    for epoch in range(done_epochs + 1, args.epochs + 1):
        data.train.set_epoch(epoch)
        if batch_mix is not None:
            batch_mix.set_epoch(epoch)
        sampler.set_epoch(epoch, start_step)
        loader = DataLoader(data.train, batch_size=batch // info.world_size, sampler=sampler,
                            num_workers=workers, pin_memory=device.type == "cuda")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            local, done, was_stopped = trainer.train_epoch(
                loader, total=iters_per_epoch, start=start_step, desc=f"epoch {epoch}/{args.epochs}",
                progress=main, log_every=log_every)
        except NonFiniteLoss:
            kept = (f"{last_path} (after epoch {done_epochs}) was kept" if os.path.exists(last_path)
                    else "no checkpoint had been written yet")
            raise TrainingFailed(
                f"the training loss became NaN/inf in epoch {epoch}; stopped without saving, "
                f"{kept}. Lower --lr (now {recipe['lr']:g}), add --warmup-epochs, or use --amp none"
            ) from None
        train_stats = local.reduce(device)
        train_stats.add(partial)
        partial, start_step = EpochStats(), 0
        if was_stopped:
            return stopped_exit(epoch - 1, done, train_stats)
        val_stats, was_stopped = trainer.evaluate(eval_model, val_loader)
        if was_stopped:
            return stopped_exit(epoch - 1, iters_per_epoch, train_stats)
        peak = torch.tensor([_peak_mem_mb(device)], dtype=torch.float64, device=device)
        distributed.all_reduce(peak, "max")
        row = {"epoch": epoch, "train_loss": train_stats.loss, "train_acc": train_stats.acc,
               "val_loss": val_stats.loss, "val_acc": val_stats.acc,
               "lr": trainer.last_lr, "images_per_s": train_stats.count / max(1e-9, train_stats.seconds),
               "peak_mem_mb": float(peak.item())}
        history.append(row)
        done_epochs = epoch
        improved = row["val_acc"] > best_acc
        if improved:
            best_acc, best_epoch = row["val_acc"], epoch
        if main:
            # best.pt before last.pt: a crash between the two leaves a last.pt that still
            # points at the previous best, and the resumed run redoes this epoch.
            if improved:
                save_checkpoint({"model": raw_model.state_dict(), "epoch": epoch, "val_acc": best_acc,
                                 "config": config, "data": data_info}, best_path)
            save_checkpoint(state(epoch, 0, None), last_path)
            _write_metrics(os.path.join(out, "metrics.csv"), history)
            from .plots import plot_curves

            plot_curves(history, os.path.join(out, "curves.png"),
                        title=f"{args.model} on {args.data}")
            print(f"epoch {epoch}/{args.epochs}: train loss {row['train_loss']:.4f} acc "
                  f"{row['train_acc']:.4f} | val loss {row['val_loss']:.4f} acc {row['val_acc']:.4f}"
                  f"{' (best)' if improved else ''} | lr {row['lr']:.3g} | "
                  f"{row['images_per_s']:.1f} img/s, {train_stats.seconds:.1f} s | "
                  f"peak {row['peak_mem_mb']:.0f} MB", flush=True)
    if main:
        print(f"resattn train: done; best val acc {best_acc:.4f} at epoch {best_epoch}; "
              f"files in {out}", flush=True)
    distributed.barrier()
    return 0
