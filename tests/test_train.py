"""`resattn train` end to end on tiny runs: files, exact resume, signals, NaN, SIGKILL."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import threading

import pytest
import torch
from conftest import require_backend

from resattn_fast import cli
from resattn_fast.train import loop as loop_mod

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHILD_TIMEOUT_S = 600  # a child process that runs longer is killed and the test fails

# 64 training images in batches of 16: 4 iterations per epoch; 32 validation images.
TINY = ["--model", "attention56_cifar", "--data", "digits", "--train-subset", "64",
        "--val-subset", "32", "--batch-size", "16", "--threads", "1", "--log-every", "0"]


def _train(out, *extra):
    return cli.main(["train", *TINY, "--out", str(out), *extra])


def _rows(run):
    with open(os.path.join(run, "metrics.csv")) as f:
        return list(csv.DictReader(f))


def _model_state(path):
    return torch.load(path, weights_only=True)["model"]


def _tmp_files(run):
    return [f for f in os.listdir(run) if f.endswith(".tmp")]


def test_tiny_run_writes_every_file(tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(run, "--epochs", "2") == 0
    assert sorted(os.listdir(run)) == ["best.pt", "config.json", "curves.png", "last.pt", "metrics.csv"]
    rows = _rows(run)
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert list(rows[0]) == ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr",
                             "images_per_s", "peak_mem_mb"]
    assert all(float(r["images_per_s"]) > 0 and float(r["peak_mem_mb"]) > 0 for r in rows)
    cfg = json.load(open(run / "config.json"))
    assert cfg["config"]["model"] == "attention56_cifar" and cfg["config"]["recipe"] == "cosine"
    assert cfg["data"]["train_size"] == 64
    last = torch.load(run / "last.pt", weights_only=True)
    assert last["epoch"] == 2 and last["step"] == 0 and len(last["history"]) == 2
    assert {"model", "optimizer", "scheduler", "scaler", "rng", "config"} <= set(last)
    best = torch.load(run / "best.pt", weights_only=True)
    assert best["epoch"] == last["best_epoch"]
    assert open(run / "curves.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "epoch 2/2: train loss" in out and "resattn train: done" in out


def test_sigterm_mid_epoch_then_resume_is_exact(tmp_path, monkeypatch, capsys):
    """A run stopped by SIGTERM in the middle of epoch 1 and resumed ends with the same
    weights and metrics as a run that was never interrupted."""
    straight = tmp_path / "straight"
    assert _train(straight, "--epochs", "2") == 0

    make = loop_mod.make_criterion
    calls = {"n": 0}

    def criterion_sending_sigterm():
        inner = make()

        def f(logits, y):
            if logits.requires_grad:
                calls["n"] += 1
                if calls["n"] == 2:  # during the 2nd training step of epoch 1
                    os.kill(os.getpid(), signal.SIGTERM)
            return inner(logits, y)
        return f

    monkeypatch.setattr(loop_mod, "make_criterion", criterion_sending_sigterm)
    run = tmp_path / "run"
    assert _train(run, "--epochs", "2") == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "stopped by SIGTERM at epoch 1, after batch 2/4" in err and "--resume" in err
    ck = torch.load(run / "last.pt", weights_only=True)
    assert (ck["epoch"], ck["step"], ck["partial"]["count"]) == (0, 2, 32.0)
    assert not (run / "metrics.csv").exists()
    monkeypatch.setattr(loop_mod, "make_criterion", make)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored

    assert _train(run, "--epochs", "2", "--resume") == 0
    a, b = _model_state(straight / "last.pt"), _model_state(run / "last.pt")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)
    ra, rb = _rows(straight), _rows(run)
    assert [r["epoch"] for r in rb] == ["1", "2"]
    for x, y in zip(ra, rb):
        for col in ("train_loss", "train_acc", "val_loss", "val_acc", "lr"):
            assert float(x[col]) == pytest.approx(float(y[col]), rel=1e-12, abs=1e-12), col
    assert _tmp_files(run) == []


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    make = loop_mod.make_criterion
    calls = {"n": 0}

    def criterion_diverging():
        inner = make()

        def f(logits, y):
            loss = inner(logits, y)
            if logits.requires_grad:
                calls["n"] += 1
                if calls["n"] >= 6:  # 2nd step of epoch 2
                    return loss * float("nan")
            return loss
        return f

    monkeypatch.setattr(loop_mod, "make_criterion", criterion_diverging)
    run = tmp_path / "run"
    assert _train(run, "--epochs", "3") == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "NaN/inf in epoch 2" in err[0] and "last.pt (after epoch 1) was kept" in err[0]
    ck = torch.load(run / "last.pt", weights_only=True)
    assert ck["epoch"] == 1 and ck["step"] == 0
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    assert [r["epoch"] for r in _rows(run)] == ["1"]


def test_resume_finished_run_and_extend(tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(run, "--epochs", "1") == 0
    assert _train(run, "--epochs", "1", "--resume") == 0
    assert "already finished 1 epochs" in capsys.readouterr().out
    assert _train(run, "--epochs", "2", "--resume") == 0
    assert [r["epoch"] for r in _rows(run)] == ["1", "2"]


def test_amp_bf16_channels_last_grad_checkpointing(tmp_path):
    """The fast model (fused kernels on the cpu backend) under bf16 autocast, channels_last
    and gradient checkpointing trains: every epoch's loss is finite, and lower than the
    epoch's before (at a learning rate small enough for 16-image batches: 2.44, 2.34, 2.29)."""
    require_backend("cpu")
    run = tmp_path / "run"
    assert _train(run, "--epochs", "3", "--amp", "bf16", "--channels-last", "--grad-checkpointing",
                  "--schedule", "cosine", "--lr", "0.05", "--impl", "fast", "--backend", "cpu") == 0
    losses = [float(r["train_loss"]) for r in _rows(run)]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses), losses
    assert all(b < a for a, b in zip(losses, losses[1:])), losses


def test_sigkill_mid_epoch_then_resume(tmp_path):
    """SIGKILL gives no chance to save: the run resumes from the last end-of-epoch
    checkpoint, and each epoch appears once in metrics.csv."""
    run = tmp_path / "run"
    args = [sys.executable, "-m", "resattn_fast", "train", *TINY, "--train-subset", "96",
            "--epochs", "2", "--log-every", "1", "--out", str(run)]
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=REPO, env=env)
    seen = []
    # A watchdog, not a check between lines: a child that hangs without printing is killed
    # (which ends the read loop) and the test fails instead of hanging.
    hung = threading.Event()
    watchdog = threading.Timer(CHILD_TIMEOUT_S, lambda: (hung.set(), proc.kill()))
    watchdog.daemon = True
    watchdog.start()
    try:
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("epoch 2/2 step 2/6"):
                proc.kill()  # SIGKILL in the middle of epoch 2
                break
    finally:
        watchdog.cancel()
        proc.kill()
        proc.wait()
    assert not hung.is_set(), f"the child was still running after {CHILD_TIMEOUT_S} s and was killed:\n" + "".join(seen)
    assert proc.returncode == -signal.SIGKILL, "".join(seen) + proc.stderr.read()
    assert [r["epoch"] for r in _rows(run)] == ["1"]
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 1

    assert cli.main(["train", *TINY, "--train-subset", "96", "--epochs", "2", "--resume",
                     "--out", str(run)]) == 0
    assert [r["epoch"] for r in _rows(run)] == ["1", "2"]
    assert _tmp_files(run) == []
