"""AttentionModule structure, and fast vs reference parity of modules and whole models."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import CPU_FUSED, require_backend

import resattn_fast
from resattn_fast import nn as fast_nn
from resattn_fast.reference import AttentionModule as RefAttention
from resattn_fast.reference.modules import ResidualUnit as RefUnit
from resattn_fast.reference.modules import mask_sizes


@pytest.mark.parametrize("stage,channels,size,depth", [(1, 256, 56, 3), (2, 512, 28, 2), (3, 1024, 14, 1)])
def test_lowest_mask_is_7x7_at_224(stage, channels, size, depth):
    """PAPER.md: the soft mask of every ImageNet stage bottoms out at 7x7 for 224 input."""
    assert mask_sizes((size, size), depth)[-1] == (7, 7)
    model = resattn_fast.create_model("attention56", impl="reference").eval()
    module = model.stages[stage - 1][1]
    assert isinstance(module, RefAttention) and module.channels == channels and module.mask_depth == depth
    seen = []
    module.down[-1].register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape[-2:])))
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    assert seen == [(7, 7)]


def test_module_structure_counts():
    m = RefAttention(64, 3, p=2, t=4, r=3)
    assert len(m.pre) == 2 and len(m.post) == 2 and len(m.trunk) == 4
    assert [len(d) for d in m.down] == [3, 3, 6]  # r per level, 2r at the lowest
    assert len(m.skips) == 2 and [len(u) for u in m.up] == [3, 3]


def test_state_dict_keys_identical():
    ref = RefAttention(32, 2)
    fast = fast_nn.AttentionModule(32, 2, backend="reference")
    assert list(ref.state_dict()) == list(fast.state_dict())
    fast.load_state_dict(ref.state_dict())


def _grads(module, x):
    x = x.clone().requires_grad_(True)
    out = module(x)
    out.backward(torch.randn_like(out, generator=torch.Generator().manual_seed(1)))
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in module.named_parameters()}


@pytest.mark.parametrize("backend", CPU_FUSED)
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_attention_module_parity(backend, train, channels_last):
    require_backend(backend)
    ref = RefAttention(16, 2).train(train)
    fast = fast_nn.AttentionModule(16, 2, backend=backend).train(train)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(2, 16, 13, 11)  # odd sizes: 13x11 -> 7x6 -> 4x3
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    o_ref, gx_ref, gp_ref = _grads(ref, x)
    o_fast, gx_fast, gp_fast = _grads(fast, x)
    torch.testing.assert_close(o_fast, o_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gx_fast, gx_ref, atol=1e-4, rtol=1e-4)
    for n in gp_ref:
        torch.testing.assert_close(gp_fast[n], gp_ref[n], atol=1e-4, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")
    if train:  # the running statistics moved identically
        for (n, b_ref), b_fast in zip(ref.named_buffers(), fast.buffers()):
            torch.testing.assert_close(b_fast, b_ref, msg=lambda m, n=n: f"{n}: {m}")


def _grads_with(module, x, g):
    x = x.clone().requires_grad_(True)
    out = module(x)
    out.backward(g.to(out.dtype))
    return [out.detach(), x.grad] + [p.grad.clone() for p in module.parameters()]


# The whole network runs on the cpu backend here. Interpreted Triton and the emulated CUDA
# kernels (an OS thread per CUDA thread) take minutes per training step of this network
# on 2 cores, so on the CPU their network-level check is the module and unit parity
# above; on a GPU test_gpu_model_parity_attention56_cifar runs the whole network on both.
NETWORK_BACKENDS = ("cpu",)


@pytest.mark.parametrize("backend", NETWORK_BACKENDS)
@pytest.mark.parametrize("train", [True, False])
def test_model_parity_attention56_cifar(backend, train):
    """The whole fast network against the reference, in float64 (where both are exact to
    ~1e-12, so any wiring error shows) over three SGD steps: outputs, every gradient, the
    running statistics and num_batches_tracked."""
    require_backend(backend)
    ref = resattn_fast.create_model("attention56_cifar", impl="reference").train(train).double()
    fast = resattn_fast.create_model("attention56_cifar", impl="fast", backend=backend).train(train).double()
    fast.load_state_dict(ref.state_dict())
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    opt_fast = torch.optim.SGD(fast.parameters(), lr=0.05, momentum=0.9)
    names = ["output", "grad_x"] + [n for n, _ in ref.named_parameters()]
    for step in range(3):
        gen = torch.Generator().manual_seed(step)
        x = torch.randn(2, 3, 32, 32, generator=gen, dtype=torch.float64)
        g = torch.randn(2, 10, generator=gen, dtype=torch.float64)
        opt_ref.zero_grad(set_to_none=True)
        opt_fast.zero_grad(set_to_none=True)
        for n, a, b in zip(names, _grads_with(fast, x, g), _grads_with(ref, x, g)):
            torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9, msg=lambda m, n=n, s=step: f"step {s} {n}: {m}")
        if train:  # (in eval, untrained running statistics make the steps diverge)
            opt_ref.step()
            opt_fast.step()
    for (n, b_ref), b_fast in zip(ref.named_buffers(), fast.buffers()):
        torch.testing.assert_close(b_fast, b_ref, atol=1e-9, rtol=1e-9, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("backend", NETWORK_BACKENDS)
def test_model_float32_error_like_reference(backend):
    """In float32 a training step through ~60 batch norms on tiny batches is ill-conditioned
    (the reference itself is off by ~1% of grad_x against float64): the fast network's
    worst relative error over the output and every gradient must stay within 3x the
    reference's own."""
    require_backend(backend)
    ref = resattn_fast.create_model("attention56_cifar", impl="reference").train()
    fast = resattn_fast.create_model("attention56_cifar", impl="fast", backend=backend).train()
    fast.load_state_dict(ref.state_dict())
    r64 = copy.deepcopy(ref).double()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 32, 32, generator=gen)
    g = torch.randn(2, 10, generator=gen)
    want = _grads_with(r64, x.double(), g)

    def worst(got):
        return max(((a.double() - w).abs().max() / w.abs().max().clamp_min(1e-30)).item() for a, w in zip(got, want))

    err_fast, err_ref = worst(_grads_with(fast, x, g)), worst(_grads_with(ref, x, g))
    assert err_fast <= 3 * err_ref + 1e-6, f"fast {err_fast:.3g} vs reference float32 {err_ref:.3g}"


