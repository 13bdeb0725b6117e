"""Training building blocks: recipe schedules, samplers, data sets, checkpoints."""

from __future__ import annotations

import os
import pickle
import random

import numpy as np
import pytest
import torch

from resattn_fast.errors import UsageError
from resattn_fast.train import checkpoint as ckpt_mod
from resattn_fast.train.data import TensorImageDataset, load_data
from resattn_fast.train.distributed import EpochSampler, ShardSampler
from resattn_fast.train.recipe import RECIPES, build_optimizer, build_scheduler, lr_factor

# --------------------------------------------------------------------------- recipe


def test_paper_cifar_schedule_matches_paper_at_full_length():
    rc = RECIPES["paper-cifar"]
    kw = dict(total_iters=160_000, warmup_iters=0, schedule="step", milestones=rc.milestones,
              gamma=rc.gamma)
    assert lr_factor(63_999, **kw) == 1.0
    assert lr_factor(64_000, **kw) == pytest.approx(0.1)
    assert lr_factor(95_999, **kw) == pytest.approx(0.1)
    assert lr_factor(96_000, **kw) == pytest.approx(0.01)
    assert (rc.lr, rc.momentum, rc.nesterov, rc.weight_decay, rc.batch_size) == (0.1, 0.9, True, 1e-4, 64)


def test_paper_imagenet_schedule_matches_paper_at_full_length():
    rc = RECIPES["paper-imagenet"]
    kw = dict(total_iters=530_000, warmup_iters=0, schedule="step", milestones=rc.milestones,
              gamma=rc.gamma)
    assert [lr_factor(i, **kw) for i in (199_999, 200_000, 400_000, 500_000)] == pytest.approx(
        [1.0, 0.1, 0.01, 0.001])


def test_cosine_and_warmup():
    kw = dict(total_iters=110, warmup_iters=10, schedule="cosine", milestones=(), gamma=0.1)
    assert lr_factor(0, **kw) == pytest.approx(0.1)
    assert lr_factor(9, **kw) == pytest.approx(1.0)
    assert lr_factor(10, **kw) == pytest.approx(1.0)
    assert lr_factor(60, **kw) == pytest.approx(0.5)
    assert lr_factor(110, **kw) == pytest.approx(0.0, abs=1e-12)


def test_scheduler_state_is_plain_data(tmp_path):
    p = torch.nn.Parameter(torch.zeros(3))
    opt = build_optimizer([p], lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    sched = build_scheduler(opt, total_iters=10, warmup_iters=0, schedule="step",
                            milestones=(0.4, 0.6), gamma=0.1)
    for _ in range(5):
        opt.step()
        sched.step()
    torch.save({"s": sched.state_dict(), "o": opt.state_dict()}, tmp_path / "s.pt")
    loaded = torch.load(tmp_path / "s.pt", weights_only=True)
    assert loaded["s"]["last_epoch"] == 5
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)


# --------------------------------------------------------------------------- samplers


@pytest.mark.parametrize("world", [1, 2, 4])
def test_epoch_sampler_splits_each_global_batch_over_ranks(world):
    single = list(EpochSampler(50, 8, 1, 0, seed=3).__iter__())
    parts = []
    for r in range(world):
        s = EpochSampler(50, 8, world, r, seed=3)
        parts.append(list(s))
        assert len(s) == len(parts[-1]) == 48 // world
    local = 8 // world
    for b in range(6):  # 50 // 8 whole batches, the rest dropped
        rebuilt = sum((p[b * local:(b + 1) * local] for p in parts), [])
        assert rebuilt == single[b * 8:(b + 1) * 8]
    assert len(set(single)) == 48


def test_epoch_sampler_epochs_differ_and_start_batch_skips():
    s = EpochSampler(40, 8, seed=0)
    s.set_epoch(1)
    e1 = list(s)
    s.set_epoch(2)
    e2 = list(s)
    assert e1 != e2 and sorted(e1) == sorted(e2)
    s.set_epoch(1, start_batch=3)
    assert list(s) == e1[24:] and len(s) == 16


