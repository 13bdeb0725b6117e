"""Model zoo: parameter counts, forward/backward of every network, timm-style API."""

from __future__ import annotations

import pytest
import torch

import resattn_fast
from resattn_fast.models import CONFIGS

IMAGENET = ["attention56", "attention92", "attention128", "attention164", "attention236", "attention452"]
CIFAR = ["attention56_cifar", "attention92_cifar", "attention236_cifar", "attention452_cifar"]

# Exact counts with 1000 classes (PAPER.md; 56 and 92 from the released Caffe definitions).
PARAMS = {
    "attention56": 31_810_728,
    "attention92": 52_466_344,
    "attention128": 65_294_504,
    "attention164": 78_122_664,
    "attention236": 103_778_984,
    "attention452": 192_137_896,
}
# The paper's CIFAR counts; our documented construction must be within 20%.
PAPER_CIFAR = {"attention92_cifar": 1.9e6, "attention236_cifar": 5.1e6, "attention452_cifar": 8.6e6}


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_list_models():
    assert resattn_fast.list_models() == IMAGENET + CIFAR


def test_unknown_model_lists_names():
    with pytest.raises(ValueError, match="Did you mean 'attention92'.*Valid names: attention56"):
        resattn_fast.create_model("attention93")


@pytest.mark.parametrize("name", IMAGENET)
def test_imagenet_params_and_forward(name):
    model = resattn_fast.create_model(name, impl="reference").eval()
    assert _count(model) == PARAMS[name]
    with torch.no_grad():
        out = model(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 1000)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", CIFAR)
def test_cifar_params_forward_backward(name):
    model = resattn_fast.create_model(name, impl="reference").train()
    if name in PAPER_CIFAR:
        assert abs(_count(model) / PAPER_CIFAR[name] - 1) <= 0.20, _count(model)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    out.square().sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"parameters without a finite gradient: {missing[:5]}"
    # Every parameter gets a non-zero gradient somewhere (no dead branch).
    dead = [n for n, p in model.named_parameters() if p.grad.abs().sum() == 0]
    assert not dead, f"parameters with an all-zero gradient: {dead[:5]}"


@pytest.mark.parametrize("name,m", [("attention56", 1), ("attention92", 2), ("attention128", 3),
                                    ("attention164", 4), ("attention236", 6)])
def test_depth_formula(name, m):
    """Depth = 36m + 20 (PAPER.md): weighted layers on the trunk path (stem conv, 3 convs
    per residual unit outside the mask branches, fc); m = attention modules per stage."""
    model = resattn_fast.create_model(name, impl="reference")
    ru, am = resattn_fast.reference.ResidualUnit, resattn_fast.reference.AttentionModule
    outside = sum(1 for stage in model.stages for blk in stage if isinstance(blk, ru))
    trunk_path = sum(len(blk.pre) + len(blk.trunk) + len(blk.post)
                     for blk in model.modules() if isinstance(blk, am))
    assert 2 + 3 * (outside + trunk_path) == 36 * m + 20


def test_timm_api():
    model = resattn_fast.create_model("attention56_cifar", impl="reference").eval()
    x = torch.randn(2, 3, 32, 32)
    feats = model.forward_features(x)
    assert feats.shape == (2, model.num_features, 8, 8)
    pooled = model.forward_head(feats, pre_logits=True)
    assert pooled.shape == (2, model.num_features)
    torch.testing.assert_close(model.forward_head(feats), model(x))
    model.reset_classifier(7)
    assert model(x).shape == (2, 7)
    assert model.get_classifier().out_features == 7
    model.reset_classifier(0)
    assert model(x).shape == (2, model.num_features)
    masks = model.forward_masks(x)
    assert [tuple(m.shape) for m in masks] == [(2, 64, 32, 32), (2, 128, 16, 16), (2, 256, 8, 8)]
    assert all(((m >= 0) & (m <= 1)).all() and m.std() > 0 for m in masks)


def test_num_classes_and_bad_input():
    model = resattn_fast.create_model("attention56_cifar", num_classes=100, impl="reference")
    assert model.fc.out_features == 100
    with pytest.raises(ValueError, match=r"expected input of shape \(N, 3, H, W\)"):
        model(torch.randn(2, 1, 32, 32))


def test_grad_checkpointing_same_gradients_and_running_stats():
    torch.manual_seed(0)
    a = resattn_fast.create_model("attention56_cifar", impl="reference").train()
    b = resattn_fast.create_model("attention56_cifar", impl="reference", grad_checkpointing=True).train()
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 3, 32, 32)
    a(x).square().sum().backward()
    b(x).square().sum().backward()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, atol=1e-4, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")
    # Running statistics updated exactly once, as without checkpointing.
    for (n, ba), bb in zip(a.named_buffers(), b.buffers()):
        torch.testing.assert_close(bb, ba, atol=1e-6, rtol=1e-6, msg=lambda m, n=n: f"{n}: {m}")


def test_configs_documented():
    for name, cfg in CONFIGS.items():
        assert cfg.name == name
        assert cfg.input_size in (32, 224)
