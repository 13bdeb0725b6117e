"""`resattn export`: a trained network as ONNX, a torch.export program (.pt2) or safetensors.

- onnx: the reference implementation (plain torch ops, :func:`resattn_fast.convert`)
  through ``torch.onnx.export(dynamo=True)`` with a dynamic batch axis; the file is then
  run with onnxruntime on a batch and compared with PyTorch (the largest difference is
  reported; the file is not kept if it disagrees). Needs onnx, onnxscript, onnxruntime.
- pt2: ``torch.export`` of the model, dynamic batch. With ``--impl fast`` the fused ops
  stay custom ops (``torch.ops.resattn_fast.*``) in the exported program, so loading it
  needs ``import resattn_fast``; with ``--impl reference`` it is plain ATen.
- safetensors: the state_dict alone, with the network name, class count and the data
  set's normalisation in the metadata; ``create_model(name, checkpoint_path=FILE)`` reads it.

Every file is written beside its target under a temporary name and renamed over it only
once complete (and, for onnx and pt2, verified): a failure leaves nothing half-written.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from contextlib import contextmanager
from typing import Any, Dict, Iterator, Optional, Tuple

import torch

from .errors import UsageError

__all__ = ["FORMATS", "export_onnx", "export_pt2", "export_safetensors", "add_arguments", "run"]

FORMATS = ("onnx", "pt2", "safetensors")
# float32 ONNX Runtime vs PyTorch: different convolution algorithms, so rounding differs;
# the observed gap on attention56_cifar is ~1e-5. A wrong graph differs by O(1).
ONNX_TOLERANCE = 1e-3


def _need(module: str, pip_name: str, what: str) -> Any:
    import importlib

    from .models.weights import missing_package

    try:
        return importlib.import_module(module)
    except ImportError:
        raise UsageError(missing_package(pip_name, what)) from None


@contextmanager
def _atomic_path(path: str) -> Iterator[str]:
    """A temporary path beside ``path``; renamed over it (after fsync) when the body
    finishes, removed when it raises."""
    directory = os.path.dirname(os.path.abspath(path))
    # Same extension as the target: torch.export.save/load insist on ".pt2".
    ext = os.path.splitext(path)[1] or ".tmp"
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=f".tmp{ext}",
                               dir=directory)
    os.close(fd)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        for p in (tmp, tmp + ".data"):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
        raise


def _batches(model: torch.nn.Module, size: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any]:
    """(x, check, expected, batch): a (2, 3, size, size) batch to export with, a batch of 3
    to run the written file on (so the batch axis is shown to be dynamic), the model's
    output on it, and the dynamic batch dimension."""
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    check = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(check)
    return x, check, expected, torch.export.Dim("batch", min=1, max=1 << 16)


def export_onnx(model: torch.nn.Module, path: str, image_size: int, *,
                opset: int = 18) -> float:
    """Write ``model`` (its reference implementation; it is converted in place) as ONNX
    with a dynamic batch axis (input "input" (N, 3, S, S) float32 -> "logits" (N, classes)),
    run the file with onnxruntime on a batch of 3 (traced with 2) and return the largest
    absolute difference from PyTorch. Raises UsageError if it exceeds ONNX_TOLERANCE."""
    from .convert import convert

    _need("onnx", "onnx", "--format onnx")
    _need("onnxscript", "onnxscript", "--format onnx (torch.onnx's exporter)")
    ort = _need("onnxruntime", "onnxruntime", "--format onnx (its check after writing)")
    model = convert(model, "reference").eval().cpu()
    x, check, expected, batch = _batches(model, image_size)
    with _atomic_path(path) as tmp:
        try:
            program = torch.onnx.export(model, (x,), dynamo=True, input_names=["input"],
                                        output_names=["logits"], dynamic_shapes=({0: batch},),
                                        opset_version=opset, verbose=False)
            program.save(tmp, external_data=False)
        except UsageError:
            raise
        except Exception as exc:
            raise UsageError(f"--format onnx: the exporter failed ({_first_line(exc)})") from None
        session = ort.InferenceSession(tmp, providers=["CPUExecutionProvider"])
        got = torch.from_numpy(session.run(None, {"input": check.numpy()})[0])
        diff = float((got - expected).abs().max())
        if not diff <= ONNX_TOLERANCE:
            raise UsageError(f"--format onnx: onnxruntime's output differs from PyTorch's by "
                             f"{diff:.3g} (> {ONNX_TOLERANCE:g}); nothing written")
    return diff


def export_pt2(model: torch.nn.Module, path: str, image_size: int) -> float:
    """``torch.export`` ``model`` (as it is: fast or reference) with a dynamic batch axis
    and save it to ``path``; load the file back, run it on a batch of 3 and return the
    largest absolute difference from the model."""
    model = model.eval()
    x, check, expected, batch = _batches(model, image_size)
    with _atomic_path(path) as tmp:
        try:
            program = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
            torch.export.save(program, tmp)
        except Exception as exc:
            raise UsageError(f"--format pt2: torch.export failed ({_first_line(exc)})") from None
        loaded = torch.export.load(tmp)
        with torch.no_grad():
            got = loaded.module()(check)
        diff = float((got - expected).abs().max())
        if not diff <= ONNX_TOLERANCE:
            raise UsageError(f"--format pt2: the saved program differs from the model by "
                             f"{diff:.3g}; nothing written")
    return diff


def export_safetensors(model: torch.nn.Module, path: str, *, name: str,
                       data: Optional[Dict[str, Any]] = None, epoch: Optional[int] = None) -> None:
    """Write the state_dict of ``model`` with our metadata (see
    :func:`resattn_fast.models.weights.safetensors_bytes`) atomically to ``path``."""
    from .models.weights import WeightsError, safetensors_bytes
    from .train.checkpoint import atomic_write

    try:
        blob = safetensors_bytes(model.state_dict(), model=name, num_classes=model.num_classes,
                                 data=data, epoch=epoch)
    except WeightsError as exc:
        raise UsageError(str(exc)) from None
    atomic_write(path, lambda f: f.write(blob))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `resattn export`."""
    parser.description = (
        "Export a trained network: onnx (reference implementation, dynamic batch, checked with "
        "onnxruntime), pt2 (torch.export; --impl fast keeps the fused ops as custom ops, so "
        "loading needs `import resattn_fast`) or safetensors (weights + name, classes, "
        "normalisation).")
    parser.add_argument("--checkpoint", required=True, metavar="CKPT",
                        help="best.pt / last.pt of `resattn train` (or its RUN_DIR: best.pt), "
                             "or a .safetensors of ours")
    parser.add_argument("--format", required=True, choices=FORMATS, help="what to write")
    parser.add_argument("--out", required=True, metavar="FILE", help="the file to write")
    parser.add_argument("--impl", default=None, choices=("fast", "reference"),
                        help="pt2: the attention modules exported (default: fast); onnx: "
                             "reference only")
    parser.add_argument("--backend", default=None, choices=("reference", "cpu", "cuda", "triton"),
                        help="pt2 with --impl fast: the fused ops' backend (default: the fastest "
                             "on the CPU)")
    parser.add_argument("--opset", type=int, default=18, help="onnx: the ONNX opset (18 or more)")


