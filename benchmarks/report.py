"""Writes a run's results: results.csv (long format), report.md and PNG plots.

The report compares every implementation with the eager reference (ops: ``eager``;
networks: ``reference``), states which backend ran each row, and says in words where a
fused op is slower than eager or torch.compile. Plots use matplotlib's Agg backend.
"""

from __future__ import annotations

import csv
import math
import os
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

from .common import CSV_COLUMNS, Results, Row

__all__ = ["write_outputs", "headline_lines", "impl_label", "CPU_TARGETS", "GPU_TARGETS",
           "CHECKPOINTING_TARGETS"]

OPS = ("upsample_bilinear_add", "attention_residual")
MODES = ("fwd", "bwd", "fwd+bwd")

# Speed targets from the project's issues, checked whenever the run has the rows.
# (op, layout or None for both, mode, versus, minimum ratio)
CPU_TARGETS: List[Tuple[str, Optional[str], str, str, float]] = [
    ("upsample_bilinear_add", None, "fwd", "compile", 1.0),
    ("upsample_bilinear_add", None, "fwd+bwd", "compile", 1.0),
    ("attention_residual", None, "fwd", "compile", 1.0),
    ("attention_residual", None, "fwd+bwd", "compile", 1.0),
    ("upsample_bilinear_add", "nchw", "fwd", "eager", 3.0),
    ("upsample_bilinear_add", "channels_last", "fwd", "eager", 1.2),
    ("attention_residual", None, "fwd", "eager", 1.5),
    ("upsample_bilinear_add", None, "fwd+bwd", "eager", 1.3),
    ("attention_residual", None, "fwd+bwd", "eager", 1.3),
]
# GPU: forward and backward at the stage-1 shape, bfloat16, channels_last.
GPU_TARGETS: List[Tuple[str, Optional[str], str, str, float]] = [
    (op, "channels_last", mode, vs, ratio)
    for op in OPS for mode in ("fwd", "bwd")
    for vs, ratio in (("copy", 0.85), ("compile", 1.0), ("eager", 2.0))
]


def impl_label(row: Row) -> str:
    """Short column name: eager, compile, fused[cpu]; reference, fast[cuda]+compile."""
    if row.suite == "ops":
        return row.impl if row.impl in ("eager", "compile", "copy") else f"{row.impl}[{row.backend}]"
    if row.impl.startswith("fast"):
        return row.impl.replace("fast", f"fast[{row.backend}]", 1)
    return row.impl


def _fmt_ms(v: float) -> str:
    if v >= 100:
        return f"{v:.0f} ms"
    if v >= 10:
        return f"{v:.1f} ms"
    if v >= 0.1:
        return f"{v:.2f} ms"
    return f"{v * 1e3:.1f} us"


def _fmt_bytes(v: float) -> str:
    if v >= 2**30:
        return f"{v / 2**30:.2f} GiB"
    if v >= 2**20:
        return f"{v / 2**20:.1f} MiB"
    if v >= 2**10:
        return f"{v / 2**10:.1f} KiB"
    return f"{v:.0f} B"


def _ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


