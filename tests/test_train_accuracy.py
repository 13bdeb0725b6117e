"""The README's training command reaches a validation accuracy of at least 0.9.

Part of the default run: 5 epochs of 22 iterations of Attention-56 (CIFAR) at batch 64
took 58 s on the 2-core AMD EPYC CI machine when it was quiet (several times longer while
its cores were shared with other jobs).
"""

from __future__ import annotations

import csv
import os

from resattn_fast import cli


def test_readme_command_reaches_090(tmp_path):
    run = tmp_path / "RUN"
    assert cli.main(["train", "--model", "attention56_cifar", "--data", "digits", "--epochs", "5",
                     "--batch-size", "64", "--out", str(run)]) == 0
    assert sorted(os.listdir(run)) == ["best.pt", "config.json", "curves.png", "last.pt", "metrics.csv"]
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4, 5]
    assert max(float(r["val_acc"]) for r in rows) >= 0.9, rows
