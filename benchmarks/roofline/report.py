"""Writes a roofline run: results.csv (the suite's long format), report.md and
roofline_breakdown.png (a stacked bar per network and implementation: where the predicted
step goes). Every file is written to a temporary name, synced, then renamed."""

from __future__ import annotations

import csv
import io
import math
import os
import statistics
from typing import TYPE_CHECKING, Dict, List, Sequence

from resattn_fast.roofline.model import StepPrediction
from resattn_fast.roofline.trace import CLASSES, SOFT_MASK_CLASSES

from ..common import CSV_COLUMNS

if TYPE_CHECKING:
    from .suite import RooflineRun

__all__ = ["write_roofline", "atomic_write", "network_table", "fuse_next"]

MEMORY_BOUND_CLASSES = tuple(c for c in CLASSES if c not in ("convolution",) + SOFT_MASK_CLASSES)


def atomic_write(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file, fsync, os.replace."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fmt_bytes(v: float) -> str:
    if v >= 2**30:
        return f"{v / 2**30:.2f} GiB"
    if v >= 2**20:
        return f"{v / 2**20:.1f} MiB"
    return f"{v / 2**10:.1f} KiB"


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> List[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out


def _label(p: StepPrediction) -> str:
    mode = p.trace.checkpointing
    return p.trace.impl if mode == "none" else f"{p.trace.impl}, {mode}"


def _pairs(preds: List[StepPrediction]) -> Dict[str, Dict[str, StepPrediction]]:
    out: Dict[str, Dict[str, StepPrediction]] = {}
    for p in preds:
        out.setdefault(p.trace.net, {})[_label(p)] = p
    return out


_ORDER = ("reference", "fast", "reference+compile", "fast, selective", "fast, full")


def network_table(preds: List[StepPrediction], nets: Sequence[str] = ()) -> List[str]:
    """Markdown table of the predicted step of each network: reference, fast, the reference
    compiled, and the fast network in each checkpointing mode."""
    rows = []
    for net, by in _pairs(preds).items():
        if nets and net not in nets:
            continue
        ref = by.get("reference")
        for label in _ORDER:
            p = by.get(label)
            if p is None:
                continue
            tr = p.trace
            compiled = tr.impl == "reference+compile"
            speed = f"{ref.step_ms / p.step_ms:.2f}x" if ref and label != "reference" else ""
            rows.append([net, f"{tr.batch}x3x{tr.input_size}x{tr.input_size}", tr.impl, tr.checkpointing,
                         f"{tr.fwd_flops_per_image / 1e9:.2f}", f"{p.step_flops / 1e12:.2f}",
                         f"{p.step_bytes / 1e9:.1f}", f"{p.launches}", f"{p.step_ms:.1f}",
                         f"{p.images_per_s:.0f}", speed,
                         "-" if compiled else f"{p.bn_relu_add_share:.1%}", f"{p.soft_mask_share:.1%}",
                         "-" if compiled else _fmt_bytes(tr.activation_bytes),
                         "-" if compiled else _fmt_bytes(tr.peak_bytes),
                         "-" if compiled else f"{p.max_batch}"])
    return _table(["network", "input", "impl", "checkpointing", "fwd GFLOP/image", "step TFLOP", "step GB",
                   "kernels", "predicted ms/step", "images/s", "vs reference", "BN+ReLU+add",
                   "soft-mask ops", "activations kept", "step peak", "max batch"], rows)


def _share_table(preds: List[StepPrediction]) -> List[str]:
    preds = [p for p in preds if p.trace.checkpointing == "none"]
    used = [c for c in CLASSES if any(p.class_ms.get(c, 0) > 0 for p in preds)]
    rows = []
    for p in preds:
        rows.append([p.trace.net, p.trace.impl] + [f"{p.share(c):.1%}" for c in used]
                    + [f"{p.soft_mask_share:.1%}", f"{p.compute_bound_ms / p.step_ms:.1%}"])
    return _table(["network", "impl", *used, "soft-mask ops (sum)", "compute-bound kernels"], rows)


def _modes_table(preds: List[StepPrediction]) -> List[str]:
    """Each checkpointing mode of the fast network against the reference without it."""
    rows = []
    for net, by in _pairs(preds).items():
        ref = by.get("reference")
        if ref is None:
            continue
        for label in ("reference", "fast", "fast, selective", "fast, full"):
            p = by.get(label)
            if p is None:
                continue
            rows.append([net, p.trace.impl, p.trace.checkpointing, _fmt_bytes(p.trace.activation_bytes),
                         _fmt_bytes(p.trace.peak_bytes), f"{p.max_batch}",
                         f"{p.max_batch / ref.max_batch:.2f}x" if ref.max_batch else "-",
                         f"{p.step_ms:.1f}", f"{ref.step_ms / p.step_ms:.2f}x"])
    return _table(["network", "impl", "checkpointing", "activations kept", "step peak", "max batch",
                   "max batch vs reference", "predicted ms/step", "step speed vs reference"], rows)


def _tiny_kernels(preds: List[StepPrediction]) -> List[str]:
    """Kernels of the fast step that move under 64 KiB: their time is launch overhead."""
    from collections import Counter

    from resattn_fast.roofline.model import kernel_seconds

    rows = []
    for p in preds:
        if p.trace.impl != "fast" or p.trace.checkpointing != "none":
            continue
        tiny = [r for r in p.trace.records if r.bytes < 65536 and not r.flops and r.launches]
        ops: Counter = Counter()
        for r in tiny:
            ops[(r.op, r.phase)] += r.launches
        ms = 1e3 * sum(kernel_seconds(r, p.gpu) for r in tiny)
        top = ", ".join(f"{op} ({phase}) x{n}" for (op, phase), n in ops.most_common(3))
        rows.append([p.trace.net, f"{sum(ops.values())}", f"{ms:.2f}", f"{ms / p.step_ms:.1%}", top])
    return _table(["network", "kernels under 64 KiB", "predicted ms", "share of the fast step",
                   "most frequent"], rows)


def _inductor_lines(run: RooflineRun) -> List[str]:
    """The inductor cross-check (inductor_check.py): its kernels beside the ideal fusion's at
    batch 2, and the compiled row of that network re-priced with them."""
    chk = run.inductor_check or {}
    net, batch = chk.get("net"), chk.get("batch")
    out = [f"`--inductor-check {net}`: the reference step of {net} (batch {batch}, this run's dtype and layout) "
           "compiled through AOTAutograd and lowered and scheduled by inductor with the Triton backend's "
           "fusion rules, stopping before code generation (inductor_check.py), beside fusion.py's ideal "
           "fusion of the same step. Generated kernels only (convolutions, matrix products and fallbacks "
           "left out on both sides); bytes: inductor's own count per kernel.", ""]
    if chk.get("error"):
        return out + [f"Inductor failed here: {chk['error']}", ""]
    ind, ideal = chk["inductor"], chk["ideal"]  # type: ignore[index]
    rows = []
    for phase in ("forward", "backward"):
        i, d = ind[phase], ideal[phase]
        rows.append([phase, f"{i['kernels']}", _fmt_bytes(i["bytes"]), f"{d['kernels']}", _fmt_bytes(d["bytes"]),
                     f"{i['kernels'] / d['kernels']:.2f}x" if d["kernels"] else "-",
                     f"{i['bytes'] / d['bytes']:.2f}x" if d["bytes"] else "-"])
    out += _table(["phase", "inductor kernels", "inductor bytes", "ideal kernels", "ideal bytes",
                   "kernels inductor / ideal", "bytes inductor / ideal"], rows) + [""]
    fallbacks = {k: v for p in ("forward", "backward") for k, v in ind[p]["extern"].items()
                 if "convolution" not in k and "mm" not in k and k != "MultiOutput"}
    if fallbacks:
        out += ["Other external kernels inductor kept: " + ", ".join(f"{k} x{v}" for k, v in fallbacks.items()), ""]
    by = _pairs(run.predictions).get(str(net), {})
    comp, fast = by.get("reference+compile"), by.get("fast")
    if comp is not None and fast is not None:
        from resattn_fast.roofline.trace import COMPILED

        extra_ms = 0.0
        for phase in ("forward", "backward"):
            i, d = ind[phase], ideal[phase]
            fused = sum(r.bytes for r in comp.trace.records if r.phase == phase and r.cls == COMPILED)
            extra_ms += 1e3 * (i["kernels"] - d["kernels"]) * run.gpu.launch_s
            if d["bytes"]:
                extra_ms += 1e3 * (i["bytes"] / d["bytes"] - 1.0) * fused / run.gpu.bandwidth
        adjusted = comp.step_ms + extra_ms
        out += [f"Re-priced with inductor's kernel count and its bytes ratio of each phase, {net}'s compiled step "
                f"at batch {comp.trace.batch} would be {adjusted:.1f} ms instead of {comp.step_ms:.1f} ms: "
                f"compiled / fast = {adjusted / fast.step_ms:.2f} (ideal: {comp.step_ms / fast.step_ms:.2f}). "
                "An estimate: inductor's fusion at batch 2 can differ from batch 64's (persistent reductions "
                "at small sizes).", ""]
    return out


def _targets(preds: List[StepPrediction]) -> List[str]:
    """The issues' targets for the prediction, each with the predicted figure (only those
    this run's networks and rows allow)."""
    pairs = _pairs(preds)
    out: List[str] = []

    def line(ok: bool, what: str, figure: str) -> None:
        out.append(f"- {'met' if ok else 'NOT met'}: {what}: {figure}")

    def speed(net: str, label: str) -> float:
        by = pairs.get(net, {})
        return by["reference"].step_ms / by[label].step_ms if "reference" in by and label in by else math.nan

    if "attention92" in pairs:
        v = speed("attention92", "fast")
        line(v >= 1.25, "Attention-92 fast vs reference >= 1.25x", f"{v:.2f}x")
    imagenet = [n for n in pairs if not n.endswith("_cifar")]
    sp = {n: speed(n, "fast") for n in imagenet}
    if sp:
        worst = min(sp, key=lambda n: sp[n])
        line(sp[worst] >= 1.2, "every ImageNet network fast vs reference >= 1.2x",
             ", ".join(f"{n} {v:.2f}x" for n, v in sp.items()))
    fast = [by["fast"] for by in pairs.values() if "fast" in by]
    if fast:
        # The baseline ("now 56%") is the mean over the fast networks of the
        # shares in the "what to fuse next" table (batch norm 22.9% + ReLU 20.6% + add
        # 12.6%), so the target is read on that mean; every network's share is listed
        # beside it, and those above 50% are named.
        shares = {p.trace.net: p.bn_relu_add_share for p in fast}
        mean = sum(shares.values()) / len(shares)
        above = [f"{n} {v:.1%}" for n, v in shares.items() if v > 0.5]
        line(mean <= 0.5, "BN+ReLU+add (fused or not) <= 50% of the fast step, mean over the fast networks "
             "(the issue's 56% was this mean)",
             f"{mean:.1%}; per network {min(shares.values()):.1%} to {max(shares.values()):.1%}"
             + (f" (above 50%: {', '.join(above)})" if above else ""))
    comp = {n: by["reference+compile"].step_ms / by["fast"].step_ms for n, by in pairs.items()
            if "fast" in by and "reference+compile" in by}
    if comp:
        line(min(comp.values()) >= 1.0, "fast no slower than reference+compile (compiled ms / fast ms >= 1)",
             ", ".join(f"{n} {v:.2f}" for n, v in comp.items()))
        if min(comp.values()) < 1.0:
            from resattn_fast.roofline.model import kernel_seconds

            parts = []
            for n, by in pairs.items():
                if "fast" not in by or "reference+compile" not in by:
                    continue
                f, c = by["fast"], by["reference+compile"]
                tiny = 1e3 * sum(kernel_seconds(r, f.gpu) for r in f.trace.records
                                 if r.bytes < 65536 and not r.flops)
                parts.append(f"{n} {f.step_ms - c.step_ms:.1f} ms (in the fast step, overlapping: launch-bound "
                             f"kernels {tiny:.1f} ms, "
                             f"residual adds and gradient sums {f.class_ms.get('add', 0.0):.1f} ms, AMP casts "
                             f"{f.class_ms.get('cast (AMP)', 0.0):.1f} ms; the compiled step fuses these into "
                             "its neighbours)")
            out.append("  - fast minus compiled: " + "; ".join(parts))
    by = pairs.get("attention452", {})
    ref = by.get("reference")
    if ref is not None and ref.max_batch:
        for label, need in (("fast, selective", 1.6), ("fast, full", 3.0)):
            if label in by:
                v = by[label].max_batch / ref.max_batch
                line(v >= need, f"Attention-452 max batch, {label.split(', ')[1]} vs reference (no checkpointing) "
                     f">= {need:g}x", f"{by[label].max_batch} vs {ref.max_batch} = {v:.2f}x")
        if "fast, selective" in by:
            v = ref.step_ms / by["fast, selective"].step_ms
            line(v > 1.0, "Attention-452 selective step faster than the reference's without checkpointing",
                 f"{v:.2f}x")
    return out


def fuse_next(preds: List[StepPrediction]) -> List[tuple]:
    """Memory-bound classes of the fast model ranked by their mean share of the step:
    (class, mean share, min share, max share)."""
    fast = [p for p in preds if p.trace.impl == "fast" and p.trace.checkpointing == "none"]
    out = []
    for c in MEMORY_BOUND_CLASSES:
        shares = [p.share(c) for p in fast]
        if shares and max(shares) > 0:
            out.append((c, statistics.mean(shares), min(shares), max(shares)))
    return sorted(out, key=lambda t: -t[1])


def _ops_table(run: RooflineRun) -> List[str]:
    by: Dict[tuple, Dict[str, Dict[str, object]]] = {}
    for r in run.op_rows:
        by.setdefault((r["name"], r["shape"], r["dtype"], r["layout"], r["mode"]), {})[str(r["impl"])] = r
    rows = []
    for (name, shape, dtype, layout, mode), d in by.items():
        e, f = d.get("eager"), d.get("fused")
        if not e or not f:
            continue
        rows.append([name, shape, dtype, layout, mode, _fmt_bytes(float(e["bytes"])), f"{e['kernels']:.0f}",
                     f"{float(e['ms']) * 1e3:.1f} us", _fmt_bytes(float(f["bytes"])), f"{f['kernels']:.0f}",
                     f"{float(f['ms']) * 1e3:.1f} us", f"{float(e['ms']) / float(f['ms']):.2f}x"])
    return _table(["op", "shape", "dtype", "layout", "mode", "eager bytes", "eager kernels", "eager predicted",
                   "fused bytes", "fused kernels", "fused predicted", "eager / fused"], rows)


def _fmt_value(v: float, unit: str) -> str:
    return f"{v:.3f} ms" if unit == "ms" else f"{v:.0f} {unit}"


def _calibration_lines(run: RooflineRun) -> List[str]:
    cal = run.calibration
    out: List[str] = []
    for kind, title in (("step", "Network training steps (models suite, plain SGD as it runs)"),
                        ("max_batch", "Largest training batch that fits (models suite's search; mode "
                                      "train+ckpt: full checkpointing)"),
                        ("op", "Fused ops and their eager expressions (ops suite)")):
        rows = [c for c in cal if c["kind"] == kind]
        if not rows:
            continue
        ratios = [float(c["ratio"]) for c in rows if math.isfinite(float(c["ratio"]))]
        out += [f"### {title}", ""]
        if ratios:
            out += [f"measured / predicted: median {statistics.median(ratios):.2f}, range {min(ratios):.2f} to "
                    f"{max(ratios):.2f} over {len(ratios)} rows (1 = the model is exact"
                    + ("; above 1 = slower than predicted" if kind != "max_batch" else "") + ").", ""]
        out += _table(["name", "impl", "backend", "mode", "dtype", "layout", "shape", "measured", "predicted",
                       "measured / predicted"],
                      [[c["name"], c["impl"], c["backend"], c["mode"], c["dtype"], c["layout"], c["shape"],
                        _fmt_value(float(c["measured"]), str(c["unit"])),
                        _fmt_value(float(c["predicted"]), str(c["unit"])),
                        f"{float(c['ratio']):.2f}"] for c in rows])
        out.append("")
    return out


def _plot(preds: List[StepPrediction], title: str) -> bytes:
    """PNG bytes of the stacked bars, or b"" when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return b""
    pairs = _pairs(preds)
    labels, stacks = [], []
    for net, by in pairs.items():
        ref = by.get("reference")
        for impl in ("reference", "reference+compile", "fast"):
            p = by.get(impl)
            if p is None:
                continue
            base = ref.step_ms if ref else p.step_ms
            labels.append(f"{net} {impl}")
            stacks.append({c: 100.0 * p.class_ms.get(c, 0.0) / base for c in CLASSES})
    used = [c for c in CLASSES if any(s[c] > 0 for s in stacks)]
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(labels) + 1.8))
    cmap = plt.get_cmap("tab20")
    for i in range(len(labels)):
        left = 0.0
        for k, c in enumerate(used):
            w = stacks[i][c]
            ax.barh(i, w, left=left, color=cmap(k % 20), label=c if i == 0 else None)
            left += w
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("predicted step time, % of the network's reference step (prediction, not a measurement)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.12 - 0.2 / max(len(labels), 1)))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def write_roofline(run: RooflineRun, out_dir: str) -> Dict[str, str]:
    """Write results.csv, report.md and (with predictions) roofline_breakdown.png."""
    res, gpu = run.res, run.gpu
    preds: List[StepPrediction] = run.predictions
    os.makedirs(out_dir, exist_ok=True)
    paths: Dict[str, str] = {}
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    w.writeheader()
    for rec in res.csv_records():
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in rec.items()})
    paths["csv"] = os.path.join(out_dir, "results.csv")
    atomic_write(paths["csv"], buf.getvalue().encode())

    dt = "bfloat16 autocast (AMP)" if run.dtype == "bf16" else "float32 (convolutions in TF32)"
    layout = "channels_last" if run.channels_last else "NCHW"
    lines = ["# resattn_fast roofline model: predicted GPU training step", "",
             "**A model (prediction), not a measurement.** Every number below comes from tracing the step on "
             "fake tensors on a CPU and pricing each kernel with datasheet figures.", "",
             f"- command: `{res.command}`",
             f"- GPU modelled: **{gpu.name}**: {gpu.bandwidth_gbs:g} GB/s DRAM; dense matrix rate bf16 "
             f"{gpu.matmul_tflops['bfloat16']:g}, TF32 {gpu.matmul_tflops['tf32']:g}, float32 {gpu.fp32_tflops:g} "
             f"TFLOP/s; {gpu.memory_gib:g} GiB; launch overhead {gpu.launch_us:g} us per kernel",
             f"- source: {gpu.source}"]
    for k, v in gpu.overridden.items():
        lines.append(f"- override, {k}: {v}")
    lines += [f"- traced on: {res.info.get('traced_on')} with torch {res.info.get('torch')} "
              f"(python {res.info.get('python')}); {res.timestamp}",
              f"- configuration: {dt}, {layout}; optimizer "
              + ("as the measured run (plain SGD, foreach)" if run.calibration else
                 "SGD with Nesterov momentum 0.9 and weight decay 1e-4 (the training recipe), foreach"),
              f"- wall time of this run: {res.suites_s.get('roofline', 0):.0f} s"
              + (" (tracing: " + ", ".join(f"{k} {v:.1f} s" for k, v in run.trace_s.items()) + ")"
                 if run.trace_s else ""), "",
              "## The model", "",
              "- One training step (forward under autocast, cross-entropy, backward, optimizer step; momentum "
              "buffers already allocated) runs under FakeTensorMode; a TorchDispatchMode records every aten op "
              "and every `torch.ops.resattn_fast` op it launches (views and allocations launch nothing).",
              "- FLOPs: torch.utils.flop_counter's formulas (FlopCounterMode's table): convolutions and matrix "
              "products. Bytes: each tensor an op reads or writes, once (an ideal single pass; a convolution's "
              "backward is two kernels, dgrad and wgrad, each reading the output gradient).",
              "- Time of a kernel: max(FLOPs / dense matrix rate, bytes / DRAM bandwidth) + launches x launch "
              "overhead (foreach ops: ATen's multi_tensor_apply launch count). Caches are ignored and peak "
              "rates assumed, so times are lower bounds; real kernels reach a fraction of peak, "
              "convolutions with few channels the least. The shares of the memory-bound classes are the "
              "robust output; `--measured` (one GPU run) says how far the absolute times are off.",
              "- Op classes: generic elementwise ops (add, mul, copy) inside the soft-mask ops count as "
              "`upsample` (the eager upsample and its skip add) or `sigmoid/multiply` (the eager (1 + "
              "sigmoid(m)) * t), forward and backward; `add` is the residual adds and the gradient sums.",
              "- Batch norm as its kernels run it. Eager (ATen's CUDA kernels, Normalization.cu; the path "
              "PyTorch takes for bfloat16): training forward = a statistics kernel (reads x), a per-channel "
              "kernel (running update, inverse std), the elementwise kernel (reads x, writes y): three tensor "
              "passes; eval = the elementwise kernel alone; backward = batch_norm_backward_reduce (reads grad "
              "and x) then batch_norm_backward_elemt (reads grad and x, writes grad_x); NCHW runs the two as "
              "one kernel reading both twice (same bytes, one launch). Fused BN-ReLU (`batch_norm_relu`, "
              "class `fused BN-ReLU`, the CUDA kernels, one launch per pass as their emulated launch log "
              "shows): training forward = statistics (reads x; each channel finalized by its last block, "
              "same launch) then normalise+ReLU (reads x, writes out); eval one kernel; backward = reduction "
              "(reads grad and x; finalized in the same launch) then apply (reads grad, x and, where the "
              "unit's input feeds the identity shortcut, its gradient; writes grad_x); "
              "`batch_norm_update_stats` one small kernel (the running statistics and the module's "
              "`num_batches_tracked += 1`, which eager runs as a kernel of its own); "
              "`batch_norm_relu_with_update` (the fast modules in training) the training forward's two "
              "kernels, the normalise kernel's first block also updating the running statistics and the "
              "count (no kernel of its own).",
              "- Not modelled: caches (L2 reuse between kernels, e.g. a statistics pass and the elementwise "
              "pass that follows it on a tensor that fits in L2), cuDNN's algorithm choices, the CPU side "
              "of eager dispatch, PyTorch's CUDA upsample backward zero-filling grad_x and scattering with "
              "atomics (the model prices the ideal one pass, so it flatters eager there).",
              "- `reference+compile`: the reference step with an ideal fusion of its memory-bound kernels "
              "(benchmarks/roofline/fusion.py), not inductor's own decisions, which take minutes per network "
              "to read on a CPU (`--inductor-check NET` does it for one network, below). Convolutions, matrix products, max-pool, "
              "upsample and the optimizer stay as they are; every run of other kernels between two of them "
              "reads each outside tensor once and writes only what is read outside the run (or never again), "
              "cut after each per-channel reduction (batch norm statistics, its gradient sums), whose "
              "result the next pass reads the tensor again for, as inductor's reduction-then-pointwise "
              "kernels do. It errs on the compiler's side (no cache misses, every chain fused); its memory "
              "is not modelled (AOTAutograd's partitioner recomputes cheap elementwise ops in backward).",
              "- Memory: parameters + gradients + momentum + buffers + the step's peak of everything else "
              "(activations kept for backward, gradients and temporaries in flight, recomputation): every "
              "storage the step creates is followed from its op to its death on fake tensors, so "
              "checkpointed regions count as they run (saved-tensor hooks would not see inside them); "
              "the input batch counts, autocast's bfloat16 weight copies too. Max batch = the largest batch "
              "whose peak fits in 99% of the capacity less 1.5 GiB (context, cuDNN workspaces), less 5% "
              "(allocator), the peak taken as proportional to the batch.", ""]
    if preds:
        targets = _targets(preds)
        if targets:
            lines += ["## The issues' targets, against this prediction", ""] + targets + [""]
        lines += ["## Networks (prediction)", ""] + network_table(preds) + [""]
        if any(p.trace.checkpointing != "none" for p in preds):
            lines += ["## Checkpointing modes (prediction)", "",
                      "`model.set_grad_checkpointing(mode)` traced as set: the recomputation appears in the "
                      "backward trace by itself. Activations kept: alive when the forward pass ends; step peak: "
                      "the most alive at once until the backward pass ends (recomputation included); both "
                      "followed storage by storage, inside checkpointed regions too, with the input batch, "
                      "without parameters, gradients and optimizer state. `resattn plan --model NAME --gpu "
                      "H100|H200|A100` gives, from the same model, the largest batch of each mode and the "
                      "images/s predicted there.", ""] + _modes_table(preds) + [""]
        lines += ["## Where the step goes (share of predicted time, prediction)", ""] + _share_table(preds) + [""]
        nxt = fuse_next(preds)
        if nxt:
            lines += ["## Memory-bound classes of the fast networks, by predicted share (what to fuse next)", ""]
            lines += _table(["class", "mean share", "min", "max"],
                            [[c, f"{m:.1%}", f"{lo:.1%}", f"{hi:.1%}"] for c, m, lo, hi in nxt]) + [""]
    if run.inductor_check:
        lines += ["## The compiled row against inductor's own scheduler (cross-check)", ""] + _inductor_lines(run)
    if any(p.trace.impl == "fast" for p in preds):
        lines += ["## Launch-bound kernels of the fast step (prediction)", "",
                  "Kernels that move under 64 KiB cost their launch (the model's 4 us each), whatever they do.",
                  ""] + _tiny_kernels(preds) + [""]
    if run.op_rows:
        lines += ["## Fused ops at the ops suite's headline shapes (prediction)", ""] + _ops_table(run) + [""]
    if run.calibration:
        lines += ["## Calibration: measured / predicted", "",
                  f"Measured rows: `{run.measured_path}`; predictions for exactly those configurations.", ""]
        lines += _calibration_lines(run)
    if preds:
        png = _plot(preds, f"Predicted training step by op class, {gpu.name}, {dt}, {layout} (roofline model)")
        if png:
            paths["png"] = os.path.join(out_dir, "roofline_breakdown.png")
            atomic_write(paths["png"], png)
            lines += ["## Plot", "", "![where each network's predicted step goes](roofline_breakdown.png)", ""]
        else:
            res.notes.append("plot not drawn: matplotlib unavailable")
    if res.notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in res.notes] + [""]
    paths["report"] = os.path.join(out_dir, "report.md")
    atomic_write(paths["report"], ("\n".join(lines).rstrip() + "\n").encode())
    return paths