def _fmt_x(r: float) -> str:
    if not math.isfinite(r):
        return "n/a"
    return f"{r:.2f}x" if r >= 0.1 else f"{r:.2g}x"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> List[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out


def _ops_labels(res: Results) -> List[str]:
    labels: OrderedDict[str, None] = OrderedDict()
    for r in res.rows:
        if r.suite == "ops" and r.impl != "copy":
            labels[impl_label(r)] = None
    order = {"eager": 0, "compile": 1}
    return sorted(labels, key=lambda s: order.get(s, 2))


def _time(res: Results, label: str, **kw: str) -> Optional[Row]:
    for r in res.find(suite="ops", metric="time", **kw):
        if impl_label(r) == label:
            return r
    return None


def _metric(res: Results, label: str, metric: str, **kw: str) -> Optional[Row]:
    for r in res.find(metric=metric, **kw):
        if impl_label(r) == label:
            return r
    return None


def _headline_rows(res: Results) -> List[Row]:
    """The eager time rows of the headline cases (one per op, dtype, layout, mode)."""
    heads = res.headline
    dt = "float32" if res.device.type == "cpu" else "bfloat16"
    return [r for r in res.find(suite="ops", metric="time", impl="eager", dtype=dt)
            if r.shape in heads]


def headline_lines(res: Results) -> List[str]:
    """The headline table (markdown) and one plain sentence per fused row."""
    labels = _ops_labels(res)
    fused = [lb for lb in labels if lb.startswith("fused")]
    rows, sentences = [], []
    for e in _headline_rows(res):
        key = dict(name=e.name, dtype=e.dtype, layout=e.layout, shape=e.shape, mode=e.mode)
        comp = _time(res, "compile", **key)
        cells = [e.name, e.shape, e.layout, e.mode, _fmt_ms(e.median),
                 _fmt_ms(comp.median) if comp else "—"]
        for lb in fused:
            f = _time(res, lb, **key)
            if f is None:
                cells += ["—", "—", "—", "—"]
                continue
            vs_e = _ratio(e.median, f.median)
            vs_c = _ratio(comp.median, f.median) if comp else math.nan
            bw = _metric(res, lb, "bw_vs_copy", suite="ops", **key)
            cells += [_fmt_ms(f.median), _fmt_x(vs_e), _fmt_x(vs_c),
                      f"{bw.median:.0%}" if bw else "—"]
            what = f"{lb} {e.name} {e.mode} ({e.layout}, {e.dtype}, {e.shape})"
            parts = []
            for other, r in (("eager", vs_e), ("torch.compile", vs_c)):
                if not math.isfinite(r):
                    continue
                if r >= 1.0:
                    parts.append(f"{r:.2f}x as fast as {other}")
                else:
                    parts.append(f"SLOWER than {other} ({r:.2f}x, i.e. takes {1 / r:.2f}x the time)")
            if parts:
                sentences.append(f"- {what}: " + "; ".join(parts) + ".")
        rows.append(cells)
    if not rows:
        return []
    header = ["op", "shape", "layout", "mode", "eager", "compile"]
    for lb in fused:
        header += [lb, f"{lb} vs eager", f"{lb} vs compile", "bw / copy"]
    return _table(header, rows) + [""] + sentences


def _target_lines(res: Results) -> List[str]:
    heads = res.headline
    if res.device.type == "cpu":
        targets, dt = CPU_TARGETS, "float32"
        title = "Targets of the CPU kernels (2 threads, float32, headline shapes)"
    else:
        targets, dt = GPU_TARGETS, "bfloat16"
        title = "Targets of the GPU kernels (stage-1 shape of Attention-92, bfloat16, channels_last)"
    fused = [lb for lb in _ops_labels(res) if lb.startswith("fused")]
    out = []
    for lb in fused:
        for op, layout, mode, vs, need in targets:
            for lay in ([layout] if layout else ["nchw", "channels_last"]):
                for shape in sorted(heads):
                    f = _time(res, lb, name=op, dtype=dt, layout=lay, mode=mode, shape=shape)
                    if f is None:
                        continue
                    if vs == "copy":
                        bw = _metric(res, lb, "bw_vs_copy", suite="ops", name=op, dtype=dt,
                                     layout=lay, mode=mode, shape=shape)
                        got = bw.median if bw else math.nan
                        shown, want = f"{got:.0%} of copy", f">= {need:.0%} of copy"
                    else:
                        o = _time(res, vs, name=op, dtype=dt, layout=lay, mode=mode, shape=shape)
                        got = _ratio(o.median, f.median) if o else math.nan
                        shown, want = _fmt_x(got), f">= {need:g}x {vs}"
                    verdict = "n/a" if not math.isfinite(got) else ("met" if got >= need else "NOT MET")
                    out.append([lb, op, shape, lay, mode, want, shown, verdict])
    if not out:
        return []
    return [f"### {title}", ""] + _table(
        ["impl", "op", "shape", "layout", "mode", "target", "measured", "verdict"], out) + [""]


def _ops_time_lines(res: Results) -> List[str]:
    labels = _ops_labels(res)
    out: List[str] = []
    for op in OPS:
        rows = []
        for e in res.find(suite="ops", name=op, metric="time", impl="eager"):
            key = dict(name=op, dtype=e.dtype, layout=e.layout, shape=e.shape, mode=e.mode)
            cells = [e.shape, res.labels.get(e.shape, ""), e.dtype, e.layout, e.mode,
                     f"{_fmt_ms(e.median)} [{_fmt_ms(e.p20)}, {_fmt_ms(e.p80)}]"]
            for lb in labels[1:]:
                r = _time(res, lb, **key)
                cells.append(f"{_fmt_ms(r.median)} ({_fmt_x(_ratio(e.median, r.median))})" if r else "—")
            rows.append(cells)
        if rows:
            out += [f"### {op}: time, and speedup vs eager (higher is better)", ""]
            out += _table(["shape", "where", "dtype", "layout", "mode", "eager [p20, p80]", *labels[1:]], rows)
            out.append("")
    return out


def _ops_bw_lines(res: Results) -> List[str]:
    labels = _ops_labels(res)
    rows = []
    for e in res.find(suite="ops", metric="bw_vs_copy", impl="eager"):
        key = dict(suite="ops", name=e.name, dtype=e.dtype, layout=e.layout, shape=e.shape, mode=e.mode)
        cells = [e.name, e.shape, e.dtype, e.layout, e.mode]
        for lb in labels:
            r = _metric(res, lb, "bw_vs_copy", **key)
            g = _metric(res, lb, "bandwidth", **key)
            cells.append(f"{g.median:.1f} GB/s ({r.median:.0%})" if r and g else "—")
        rows.append(cells)
    if not rows:
        return []
    copies = res.find(suite="ops", name="copy", metric="bandwidth")
    lo = min((c.median for c in copies), default=math.nan)
    hi = max((c.median for c in copies), default=math.nan)
    return ["### Effective bandwidth (bytes an ideal pass reads + writes / time) and its fraction of copy", "",
            f"Tensor.copy_ of the same number of bytes, measured in this run: {lo:.1f} to {hi:.1f} GB/s.", ""] + \
        _table(["op", "shape", "dtype", "layout", "mode", *labels], rows) + [""]


def _ops_mem_lines(res: Results) -> List[str]:
    labels = _ops_labels(res)
    rows = []
    for e in res.find(suite="ops", metric="saved_bytes", impl="eager"):
        key = dict(suite="ops", name=e.name, dtype=e.dtype, layout=e.layout, shape=e.shape, mode=e.mode)
        cells = [e.name, e.shape, e.dtype, e.layout]
        for lb in labels:
            r = _metric(res, lb, "saved_bytes", **key)
            n = _metric(res, lb, "saved_tensors", **key)
            if r is None:
                cells.append("—")
                continue
            ratio = "" if lb == "eager" or not e.median else f", {_fmt_x(_ratio(r.median, e.median))} of eager"
            cells.append(f"{_fmt_bytes(r.median)} ({int(n.median) if n else '?'} saved{ratio})")
        rows.append(cells)
    if not rows:
        return []
    return ["### Memory kept for backward (saved_tensors_hooks; unique storages, inputs included)", ""] + \
        _table(["op", "shape", "dtype", "layout", *labels], rows) + [""]


_CKPT_ORDER = {"selective": 1, "full": 2}

# Memory and speed targets of the gradient-checkpointing modes (issue 16): activation
# bytes at most this fraction of the reference's, training step time at most this multiple
# of the fast model's without checkpointing.
CHECKPOINTING_TARGETS: Dict[str, Tuple[float, float]] = {"selective": (0.6, 1.10), "full": (0.3, 1.45)}


def _ckpt_mode(mode: str) -> str:
    """The checkpointing mode of a models row's mode ("train+selective" -> "selective")."""
    last = mode.rsplit("+", 1)[-1]
    return last if last in _CKPT_ORDER else "none"


def _mode_label(r: Row) -> str:
    """impl label with the row's checkpointing mode: "fast[cpu]+selective"."""
    ckpt = _ckpt_mode(r.mode)
    return impl_label(r) + ("" if ckpt == "none" else "+" + ckpt)


def _model_labels(res: Results) -> List[str]:
    labels: OrderedDict[str, None] = OrderedDict()
    for r in res.rows:
        if r.suite == "models" and r.metric != "max_batch":
            labels[impl_label(r)] = None
    return sorted(labels, key=lambda s: (not s.startswith("reference"), "compile" in s, s))


def _memory_lines(res: Results) -> List[str]:
    """Per network: activations kept for backward and the peak of one training step
    (every storage the step allocates, benchmarks/memory.py), and the step time, for the
    reference and each checkpointing mode of the fast model; then the targets."""
    rows, targets = [], []
    nets = OrderedDict(((r.name, r.shape, r.dtype), None) for r in res.rows
                       if r.suite == "models" and r.metric == "activation_bytes")
    for name, shape, dtype in nets:
        key = dict(suite="models", name=name, shape=shape, dtype=dtype)
        train = [r for r in res.find(**key) if r.mode.split("+")[0] == "train"]
        acts = {_mode_label(r): r for r in train if r.metric == "activation_bytes"}
        peaks = {_mode_label(r): r for r in train if r.metric == "step_peak_bytes"}
        times = {_mode_label(r): r for r in train if r.metric == "time"}
        ref = acts.get("reference")
        order = sorted(acts, key=lambda s: (not s.startswith("reference"), "compile" in s, s.split("+")[0],
                                            _CKPT_ORDER.get(_ckpt_mode(s), 0), s))
        for lb in order:
            a, pk, t = acts[lb], peaks.get(lb), times.get(lb)
            base_t = times.get(lb.rsplit("+", 1)[0]) if _ckpt_mode(lb) != "none" else None
            ratio_a = _ratio(a.median, ref.median) if ref else math.nan
            ratio_t = _ratio(t.median, base_t.median) if t and base_t else math.nan
            ref_pk = peaks.get("reference")
            rows.append([name, shape, dtype, lb, _fmt_bytes(a.median),
                         _fmt_x(ratio_a) if ref and lb != "reference" else "",
                         _fmt_bytes(pk.median) if pk else "—",
                         _fmt_x(_ratio(pk.median, ref_pk.median)) if pk and ref_pk and lb != "reference" else "",
                         _fmt_ms(t.median) if t else "memory only",
                         _fmt_x(ratio_t) if math.isfinite(ratio_t) else ""])
            mode = _ckpt_mode(lb)
            if mode in CHECKPOINTING_TARGETS and lb.startswith("fast") and "compile" not in lb:
                max_mem, max_time = CHECKPOINTING_TARGETS[mode]
                if ref:
                    targets.append([name, shape, lb, f"activations <= {max_mem:g}x reference",
                                    _fmt_x(ratio_a), "met" if ratio_a <= max_mem else "NOT MET"])
                if math.isfinite(ratio_t):
                    targets.append([name, shape, lb, f"step time <= {max_time:.2f}x fast without checkpointing",
                                    _fmt_x(ratio_t), "met" if ratio_t <= max_time else "NOT MET"])
    if not rows:
        return []
    out = ["### Training memory and time per gradient-checkpointing mode", "",
           "Activations: the bytes a training step has allocated and still holds at the end of "
           "the forward pass (what backward keeps, plus logits and loss). Step peak: parameters, "
           "buffers, optimizer state and the batch, plus the most the step's own allocations held "
           "at once (activations, gradients, recomputed tensors). Both measured by following every "
           "tensor storage the step allocates and frees (benchmarks/memory.py: a TorchDispatchMode "
           "that sees inside checkpointed regions and recomputations, unlike saved-tensor hooks). "
           "Step times of one network are measured side by side, one step of each in turn.", ""]
    out += _table(["network", "input", "dtype", "impl", "activations", "vs reference", "step peak",
                   "vs reference", "step time", "vs same impl without checkpointing"], rows) + [""]
    if targets:
        out += ["### Targets of the checkpointing modes", ""]
        out += _table(["network", "input", "impl", "target", "measured", "verdict"], targets) + [""]
    return out


def _models_lines(res: Results) -> List[str]:
    labels = _model_labels(res)
    if not labels:
        return []
    base = "reference"
    out = []
    for title, metric, fmt in (
        ("Throughput (images/s), and speedup vs eager reference", "throughput", lambda v: f"{v:.1f}"),
        ("Activations kept for backward as saved_tensors_hooks see them (parameters excluded; not "
         "recorded for checkpointed models, whose regions the hooks cannot see into), and ratio to reference",
         "saved_bytes", _fmt_bytes),
        ("Peak GPU memory (torch.cuda.max_memory_allocated), and ratio to reference", "peak_memory",
         _fmt_bytes),
    ):
        rows = []
        for r0 in res.rows:
            if r0.suite != "models" or r0.metric != metric or impl_label(r0) != labels[0]:
                continue
            key = dict(suite="models", name=r0.name, shape=r0.shape, mode=r0.mode, dtype=r0.dtype)
            b = _metric(res, base, metric, **key)
            cells = [r0.name, r0.shape, r0.mode, r0.dtype]
            for lb in labels:
                r = _metric(res, lb, metric, **key)
                if r is None:
                    cells.append("—")
                elif b is None or lb == base:
                    cells.append(fmt(r.median))
                else:
                    cells.append(f"{fmt(r.median)} ({_fmt_x(_ratio(r.median, b.median))})")
            rows.append(cells)
        if rows:
            out += [f"### {title}", ""] + _table(["network", "input", "mode", "dtype", *labels], rows) + [""]
    out += _memory_lines(res)
    mb = res.find(suite="models", metric="max_batch")
    if mb:
        out += ["### Largest training batch that fits (GPU memory)", ""]
        out += _table(["network", "impl", "mode", "dtype", "fits", "largest not ruled out"],
                      [[r.name, impl_label(r), r.mode, r.dtype, f"{r.median:.0f}", f"{r.p80:.0f}"] for r in mb])
        out.append("")
    return out


def _skip_lines(res: Results) -> List[str]:
    if not res.skips:
        return []
    groups: OrderedDict[Tuple[str, str, str, str], List[str]] = OrderedDict()
    for s in res.skips:
        label = s.impl if s.suite == "ops" and s.impl in ("eager", "compile") else (
            f"{s.impl}[{s.backend}]" if s.suite == "ops" else s.impl + f" [{s.backend}]")
        groups.setdefault((s.suite, s.name, label, s.reason), []).append(
            f"{s.shape} {s.layout} {s.dtype} {s.mode}")
    rows = []
    for (suite, name, label, reason), where in groups.items():
        shown = ", ".join(sorted(set(where))[:3]) + (f" and {len(set(where)) - 3} more" if len(set(where)) > 3 else "")
        rows.append([suite, name, label, shown, reason.replace("|", "/")])
    return ["## Not measured (and why)", ""] + _table(["suite", "name", "impl", "rows", "reason"], rows) + [""]


def _plots(res: Results, out_dir: str) -> List[str]:
    """Draw the PNGs; returns their file names (none if matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:
        res.notes.append(f"plots not drawn: matplotlib unavailable ({exc})")
        return []
    files = []
    dt = "float32" if res.device.type == "cpu" else "bfloat16"
    labels = [lb for lb in _ops_labels(res) if lb != "eager"]
    layouts = [lay for lay in ("nchw", "channels_last") if res.find(suite="ops", layout=lay)]
    if labels and layouts:
        fig, axes = plt.subplots(len(OPS), len(layouts), figsize=(7 * len(layouts), 4.2 * len(OPS)),
                                 squeeze=False)
        for i, op in enumerate(OPS):
            for j, lay in enumerate(layouts):
                ax = axes[i][j]
                eag = res.find(suite="ops", name=op, metric="time", impl="eager", dtype=dt, layout=lay,
                               mode="fwd+bwd")
                shapes = [e.shape for e in eag]
                width = 0.8 / max(len(labels), 1)
                for k, lb in enumerate(labels):
                    ys = []
                    for e in eag:
                        r = _time(res, lb, name=op, dtype=dt, layout=lay, shape=e.shape, mode="fwd+bwd")
                        ys.append(_ratio(e.median, r.median) if r else 0.0)
                    ax.bar([x + k * width for x in range(len(shapes))], ys, width, label=lb)
                ax.axhline(1.0, color="black", lw=0.8)
                ax.set_xticks([x + width * (len(labels) - 1) / 2 for x in range(len(shapes))])
                ax.set_xticklabels(shapes, rotation=30, ha="right", fontsize=7)
                ax.set_ylabel("speedup vs eager (fwd+bwd)")
                ax.set_title(f"{op} ({lay}, {dt})", fontsize=9)
                if shapes:
                    ax.legend(fontsize=7)
        fig.suptitle(f"{res.info.get('device', '')}", fontsize=9)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "ops_speedup.png"), dpi=110)
        plt.close(fig)
        files.append("ops_speedup.png")
    mlabels = _model_labels(res)
    metric = ("peak_memory" if res.find(suite="models", metric="peak_memory") else
              "activation_bytes" if res.find(suite="models", metric="activation_bytes") else "saved_bytes")
    mem = [r for r in res.find(suite="models", metric=metric, mode="train")]
    if mem and mlabels:
        nets = list(OrderedDict((f"{r.name}\n{r.shape}", None) for r in mem))
        fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(nets)), 4.5))
        width = 0.8 / len(mlabels)
        for k, lb in enumerate(mlabels):
            ys = []
            for net in nets:
                name, shape = net.split("\n")
                r = _metric(res, lb, metric, suite="models", name=name, shape=shape, mode="train")
                ys.append(r.median / 2**20 if r else 0.0)
            ax.bar([x + k * width for x in range(len(nets))], ys, width, label=lb)
        ax.set_xticks([x + width * (len(mlabels) - 1) / 2 for x in range(len(nets))])
        ax.set_xticklabels(nets, fontsize=8)
        ax.set_ylabel({"peak_memory": "peak GPU memory", "activation_bytes": "activations kept for backward",
                       "saved_bytes": "activations saved for backward"}[metric] + " (MiB), training step")
        ax.set_title(f"Memory per network ({res.info.get('device', '')})", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "models_memory.png"), dpi=110)
        plt.close(fig)
        files.append("models_memory.png")
    thr = res.find(suite="models", metric="throughput")
    if thr and mlabels:
        keys = list(OrderedDict((f"{r.name} {r.mode}\n{r.shape}", None) for r in thr))
        fig, ax = plt.subplots(figsize=(max(6, 1.8 * len(keys)), 4.5))
        width = 0.8 / len(mlabels)
        for k, lb in enumerate(mlabels):
            ys = []
            for key in keys:
                head, shape = key.split("\n")
                name, mode = head.split(" ")
                b = _metric(res, "reference", "throughput", suite="models", name=name, shape=shape, mode=mode)
                r = _metric(res, lb, "throughput", suite="models", name=name, shape=shape, mode=mode)
                ys.append(_ratio(r.median, b.median) if r and b else 0.0)
            ax.bar([x + k * width for x in range(len(keys))], ys, width, label=lb)
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_xticks([x + width * (len(mlabels) - 1) / 2 for x in range(len(keys))])
        ax.set_xticklabels(keys, fontsize=8)
        ax.set_ylabel("throughput vs eager reference")
        ax.set_title(f"Networks ({res.info.get('device', '')})", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "models_speedup.png"), dpi=110)
        plt.close(fig)
        files.append("models_speedup.png")
    return files


def write_outputs(res: Results, out_dir: str) -> Dict[str, str]:
    """Write results.csv, report.md and the plots into ``out_dir``; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    csv_path = os.path.join(out_dir, "results.csv")
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for rec in res.csv_records():
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in rec.items()})
    skip_path = os.path.join(out_dir, "skipped.csv")
    with open(skip_path, "w", newline="") as f:
        cols = ["suite", "name", "impl", "backend", "mode", "dtype", "layout", "shape", "reason"]
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for s in res.skips:
            w.writerow({c: getattr(s, c) for c in cols})
    plots = _plots(res, out_dir)

    lines = ["# resattn_fast benchmark report", ""]
    lines += [f"- command: `{res.command}`"]
    lines += [f"- device: **{res.info.get('device', '?')}**"
              + (f" ({res.info.get('gpu_memory_gib')} GiB)" if "gpu_memory_gib" in res.info else "")]
    if res.device.type == "cpu":
        lines += [f"- CPU threads used by torch: {res.threads} (cores visible: {res.info.get('cpu_cores_visible')})"]
    else:
        lines += [f"- host CPU: {res.info.get('cpu')}; CUDA {res.info.get('cuda')}"]
    lines += [f"- torch {res.info.get('torch')}, triton {res.info.get('triton')}, python "
              f"{res.info.get('python')}; {res.timestamp}"]
    for dev, bs in res.backends.items():
        lines += [f"- fused backends available on {dev}: {', '.join(bs) or 'none'}"]
    ran = sorted({f"{impl_label(r)} -> backend {r.backend}" for r in res.rows if r.impl != "copy"})
    lines += [f"- implementations that ran (label -> backend that actually ran): {'; '.join(ran) or 'none'}"]
    load = [res.info.get("load_start", "?"), res.info.get("load_end", "?")]
    cores = res.info.get("cpu_cores_visible", "?")
    busy = ""
    try:
        if max(float(v) for v in load) > float(cores):
            busy = (" — **above the core count: other processes competed for the CPU, so CPU "
                    "timings are noisier and slower than on an idle machine**")
    except ValueError:
        pass
    lines += [f"- 1-minute load average at start / end: {load[0]} / {load[1]} on {cores} cores{busy}"]
    if res.suites_s:
        lines += ["- wall time per suite: " + ", ".join(f"{k} {v:.0f} s" for k, v in res.suites_s.items())]
    lines += ["- times are medians over repetitions, with [p20, p80]; ratios are eager time / impl time "
              "(above 1 = faster than eager); memory ratios are impl / reference (below 1 = less memory).", ""]

    head = headline_lines(res)
    if head:
        lines += ["## Headline", ""]
        if res.device.type == "cpu":
            lines += [f"Issue 3 configuration: {res.threads} CPU threads, float32, 2x bilinear upsample with "
                      "skip to the stage-1 size and attention_residual at the stage-1 size, "
                      "eager vs torch.compile vs the fused backends, measured in one run.", ""]
        else:
            lines += ["Stage-1 shapes of Attention-92 (bfloat16 shown here; every dtype is in the tables below).", ""]
        lines += head + [""]
        lines += _target_lines(res)
    if any(r.suite == "ops" for r in res.rows):
        lines += ["## Ops", ""]
        where = OrderedDict((s, w) for s, w in res.labels.items())
        if where:
            lines += ["Shapes: `N x C x h x w > H x W` (+skip when a skip tensor is added); "
                      "where each shape runs: " + "; ".join(f"`{s}` {w}" for s, w in where.items()), ""]
        lines += _ops_time_lines(res) + _ops_bw_lines(res) + _ops_mem_lines(res)
    model_lines = _models_lines(res)
    if model_lines:
        lines += ["## Networks", ""] + model_lines
    if plots:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    lines += _skip_lines(res)
    if res.notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in res.notes] + [""]
    report_path = os.path.join(out_dir, "report.md")
    with open(report_path, "w") as f:
        f.write("\n".join(lines).rstrip() + "\n")
    paths = {"csv": csv_path, "report": report_path, "skipped": skip_path}
    paths.update({p: os.path.join(out_dir, p) for p in plots})
    return paths
