"""Every GPU kernel compiles for the GPUs we target, without spills (no GPU needed).

The Triton kernels are compiled ahead of time by Triton's own compiler for sm_80 and sm_90
in every specialization their launchers can produce (benchmarks/gpu_resources.py); the
CUDA kernels of the built extension are checked for every architecture they were built
for. The compiler rejects programs the CPU interpreter accepts, and only the compiled
code has registers and spills. The compile runs once per session in a subprocess (the
real compiler, not the interpreter these tests otherwise run under) with one worker per
CPU; the tests below read its rows.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from typing import Dict, List

import pytest
import torch
from conftest import require_backend

import resattn_fast
from resattn_fast import ops
from resattn_fast.reference import ops as ref

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import gpu_resources as gr  # noqa: E402

ARCHS = (80, 90)
REQUIRED = {b.strip() for b in os.environ.get("RESATTN_REQUIRE_BACKENDS", "").split(",") if b.strip()}

pytest.importorskip("triton")


def _run_tool(tmp_path_factory: pytest.TempPathFactory, *args: str) -> List[Dict]:
    out = tmp_path_factory.mktemp("gpu_resources") / "rows.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_resources.py"),
                           "--json", str(out), *args], capture_output=True, text=True, env=env)
    if not out.exists():
        pytest.fail(f"gpu_resources.py {' '.join(args)} wrote no rows (exit {proc.returncode}):\n"
                    f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    rows = json.loads(out.read_text())
    # Exit status 1 <=> a failed compile or a spill, which the tests below name precisely.
    assert proc.returncode == gr.exit_status([gr.Row(**r) for r in rows]), proc.stderr[-3000:]
    return rows


@pytest.fixture(scope="module")
def triton_rows(tmp_path_factory: pytest.TempPathFactory) -> List[Dict]:
    return _run_tool(tmp_path_factory, "--part", "triton", "--arch", ",".join(map(str, ARCHS)))


def _bad(rows: List[Dict]) -> List[str]:
    return [f"{r['kernel']} [{r['spec']}] sm_{r['arch']}: "
            f"{r['error'] or str(r['spill_bytes']) + ' bytes spilled'}"
            for r in rows if r["error"] or r["spill_bytes"]]


BN_KERNELS = {"_bn_stats_kernel", "_bn_channel_kernel", "_bn_relu_fwd_kernel",
              "_bn_relu_bwd_reduce_kernel", "_bn_relu_bwd_channel_kernel", "_bn_relu_bwd_kernel",
              "_bn_update_stats_kernel"}


def test_triton_every_specialization_compiled(triton_rows):
    """One row per (variant, arch), for every kernel, each autotune config, dtype and
    flag value."""
    per_variant: Dict[tuple, List[int]] = {}
    for r in triton_rows:
        per_variant.setdefault((r["kernel"], r["spec"]), []).append(r["arch"])
    assert all(sorted(a) == list(ARCHS) for a in per_variant.values())
    assert len(per_variant) > 600, len(per_variant)  # 11 kernels x configs x dtypes x flags
    kernels = {r["kernel"] for r in triton_rows}
    assert kernels == {"_upsample_bilinear_add_fwd_kernel", "_upsample_bilinear_add_bwd_kernel",
                       "_attention_residual_fwd_kernel", "_attention_residual_bwd_kernel"} | BN_KERNELS
    specs = " | ".join(r["spec"] for r in triton_rows)
    for word in ("float32", "float16", "bfloat16", "float64", "CHANNELS_LAST", "HAS_SKIP",
                 "ALIGN", "INT64", "BLOCK=4096/w8", "BLOCK=128/w4", "TRAINING", "HAS_RES",
                 "HAS_W", "HAS_B", "WRITE_STATS"):
        assert word in specs, word


def test_variant_signatures_typed_like_launches():
    """Workspaces and statistics are compiled in the accumulation type and batch-norm
    parameters in float32 (float64 for float64), as the launchers pass them; the element
    counts are 64-bit in the INT64 specialization, other integers 32-bit."""
    from types import SimpleNamespace

    import triton

    names = ("x_ptr", "par_ptr", "w_ptr", "gw_ptr", "out_ptr", "M", "CHUNK", "C", "eps32", "eps64")
    params = [SimpleNamespace(name=n, is_constexpr=False) for n in names]
    params += [SimpleNamespace(name=n, is_constexpr=True) for n in ("INT64", "IS_FP64", "BLOCK")]
    fn = SimpleNamespace(params=params)
    cfg = triton.Config({"BLOCK": 256}, num_warps=4)
    for dtype, int64 in (("bfloat16", True), ("float64", False), ("float32", False)):
        const = {"INT64": int64, "IS_FP64": dtype == "float64", "BLOCK": 256}
        sig = gr._variant("m", "k", fn, cfg, dtype, ["INT64"], const).signature
        acc = "*fp64" if dtype == "float64" else "*fp32"
        assert sig["x_ptr"] == sig["out_ptr"] == "*" + gr.DTYPES[dtype]
        assert sig["par_ptr"] == sig["w_ptr"] == sig["gw_ptr"] == acc
        assert sig["M"] == sig["CHUNK"] == ("i64" if int64 else "i32")
        assert sig["C"] == "i32" and sig["eps32"] == "fp32" and sig["eps64"] == "i64"
        assert sig["INT64"] == sig["BLOCK"] == "constexpr"


@pytest.mark.parametrize("arch", ARCHS)
def test_triton_compiles_without_spills(triton_rows, arch):
    rows = [r for r in triton_rows if r["arch"] == arch]
    assert rows
    bad = _bad(rows)
    assert not bad, f"{len(bad)} variants failed or spilled on sm_{arch}:\n" + "\n".join(bad[:20])
    for r in rows:
        assert 0 < r["regs"] <= 255 and r["warps_per_sm"] >= r["num_warps"], r


def _cuda_archs() -> List[int]:
    info = resattn_fast.build_info()
    if not info.get("cuda_kernels"):
        why = info.get("error") or "the extension was built without CUDA kernels (RESATTN_BUILD_CUDA=0 or no nvcc)"
        if "cuda" in REQUIRED:
            pytest.fail(f"CUDA kernels required (RESATTN_REQUIRE_BACKENDS) but: {why}")
        pytest.skip(why)
    archs = str(info.get("cuda_archs", "")).replace(";", " ").replace(",", " ").split()
    return sorted({int(a.replace(".", "").replace("+PTX", "")) for a in archs if a[:1].isdigit()})


def test_cuda_extension_compiles_without_spills(tmp_path_factory):
    archs = _cuda_archs()
    rows = _run_tool(tmp_path_factory, "--part", "cuda")
    assert rows, "the extension has CUDA kernels but cuobjdump found no cubin in it"
    kernels = " ".join(r["kernel"] for r in rows)
    assert "upsample" in kernels and "attention" in kernels, kernels
    if archs:
        assert {r["arch"] for r in rows} == set(archs), (archs, sorted({r["arch"] for r in rows}))
    bad = _bad(rows)
    assert not bad, "\n".join(bad)


# ------------------------------------------------------------- the tool's own logic
RES_USAGE = """
Fatbin elf code:
================
arch = sm_90
code version = [1,8]
host = linux
compile_size = 64bit

