"""`resattn masks`: one PNG with the image and the soft mask of each attention stage."""

from __future__ import annotations

import pytest
import torch

import resattn_fast
from resattn_fast import cli
from resattn_fast.train.checkpoint import save_checkpoint
from resattn_fast.train.masks import stage_masks


def _checkpoint(path):
    model = resattn_fast.create_model("attention56_cifar", num_classes=10)
    save_checkpoint({"model": model.state_dict(), "epoch": 3,
                     "config": {"model": "attention56_cifar"},
                     "data": {"num_classes": 10, "classes": [str(i) for i in range(10)],
                              "mean": [0.3, 0.3, 0.3], "std": [0.4, 0.4, 0.4], "image_size": 32}},
                    str(path))
    return model


def test_stage_masks_shapes():
    model = resattn_fast.create_model("attention92_cifar", num_classes=10).eval()
    masks = stage_masks(model, torch.randn(1, 3, 32, 32))
    assert [tuple(m.shape) for m in masks] == [(32, 32), (16, 16), (8, 8)]
    assert all(float(m.min()) > 0 and float(m.max()) < 1 for m in masks)


def test_masks_command_writes_png(tmp_path, capsys):
    from PIL import Image

    _checkpoint(tmp_path / "best.pt")
    Image.new("RGB", (48, 40), (200, 30, 30)).save(tmp_path / "img.jpg")
    out = tmp_path / "masks.png"
    # a run directory stands for its best.pt
    assert cli.main(["masks", "--checkpoint", str(tmp_path), "--image", str(tmp_path / "img.jpg"),
                     "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(out) as im:
        assert im.size[0] > im.size[1]  # four panels side by side
    assert "3 stages" in capsys.readouterr().out


@pytest.mark.parametrize("content", [b"", b"not an image"])
def test_masks_unreadable_image(tmp_path, capsys, content):
    _checkpoint(tmp_path / "best.pt")
    (tmp_path / "img.png").write_bytes(content)
    rc = cli.main(["masks", "--checkpoint", str(tmp_path / "best.pt"), "--image",
                   str(tmp_path / "img.png"), "--out", str(tmp_path / "m.png")])
    err = capsys.readouterr().err
    assert rc == 2 and "--image: cannot read" in err and "Traceback" not in err
    assert not (tmp_path / "m.png").exists()