def run(args: argparse.Namespace) -> int:
    """Entry point of `resattn export`."""
    from .evaluate import _resolve_checkpoint, load_for_eval

    fmt = args.format
    if fmt == "onnx" and args.impl == "fast":
        raise UsageError("--format onnx exports the reference implementation only (ONNX has no "
                         "kernel for the fused resattn_fast ops); drop --impl fast or use "
                         "--format pt2")
    if fmt == "onnx" and args.opset < 18:
        raise UsageError(f"--opset {args.opset}: torch.onnx's exporter writes opset 18 or newer")
    if args.backend is not None and (fmt != "pt2" or args.impl == "reference"):
        raise UsageError("--backend applies to --format pt2 with --impl fast only")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        raise UsageError(f"--out: directory {out_dir} does not exist")
    if os.path.isdir(args.out):
        raise UsageError(f"--out {args.out} is a directory; give a file name")
    if args.backend is not None:
        from .ops._backends import BackendUnavailableError, resolve_backend

        try:
            resolve_backend(args.backend, torch.device("cpu"))
        except BackendUnavailableError as exc:
            raise UsageError(f"--backend: {exc}") from None
    impl = args.impl or ("reference" if fmt == "onnx" else "fast")
    path = _resolve_checkpoint(args.checkpoint)
    model, meta = load_for_eval(path, impl=impl, backend=args.backend)
    name = model.config.name
    data = meta.get("data") or {}
    size = int(data.get("image_size") or model.config.input_size)
    if fmt == "onnx":
        diff = export_onnx(model, args.out, size, opset=args.opset)
        print(f"resattn export: wrote {args.out} ({name}, ONNX opset {args.opset}, reference "
              f"implementation, input (N, 3, {size}, {size})); onnxruntime vs PyTorch on a batch "
              f"of 3: largest difference {diff:.3g}")
    elif fmt == "pt2":
        diff = export_pt2(model, args.out, size)
        fused = "fused ops as torch.ops.resattn_fast.* (load after `import resattn_fast`)" \
            if impl == "fast" else "plain ATen"
        print(f"resattn export: wrote {args.out} ({name}, torch.export, {fused}, input "
              f"(N, 3, {size}, {size})); reloaded vs model on a batch of 3: largest difference "
              f"{diff:.3g}")
    else:
        keep = {k: data[k] for k in ("name", "classes", "mean", "std", "image_size") if k in data}
        export_safetensors(model, args.out, name=name, data=keep or None, epoch=meta.get("epoch"))
        print(f"resattn export: wrote {args.out} ({name}, {model.num_classes} classes, "
              f"{sum(p.numel() for p in model.state_dict().values())} numbers)")
    return 0
