"""The benchmark suite (benchmarks/): a tiny CPU run writes results.csv, report.md and the
plots with eager, torch.compile and a fused row (the cpu backend's kernels, and the row
says so) in both suites; its helpers (the dispatcher's record of the backend that ran, percentiles,
saved-tensor accounting, the largest-batch search, the report's verdicts) do what they say.

Numbers are checked for shape and sanity only (finite, positive, ordered): timings belong
in the benchmark reports, never in test assertions.
"""

from __future__ import annotations

import csv
import math
import os
import sys
import time
from typing import Dict, List

import pytest
import torch
from conftest import require_backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # benchmarks/ lives beside the package, not inside it
    sys.path.insert(0, ROOT)

from benchmarks import run as bench_run  # noqa: E402
from benchmarks.bench_models import bracket_search  # noqa: E402
from benchmarks.common import CSV_COLUMNS, Results, backend_that_ran  # noqa: E402
from benchmarks.report import headline_lines  # noqa: E402
from benchmarks.timing import percentiles, saved_tensor_bytes  # noqa: E402


def _read_csv(path: str) -> List[Dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One tiny run of both suites: eager, compile and the cpu backend's kernels as the
    "fused" row (the harness checks that they are what ran)."""
    require_backend("cpu")
    out = str(tmp_path_factory.mktemp("bench"))
    threads = torch.get_num_threads()
    try:
        rc = bench_run.main(["--suite", "all", "--device", "cpu", "--tiny", "--threads", "1",
                             "--backends", "cpu", "--layouts", "nchw", "--out", out])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    return out


def test_tiny_run_writes_the_three_outputs(tiny_run: str) -> None:
    for name in ("results.csv", "report.md", "ops_speedup.png", "models_memory.png"):
        path = os.path.join(tiny_run, name)
        assert os.path.isfile(path) and os.path.getsize(path) > 0, name
    with open(os.path.join(tiny_run, "ops_speedup.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_results_csv_is_long_format_with_finite_numbers(tiny_run: str) -> None:
    path = os.path.join(tiny_run, "results.csv")
    with open(path, newline="") as f:
        assert next(csv.reader(f)) == CSV_COLUMNS
    rows = _read_csv(path)
    assert rows
    for r in rows:
        lo, mid, hi = float(r["p20"]), float(r["median"]), float(r["p80"])
        assert all(math.isfinite(v) for v in (lo, mid, hi)), r
        assert lo <= mid <= hi, r
        if r["metric"] in ("time", "throughput", "bandwidth", "bw_vs_copy"):
            assert lo > 0, r
        else:
            assert lo >= 0, r
        assert r["device"] and r["torch"] == torch.__version__ and r["timestamp"]


def test_tiny_run_covers_implementations_suites_and_metrics(tiny_run: str) -> None:
    rows = _read_csv(os.path.join(tiny_run, "results.csv"))
    ops = [r for r in rows if r["suite"] == "ops" and r["name"] != "copy"]
    models = [r for r in rows if r["suite"] == "models"]
    assert {(r["impl"], r["backend"]) for r in ops} >= {
        ("eager", "reference"), ("compile", "inductor"), ("fused", "cpu")}
    # every fused row names the backend that ran (the harness refuses to time another one)
    assert {r["backend"] for r in ops if r["impl"] == "fused"} == {"cpu"}
    skipped = os.path.join(tiny_run, "skipped.csv")
    not_measured = [s for s in (_read_csv(skipped) if os.path.exists(skipped) else []) if s["impl"] == "fused"]
    assert not not_measured, [(s["name"], s["backend"], s["reason"]) for s in not_measured]
    assert {r["name"] for r in ops} == {"upsample_bilinear_add", "attention_residual"}
    assert {r["mode"] for r in ops} >= {"fwd", "bwd", "fwd+bwd"}
    assert {r["metric"] for r in ops} >= {"time", "bandwidth", "bw_vs_copy", "saved_bytes"}
    assert {(r["impl"], r["backend"]) for r in models} >= {("reference", "reference"), ("fast", "cpu")}
    assert {"train", "infer"} <= {r["mode"] for r in models} <= {"train", "infer", "train+selective", "train+full"}
    assert {r["metric"] for r in models} >= {"time", "throughput", "saved_bytes"}
    # The copy baseline the bandwidth ratios refer to is in the same file.
    assert any(r["name"] == "copy" and r["metric"] == "bandwidth" for r in rows)
    report = open(os.path.join(tiny_run, "report.md")).read()
    for text in ("## Headline", "vs compile", "## Networks", "command: `python benchmarks/run.py",
                 "backend that actually ran"):
        assert text in report


def test_an_unavailable_backend_is_recorded_as_skipped(tmp_path: str, no_cuda_emulation: None) -> None:
    threads = torch.get_num_threads()
    try:
        rc = bench_run.main(["--suite", "ops", "--device", "cpu", "--tiny", "--threads", "1", "--no-compile",
                             "--backends", "cuda", "--layouts", "nchw", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    rows = _read_csv(os.path.join(tmp_path, "results.csv"))
    assert not [r for r in rows if r["impl"] == "fused"]  # never silently replaced
    skipped = _read_csv(os.path.join(tmp_path, "skipped.csv"))
    assert any(s["backend"] == "cuda" and "CUDA" in s["reason"] for s in skipped)
    assert "Not measured" in open(os.path.join(tmp_path, "report.md")).read()


def test_backend_that_ran_reads_the_dispatcher() -> None:
    from resattn_fast import ops
    from resattn_fast.ops import available_backends

    x, s = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 5, 6)
    assert backend_that_ran(lambda: ops.upsample_bilinear_add(x, s, backend="reference")) == "reference"
    for b in ("cpu", "cuda", "triton"):
        if b in available_backends("cpu"):
            assert backend_that_ran(lambda b=b: ops.upsample_bilinear_add(x, s, backend=b)) == b
            assert backend_that_ran(lambda b=b: ops.attention_residual(s, s, backend=b)) == b


def test_a_fused_row_that_ran_another_backend_is_not_measured(tmp_path: str, monkeypatch) -> None:
    """A fused function that falls back to the reference is recorded as skipped, with the
    reason, instead of being timed under the name of the backend it was asked for."""
    require_backend("cpu")
    from resattn_fast import ops
    from resattn_fast.reference import ops as ref

    monkeypatch.setattr(ops, "attention_residual", lambda m, f, backend=None: ref.attention_residual(m, f))
    threads = torch.get_num_threads()
    try:
        rc = bench_run.main(["--suite", "ops", "--device", "cpu", "--tiny", "--threads", "1", "--no-compile",
                             "--backends", "cpu", "--layouts", "nchw", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    rows = _read_csv(os.path.join(tmp_path, "results.csv"))
    fused = {r["name"] for r in rows if r["impl"] == "fused"}
    assert fused == {"upsample_bilinear_add"}, fused
    skipped = _read_csv(os.path.join(tmp_path, "skipped.csv"))
    assert any(s["name"] == "attention_residual" and s["backend"] == "cpu"
               and "asked for backend 'cpu', but 'reference' ran" in s["reason"] for s in skipped), skipped


def test_bad_arguments_are_one_line_errors(tmp_path: str, capsys: pytest.CaptureFixture) -> None:
    assert bench_run.main(["--dtypes", "float8", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --dtypes") and err.count("\n") == 1


def test_percentiles_match_numpy() -> None:
    np = pytest.importorskip("numpy")
    xs = [5.0, 1.0, 4.0, 2.0, 3.0, 10.0, 0.5]
    st = percentiles(xs)
    torch.testing.assert_close(
        torch.tensor([st.median, st.p20, st.p80], dtype=torch.float64),
        torch.tensor(np.percentile(xs, [50, 20, 80]), dtype=torch.float64))
    rate = st.inverse(1.0)  # a rate from times: the slow p80 time is the low p20 rate
    assert rate.p20 == pytest.approx(1.0 / st.p80) and rate.p80 == pytest.approx(1.0 / st.p20)


def test_saved_tensor_bytes_counts_unique_storages() -> None:
    a = torch.randn(4, 8, requires_grad=True)
    b = torch.randn(4, 8, requires_grad=True)
    with saved_tensor_bytes() as saved:
        y = a * b  # mul keeps both inputs
    assert saved == {"bytes": 2 * 4 * 8 * 4, "tensors": 2}
    with saved_tensor_bytes() as saved:
        z = a * a  # the same tensor saved twice is one buffer
    assert saved["bytes"] == 4 * 8 * 4 and saved["tensors"] == 2
    with saved_tensor_bytes(exclude=[b]) as saved:
        w = a * b
    assert saved["bytes"] == 4 * 8 * 4
    del y, z, w


def test_bracket_search_finds_the_largest_fitting_batch() -> None:
    tried: List[int] = []

    def fits(b: int) -> bool:
        tried.append(b)
        return b <= 37

    lo, hi, tries = bracket_search(fits, 4, 4096, time.perf_counter() + 60)
    assert lo <= 37 < hi and hi - lo <= max(1, lo // 16) and tries == len(tried)
    lo, hi, _ = bracket_search(lambda b: b <= 1, 16, 4096, time.perf_counter() + 60)
    assert (lo, hi) == (1, 2)
    lo, hi, _ = bracket_search(lambda b: True, 16, 100, time.perf_counter() + 60)
    assert (lo, hi) == (100, None)
    lo, hi, _ = bracket_search(lambda b: False, 16, 100, time.perf_counter() + 60)
    assert (lo, hi) == (0, 1)


def test_report_says_plainly_when_a_fused_op_is_slower() -> None:
    res = Results(device=torch.device("cpu"), threads=2, command="x", quick=True)
    res.headline.add("8x256x56x56")
    key = dict(suite="ops", name="attention_residual", mode="fwd", dtype="float32", layout="nchw",
               shape="8x256x56x56", metric="time", unit="ms")
    for impl, backend, ms in (("eager", "reference", 8.0), ("compile", "inductor", 4.0), ("fused", "cpu", 5.0)):
        res.add(**key, impl=impl, backend=backend, median=ms, p20=ms, p80=ms)
    text = "\n".join(headline_lines(res))
    assert "1.60x as fast as eager" in text
    assert "SLOWER than torch.compile (0.80x" in text
