"""The CPU kernels are compiled for several instruction sets (baseline, AVX2, AVX-512) and
one is picked at run time; ATEN_CPU_CAPABILITY forces a narrower one. Each path must give
the reference's numbers, including the streaming-store path of large float32 outputs."""

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
    print("ok", torch.backends.cpu.get_cpu_capability())
    """
)


@pytest.mark.parametrize("isa", ["default", "avx2", None])
def test_each_instruction_set_path(isa):
    require_backend("cpu")
    env = dict(os.environ)
    env.pop("ATEN_CPU_CAPABILITY", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.dirname(__file__), env.get("PYTHONPATH")]))
    if isa is not None:
        env["ATEN_CPU_CAPABILITY"] = isa
    proc = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("ok")
    if isa is not None:  # the forced path is the one that ran
        assert proc.stdout.split()[1].lower() == isa, proc.stdout
