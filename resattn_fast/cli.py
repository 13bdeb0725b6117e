"""The `resattn` command: info, train, masks, eval, export, plan (`python -m resattn_fast` is the same)."""

from __future__ import annotations

import argparse
import platform
import sys
from typing import List, Optional

from .errors import UsageError

__all__ = ["main", "build_parser"]


def _info(args: argparse.Namespace) -> int:
    import torch

    from . import __version__
    from ._ext import build_info
    from .ops import available_backends
    from .ops._backends import _triton_status, triton_interpreted

    info = build_info()
    print(f"resattn_fast {__version__}")
    print(f"python       {platform.python_version()} ({sys.executable})")
    print(f"torch        {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    ok, why = _triton_status()
    if ok:
        import triton

        interp = " (TRITON_INTERPRET=1: CPU interpreter)" if triton_interpreted() else ""
        print(f"triton       {triton.__version__}{interp}")
    else:
        print(f"triton       missing: {why}")
    if info["loaded"]:
        print("extension    resattn_fast._C loaded")
        isa = f" ({info['cpu_isa']} kernel table)" if info.get("cpu_isa") else ""
        print(f"  cpu kernels   {'yes' + isa if info['cpu_kernels'] else 'no'}")
        if info["cuda_kernels"]:
            print(f"  cuda kernels  yes (CUDA {info['cuda_version']}, archs {info['cuda_archs']})")
        else:
            print("  cuda kernels  no (built with RESATTN_BUILD_CUDA=0 or without nvcc)")
    else:
        print("extension    NOT loaded: the reference backend runs instead")
        print(f"  reason: {info['error']}")
        print("  fix:    pip install --no-build-isolation -e .  (needs a C++ compiler; nvcc for CUDA)")
    if info["cuda_emulation"]:
        sanitizer = info["cuda_emulation_sanitizer"]
        print("  cuda emulated yes: kernels/*.cu under an emulation of CUDA's execution model, "
              "backend 'cuda' on CPU tensors (tests only)"
              + (f", built with {sanitizer} sanitizer" if sanitizer else ""))
    print(f"cpu          backends: {', '.join(available_backends('cpu'))}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            cap = torch.cuda.get_device_capability(i)
            print(f"cuda:{i}       {torch.cuda.get_device_name(i)} (sm_{cap[0]}{cap[1]}), "
                  f"backends: {', '.join(available_backends(f'cuda:{i}'))}")
    else:
        print("cuda         no GPU visible")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="resattn",
        description="Residual Attention Networks with fused soft-mask kernels.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    p_info = sub.add_parser("info", help="versions, compiled kernels and backends per device")
    p_info.set_defaults(func=_info)

    from .train import command as train_command
    from .train import masks as masks_command

    p_train = sub.add_parser("train", help="train a network (torchrun-ready)",
                             formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    train_command.add_arguments(p_train)
    p_train.set_defaults(func=train_command.run)
    p_masks = sub.add_parser("masks", help="render the soft masks of a trained model on an image")
    masks_command.add_arguments(p_masks)
    p_masks.set_defaults(func=masks_command.run)

    from . import evaluate as eval_command
    from . import export as export_command

    p_eval = sub.add_parser("eval", help="top-1/top-5, loss and images/s of a checkpoint")
    eval_command.add_arguments(p_eval)
    p_eval.set_defaults(func=eval_command.run)
    p_export = sub.add_parser("export", help="write a checkpoint as onnx, pt2 or safetensors")
    export_command.add_arguments(p_export)
    p_export.set_defaults(func=export_command.run)
    from . import plan as plan_command

    p_plan = sub.add_parser("plan", help="per checkpointing mode: the largest batch that fits on a GPU and the "
                                         "predicted images/s (roofline model)")
    plan_command.add_arguments(p_plan)
    p_plan.set_defaults(func=plan_command.run)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UsageError as exc:
        print(f"resattn {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"resattn {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