@pytest.mark.parametrize("backend", CPU_FUSED)
@pytest.mark.parametrize("shape", [(16, 16, 1), (8, 32, 1), (16, 16, 2)], ids=["identity", "projection", "stride2"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_residual_unit_parity(backend, shape, channels_last):
    require_backend(backend)
    cin, cout, stride = shape
    ref = RefUnit(cin, cout, stride).train()
    fast = fast_nn.ResidualUnit(cin, cout, stride, backend=backend).train()
    assert list(ref.state_dict()) == list(fast.state_dict())
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(3, cin, 9, 7)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    o_ref, gx_ref, gp_ref = _grads(ref, x)
    o_fast, gx_fast, gp_fast = _grads(fast, x)
    torch.testing.assert_close(o_fast, o_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gx_fast, gx_ref, atol=1e-4, rtol=1e-4)
    for n in gp_ref:
        torch.testing.assert_close(gp_fast[n], gp_ref[n], atol=1e-4, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")
    for (n, b_ref), b_fast in zip(ref.named_buffers(), fast.buffers()):
        torch.testing.assert_close(b_fast, b_ref, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("backend", CPU_FUSED)
def test_fast_unit_runs_fused_bn_relu_only(monkeypatch, backend):
    """Each BN-ReLU pair of the fast unit is one fused call (no F.batch_norm, no ReLU), and
    the identity shortcut's gradient travels through the first one."""
    import torch.nn.functional as F

    require_backend(backend)
    calls = []
    real = resattn_fast.ops._batch_norm_relu  # what nn.bn_relu calls

    def spy(*a):
        calls.append(a[8])  # identity
        return real(*a)

    def forbidden(*a, **k):
        raise AssertionError("the fast unit called an unfused batch norm or ReLU")

    monkeypatch.setattr(resattn_fast.ops, "_batch_norm_relu", spy)
    monkeypatch.setattr(F, "batch_norm", forbidden)
    monkeypatch.setattr(F, "relu", forbidden)
    monkeypatch.setattr(torch, "relu", forbidden)
    fast_nn.ResidualUnit(8, 8, backend=backend)(torch.randn(2, 8, 5, 5)).sum().backward()
    assert calls == [True, False, False]
    calls.clear()
    m = fast_nn.AttentionModule(8, 1, backend=backend)
    m(torch.randn(2, 8, 6, 6))
    # 3 per unit: p + t + 2r (lowest level) + p = 6 units, and the mask head's 2 pairs.
    assert len(calls) == 6 * 3 + 2


def test_sync_batchnorm_convert_keeps_working():
    """convert_sync_batchnorm on a fast model: each unit then runs the SyncBatchNorm it holds
    (followed by ReLU) and the numbers stay the reference's (eval: no process group needed)."""
    ref = resattn_fast.create_model("attention56_cifar", impl="reference").eval()
    fast = resattn_fast.create_model("attention56_cifar").eval()
    fast.load_state_dict(ref.state_dict())
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(fast)
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(synced(x), ref(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", CPU_FUSED)
def test_fast_module_calls_fused_ops(monkeypatch, backend):
    """The fast module's mask branch runs the fused ops, not F.interpolate or torch.sigmoid."""
    import torch.nn.functional as F

    require_backend(backend)
    calls = {"up": 0, "attn": 0}
    real_up, real_attn = resattn_fast.ops.upsample_bilinear_add, resattn_fast.ops.attention_residual

    def up(*a, **k):
        calls["up"] += 1
        return real_up(*a, **k)

    def attn(*a, **k):
        calls["attn"] += 1
        return real_attn(*a, **k)

    def forbidden(*a, **k):
        raise AssertionError("the fast mask branch called a PyTorch op it should fuse")

    monkeypatch.setattr(resattn_fast.ops, "upsample_bilinear_add", up)
    monkeypatch.setattr(resattn_fast.ops, "attention_residual", attn)
    monkeypatch.setattr(F, "interpolate", forbidden)
    monkeypatch.setattr(torch, "sigmoid", forbidden)
    m = fast_nn.AttentionModule(8, 3, backend=backend)
    m(torch.randn(1, 8, 24, 24))
    assert calls == {"up": 3, "attn": 1}  # 2 skip levels + the last skip-less upsample


def test_convert_round_trip():
    model = resattn_fast.create_model("attention56_cifar", impl="reference").eval()
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(1, 3, 32, 32)
    want = model(x)
    assert resattn_fast.convert(model, "fast", backend="reference") is model
    kinds = {type(m) for m in model.modules() if isinstance(m, RefAttention)}
    assert kinds == {fast_nn.AttentionModule}
    assert {type(m) for m in model.modules() if isinstance(m, RefUnit)} == {fast_nn.ResidualUnit}
    assert model.norm_impl == "fast"
    torch.testing.assert_close(model(x), want)
    resattn_fast.convert(model, "reference")
    assert {type(m) for m in model.modules() if isinstance(m, RefAttention)} == {RefAttention}
    assert {type(m) for m in model.modules() if isinstance(m, RefUnit)} == {RefUnit}
    assert model.norm_impl == "reference"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="impl must be one of"):
        resattn_fast.convert(model, "turbo")


def test_convert_reference_model_exports_without_custom_ops():
    """A reference-converted model traces to plain aten ops (what ONNX export needs)."""
    model = resattn_fast.convert(resattn_fast.create_model("attention56_cifar"), "reference").eval()
    ep = torch.export.export(model, (torch.randn(1, 3, 32, 32),))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not any("resattn_fast" in t for t in targets)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ("cuda", "triton"))
def test_gpu_model_parity_attention56_cifar(backend):
    """The whole fast network on a GPU against the reference, in float64, over three SGD steps."""
    require_backend(backend, "cuda")
    ref = resattn_fast.create_model("attention56_cifar", impl="reference").train().double().cuda()
    fast = resattn_fast.create_model("attention56_cifar", backend=backend).train().double().cuda()
    fast.load_state_dict(ref.state_dict())
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    opt_fast = torch.optim.SGD(fast.parameters(), lr=0.05, momentum=0.9)
    for step in range(3):
        gen = torch.Generator().manual_seed(step)
        x = torch.randn(4, 3, 32, 32, generator=gen, dtype=torch.float64).cuda()
        g = torch.randn(4, 10, generator=gen, dtype=torch.float64).cuda()
        opt_ref.zero_grad(set_to_none=True)
        opt_fast.zero_grad(set_to_none=True)
        for a, b in zip(_grads_with(fast, x, g), _grads_with(ref, x, g)):
            torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)
        opt_ref.step()
        opt_fast.step()
    for b_ref, b_fast in zip(ref.buffers(), fast.buffers()):
        torch.testing.assert_close(b_fast, b_ref, atol=1e-9, rtol=1e-9)
