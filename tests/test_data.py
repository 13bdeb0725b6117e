"""The torchvision data pipeline: decoding, folders, reproducible augmentation, mixing."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
import torch

from resattn_fast import cli
from resattn_fast.train.augment import BatchMix
from resattn_fast.train.data import (
    TensorImageDataset,
    UnreadableImageWarning,
    eval_transform,
    load_data,
    read_image,
)

TINY = ["--model", "attention56_cifar", "--data", "digits", "--train-subset", "32",
        "--val-subset", "16", "--batch-size", "16", "--threads", "1", "--log-every", "0"]


def _image_folder(root, sizes=((40, 30), (33, 50)), classes=("cat", "dog")):
    from PIL import Image

    for split, n in (("train", 3), ("val", 1)):
        for ci, c in enumerate(classes):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                w, h = sizes[i % len(sizes)]
                arr = np.random.default_rng(ci * 10 + i).integers(0, 256, (h, w, 3), dtype=np.uint8)
                Image.fromarray(arr).save(root / split / c / f"{i}.png")
    return root


@pytest.mark.parametrize("ext", ["png", "bmp", "jpg"])
def test_read_image_decodes_like_pil(tmp_path, ext):
    from PIL import Image

    arr = np.random.default_rng(0).integers(0, 256, (21, 34, 3), dtype=np.uint8)
    path = tmp_path / f"a.{ext}"
    Image.fromarray(arr).save(path)
    t = read_image(str(path))
    assert t.dtype == torch.uint8 and t.shape == (3, 21, 34)
    with Image.open(path) as im:
        ref = torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)
    if ext == "jpg":  # two JPEG decoders may round the IDCT differently by a level or two
        assert (t.int() - ref.int()).abs().max() <= 3
    else:
        torch.testing.assert_close(t, ref, rtol=0, atol=0)


def test_read_image_grayscale_becomes_rgb(tmp_path):
    from PIL import Image

    Image.new("L", (9, 7), 77).save(tmp_path / "g.png")
    t = read_image(str(tmp_path / "g.png"))
    assert t.shape == (3, 7, 9) and bool((t == 77).all())


def test_eval_transform_is_resize_then_centre_crop():
    img = torch.arange(3 * 64 * 48, dtype=torch.float32).view(3, 64, 48)
    out = eval_transform(32)(img)
    from torchvision.transforms.v2 import functional as TF

    expect = TF.center_crop(TF.resize(img, 37, antialias=True), [32, 32])  # 32 * 256/224 = 36.6
    torch.testing.assert_close(out, expect, rtol=0, atol=0)


def test_imagefolder_is_scanned_with_torchvision(tmp_path):
    from torchvision.datasets import ImageFolder

    _image_folder(tmp_path)
    d = load_data("imagefolder", data_dir=str(tmp_path), image_size=32, seed=0)
    tv = ImageFolder(str(tmp_path / "train"))
    assert d.classes == tv.classes
    assert d.train.samples == [(p, int(c)) for p, c in tv.samples]


def test_imagefolder_no_augment_uses_validation_geometry(tmp_path):
    _image_folder(tmp_path)
    d = load_data("imagefolder", data_dir=str(tmp_path), image_size=32, seed=0, augment=False)
    d.train.set_epoch(1)
    path = d.train.samples[1][0]
    img = eval_transform(32)(read_image(path)).float() / 255
    expect = (img - d.train.mean) / d.train.std
    torch.testing.assert_close(d.train[1][0], expect, rtol=0, atol=0)
    ra = load_data("imagefolder", data_dir=str(tmp_path), image_size=32, seed=0, augment=False,
                   randaugment_m=9)
    ra.train.set_epoch(1)
    assert ra.train[1][0].shape == (3, 32, 32)


def test_unreadable_image_is_skipped_with_a_warning(tmp_path):
    _image_folder(tmp_path)
    broken = tmp_path / "train" / "cat" / "1.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    d = load_data("imagefolder", data_dir=str(tmp_path), image_size=32, seed=0)
    idx = [p for p, _ in d.train.samples].index(str(broken))
    d.train.set_epoch(1)
    with pytest.warns(UnreadableImageWarning, match=f"skipping unreadable image {broken}"):
        x, y = d.train[idx]
    assert x.shape == (3, 32, 32) and bool(torch.isfinite(x).all())
    assert y == d.train.samples[idx + 1][1]  # the next image stands in


def test_folder_of_unreadable_images_fails_clearly(tmp_path):
    _image_folder(tmp_path)
    for p in (tmp_path / "val").rglob("*.png"):
        p.write_bytes(b"not an image")
    d = load_data("imagefolder", data_dir=str(tmp_path), image_size=32, seed=0)
    with pytest.warns(UnreadableImageWarning), pytest.raises(RuntimeError, match="no image of this data set"):
        d.val[0]


def test_val_folder_with_an_unknown_class_is_a_usage_error(tmp_path, capsys):
    _image_folder(tmp_path)
    (tmp_path / "val" / "bird").mkdir()
    rc = cli.main(["train", *TINY, "--data", "imagefolder", "--data-dir", str(tmp_path),
                   "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "has no counterpart in train/" in err[0]


def test_randaugment_depends_on_seed_epoch_index_only():
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    ds = TensorImageDataset(images, torch.arange(6), (0.5,) * 3, (0.25,) * 3, "crop-flip", True,
                            seed=3, randaugment_m=9)
    ds.set_epoch(1)
    state = torch.get_rng_state()
    a = [ds[i][0] for i in range(6)]
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
    torch.manual_seed(99)
    b = [ds[i][0] for i in range(6)]
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=0, atol=0)
    ds.set_epoch(2)
    assert any(not torch.equal(u, ds[i][0]) for i, u in enumerate(a))


@pytest.mark.parametrize("mixup,cutmix", [(0.8, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_batch_mix_is_reproducible_soft_targets(mixup, cutmix):
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    y = torch.arange(8) % 5
    mix = BatchMix(mixup, cutmix, num_classes=5, seed=1)
    mix.set_epoch(2)
    x1, y1 = mix(x, y, 3)
    x2, y2 = mix(x, y, 3)
    torch.testing.assert_close(x1, x2, rtol=0, atol=0)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    assert y1.shape == (8, 5)
    torch.testing.assert_close(y1.sum(1), torch.ones(8))
    assert not torch.equal(x1, x)
    x3, _ = mix(x, y, 4)
    assert not torch.equal(x3, x1)


def _weights(path):
    return torch.load(path, weights_only=True)["model"]


def test_regularised_run_resumes_exactly(tmp_path, monkeypatch, capsys):
    """With --label-smoothing, --mixup, --cutmix and --randaugment, a run stopped by SIGTERM
    in epoch 2 and resumed ends with the same weights as one never interrupted."""
    from resattn_fast.train import loop as loop_mod

    opts = ["--label-smoothing", "0.1", "--mixup", "0.8", "--cutmix", "1.0", "--randaugment", "9",
            "--epochs", "2"]
    straight, split = tmp_path / "a", tmp_path / "b"
    assert cli.main(["train", *TINY, *opts, "--out", str(straight)]) == 0

    step = loop_mod.Trainer.train_step
    calls = {"n": 0}

    def step_then_sigterm(self, x, y):
        calls["n"] += 1
        if calls["n"] == 3:  # the first step of epoch 2 (2 steps per epoch)
            os.kill(os.getpid(), signal.SIGTERM)
        return step(self, x, y)

    monkeypatch.setattr(loop_mod.Trainer, "train_step", step_then_sigterm)
    assert cli.main(["train", *TINY, *opts, "--out", str(split)]) == 128 + signal.SIGTERM
    monkeypatch.setattr(loop_mod.Trainer, "train_step", step)
    assert torch.load(split / "last.pt", weights_only=True)["step"] == 1
    assert cli.main(["train", *TINY, *opts, "--resume", "--out", str(split)]) == 0
    a, b = _weights(straight / "last.pt"), _weights(split / "last.pt")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)
    cfg = torch.load(split / "last.pt", weights_only=True)["config"]
    assert (cfg["label_smoothing"], cfg["mixup"], cfg["cutmix"], cfg["randaugment"]) == (0.1, 0.8, 1.0, 9)
    capsys.readouterr()
    # the settings define the run: resuming without them is refused
    assert cli.main(["train", *TINY, "--epochs", "3", "--resume", "--out", str(split)]) == 2
    assert "was trained with --label-smoothing 0.1" in capsys.readouterr().err


def test_regularisation_options_off_by_default_and_checked(tmp_path, capsys):
    from resattn_fast.cli import build_parser

    args = build_parser().parse_args(["train", "--model", "attention56_cifar", "--out", "x"])
    assert (args.label_smoothing, args.mixup, args.cutmix, args.randaugment) == (0.0, 0.0, 0.0, None)
    for bad, frag in ((["--label-smoothing", "1.5"], "--label-smoothing must be in [0, 1)"),
                      (["--mixup", "-1"], "--mixup must be a finite number >= 0"),
                      (["--randaugment", "40"], "--randaugment must be a magnitude from 0 to 30")):
        assert cli.main(["train", *TINY, *bad, "--out", str(tmp_path / "r")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and frag in err[0], err
    assert not os.path.exists(tmp_path / "r")
