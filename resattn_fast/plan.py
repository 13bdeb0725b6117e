"""``resattn plan``: per checkpointing mode, the largest training batch that fits on a GPU
and the images/s to expect there, predicted by the roofline model (resattn_fast.roofline).

Each mode's step is traced on fake tensors (no GPU, no memory): once at a probe batch for
the memory (the step's peak grows in proportion to the batch), then at the largest batch
that fits, for its predicted time. A prediction, not a measurement: the datasheet's peak
rates, no caches (see docs/perf/roofline/report.md).
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import logging
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional

from .errors import UsageError

__all__ = ["PlanRow", "plan", "add_arguments", "run"]

MODES = ("none", "selective", "full")
_PROBE_BATCH = 64  # as the roofline report traces: the batch-independent part (bf16 weight copies) weighs little
_MAX_IMAGE_SIZE = 4096


@dataclass
class PlanRow:
    """One checkpointing mode: its largest batch, and the predicted step there."""

    mode: str
    max_batch: int  # 0: not even one image fits
    images_per_s: float
    step_ms: float
    peak_bytes_per_image: float
    note: str = ""  # why the mode has no prediction (not available in this model)


def _check(model: str, gpu: str, amp: str, image_size: Optional[int]) -> None:
    from .models import list_models
    from .roofline.devices import GPUS

    names = list_models()
    if model not in names:
        close = difflib.get_close_matches(model, names, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UsageError(f"--model: unknown model {model!r}.{hint} Valid names: {', '.join(names)}")
    if gpu.upper() not in ("H100", "H200", "A100"):
        raise UsageError(f"--gpu: unknown GPU {gpu!r}; choose H100, H200 or A100 (see {', '.join(GPUS)})")
    if amp not in ("bf16", "fp32"):
        raise UsageError(f"--amp: unknown value {amp!r}; choose bf16 or fp32")
    if image_size is not None and not 1 <= image_size <= _MAX_IMAGE_SIZE:
        raise UsageError(f"--image-size must be between 1 and {_MAX_IMAGE_SIZE}, got {image_size}")


def plan(model: str, gpu: str, *, amp: str = "bf16", channels_last: bool = False, image_size: Optional[int] = None,
         modes: tuple = MODES, log: Callable[[str], None] = lambda s: None) -> List[PlanRow]:
    """The PlanRow of each mode for the fast ``model`` on ``gpu`` (H100, H200, A100).
    Raises UsageError for an unknown name or GPU, or a size the network cannot take."""
    _check(model, gpu, amp, image_size)
    from .roofline.devices import lookup
    from .roofline.model import max_batch, predict_step
    from .roofline.step import fast_backend_problem, trace_step

    why = fast_backend_problem()
    if why is not None:
        raise UsageError(f"the planner traces the fused ops through resattn_fast._C, which is not available: {why}")
    dev = lookup(gpu)
    rows = []
    for mode in modes:
        def trace(batch: int, mode: str = mode):  # type: ignore[no-untyped-def]
            return trace_step(model, "fast", batch, amp=amp == "bf16", channels_last=channels_last,
                              checkpointing=mode, image_size=image_size)

        try:
            with _quiet_fake_tensor_log():
                probe = trace(_PROBE_BATCH)
        except ValueError as exc:
            if mode == "selective" and "selective" in str(exc):
                rows.append(PlanRow(mode, 0, float("nan"), float("nan"), float("nan"),
                                    note="not available in this version of resattn_fast"))
                continue
            raise UsageError(f"--image-size {image_size}: {model} cannot take it ({_first_line(exc)})") from None
        except RuntimeError as exc:
            raise UsageError(f"--image-size {image_size}: {model} cannot take it ({_first_line(exc)})") from None
        n = max_batch(probe, dev)
        log(f"  {mode}: largest batch {n}")
        if n < 1:
            rows.append(PlanRow(mode, 0, float("nan"), float("nan"), probe.peak_bytes / probe.batch,
                                note="not even one image fits"))
            continue
        pred = predict_step(trace(n) if n != probe.batch else probe, dev)
        rows.append(PlanRow(mode, n, pred.images_per_s, pred.step_ms, probe.peak_bytes / probe.batch))
    return rows


@contextlib.contextmanager
def _quiet_fake_tensor_log() -> Iterator[None]:
    """FakeTensorMode logs a shape error with its traceback before raising it; a size the
    network cannot take is the user's mistake, reported in one line."""
    logger = logging.getLogger("torch._subclasses.fake_tensor")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a network name (resattn_fast.list_models())")
    p.add_argument("--gpu", required=True, help="H100, H200 or A100 (the datasheet figures of the SXM parts)")
    p.add_argument("--amp", default="bf16", help="bf16 (bfloat16 autocast) or fp32")
    p.add_argument("--channels-last", action="store_true", help="channels_last model and input (default NCHW)")
    p.add_argument("--image-size", type=int, default=None, metavar="N",
                   help="square input size (default: the network's, 224 or 32)")


def run(args: argparse.Namespace) -> int:
    from .models import CONFIGS
    from .roofline.devices import lookup

    _check(args.model, args.gpu, args.amp, args.image_size)
    size = args.image_size or CONFIGS[args.model].input_size
    rows = plan(args.model, args.gpu, amp=args.amp, channels_last=args.channels_last, image_size=args.image_size)
    dev = lookup(args.gpu)
    layout = "channels_last" if args.channels_last else "NCHW"
    dtype = "bfloat16 autocast" if args.amp == "bf16" else "float32"
    print(f"{args.model} (fast) training on {dev.name}, {dtype}, {layout}, {size}x{size}: "
          "PREDICTED by the roofline model, not measured")
    print(f"{'checkpointing':<14}{'max batch':>10}{'images/s':>11}{'ms/step':>10}{'peak MiB/image':>16}")
    for r in rows:
        if r.note:
            print(f"{r.mode:<14}{'-':>10}{'-':>11}{'-':>10}"
                  + (f"{r.peak_bytes_per_image / 2**20:>16.1f}" if r.peak_bytes_per_image == r.peak_bytes_per_image
                     else f"{'-':>16}") + f"  ({r.note})")
            continue
        print(f"{r.mode:<14}{r.max_batch:>10}{r.images_per_s:>11.0f}{r.step_ms:>10.1f}"
              f"{r.peak_bytes_per_image / 2**20:>16.1f}")
    print(f"(usable memory {dev.usable_bytes() / 2**30:.1f} GiB of {dev.memory_gib:g}; datasheet rates, "
          "no caches: real steps are slower, see docs/perf/roofline/report.md)")
    return 0
