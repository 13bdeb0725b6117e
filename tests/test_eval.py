"""`resattn eval`: on a checkpoint's own validation set it reproduces what training recorded."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from resattn_fast import cli
from resattn_fast.evaluate import evaluate

# 64 training images in batches of 16, 32 validation images, 2 epochs (as tests/test_train.py).
TINY = ["--model", "attention56_cifar", "--data", "digits", "--train-subset", "64",
        "--val-subset", "32", "--batch-size", "16", "--threads", "1", "--log-every", "0"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("eval") / "run"
    n = torch.get_num_threads()
    try:
        assert cli.main(["train", *TINY, "--epochs", "2", "--out", str(run)]) == 0
    finally:
        torch.set_num_threads(n)
    return run


def _metrics(run):
    with open(run / "metrics.csv") as f:
        return {int(r["epoch"]): r for r in csv.DictReader(f)}


def _eval(capsys, *argv):
    rc = cli.main(["eval", "--threads", "1", *argv])
    out = capsys.readouterr()
    assert rc == 0, out.err
    return out.out


@pytest.mark.parametrize("which", ["best.pt", "last.pt"])
def test_eval_reproduces_recorded_val_acc(run_dir, tmp_path, capsys, which):
    ckpt = torch.load(run_dir / which, weights_only=True)
    epoch = int(ckpt["epoch"])
    row = _metrics(run_dir)[epoch]
    js = tmp_path / "eval.json"
    out = _eval(capsys, "--checkpoint", str(run_dir / which), "--json", str(js))
    res = json.loads(js.read_text())
    assert res["images"] == 32 and res["epoch"] == epoch and res["data"] == "digits"
    assert res["top1"] == float(row["val_acc"])  # same images, same batches: exactly equal
    assert res["recorded_val_acc"] == float(row["val_acc"])
    assert res["loss"] == pytest.approx(float(row["val_loss"]), rel=1e-6)
    assert res["top1"] <= res["top5"] <= 1.0 and res["images_per_s"] > 0
    assert f"training recorded val_acc {float(row['val_acc']):.4f}" in out
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_eval_reference_impl_and_whole_val_set(run_dir, tmp_path, capsys):
    js = tmp_path / "a.json"
    _eval(capsys, "--checkpoint", str(run_dir), "--json", str(js))  # a run dir: its best.pt
    fast = json.loads(js.read_text())
    _eval(capsys, "--checkpoint", str(run_dir), "--impl", "reference", "--batch-size", "5",
          "--json", str(js))
    ref = json.loads(js.read_text())
    assert ref["top1"] == fast["top1"]
    assert ref["loss"] == pytest.approx(fast["loss"], rel=1e-5)
    _eval(capsys, "--checkpoint", str(run_dir), "--val-subset", "0", "--json", str(js))
    assert json.loads(js.read_text())["images"] == 360  # the whole digits validation split


class _FixedLogits(torch.nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, x):
        return self.logits[x[:, 0, 0, 0].long()]


def test_evaluate_counts_top1_top5_by_hand():
    # 4 samples, 6 classes; the label's rank in each row: 1st, 3rd, 6th, 5th.
    logits = torch.tensor([[9., 1, 2, 3, 4, 5], [1., 9, 8, 2, 3, 4], [9., 8, 7, 6, 5, 0],
                           [5., 4, 3, 2, 1, 0]])
    y = torch.tensor([0, 2, 5, 4])
    x = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 3, 2, 2)
    res = evaluate(_FixedLogits(logits), [(x[:3], y[:3]), (x[3:], y[3:])], torch.device("cpu"))
    assert res.images == 4
    assert res.top1 == 0.25 and res.top5 == 0.75
    expect = float(torch.nn.functional.cross_entropy(logits, y))
    assert res.loss == pytest.approx(expect, rel=1e-6)


def _fails(capsys, argv, *fragments):
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"resattn {argv[0]}: error: "), err
    for frag in fragments:
        assert frag in lines[0], lines[0]


def test_eval_errors(run_dir, tmp_path, capsys):
    _fails(capsys, ["eval", "--checkpoint", str(tmp_path / "none.pt")], "--checkpoint:", "no such file")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"PK\x03\x04 truncated")
    _fails(capsys, ["eval", "--checkpoint", str(bad)], "is corrupt or not a checkpoint")
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.ones(1)}, other)
    _fails(capsys, ["eval", "--checkpoint", str(other)], "neither a resattn train checkpoint")
    _fails(capsys, ["eval", "--checkpoint", str(run_dir), "--data", "cifar10"], "needs --data-dir")
    _fails(capsys, ["eval", "--checkpoint", str(run_dir), "--json", str(tmp_path / "no" / "x.json")],
           "--json: directory")
    _fails(capsys, ["eval", "--checkpoint", str(run_dir), "--amp", "fp16", "--device", "cpu"],
           "--amp fp16 needs a CUDA GPU")
