"""User mistakes give one clear line on stderr and exit status 2, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from resattn_fast import cli
from resattn_fast.train.checkpoint import save_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = ["train", "--model", "attention56_cifar", "--epochs", "1", "--threads", "1",
        "--train-subset", "32", "--val-subset", "16", "--batch-size", "16", "--log-every", "0"]


def _fails(capsys, argv, *fragments):
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"resattn {argv[0]}: error: "), err
    assert "Traceback" not in err
    for frag in fragments:
        assert frag in lines[0], lines[0]
    return lines[0]


def test_unknown_model_lists_valid_names(capsys, tmp_path):
    line = _fails(capsys, ["train", "--model", "attention57_cifar", "--out", str(tmp_path / "r")],
                  "--model", "attention57_cifar", "Valid names: attention56,")
    assert "attention452_cifar" in line
    assert not (tmp_path / "r").exists()


def test_missing_data_dir(capsys, tmp_path):
    _fails(capsys, [*BASE, "--data", "cifar10", "--out", str(tmp_path / "r")], "needs --data-dir")
    _fails(capsys, [*BASE, "--data", "cifar10", "--data-dir", str(tmp_path / "nope"),
                    "--out", str(tmp_path / "r")], "no such directory")
    _fails(capsys, [*BASE, "--data", "cifar100", "--data-dir", str(tmp_path),
                    "--out", str(tmp_path / "r")], "no cifar-100-python/ folder")


def test_malformed_data_dir(capsys, tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (d / name).write_bytes(b"\x80\x04garbage")
    _fails(capsys, [*BASE, "--data", "cifar10", "--data-dir", str(tmp_path), "--out", str(tmp_path / "r")],
           "data_batch_1 is not a CIFAR batch file")
    (d / "test_batch").unlink()
    _fails(capsys, [*BASE, "--data", "cifar10", "--data-dir", str(tmp_path), "--out", str(tmp_path / "r")],
           "test_batch is missing")
    (tmp_path / "imgs" / "train" / "a").mkdir(parents=True)
    _fails(capsys, [*BASE, "--data", "imagefolder", "--data-dir", str(tmp_path / "imgs"),
                    "--out", str(tmp_path / "r")], "no val/ folder")


def test_resume_without_checkpoint(capsys, tmp_path):
    _fails(capsys, [*BASE, "--resume", "--out", str(tmp_path / "r")], "--resume: no checkpoint at")


def test_corrupt_checkpoint(capsys, tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "last.pt").write_bytes(b"PK\x03\x04 truncated zip")
    _fails(capsys, [*BASE, "--resume", "--out", str(run)], "is corrupt or not a checkpoint")


def test_mismatched_checkpoint(capsys, tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    save_checkpoint({"model": {"w": torch.ones(1)}, "optimizer": {}, "config": {"model": "attention92_cifar"},
                     "data": {"num_classes": 10}}, str(run / "last.pt"))
    _fails(capsys, [*BASE, "--resume", "--out", str(run)],
           "was trained with --model 'attention92_cifar'")
    save_checkpoint({"model": {"w": torch.ones(1)}, "optimizer": {}, "config": {}, "data": {}},
                    str(run / "last.pt"))
    _fails(capsys, [*BASE, "--resume", "--out", str(run)], "does not fit --model attention56_cifar")


def test_out_already_holds_a_run(capsys, tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    save_checkpoint({"model": {}}, str(run / "last.pt"))
    _fails(capsys, [*BASE, "--out", str(run)], "already holds a run", "--resume")


def test_unavailable_backend(capsys, tmp_path, no_cuda_emulation):
    _fails(capsys, [*BASE, "--device", "cpu", "--backend", "cuda", "--out", str(tmp_path / "r")],
           "--backend", "'cuda' is not available")
    _fails(capsys, [*BASE, "--impl", "reference", "--backend", "cpu", "--out", str(tmp_path / "r")],
           "--backend applies to --impl fast only")


def test_batch_larger_than_data(capsys, tmp_path):
    _fails(capsys, [*BASE, "--batch-size", "64", "--out", str(tmp_path / "r")],
           "--batch-size 64 is larger than the training set (32 images)")


def test_bad_numbers_and_fp16_on_cpu(capsys, tmp_path):
    _fails(capsys, [*BASE, "--epochs", "0", "--out", str(tmp_path / "r")], "--epochs must be at least 1")
    _fails(capsys, [*BASE, "--lr", "nan", "--out", str(tmp_path / "r")], "--lr must be a finite number")
    _fails(capsys, [*BASE, "--device", "cpu", "--amp", "fp16", "--out", str(tmp_path / "r")],
           "--amp fp16 needs a CUDA GPU")


def test_masks_errors(capsys, tmp_path):
    _fails(capsys, ["masks", "--checkpoint", str(tmp_path / "none.pt"), "--image", "x.png",
                    "--out", str(tmp_path / "m.png")], "--checkpoint: no checkpoint at")


def test_process_exit_has_no_traceback(tmp_path):
    """The real process: exit status 2 and a single line, as a shell user sees it."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-m", "resattn_fast", "train", "--model", "resnet50",
                          "--out", str(tmp_path / "r")], capture_output=True, text=True, env=env,
                         cwd=REPO, timeout=300)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [res.stderr.strip()]
    assert "Traceback" not in res.stderr and "unknown model 'resnet50'" in res.stderr
