"""The ``reference+compile`` row: the reference step as a fusing compiler would run it.

An ideal fusion of the traced eager kernels, not inductor's own decisions: reading those
without a GPU means compiling every network's training step with inductor (for the CPU,
whose fusion rules are not the GPU's), minutes per network on the CI's cores; the rule
below is what inductor's scheduler aims at, and errs on the compiler's side.

- Kept as they are (external kernels, as inductor calls them): convolutions and matrix
  products (cuDNN / cuBLAS), max-pooling and bilinear upsampling with their backward
  passes, and the optimizer step (torch.compile of the model leaves it eager).
- Every other kernel is memory-bound elementwise or reduction work (batch norm, ReLU,
  adds, casts, sigmoid, products, losses). Each run of such kernels between two external
  kernels of one phase becomes fused kernels that read each tensor from outside once and
  write only what something outside reads later (an external kernel, a later kernel,
  backward, the optimizer) or what nothing reads again (results such as running
  statistics and gradients); what stays inside is never written.
- A run is cut after each per-channel reduction whose result the next pass needs (batch
  norm statistics forward, its gradient sums backward, a loss's reductions): the pass that
  applies it reads the tensor again, as inductor's reduction-then-pointwise kernels do.
- Memory is not modelled for this row: AOTAutograd's partitioner recomputes cheap
  elementwise ops in backward rather than saving them, which this rule does not follow.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Dict, Iterable, List, Set

from resattn_fast.roofline.step import StepTrace
from resattn_fast.roofline.trace import COMPILED, CONV, OPTIM, KernelRecord

__all__ = ["COMPILED", "is_external", "fuse_ideal", "compiled_step"]

_EXTERNAL_OPS = ("aten.max_pool2d_with_indices", "aten.max_pool2d_with_indices_backward",
                 "aten.upsample_bilinear2d", "aten.upsample_bilinear2d_backward")


def is_external(rec: KernelRecord) -> bool:
    """Whether a compiler keeps this kernel as it is (no fusion across it)."""
    return (rec.matmul or rec.cls in (CONV, OPTIM) or rec.phase == "optimizer"
            or rec.op.split(" ", 1)[0] in _EXTERNAL_OPS)


def _fused(recs: List[KernelRecord], idx: List[int], readers: Dict[int, List[int]]) -> KernelRecord:
    group = [recs[i] for i in idx]
    members = set(idx)
    produced: Set[int] = set()
    reads: Dict[int, int] = {}
    writes: Dict[int, int] = {}
    last_write: Dict[int, int] = {}
    for i, rec in zip(idx, group):
        for sid, b in rec.reads_io:
            if sid not in produced and sid not in reads:
                reads[sid] = b
        for sid, b in rec.writes_io:
            produced.add(sid)
            writes[sid] = max(b, writes.get(sid, 0))
            last_write[sid] = i
    kept = {}
    for sid, b in writes.items():
        after = [j for j in readers.get(sid, ()) if j > last_write[sid]]
        # read later outside the run, or by nothing (a result: running statistics,
        # gradients): written; read only inside the run: never leaves the registers
        if not after or any(j not in members for j in after):
            kept[sid] = b
    return KernelRecord(
        op="compiled: " + " + ".join(dict.fromkeys(r.op.split(" ", 1)[0] for r in group)),
        cls=COMPILED, phase=group[0].phase, flops=0.0, read_bytes=sum(reads.values()),
        write_bytes=sum(kept.values()), launches=1, dtype=group[-1].dtype, matmul=False,
        reads_io=tuple(reads.items()), writes_io=tuple(kept.items()))


def fuse_ideal(records: Iterable[KernelRecord]) -> List[KernelRecord]:
    """The records with every run of fusible kernels replaced by its fused kernels."""
    recs = list(records)
    readers: Dict[int, List[int]] = {}
    for i, r in enumerate(recs):
        for sid, _ in r.reads_io:
            readers.setdefault(sid, []).append(i)
    out: List[KernelRecord] = []
    idx: List[int] = []

    def flush() -> None:
        if idx:
            out.append(_fused(recs, idx, readers))
            idx.clear()

    for i, r in enumerate(recs):
        if is_external(r) or (idx and recs[idx[0]].phase != r.phase):
            flush()
        if is_external(r):
            out.append(r)
            continue
        idx.append(i)
        if r.reduction:
            flush()
    flush()
    return out


def compiled_step(tr: StepTrace) -> StepTrace:
    """The reference step ``tr`` priced as compiled (impl "reference+compile")."""
    if tr.impl != "reference":
        raise ValueError(f"compiled_step prices the reference step, got impl {tr.impl!r}")
    return replace(tr, impl="reference+compile", records=fuse_ideal(tr.records))