Resource usage:
 Common:
  GLOBAL:0
 Function _Z6kernelPfi:
  REG:40 STACK:16 SHARED:1024 LOCAL:8 CONSTANT[0]:900 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _Z5otherv:
  REG:255 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:400 TEXTURE:0 SURFACE:0 SAMPLER:0
"""


def test_parse_res_usage():
    got = gr.parse_res_usage(RES_USAGE)
    assert [(a, f) for a, f, _ in got] == [(90, "_Z6kernelPfi"), (90, "_Z5otherv")]
    assert got[0][2]["REG"] == 40 and got[0][2]["STACK"] == 16 and got[0][2]["LOCAL"] == 8
    assert got[0][2]["SHARED"] == 1024 and got[1][2]["REG"] == 255


def test_warps_per_sm():
    assert gr.warps_per_sm(32, 4) == 64      # 1024 registers per warp: the 64-warp limit
    assert gr.warps_per_sm(128, 4) == 16     # 4096 per warp: 16 warps
    assert gr.warps_per_sm(122, 4) == 16     # rounded up to 128 per thread
    assert gr.warps_per_sm(48, 8) == 40      # 42 warps fit, whole 8-warp blocks: 40
    assert gr.warps_per_sm(255) == 8


def test_exit_status_fails_on_spill_or_error():
    ok = gr.Row("triton", "k", "s", 90, regs=40, spill_bytes=0)
    assert gr.exit_status([ok]) == 0
    assert gr.exit_status([ok, gr.Row("triton", "k", "s", 80, regs=40, spill_bytes=4)]) == 1
    assert gr.exit_status([ok, gr.Row("triton", "k", "s", 80, error="CompilationError")]) == 1


# ------------------------------------------- the INT64 specialization, run interpreted
# (batch_norm_relu's: tests/test_batch_norm_relu_triton.py::test_int64_specialization)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_int64_specialization_matches_reference(monkeypatch, channels_last):
    """The 64-bit-offset code (compiled above, on a GPU only taken past 2**31 elements)
    computes the same numbers: forced on for small tensors under the interpreter."""
    require_backend("triton")
    up = importlib.import_module("resattn_fast.ops.triton.upsample_bilinear_add")
    att = importlib.import_module("resattn_fast.ops.triton.attention_residual")
    monkeypatch.setattr(up, "needs_int64", lambda *t: True)
    monkeypatch.setattr(att, "needs_int64", lambda *t: True)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 5, 6, 7, dtype=torch.float64).contiguous(memory_format=fmt).requires_grad_(True)
    s = torch.randn(2, 5, 11, 9, dtype=torch.float64).contiguous(memory_format=fmt).requires_grad_(True)
    out = ops.attention_residual(s, ops.upsample_bilinear_add(x, s, align_corners=False, backend="triton"),
                                 backend="triton")
    xr, sr = x.detach().clone().requires_grad_(True), s.detach().clone().requires_grad_(True)
    want = ref.attention_residual(sr, ref.upsample_bilinear_add(xr, sr, align_corners=False))
    g = torch.randn_like(want)
    out.backward(g)
    want.backward(g)
    torch.testing.assert_close(out, want, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(x.grad, xr.grad, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(s.grad, sr.grad, atol=1e-10, rtol=1e-10)
