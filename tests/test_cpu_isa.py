"""The CPU kernels are compiled for several instruction sets (baseline, AVX2, AVX-512) and
one is picked at run time; ATEN_CPU_CAPABILITY forces a narrower one. Each path must give
the reference's numbers, including the streaming-store path of large float32 outputs, and
the table that ran is the extension's own report (build_info()["cpu_isa"]), not torch's."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from conftest import require_backend

CHECK = textwrap.dedent(
    """
    import torch
    from _tolerance import assert_matches
    import resattn_fast
    from resattn_fast import ops
    from resattn_fast.reference import ops as ref

    def grads(fn, inputs, g):
        inputs = [t.detach().requires_grad_(True) for t in inputs]
        out = fn(*inputs)
        out.backward(g.to(out.dtype))
        return [out.detach()] + [t.grad for t in inputs]

    def check(fused, reference, inputs, g, what):
        dtype = inputs[0].dtype
        got = grads(fused, inputs, g)
        want = grads(reference, [t.double() for t in inputs], g.double())
        eager = grads(reference, inputs, g)  # PyTorch in the same dtype: the 2x rule
        for i, (a, w, e) in enumerate(zip(got, want, eager)):
            assert_matches(a, w, dtype, e, f"{what} [{i}] {dtype} {tuple(a.shape)}")

    torch.manual_seed(0)
    for fmt in (torch.contiguous_format, torch.channels_last):
        for dtype in (torch.float32, torch.bfloat16):
            # 1x64x256x256 float32 = 16 MiB: large enough for the non-temporal stores.
            for n, c, hw, HW in ((2, 19, (5, 7), (9, 13)), (1, 64, (128, 128), (256, 256))):
                def rnd(*size):
                    return torch.randn(*size).to(dtype).contiguous(memory_format=fmt)
                x, s, g = rnd(n, c, *hw), rnd(n, c, *HW), rnd(n, c, *HW)
                check(lambda a, b: ops.upsample_bilinear_add(a, b, backend="cpu"),
                      lambda a, b: ref.upsample_bilinear_add(a, b), [x, s], g, "upsample")
                check(lambda a, b: ops.attention_residual(a, b, backend="cpu"),
                      ref.attention_residual, [rnd(n, c, *HW), rnd(n, c, *HW)], g, "attention")
    print("ok", torch.backends.cpu.get_cpu_capability(), resattn_fast.build_info()["cpu_isa"])
    """
)


def _env(isa):
    env = dict(os.environ)
    env.pop("ATEN_CPU_CAPABILITY", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.dirname(__file__), env.get("PYTHONPATH")]))
    if isa is not None:
        env["ATEN_CPU_CAPABILITY"] = isa
    return env


def _expected_table(torch_cap: str) -> str:
    """The table the extension must pick under torch's capability ``torch_cap``: the widest
    table built that it allows (the CPU allows whatever torch's own check does); the
    baseline on other architectures."""
    import resattn_fast

    built = resattn_fast.build_info()["cpu_isas_built"]
    order = ("DEFAULT", "AVX2", "AVX512")
    cap = torch_cap.upper()
    allowed = order[:order.index(cap) + 1] if cap in order else order[:1]
    return [isa for isa in allowed if isa in built][-1]


@pytest.mark.parametrize("isa", ["default", "avx2", None])
def test_each_instruction_set_path(isa):
    require_backend("cpu")
    proc = subprocess.run([sys.executable, "-c", CHECK], env=_env(isa), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("ok")
    _, torch_cap, table = proc.stdout.split()
    if isa is not None:  # the forced capability is torch's
        assert torch_cap.lower() == isa, proc.stdout
    # ... and the kernel table that ran is the one it allows
    assert table == _expected_table(torch_cap), proc.stdout


def test_resattn_info_names_the_kernel_table():
    require_backend("cpu")
    proc = subprocess.run([sys.executable, "-m", "resattn_fast", "info"], env=_env("default"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "cpu kernels   yes (DEFAULT kernel table)" in proc.stdout, proc.stdout