def test_shard_sampler_covers_each_sample_once():
    seen = sorted(i for r in range(3) for i in ShardSampler(10, 3, r))
    assert seen == list(range(10))
    assert [len(ShardSampler(10, 3, r)) for r in range(3)] == [4, 3, 3]


# --------------------------------------------------------------------------- data


def test_digits_split_and_shapes():
    d = load_data("digits", data_dir=None, image_size=32, seed=0)
    assert (len(d.train), len(d.val), d.num_classes) == (1437, 360, 10)
    x, y = d.train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= y < 10
    # normalised with the training set's statistics
    xs = torch.stack([d.val[i][0] for i in range(100)])
    assert abs(float(xs.mean())) < 0.5


def test_augmentation_depends_on_seed_epoch_index_only():
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    ds = TensorImageDataset(images, torch.arange(8), (0.5,) * 3, (0.25,) * 3, "crop-flip", True, seed=0)
    ds.set_epoch(1)
    a = [ds[i][0] for i in range(8)]
    torch.manual_seed(123)  # the global RNG plays no part
    b = [ds[i][0] for i in range(8)]
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=0, atol=0)
    ds.set_epoch(2)
    c = [ds[i][0] for i in range(8)]
    assert any(not torch.equal(u, v) for u, v in zip(a, c))
    # pad-4 crop: a shifted copy of the image with zero (normalised: -2) borders
    raw = (images[0].float() / 255 - 0.5) / 0.25
    assert any(torch.equal(a[0][:, 4:-4, 4:-4], raw[:, dy:dy + 24, dx:dx + 24]) or
               torch.equal(a[0][:, 4:-4, 4:-4], raw.flip(2)[:, dy:dy + 24, dx:dx + 24])
               for dy in range(9) for dx in range(9))


def _write_cifar10(root, n_train=20, n_test=10):
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(1, 6):
        with open(d / f"data_batch_{i}", "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (n_train, 3072), dtype=np.uint8),
                         b"labels": rng.integers(0, 10, n_train).tolist()}, f)
    with open(d / "test_batch", "wb") as f:
        pickle.dump({b"data": rng.integers(0, 256, (n_test, 3072), dtype=np.uint8),
                     b"labels": rng.integers(0, 10, n_test).tolist()}, f)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f)
    return d


def test_cifar10_torchvision_layout(tmp_path):
    _write_cifar10(tmp_path)
    for data_dir in (tmp_path, tmp_path / "cifar-10-batches-py"):
        d = load_data("cifar10", data_dir=str(data_dir), image_size=32, seed=0)
        assert (len(d.train), len(d.val), d.num_classes) == (100, 10, 10)
        assert d.classes[3] == "c3"
        x, _ = d.train[5]
        assert x.shape == (3, 32, 32)


def test_cifar_refuses_foreign_pickles(tmp_path):
    d = _write_cifar10(tmp_path)
    with open(d / "data_batch_3", "wb") as f:
        pickle.dump({"data": random.Random(0)}, f)  # a pickled object of another class
    with pytest.raises(UsageError, match="data_batch_3 is not a CIFAR batch"):
        load_data("cifar10", data_dir=str(tmp_path), image_size=32, seed=0)


def test_imagefolder(tmp_path):
    from PIL import Image

    for split, n in (("train", 3), ("val", 1)):
        for c in ("cat", "dog"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (40 + i, 30), (i * 40, 100, 200)).save(tmp_path / split / c / f"{i}.png")
    d = load_data("imagefolder", data_dir=str(tmp_path), image_size=32, seed=0)
    assert d.classes == ["cat", "dog"] and (len(d.train), len(d.val)) == (6, 2)
    d.train.set_epoch(1)
    assert d.train[4][0].shape == (3, 32, 32) and d.train[4][1] == 1
    assert d.val[0][0].shape == (3, 32, 32)


