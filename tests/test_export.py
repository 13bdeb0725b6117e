"""`resattn export` (onnx, pt2, safetensors) and create_model(checkpoint_path=...)."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from conftest import require_module

import resattn_fast
from resattn_fast import cli
from resattn_fast import export as export_mod
from resattn_fast.models import WeightsError
from resattn_fast.ops import available_backends
from resattn_fast.train.checkpoint import save_checkpoint

NAME = "attention56_cifar"
DATA = {"name": "digits", "num_classes": 10, "classes": [str(i) for i in range(10)],
        "mean": [0.3, 0.3, 0.3], "std": [0.4, 0.4, 0.4], "image_size": 32}


def _trained_like(seed=0):
    """attention56_cifar with random weights and batch-norm statistics (so that eval-mode
    batch norm is not the identity)."""
    torch.manual_seed(seed)
    model = resattn_fast.create_model(NAME, impl="reference")
    g = torch.Generator().manual_seed(seed + 1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    model.eval()
    # Logits of a trained network's size (a few units): the 1e-4 criterion is absolute.
    with torch.no_grad():
        scale = float(model(torch.randn(8, 3, 32, 32, generator=g)).abs().max()) / 4
        model.fc.weight.div_(scale)
        model.fc.bias.div_(scale)
    return model


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "best.pt"
    model = _trained_like()
    save_checkpoint({"model": model.state_dict(), "epoch": 3, "val_acc": 0.5,
                     "config": {"model": NAME, "data": "digits"}, "data": DATA}, str(path))
    return path, model


def _batch(n, seed=5):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _export(capsys, ckpt_path, fmt, out, *extra):
    rc = cli.main(["export", "--checkpoint", str(ckpt_path), "--format", fmt, "--out", str(out), *extra])
    res = capsys.readouterr()
    assert rc == 0, res.err
    assert not [p for p in os.listdir(os.path.dirname(out)) if ".tmp" in p]
    return res.out


def test_onnx_matches_pytorch_within_1e4(ckpt, tmp_path, capsys):
    ort = require_module("onnxruntime")
    require_module("onnxscript")
    path, model = ckpt
    out = tmp_path / "m.onnx"
    text = _export(capsys, path, "onnx", out)
    assert "largest difference" in text
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input"]
    for n in (1, 4):  # the batch axis is dynamic
        x = _batch(n)
        got = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
        with torch.no_grad():
            expected = model(x)
        assert got.shape == (n, 10)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def test_onnx_refuses_fast_impl_and_writes_nothing(ckpt, tmp_path, capsys):
    path, _ = ckpt
    out = tmp_path / "m.onnx"
    assert cli.main(["export", "--checkpoint", str(path), "--format", "onnx", "--out", str(out),
                     "--impl", "fast"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "reference implementation only" in err[0]
    assert os.listdir(tmp_path) == []


def test_onnx_that_disagrees_is_not_kept(tmp_path, monkeypatch):
    require_module("onnxruntime")
    require_module("onnxscript")
    from resattn_fast.errors import UsageError

    tiny = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten(), torch.nn.Linear(4, 2))
    monkeypatch.setattr(export_mod, "ONNX_TOLERANCE", -1.0)  # any difference is too large
    with pytest.raises(UsageError, match="differs from PyTorch's by .* nothing written"):
        export_mod.export_onnx(tiny, str(tmp_path / "m.onnx"), 8)
    assert os.listdir(tmp_path) == []


def test_missing_optional_package_is_one_line(ckpt, tmp_path, capsys, monkeypatch):
    path, _ = ckpt
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import raises ImportError
    assert cli.main(["export", "--checkpoint", str(path), "--format", "onnx",
                     "--out", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install onnxruntime" in err[0]
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_pt2_loads_and_matches(ckpt, tmp_path, capsys, impl):
    path, model = ckpt
    out = tmp_path / f"m_{impl}.pt2"
    _export(capsys, path, "pt2", out, "--impl", impl)
    program = torch.export.load(str(out))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    fused = {t for t in targets if t.startswith("resattn_fast.")}
    if impl == "fast" and "cpu" in available_backends("cpu"):
        # Eval mode: the BN-ReLU pairs export as the fused op (no running-statistics update).
        assert fused == {"resattn_fast.upsample_bilinear_add.default",
                         "resattn_fast.attention_residual.default",
                         "resattn_fast.batch_norm_relu.default"}
    if impl == "reference":
        assert not fused and "aten.upsample_bilinear2d.vec" in targets
    for n in (1, 3):
        x = _batch(n)
        with torch.no_grad():
            expected = model(x)
            got = program.module()(x)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_safetensors_roundtrip_into_both_impls(ckpt, tmp_path, capsys):
    safetensors = require_module("safetensors")
    path, model = ckpt
    out = tmp_path / "m.safetensors"
    _export(capsys, path, "safetensors", out)
    with safetensors.safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert meta["model"] == NAME and meta["num_classes"] == "10" and meta["format"] == "resattn_fast.weights/1"
    x = _batch(2)
    with torch.no_grad():
        expected = model(x)
    for impl in ("fast", "reference"):
        loaded = resattn_fast.create_model(NAME, impl=impl, checkpoint_path=str(out)).eval()
        a, b = model.state_dict(), loaded.state_dict()
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), expected, rtol=1e-5, atol=1e-5)


def test_create_model_from_training_checkpoint(ckpt):
    path, model = ckpt
    loaded = resattn_fast.create_model(NAME, checkpoint_path=str(path), impl="reference").eval()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, rtol=0, atol=0)


def test_create_model_mismatches_are_one_clear_error(ckpt, tmp_path):
    path, _ = ckpt
    with pytest.raises(WeightsError, match="holds attention56_cifar weights, not attention92_cifar"):
        resattn_fast.create_model("attention92_cifar", checkpoint_path=str(path))
    with pytest.raises(WeightsError, match="has a 10-class classifier, not the num_classes=100"):
        resattn_fast.create_model(NAME, num_classes=100, checkpoint_path=str(path))
    with pytest.raises(WeightsError, match="no such file"):
        resattn_fast.create_model(NAME, checkpoint_path=str(tmp_path / "missing.safetensors"))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(WeightsError, match="corrupt or not a safetensors file"):
        resattn_fast.create_model(NAME, checkpoint_path=str(bad))
    require_module("safetensors")
    from safetensors.torch import save_file

    other = resattn_fast.create_model("attention92_cifar", impl="reference")
    foreign = tmp_path / "foreign.safetensors"  # no metadata: only the keys can tell
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(foreign))
    with pytest.raises(WeightsError, match="does not fit attention56_cifar"):
        resattn_fast.create_model(NAME, checkpoint_path=str(foreign))


def test_export_errors(ckpt, tmp_path, capsys):
    path, _ = ckpt

    def fails(argv, fragment):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("resattn export: error: ") and fragment in err[0], err

    fails(["export", "--checkpoint", str(tmp_path / "none.pt"), "--format", "pt2",
           "--out", str(tmp_path / "m.pt2")], "no such file")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    fails(["export", "--checkpoint", str(bad), "--format", "safetensors",
           "--out", str(tmp_path / "m.safetensors")], "corrupt or not a checkpoint")
    fails(["export", "--checkpoint", str(path), "--format", "pt2",
           "--out", str(tmp_path / "no" / "m.pt2")], "--out: directory")
    fails(["export", "--checkpoint", str(path), "--format", "onnx", "--opset", "11",
           "--out", str(tmp_path / "m.onnx")], "opset 18 or newer")
    assert sorted(os.listdir(tmp_path)) == ["bad.pt"]