# --------------------------------------------------------------------------- checkpoints


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    path = str(tmp_path / "last.pt")
    ckpt_mod.save_checkpoint({"model": {"w": torch.ones(2)}}, path)
    before = open(path, "rb").read()

    def broken(f):
        f.write(b"partial bytes")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        ckpt_mod.atomic_write(path, broken)
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["last.pt"]  # no temporary file left behind


def test_checkpoint_loads_weights_only_and_rng_roundtrip(tmp_path):
    random.seed(5)
    np.random.seed(5)  # noqa: NPY002  (the legacy global RNG is what is saved)
    torch.manual_seed(5)
    state = {"model": {"w": torch.arange(3.0)}, "rng": ckpt_mod.rng_state(), "history": [{"epoch": 1}]}
    path = str(tmp_path / "c.pt")
    ckpt_mod.save_checkpoint(state, path)
    expect = (random.random(), float(np.random.rand()), float(torch.rand(())))  # noqa: NPY002
    loaded = torch.load(path, weights_only=True)  # plain data only
    assert loaded["format"] == ckpt_mod.FORMAT
    ckpt_mod.set_rng_state(loaded["rng"])
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == expect  # noqa: NPY002


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(UsageError, match="no checkpoint at"):
        ckpt_mod.load_checkpoint(str(tmp_path / "missing.pt"))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a zip file at all")
    with pytest.raises(UsageError, match="corrupt or not a checkpoint"):
        ckpt_mod.load_checkpoint(str(bad))
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.ones(1)}, other)
    with pytest.raises(UsageError, match="not a resattn train checkpoint"):
        ckpt_mod.load_checkpoint(str(other))


# --------------------------------------------------------------------------- grad checkpointing flag


def _train_args(*extra):
    from resattn_fast import cli

    return cli.build_parser().parse_args(["train", "--model", "attention56_cifar", "--out", "x", *extra])


@pytest.mark.parametrize("extra, want", [
    ((), None),
    (("--grad-checkpointing",), "full"),  # a bare flag keeps its old meaning
    (("--grad-checkpointing", "full"), "full"),
    (("--grad-checkpointing", "selective"), "selective"),
    (("--grad-checkpointing", "none"), "none"),
    (("--grad-checkpointing", "--channels-last"), "full"),
])
def test_grad_checkpointing_flag_parses(extra, want):
    assert _train_args(*extra).grad_checkpointing == want


def test_grad_checkpointing_flag_rejects_unknown_mode(capsys):
    with pytest.raises(SystemExit):
        _train_args("--grad-checkpointing", "some")
    assert "invalid choice: 'some'" in capsys.readouterr().err


def test_grad_checkpointing_mode_of_a_run():
    from resattn_fast.train.command import grad_checkpointing_mode

    assert grad_checkpointing_mode(None, None) == "none"
    assert grad_checkpointing_mode("selective", None) == "selective"
    # --resume keeps the recorded mode unless the command line names one
    for recorded, want in (("selective", "selective"), ("full", "full"), (True, "full"), (False, "none"),
                           (None, "none")):
        ckpt = {"config": {"grad_checkpointing": recorded}}
        assert grad_checkpointing_mode(None, ckpt) == want
        assert grad_checkpointing_mode("none", ckpt) == "none"
    assert grad_checkpointing_mode(None, {"config": {}}) == "none"


def test_selective_with_reference_impl_is_a_one_line_usage_error(capsys):
    from resattn_fast import cli

    rc = cli.main(["train", "--model", "attention56_cifar", "--out", "unused", "--impl", "reference",
                   "--grad-checkpointing", "selective"])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["resattn train: error: --grad-checkpointing selective recomputes the fused BN-ReLU "
                   "outputs and needs --impl fast; with --impl reference use none or full"]
